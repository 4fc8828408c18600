"""sample.py --export as one original-layout (LDM) .safetensors: diffusers' single-file loader reads it back and its
one-step recipe gives our latents; our own loaders read it back exactly; the weights.py/teacher.py inverse maps undo
the forward ones for every preset; and an export never overwrites what it should not (the teacher above all)."""
import copy
import os

import pytest
import torch

import model
import weights
from conftest import PROMPTS
from teacher import load_teacher, one_step, save_single_file, seeded_noise

diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only reference) is not installed")
TOL = 1e-4


@pytest.fixture(scope="module")
def world(student_world):
    return student_world


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def diffusers_one_step(pipe, prompts, z):
    """The README/docstring recipe, verbatim but for output_type='latent'."""
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                         set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(prompts, latents=z, num_inference_steps=1, guidance_scale=1.0, output_type="latent").images


# -----------------------------------------------------------------------------
# the toy student, through the command line


def test_single_file_export_runs_in_diffusers(world, run):
    from sample import load_student
    from toy import shapes
    w = world
    r = run(["sample.py", f"--ckpt={w}/out/ckpt.pt", f"--export={w}/student.safetensors"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "one original-layout file" in r.stdout and not any(f.endswith(".tmp") for f in os.listdir(w))

    T, G, cfg = load_student(str(w / "out" / "ckpt.pt"))
    assert not state_equal(G, T.unet)  # trained: an export of the teacher's UNet would not be caught below
    prompts = [shapes.sample(10**9 + i)[1] for i in range(3)]
    z = seeded_noise(range(3), T.latent_shape())
    with torch.no_grad():
        ours = one_step(G, z, T.conditions(prompts)[0], T.alphas_cumprod, T.prediction_type, cfg["t_G"], cfg["g_param"])
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(w / "student.safetensors"), config=str(w / "sd"), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    # diffusers' own converter put each tensor where it belongs: the student, the teacher's VAE and text encoder
    assert state_equal(pipe.unet, G) and state_equal(pipe.vae, T.vae)
    assert state_equal(pipe.text_encoder, T.text_encoders[0])
    err = (diffusers_one_step(pipe, prompts, z) - ours).abs().max().item()
    print(f"single-file export in diffusers vs ours: max abs latent error {err:.2e}")
    assert err < TOL


def test_single_file_reads_back_exactly(world, root):
    """Our own loaders read the exported file back bit for bit (the toy's sizes are no SD preset: configs given)."""
    from sample import load_student
    w = world
    path = str(w / "student_ours.safetensors")
    T, G, _ = load_student(str(w / "out" / "ckpt.pt"))
    save_single_file(T, G, path)
    assert state_equal(weights.load_unet(path, config=G.cfg), G)
    back = load_teacher(path, tokenizer=str(w / "sd"), unet_config=G.cfg, vae_config=T.vae.cfg)
    assert state_equal(back.unet, G) and state_equal(back.vae, T.vae)
    # the weights of the text encoder; its head count is the single-file reader's rule (64-wide heads, as in every SD
    # text encoder), which the toy's 2 heads of 32 do not follow, so its outputs are compared on the tiny pipelines
    assert state_equal(back.text_encoders[0], T.text_encoders[0])
    assert back.prediction_type == T.prediction_type and torch.equal(back.alphas_cumprod, T.alphas_cumprod)


# -----------------------------------------------------------------------------
# SD1-, SD2- (OpenCLIP, v-prediction) and SDXL-style tiny pipelines, in process


@pytest.mark.parametrize("kind", ["sd1", "sd2v", "sdxl"])
def test_single_file_of_each_family(kind, tmp_path):
    from conftest import build_pipeline
    from teacher import clip_from_state
    # SDXL's encoders of different widths (24 + 40): diffusers' single-file loader tells CLIP-L from bigG by width,
    # and would load the first encoder's weights into both if they were equal
    build_pipeline(str(tmp_path), kind, xl_widths=(24, 40))
    folder = str(tmp_path / "pipe")
    T = load_teacher(folder)
    G = copy.deepcopy(T.unet)  # a stand-in student: the teacher's UNet, moved
    with torch.no_grad():
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = str(tmp_path / "student.safetensors")
    save_single_file(T, G, path)
    sd = weights.read_checkpoint(path)
    prefix = {"sd1": "cond_stage_model.transformer.text_model.", "sd2v": "cond_stage_model.model.transformer.",
              "sdxl": "conditioner.embedders.1.model.transformer."}[kind]
    assert any(k.startswith(prefix) for k in sd)

    z, cond = seeded_noise(range(2), T.latent_shape()), T.conditions(PROMPTS)[0]
    with torch.no_grad():
        ours = one_step(G, z, cond, T.alphas_cumprod, T.prediction_type)
        assert (ours - one_step(T.unet, z, cond, T.alphas_cumprod, T.prediction_type)).abs().max() > 100 * TOL
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    kw = {} if kind == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_single_file(path, config=folder, local_files_only=True, **kw)
    assert state_equal(pipe.unet, G) and state_equal(pipe.vae, T.vae)
    for ours_te, theirs_te in zip(T.text_encoders, [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]):
        assert state_equal(theirs_te, ours_te)
    err = (diffusers_one_step(pipe, PROMPTS, z) - ours).abs().max().item()
    print(f"{kind}: single-file export in diffusers vs ours: max abs latent error {err:.2e}")
    assert err < TOL

    back = load_teacher(path, tokenizer=folder, unet_config=G.cfg, vae_config=T.vae.cfg)
    assert state_equal(back.unet, G) and state_equal(back.vae, T.vae) and back.prediction_type == T.prediction_type
    assert all(state_equal(a, b) for a, b in zip(back.text_encoders, T.text_encoders))
    back_cond = back.conditions(PROMPTS)[0]
    assert all(torch.equal(back_cond[k], v) for k, v in cond.items() if v is not None)
    if kind == "sd2v":  # the file holds one more (zero) layer, SD2's unread last one: an identity block, so even a
        # reader of the last layer sees SD2's penultimate-layer features
        te = {k[len("cond_stage_model.model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.model.")}
        full = clip_from_state(te, path, T.tokenizers[0], openclip=True)
        assert full.config.num_hidden_layers == T.text_encoders[0].config.num_hidden_layers + 1
        ids = T.tokenize(T.tokenizers[0], PROMPTS)
        with torch.no_grad():
            assert torch.allclose(full(ids).last_hidden_state, T.text_encoders[0](ids).last_hidden_state, atol=1e-6)


def test_ldm_names_invert_for_every_preset():
    """unet_key_to_ldm / vae_key_to_ldm undo unet_key_from_ldm / vae_key_from_ldm on every key of every preset
    (full-size ones on the meta device), and agree with test_model's independent LDM writer."""
    from test_model import ldm_unet_key, ldm_vae_sd
    for name, cfg in model.UNET_PRESETS.items():
        with torch.device("meta"):
            keys = list(model.UNet(cfg).state_dict())
        ldm = [weights.unet_key_to_ldm(k, cfg) for k in keys]
        assert ldm == [ldm_unet_key(k, cfg) for k in keys], name
        assert [weights.unet_key_from_ldm(k, cfg) for k in ldm] == keys, name
    for name, cfg in model.VAE_PRESETS.items():
        with torch.device("meta"):
            sd = model.VAE(cfg).state_dict()
        ldm = weights.to_ldm(sd, "first_stage_model.", weights.vae_key_to_ldm, cfg)
        ref = ldm_vae_sd(sd, len(cfg.channels))
        assert ldm.keys() == ref.keys() and all(ldm[k].shape == ref[k].shape for k in ref), name
        back = weights.from_ldm(ldm, "first_stage_model.", weights.vae_key_from_ldm, cfg)
        assert back.keys() == sd.keys() and all(back[k].shape == sd[k].shape for k in sd), name


def meta_clip(width, layers, act, projection=0):
    """A full-size SD text encoder on the meta device (no memory): CLIP-L, OpenCLIP-H (SD2) or bigG (SDXL)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or width)
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


@pytest.mark.parametrize("family,diffusers_type", [("sd15", "v1"), ("sd21", "v2"), ("sdxl", "xl_base")])
def test_full_size_single_file_is_recognised(family, diffusers_type):
    """A full-size export (meta tensors: names and shapes only) is the family's real layout: diffusers and our reader
    detect the family, and diffusers' own converters map every UNet, VAE and text-encoder key back."""
    import types
    from diffusers.loaders import single_file_utils as sfu
    from teacher import single_file_state
    tes = {"sd15": [meta_clip(768, 12, "quick_gelu")], "sd21": [meta_clip(1024, 23, "gelu")],  # diffusers keeps 23
           "sdxl": [meta_clip(768, 12, "quick_gelu"), meta_clip(1280, 32, "gelu", projection=1280)]}[family]
    with torch.device("meta"):
        unet = model.UNet(model.UNET_PRESETS[family])
        vae = model.VAE(model.VAE_PRESETS["sdxl" if family == "sdxl" else "sd"])
    sd = single_file_state(types.SimpleNamespace(vae=vae, text_encoders=tes, xl=family == "sdxl"), unet)
    assert weights.ldm_family(sd) == family and sfu.infer_diffusers_model_type(sd) == diffusers_type
    if family == "sd15":
        assert len(sd) == 1131  # the key count of v1-5-pruned-emaonly.safetensors
    assert sfu.convert_ldm_unet_checkpoint(sd, weights.unet_config_to_diffusers(unet.cfg)).keys() == \
        unet.state_dict().keys()
    vae_back = sfu.convert_ldm_vae_checkpoint(sd, weights.vae_config_to_diffusers(vae.cfg))
    assert vae_back.keys() == vae.state_dict().keys()
    flat = lambda keys: {k.removeprefix("text_model.") for k in keys} - {"embeddings.position_ids"}
    if family != "sd21":  # CLIP-L in HF naming: SD1's, SDXL's first
        assert flat(sfu.convert_ldm_clip_checkpoint(sd)) == flat(tes[0].state_dict())
    if family != "sd15":  # OpenCLIP: SD2's 24th layer (ours is zeros) is one diffusers drops by name
        prefix = "conditioner.embedders.1.model." if family == "sdxl" else "cond_stage_model.model."
        assert flat(sfu.convert_open_clip_checkpoint(tes[-1], sd, prefix)) == flat(tes[-1].state_dict())


# -----------------------------------------------------------------------------
# where an export may write


def test_export_refuses_to_overwrite_unless_forced(world, tmp_path, run):
    from sample import export_student
    ckpt = str(world / "out" / "ckpt.pt")
    (tmp_path / "old.safetensors").write_bytes(b"an earlier export")
    with pytest.raises(SystemExit, match=r"old.safetensors: already exists; choose another path, or add --force=True"):
        export_student(ckpt, str(tmp_path / "old.safetensors"))
    assert (tmp_path / "old.safetensors").read_bytes() == b"an earlier export"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"full: already exists and is not empty; choose another path, or add --for"):
        export_student(ckpt, str(tmp_path / "full"))
    (tmp_path / "dir.safetensors").mkdir()
    with pytest.raises(SystemExit, match=r"is a folder; a name ending in .safetensors writes one file"):
        export_student(ckpt, str(tmp_path / "dir.safetensors"), force=True)
    with pytest.raises(SystemExit, match=r"x.ckpt: we write single files as .safetensors only"):
        export_student(ckpt, str(tmp_path / "x.ckpt"))
    (tmp_path / "empty").mkdir()
    export_student(ckpt, str(tmp_path / "empty"))  # an empty folder is no loss
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    r = run(["sample.py", f"--ckpt={ckpt}", f"--export={tmp_path}/old.safetensors", "--force=True"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert weights.read_checkpoint(str(tmp_path / "old.safetensors"))  # replaced by a real export
    export_student(ckpt, str(tmp_path / "full"), force=True)
    assert sorted(os.listdir(tmp_path / "full")) == ["config.json", "diffusion_pytorch_model.safetensors", "notes.txt"]


def test_export_never_writes_into_the_teacher(world, tmp_path, run):
    from sample import export_student
    ckpt, teacher = str(world / "out" / "ckpt.pt"), world / "sd"
    files = lambda: {str(p.relative_to(teacher)): p.read_bytes() for p in teacher.rglob("*") if p.is_file()}
    before = files()
    os.symlink(teacher, tmp_path / "link")  # the same folder under another name: resolved with realpath
    for target in [teacher / "student.safetensors", teacher / "unet", teacher, tmp_path / "link" / "student",
                   tmp_path / "link" / "unet" / "diffusion_pytorch_model.safetensors"]:
        with pytest.raises(SystemExit, match=r"is inside the teacher .*, which an export never writes into \(not even "
                                             r"with --force=True\); export somewhere else"):
            export_student(ckpt, str(target), force=True)
    r = run(["sample.py", f"--ckpt={ckpt}", f"--export={teacher}/unet", "--force=True"])
    assert r.returncode != 0 and "is inside the teacher" in r.stderr and "Traceback" not in r.stderr
    assert files() == before
    # a single-file teacher: the file itself is refused (its neighbours are fair game: a folder of models)
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    ck["config"]["teacher"] = str(tmp_path / "teacher.safetensors")
    (tmp_path / "teacher.safetensors").write_bytes(b"the teacher's weights")
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"teacher.safetensors: is inside the teacher"):
        export_student(str(tmp_path / "ckpt.pt"), str(tmp_path / "teacher.safetensors"), force=True)
    assert (tmp_path / "teacher.safetensors").read_bytes() == b"the teacher's weights"
