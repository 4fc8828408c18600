"""parallel=fsdp and the memory modes (README.md, Memory), on CPU with gloo: sharded training makes DDP's steps, R1 and
mix-and-match included; a sharded checkpoint moves between world sizes and survives a save killed mid-write; SDXL
runs end to end (pairs, sharded training, sampling, export); each memory mode does what it claims."""
import copy
import os
import runpy
import sys

import pytest
import torch

import model
import weights
from discriminator import Discriminator
from memory import AdamW, adamw_8bit, checkpoint_blocks, clip_grad_norm, local, optimizer_state_bytes

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]


def args(out, teacher, pairs, lpips, **kw):
    base = dict(teacher=teacher, pairs=pairs, lpips=lpips, out_dir=str(out), batch_size=4, log_interval=1,
                sample_interval=1000, ckpt_interval=1000, r1_interval=1, warmup=1, lr_g=1e-3, lr_d=1e-3, holdout=4)
    return [f"--{k}={v}" for k, v in (base | kw).items()]


def parts(ckpt):
    """{'G', 'ema', 'D': state dict} of a checkpoint: ckpt.pt, or a sharded folder put together whole."""
    if os.path.isdir(ckpt):
        return {p: weights.read_sharded_part(str(ckpt), p)[0] for p in ("G", "ema", "D")}
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def differences(teacher, a, b):
    """{part: |a - b| / |a - start|} for G, the EMA and D, whole-vector norms (test_train.relative_differences)."""
    unet = weights.load_unet(str(teacher))
    start = {"G": unet.state_dict(), "ema": unet.state_dict(), "D": Discriminator(unet).state_dict()}

    def norm(d):
        return sum(v.double().square().sum() for v in d.values()).sqrt().item()
    return {p: norm({k: a[p][k] - b[p][k] for k in a[p]}) / norm({k: a[p][k] - start[p][k] for k in a[p]})
            for p in start}


class Killed(Exception):
    """What the test's stand-in for a kill raises inside a sharded save."""


def test_sharded_checkpoints_change_world_size_and_survive_a_killed_save(toy_world, tmp_path, run, monkeypatch,
                                                                        capsys, root):
    """One process (step 0-1) -> two processes (1-2) -> one process (2-3, killed while it writes step 3) -> one
    process again (from step 2, the last complete checkpoint, to 3) make the steps of one uninterrupted DDP process:
    G, EMA and D after step 3 agree, from the killed process and from the last run. Two micro-steps of 2 per rank, or
    of 4 in one process; R1 at a weight that moves D (1e5: 0.8 of D's update over 3 steps) on every sample of the
    first micro-step, its exact double backward in the DDP run: under FSDP it runs on D's gathered weights. L2 and no
    mix-and-match or noise on D's reals: what is drawn per rank would differ between world sizes by design
    (test_sdxl_end_to_end_with_fsdp compares them with DDP at the same world size). The one-process runs run in this
    process, as `python train.py` would (only torchrun's two start fresh Pythons), and each run saves once, at its
    last step."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    w = toy_world
    files = dict(teacher=w / "sd", pairs=w / "pairs", lpips=w / "toy_latest_vgg16_tuned.safetensors")
    kw = dict(max_steps=3, batch_size=8, grad_accum=2, regression="l2", mix_match=0, d_real_noise=0, r1_single=False,
              r1_gamma=100000)
    one, sharded = tmp_path / "one", tmp_path / "sharded"

    def here(out, max_steps, *more):  # train.py in this process; with --parallel=fsdp a process group of one, which
        # it ends (or we do)
        monkeypatch.setattr(sys, "argv", ["train.py", *args(out, **files, **kw | dict(max_steps=max_steps)), *more])
        try:
            runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return capsys.readouterr().out

    here(one, 3)  # the reference: DDP's lines in one process
    here(sharded, 1, "--parallel=fsdp")
    r = run([*TORCHRUN, *args(sharded, **files, **kw | dict(max_steps=2)), "--parallel=fsdp"])
    assert r.returncode == 0 and "world 2 | micro-batch 2 x accum 2 = global 8" in r.stdout, r.stderr[-3000:]
    assert f"resumed from {sharded}/ckpt at step 1" in r.stdout

    save, at_step_3 = weights.save_sharded_checkpoint, {}

    def killed_at_step_3(state, meta, path):  # writes part of the folder, then dies before it is complete
        if meta["step"] < 3:
            return save(state, meta, path)
        at_step_3.update({p: {k: local(v).clone() for k, v in state[p].items()} for p in ("G", "ema", "D")})
        dcp.save(state, checkpoint_id=path + ".tmp")
        shard = os.path.join(path + ".tmp", "__0_0.distcp")
        os.truncate(shard, os.path.getsize(shard) // 2)
        raise Killed

    monkeypatch.setattr(weights, "save_sharded_checkpoint", killed_at_step_3)
    with pytest.raises(Killed):
        here(sharded, 3, "--parallel=fsdp")
    assert f"resumed from {sharded}/ckpt at step 2" in capsys.readouterr().out
    assert weights.sharded_meta(str(sharded / "ckpt"))["step"] == 2 and (sharded / "ckpt.tmp").exists()
    monkeypatch.setattr(weights, "save_sharded_checkpoint", save)
    assert f"resumed from {sharded}/ckpt at step 2" in here(sharded, 3, "--parallel=fsdp")
    assert not (sharded / "ckpt.tmp").exists() and weights.sharded_meta(str(sharded / "ckpt.prev"))["step"] == 2

    reference = parts(one / "ckpt.pt")
    for name, result in (("the killed process", at_step_3), ("the last run", parts(sharded / "ckpt"))):
        for part, err in differences(w / "sd", reference, result).items():
            assert err <= 1e-3, f"{name}: {part} differs from the uninterrupted run by {err:.2e} of its update"


def test_sdxl_end_to_end_with_fsdp(pipelines, toy_world, tmp_path, run):
    """A tiny SDXL teacher (two text encoders, pooled text, size/crop ids): make_pairs -> two processes with
    parallel=fsdp and every memory mode, which make the same steps as DDP's two processes with the same modes (R1 on
    each rank's sample, mix-and-match, grad_accum and E-LatentLPIPS's augmentations, all drawn per rank as DDP draws
    them) -> sample.py and --export read the sharded checkpoint. Pairs and export are made in this process."""
    import make_pairs
    from conftest import WORDS
    from sample import export_student, load_student  # what sample.py (--export) and eval.py load a student with
    from teacher import one_step, seeded_noise
    _, folder = pipelines("sdxl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(6)) + "\n" for i in range(16)))
    make_pairs.main(prompts=str(prompts), out_dir=f"{tmp_path}/pairs", teacher=folder, steps=2, batch_size=16)
    files = dict(teacher=folder, pairs=tmp_path / "pairs", lpips=toy_world / "toy_latest_vgg16_tuned.safetensors")
    kw = dict(max_steps=2, batch_size=8, grad_accum=2, mix_match=0.5, r1_gamma=100000, activation_checkpointing=True,
              optim_dtype="bfloat16", ema_cpu=True)
    for name, parallel in (("fsdp", "fsdp"), ("ddp", "ddp")):
        r = run([*TORCHRUN, *args(tmp_path / name, **files, **kw, parallel=parallel)])
        assert r.returncode == 0 and "world 2 | micro-batch 2 x accum 2 = global 8" in r.stdout, r.stderr[-3000:]
    ckpt = tmp_path / "fsdp" / "ckpt"
    sharded = parts(ckpt)
    for part, err in differences(folder, sharded, parts(tmp_path / "ddp" / "ckpt.pt")).items():
        assert err <= 1e-3, f"{part}: FSDP differs from DDP by {err:.2e} of its update"

    T, G, cfg = load_student(str(ckpt))
    ema = sharded["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in G.state_dict().items()) and T.unet.cfg.add_time_dim
    with torch.no_grad():
        x = one_step(G, seeded_noise(range(2), T.latent_shape()), T.conditions(["a red circle"] * 2)[0],
                     T.alphas_cumprod, T.prediction_type, cfg["t_G"], cfg["g_param"])
    assert T.decode(x).shape == (2, 3, 32, 32)
    export_student(str(ckpt), f"{tmp_path}/student", False)  # sample.py --export
    exported = weights.load_unet(str(tmp_path / "student")).state_dict()
    assert exported.keys() == ema.keys() and all(torch.equal(v, ema[k]) for k, v in exported.items())


# -----------------------------------------------------------------------------
# the memory modes, in this process


def tiny_sdxl_batch(n=4):
    torch.manual_seed(1)
    return (torch.randn(n, 4, 16, 16), torch.randn(n, 4, 16, 16),
            dict(context=torch.randn(n, 5, 64), pooled=torch.randn(n, 32), time_ids=torch.randn(n, 6)))


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations():
    """checkpoint_blocks: G's and D's gradients are the same bit for bit, and the bytes that autograd saves for the
    backward shrink to a fraction (measured 39 -> 3.7 MiB for G, 45 -> 9.5 MiB for D here; torch's MemTracker, 40x
    slower, sees the activations' peak fall 24 -> 3.1 and 29 -> 7.8 MiB); names and weights do not change."""
    x, z, cond = tiny_sdxl_batch()
    torch.manual_seed(0)
    unet = model.UNet(model.UNET_PRESETS["tiny-sdxl"])
    for net, call in ((unet, lambda n: n(x, 999, **cond)), (Discriminator(unet), lambda n: n(x, z, **cond)[-1])):
        with torch.no_grad():  # D's zero-initialised heads would pass no gradient back
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        grads, saved = [], []
        for recompute in (False, True):
            m = checkpoint_blocks(copy.deepcopy(net)) if recompute else copy.deepcopy(net)
            held = [0]

            def pack(t, held=held):
                held[0] += t.numel() * t.element_size()
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = call(m).square().mean()
            loss.backward()
            saved.append(held[0])
            grads.append({k: p.grad for k, p in m.named_parameters()})
        assert [k for k, _ in net.named_parameters()] == list(grads[1])
        assert grads[0].keys() == grads[1].keys()
        assert all(torch.equal(g, grads[1][k]) if g is not None else grads[1][k] is None  # (D's unused heads: None)
                   for k, g in grads[0].items()), type(net).__name__
        print(f"{type(net).__name__}: saved for the backward {saved[0] / 2**20:.1f} MiB -> {saved[1] / 2**20:.1f} MiB")
        assert saved[1] * 3 < saved[0], saved


def test_bf16_adam_moments_take_half_the_bytes_and_step_like_adamw():
    """optim_dtype=bfloat16: the moments take 2 + 2 bytes per parameter, not 4 + 4; 10 steps on a UNet move it
    as torch's AdamW does within 1% of the update (the fp32 moments, which FSDP uses: within float rounding)."""
    x, _, cond = tiny_sdxl_batch(2)
    torch.manual_seed(0)
    start = model.UNet(model.UNET_PRESETS["tiny-sdxl"])
    nets, opts = {}, {}
    for name, make in (("torch", lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.99))),
                       ("fp32", lambda p: AdamW(p, lr=1e-3, betas=(0.9, 0.99), state_dtype=torch.float32)),
                       ("bf16", lambda p: AdamW(p, lr=1e-3, betas=(0.9, 0.99), state_dtype=torch.bfloat16))):
        nets[name] = copy.deepcopy(start)
        opts[name] = make(nets[name].parameters())
        for i in range(10):
            nets[name](x * (1 + i / 10), 999, **cond).square().mean().backward()
            opts[name].step()
            opts[name].zero_grad()
    n = sum(p.numel() for p in start.parameters())
    assert optimizer_state_bytes(opts["torch"]) == optimizer_state_bytes(opts["fp32"]) == 8 * n
    assert optimizer_state_bytes(opts["bf16"]) == 4 * n

    def norm(a, b):
        return sum((p - q).double().square().sum() for p, q in zip(a.parameters(), b.parameters())).sqrt()
    update = norm(nets["torch"], start)
    errors = {name: (norm(nets[name], nets["torch"]) / update).item() for name in ("fp32", "bf16")}
    print(f"relative to torch's AdamW after 10 steps: {errors}")
    assert errors["fp32"] < 1e-5 and errors["bf16"] < 1e-2, errors


def test_8bit_adam_without_bitsandbytes_says_what_to_do(monkeypatch, capsys, root):
    """bitsandbytes is optional (and CUDA only): without it, optim_dtype=8bit stops with what to do; with FSDP it is
    refused in one line before anything loads or prints (it updates whole tensors, not shards)."""
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(SystemExit, match=r"--optim_dtype=8bit needs bitsandbytes.*use --optim_dtype=bfloat16"):
        adamw_8bit([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    monkeypatch.setattr(sys, "argv", ["train.py", "--parallel=fsdp", "--optim_dtype=8bit", "--max_steps=1"])
    with pytest.raises(SystemExit) as stop:  # in this process (a fresh Python costs seconds of imports)
        runpy.run_path(os.path.join(root, "train.py"), run_name="__main__")
    why, printed = str(stop.value), capsys.readouterr()
    assert "\n" not in why and "--optim_dtype=8bit" in why and "bfloat16" in why, why
    assert not printed.out.strip() and not printed.err.strip(), printed


def test_sharded_clip_and_a_damaged_or_planted_checkpoint(tmp_path):
    """clip_grad_norm on FSDP's shards gives torch's norm and scaling (a process group of one, shards = whole); a
    sharded checkpoint with a damaged file is refused by name, and one whose index would unpickle anything but DCP's
    own classes is refused unread."""
    import json
    import pickle

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    x, _, cond = tiny_sdxl_batch()
    torch.manual_seed(0)
    plain = model.UNet(model.UNET_PRESETS["tiny-sdxl"])
    sharded = copy.deepcopy(plain)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        fully_shard(sharded, mesh=init_device_mesh("cpu", (1,)))
        for net in (plain, sharded):
            net(x, 999, **cond).square().mean().backward()
        norms = [clip_grad_norm(net.parameters(), 1e-3) for net in (plain, sharded)]
        torch.testing.assert_close(norms[0], norms[1])
        for p, q in zip(plain.parameters(), sharded.parameters()):
            torch.testing.assert_close(p.grad, local(q.grad))
        weights.save_sharded_checkpoint({"G": sharded.state_dict()}, {"step": 1}, str(tmp_path / "ckpt"))
    finally:
        dist.destroy_process_group()
    sd, meta = weights.read_sharded_part(str(tmp_path / "ckpt"), "G")
    assert meta["step"] == 1 and all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())
    shard = tmp_path / "ckpt" / "__0_0.distcp"
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    with pytest.raises(ValueError, match=r"ckpt: file __0_0.distcp fails its checksum: the checkpoint is damaged"):
        weights.read_sharded_part(str(tmp_path / "ckpt"), "G")
    shard.write_bytes(good)

    class Planted:  # what a malicious index could carry: unpickling it would call os.getcwd (or anything else)
        def __reduce__(self):
            return os.getcwd, ()
    index = tmp_path / "ckpt" / ".metadata"
    index.write_bytes(pickle.dumps([dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata(), Planted()]))
    meta["files"][".metadata"] = weights._file_crc32(index)  # a consistent checksum: only the guard can refuse it
    (tmp_path / "ckpt" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"ckpt: its index .metadata holds pickled Python objects besides DCP's"):
        weights.read_sharded_part(str(tmp_path / "ckpt"), "G")
