"""
What every script shares: its processes (plain python, or one per GPU under torchrun), its precision (one autocast
per dtype knob), and images out (PNGs and grids). make_pairs.py, train.py, sample.py, eval.py and bench.py use it.
"""
import datetime
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from PIL import Image

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def autocast(device, dtype):
    """The autocast context of a dtype knob: none for float32 (plain fp32 math), else torch.autocast on the device."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.split(":")[0], dtype=dtype)


def setup_distributed(device, timeout_hours=None):
    """(ddp, rank, world, device) for this process. torchrun sets RANK: then the process group starts (nccl on
    GPU, gloo on CPU) and a cuda device becomes this rank's GPU; plain python gives (False, 0, 1, device).
    timeout_hours: how long a collective waits for the slowest rank (torch's default is 10 minutes for nccl):
    make_pairs and eval meet only at the end of their work, when a rank with one more shard to make can be an hour
    behind the others."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if not ddp:
        return False, 0, 1, device
    timeout = datetime.timedelta(hours=timeout_hours) if timeout_hours else None
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timeout)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device


def to_bytes(x):
    """Float images in [-1,1] (any device or dtype) as uint8 on the CPU, channels first as given."""
    return ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()


def to_image(x):
    """One [3,H,W] float image in [-1,1] as an 8-bit PIL image."""
    return Image.fromarray(to_bytes(x).permute(1, 2, 0).numpy())


def image_grid(images, nrow=8):
    """A grid image of [N,3,H,W] floats in [-1,1] (any device or dtype), nrow images per row, each in a thin frame."""
    x = to_bytes(images)
    x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=64)  # the frame, so that tiles do not merge
    n, c, h, w = x.shape
    ncol = (n + nrow - 1) // nrow
    x = torch.cat([x, x.new_zeros(ncol * nrow - n, c, h, w)])  # pad the last row
    x = x.view(ncol, nrow, c, h, w).permute(0, 3, 1, 4, 2).reshape(ncol * h, nrow * w, c)
    return Image.fromarray(x.numpy())
