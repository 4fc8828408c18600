"""
train.py's memory modes (their bytes per parameter and what each costs: README.md, Memory), and the byte counts
that tests/test_fsdp.py and bench.py check them with:

    checkpoint_blocks(G)                  # activation checkpointing: each UNet block recomputes its forward in the backward
    AdamW(G.parameters(), state_dtype=torch.bfloat16, lr=1e-5)   # Adam's two moments in bf16: 4 bytes/param, not 8
    adamw_8bit(G.parameters(), lr=1e-5)   # bitsandbytes' 8-bit AdamW: 2 bytes/param (CUDA, plain tensors: not FSDP)

Every function takes plain modules and tensors or FSDP2's sharded ones (DTensors: each rank holds one shard, and
local() is that shard).
"""
import functools
import math

import torch
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint


def local(t):
    """This rank's part of a tensor: the shard of an FSDP-sharded DTensor, a plain tensor itself (no copy)."""
    return t.to_local() if isinstance(t, DTensor) else t


def tensor_bytes(tensors):
    """Bytes that this rank holds for these tensors (its shards of sharded ones)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def optimizer_state_bytes(opt):
    """Bytes of an optimiser's per-parameter state on this rank: Adam's moments (not its one-number step counters)."""
    return tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())


def clip_grad_norm(params, max_norm):
    """torch.nn.utils.clip_grad_norm_ (max_norm 0: no clip, the norm only), and for FSDP's sharded parameters the same
    on this rank's shards: the norm from their squares summed over ranks (every rank gets the same), then the same
    scaling of every shard. (Given DTensors, torch's own costs seconds per call on a CPU: DTensor plans each op on its
    hundreds of tensors.)"""
    max_norm = max_norm if max_norm > 0 else float("inf")
    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [local(p.grad) for p in params]
    norm = torch.stack(torch._foreach_norm(grads)).float().square().sum()
    torch.distributed.all_reduce(norm)
    norm = norm.sqrt()
    torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))  # torch's clip coefficient
    return norm


def checkpoint_blocks(net):
    """Activation checkpointing per UNet block (net.blocks(): every resnet and spatial transformer): a block keeps only
    its inputs for the backward and runs its forward again there. Saves the activations inside the blocks (most of a
    UNet's) for one more forward of each block in the backward. The module's names and weights do not change, so
    checkpoints and FSDP see the same model; non-reentrant checkpointing also serves R1's double backward."""
    for block in net.blocks():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return net


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (decoupled weight decay, bias correction) on each rank's shards, with the two moments
    stored in state_dtype. float32: what train.py uses under FSDP, as torch's own AdamW spends seconds planning each
    foreach op for DTensors on its first steps. bfloat16: 4 bytes per parameter instead of 8; each step computes in
    fp32 (a few tensors at a time) and rounds the moments back, so a change smaller than bf16's resolution (1/256 of
    the moment) is lost: with beta2 = 0.99 the second moment moves by 1% of g^2 - v per step and registers; beta2 =
    0.999 would stall wherever g^2 is near v. The weights themselves stay fp32."""

    CHUNK = 1 << 25  # elements updated together: bounds the fp32 copies of bf16 moments (3 x 128 MB)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, state_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                state = self.state[p]
                if not state:  # the moments take the parameter's layout (a DTensor stays sharded like its parameter)
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
            chunks, size = [[]], 0
            for p in params:
                if size > self.CHUNK:
                    chunks, size = chunks + [[]], 0
                chunks[-1].append(p)
                size += local(p).numel()
            for chunk in chunks:
                w, g = [local(p) for p in chunk], [local(p.grad).float() for p in chunk]
                stored = [(local(self.state[p]["exp_avg"]), local(self.state[p]["exp_avg_sq"])) for p in chunk]
                m, v = [a.float() for a, _ in stored], [b.float() for _, b in stored]  # fp32: no copy
                t = [self.state[p]["step"].item() for p in chunk]
                torch._foreach_lerp_(m, g, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g, g, value=1 - b2)
                torch._foreach_mul_(w, 1 - lr * wd)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, [math.sqrt(1 - b2**s) for s in t])
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(w, m, denom, [-lr / (1 - b1**s) for s in t])
                if self.state_dtype != torch.float32:  # round the moments back into their storage
                    torch._foreach_copy_([a for a, _ in stored], m)
                    torch._foreach_copy_([b for _, b in stored], v)
        return loss


def adamw_8bit(params, **kw):
    """bitsandbytes' AdamW8bit (block-wise 8-bit moments, 2 bytes per parameter; tensors under 4,096 elements keep
    fp32 moments). bitsandbytes is optional: imported only here."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SystemExit("--optim_dtype=8bit needs bitsandbytes, which is not installed (pip install bitsandbytes; it "
                         "runs on CUDA GPUs only): install it, or use --optim_dtype=bfloat16") from None
    return bnb.optim.AdamW8bit(params, **kw)
