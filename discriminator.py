"""
The Diffusion2GAN discriminator D(c, z, x) (Kang et al. 2024, Sec. 3.3): a conditional UNet initialised from the
teacher's weights, that judges a clean latent x (the teacher's ODE output = real, the student's G(z, c) = fake) given
the prompt c (through the UNet's own cross-attention) and the noise z it came from.

What it adds to the teacher UNet, each part a switch for the paper's ablation table:
- z conditioning: z enters through a zero-initialised conv whose output is added to conv_in(x);
- multiscale input: a resized copy of x enters every lower level of the encoder through a zero-initialised 1x1 conv;
- multiscale output: a real/fake logit head before, at and after each skip connection of the decoder (on the
  upsampled features, on the skip features, and on the resnet output that merged them), plus the final output map.
Because the new input branches start at zero, at step 0 D's features equal the teacher UNet's at timestep t_D.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import UNet


def logit_head(c, groups):
    """GroupNorm-SiLU-1x1 conv to one logit per position. The conv starts at zero: D says 'unsure' at step 0."""
    conv = nn.Conv2d(c, 1, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.GroupNorm(groups, c), nn.SiLU(), conv)


def zero_conv(c_in, c_out, k):
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Discriminator(nn.Module):

    def __init__(self, teacher_unet, init="teacher", z_cond=True, ms_input=True, ms_output=True, t_D=0):
        super().__init__()
        cfg = teacher_unet.cfg
        self.t_D, self.ms_output = t_D, ms_output
        self.unet = UNet(cfg)  # the backbone, named like the teacher so its weights copy over one to one
        if init == "teacher":
            self.unet.load_state_dict(teacher_unet.state_dict())
        elif init != "scratch":
            raise ValueError(f"discriminator init must be 'teacher' or 'scratch', not {init!r}")
        del self.unet.conv_norm_out, self.unet.conv_out  # the eps head: D has its own (and DDP refuses unused weights)
        C, G, L = cfg.channels, cfg.norm_groups, cfg.layers_per_block
        self.z_conv = zero_conv(cfg.in_channels, C[0], 3) if z_cond else None
        # one 1x1 conv per lower level, reading x resized to its resolution (added before its first resnet)
        self.x_convs = nn.ModuleList([zero_conv(cfg.in_channels, C[i - 1], 1) for i in range(1, len(C))]) if ms_input else None
        # decoder heads: for each up resnet, on its input h (before), its skip (at) and its output (after)
        heads = []
        skip_ch = [C[0]] + [C[i] for i in range(len(C)) for _ in range(L + (i < len(C) - 1))]
        for i in reversed(range(len(C))):
            for j in range(L + 1):
                before = C[min(i + 1, len(C) - 1)] if j == 0 else C[i]
                heads.append(nn.ModuleList([logit_head(before, G), logit_head(skip_ch.pop(), G), logit_head(C[i], G)]))
        self.heads = nn.ModuleList(heads) if ms_output else None
        self.out_head = logit_head(C[0], G)  # the final output map

    def blocks(self):
        """The backbone's resnets and spatial transformers (UNet.blocks); the heads and input convs are small."""
        return self.unet.blocks()

    def forward(self, x, z, context, pooled=None, time_ids=None):
        """x: clean latent [B,C,H,W], z: its noise [B,C,H,W], context/pooled/time_ids: the prompt, as for the UNet.
        Returns a list of logit maps [B,1,h,w] (the multiscale heads, then the final map)."""
        u = self.unet
        emb = u.embed(torch.tensor(self.t_D), x.shape[0], pooled, time_ids)  # one row unless SDXL
        h = u.conv_in(x)
        if self.z_conv is not None:
            h = h + self.z_conv(z)
        skips, logits = [h], []
        for i, level in enumerate(u.down_blocks):
            if i > 0 and self.x_convs is not None:  # multiscale input, at the top of every lower level
                h = h + self.x_convs[i - 1](F.interpolate(x, size=h.shape[-2:], mode="area"))
            for j, resnet in enumerate(level.resnets):
                h = resnet(h, emb)
                if len(level.attentions):
                    h = level.attentions[j](h, context)
                skips.append(h)
            for down in level.downsamplers:
                h = down(h)
                skips.append(h)
        h = u.mid_block.resnets[0](h, emb)
        h = u.mid_block.attentions[0](h, context)
        h = u.mid_block.resnets[1](h, emb)
        k = 0
        for level in u.up_blocks:
            for j, resnet in enumerate(level.resnets):
                skip = skips.pop()
                before = h
                h = resnet(torch.cat([h, skip], dim=1), emb)
                if len(level.attentions):
                    h = level.attentions[j](h, context)
                if self.heads is not None:  # multiscale output: before, at and after this skip connection
                    logits += [head(f) for head, f in zip(self.heads[k], (before, skip, h))]
                k += 1
            for up in level.upsamplers:
                h = up(h)
        return logits + [self.out_head(h)]
