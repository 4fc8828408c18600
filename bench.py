"""
Speed benchmarks, one section per --what. Compare numbers only within one run on one machine.

    python bench.py --what=elpips                  # E-LatentLPIPS forward+backward, batch 8, 4x64x64 latents
    python bench.py --what=elpips --compile=True --batch=32
    python bench.py --what=elpips --augment=''    # plain LatentLPIPS, no augmentation

Runs on cuda if there is one (bf16 autocast), else on the CPU (fp32). Reference points, from other machines:
the paper's 12.1 ms per iteration for E-LatentLPIPS on an A100 (Kang et al. 2024, Sec. 3.2), and the official
elatentlpips package on an H200 in its PyTorch path: 19.5 ms fp32, 16.7 ms bf16 at batch 8.
"""
import time

import torch

# knobs (configurator.py: --key=value)
what = 'elpips'  # which section to run: elpips
batch = 8  # batch size
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
else:
    raise SystemExit(f"--what={what!r}: the sections are: elpips")
