"""
Speed benchmarks, one section per --what. Compare numbers only within one run on one machine.

    python bench.py --what=elpips                  # E-LatentLPIPS forward+backward, batch 8, 4x64x64 latents
    python bench.py --what=elpips --compile=True --batch=32
    python bench.py --what=elpips --augment=''    # plain LatentLPIPS, no augmentation
    python bench.py --what=onestep --compile=True --batch=32  # text + UNet + VAE decode at 512 px, batch 1; UNet b32
    python bench.py --what=pairs --compile=True --batch=32  # DDIM-50 + CFG 3 pairs/s at SD1.5 size
    python bench.py --what=onestep --unet=tiny-sd1 --vae=tiny   # any section on tiny models: try it on a CPU

onestep and pairs use random weights of the SD1.5 shapes (model.py presets and a CLIP-L text tower), cast to the
dtype as an inference user would, so they compare with ../shared/bench/peer_baseline.py and peer_tuned.py (the
design card's targets: one step at most 0.5x diffusers' time, pairs at least 1.3x its pairs/s).

Runs on cuda if there is one (bf16 autocast), else on the CPU (fp32). Reference points, from other machines:
the paper's 12.1 ms per iteration for E-LatentLPIPS on an A100 (Kang et al. 2024, Sec. 3.2), and the official
elatentlpips package on an H200 in its PyTorch path: 19.5 ms fp32, 16.7 ms bf16 at batch 8.
"""
import time

import torch

# knobs (configurator.py: --key=value)
what = 'elpips'  # which section to run: elpips, onestep, pairs
batch = 8  # batch size (onestep: the UNet's second batch size, after 1)
unet = 'sd15'  # onestep, pairs: model.py UNet preset
vae = 'sd'  # onestep: model.py VAE preset
steps = 50  # pairs: DDIM steps (guidance 3)
size = 64  # latent side: 64 is SD1.5 at 512 px
augment = 'bg'  # augmentation preset of losses.augment_pair, '' for none
dtype = ''  # 'float32' or 'bfloat16'; default bfloat16 on cuda, float32 on cpu
compile = False  # torch.compile the module under test
warmup = 3  # untimed iterations first (compilation happens here)
iters = 10  # timed iterations
from configurator import configure  # noqa: E402

configure(globals())

device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = getattr(torch, dtype or ('bfloat16' if device == 'cuda' else 'float32'))
ctx = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.manual_seed(0)

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

# -----------------------------------------------------------------------------
if what == 'elpips':
    from losses import LatentLPIPS
    lpips = LatentLPIPS().to(device)  # the full-width trunk; random weights time the same as the official ones
    loss_fn = torch.compile(lpips) if compile else lpips
    # as in training: the student's latents need a gradient, the teacher's target does not
    x_hat = torch.randn(batch, 4, size, size, device=device, requires_grad=True)
    x = torch.randn(batch, 4, size, size, device=device)

    def step():
        with ctx:
            loss = loss_fn(x_hat, x, augment=augment or None).mean()
        loss.backward()
        x_hat.grad = None

    ms = timed(step)
    print(f"E-LatentLPIPS fwd+bwd | augment {augment or 'none'} | batch {batch} | 4x{size}x{size}"
          f" | {device} {str(dtype).removeprefix('torch.')} | compile {compile} | {ms:.1f} ms")
elif what in ('onestep', 'pairs'):
    import model
    from teacher import ddim_sample, make_alphas_cumprod
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = model.UNET_PRESETS[unet]
    if cfg.add_in_dim:
        raise SystemExit(f"--unet={unet}: onestep and pairs time SD1/SD2-shaped UNets (no SDXL pooled text yet)")
    g = model.UNet(cfg).to(device, dtype).eval().requires_grad_(False)
    n = cfg.sample_size
    width = cfg.context_dim  # CLIP-L for SD1 (12 layers), OpenCLIP-H's 23 used layers for SD2; tiny presets: 2
    layers, heads = {768: (12, 12), 1024: (23, 16)}.get(width, (2, 2))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, max_position_embeddings=77,
                                        num_hidden_layers=layers, num_attention_heads=heads, projection_dim=width,
                                        hidden_act='quick_gelu'))
    text = text.to(device, dtype).eval().requires_grad_(False)
    net = torch.compile(g) if compile else g
    run = f"{unet} | {device} {str(dtype).removeprefix('torch.')} | compile {compile}"
    with torch.no_grad():
        if what == 'onestep':
            v = model.VAE(model.VAE_PRESETS[vae]).to(device, dtype).eval().requires_grad_(False)
            decode = torch.compile(v.decode) if compile else v.decode
            ids = torch.randint(0, 49408, (1, 77), device=device)
            t = torch.tensor(999, device=device)
            for b in (1, batch):
                x = torch.randn(b, cfg.in_channels, n, n, device=device, dtype=dtype)
                c = torch.randn(b, 77, width, device=device, dtype=dtype)
                print(f"UNet forward | batch {b} | {n}x{n} latents | {run} | {timed(lambda: net(x, t, c)):.1f} ms")
            z = torch.randn(1, cfg.in_channels, n, n, device=device, dtype=dtype)
            print(f"VAE decode | batch 1 | {run} | {timed(lambda: decode(z)):.1f} ms")
            print(f"text encoder | batch 1 | {run} | {timed(lambda: text(ids).last_hidden_state):.1f} ms")
            one = lambda: decode(net(z, t, text(ids).last_hidden_state))  # noqa: E731 (x0 conversion: negligible)
            print(f"one-step text-to-image (text + UNet + VAE decode) | batch 1 | {run} | {timed(one):.1f} ms")
        else:
            ac = make_alphas_cumprod()
            ids = torch.randint(0, 49408, (batch, 77), device=device)
            z = torch.randn(batch, cfg.in_channels, n, n, device=device)

            def pairs():
                c = text(ids).last_hidden_state
                return ddim_sample(net, z, {'context': c}, {'context': torch.zeros_like(c)}, steps, 3.0,
                                   alphas_cumprod=ac)
            ms = timed(pairs)
            print(f"pairs, DDIM {steps} + CFG 3 | batch {batch} | {n}x{n} latents | {run} | {ms:.0f} ms per batch | "
                  f"{batch / ms * 1000:.2f} pairs/s")
else:
    raise SystemExit(f"--what={what!r}: the sections are: elpips, onestep, pairs")
