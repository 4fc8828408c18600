"""
Speed benchmarks, one section per --what (several, comma-separated, share one process and one compiled UNet).
Compare numbers only within one run on one machine.

    python bench.py --what=elpips                  # E-LatentLPIPS forward+backward, batch 8, 4x64x64 latents
    python bench.py --what=elpips --compile=True --batch=32
    python bench.py --what=elpips --augment=''    # plain LatentLPIPS, no augmentation
    python bench.py --what=onestep,pairs --compile=True --batch=16  # text + UNet + VAE decode at 512 px, batch 1;
                                                   # the UNet at batch 2x16; DDIM-50 + CFG 3 pairs/s at batch 16
    python bench.py --what=train --batch=8         # train.py's step at SD1.5 size: img/s, MFU, peak memory
    python bench.py --what=train --batch=8 --activation_checkpointing=True --optim_dtype=bfloat16 --ema_cpu=True
                                                   # the same with train.py's memory modes (README.md, Memory)
    python bench.py --what=onestep --unet=tiny-sd1 --vae=tiny   # any section on tiny models: try it on a CPU

onestep, pairs and train use random weights of the SD1.5 shapes (model.py presets and a CLIP-L text tower).
onestep and pairs cast them to the dtype as an inference user would, so they compare with diffusers' own timings
(bench.md; the targets: one step at most 0.5x diffusers' time, pairs at least 1.3x
its pairs/s). train repeats train.py's step with its defaults (fp32 master weights, autocast, D on 2B + mix-and-
match fakes, E-LatentLPIPS, G's adversarial term, grad clipping, EMA; R1 timed apart and amortised over its
interval); its FLOPs are counted once by torch's FLOP counter and MFU divides by --peak_tflops.

Runs on cuda if there is one (bf16 autocast), else on the CPU (fp32). The README's Speed section has the sections
measured on an H200 and an H100 beside the peers, with the commands; the paper gives 12.1 ms per iteration for
E-LatentLPIPS on an A100 (Kang et al. 2024, Sec. 3.2).
"""
import copy
import functools
import time

import torch

import model

# knobs (configurator.py: --key=value)
what = 'elpips'  # sections, comma-separated: elpips, onestep, pairs, train
batch = 8  # batch size (onestep: the UNet's second batch is 2x this, a CFG batch; pairs: images per DDIM run)
unet = 'sd15'  # onestep, pairs, train: model.py UNet preset
vae = 'sd'  # onestep: model.py VAE preset
steps = 50  # pairs: DDIM steps (guidance 3)
size = 64  # elpips: latent side (64 is SD1.5 at 512 px; the other sections use the UNet preset's)
augment = 'bg'  # elpips, train: augmentation preset of losses.augment_pair, '' for none
r1_interval = 1  # train: R1's cost is divided by this (train.py's default: every step)
peak_tflops = 989.0  # train: the GPU's dense bf16 peak for MFU (989: H100 SXM and H200)
dtype = ''  # 'float32' or 'bfloat16'; default bfloat16 on cuda, float32 on cpu
dtype_g = ''  # train: G's autocast, as train.py's dtype_g; default float16 on cuda (with loss scaling), else dtype
compile = False  # torch.compile the modules under test (static shapes: one graph per batch size)
mode = 'default'  # torch.compile mode: default | reduce-overhead (CUDA graphs, for batch-1 latency) | max-autotune
channels_last = False  # onestep, pairs: weights and latents in channels_last memory format (the diffusers peer's)
compile_text = False  # onestep: torch.compile the text tower too (with --compile=True; its batch-1 call is launches)
betas = (0.9, 0.99)  # train: G's Adam betas, train.py's defaults (they do not change the step's cost)
betas_d = (0.0, 0.99)  # train: D's Adam betas, train.py's defaults
fused_adamw = True  # train: fused AdamW on cuda, as train.py (False: PyTorch's default foreach, as run 1)
activation_checkpointing = False  # train: train.py's memory modes (README.md, Memory): recompute each UNet block,
optim_dtype = 'float32'  # Adam's moments in float32, bfloat16 or 8bit (bitsandbytes),
ema_cpu = False  # and the EMA in CPU memory
warmup = 3  # untimed iterations first (compilation happens here)
iters = 10  # timed iterations
from configurator import configure  # noqa: E402

configure(globals())
sections = what.split(',')
if unknown := [s for s in sections if s not in ('elpips', 'onestep', 'pairs', 'train')]:
    raise SystemExit(f"--what={what!r}: unknown section(s) {unknown}; the sections are: elpips, onestep, pairs, train")
cfg = model.UNET_PRESETS.get(unet)  # the UNet of onestep, pairs and train
if cfg is None or cfg.add_in_dim:
    sd12 = [k for k, c in model.UNET_PRESETS.items() if not c.add_in_dim]
    raise SystemExit(f"--unet={unet!r}: the sections time SD1/SD2-shaped model.py presets: {', '.join(sd12)}")

device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = getattr(torch, dtype or ('bfloat16' if device == 'cuda' else 'float32'))
ctx = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
dtype_g = getattr(torch, dtype_g or ('float16' if device == 'cuda' else str(dtype).removeprefix('torch.')))
ctx_g = torch.autocast(device, dtype=dtype_g, enabled=dtype_g != torch.float32)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(0)
compiled = lambda m: torch.compile(m, dynamic=False, mode=mode) if compile else m  # noqa: E731
run = f"{device} {str(dtype).removeprefix('torch.')} | compile {compile}" + (f" ({mode})" if compile else "")


def timed(step):
    """Milliseconds per call of step(), after warmup, with the GPU's queue drained at both ends."""
    for _ in range(warmup):
        step()
    if device == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1000


def text_tower(width):
    """A random CLIP text tower of the width the UNet's cross-attention reads: CLIP-L (12 layers) for SD1,
    OpenCLIP-H's 23 used layers for SD2, 2 layers for the tiny presets."""
    from transformers import CLIPTextConfig, CLIPTextModel
    layers, heads = {768: (12, 12), 1024: (23, 16)}.get(width, (2, 2))
    return CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, max_position_embeddings=77,
                                       num_hidden_layers=layers, num_attention_heads=heads, projection_dim=width,
                                       hidden_act='quick_gelu')).to(device).eval().requires_grad_(False)


# -----------------------------------------------------------------------------
if 'elpips' in sections:
    from losses import LatentLPIPS
    lpips = LatentLPIPS().to(device)  # the full-width trunk; random weights time the same as the official ones
    loss_fn = compiled(lpips)
    # as in training: the student's latents need a gradient, the teacher's target does not
    x_hat = torch.randn(batch, 4, size, size, device=device, requires_grad=True)
    x = torch.randn(batch, 4, size, size, device=device)

    def step():
        with ctx:
            loss = loss_fn(x_hat, x, augment=augment or None).mean()
        loss.backward()
        x_hat.grad = None

    print(f"E-LatentLPIPS fwd+bwd | augment {augment or 'none'} | batch {batch} | 4x{size}x{size} | {run}"
          f" | {timed(step):.1f} ms")

if 'onestep' in sections or 'pairs' in sections:
    from teacher import ddim_sample, make_alphas_cumprod
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.device(device):
        g = model.UNet(cfg).to(dtype).eval().requires_grad_(False).to(memory_format=fmt)
    text = text_tower(cfg.context_dim).to(dtype)
    net, n, tag = compiled(g), cfg.sample_size, f"{unet} | {run}" + (" | channels_last" if channels_last else "")
    with torch.no_grad():
        if 'onestep' in sections:
            with torch.device(device):
                v = model.VAE(model.VAE_PRESETS[vae]).to(dtype).eval().requires_grad_(False).to(memory_format=fmt)
            decode = compiled(v.decode)
            ids = torch.randint(0, 49408, (1, 77), device=device)
            t = torch.tensor(999, device=device)
            for b in (1, 2 * batch):
                x = torch.randn(b, cfg.in_channels, n, n, device=device, dtype=dtype).to(memory_format=fmt)
                c = torch.randn(b, 77, cfg.context_dim, device=device, dtype=dtype)
                print(f"UNet forward | batch {b} | {n}x{n} latents | {tag} | {timed(lambda: net(x, t, c)):.1f} ms")
            z = torch.randn(1, cfg.in_channels, n, n, device=device, dtype=dtype).to(memory_format=fmt)
            print(f"VAE decode | batch 1 | {tag} | {timed(lambda: decode(z)):.1f} ms")
            encode = lambda ids: text(ids).last_hidden_state  # noqa: E731
            encode = compiled(encode) if compile_text else encode
            ms = timed(lambda: encode(ids))
            print(f"text encoder ({'compiled' if compile and compile_text else 'eager'}) | batch 1 | {tag} | {ms:.1f} ms")
            one = lambda: decode(net(z, t, encode(ids)))  # noqa: E731 (x0 conversion: negligible)
            print(f"one-step text-to-image (text + UNet + VAE decode) | batch 1 | {tag} | {timed(one):.1f} ms")
        if 'pairs' in sections:
            ac = make_alphas_cumprod()
            ids = torch.randint(0, 49408, (batch, 77), device=device)
            z = torch.randn(batch, cfg.in_channels, n, n, device=device)

            def pairs():
                c = text(ids).last_hidden_state
                return ddim_sample(net, z, {'context': c}, {'context': torch.zeros_like(c)}, steps, 3.0,
                                   alphas_cumprod=ac)
            ms = timed(pairs)
            print(f"pairs, DDIM {steps} + CFG 3 | batch {batch} | {n}x{n} latents | {tag} | {ms:.0f} ms per batch | "
                  f"{batch / ms * 1000:.2f} pairs/s")

if 'train' in sections:
    # train.py's step with its defaults, on random modules of the preset's shapes (grad_accum 1, one process)
    from discriminator import Discriminator
    from losses import LatentLPIPS, gan_loss_d, gan_loss_g, r1_penalty
    from memory import AdamW, adamw_8bit, checkpoint_blocks, optimizer_state_bytes, tensor_bytes
    from teacher import one_step
    from teacher import make_alphas_cumprod
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device(device):
        raw_G = model.UNet(cfg).train()  # fp32 master weights, as train.py (the teacher's copy)
        raw_D = Discriminator(raw_G).train()  # teacher-initialised, z-conditioned, multiscale in and out
        lpips = LatentLPIPS()  # full width, frozen
    ema = copy.deepcopy(raw_G).eval().requires_grad_(False).to('cpu' if ema_cpu else device)
    text = text_tower(cfg.context_dim)
    if activation_checkpointing:  # R1 then runs on a plain weightless D fed D's weights, as in train.py
        with torch.device('meta'):
            D_r1 = Discriminator(raw_G, init='scratch')
        checkpoint_blocks(raw_G)
        checkpoint_blocks(raw_D)
    fused = fused_adamw and device == 'cuda'  # fused AdamW is CUDA-only here
    if optim_dtype == 'float32':
        adamw, kind = functools.partial(torch.optim.AdamW, fused=fused), 'fused' if fused else 'foreach'
    elif optim_dtype == 'bfloat16':
        adamw, kind = functools.partial(AdamW, state_dtype=torch.bfloat16), 'bf16 moments'
    else:
        adamw, kind = adamw_8bit, '8-bit'
    opt_g = adamw(raw_G.parameters(), lr=1e-5, betas=betas)
    opt_d = adamw(raw_D.parameters(), lr=1e-5, betas=betas_d)
    scaler = torch.amp.GradScaler(device, enabled=torch.float16 in (dtype, dtype_g))
    abar, n, B, k = make_alphas_cumprod().to(device), cfg.sample_size, batch, round(0.25 * batch)
    z = torch.randn(B, cfg.in_channels, n, n, device=device)
    x = torch.randn(B, cfg.in_channels, n, n, device=device)
    ids = torch.randint(0, 49408, (B, 77), device=device)
    with torch.no_grad():
        c1 = text(ids[:1]).last_hidden_state  # R1's prompt: train.py reuses the step's, so R1 encodes no text

    def train_step():
        with torch.no_grad():
            c = text(ids).last_hidden_state
        x_hat = one_step(G, z, {'context': c}, abar, 'epsilon', 999, 'teacher', ctx_g)
        raw_D.requires_grad_(True)  # D step: reals, G's fakes, and k mix-and-match fakes
        with ctx:
            logits = D(torch.cat([x, x_hat.detach(), x[:k]]), torch.cat([z, z, z.roll(1, 0)[:k]]),
                       torch.cat([c, c, c.roll(1, 0)[:k]]))
        scaler.scale(gan_loss_d([l[:B] for l in logits], [l[B:] for l in logits], drift=0.03)).backward()
        raw_D.requires_grad_(False)  # G step: E-LatentLPIPS + the adversarial term through the frozen D
        with ctx:
            loss_g = lpips(x_hat, x, augment=augment or None).mean() + gan_loss_g(D(x_hat, z, c))  # lambda_gan 1
        scaler.scale(loss_g).backward()
        for opt, net in ((opt_g, raw_G), (opt_d, raw_D)):
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        scaler.update()
        with torch.no_grad():
            weights = [p.to(ema.conv_in.weight.device) for p in raw_G.parameters()]  # (ema_cpu: a copy)
            torch._foreach_lerp_(list(ema.parameters()), weights, 0.01)

    def r1_step():  # train.py's R1: one real sample, the uncompiled D, math attention (double backward)
        raw_D.requires_grad_(True)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            d = raw_D if not activation_checkpointing else (
                lambda *a: torch.func.functional_call(D_r1, dict(raw_D.named_parameters()), a))
            r1_penalty(lambda xx: d(xx, z[:1], c1), x[:1], interval=r1_interval).backward()
        raw_D.requires_grad_(False)
        opt_d.zero_grad(set_to_none=True)

    x_leaf = x.clone().requires_grad_(True)

    def lpips_step():  # the regression loss's own share: forward + backward to the student's latents
        with ctx:
            lpips(x_leaf, x, augment=augment or None).mean().backward()
        x_leaf.grad = None

    G, D = raw_G, raw_D  # the FLOPs a step asks for, counted once on the uncompiled modules
    with FlopCounterMode(display=False) as counter:
        train_step()
    flops = counter.get_total_flops()
    G, D = compiled(raw_G), compiled(raw_D)

    def peak_memory():  # GiB since the last call (cuda only)
        gib = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return gib

    if device == 'cuda':
        peak_memory()
    ms = timed(train_step)
    peak = f" | peak {peak_memory():.1f} GiB" if device == 'cuda' else ""
    ms_r1 = timed(r1_step)
    peak_r1 = f", peak {peak_memory():.1f} GiB" if device == 'cuda' else ""
    ms_lpips = timed(lpips_step)
    ms_all = ms + ms_r1 / r1_interval
    trained = tensor_bytes([*raw_G.parameters(), *raw_D.parameters()])  # fp32 weights, and as much in gradients
    held = 2 * trained + optimizer_state_bytes(opt_g) + optimizer_state_bytes(opt_d) + (0 if ema_cpu else tensor_bytes(
        ema.parameters()))
    n_trained = sum(p.numel() for p in [*raw_G.parameters(), *raw_D.parameters()])
    states = (f" | weights, gradients, Adam, EMA on the {device}: {held / 2**30:.2f} GiB, "
              f"{held / n_trained:.1f} bytes per trained parameter")
    tag = (f"batch {B} | {n}x{n} latents | {unet} | {run} | G {str(dtype_g).removeprefix('torch.')} | "
           f"AC {'on' if activation_checkpointing else 'off'}, EMA {'in CPU memory' if ema_cpu else 'beside G'} | "
           f"AdamW {kind}")
    print(f"training step (G + D + E-LatentLPIPS), no R1 | {tag} | {ms:.1f} ms{peak}{states}")
    print(f"R1 step (1 sample, uncompiled D, math attention) | {tag} | {ms_r1:.1f} ms{peak_r1}, "
          f"1/{r1_interval} of steps")
    print(f"training step, R1 amortised | {tag} | {ms_all:.1f} ms | {B / ms_all * 1000:.1f} img/s | "
          f"{flops / 1e12:.2f} TFLOP per step (no R1) | MFU {flops / (ms / 1000) / (peak_tflops * 1e12):.1%} "
          f"of {peak_tflops:.0f} TFLOP/s")
    print(f"E-LatentLPIPS fwd+bwd alone | {tag} | {ms_lpips:.1f} ms | {ms_lpips / ms_all:.1%} of the step")
