"""What the tests share: they run offline (a hidden download from a model hub fails loudly instead of hanging or passing
by luck), on one thread, with the project's scripts run as a user runs them (`run`), and with one untrained toy world
and one 2-step student built once per session for every test that needs a whole pipeline on disk."""
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the flat scripts at the top


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny: a second thread gains nothing, and on busy cores OpenMP's spin-waiting threads
    slow every op many times over. (Scripts the tests launch as subprocesses keep torch's default.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def root():
    """The project's folder, where the scripts are."""
    return ROOT


@pytest.fixture(scope="session")
def run():
    """run(["train.py", "--key=value", ...]) runs a script (or ["-m", "module", ...]) from the project's folder in a
    fresh Python, as a user would, and returns the finished process (returncode, stdout, stderr)."""
    def run(args, **kw):  # one thread each (unless env says otherwise): the tests' tiny tensors run no faster on two,
        # and OpenMP's waiting threads slow them down on cores that other work shares
        kw["env"] = {"OMP_NUM_THREADS": "1", **kw.get("env", os.environ)}
        return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, **kw)
    return run


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory, run):
    """An untrained toy world (toy.build's stages with 0 training steps: VAE, text encoder + tokenizer + teacher UNet
    in sd/, the LatentLPIPS trunk, the pixel VGG) and 24 pairs of it in pairs/ (DDIM 2 steps, two shards of 12)."""
    from toy import shapes
    d = tmp_path_factory.mktemp("toy_world")
    r = run(["-m", "toy.build", f"--out_dir={d}", "--stage=vae,teacher,lpips,pixel", "--vae_steps=0",
             "--teacher_steps=0", "--lpips_steps=0", "--pixel_steps=0"])
    assert r.returncode == 0, r.stderr[-2000:]
    (d / "prompts.txt").write_text("".join(shapes.sample(i)[1] + "\n" for i in range(24)))
    r = run(["make_pairs.py", f"--prompts={d}/prompts.txt", f"--out_dir={d}/pairs", f"--teacher={d}/sd", "--steps=2",
             "--batch_size=24", "--shard_size=12"])
    assert r.returncode == 0, r.stderr[-2000:]
    return d


@pytest.fixture(scope="session")
def toy_student(toy_world, run, tmp_path_factory):
    """A student of the untrained toy world, trained 2 steps with L2 alone (EMA 0.5, so the EMA differs from the
    teacher): the folder holding its ckpt.pt. Tests copy what they change."""
    out = tmp_path_factory.mktemp("toy_student")
    r = run(["train.py", f"--teacher={toy_world}/sd", f"--pairs={toy_world}/pairs", f"--out_dir={out}", "--max_steps=2",
             "--batch_size=4", "--gan=False", "--regression=l2", "--ema_decay=0.5", "--lr_g=1e-3", "--holdout=0"])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def student_world(toy_world, toy_student, tmp_path_factory):
    """A folder of the test module's own, to write into: sd/ (a copy of the untrained toy teacher) and out/ckpt.pt (the
    2-step student, its config naming this sd/ as its teacher)."""
    import shutil

    from weights import load_checkpoint, save_checkpoint
    w = tmp_path_factory.mktemp("student_world")
    shutil.copytree(toy_world / "sd", w / "sd")
    (w / "out").mkdir()
    ckpt = load_checkpoint(str(toy_student / "ckpt.pt"))
    ckpt["config"]["teacher"] = str(w / "sd")
    save_checkpoint(ckpt, str(w / "out" / "ckpt.pt"))
    return w


# -----------------------------------------------------------------------------
# tiny random SD1-, SD2- (v-prediction) and SDXL-like pipelines written by diffusers, the reference of parity tests

WORDS = "a small large red green blue circle square triangle on in the left right center and background".split()
PROMPTS = ["a small red circle on the left", "a large blue square on the right and a green triangle"]  # test_*.py import it


def tiny_clip(tok, width, act="quick_gelu", projection=0, layers=2, seed=0):
    """A tiny CLIP text tower; heads 1 so that a single-file read (heads = width // 64, at least 1) rebuilds it."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=1, max_position_embeddings=tok.model_max_length, hidden_act=act,
                         projection_dim=projection or width, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_diffusers(cls, cfg, seed):
    torch.manual_seed(seed)
    m = cls(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()
    with torch.no_grad():  # every weight non-trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def build_pipeline(root, kind, seed=0, xl_widths=(32, 32)):
    """Save a tiny random diffusers pipeline ('sd1', 'sd2v' or 'sdxl') to root/pipe and return it (diffusers is the
    reference of the parity tests; a test that needs it skips where it is not installed). xl_widths: SDXL's two text
    encoders (diffusers' single-file loader tells them apart by width only)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only reference) is not installed")
    from transformers import CLIPTokenizer

    import model
    import weights
    from toy.tokenizer import write_clip_tokenizer
    unet_cfg = {"sd1": "tiny-sd1", "sd2v": "tiny-sd2", "sdxl": "tiny-sdxl"}[kind]
    unet_cfg = weights.unet_config_to_diffusers(model.UNET_PRESETS[unet_cfg])
    unet = tiny_diffusers(diffusers.UNet2DConditionModel, unet_cfg, seed)
    vae = tiny_diffusers(diffusers.AutoencoderKL, weights.vae_config_to_diffusers(model.VAE_PRESETS["tiny"]), seed + 1)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction" if kind == "sd2v" else "epsilon")
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(root, "tok1"), WORDS))
    if kind == "sdxl":  # CLIP-L-like (quick_gelu) + bigG-like (gelu, projection), the second tokenizer pads with "!"
        tok2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(root, "tok2"), WORDS, pad_token="!"))
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=tiny_clip(tok, xl_widths[0], seed=seed + 2), tokenizer=tok, unet=unet,
            scheduler=scheduler, text_encoder_2=tiny_clip(tok2, xl_widths[1], "gelu", projection=32, seed=seed + 3),
            tokenizer_2=tok2, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        if kind == "sd2v":  # OpenCLIP-H-like: gelu, 48 wide, pads with "!"
            tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(root, "tok1"), WORDS, pad_token="!"))
        te = tiny_clip(tok, 32, seed=seed + 2) if kind == "sd1" else tiny_clip(tok, 48, "gelu", seed=seed + 2)
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(root, "pipe"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory):
    """kind -> (diffusers pipeline, its saved folder), built once per session."""
    cache = {}

    def get(kind):
        if kind not in cache:
            root = str(tmp_path_factory.mktemp(kind))
            cache[kind] = (build_pipeline(root, kind), os.path.join(root, "pipe"))
        return cache[kind]
    return get
