"""
The Stable Diffusion UNet and VAE in plain PyTorch, and their loading.

One small config describes SD1.x, SD2.x and SDXL UNets (and the tiny ones used by the toy world and the tests).
Module names equal the keys of diffusers' folders, so a diffusers checkpoint loads with no mapping at all; the
original single-file (LDM) checkpoints load through a short, rule-based key map (see sd-reference.md A4).
Every load is strict: a missing, unexpected or mis-shaped tensor is an error that names the file.

    unet = load_unet("path/to/stable-diffusion-v1-5")        # diffusers folder (or its unet/ subfolder)
    unet = load_unet("v1-5-pruned-emaonly.safetensors")       # original single file
    vae = load_vae("stabilityai/sdxl-vae")                    # hub id, downloaded where there is internet
    save_pretrained(unet, "out/student/unet")                 # diffusers layout, for other tools
"""
import json
import math
import os
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# configs


@dataclass
class UNetConfig:
    in_channels: int = 4  # 4 latent channels; 3 for a pixel-space model
    out_channels: int = 4
    channels: tuple = (320, 640, 1280, 1280)  # width of each resolution level
    layers_per_block: int = 2  # resnets per down level (up levels have one more)
    depth: tuple = (1, 1, 1, 0)  # transformer blocks per attention layer at each level, 0 = no attention
    mid_depth: int = 1  # transformer blocks in the middle block
    heads: tuple = (8, 8, 8, 8)  # attention heads at each level (the mid block uses the last)
    context_dim: int = 768  # width of the text embeddings (cross-attention keys/values)
    linear_proj: bool = False  # SD1: 1x1 conv proj_in/out; SD2/SDXL: Linear
    add_time_dim: int = 0  # SDXL: sinusoid width of each of the 6 time ids (0 = no added embedding)
    add_in_dim: int = 0  # SDXL: pooled text width + 6 * add_time_dim = 2816
    norm_groups: int = 32
    sample_size: int = 64  # latent side the model was trained at (informational)
    upcast_attention: bool = False  # SD2.1-768 flag; SDPA kernels already accumulate in fp32

    def __post_init__(self):  # json gives lists; keep tuples so configs compare equal
        for f in ("channels", "depth", "heads"):
            setattr(self, f, tuple(getattr(self, f)))
        if self.depth[-1] not in (0, self.mid_depth):  # diffusers' config cannot say otherwise
            raise ValueError(f"UNetConfig: the last level's depth {self.depth[-1]} must be 0 or mid_depth")


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple = (128, 256, 512, 512)  # one level per entry; each but the last halves the resolution
    layers_per_block: int = 2  # encoder resnets per level (the decoder has one more)
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # latents are used as scaling_factor * sample
    sample_size: int = 512
    force_upcast: bool = False  # SDXL's VAE overflows in fp16: decode it in fp32

    def __post_init__(self):
        self.channels = tuple(self.channels)


UNET_PRESETS = {
    "sd15": UNetConfig(),
    "sd21": UNetConfig(heads=(5, 10, 20, 20), context_dim=1024, linear_proj=True, sample_size=96, upcast_attention=True),
    "sdxl": UNetConfig(channels=(320, 640, 1280), depth=(0, 2, 10), mid_depth=10, heads=(5, 10, 20), context_dim=2048,
                       linear_proj=True, add_time_dim=256, add_in_dim=2816, sample_size=128),
    # tiny models of each family for tests
    # the toy world's teacher (toy/build.py): 8x8x4 latents, SD1-style, ~1.8M parameters
    "toy": UNetConfig(channels=(32, 64, 64), layers_per_block=1, depth=(1, 1, 1), heads=(2, 2, 2), context_dim=64,
                      norm_groups=8, sample_size=8),
    "tiny-sd1": UNetConfig(channels=(32, 64), depth=(1, 0), heads=(2, 2), context_dim=32, norm_groups=8, sample_size=16),
    "tiny-sd2": UNetConfig(channels=(32, 64), depth=(1, 1), heads=(2, 4), context_dim=48, linear_proj=True,
                           norm_groups=8, sample_size=16),
    "tiny-sdxl": UNetConfig(channels=(32, 64, 64), depth=(0, 1, 2), mid_depth=2, heads=(2, 2, 4), context_dim=64,
                            linear_proj=True, add_time_dim=8, add_in_dim=32 + 6 * 8, norm_groups=8, sample_size=16),
}
VAE_PRESETS = {
    "sd": VAEConfig(),
    "sdxl": VAEConfig(scaling_factor=0.13025, force_upcast=True),
    "tiny": VAEConfig(channels=(32, 64), norm_groups=8, sample_size=32),
    # the toy world (toy/build.py): 32x32 images -> 8x8x4 latents; scaling_factor is measured after training
    "toy": VAEConfig(channels=(16, 32, 64), layers_per_block=1, norm_groups=8, sample_size=32),
}

# -----------------------------------------------------------------------------
# building blocks (names follow the diffusers checkpoint keys)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding in [cos | sin] order with frequencies exp(-ln(max_period) i / (dim/2)), as SD trained."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in, dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, + time embedding, GN-SiLU-conv, + (1x1 shortcut) input. temb_dim=0: the VAE's untimed block."""

    def __init__(self, c_in, c_out, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention through torch's fused scaled_dot_product_attention. x: [B, N, C], context: [B, M, Cc]."""

    def __init__(self, dim, heads, context_dim=None, qkv_bias=False):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # key "to_out.0" (diffusers keeps a dropout at .1)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, N, C = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (a.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for a in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out[0](h.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    """Linear(C, 8C) split into value and gate: value * gelu(gate)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, 8 * dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))  # keys net.0.proj, net.2

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text, and feed-forward, each residual."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, + input (diffusers' Transformer2DModel)."""

    def __init__(self, dim, heads, depth, context_dim, linear_proj, groups):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear_proj else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim) if linear_proj else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_proj:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)
        if self.linear_proj:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear_proj:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)
        if not self.linear_proj:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The VAE pads asymmetrically (right/bottom) and convolves with padding 0."""

    def __init__(self, c, vae=False):
        super().__init__()
        self.vae = vae
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0 if vae else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.vae else x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets, an attention after each (if any), and its resampler (keys down_blocks.i.*)."""

    def __init__(self, resnets, attentions=(), sampler=None, name=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        if name is not None:  # "downsamplers" or "upsamplers", empty at the last level
            setattr(self, name, nn.ModuleList([sampler] if sampler is not None else []))


# -----------------------------------------------------------------------------
# the UNet


class UNet(nn.Module):
    """The SD UNet (diffusers' UNet2DConditionModel for SD1.x, SD2.x and SDXL): eps or v from (x_t, t, text)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        C, L, n = cfg.channels, cfg.layers_per_block, len(cfg.channels)
        temb = 4 * C[0]
        res = lambda a, b: ResnetBlock(a, b, temb, cfg.norm_groups, 1e-5)
        att = lambda c, level, depth: SpatialTransformer(c, cfg.heads[level], depth, cfg.context_dim,
                                                         cfg.linear_proj, cfg.norm_groups)
        self.conv_in = nn.Conv2d(cfg.in_channels, C[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(C[0], temb)
        self.add_embedding = TimestepEmbedding(cfg.add_in_dim, temb) if cfg.add_time_dim else None
        # down path: level i has L resnets (each followed by attention where depth[i] > 0) and a downsampler
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            c_in = C[max(i - 1, 0)]
            self.down_blocks.append(Level(
                [res(c_in if j == 0 else C[i], C[i]) for j in range(L)],
                [att(C[i], i, cfg.depth[i]) for _ in range(L)] if cfg.depth[i] else [],
                Downsample(C[i]) if i < n - 1 else None, "downsamplers"))
        self.mid_block = Level([res(C[-1], C[-1]), res(C[-1], C[-1])], [att(C[-1], n - 1, cfg.mid_depth)])
        # up path, deepest level first: L+1 resnets, each eating one skip from the down path
        skip_ch = [C[0]] + [C[i] for i in range(n) for _ in range(L + (i < n - 1))]  # conv_in, resnets, downsamplers
        self.up_blocks = nn.ModuleList()
        for k, i in enumerate(reversed(range(n))):
            prev = C[min(i + 1, n - 1)]
            self.up_blocks.append(Level(
                [res((prev if j == 0 else C[i]) + skip_ch.pop(), C[i]) for j in range(L + 1)],
                [att(C[i], i, cfg.depth[i]) for _ in range(L + 1)] if cfg.depth[i] else [],
                Upsample(C[i]) if i > 0 else None, name="upsamplers"))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, C[0], eps=1e-5)
        self.conv_out = nn.Conv2d(C[0], cfg.out_channels, 3, padding=1)

    def embed(self, t, batch, pooled=None, time_ids=None):
        """The time embedding (+ SDXL's pooled-text and size/crop embedding), shape [B, 4*C0]; [1, 4*C0] for a
        scalar t without pooled text: one row, broadcast by the resnets. That saves work, and keeps every sample's
        output independent of the batch size (a small GEMM may round its rows differently for other row counts)."""
        t = torch.as_tensor(t, device=self.conv_in.weight.device)
        t = t.expand(batch if pooled is not None else 1) if t.dim() == 0 else t
        emb = self.time_embedding(timestep_embedding(t, self.cfg.channels[0]).to(self.conv_in.weight.dtype))
        if self.add_embedding is not None:
            ids = timestep_embedding(time_ids.flatten(), self.cfg.add_time_dim).reshape(batch, -1)
            emb = emb + self.add_embedding(torch.cat([pooled, ids.to(pooled.dtype)], dim=-1))
        return emb

    def forward(self, x, t, context, pooled=None, time_ids=None):
        """x: [B, C, H, W] noisy latent, t: [B] or scalar timestep, context: [B, M, context_dim] text tokens;
        SDXL also takes pooled: [B, 1280] and time_ids: [B, 6]. Returns the model output (eps or v), like x."""
        emb = self.embed(t, x.shape[0], pooled, time_ids)
        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, emb)
                if len(level.attentions):
                    h = level.attentions[j](h, context)
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)
                skips.append(h)
        h = self.mid_block.resnets[0](h, emb)
        h = self.mid_block.attentions[0](h, context)
        h = self.mid_block.resnets[1](h, emb)
        for level in self.up_blocks:
            for j, resnet in enumerate(level.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if len(level.attentions):
                    h = level.attentions[j](h, context)
            for up in level.upsamplers:
                h = up(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# -----------------------------------------------------------------------------
# the VAE


class VAEAttention(Attention):
    """Single-head self-attention over pixels with its own GroupNorm and residual (the VAE's middle block)."""

    def __init__(self, c, groups):
        super().__init__(c, 1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)
        return x + super().forward(h).transpose(1, 2).reshape(B, C, H, W)


class VAEMid(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, 0, groups, 1e-6), ResnetBlock(c, c, 0, groups, 1e-6)])
        self.attentions = nn.ModuleList([VAEAttention(c, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        C, G, n = cfg.channels, cfg.norm_groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, C[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(
            [ResnetBlock(C[max(i - 1, 0)] if j == 0 else C[i], C[i], 0, G, 1e-6) for j in range(cfg.layers_per_block)],
            [], Downsample(C[i], vae=True) if i < n - 1 else None, "downsamplers") for i in range(n)])
        self.mid_block = VAEMid(C[-1], G)
        self.conv_norm_out = nn.GroupNorm(G, C[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(C[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down_blocks:
            for resnet in level.resnets:
                h = resnet(h)
            for down in level.downsamplers:
                h = down(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        C, G, n = cfg.channels[::-1], cfg.norm_groups, len(cfg.channels)  # deepest level first
        self.conv_in = nn.Conv2d(cfg.latent_channels, C[0], 3, padding=1)
        self.mid_block = VAEMid(C[0], G)
        self.up_blocks = nn.ModuleList([Level(
            [ResnetBlock(C[max(i - 1, 0)] if j == 0 else C[i], C[i], 0, G, 1e-6) for j in range(cfg.layers_per_block + 1)],
            [], Upsample(C[i]) if i < n - 1 else None, name="upsamplers") for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(G, C[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(C[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            for resnet in level.resnets:
                h = resnet(h)
            for up in level.upsamplers:
                h = up(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class VAE(nn.Module):
    """AutoencoderKL. encode: image in [-1, 1] -> (mean, logvar) of the unscaled latent; decode: unscaled latent -> image.
    The diffusion models see scaling_factor * latent (see scale/unscale)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


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
# original single-file (LDM) checkpoints -> diffusers key names (sd-reference.md A4)

RESNET_LDM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
              "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_LDM = {"nin_shortcut": "conv_shortcut", "norm_out": "conv_norm_out", "mid.block_1": "mid_block.resnets.0",
           "mid.block_2": "mid_block.resnets.1", "mid.attn_1.norm": "mid_block.attentions.0.group_norm",
           "mid.attn_1.q": "mid_block.attentions.0.to_q", "mid.attn_1.k": "mid_block.attentions.0.to_k",
           "mid.attn_1.v": "mid_block.attentions.0.to_v", "mid.attn_1.proj_out": "mid_block.attentions.0.to_out.0"}


def unet_key_from_ldm(key, cfg: UNetConfig):
    """One key of model.diffusion_model.* (prefix removed) -> its diffusers name, or None if it is not a UNet key."""
    L, n = cfg.layers_per_block, len(cfg.channels)
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
           "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    for old, new in top.items():
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


def ldm_family(sd):
    """Which SD family an original single-file checkpoint is: 'sd15', 'sd21' or 'sdxl' (sd-reference.md A4)."""
    if any(k.startswith("conditioner.embedders.1.model.") for k in sd):
        return "sdxl"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if key in sd:
        return "sd21" if sd[key].shape[-1] == 1024 else "sd15"
    if "model.diffusion_model.label_emb.0.0.weight" in sd:  # a UNet-only SDXL file
        return "sdxl"
    return "sd15" if any(k.startswith("cond_stage_model.transformer.") for k in sd) else None


# -----------------------------------------------------------------------------
# reading files


def read_safetensors(path):
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for headers it cannot parse
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e})") from None


def read_checkpoint(path):
    """A state dict from a .safetensors, or from a pickle (.ckpt/.pt/.pth/.bin) read with weights_only=True."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's weights_only message puts its one useful line after a long preamble
        m = re.search(r"WeightsUnpickler error: ([^\n]*)", str(e))
        reason = m[1].split(". ")[0] if m else str(e)[-300:]
        if "Unsupported global" in reason:  # e.g. a Lightning training checkpoint, with its callbacks pickled
            raise ValueError(f"{path}: holds pickled Python objects besides the weights, which torch.load refuses "
                             f"with weights_only=True ({reason}); convert the file to .safetensors (where you trust "
                             "it) and load that") from None
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {reason})") from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: not a checkpoint (expected a dict of tensors, found {type(sd).__name__})")
    return sd


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
    from safetensors.torch import save_file
    cfg = unet_config_to_diffusers(model.cfg) if isinstance(model, UNet) else vae_config_to_diffusers(model.cfg)
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = os.path.join(folder, "diffusion_pytorch_model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json.tmp"), "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))


def config_dict(cfg):
    """A config as a plain dict (for checkpoints and logs)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
