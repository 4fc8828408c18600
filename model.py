"""
The Stable Diffusion UNet and VAE in plain PyTorch, and the configs that describe them.

One small config describes SD1.x, SD2.x and SDXL UNets (and the tiny ones used by the toy world and the tests).
Module names equal the keys of diffusers' folders, so a diffusers checkpoint loads with no mapping at all
(weights.py reads and writes the files: diffusers folders, original single files, hub ids).

    unet = UNet(UNET_PRESETS["sd15"])             # random weights; weights.load_unet(path) for trained ones
    eps = unet(x_t, t, context)                   # SD1/SD2: context [B, 77, 768 or 1024]
    eps = unet(x_t, t, context, pooled, time_ids) # SDXL: + pooled text [B, 1280] and size/crop ids [B, 6]
"""
import math
from dataclasses import dataclass

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

    def blocks(self):
        """Every resnet and spatial transformer, down path, middle and up path: the units that FSDP shards and that
        activation checkpointing recomputes (train.py); the rest (conv_in/out, embeddings, resamplers) is small."""
        return [b for level in (*self.down_blocks, self.mid_block, *self.up_blocks)
                for b in (*level.resnets, *level.attentions)]

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
