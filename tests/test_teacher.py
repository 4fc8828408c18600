"""teacher.py against diffusers' own pipelines, on tiny random SD1-, SD2-(v-prediction) and SDXL-like pipelines that
diffusers saves to disk: text embeddings, the DDIM + guidance trajectory, the schedule and timesteps, the eps/v
conversions, single-file text encoders, and load errors. fp32 on CPU; trajectories within 1e-4 max abs."""
import dataclasses
import fnmatch
import re

import pytest
import torch
from transformers import CLIPTokenizer

import model
import teacher
import weights
from conftest import PROMPTS, WORDS, tiny_clip
from teacher import ddim_sample, ddim_timesteps, load_teacher, make_alphas_cumprod, predict_x0, x0_and_eps
from toy.tokenizer import write_clip_tokenizer

diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only reference) is not installed")
TOL = 1e-4
SIZE = 16  # pixels: 8x8 latents with the tiny VAE (factor 2)


def reference_latents(pipe, prompts, z, steps, guidance, spacing):
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing=spacing)
    with torch.no_grad():
        return pipe(prompts, height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=guidance,
                    latents=z.clone(), output_type="latent").images


def noise(batch, shape=(4, 8, 8), seed=1):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# parity with diffusers' pipelines


@pytest.mark.parametrize("kind", ["sd1", "sd2v"])
def test_text_embeddings_match_pipeline(kind, pipelines):
    pipe, folder = pipelines(kind)
    t = load_teacher(folder)
    with torch.no_grad():
        ref, ref_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    cond, uncond = t.conditions(PROMPTS, SIZE, SIZE)
    assert cond["pooled"] is None and cond["time_ids"] is None
    assert torch.equal(cond["context"], ref) and torch.equal(uncond["context"], ref_neg)  # uncond = encoding of ""
    assert not torch.equal(uncond["context"], torch.zeros_like(ref_neg))
    pad = {"sd1": "<|endoftext|>", "sd2v": "!"}[kind]
    assert t.tokenizers[0].pad_token == pad


@pytest.mark.parametrize("kind", ["sd1", "sd2v"])
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_ddim_trajectory_matches_pipeline(kind, spacing, pipelines):
    pipe, folder = pipelines(kind)
    t = load_teacher(folder)
    assert t.prediction_type == {"sd1": "epsilon", "sd2v": "v_prediction"}[kind]
    z = noise(2)
    ref = reference_latents(pipe, PROMPTS, z, 10, 3.0, spacing)  # 10 divides 1000: diffusers' prev_t is right here
    cond, uncond = t.conditions(PROMPTS, SIZE, SIZE)
    x = t.sample(z, cond, uncond, steps=10, guidance=3.0, spacing=spacing)
    err = (x - ref).abs().max().item()
    print(f"{kind} {spacing}: DDIM-10 + CFG 3 max abs error vs diffusers {err:.2e} (|x| <= {ref.abs().max():.1f})")
    assert err < TOL


def test_sdxl_conditioning_and_trajectory_match_pipeline(pipelines):
    pipe, folder = pipelines("sdxl")
    t = load_teacher(folder)
    assert t.xl and len(t.text_encoders) == 2
    with torch.no_grad():
        ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")  # with CFG, no negative
    cond, uncond = t.conditions(PROMPTS, SIZE, SIZE)
    assert cond["context"].shape == (2, 77, 64) and cond["pooled"].shape == (2, 32)
    assert torch.equal(cond["context"], ref) and torch.equal(cond["pooled"], ref_pooled)
    # no negative prompt: zeros for both (force_zeros_for_empty_prompt), not the encoding of ""
    assert torch.equal(uncond["context"], ref_neg) and torch.equal(uncond["pooled"], ref_neg_pooled)
    assert not uncond["context"].any() and not uncond["pooled"].any()
    ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(cond["time_ids"], ids.expand(2, 6)) and torch.equal(uncond["time_ids"], cond["time_ids"])
    # a real negative prompt is encoded like the pipeline does
    with torch.no_grad():
        _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=["blue"] * 2)
    u = t.uncond(2, "blue")  # encoded once at batch 1: the pooled Linear (2-D, M = batch) rounds differently
    assert torch.equal(u["context"], neg) and torch.allclose(u["pooled"], neg_pooled, rtol=0, atol=1e-6)
    z = noise(2)
    ref_x = reference_latents(pipe, PROMPTS, z, 10, 3.0, "trailing")
    err = (t.sample(z, cond, uncond, 10, 3.0, "trailing") - ref_x).abs().max().item()
    print(f"sdxl trailing: DDIM-10 + CFG 3 max abs error vs diffusers {err:.2e}")
    assert err < TOL


def test_no_guidance_at_w_1_like_diffusers(pipelines):
    pipe, folder = pipelines("sd1")
    t = load_teacher(folder)
    calls = []
    unet = lambda x, step, **c: calls.append(x.shape[0]) or t.unet(x, step, **c)
    z = noise(2)
    cond, uncond = t.conditions(PROMPTS, SIZE, SIZE)
    x = ddim_sample(unet, z, cond, uncond, 4, 1.0, alphas_cumprod=t.alphas_cumprod)  # 4 steps: 4 divides 1000
    assert calls == [2, 2, 2, 2]  # the conditional half only
    assert (x - reference_latents(pipe, PROMPTS, z, 4, 1.0, "trailing")).abs().max() < TOL
    calls.clear()
    ddim_sample(unet, z, cond, uncond, 2, 1.5, alphas_cumprod=t.alphas_cumprod)
    assert calls == [4, 4]  # [uncond; cond] in one call


def test_long_prompt_truncated_with_warning(pipelines):
    pipe, folder = pipelines("sd1")
    t = load_teacher(folder)
    long = " ".join(["a red circle on the left and"] * 20)  # 140 words > 77 tokens
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 77 tokens were truncated to 77 tokens"):
        e = t.encode_text([long, PROMPTS[0]])
    with torch.no_grad():
        ref, _ = pipe.encode_prompt([long, PROMPTS[0]], "cpu", 1, False)  # the pipeline truncates the same way
    assert torch.equal(e["context"], ref)


# -----------------------------------------------------------------------------
# schedule, timesteps, conversions


def test_schedule_matches_diffusers():
    ac = make_alphas_cumprod()
    assert torch.equal(ac, diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                   beta_end=0.012).alphas_cumprod)
    assert abs(ac[999].item() - 0.004660) < 1e-6 and abs(ac[0].item() - 0.99915) < 1e-6
    assert torch.equal(make_alphas_cumprod(0.0001, 0.02, beta_schedule="linear"),
                       diffusers.DDIMScheduler(beta_schedule="linear").alphas_cumprod)
    with pytest.raises(ValueError, match="beta_schedule='cosine' is not supported"):
        make_alphas_cumprod(beta_schedule="cosine")


def test_timesteps_match_diffusers():
    for spacing in ["trailing", "leading", "linspace"]:
        s = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=1)
        for n in [1, 2, 3, 4, 7, 10, 50, 61, 999, 1000]:
            s.set_timesteps(n)
            ours = ddim_timesteps(n, spacing)
            assert len(ours) == n and ours == s.timesteps.tolist()[:n], (spacing, n)  # diffusers gives 62 for n=61
    assert ddim_timesteps(4) == [999, 749, 499, 249] and ddim_timesteps(1) == [999]
    assert ddim_timesteps(4, "leading") == [751, 501, 251, 1] and ddim_timesteps(1, "leading") == [1]
    lead = ddim_timesteps(50, "leading")
    assert lead[0] == 981 and lead[-1] == 1
    assert ddim_timesteps(1, "linspace") == [0]
    with pytest.raises(ValueError, match="spacing='uniform'"):
        ddim_timesteps(4, "uniform")


def test_previous_timestep_comes_from_the_list():
    """N=3 trailing visits 999, 666, 332. With eps = 0 every DDIM step scales x by sqrt(a_prev / a_t), so the product
    telescopes to sqrt(a_0 / a_999) only if each a_prev is the a_t of the next step. diffusers' prev_t = t - 1000 // N
    would use 333 instead of 332 after 666 (its issues #9261, #12633)."""
    ac = make_alphas_cumprod()
    seen = []
    unet = lambda x, step, **c: seen.append(step) or torch.zeros_like(x)
    z = noise(2)
    cond = dict(context=torch.zeros(2, 1, 1))
    x = ddim_sample(unet, z, cond, cond, 3, 3.0, alphas_cumprod=ac)
    assert seen == [999, 666, 332]
    assert torch.allclose(x, z * (ac[0] / ac[999]).sqrt(), rtol=1e-5)
    buggy = z * (ac[666] / ac[999] * ac[333] / ac[666] * ac[0] / ac[332]).sqrt()
    assert not torch.allclose(x, buggy, rtol=1e-4)


def test_compiled_unet_compiles_once():
    """ddim_sample hands the UNet t as a tensor: a compiled UNet is traced once, not once per timestep (an int t is a
    constant to torch.compile, which then recompiles at every step and falls back to eager after 8)."""
    graphs = []

    def count(gm, example_inputs):  # a torch.compile backend that counts the graphs it gets and runs them as they are
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    unet = model.UNet(model.UNET_PRESETS["tiny-sd1"]).eval()
    ac, z = make_alphas_cumprod(), noise(2)
    cond = dict(context=torch.randn(2, 7, 32))
    uncond = dict(context=torch.zeros(2, 7, 32))
    x = ddim_sample(torch.compile(unet, backend=count), z, cond, uncond, 3, 3.0, alphas_cumprod=ac)
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert torch.equal(x, ddim_sample(unet, z, cond, uncond, 3, 3.0, alphas_cumprod=ac))


def test_eps_and_v_conversions():
    ac = make_alphas_cumprod()
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in [999, 500, torch.tensor([999, 37, 0])]:
        a = ac[t].reshape(-1, 1, 1, 1) if torch.is_tensor(t) else ac[t]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        got_x0, got_eps = x0_and_eps(v, x_t, t, ac, "v_prediction")
        assert torch.allclose(got_x0, x0, atol=1e-4) and torch.allclose(got_eps, eps, atol=1e-4)
        got_x0, got_eps = x0_and_eps(eps, x_t, t, ac, "epsilon")
        assert torch.allclose(got_x0, x0, atol=2e-3) and torch.equal(got_eps, eps)  # 1/sqrt(a_999): 14.6x the error
        assert torch.equal(predict_x0(eps.bfloat16(), x_t, t, ac, "epsilon"),
                           x0_and_eps(eps.bfloat16().float(), x_t, t, ac, "epsilon")[0])  # fp32 math on bf16 outputs
    assert predict_x0(eps, x_t, t, ac, "epsilon").dtype == torch.float32
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        predict_x0(eps, x_t, 999, ac, "sample")


def test_toy_tokenizer(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path / "tok"), ["Red", "circle", "a"]))
    ids = tok("A red  Circle, reddish!").input_ids  # known words are one token, others fall back to characters
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", ",</w>", "r", "e",
                                              "d", "d", "i", "s", "h</w>", "!</w>", "<|endoftext|>"]
    assert [len(tok(w).input_ids) for w in ["red", "circle", "a"]] == [3, 3, 3]  # BOS, the word, EOS
    assert tok.pad_token_id == tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    assert tok.model_max_length == 77 and tok.decode(tok("a red circle").input_ids, skip_special_tokens=True) == \
        "a red circle"
    sd2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path / "tok2"), ["red"], 16, pad_token="!"))
    assert sd2.pad_token_id == 0 and sd2("red", padding="max_length", max_length=16).input_ids[3:] == [0] * 13
    with pytest.raises(ValueError, match="'red-circle' is not one run of letters"):
        write_clip_tokenizer(str(tmp_path / "bad"), ["red-circle"])


# -----------------------------------------------------------------------------
# the teacher object


def test_teacher_is_frozen_and_typed(pipelines):
    _, folder = pipelines("sd1")
    t = load_teacher(folder, dtype=torch.bfloat16)
    for m in [t.unet, t.vae, *t.text_encoders]:
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert t.unet.conv_in.weight.dtype == torch.bfloat16 and t.text_encoders[0].dtype == torch.bfloat16
    cond, uncond = t.conditions(PROMPTS[:1], SIZE, SIZE)
    assert cond["context"].dtype == torch.bfloat16
    x = t.sample(noise(1), cond, uncond, 2, 3.0)
    assert x.dtype == torch.float32 and x.shape == (1, 4, 8, 8) and torch.isfinite(x).all()
    assert t.resolution == 32 and t.latent_shape() == (4, 16, 16) and t.latent_shape(SIZE) == (4, 8, 8)
    assert t.latent_shape((16, 24)) == (4, 8, 12)
    with pytest.raises(ValueError, match="resolution 18x18 must be a multiple of 4"):
        t.latent_shape(18)
    assert t.time_ids(2, 16, 16) is None
    assert t.decode(x).shape == (1, 3, 16, 16)


def test_text_and_time_ids_stay_where_the_text_encoders_are(pipelines):
    """train.py moves the teacher UNet off the GPU once G and D are copied: conditioning must not follow it."""
    _, folder = pipelines("sdxl")
    t = load_teacher(folder)
    want = t.conditions(PROMPTS, SIZE, SIZE)[0]["context"]
    t.unet.to("meta")  # stands for "another device" on a CPU-only machine
    assert t.device == torch.device("cpu")
    cond, _ = t.conditions(PROMPTS, SIZE, SIZE)
    assert torch.equal(cond["context"], want) and t.time_ids(2, SIZE, SIZE).device == torch.device("cpu")


def test_force_upcast_vae_is_loaded_unrounded(pipelines):
    """A force_upcast VAE (SDXL's) in an fp16 teacher is fp32 with the file's own fp32 weights, not fp16-rounded ones.
    In a bf16 teacher it is bf16, as in diffusers' SDXL pipeline, which upcasts only a VAE that is fp16."""
    _, folder = pipelines("sd1")
    vcfg = dataclasses.replace(model.VAE_PRESETS["tiny"], force_upcast=True)
    ref = weights.load_vae(folder, vcfg)
    t = load_teacher(folder, dtype=torch.float16, vae_config=vcfg)
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(t.vae.parameters(), ref.parameters()))
    x = noise(1)
    with torch.no_grad():
        assert torch.equal(t.decode(x.half()), ref.decode(x.half().float() / vcfg.scaling_factor))  # fp16 in, fp32 VAE
    t = load_teacher(folder, dtype=torch.bfloat16, vae_config=vcfg)
    assert t.vae.post_quant_conv.weight.dtype == torch.bfloat16 and t.decode(x).dtype == torch.float32


def test_shared_time_embedding(pipelines):
    """A scalar t gets one embedding row (batch-size-invariant bits); a copy of the UNet (the student) uses its own."""
    import copy
    _, folder = pipelines("sd1")
    unet = load_teacher(folder).unet
    assert isinstance(unet, model.UNet) and unet.embed(torch.tensor(999), 3).shape[0] == 1
    assert unet.embed(torch.tensor([999, 999, 999]), 3).shape[0] == 3
    assert torch.allclose(unet.embed(999, 3), unet.embed(torch.tensor([999] * 3), 3), atol=1e-6)
    student = copy.deepcopy(unet)
    with torch.no_grad():
        student.time_embedding.linear_2.bias.add_(1.0)
    x, ctx = noise(2), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert not torch.allclose(student(x, 999, ctx), unet(x, 999, ctx))


# -----------------------------------------------------------------------------
# original single-file checkpoints: text encoders in HF naming (SD1, SDXL's first) and OpenCLIP naming (SD2, bigG)


def to_openclip(te):
    """HF CLIP text weights -> OpenCLIP names, written independently of teacher.py."""
    out = {}
    for k, v in te.state_dict().items():
        k = k.removeprefix("text_model.")
        if k == "text_projection.weight":
            out["text_projection"] = v.t()
            continue
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            out.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})["qkv".index(m[2])] = v
            continue
        for a, b in [("embeddings.token_embedding", "token_embedding"), ("final_layer_norm", "ln_final"),
                     ("encoder.layers", "transformer.resblocks"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]:
            k = k.replace(a, b)
        out["positional_embedding" if k == "embeddings.position_embedding.weight" else k] = v
    return {k: torch.cat([v[0], v[1], v[2]]) if isinstance(v, dict) else v for k, v in out.items()}


def test_openclip_text_encoders_from_single_file_naming(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path / "tok"), WORDS, pad_token="!"))
    ids = tok(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    # SD2: the file has one more layer than diffusers keeps (LDM's "penultimate"), plus unused projection/logit_scale
    ref = tiny_clip(tok, 48, "gelu", layers=2)
    full = tiny_clip(tok, 48, "gelu", layers=3)
    full.load_state_dict(ref.state_dict(), strict=False)  # layers 0-1 equal to ref, layer 2 extra
    sd = to_openclip(full) | {"text_projection": torch.randn(48, 48), "logit_scale": torch.tensor(4.6)}
    ours = teacher.clip_from_state(sd, "sd2.ckpt", tok, openclip=True, drop_last=True)
    assert ours.config.num_hidden_layers == 2 and ours.config.hidden_act == "gelu"
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, ref(ids).last_hidden_state)
    # SDXL bigG: all layers kept, text_projection transposed into a Linear
    ref = tiny_clip(tok, 32, "gelu", projection=16, layers=3)
    ours = teacher.clip_from_state(to_openclip(ref), "xl.safetensors", tok, openclip=True, projection=True)
    with torch.no_grad():
        a, b = ours(ids, output_hidden_states=True), ref(ids, output_hidden_states=True)
    assert torch.equal(a.hidden_states[-2], b.hidden_states[-2]) and torch.equal(a.text_embeds, b.text_embeds)
    sd = to_openclip(ref)
    sd.pop("ln_final.weight")
    with pytest.raises(ValueError, match=r"(?s)bad.ckpt: the text encoder does not fit a CLIP text model: .*final"):
        teacher.clip_from_state(sd, "bad.ckpt", tok, openclip=True, projection=True)


def write_sd1_single_file(pipe, path, text_encoder=True):
    """The tiny SD1 pipeline as an original single file (UNet and VAE, and the text encoder unless told not to)."""
    from safetensors.torch import save_file
    from test_model import ldm_unet_key, ldm_vae_sd  # test-only LDM writers, independent of model.py
    cfg = model.UNET_PRESETS["tiny-sd1"]
    sd = {"model.diffusion_model." + ldm_unet_key(k, cfg): v for k, v in pipe.unet.state_dict().items()}
    sd |= ldm_vae_sd(pipe.vae.state_dict(), 2)
    if text_encoder:
        sd |= {"cond_stage_model.transformer.text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()}
    save_file(sd, str(path))
    return str(path)


def test_sd1_single_file_matches_folder(pipelines, tmp_path):
    pipe, folder = pipelines("sd1")
    path = write_sd1_single_file(pipe, tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match=r"sd1.safetensors: a single-file checkpoint holds no tokenizer: pass"):
        load_teacher(path, unet_config="tiny-sd1", vae_config="tiny")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer/ folder here .*; a single-file checkpoint holds no tok"):
        load_teacher(path, tokenizer=str(tmp_path), unet_config="tiny-sd1", vae_config="tiny")
    a = load_teacher(path, tokenizer=folder, unet_config="tiny-sd1", vae_config="tiny")
    b = load_teacher(folder)
    assert a.prediction_type == "epsilon" and a.text_encoders[0].config.hidden_act == "quick_gelu"
    ca, ua = a.conditions(PROMPTS, SIZE, SIZE)
    cb, ub = b.conditions(PROMPTS, SIZE, SIZE)
    assert torch.equal(ca["context"], cb["context"]) and torch.equal(ua["context"], ub["context"])
    z = noise(2)  # equal up to rounding: MKL's one-row GEMM (the shared time embedding) rounds by weight alignment,
    assert (a.sample(z, ca, ua, 2, 3.0) - b.sample(z, cb, ub, 2, 3.0)).abs().max() < TOL  # and that is the file offsets


def test_single_file_is_read_once(pipelines, tmp_path, monkeypatch):
    pipe, folder = pipelines("sd1")
    path = write_sd1_single_file(pipe, tmp_path / "sd1.safetensors")
    reads, read = [], weights.read_checkpoint
    counted = lambda p: reads.append(p) or read(p)
    monkeypatch.setattr(weights, "read_checkpoint", counted)
    monkeypatch.setattr(teacher, "read_checkpoint", counted)
    load_teacher(path, tokenizer=folder, unet_config="tiny-sd1", vae_config="tiny")
    assert reads == [path]  # not once more for the UNet and again for the VAE


# -----------------------------------------------------------------------------
# load errors


def test_load_errors(pipelines, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such file or folder"):
        load_teacher(str(tmp_path / "nope"))
    (tmp_path / "only_unet" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="only_unet: no text_encoder/ folder: not a diffusers text-to-image"):
        load_teacher(str(tmp_path / "only_unet"))
    _, folder = pipelines("sd1")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer_2/ folder here \(with vocab.json and merges.txt, or "
                                                r"tokenizer.json\)"):  # an SD1 tokenizer folder for an SDXL model
        teacher.load_tokenizers(folder, 2)
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model: not a local path"):
        load_teacher("no-such-org/no-such-model")


def test_error_single_file_without_text_encoder(pipelines, tmp_path):
    pipe, folder = pipelines("sd1")
    path = write_sd1_single_file(pipe, tmp_path / "unet_vae.safetensors", text_encoder=False)
    with pytest.raises(ValueError, match=r"unet_vae.safetensors: no text-encoder weights under "
                                         r"cond_stage_model.transformer.\*; a UNet-only file needs a diffusers"):
        load_teacher(path, tokenizer=folder, unet_config="tiny-sd1", vae_config="tiny")


def test_hub_pipeline_downloads_only_the_variant(monkeypatch):
    """A hub id downloads the configs, tokenizers and the requested variant's weights, sharded or not (a stub that
    records the patterns stands in for the hub, then fails like an offline download)."""
    import huggingface_hub
    asked = []

    def offline(repo_id, allow_patterns):
        asked.append(allow_patterns)
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="org/pipe: not a local path"):
        load_teacher("org/pipe", variant="fp16")
    fp16 = ["unet/diffusion_pytorch_model.safetensors.index.fp16.json",
            "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors",
            "text_encoder_2/model.safetensors.index.fp16.json", "text_encoder_2/model.fp16-00001-of-00002.safetensors",
            "unet/config.json", "tokenizer/vocab.json", "scheduler/scheduler_config.json", "model_index.json"]
    other = ["unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model-00001-of-00002.safetensors", "unet/diffusion_pytorch_model.bin",
             "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
             "text_encoder_2/model.safetensors.index.json", "text_encoder_2/model-00001-of-00002.safetensors"]
    assert [f for f in fp16 + other if any(fnmatch.fnmatchcase(f, p) for p in asked[0])] == fp16
