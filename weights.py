"""
Reading and writing weights: our UNet and VAE (model.py) from diffusers folders, original single-file (LDM)
checkpoints and hub ids, and back out as diffusers folders. Every load is strict: a missing, unexpected or mis-shaped
tensor is an error that names the file.

    unet = load_unet("path/to/stable-diffusion-v1-5")        # diffusers folder (or its unet/ subfolder)
    unet = load_unet("v1-5-pruned-emaonly.safetensors")       # original single file
    vae = load_vae("stabilityai/sdxl-vae")                    # hub id, downloaded where there is internet
    save_pretrained(unet, "out/student/unet")                 # diffusers layout, for other tools

Original single files name the UNet's blocks by position (input_blocks.4.1...) where diffusers names them by level
(down_blocks.1.attentions.0...); unet_key_from_ldm and vae_key_from_ldm translate one name at a time, by rule.
"""
import io
import json
import os
import pickle
import re
import shutil
import zlib

import torch
import torch.distributed as dist

from model import UNET_PRESETS, VAE_PRESETS, VAE, UNet, UNetConfig, VAEConfig

# -----------------------------------------------------------------------------
# diffusers config.json <-> our configs

DIFFUSERS_VERSION = "0.42.1"  # the version whose folder layout we write


def check_supported(d, defaults, source):
    """Refuse, naming the field, any config value that changes the architecture in a way we do not implement."""
    for key, value in defaults.items():
        v = d.get(key, value)
        if any(x != value for x in (v if isinstance(v, list) else [v])):
            raise ValueError(f"{source}: unsupported config {key}={v!r} (we implement {value!r})")


def unet_config_from_diffusers(d, source):
    """Our UNetConfig from a diffusers UNet2DConditionModel config.json dict."""
    if d.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{source}: describes a {d['_class_name']}, not a UNet2DConditionModel")
    check_supported(d, dict(act_fn="silu", flip_sin_to_cos=True, freq_shift=0, center_input_sample=False,
                            class_embed_type=None, encoder_hid_dim=None, time_embedding_type="positional",
                            resnet_time_scale_shift="default", mid_block_type="UNetMidBlock2DCrossAttn",
                            dual_cross_attention=False, only_cross_attention=False, num_class_embeds=None,
                            conv_in_kernel=3, conv_out_kernel=3, downsample_padding=1, mid_block_scale_factor=1,
                            norm_eps=1e-5, attention_type="default", reverse_transformer_layers_per_block=None,
                            time_embedding_act_fn=None, timestep_post_act=None),
                    source)
    if d.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(f"{source}: unsupported config addition_embed_type={d['addition_embed_type']!r}")
    n = len(d["block_out_channels"])
    per_level = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * n
    attn = [b.startswith("CrossAttn") for b in d["down_block_types"]]
    if [b.startswith("CrossAttn") for b in d["up_block_types"]] != attn[::-1]:
        raise ValueError(f"{source}: up_block_types do not mirror down_block_types")
    tlpb = per_level(d.get("transformer_layers_per_block", 1))
    if any(isinstance(v, list) for v in tlpb):
        raise ValueError(f"{source}: per-resnet transformer_layers_per_block lists are not supported")
    text_time = d.get("addition_embed_type") == "text_time"
    return UNetConfig(
        in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4), channels=d["block_out_channels"],
        layers_per_block=d.get("layers_per_block", 2), depth=[t if a else 0 for t, a in zip(tlpb, attn)],
        mid_depth=tlpb[-1], heads=per_level(d.get("num_attention_heads") or d.get("attention_head_dim", 8)),
        context_dim=d.get("cross_attention_dim", 768), linear_proj=d.get("use_linear_projection", False),
        add_time_dim=d["addition_time_embed_dim"] if text_time else 0,
        add_in_dim=d["projection_class_embeddings_input_dim"] if text_time else 0,
        norm_groups=d.get("norm_num_groups", 32), sample_size=d.get("sample_size", 64),
        upcast_attention=bool(d.get("upcast_attention", False)))


def unet_config_to_diffusers(c: UNetConfig):
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
            "in_channels": c.in_channels, "out_channels": c.out_channels, "block_out_channels": list(c.channels),
            "layers_per_block": c.layers_per_block,
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in c.depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in c.depth[::-1]],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            # diffusers gives the mid block the last level's value (levels without attention ignore theirs)
            "transformer_layers_per_block": [d or 1 for d in c.depth[:-1]] + [c.mid_depth],
            "attention_head_dim": list(c.heads),  # diffusers' name for the number of heads
            "cross_attention_dim": c.context_dim, "use_linear_projection": c.linear_proj,
            "norm_num_groups": c.norm_groups, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True,
            "freq_shift": 0, "sample_size": c.sample_size, "upcast_attention": c.upcast_attention,
            "addition_embed_type": "text_time" if c.add_time_dim else None,
            "addition_time_embed_dim": c.add_time_dim or None,
            "projection_class_embeddings_input_dim": c.add_in_dim or None}


def vae_config_from_diffusers(d, source):
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{source}: describes a {d['_class_name']}, not an AutoencoderKL")
    check_supported(d, dict(act_fn="silu", use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
                            shift_factor=None, latents_mean=None), source)
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     latent_channels=d.get("latent_channels", 4), channels=d["block_out_channels"],
                     layers_per_block=d.get("layers_per_block", 2), norm_groups=d.get("norm_num_groups", 32),
                     scaling_factor=d.get("scaling_factor") or 0.18215, sample_size=d.get("sample_size", 512),
                     force_upcast=d.get("force_upcast", False))


def vae_config_to_diffusers(c: VAEConfig):
    n = len(c.channels)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "latent_channels": c.latent_channels, "block_out_channels": list(c.channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_groups, "act_fn": "silu",
            "scaling_factor": c.scaling_factor, "sample_size": c.sample_size, "force_upcast": c.force_upcast}


# -----------------------------------------------------------------------------
# original single-file (LDM) checkpoints <-> diffusers key names: the UNet under model.diffusion_model., the VAE
# under first_stage_model., SD1's text encoder under cond_stage_model.transformer., SD2's OpenCLIP one under
# cond_stage_model.model., SDXL's two under conditioner.embedders.0 and .1 (text encoders: teacher.py). Each
# *_from_ldm rule is followed by its inverse *_to_ldm, which sample.py --export uses to write a single file.

RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
              "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_LDM = {"nin_shortcut": "conv_shortcut", "norm_out": "conv_norm_out", "mid.block_1": "mid_block.resnets.0",
           "mid.block_2": "mid_block.resnets.1", "mid.attn_1.norm": "mid_block.attentions.0.group_norm",
           "mid.attn_1.q": "mid_block.attentions.0.to_q", "mid.attn_1.k": "mid_block.attentions.0.to_k",
           "mid.attn_1.v": "mid_block.attentions.0.to_v", "mid.attn_1.proj_out": "mid_block.attentions.0.to_out.0"}


UNET_LDM = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def unet_key_from_ldm(key, cfg: UNetConfig):
    """One key of model.diffusion_model.* (prefix removed) -> its diffusers name, or None if it is not a UNet key."""
    L, n = cfg.layers_per_block, len(cfg.channels)
    for old, new in UNET_LDM.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    m = re.match(r"middle_block\.(\d)\.(.*)", key)
    if m:  # resnet, attention, resnet
        block = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"][int(m[1])]
        rest, is_resnet = m[2], m[1] != "1"
    elif m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        i, j, rest = (int(m[1]) - 1) // (L + 1), (int(m[1]) - 1) % (L + 1), m[3]
        if j == L:  # the level's last block is its downsampler, at .0.op
            return f"down_blocks.{i}.downsamplers.0.conv" + rest[len("op"):]
        is_resnet = m[2] == "0"
        block = f"down_blocks.{i}.resnets.{j}" if is_resnet else f"down_blocks.{i}.attentions.{j}"
    elif m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        i, j, b, rest = int(m[1]) // (L + 1), int(m[1]) % (L + 1), int(m[2]), m[3]
        has_attn = cfg.depth[n - 1 - i] > 0
        if b == 0:
            block, is_resnet = f"up_blocks.{i}.resnets.{j}", True
        elif b == 1 and has_attn:
            block, is_resnet = f"up_blocks.{i}.attentions.{j}", False
        else:  # the upsampler follows the level's last resnet (and attention): .1.conv or .2.conv
            return f"up_blocks.{i}.upsamplers.0.{rest}"
    else:
        return None
    if is_resnet:
        for old, new in RESNET_LDM.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
    return f"{block}.{rest}"


def unet_key_to_ldm(key, cfg: UNetConfig):
    """The inverse of unet_key_from_ldm: one diffusers UNet key -> its name under model.diffusion_model. LDM numbers
    the blocks in one sequence per half: L resnets (each with its attention) and a resampler per level."""
    L, n = cfg.layers_per_block, len(cfg.channels)
    for old, new in UNET_LDM.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    resnet = lambda rest: next((old + rest[len(new):] for old, new in RESNET_LDM.items() if rest.startswith(new + ".")),
                               rest)
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d)\.(.*)", key):  # resnet, attention, resnet
        return f"middle_block.1.{m[3]}" if m[1] == "attentions" else f"middle_block.{2 * int(m[2])}.{resnet(m[3])}"
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, j = int(m[2]), int(m[4])
        block = 1 + i * (L + 1) + j if m[1] == "down" else i * (L + 1) + j  # input_blocks.0 is conv_in
        rest = f"0.{resnet(m[5])}" if m[3] == "resnets" else f"1.{m[5]}"
        return f"{'input' if m[1] == 'down' else 'output'}_blocks.{block}.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):  # a level's last input block
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):  # after the last resnet (and its attention)
        i = int(m[1])
        return f"output_blocks.{i * (L + 1) + L}.{2 if cfg.depth[n - 1 - i] else 1}.{m[2]}"
    return None


def vae_key_from_ldm(key, cfg: VAEConfig):
    """One key of first_stage_model.* (prefix removed) -> its diffusers name. The LDM decoder counts levels upward."""
    n = len(cfg.channels)
    key = re.sub(r"encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.", key)
    key = re.sub(r"decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.", key)
    for old, new in VAE_LDM.items():
        key = key.replace("." + old + ".", "." + new + ".")
    return key


def vae_key_to_ldm(key, cfg: VAEConfig):
    """The inverse of vae_key_from_ldm: one diffusers VAE key -> its name under first_stage_model."""
    n = len(cfg.channels)
    for old, new in VAE_LDM.items():
        key = key.replace("." + new + ".", "." + old + ".")
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    up = lambda m: f"decoder.up.{n - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}."
    return re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", up, key)


def from_ldm(sd, prefix, convert, cfg):
    """Take the tensors under `prefix`, rename them with `convert`, squeeze LDM's 1x1-conv attention weights."""
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            new = convert(k[len(prefix):], cfg)
            if new is None:
                new = "<unmapped>." + k
            if v.dim() == 4 and re.search(r"attentions\.0\.to_(q|k|v|out\.0)\.weight$", new) and "mid_block" in new:
                v = v[:, :, 0, 0]  # VAE attention: LDM 1x1 conv -> diffusers Linear
            out[new] = v
    return out


def to_ldm(sd, prefix, convert, cfg):
    """The inverse of from_ldm: rename a diffusers state dict with `convert`, prefix it, and store the VAE's attention
    Linears as the 1x1 convs of LDM. A key with no LDM name is a bug in the rules, not in the model: stop."""
    out = {}
    for k, v in sd.items():
        new = convert(k, cfg)
        if new is None:
            raise ValueError(f"{k}: no original (LDM) name for this key (weights.py's *_to_ldm rules miss it); "
                             "export a diffusers folder instead (--export=DIR)")
        if re.search(r"mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight$", k) and v.dim() == 2:
            v = v[:, :, None, None]
        out[prefix + new] = v
    return out


def ldm_family(sd):
    """Which SD family an original single-file checkpoint is: 'sd15', 'sd21' or 'sdxl', told apart by the text
    encoders' keys, or in a UNet-only file by the width of the first cross-attention's keys (768 SD1, 1024 SD2)."""
    if any(k.startswith("conditioner.embedders.1.model.") for k in sd):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in sd):  # OpenCLIP text encoder: SD2 at any width
        return "sd21"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key in sd:
        return "sd21" if sd[key].shape[-1] == 1024 else "sd15"
    if "model.diffusion_model.label_emb.0.0.weight" in sd:  # a UNet-only SDXL file
        return "sdxl"
    return "sd15" if any(k.startswith("cond_stage_model.transformer.") for k in sd) else None


# -----------------------------------------------------------------------------
# reading files


SAFETENSORS_DAMAGED = "the file is cut short or damaged: copy or download it again"


def read_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for headers it cannot parse
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e}); "
                         + SAFETENSORS_DAMAGED) from None


def check_safetensors(path):
    """Read only the header of a safetensors file, which lists every tensor's byte range: a file cut short fails
    here, in a fraction of a second, with a message that names it."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt"):
            pass
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); "
                         + SAFETENSORS_DAMAGED) from None


def write_safetensors(sd, path, metadata=None):
    """Write tensors to path atomically: a temporary name, then a rename, so a crash never leaves a file that looks
    complete."""
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, path + ".tmp",
              metadata={"format": "pt", **(metadata or {})})
    os.replace(path + ".tmp", path)


def unpickling_reason(e):
    """The one sentence that says why torch.load(weights_only=True) stopped, from the paragraphs around it (which
    differ by torch version and advise weights_only=False: never repeated here)."""
    text = str(e).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not any(w in line for w in ("weights_only", "torch.load", "Weights only load"))]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__


def read_checkpoint(path):
    """A state dict from a .safetensors, or from a pickle (.ckpt/.pt/.pth/.bin) read with weights_only=True: a pickle
    that would build Python objects or call functions (a training checkpoint's callbacks, or a malicious file) is
    refused before anything in it runs."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = unpickling_reason(e)
        if "GLOBAL" in reason:  # e.g. a Lightning training checkpoint with its callbacks, or a call of os.system
            fix = ("It calls into a module that torch blocks outright (os, subprocess, ...): treat the file as "
                   "malicious and use a .safetensors copy of the model" if "is blocked" in reason else
                   "Use a .safetensors copy of the model, or convert this file to .safetensors where you trust it")
            raise ValueError(f"{path}: holds pickled Python objects besides the weights, which torch.load refuses "
                             f"with weights_only=True ({reason}); nothing in the file was run. {fix}") from None
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason}); nothing in the file was "
                         "run. It is damaged, or not a torch.save file: use a .safetensors copy of the model") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not a checkpoint (expected a dict of tensors, found {type(sd).__name__})")
    return sd



# -----------------------------------------------------------------------------
# train.py's checkpoints: one file, every tensor with its CRC-32, the one it replaced kept beside it


def _tensors(obj, prefix=""):
    """(name, tensor) for every tensor in nested dicts and lists, named by path: 'G.conv_in.weight', 'opt_g.state.3.exp_avg'."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def _crc32(t):
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def save_checkpoint(ckpt, path):
    """Write ckpt (nested dicts of tensors, numbers and strings) to path with every tensor's CRC-32 in it ('crc32'):
    to a temporary name, flushed to disk, then renamed, so a crash never leaves a half file under the name; the
    checkpoint it replaces is kept as path.prev, so a damaged one always has a good one beside it."""
    ckpt = dict(ckpt, crc32={name: _crc32(t) for name, t in _tensors(ckpt)})
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power cut cannot leave an empty file under the name
    if os.path.exists(path):
        os.replace(path, path + ".prev")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, read with weights_only=True (a pickle never runs code) and every tensor
    checked against its CRC-32. Anything wrong is a ValueError of one line naming the file and the damage."""
    prev = f"; the checkpoint before it is {path}.prev" if os.path.exists(path + ".prev") else ""
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the checkpoint is empty{prev}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own messages are long and, for a blocked pickle, advise weights_only=False
        what = ("holds pickled Python objects, which were refused unread" if "Unsupported global" in str(e)
                else "is cut short or is not a checkpoint")
        raise ValueError(f"{path}: the file {what} ({type(e).__name__}){prev}") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise ValueError(f"{path}: not a train.py checkpoint (found {type(ckpt).__name__} without a step){prev}")
    sums = ckpt.pop("crc32", None)
    if sums is None:
        print(f"{path}: written before checkpoints carried checksums; its tensors are loaded unchecked")
        return ckpt
    found = dict(_tensors(ckpt))
    for name in sorted(set(sums) | set(found)):
        if name not in found or name not in sums or _crc32(found[name]) != sums[name]:
            what = "is missing" if name not in found else "has no checksum" if name not in sums else "fails its checksum"
            raise ValueError(f"{path}: tensor {name} {what}: the checkpoint is damaged{prev}")
    return ckpt

def weight_files(stem, variant=None):
    """The names diffusers and transformers give a model's safetensors weights: one file, its index if sharded,
    and the shards (for variant fp16: stem.fp16.safetensors, stem.safetensors.index.fp16.json, stem.fp16-*-of-*)."""
    v = f".{variant}" if variant else ""
    return [f"{stem}{v}.safetensors", f"{stem}.safetensors.index{v}.json", f"{stem}{v}-*-of-*.safetensors"]


def read_folder_weights(folder, variant=None):
    """All tensors of a diffusers model folder: one safetensors file, or shards listed in an index.json. The
    requested variant first, then the plain weights, then fp16 ones."""
    for v in [variant, None, "fp16"]:
        file, index, _ = (os.path.join(folder, name) for name in weight_files("diffusion_pytorch_model", v))
        if os.path.exists(file):
            return read_safetensors(file), file
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(read_safetensors(os.path.join(folder, shard)))
            return sd, index
    found = sorted(os.listdir(folder))
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model[.fp16].safetensors (or sharded index) here; "
                            f"found {found[:10]}" + (" (.bin pickles are not read: convert them to safetensors)"
                                                     if any(f.endswith(".bin") for f in found) else ""))


def hub_snapshot(repo_id, patterns):
    """The local folder of the files of a hub repo that match patterns, downloaded if needed (needs internet)."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise FileNotFoundError(f"{repo_id}: not a local path, and downloading it from the hub failed "
                                f"({type(e).__name__}: {str(e)[:300]})") from None


def hub_folder(repo_id, subfolder, variant=None):
    """Download only config.json and the variant's safetensors of one subfolder of a pipeline repo, or of a model
    repo's top level (stabilityai/sdxl-vae)."""
    files = ["config.json"] + weight_files("diffusion_pytorch_model", variant)
    root = hub_snapshot(repo_id, files + [f"{subfolder}/{f}" for f in files])
    return os.path.join(root, subfolder) if os.path.isdir(os.path.join(root, subfolder)) else root


def load_strict(model, sd, source, dtype=None):
    """Copy sd into model; every key must match in name and shape, else an error naming the file and listing them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        show = lambda xs: f"{len(xs)} (" + ", ".join(xs[:5]) + (", ..." if len(xs) > 5 else "") + ")"
        raise ValueError(f"{source}: does not fit {type(model).__name__}: missing keys {show(missing)}; unexpected keys "
                         f"{show(unexpected)}; shape mismatches {show(shapes)}")
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model


def _build(cls, cfg, sd, source, dtype):
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        model = cls(cfg)
    return load_strict(model, sd, source, dtype).eval()


def _resolve(path, sub, variant=None):
    """A diffusers model folder for `sub` ('unet' or 'vae'): the pipeline root, the subfolder itself, or a hub id."""
    if os.path.isdir(path):
        folder = os.path.join(path, sub) if os.path.isdir(os.path.join(path, sub)) else path
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise FileNotFoundError(f"{path}: no {sub}/config.json or config.json here: not a diffusers folder")
        return folder
    if os.path.exists(path):
        return None  # a single file
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        return hub_folder(path, sub, variant)
    raise FileNotFoundError(f"{path}: no such file or folder (and not a hub id like org/name)")


def _from_folder(folder, cls, config, from_diffusers, dtype, variant):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = config or from_diffusers(json.load(f), os.path.join(folder, "config.json"))
    sd, source = read_folder_weights(folder, variant)
    return _build(cls, cfg, sd, source, dtype)


def _single_file(path, prefix, sd=None):
    """The state dict of an original single file (read here unless given), checked to hold the part under `prefix`."""
    sd = read_checkpoint(path) if sd is None else sd
    if not any(k.startswith(prefix) for k in sd):
        raise ValueError(f"{path}: no {prefix}* keys: not an original Stable Diffusion checkpoint "
                         f"(first keys: {list(sd)[:3]})")
    return sd


def load_unet(path, config=None, dtype=torch.float32, variant=None, sd=None):
    """The UNet from a diffusers folder, a single file (.safetensors/.ckpt) or a hub id. For a single file the
    config is the preset of the detected family (or the UNetConfig/preset name you give); sd= the file's state dict
    if you have already read it."""
    config = UNET_PRESETS[config] if isinstance(config, str) else config
    folder = _resolve(path, "unet", variant)
    if folder is not None:
        return _from_folder(folder, UNet, config, unet_config_from_diffusers, dtype, variant)
    sd = _single_file(path, "model.diffusion_model.", sd)
    cfg = config or UNET_PRESETS.get(ldm_family(sd))
    if cfg is None:
        raise ValueError(f"{path}: not an SD1/SD2/SDXL UNet (no SD-style input_blocks; an SD3/FLUX transformer?); "
                         "if it is a UNet of ours, pass config=")
    return _build(UNet, cfg, from_ldm(sd, "model.diffusion_model.", unet_key_from_ldm, cfg), path, dtype)


def load_vae(path, config=None, dtype=torch.float32, variant=None, sd=None):
    """The VAE from a diffusers folder, a single file or a hub id (see load_unet)."""
    config = VAE_PRESETS[config] if isinstance(config, str) else config
    folder = _resolve(path, "vae", variant)
    if folder is not None:
        return _from_folder(folder, VAE, config, vae_config_from_diffusers, dtype, variant)
    sd = _single_file(path, "first_stage_model.", sd)
    cfg = config or VAE_PRESETS["sdxl" if ldm_family(sd) == "sdxl" else "sd"]
    return _build(VAE, cfg, from_ldm(sd, "first_stage_model.", vae_key_from_ldm, cfg), path, dtype)


def save_pretrained(model, folder):
    """Write our UNet or VAE as a diffusers model folder (config.json + diffusion_pytorch_model.safetensors),
    each file written to a temporary name and renamed, so a crash never leaves a file that looks complete."""
    cfg = unet_config_to_diffusers(model.cfg) if isinstance(model, UNet) else vae_config_to_diffusers(model.cfg)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(model.state_dict(), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json.tmp"), "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))


# -----------------------------------------------------------------------------
# train.py's sharded checkpoints (parallel=fsdp): a folder that every rank writes its shards into with
# torch.distributed.checkpoint (DCP: __<rank>_0.distcp files and a .metadata index), which any number of processes can
# read back. It holds tensors only; meta.json, written last, holds the step, config and scaler and every file's CRC-32:
# a folder without it is a save that never finished. Written as path.tmp and renamed into place, the previous one
# kept as path.prev.

SHARDED_META = "meta.json"
DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "WindowsPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


def _file_crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 26):
            crc = zlib.crc32(chunk, crc)
    return crc


def sharded_meta(path):
    """The meta.json of a complete sharded checkpoint folder, or None (no folder, or a save that never finished)."""
    try:
        with open(os.path.join(path, SHARDED_META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def finish_sharded_save(path):
    """A save killed between its two renames leaves path.prev and a complete path.tmp but no path: finish it.
    (One process, before the others look.)"""
    if not os.path.exists(path) and sharded_meta(path + ".tmp") is not None:
        os.replace(path + ".tmp", path)


def save_sharded_checkpoint(state, meta, path):
    """Every rank calls this with its state (nested dicts of tensors: DTensor shards or whole tensors, which DCP
    writes once) and the same meta (JSON). Non-tensor values are refused: DCP would pickle them."""
    import torch.distributed.checkpoint as dcp
    if bad := [name for name, v in _leaves(state) if not torch.is_tensor(v)]:
        raise TypeError(f"save_sharded_checkpoint: {bad[:3]} are not tensors (put numbers and text in meta)")
    rank, tmp = dist.get_rank(), path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)  # every rank writes (and fsyncs) its own file; rank 0 the index, last
    mine = {f: _file_crc32(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.startswith(f"__{rank}_")}
    sums = [None] * dist.get_world_size()
    dist.all_gather_object(sums, mine)
    if rank == 0:
        files = {f: crc for s in sums for f, crc in s.items()}
        files[".metadata"] = _file_crc32(os.path.join(tmp, ".metadata"))
        with open(os.path.join(tmp, SHARDED_META), "w") as f:
            json.dump(dict(meta, files=files), f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # complete on disk before the renames make it the checkpoint
        if os.path.exists(path):
            shutil.rmtree(path + ".prev", ignore_errors=True)
            os.replace(path, path + ".prev")
        os.replace(tmp, path)
    dist.barrier()


def _leaves(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, obj


class _DCPMetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata index is a pickle: read it only if it names DCP's own classes, torch.Size and dtypes, so that a
    planted file cannot run code (as torch.load's weights_only=True refuses for ckpt.pt)."""

    def find_class(self, module, name):
        if ((module == "torch.distributed.checkpoint.metadata" and name != "BytesStorageMetadata")
                or (module, name) in DCP_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise ValueError(f"{module}.{name}")


def check_sharded_checkpoint(path):
    """meta.json of the sharded checkpoint at path, after checking this process's share of its files against their
    CRC-32 (under torch.distributed every rank checks every world-th file, and all learn the verdict) and that its
    index holds no pickled code. Anything wrong is a ValueError of one line naming the folder and the damage."""
    prev = f"; the checkpoint before it is {path}.prev" if os.path.exists(path + ".prev") else ""
    meta = sharded_meta(path)
    if meta is None:
        raise ValueError(f"{path}: no readable {SHARDED_META}: not a complete sharded checkpoint{prev}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    errors = []
    for f in sorted(meta["files"])[rank::world]:
        file = os.path.join(path, f)
        if not os.path.exists(file):
            errors.append(f"file {f} is missing")
        elif _file_crc32(file) != meta["files"][f]:
            errors.append(f"file {f} fails its checksum")
        elif f == ".metadata":
            try:
                with open(file, "rb") as fh:
                    _DCPMetadataUnpickler(io.BytesIO(fh.read())).load()
            except Exception as e:
                errors.append(f"its index .metadata holds pickled Python objects besides DCP's ({e}), refused unread")
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, errors)
        errors = [e for es in every for e in es]
    if errors:
        raise ValueError(f"{path}: {errors[0]}: the checkpoint is damaged{prev}")
    return meta


def load_sharded_checkpoint(state, path):
    """Fill state (nested dicts of tensors, as save_sharded_checkpoint was given them, at any world size; a plain
    process reads whole tensors) in place from a checked sharded checkpoint; returns its meta."""
    import warnings

    import torch.distributed.checkpoint as dcp
    meta = check_sharded_checkpoint(path)
    with warnings.catch_warnings():  # DCP warns that a plain process reads alone: that is what it is asked to do
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    return meta


def read_sharded_part(path, part):
    """(state dict, meta) of one part of a sharded checkpoint ('G', 'ema', 'D') as whole tensors, read by one plain
    process: what sample.py, --export and eval.py read. The tensors' shapes come from the checkpoint's own index."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    meta = check_sharded_checkpoint(path)  # before the index is unpickled below
    index = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    sd = {k[len(part) + 1:]: torch.empty(v.size, dtype=v.properties.dtype) for k, v in index.items()
          if k.startswith(part + ".") and isinstance(v, TensorStorageMetadata)}
    if not sd:
        raise ValueError(f"{path}: holds no {part}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled")
        dcp.load({part: sd}, checkpoint_id=path, no_dist=not dist.is_initialized())
    return sd, meta
