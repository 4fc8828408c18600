"""model.py: parity with diffusers on tiny random models of each family, single-file loading, full-size key sets and
parameter counts, saving back to the diffusers layout, and every load error. fp32 on CPU, tolerance 1e-5 max abs."""
import json
import os
import re

import pytest
import torch

import model
import weights
from model import UNET_PRESETS, VAE_PRESETS
from weights import load_unet, load_vae, save_pretrained

diffusers = pytest.importorskip("diffusers", reason="diffusers (test-only reference) is not installed")
TOL = 1e-5


def diffusers_unet(cfg, seed=0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in weights.unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    unet = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing we care about, but make every weight non-trivial
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return unet


def diffusers_vae(cfg, seed=0):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in weights.vae_config_to_diffusers(cfg).items() if not k.startswith("_")}
    vae = diffusers.AutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae


def unet_inputs(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, 16, 16, generator=g)
    t = torch.tensor([999, 37])[:batch]
    ctx = torch.randn(batch, 7, cfg.context_dim, generator=g)
    extra = {}
    if cfg.add_time_dim:
        extra = dict(pooled=torch.randn(batch, cfg.add_in_dim - 6 * cfg.add_time_dim, generator=g),
                     time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch))
    return x, t, ctx, extra


def run_diffusers_unet(unet, x, t, ctx, extra):
    added = {"text_embeds": extra["pooled"], "time_ids": extra["time_ids"]} if extra else None
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


# -----------------------------------------------------------------------------
# parity through the diffusers folder layout


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_unet_parity_with_diffusers(name, tmp_path):
    cfg = UNET_PRESETS[name]
    ref = diffusers_unet(cfg)
    ref.save_pretrained(tmp_path / "unet")
    ours = load_unet(str(tmp_path))  # the pipeline root: finds unet/ itself
    assert ours.cfg == cfg
    x, t, ctx, extra = unet_inputs(cfg)
    with torch.no_grad():
        out = ours(x, t, ctx, **extra)
    err = (out - run_diffusers_unet(ref, x, t, ctx, extra)).abs().max().item()
    print(f"{name}: UNet max abs error vs diffusers {err:.2e}")
    assert err < TOL


def test_vae_parity_with_diffusers(tmp_path):
    cfg = VAE_PRESETS["tiny"]
    ref = diffusers_vae(cfg)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(str(tmp_path / "vae"))  # the subfolder itself works too
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        mean, logvar = ours.encode(img)
        ref_dist = ref.encode(img).latent_dist
        assert (mean - ref_dist.mean).abs().max() < TOL
        assert (logvar - ref_dist.logvar).abs().max() < TOL
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < TOL


def test_sharded_and_fp16_variant_folders(tmp_path):
    cfg = UNET_PRESETS["tiny-sd1"]
    ref = diffusers_unet(cfg)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="500KB")
    assert os.path.exists(tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json")
    x, t, ctx, _ = unet_inputs(cfg)
    expected = run_diffusers_unet(ref, x, t, ctx, {})
    ref.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    a, b = load_unet(str(tmp_path / "sharded")), load_unet(str(tmp_path / "fp16"), variant="fp16")
    with torch.no_grad():
        assert (a(x, t, ctx) - expected).abs().max().item() < TOL
        assert (b(x, t, ctx) - expected).abs().max().item() < 0.05  # fp16 storage rounding only
    assert b.conv_in.weight.dtype == torch.float32


def test_sharded_variant_folder(tmp_path):
    """diffusers names a sharded variant's index diffusion_pytorch_model.safetensors.index.fp16.json."""
    cfg = UNET_PRESETS["tiny-sd1"]
    ref = diffusers_unet(cfg).half()
    ref.save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="500KB")
    assert os.path.exists(tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json")
    ours = load_unet(str(tmp_path), variant="fp16")
    x, t, ctx, _ = unet_inputs(cfg)
    with torch.no_grad():
        expected = run_diffusers_unet(ref.float(), x, t, ctx, {})  # the same fp16-rounded weights, run in fp32
        assert (ours(x, t, ctx) - expected).abs().max().item() < TOL


def test_hub_download_patterns_follow_variant(tmp_path, monkeypatch):
    """A hub id downloads config.json and the requested variant's weights only (a stub stands in for the hub)."""
    import fnmatch
    import huggingface_hub
    diffusers_vae(VAE_PRESETS["tiny"]).save_pretrained(tmp_path / "repo", variant="fp16")  # a model repo: top level
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns: asked.append(allow_patterns) or str(tmp_path / "repo"))
    assert load_vae("org/vae", variant="fp16").cfg == VAE_PRESETS["tiny"]
    plain = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
             "diffusion_pytorch_model-00001-of-00002.safetensors"]
    fp16 = ["config.json", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.safetensors.index.fp16.json",
            "diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    repo = plain + fp16[1:] + ["diffusion_pytorch_model.bin"]
    repo += [f"{sub}/{f}" for sub in ["unet", "vae"] for f in repo]  # a model repo's or a pipeline repo's files
    got = lambda patterns: [f for f in repo if any(fnmatch.fnmatchcase(f, p) for p in patterns)]
    assert sorted(got(asked[0])) == sorted(fp16 + ["vae/" + f for f in fp16])
    with pytest.raises(ValueError, match="not a UNet2DConditionModel"):  # (the stub serves the VAE)
        load_unet("org/pipe")  # no variant: the plain weights only
    assert sorted(got(asked[1])) == sorted(plain + ["unet/" + f for f in plain])


def test_saved_folder_loads_in_diffusers(tmp_path):
    for name in ["tiny-sd1", "tiny-sdxl"]:
        cfg = UNET_PRESETS[name]
        torch.manual_seed(0)
        ours = model.UNet(cfg).eval()
        save_pretrained(ours, str(tmp_path / name))
        ref = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / name)).eval()
        x, t, ctx, extra = unet_inputs(cfg)
        with torch.no_grad():
            assert (ours(x, t, ctx, **extra) - run_diffusers_unet(ref, x, t, ctx, extra)).abs().max() < TOL
        assert load_unet(str(tmp_path / name)).cfg == cfg  # and round-trips through our own reader
    torch.manual_seed(0)
    vae = model.VAE(VAE_PRESETS["tiny"]).eval()
    save_pretrained(vae, str(tmp_path / "vae"))
    ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert (vae.decode(z) - ref.decode(z).sample).abs().max() < TOL
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "vae"))


# -----------------------------------------------------------------------------
# original single-file checkpoints

RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_key(key, cfg):
    """diffusers -> LDM, written independently of model.py (and checked against diffusers' own converter below)."""
    L, n = cfg.layers_per_block, len(cfg.channels)
    top = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    head, _, param = key.rpartition(".")
    if head in top:
        return f"{top[head]}.{param}"
    res = lambda rest: ".".join(RESNET_TO_LDM.get(p, p) for p in rest.split(".")[:1]) + "." + ".".join(rest.split(".")[1:])
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, j = int(m[1]), int(m[3])
        return f"input_blocks.{1 + i * (L + 1) + j}.{0 if m[2] == 'resnets' else 1}." + (
            res(m[4]) if m[2] == "resnets" else m[4])
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key):
        idx = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        return f"middle_block.{idx}." + (res(m[3]) if m[1] == "resnets" else m[3])
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, j = int(m[1]), int(m[3])
        return f"output_blocks.{i * (L + 1) + j}.{0 if m[2] == 'resnets' else 1}." + (
            res(m[4]) if m[2] == "resnets" else m[4])
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        return f"output_blocks.{i * (L + 1) + L}.{2 if cfg.depth[n - 1 - i] else 1}.conv.{m[2]}"
    raise AssertionError(f"unmapped diffusers key {key}")


def ldm_vae_sd(sd, n):
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample.", k2)
        for a, b in [("mid_block.resnets.0", "mid.block_1"), ("mid_block.resnets.1", "mid.block_2"),
                     ("mid_block.attentions.0.group_norm", "mid.attn_1.norm"), ("mid_block.attentions.0.to_q", "mid.attn_1.q"),
                     ("mid_block.attentions.0.to_k", "mid.attn_1.k"), ("mid_block.attentions.0.to_v", "mid.attn_1.v"),
                     ("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"), ("conv_shortcut", "nin_shortcut"),
                     ("conv_norm_out", "norm_out")]:
            k2 = k2.replace(a, b)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", k2):
            v = v[:, :, None, None]  # LDM stores these as 1x1 convs
        out["first_stage_model." + k2] = v
    return out


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_single_file_matches_folder(name, ext, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from safetensors.torch import save_file
    cfg, vcfg = UNET_PRESETS[name], VAE_PRESETS["tiny"]
    ref, vae = diffusers_unet(cfg), diffusers_vae(vcfg)
    ref.save_pretrained(tmp_path / "pipe" / "unet")
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    sd = {"model.diffusion_model." + ldm_unet_key(k, cfg): v for k, v in ref.state_dict().items()}
    sd |= ldm_vae_sd(vae.state_dict(), len(vcfg.channels))
    # the file we made is in the real LDM layout: diffusers' own converter maps it back exactly
    dcfg = weights.unet_config_to_diffusers(cfg)
    back = convert_ldm_unet_checkpoint(sd, dcfg)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    vback = convert_ldm_vae_checkpoint(sd, weights.vae_config_to_diffusers(vcfg))
    assert vback.keys() == vae.state_dict().keys()
    path = str(tmp_path / f"model{ext}")
    save_file(sd, path) if ext == ".safetensors" else torch.save({"state_dict": sd}, path)

    a, b = load_unet(path, config=cfg), load_unet(str(tmp_path / "pipe"))
    x, t, ctx, extra = unet_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(a(x, t, ctx, **extra), b(x, t, ctx, **extra))
    va, vb = load_vae(path, config=vcfg), load_vae(str(tmp_path / "pipe"))
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(va.encode(img)[0], vb.encode(img)[0])
        assert torch.equal(va.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))),
                           vb.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))))


def test_family_detection():
    assert weights.ldm_family({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                             torch.empty(320, 768)}) == "sd15"
    assert weights.ldm_family({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                             torch.empty(320, 1024)}) == "sd21"
    assert weights.ldm_family({"conditioner.embedders.1.model.ln_final.weight": torch.empty(3)}) == "sdxl"


# -----------------------------------------------------------------------------
# full-size models: exact key sets, shapes and parameter counts, on the meta device (no memory)


@pytest.mark.parametrize("ours,count", [("sd15", 859_520_964), ("sd21", 865_910_724), ("sdxl", 2_567_463_684)])
def test_full_size_unet_matches_diffusers(ours, count):
    with torch.device("meta"):
        a = model.UNet(UNET_PRESETS[ours])
        kwargs = {k: v for k, v in weights.unet_config_to_diffusers(UNET_PRESETS[ours]).items() if not k.startswith("_")}
        b = diffusers.UNet2DConditionModel(**kwargs)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].shape == sb[k].shape for k in sa)
    assert sum(p.numel() for p in a.parameters()) == count


def test_full_size_vae_matches_diffusers():
    with torch.device("meta"):
        a = model.VAE(VAE_PRESETS["sd"])
        b = diffusers.AutoencoderKL(**{k: v for k, v in weights.vae_config_to_diffusers(VAE_PRESETS["sd"]).items()
                                      if not k.startswith("_")})
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    assert sum(p.numel() for p in a.parameters()) == 83_653_863


def test_full_size_presets_read_back_from_diffusers_configs():
    # the SD1.5 hub config writes attention_head_dim=8 and transformer_layers_per_block as an int
    d = {"_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
         "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
         "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768}
    assert weights.unet_config_from_diffusers(d, "sd15.json") == UNET_PRESETS["sd15"]
    for name in ["sd21", "sdxl"]:
        cfg = UNET_PRESETS[name]
        assert weights.unet_config_from_diffusers(weights.unet_config_to_diffusers(cfg), name) == cfg


# -----------------------------------------------------------------------------
# errors name the file and the problem


def test_error_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: no such file"):
        load_unet(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="not a diffusers folder"):
        load_unet(str(tmp_path))


def test_error_not_a_checkpoint(tmp_path):
    for name in ["junk.safetensors", "junk.ckpt"]:
        (tmp_path / name).write_bytes(b"this is not a checkpoint at all" * 10)
        with pytest.raises(ValueError, match=re.escape(name) + ": not a readable"):
            load_unet(str(tmp_path / name))
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="list.ckpt: not a checkpoint"):
        load_unet(str(tmp_path / "list.ckpt"))


class ModelCheckpoint:  # stands in for the Lightning callback pickled into a full LDM training .ckpt
    best = 1.0


def test_error_training_checkpoint_names_the_refused_global(tmp_path):
    sd = {"model.diffusion_model.conv_in.weight": torch.zeros(1)}
    torch.save({"state_dict": sd, "global_step": 470000, "callbacks": {"ModelCheckpoint": ModelCheckpoint()}},
               tmp_path / "full.ckpt")
    with pytest.raises(ValueError) as e:
        load_unet(str(tmp_path / "full.ckpt"))
    msg = str(e.value)
    print(msg)
    assert msg.startswith(str(tmp_path / "full.ckpt") + ": holds pickled Python objects besides the weights")
    assert re.search(r"Unsupported global: GLOBAL \S*ModelCheckpoint", msg) and ".safetensors" in msg
    assert "not a readable" not in msg and len(msg) < 500 + len(str(tmp_path))


def test_error_other_family(tmp_path):
    from safetensors.torch import save_file
    diffusers_vae(VAE_PRESETS["tiny"]).save_pretrained(tmp_path / "vae")
    with pytest.raises(ValueError, match="describes a AutoencoderKL, not a UNet2DConditionModel"):
        load_unet(str(tmp_path / "vae"))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="te.safetensors: no model.diffusion_model"):
        load_unet(str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match="te.safetensors: no first_stage_model"):
        load_vae(str(tmp_path / "te.safetensors"))
    # an SD2-like file read with the SD1-like config: every mismatch is listed
    cfg2 = UNET_PRESETS["tiny-sd2"]
    sd = {"model.diffusion_model." + ldm_unet_key(k, cfg2): v for k, v in diffusers_unet(cfg2).state_dict().items()}
    save_file(sd, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(ValueError, match=r"sd2.safetensors: does not fit UNet: .*shape mismatches [1-9]"):
        load_unet(str(tmp_path / "sd2.safetensors"), config="tiny-sd1")


def test_error_missing_unexpected_and_shape(tmp_path):
    from safetensors.torch import load_file, save_file
    diffusers_unet(UNET_PRESETS["tiny-sd1"]).save_pretrained(tmp_path / "unet")
    path = str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    sd.pop("conv_in.weight")
    sd.pop("conv_out.bias")
    sd["extra.weight"] = torch.ones(1)
    sd["conv_norm_out.weight"] = torch.ones(7)
    save_file(sd, path)
    with pytest.raises(ValueError) as e:
        load_unet(str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(path)
    assert "missing keys 2 (conv_in.weight, conv_out.bias)" in msg
    assert "unexpected keys 1 (extra.weight)" in msg
    assert "conv_norm_out.weight: file (7,) vs model (32,)" in msg


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("timestep_post_act", "silu"),
                                       ("time_embedding_act_fn", "silu")])
def test_error_unsupported_config(key, value, tmp_path):
    d = weights.unet_config_to_diffusers(UNET_PRESETS["tiny-sd1"]) | {key: value}
    os.makedirs(tmp_path / "unet")
    with open(tmp_path / "unet" / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match=rf"config.json: unsupported config {key}='{value}' \(we implement None\)"):
        load_unet(str(tmp_path))


def test_error_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model: not a local path"):
        load_unet("no-such-org/no-such-model")
