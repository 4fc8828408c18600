"""
Losses of Diffusion2GAN (Kang et al. 2024, "Distilling Diffusion Models into Conditional GANs"):
E-LatentLPIPS (Sec. 3.2, Appendix B), the non-saturating GAN losses with R1 (Sec. 3.3), and the other
regression losses of the paper's ablation (Sec. 4).

LatentLPIPS is LPIPS whose VGG16-BN trunk reads Stable Diffusion latents directly: the first conv takes the
latent's channels and the first three max-pools are gone (the latent is already 8x smaller than the image).
The official calibrated weights (`{sd15,sd21,sdxl,sd3,flux}_latest_vgg16_tuned.pth`, from the authors'
elatentlpips package) are licensed CC-BY-NC; this file contains none of their code.
Latents: ours are already in the UNet's scaled space (what the teacher samples and G predicts), which is what
the official weights expect. Raw VAE encoder outputs would first need the encoder's scaling: sd15/sd21 x0.18215,
sdxl x0.13025, sd3 (x-0.0609)*1.5305, flux (x-0.1159)*0.3611.
"""
import math
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# LatentLPIPS (Kang et al. 2024, Sec. 3.2)

# torchvision's vgg16_bn `features`: each int is conv3x3 + BatchNorm + ReLU (3 list entries), 'M' a max-pool.
VGG16 = [1, 1, 'M', 2, 2, 'M', 4, 4, 4, 'M', 8, 8, 8, 'M', 8, 8, 8, 'M']  # channels in units of `width`
SLICE_ENDS = (7, 14, 24, 34, 44)  # each tap is the output of features[:end], i.e. just after a pool position

class Head(nn.Module):
    """LPIPS's per-tap linear head; the dropout only mattered while calibrating on BAPPS and never runs here,
    it is kept so that the checkpoint's `lin{k}.model.1.weight` keys load as they are."""
    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

class LatentLPIPS(nn.Module):
    """LPIPS on latents with a VGG16-BN trunk (Kang et al. 2024, Sec. 3.2). Attribute names equal the official
    checkpoint's keys (`net.slice2.7.weight`, `lin0.model.1.weight`), so weights load without a mapping.
    width=64 is the real trunk; a small width gives a toy one. latent=False keeps all five pools: with
    in_channels=3 this is the image-space VGG16-BN used for pixel LPIPS (weights supplied by the user)."""

    def __init__(self, in_channels=4, width=64, latent=True):
        super().__init__()
        layers, c, pools = [], in_channels, 0
        for v in VGG16:
            if v == 'M':
                # Identity instead of deleting keeps torchvision's indices, which the checkpoint's keys use
                layers.append(nn.Identity() if latent and pools < 3 else nn.MaxPool2d(2, 2))
                pools += 1
            else:
                layers += [nn.Conv2d(c, v * width, 3, padding=1), nn.BatchNorm2d(v * width), nn.ReLU(inplace=True)]
                c = v * width
        self.net = nn.ModuleDict()
        for k, (a, b) in enumerate(zip((0,) + SLICE_ENDS, SLICE_ENDS)):
            self.net[f'slice{k + 1}'] = nn.Sequential()
            for i in range(a, b):
                self.net[f'slice{k + 1}'].add_module(str(i), layers[i])
            setattr(self, f'lin{k}', Head(layers[b - 3].num_features))  # BatchNorm, ReLU, pool end a slice
        # until weights are loaded: torchvision's VGG init, so that a random trunk still passes signal down all
        # 13 layers (PyTorch's default init shrinks it layer by layer), and heads of ones, LPIPS's uncalibrated
        # "baseline" (a plain sum over channels)
        for m in self.net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)
        for k in range(5):
            nn.init.ones_(getattr(self, f'lin{k}').model[1].weight)
        # a fixed metric: never trained, never in train mode (dropout, BatchNorm statistics), no grads to keep
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # a parent's .train() recurses into us; ignoring it keeps the loss from drifting mid-training
        return super().train(False)

    def load(self, path):
        """Strictly load a state dict from `path` (.pth/.pt via torch.load(weights_only=True), or .safetensors),
        on the CPU. Returns self. Every mismatch raises an error naming the file."""
        path = str(path)
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location='cpu', weights_only=True)
        sd = {k.removeprefix('module.'): v for k, v in sd.items()}  # saved from a DDP-wrapped module
        # the official module registers its heads twice (lin{k} and a list lins.{k}); drop the copies
        sd = {k: v for k, v in sd.items() if not k.startswith('lins.')}
        own = self.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        shapes = [f'{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in own if k in sd and sd[k].shape != own[k].shape]
        errors = [f'{len(v)} {name}: {", ".join(v[:5])}{", ..." if len(v) > 5 else ""}'
                  for name, v in (('missing keys', missing), ('unexpected keys', unexpected),
                                  ('shape mismatches', shapes)) if v]
        if errors:
            raise RuntimeError(f'cannot load LatentLPIPS weights from {path}: ' + '; '.join(errors))
        self.load_state_dict(sd)
        return self

    @classmethod
    def from_file(cls, path, latent=True):
        """LatentLPIPS (or, latent=False, the image-space VGG of the pixel-LPIPS ablation) from a local file; a
        .safetensors may carry its trunk's width and input channels in its metadata (the toy trunk does), the
        official .pth files are full width."""
        meta = {}
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, 'pt') as f:
                meta = f.metadata() or {}
        c, width = int(meta.get('in_channels', 4 if latent else 3)), int(meta.get('width', 64))
        return cls(c, width, latent).load(path)

    @classmethod
    def from_pretrained(cls, encoder='sd15'):
        """The authors' calibrated weights (CC-BY-NC) from the Hugging Face hub, for encoder in sd15, sd21,
        sdxl (4-channel latents), sd3, flux (16). Needs internet; tests never call it."""
        from huggingface_hub import hf_hub_download
        path = hf_hub_download('Mingguksky/elatentlpips', f'elatentlpips_ckpt/{encoder}_latest_vgg16_tuned.pth')
        return cls(in_channels=16 if encoder in ('sd3', 'flux') else 4).load(path)

    def features(self, x):
        taps = []
        for s in self.net.values():
            x = s(x)
            taps.append(x)
        return taps

    def forward(self, x0, x1, augment='bg', l1=True, p=1.0, generator=None):
        """E-LatentLPIPS (Kang et al. 2024, Sec. 3.2): LatentLPIPS(T(x0), T(x1)) for one random transform T
        shared by the pair (augment: a preset of `augment_pair`; None for plain LatentLPIPS), plus the per-sample
        mean |x0 - x1| of the un-augmented latents when l1 (on in the official library). Returns shape (B,)."""
        dev = x0.device.type
        # augmentation and L1 in fp32: bf16's 8 bits would put resampling positions up to a third of a pixel
        # off, and near convergence x0 - x1 is small enough to drown in bf16 rounding
        with torch.autocast(dev, enabled=False):
            x0, x1 = x0.float(), x1.float()
            d = (x0 - x1).abs().mean((1, 2, 3)) if l1 else x0.new_zeros(len(x0))
            y0, y1 = augment_pair(x0, x1, augment, p, generator) if augment else (x0, x1)
        # separate passes so that a target without requires_grad (the usual case) costs no backward and
        # saves no activations: 3 trunk passes per step instead of 4
        with torch.set_grad_enabled(torch.is_grad_enabled() and x0.requires_grad):
            f0 = self.features(y0)
        with torch.set_grad_enabled(torch.is_grad_enabled() and x1.requires_grad):
            f1 = self.features(y1)
        for k, (h0, h1) in enumerate(zip(f0, f1)):
            # the trunk may run in bf16, the distance does not: the unit-normalised features of x0 and x1 are
            # nearly equal late in training and their difference would be mostly bf16 rounding
            with torch.autocast(dev, enabled=False):
                h0, h1 = h0.float(), h1.float()
                h0 = h0 / torch.sqrt(h0.square().sum(1, keepdim=True) + 1e-8)  # eps as in (E-Latent)LPIPS
                h1 = h1 / torch.sqrt(h1.square().sum(1, keepdim=True) + 1e-8)
                # clamp at use: a head with negative weights would give negative distances to exploit
                w = getattr(self, f'lin{k}').model[1].weight.float().clamp(min=0).flatten()
                # spatial mean before the 1x1 head: the same number (both are linear), far fewer FLOPs
                d = d + (h0 - h1).square().mean((2, 3)) @ w
        return d

# -----------------------------------------------------------------------------
# Ensemble augmentation (Kang et al. 2024, Appendix B; ADA of Karras et al. 2020 with the official presets)

# Daubechies symlet-6 low-pass filter (sums to sqrt 2): orthogonal, so 2x up- then down-sampling with it is
# exactly the identity and an identity transform changes nothing, while resampling in between stays alias-free
SYM6 = torch.tensor([0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
                     0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
                     -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148])
SYM6_2D = SYM6[:, None] * SYM6[None, :]

def _reflect(u, n):
    """Fold coordinates (int or float) into [0, n-1] like reflect padding (edge not repeated), any distance."""
    return (n - 1) - (u.remainder(2 * (n - 1)) - (n - 1)).abs()

def blit(x, flip, k, t):
    """Exact pixel moves: x-flip (flip: (B,) bool), then k (B,) quarter turns as torch.rot90(x, k, (2, 3)),
    then an integer shift t (B, 2) = (right, down) with reflect padding. Odd k needs a square x."""
    B, C, H, W = x.shape
    i = torch.arange(H, device=x.device).view(1, H, 1)
    j = torch.arange(W, device=x.device).view(1, 1, W)
    # walk back from each output pixel to its source, in doubled centred coordinates: integers even when the
    # centre falls between pixels, so every step is exact
    X = 2 * j - (W - 1) - 2 * t[:, 0].view(B, 1, 1)
    Y = 2 * i - (H - 1) - 2 * t[:, 1].view(B, 1, 1)
    c = ((k == 0).long() - (k == 2).long()).view(B, 1, 1)  # cos and sin of k * 90 degrees
    s = ((k == 1).long() - (k == 3).long()).view(B, 1, 1)
    X, Y = c * X - s * Y, s * X + c * Y
    X = torch.where(flip.view(B, 1, 1), -X, X)
    src = _reflect((Y + H - 1) // 2, H) * W + _reflect((X + W - 1) // 2, W)  # (B, H, W) flat source index
    return x.flatten(2).gather(2, src.view(B, 1, H * W).expand(B, C, H * W)).view_as(x)

def geometric(x, G):
    """Resample x with per-sample affine maps G (B, 2, 3) from output to input pixel coordinates (origin at
    the centre), reflect padding and 2x oversampling with the SYM6 filter (ADA's scheme); size is kept.
    Needs H, W >= 7 (the filter's reflect pad)."""
    B, C, H, W = x.shape
    # non_blocking: a blocking host-to-GPU copy would make the CPU wait for the GPU's whole queue
    f = SYM6_2D.to(x.device, x.dtype, non_blocking=True).expand(C, 1, 12, 12)
    # 2x up: pixel n of `up` sits at input coordinate (n - 5) / 2 - 6 (6: the reflect pad for the filter). The
    # 12-tap filter counts as centred at tap 5, as ADA's up/down-sampling pads it (and so the official library);
    # SYM6 is not symmetric (centre of mass 5.1), and taking tap 5.5 turned rotations about a point 0.2 px off centre
    up = F.conv_transpose2d(F.pad(x, [6] * 4, mode='reflect'), 2 * f, stride=2, groups=C)
    # output samples at 2x: 2H+10 of them, sample n at output coordinate (n - 5) / 2, so that the final
    # stride-2 filter returns exactly H x W pixels
    v = (torch.arange(2 * W + 10, device=x.device) - 5) / 2 - (W - 1) / 2
    u = (torch.arange(2 * H + 10, device=x.device) - 5) / 2 - (H - 1) / 2
    vy, vx = torch.meshgrid(u, v, indexing='ij')
    p = torch.stack([vx, vy, torch.ones_like(vx)], -1).view(1, -1, 3) @ G.transpose(1, 2)  # (B, N, 2)
    # where the 6-pixel pad is still exact (3 pixels out, as far as an identity map reads) sample it, further
    # out fold the coordinate back into the image (reflect padding at any distance); then index into `up`
    fold = lambda q, n: torch.where((q >= -3) & (q <= n + 2), q, _reflect(q, n)) * 2 + 17
    px, py = fold(p[..., 0] + (W - 1) / 2, W), fold(p[..., 1] + (H - 1) / 2, H)
    grid = torch.stack([(2 * px + 1) / up.shape[3] - 1, (2 * py + 1) / up.shape[2] - 1], -1)
    y = F.grid_sample(up, grid.view(B, 2 * H + 10, 2 * W + 10, 2).to(x.dtype), align_corners=False)
    return F.conv2d(y, f / 2, stride=2, groups=C)

def augment_pair(x0, x1, preset='bg', p=1.0, generator=None):
    """Kang et al. 2024, Appendix B: one random, differentiable transform per sample, the same for x0 and x1,
    drawn fresh each call. preset letters as in the official library: b(lit) = x-flip, 90-degree rotations,
    integer shift; g(eometric) = isotropic scale, rotation, anisotropic scale, fractional shift; c(olour) =
    brightness, contrast, saturation; (cut)o(ut). Each op fires with probability p per sample (ADA; the official
    library fixes p=1). Pass a torch.Generator on x0's device for reproducible draws."""
    B, C, H, W = x0.shape
    dev = x0.device
    rand = lambda *s: torch.rand(s, generator=generator, device=dev)
    randn = lambda *s: torch.randn(s, generator=generator, device=dev)
    def gate(v, v0, prob=p):  # v where the op fires, else the identity value v0 (masks, no Python branches)
        return torch.where((rand(B) < prob).view(B, *[1] * (v.dim() - 1)), v, v0)
    # stacking on channels makes every spatial op move x0 and x1 together, with one set of parameters
    x = torch.cat([x0, x1], 1)
    if 'b' in preset:
        k = gate((rand(B) * 4).floor(), 0.0).long()
        k = k if H == W else k // 2 * 2  # quarter turns would change the shape: only 0 or 180 degrees
        t = torch.stack([(rand(B) * 2 - 1) * 0.125 * W, (rand(B) * 2 - 1) * 0.125 * H], 1).round()
        x = blit(x, gate((rand(B) * 2).floor(), 0.0).bool(), k, gate(t, 0.0).long())
    if 'g' in preset:
        z, o = torch.zeros(B, device=dev), torch.ones(B, device=dev)
        mat = lambda *r: torch.stack(r + (z, z, o), 1).view(B, 3, 3)
        rot = lambda a: mat(a.cos(), -a.sin(), z, a.sin(), a.cos(), z)
        p_rot = 1 - math.sqrt(1 - p)  # rotation before and after the anisotropic scale: P(either) = p
        s = gate(torch.exp2(0.2 * randn(B)), 1.0)
        a = gate(torch.exp2(0.2 * randn(B)), 1.0)
        t = gate(0.125 * randn(B, 2), 0.0)
        G = (mat(1 / s, z, z, z, 1 / s, z) @ rot(gate((rand(B) * 2 - 1) * math.pi, 0.0, p_rot))
             @ mat(1 / a, z, z, z, a, z) @ rot(gate((rand(B) * 2 - 1) * math.pi, 0.0, p_rot))
             @ mat(o, z, -t[:, 0] * W, z, o, -t[:, 1] * H))  # inverses of the forward ops, in reverse order
        x = geometric(x, G[:, :2])
    if 'c' in preset:
        v = x.view(B, 2, C, H, W)  # x0 and x1 apart: contrast and saturation pivot on each one's own mean
        v = v + gate(rand(B) - 0.5, 0.0).view(B, 1, 1, 1, 1)
        m = v.mean((2, 3, 4), keepdim=True)
        v = (v - m) * gate(rand(B) + 0.5, 1.0).view(B, 1, 1, 1, 1) + m
        m = v.mean(2, keepdim=True)
        x = ((v - m) * gate(rand(B) * 2, 1.0).view(B, 1, 1, 1, 1) + m).view(B, 2 * C, H, W)
    if 'o' in preset:
        size = gate(torch.full((B,), 0.5, device=dev), 0.0).view(B, 1, 1)
        centre = rand(B, 2).view(B, 2, 1, 1)
        yy = (torch.arange(H, device=dev).view(1, H, 1) + 0.5) / H
        xx = (torch.arange(W, device=dev).view(1, 1, W) + 0.5) / W
        keep = ((xx - centre[:, 0]).abs() >= size / 2) | ((yy - centre[:, 1]).abs() >= size / 2)
        x = x * keep.unsqueeze(1)
    return x[:, :C], x[:, C:]

# -----------------------------------------------------------------------------
# GAN losses (Kang et al. 2024, Sec. 3.3): non-saturating, over D's multiscale heads, with R1

def _heads(logits):
    return logits if isinstance(logits, (list, tuple)) else [logits]

def d_score(logits):
    """D's verdict on each sample, shape (B,): the mean over heads of each head's mean logit, so that every head
    weighs the same whatever its resolution. The GAN losses read logits this way, and R1 penalises this score."""
    return torch.stack([l.float().flatten(1).mean(1) for l in _heads(logits)]).mean(0)

def gan_loss_g(fake_logits):
    """Non-saturating G loss, softplus(-D(fake)), per logit position, combined over D's heads as in d_score."""
    # logits in fp32: softplus of bf16 logits is coarse exactly where D is confident
    return torch.stack([F.softplus(-l.float()).mean() for l in _heads(fake_logits)]).mean()

def gan_loss_d(real_logits, fake_logits, drift=0.0):
    """Non-saturating D loss, softplus(-D(real)) + softplus(D(fake)), heads combined as in gan_loss_g; plus
    drift * (mean of s^2 over the reals + mean of s^2 over the fakes), s = d_score, each sample's score (the drift
    term of Karras et al. 2018, there on reals only; not in Kang et al. 2024). Once D separates its inputs the
    softplus terms have no minimum: their gradient shrinks as the logits grow, and Adam, which divides it by its own
    size, keeps growing them. The drift term puts a minimum where sigmoid(-s) = 2 * drift * s: |s| = 2 at 0.03."""
    real = torch.stack([F.softplus(-l.float()).mean() for l in _heads(real_logits)]).mean()
    fake = torch.stack([F.softplus(l.float()).mean() for l in _heads(fake_logits)]).mean()
    if not drift:
        return real + fake
    return real + fake + drift * (d_score(real_logits).square().mean() + d_score(fake_logits).square().mean())

def r1_penalty(D, x, *cond, gamma=1.0, interval=1):
    """R1 (Mescheder et al. 2018) as used by Kang et al. 2024, Sec. 3.3: gamma/2 * interval * ||d s(x) / dx||^2,
    averaged over the samples given, where s = d_score(D(x, *cond)) is the per-sample score the GAN loss reads
    (as StyleGAN2-ADA penalises the logit its loss reads). Pass one real sample (x[:1], its cond) for the paper's
    single-sample R1, or the whole batch; call it every `interval` D steps (lazy regularisation, hence the factor).
    D(x, *cond) returns a list of logit maps or one; wrap yours in a lambda if its argument order differs. Use the
    uncompiled D: torch.compile does not support the double backward this needs.
    Scaling: s averages P logit positions, so ||ds/dx||^2 shrinks about as 1/P as the latent grows; gamma grows
    with the latent's area to keep the same effect (the SD configs say by how much)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(d_score(D(x, *cond)).sum(), x, create_graph=True)  # sum: each sample's own grad
    return gamma / 2 * interval * grad.float().square().sum((1, 2, 3)).mean()

# -----------------------------------------------------------------------------
# Regression losses of the paper's ablation (Kang et al. 2024, Sec. 4: regression loss only, no GAN)

# LPIPS's input scaling: ImageNet mean and std for images in [-1, 1], what an ImageNet VGG trunk expects
IMAGENET_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
IMAGENET_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

def regression_loss(name, x_hat, x, lpips=None, augment='bg', c=None, decode=None, generator=None):
    """Mean over the batch of the distance between the student's latents x_hat and the teacher's x:
    'l2' (latent MSE); 'pseudo-huber' sqrt(||x_hat - x||^2 + c^2) - c per sample, with the latent flattened and
    c = 0.00054 * sqrt(dim) by default (Song & Dhariwal 2023); 'latent-lpips' (lpips, no augmentation);
    'e-latent-lpips' (lpips with `augment`, the paper's choice; both with lpips's L1 term); 'pixel-lpips' (decode(latent) -> image in
    [-1, 1], then lpips an image-space LatentLPIPS(3, latent=False) with ImageNet VGG16-BN weights)."""
    if name == 'l2':
        return F.mse_loss(x_hat.float(), x.float())
    if name == 'pseudo-huber':
        c = 0.00054 * math.sqrt(x[0].numel()) if c is None else c
        return ((x_hat.float() - x.float()).square().sum((1, 2, 3)) + c * c).sqrt().sub(c).mean()
    if name == 'latent-lpips':
        return lpips(x_hat, x, augment=None).mean()
    if name == 'e-latent-lpips':
        return lpips(x_hat, x, augment=augment, generator=generator).mean()
    if name == 'pixel-lpips':
        with torch.no_grad():  # the target's image needs no graph: decoding is the expensive part
            img = decode(x)
        img_hat = decode(x_hat)
        norm = lambda i: (i.float() - IMAGENET_SHIFT.to(i.device)) / IMAGENET_SCALE.to(i.device)
        return lpips(norm(img_hat), norm(img), augment=None, l1=False).mean()
    raise ValueError(f'unknown regression loss {name!r}')
