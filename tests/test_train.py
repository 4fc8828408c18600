"""train.py on a random (untrained) toy world: one step changes G and D and nothing else; resuming gives the
same weights as an uninterrupted run; two gloo processes keep G identical; a NaN stops the run by name; damaged
checkpoints, runaway weights and impossible knobs are refused by name."""
import os
import runpy
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def world(toy_world):
    return toy_world


def args(world, out, **kw):
    base = dict(teacher=f"{world}/sd", pairs=f"{world}/pairs", lpips=f"{world}/toy_latest_vgg16_tuned.safetensors",
                out_dir=str(out), batch_size=4, log_interval=1, sample_interval=1000, ckpt_interval=1000,
                r1_interval=2, warmup=1, lr_g=1e-3, lr_d=1e-3, holdout=4)
    return [f"--{k}={v}" for k, v in (base | kw).items()]


def test_one_step_changes_only_G_and_D(world, tmp_path, monkeypatch, root):
    import weights
    from safetensors.torch import load_file
    monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path, max_steps=1)])
    g = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    T = g["T"]
    # frozen parts equal the files they were loaded from, bit for bit
    for module, path in [(T.unet, "sd/unet"), (T.vae, "sd/vae")]:
        disk = (weights.load_unet if "unet" in path else weights.load_vae)(str(world / path)).state_dict()
        assert all(torch.equal(v, disk[k]) for k, v in module.state_dict().items()), path
    te = load_file(str(world / "sd/text_encoder/model.safetensors"))
    assert all(torch.equal(v, te[k]) for k, v in T.text_encoders[0].state_dict().items() if k in te)
    lp = load_file(str(world / "toy_latest_vgg16_tuned.safetensors"))
    assert all(torch.equal(v, lp[k]) for k, v in g["lpips_net"].state_dict().items())
    assert not g["lpips_net"].training and not any(p.requires_grad for p in g["lpips_net"].parameters())
    # G moved away from the teacher, D away from its initialisation (teacher weights, zero new branches and heads;
    # deterministic, so a fresh one is the reference). Its backbone only moves from step 2: zero heads pass no
    # gradient back at step 1.
    from discriminator import Discriminator
    G, D = g["raw_G"], g["raw_D"]
    assert any(not torch.equal(p, q) for p, q in zip(G.parameters(), T.unet.parameters()))
    d0 = Discriminator(T.unet).state_dict()
    assert any(not torch.equal(v, d0[k]) for k, v in D.state_dict().items())
    assert g["step"] == 1 and os.path.exists(tmp_path / "ckpt.pt")


def test_G_D_and_R1_have_their_own_gradient_clip(world, tmp_path, monkeypatch, root):
    """grad_clip bounds G's gradient norm, grad_clip_d the D loss's, grad_clip_r1 R1's; 0 turns a clip off."""
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        calls.append((params[0], max_norm))
        return clip(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path, max_steps=1, grad_clip=0.5, grad_clip_d=0,
                                                        grad_clip_r1=0.25)])
    g = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    (g_first, g_clip), (d_first, d_clip), (r1_first, r1_clip) = calls  # step 0 is an R1 step
    assert g_first is next(g["raw_G"].parameters()) and d_first is r1_first is next(g["raw_D"].parameters())
    assert (g_clip, d_clip, r1_clip) == (0.5, float("inf"), 0.25)


def test_r1_spike_is_clipped_on_its_own(world, tmp_path, monkeypatch, capsys, root):
    """A huge R1 (gamma 1e5) reaches D's optimiser as at most grad_clip_r1 beside the D loss's grad_clip_d: the
    gradient D steps with has norm <= the sum of the two clips, while gnorm_r1 (logged before its clip) is far above.
    With grad_clip_r1=0 the same R1 reaches the optimiser whole."""
    step_norms = {}
    adam_step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        grads = [p.grad.flatten() for group in self.param_groups for p in group["params"] if p.grad is not None]
        step_norms.setdefault(id(self), []).append(torch.cat(grads).norm().item())
        return adam_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    seen = {}
    for clip_r1 in (1e-5, 0):
        monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path / f"c{clip_r1}", max_steps=2, r1_interval=1,
                                                            r1_gamma=1e5, grad_clip_d=1e-5, grad_clip_r1=clip_r1)])
        g = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step 2 |")][0]
        seen[clip_r1] = step_norms[id(g["opt_d"])][1], float(line.split("| gnorm_r1 ")[1].split()[0])
    (clipped, r1_norm), (whole, r1_norm_unclipped) = seen[1e-5], seen[0]
    assert r1_norm > 1e-3 and clipped <= 2e-5 * (1 + 1e-5)  # step 2: D's heads are no longer zero, R1 has a gradient
    assert whole > 0.5 * r1_norm_unclipped > 5e-4


def test_r1_is_not_clipped_with_the_d_loss(world, tmp_path, monkeypatch, capsys, root):
    """R1's gradient joins D's after the D loss's clip (R1 has its own): the clipped norm (gnorm_d, logged before
    clipping) is the D loss's alone, the same with R1 at weight 0 or 1e5, while the weights D ends with differ. At
    step 1 D's heads are zero, so R1 has no gradient; step 2 shows it. Clipped together, gnorm_d grew with gamma and
    every R1 step had the clip's length whatever gamma was."""
    logs, D = {}, {}
    for gamma in (0, 100000):
        monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path / f"g{gamma}", max_steps=2, r1_interval=1,
                                                            r1_gamma=gamma, grad_clip_d=1e-3, mix_match=0,
                                                            regression="l2")])
        g = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step 2 |")][0]
        logs[gamma] = dict(kv.split(" ") for kv in line.split(" | ")[1:] if kv.count(" ") == 1)
        D[gamma] = g["raw_D"].state_dict()
    assert logs[0]["gnorm_d"] == logs[100000]["gnorm_d"]
    assert float(logs[100000]["r1"]) > 0
    assert any(not torch.equal(v, D[100000][k]) for k, v in D[0].items())


def test_the_log_shows_d_health(world, tmp_path, monkeypatch, capsys, run, root):
    """Every log line has D's scores on reals, fakes, mix-and-match fakes and held-out reals, the share of reals
    it calls real, G's adversarial-to-regression gradient ratio, and G's latent MSE to the teacher on its batches and
    on the held-out pairs (the latter recomputed here from the G the run ends with); the held-out pairs are never
    trained on."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path, max_steps=2, mix_match=0.5, holdout=8)])
    g = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step ")]
    assert len(lines) == 2
    for line in lines:
        for key in ("d_real", "d_fake", "d_mm", "d_real_pos", "d_heldout", "adv_rec", "mse", "mse_heldout"):
            assert f"| {key} " in line, (key, line)
    assert g["n_train"] == 16 and len(g["held_z"]) == 8
    logged = float(lines[-1].split("| mse_heldout ")[1].split(" ")[0])
    with torch.no_grad():
        mse = (g["generate"](g["raw_G"], g["held_z"], g["held_cond"]) - g["held_x"]).square().mean().item()
    assert abs(logged - mse) < 1e-4 * max(1.0, mse), (logged, mse)
    for e in range(3):  # every epoch visits the first 16 pairs, each once, and never the last 8
        assert sorted(g["epoch_order"](e).tolist()) == list(range(16))
    r = run(["train.py", *args(world, tmp_path / "all", max_steps=1, holdout=24)])
    assert r.returncode != 0 and "--holdout=24" in r.stderr and "none would be left" in r.stderr, r.stderr[-2000:]


def test_D_judges_latents_noised_to_t_D(world, tmp_path, monkeypatch, root):
    """t_D > 0: every latent D judges (reals, fakes, G's adversarial view, R1's real) is the clean one noised to t_D by
    the forward process, fresh noise each time; t_D = 0 leaves them clean. Same seed: the same batch and G's fakes."""
    import discriminator
    forward, seen = discriminator.Discriminator.forward, {}

    def spy(self, x, z, *a, **kw):
        seen.setdefault(self.t_D, []).append(x.detach().clone())
        return forward(self, x, z, *a, **kw)
    monkeypatch.setattr(discriminator.Discriminator, "forward", spy)
    for t in (0, 200):
        monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path / str(t), max_steps=1, t_D=t, mix_match=0,
                                                            r1_interval=1, holdout=0)])
        g = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    a = g["abar"][200]
    (clean_d, clean_g), (noisy_d, noisy_g, noisy_r1) = seen[0][:2], seen[200]  # D step (8 = 4 real + 4 fake), G, R1
    assert [len(v) for v in (clean_d, clean_g, noisy_d, noisy_g, noisy_r1)] == [8, 4, 8, 4, 1]
    for clean, noisy in ((clean_d, noisy_d), (clean_g, noisy_g)):
        noise = (noisy - a.sqrt() * clean) / (1 - a).sqrt()
        assert abs(noise.std().item() - 1) < 0.15 and abs(noise.mean().item()) < 0.15, noise.std()
        assert abs(torch.corrcoef(torch.stack([noise.flatten(), clean.flatten()]))[0, 1]) < 0.15
    assert not torch.allclose(noisy_g, noisy_d[4:], atol=1e-2)  # G's view of its fakes: fresh noise
    assert torch.equal(noisy_r1, noisy_d[:1])  # R1 penalises the real D's loss saw, noised


@pytest.mark.parametrize("mode", ["fixed", "error"])
def test_d_real_noise_noises_only_the_reals_D_judges(world, tmp_path, monkeypatch, root, mode):
    """d_real_noise = s: the reals of D's step (and their mix-and-match copies, and R1's real) are the batch's reals plus
    white noise of std s (mode 'error': s times the rms of G's error on the batch); G's fakes, in D's step and in G's
    adversarial view, are untouched. s = 0 is the old path. Same seed: the same batch and the same G, so the two runs'
    fakes agree."""
    import discriminator
    forward, seen = discriminator.Discriminator.forward, {}

    def spy(self, x, z, *a, **kw):
        seen.setdefault(noise, []).append(x.detach().clone())
        return forward(self, x, z, *a, **kw)
    monkeypatch.setattr(discriminator.Discriminator, "forward", spy)
    for noise in (0.0, 0.5):
        monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path / str(noise), max_steps=1, mix_match=0.5,
                                                            d_real_noise=noise, d_real_noise_mode=mode,
                                                            r1_interval=1, holdout=0)])
        runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    (clean_d, clean_g, clean_r1), (noisy_d, noisy_g, noisy_r1) = seen[0.0], seen[0.5]  # D step (4 real, 4 fake, 2 mm)
    assert [len(v) for v in (clean_d, clean_g, noisy_d, noisy_g)] == [10, 4, 10, 4]
    added = noisy_d[:4] - clean_d[:4]
    std = 0.5 if mode == "fixed" else 0.5 * (clean_d[4:8] - clean_d[:4]).square().mean().sqrt().item()
    if mode == "error":  # G's error at step 0 is not 1: the two modes differ measurably
        assert abs(std - 0.5) > 0.1, std
    assert abs(added.std().item() - std) < 0.16 * std and abs(added.mean().item()) < 0.16 * std, (added.std(), std)
    assert torch.equal(noisy_d[8:], noisy_d[:2])  # mix-and-match fakes: the same noised reals, another caption
    assert torch.equal(noisy_r1, noisy_d[:1]) and torch.equal(clean_r1, clean_d[:1])  # R1 on the real D's loss saw
    assert torch.allclose(noisy_d[4:8], clean_d[4:8], atol=1e-6) and torch.allclose(noisy_g, clean_g, atol=1e-6)


def test_pairs_from_another_teacher_are_refused(world, tmp_path, run):
    """train.py checks the pairs' teacher fingerprint against the loaded teacher, whatever dtype made the pairs."""
    import json
    import shutil
    from teacher import load_teacher
    t32, t16 = (load_teacher(str(world / "sd"), dtype=d) for d in (torch.float32, torch.float16))
    assert t32.fingerprint(torch.float16) == t16.fingerprint() != t32.fingerprint()
    pairs = tmp_path / "pairs"
    shutil.copytree(world / "pairs", pairs)
    index = json.loads((pairs / "index.json").read_text())
    index["settings"]["teacher_fingerprint"] = "0" * 64
    (pairs / "index.json").write_text(json.dumps(index))
    r = run(["train.py", *args(world, tmp_path / "out", max_steps=1, pairs=pairs)])
    assert r.returncode != 0 and "made by another teacher" in r.stderr and "index.json" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def load(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def base(world, tmp_path_factory, run):
    """A 2-step run checkpointed at both steps (ckpt.pt at step 2, ckpt.pt.prev at step 1, log.txt): tests copy it."""
    out = tmp_path_factory.mktemp("base")
    r = run(["train.py", *args(world, out, max_steps=2, ckpt_interval=1)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_of(base, tmp_path):
    import shutil
    return shutil.copytree(base, tmp_path / "run")


def test_resume_equals_uninterrupted(world, base, tmp_path, run):
    a, b = tmp_path / "a", copy_of(base, tmp_path)
    r = run(["train.py", *args(world, a, max_steps=4)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(["train.py", *args(world, b, max_steps=4)])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    ca, cb = load(a), load(b)
    assert ca["step"] == cb["step"] == 4
    for part in ["G", "ema", "D"]:
        err = max((ca[part][k] - cb[part][k]).abs().max().item() for k in ca[part])
        assert err <= 1e-6, f"{part}: resumed run differs by {err}"
    assert ca["opt_g"]["state"].keys() == cb["opt_g"]["state"].keys()


def test_resume_takes_the_command_s_adam_settings(world, tmp_path, run):
    """A checkpoint's optimiser state keeps its moments, but the betas and weight decay are the resuming command's
    (a changed default or a new --beta1 is not silently overridden by the checkpoint), and the change is printed."""
    r = run(["train.py", *args(world, tmp_path, max_steps=1, beta1=0.0, beta1_d=0.0)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(["train.py", *args(world, tmp_path, max_steps=2, beta1=0.5, beta1_d=0.3)])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    for name, new in (("G", "(0.5, 0.99)"), ("D", "(0.3, 0.99)")):
        assert f"{name}'s Adam betas (0.0, 0.99), weight decay 0.0 in the checkpoint; continuing with this command's " \
            f"{new}" in r.stdout, \
            r.stdout[-2000:]
    ckpt = load(tmp_path)
    for opt, betas in (("opt_g", (0.5, 0.99)), ("opt_d", (0.3, 0.99))):
        assert all(tuple(g["betas"]) == betas for g in ckpt[opt]["param_groups"]), opt


def relative_differences(world, a, b):
    """{part: |a - b| / |a - start|} for G and D of two checkpoints, as whole-vector norms. Not an elementwise max:
    Adam turns rounding noise in near-zero gradients (D's head biases at step 1, where real and fake pull equally)
    into steps of up to lr, on any machine; relative to the whole update that noise is 1e-5, while R1 at half
    weight (grad_accum) or on one sample per rank (DDP) makes D differ by 0.3."""
    import weights
    from discriminator import Discriminator
    unet = weights.load_unet(str(world / "sd"))
    start = {"G": unet.state_dict(), "D": Discriminator(unet).state_dict()}
    norm = lambda d: sum(v.double().square().sum() for v in d.values()).sqrt().item()  # noqa: E731
    return {p: norm({k: a[p][k] - b[p][k] for k in a[p]}) / norm({k: a[p][k] - start[p][k] for k in a[p]})
            for p in ["G", "D"]}


def test_grad_accum_equals_one_big_batch(world, tmp_path, run):
    """Two micro-steps of 2 make the same step as one batch of 4: the D and G losses average over micro-steps, and
    R1 (once per step, here at both steps) keeps its full weight. L2 and no mix-and-match: augmentations and
    mismatched pairs are drawn per micro-batch, so they would differ by design."""
    kw = dict(max_steps=2, r1_interval=1, regression="l2", mix_match=0)
    for out, accum in [(tmp_path / "a1", 1), (tmp_path / "a2", 2)]:
        r = run(["train.py", *args(world, out, grad_accum=accum, **kw)])
        assert r.returncode == 0, r.stderr[-3000:]
    for part, err in relative_differences(world, load(tmp_path / "a1"), load(tmp_path / "a2")).items():
        assert err <= 0.01, f"{part}: grad_accum=2 differs from one batch by {err:.2e} of its update"


def test_ema_warmup_follows_G_early(world, tmp_path, run):
    """With ema_warmup the first update uses decay 1/10 (min(ema_decay, (1 + 0) / (10 + 0))), not ema_decay."""
    import weights
    r = run(["train.py", *args(world, tmp_path, max_steps=1, gan=False, regression="l2", ema_decay=0.9999,
                               ema_warmup=True)])
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt, teacher = load(tmp_path), weights.load_unet(str(world / "sd")).state_dict()
    for k in ["conv_in.weight", "conv_out.bias"]:
        torch.testing.assert_close(ckpt["ema"][k], 0.1 * teacher[k] + 0.9 * ckpt["G"][k])


def test_cooldown_lowers_both_learning_rates_to_the_last_step(world, tmp_path, monkeypatch, root):
    """--cooldown=0.5 over 4 steps: full rate for steps 0-2, half at step 3 ((4 - 3) / (0.5 * 4)), for G and D."""
    monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path, max_steps=4, cooldown=0.5)])
    g = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    assert [g["lr_at"](s, 1e-3) for s in range(4)] == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])
    assert g["opt_g"].param_groups[0]["lr"] == pytest.approx(5e-4)  # the rates the last step used
    assert g["opt_d"].param_groups[0]["lr"] == pytest.approx(5e-4)


def test_mix_and_match_share_survives_small_micro_batches(world, tmp_path, monkeypatch, root):
    """mix_match=0.25 of a micro-batch of 2 is half a sample: every other micro-step mixes one, not none."""
    import discriminator
    seen = []
    forward = discriminator.Discriminator.forward

    def spy(self, x, z, *a, **kw):
        seen.append(len(x))
        return forward(self, x, z, *a, **kw)
    monkeypatch.setattr(discriminator.Discriminator, "forward", spy)
    monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path, max_steps=2, grad_accum=2, r1_gamma=0,
                                                        mix_match=0.25, compile=False)])
    runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    d_steps = [n for n in seen if n > 2]  # D's own forward: real, fake and mixed (G's loss sees the 2 fakes only)
    assert d_steps == [4, 5, 4, 5], seen


def test_two_gloo_processes_keep_G_identical(world, tmp_path, run):
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
             *args(world, tmp_path, max_steps=2, ckpt_interval=1)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2 | micro-batch 2 x accum 1 = global 4" in r.stdout
    assert "step 2: G identical on all 2 ranks" in r.stdout


def test_two_gloo_processes_equal_one_process(world, tmp_path, run):
    """DDP averages G's and D's gradients (R1's included) over ranks: two processes with micro-batches of 2 make the
    same steps as one process with the batch of 4. L2, no mix-and-match, no noise on D's reals and R1 on every sample:
    what is drawn per rank or per sample would differ by design."""
    kw = dict(max_steps=2, r1_interval=1, r1_single=False, regression="l2", mix_match=0, d_real_noise=0)
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
             *args(world, tmp_path / "ddp", **kw)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(["train.py", *args(world, tmp_path / "one", **kw)])
    assert r.returncode == 0, r.stderr[-3000:]
    for part, err in relative_differences(world, load(tmp_path / "ddp"), load(tmp_path / "one")).items():
        assert err <= 0.01, f"{part}: two processes differ from one by {err:.2e} of its update"


def test_nan_stops_the_run_by_name(world, tmp_path, run):
    """A step checkpointed, then lr 1e30: the update of step 2 throws G's weights out of range, and step 3's regression
    loss is the first term to go non-finite. The run stops naming that step and term; the checkpoint stays good."""
    kw = dict(gan=False, regression="l2", ckpt_interval=1000)
    r = run(["train.py", *args(world, tmp_path, max_steps=1, **kw)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(["train.py", *args(world, tmp_path, max_steps=5, lr_g=1e30, **kw)])
    assert r.returncode != 0
    assert "step 3: g_rec is" in r.stderr and "(the first term to go non-finite)" in r.stderr, r.stderr[-2000:]
    assert "the last good checkpoint" in r.stderr and "(step 1), is untouched" in r.stderr
    assert load(tmp_path)["step"] == 1 and all(torch.isfinite(v).all() for v in load(tmp_path)["G"].values())


def test_every_regression_loss_trains_G(world, tmp_path, monkeypatch, root):
    """The ablation's other regression losses run and move G (pixel-lpips decodes with gradients, through the
    image-space VGG16-BN that toy.build's pixel stage writes, untrained here). In this process: one step each."""
    import weights
    teacher = weights.load_unet(str(world / "sd")).state_dict()
    vgg = world / "toy_pixel_vgg16.safetensors"
    for regression in ("l2", "pseudo-huber", "latent-lpips", "pixel-lpips"):
        monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path / regression, max_steps=1, gan=False,
                                                            regression=regression, pixel_vgg=vgg)])
        G = runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")["raw_G"].state_dict()
        assert any(not torch.equal(v, teacher[k]) for k, v in G.items()), regression


# -----------------------------------------------------------------------------
# nothing lost, nothing silent: damaged checkpoints, runaway weights, bad knobs, resumed logs, interrupted toy pairs


def test_a_damaged_checkpoint_is_refused_by_name_and_kept(world, base, tmp_path, run):
    """4 bytes flipped in one tensor of ckpt.pt: train.py stops naming the tensor and the checkpoint before it, and
    leaves the file as it was (it used to resume silently and overwrite it); sample.py refuses it too."""
    out = copy_of(base, tmp_path)
    path = out / "ckpt.pt"
    data = bytearray(path.read_bytes())
    target = load(out)["G"]["conv_in.weight"].numpy().tobytes()[:64]  # find the tensor's bytes in the file
    at = bytes(data).index(target)
    data[at + 8:at + 12] = bytes(b ^ 0xFF for b in data[at + 8:at + 12])
    path.write_bytes(bytes(data))
    r = run(["train.py", *args(world, out, max_steps=4)])
    assert r.returncode != 0 and "tensor G.conv_in.weight fails its checksum" in r.stderr, r.stderr[-2000:]
    assert f"mv {path}.prev {path}" in r.stderr and "Traceback" not in r.stderr
    assert path.read_bytes() == bytes(data)
    r = run(["sample.py", f"--ckpt={path}", f"--out_dir={tmp_path}/samples", "--prompt=a red circle", "--n=1"])
    assert r.returncode != 0 and "fails its checksum" in r.stderr, r.stderr[-2000:]


def test_broken_checkpoint_files_get_one_line(world, base, tmp_path, run):
    """Empty, half-length and text files as ckpt.pt: one line naming the file, never torch's advice to load with
    weights_only=False."""
    out = copy_of(base, tmp_path)
    path = out / "ckpt.pt"
    good = path.read_bytes()
    for content in (b"", good[:len(good) // 2], b"hello, this is not a checkpoint"):
        path.write_bytes(content)
        r = run(["train.py", *args(world, out, max_steps=3)])
        err = [l for l in r.stderr.splitlines() if l.strip() and "Loading weights" not in l]
        assert r.returncode != 0 and len(err) == 1 and str(path) in err[0] and "weights_only" not in err[0], r.stderr
        assert path.read_bytes() == content


def test_runaway_weights_are_never_checkpointed(world, base, tmp_path, run):
    """lr 1e30 fits in float32 but throws the weights out of any usable range at once: the run stops at the first
    checkpoint naming the step and the tensor, and the checkpoint from before stays (it used to be replaced)."""
    out = copy_of(base, tmp_path)
    before = (out / "ckpt.pt").read_bytes()
    r = run(["train.py", *args(world, out, max_steps=3, lr_g=1e30)])
    assert r.returncode != 0 and "step 3: G's weights are not finite" in r.stderr, r.stderr[-2000:]
    assert "the last good checkpoint" in r.stderr and "(step 2), is untouched" in r.stderr
    assert (out / "ckpt.pt").read_bytes() == before
    r = run(["train.py", *args(world, tmp_path / "fresh", max_steps=3, ckpt_interval=1, lr_g=1e30)])
    assert r.returncode != 0 and "step 1: G's weights" in r.stderr and "no checkpoint was written" in r.stderr
    assert not (tmp_path / "fresh" / "ckpt.pt").exists()


def test_knobs_that_cannot_work_are_refused_by_name(world, tmp_path, monkeypatch, root):
    """Each stops train.py before training, with one message naming the knob (a SystemExit: no traceback)."""
    for knob in ("--lr_g=3e38", "--lr_d=-1.0", "--batch_size=0", "--grad_accum=3", "--t_D=1000", "--t_G=-1",
                 "--d_real_noise=-0.1", "--d_real_noise_mode=adaptive", "--cooldown=1.5",
                 "--grad_accum=4"):  # micro-batch 1: no other sample to mismatch with (mix_match)
        monkeypatch.setattr(sys, "argv", ["train.py", *args(world, tmp_path), knob, "--max_steps=1"])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
        message = str(stop.value.code)
        assert knob.split("=")[0] in message and "\n" not in message, message
        assert not (tmp_path / "ckpt.pt").exists()


def test_a_resumed_log_reads_as_one_run(world, base, tmp_path, run):
    """A run stopped after step 2 but resumed from its step-1 checkpoint: log.txt keeps step 1, says where it
    resumed, then step 2 once."""
    out = copy_of(base, tmp_path)
    os.replace(out / "ckpt.pt.prev", out / "ckpt.pt")  # what a kill after step 2 but before its save leaves
    r = run(["train.py", *args(world, out, max_steps=2, ckpt_interval=1)])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    steps = [int(l.split()[1]) for l in (out / "log.txt").read_text().splitlines() if l.startswith("step ")]
    assert steps == [1, 2], steps
    assert "resumed from" in (out / "log.txt").read_text()


def test_a_fresh_start_replaces_a_stopped_runs_log(world, base, tmp_path, run):
    """A run killed before its first checkpoint leaves a log and nothing to resume: the next start's log.txt holds
    its own steps only (toy.seeds reads D's logits from it), not the dead run's lines before them."""
    out = copy_of(base, tmp_path)
    for name in ("ckpt.pt", "ckpt.pt.prev"):
        os.remove(out / name)
    r = run(["train.py", *args(world, out, max_steps=2, ckpt_interval=1)])
    assert r.returncode == 0 and "resumed from" not in r.stdout, r.stderr[-3000:]
    steps = [int(l.split()[1]) for l in (out / "log.txt").read_text().splitlines() if l.startswith("step ")]
    assert steps == [1, 2], steps


def test_interrupted_toy_pairs_are_finished_by_the_same_command(tmp_path, run):
    """The toy world (teacher=toy) makes its pairs on the first run; if that was interrupted (here: a shard deleted,
    as a kill between shards leaves it), the same command finishes them and trains, with no flag to learn."""
    cmd = ["train.py", "--teacher=toy", f"--pairs={tmp_path}/pairs", "--toy_pairs=12", "--batch_size=4",
           "--max_steps=1", "--eval_samples=0", "--holdout=2", "--sample_interval=1000", f"--out_dir={tmp_path}/a"]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    (tmp_path / "pairs" / "shard-000000.safetensors").unlink()
    r = run(cmd[:-1] + [f"--out_dir={tmp_path}/b"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "pairs" / "shard-000000.safetensors").exists() and (tmp_path / "b" / "ckpt.pt").exists()
