"""
Diffusion2GAN, stage 2 (Kang et al. 2024): train the one-step student G(z, c) on the teacher's ODE pairs (z, c, x)
with E-LatentLPIPS regression and a conditional GAN, all in latent space. One file, top to bottom:
config -> distributed setup -> teacher, pairs -> G, D, losses, optimisers -> loop -> samples and metrics.

    python train.py                                   # the toy world, end to end on a CPU (pairs made if missing)
    python train.py config/sd15.py --batch_size=16    # one GPU, a real teacher (pairs from make_pairs.py)
    torchrun --standalone --nproc_per_node=8 train.py config/sd15.py
    torchrun --standalone --nproc_per_node=8 train.py config/sdxl.py --parallel=fsdp   # sharded: README.md, Memory
Re-running the same command resumes from out_dir/ckpt.pt (--parallel=fsdp: the sharded folder out_dir/ckpt).
"""
import copy
import functools
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

# -----------------------------------------------------------------------------
# config: every knob, with the default of the embedded toy run (python train.py --help lists them)
# I/O
out_dir = "out/toy"  # checkpoints, sample grids, log and metrics
teacher = "toy"  # 'toy' = the toy world's (toy/weights/sd); else a diffusers folder, single file or hub id
pairs = "pairs/toy"  # a make_pairs.py folder; for the toy it is made here when missing
toy_pairs = 4000  # toy only: how many pairs to make (one per training caption). 4,000 keeps the quick start short;
# runs of thousands of steps learn them by heart (mse_heldout >> mse) and want more (toy/README.md: 64,000)
holdout = 64  # the folder's last pairs, never trained on. Logged on them: G's latent MSE to the teacher's x
# (mse_heldout; far above mse, the training batches', G is memorising its pairs) and D's score (d_heldout; far below
# d_real, D is)
pair_steps = 25  # toy only: DDIM steps of the pairs (make_pairs.py's default is 50; 25 keeps the toy fast)
pair_guidance = 3.0  # toy only: guidance of the pairs (the paper's SD-CFG-3 set)
resume = True  # continue from out_dir/ckpt.pt (parallel=fsdp: out_dir/ckpt/) when it exists
# student G: a copy of the teacher UNet, queried once at the top of the schedule
t_G = 999  # G's timestep input: pure noise in, as the ODE starts at t=999 with trailing spacing
g_param = "teacher"  # 'teacher': G's output is read like the teacher's (eps or v) and turned into x0 in fp32; 'x0': read as x0
# regression loss
regression = "e-latent-lpips"  # l2 | pseudo-huber | latent-lpips | e-latent-lpips | pixel-lpips
lpips = "toy"  # LatentLPIPS weights: 'toy', a file in the official layout, or sd15/sd21/sdxl (downloaded, CC-BY-NC)
augment = "bg"  # E-LatentLPIPS ensemble: letters of b(lit) g(eometric) c(olour) (cut)o(ut); official default bg
pixel_vgg = ""  # pixel-lpips only: an ImageNet VGG16-BN LPIPS file (image space); '' = the toy's (toy only)
# GAN
gan = True  # False = regression only (the paper's first ablation table)
lambda_gan = 0.3  # weight of the adversarial term in G's loss (not published: tuned on the toy with d_real_noise,
# toy/README.md)
d_init = "teacher"  # 'teacher' or 'scratch'
d_z_cond = True  # D sees the noise z (zero-initialised conv)
d_ms_input = True  # multiscale input: resized x at every encoder level
d_ms_output = True  # multiscale output: heads before, at and after every skip connection
t_D = 0  # D's fixed timestep: 0 = it judges clean latents (the paper); t > 0 = every latent D judges (reals, fakes,
# G's adversarial view, R1's real) is first noised to t by the forward process (d_view), fresh noise each time. Not in
# the paper: the noise hides fine latent noise in G's output (its eps error x14.6 at t=999) that D otherwise keys on
# (toy/README.md)
mix_match = 0.25  # share of the batch added as fakes: real latents with another sample's prompt and noise
d_real_noise = 0.3  # std of white noise added to every real latent D judges (reals, mix-and-match reals, R1's real,
# the held-out reals), fresh each step; 0 = off (the paper). Not in the paper: G's samples differ from the teacher's by
# fine latent noise that D keys on; noise on the reals takes that cue away. In units of the scaled latent (std ~1 for
# the toy and SD alike); on the toy it gains 2.4 FID-like points over E-LatentLPIPS alone at 1,000 steps (toy/README.md)
d_real_noise_mode = "fixed"  # 'fixed': the noise's std is d_real_noise; 'error': d_real_noise x the rms of G's latent
# error (G(z, c) - x) on this step's batch, so the noise shrinks as G learns. Not in the paper: a fixed std stops
# helping once G's error falls to it (at 4,000 steps on the toy: D's noised reals as noisy as G's samples). With 0.6
# it gains within the seed spread on the toy at 2,000 steps, so it is not the default (toy/README.md)
r1_gamma = 0.1  # R1 weight on D's per-sample score, the one its loss reads (not published: tuned on the toy's 8x8
# latents; the SD configs scale it by latent area, see config/sd15.py)
r1_interval = 1  # R1 every step. Departs from the paper's lazy R1 (every 16 steps at 16x the weight): on the toy each
# lazy step's spike fills D's Adam second moment (beta1_d=0) and D falls to chance (toy/README.md)
r1_single = True  # R1 on one real sample (paper) or on the whole batch
d_drift = 0.03  # weight of drift * mean(score^2) in D's loss (0 = off). Not in the paper: without it D's logits grow
# at a fixed rate once it separates (Adam's normalised steps on a loss with no minimum; toy: +-0.11 per 50 steps); 0.03
# puts the loss's minimum at scores of about +-2 (losses.gan_loss_d). The score is a mean logit: no scaling with size
# optimisation
batch_size = 64  # global batch: per GPU it is batch_size // (world size * grad_accum)
grad_accum = 1  # micro-steps per step
max_steps = 400
lr_g = 3e-4  # 3x D's, with the cooldown below: toy FID-like -8.9 +- 0.6 vs a constant 1e-4, 3 seeds (toy/README.md)
lr_d = 1e-4
beta1 = 0.9  # G's Adam betas. Not GAN practice's 0: G's loss is mostly regression, and without momentum its noisy
# updates (x14.6 from eps to x0 at t=999) shift the whole output (toy/README.md)
beta2 = 0.99
beta1_d = 0.0  # D's Adam betas: no momentum, as StyleGAN2 and StyleGAN-T train their discriminators
beta2_d = 0.99
weight_decay = 0.0
warmup = 20  # linear learning-rate warmup, in steps
cooldown = 0.3  # share of max_steps at the end over which both learning rates fall linearly to 0 (0 = constant).
# Not in the paper (the SD configs keep 0); a resumed run with another max_steps moves its cooldown with it
grad_clip = 1.0  # max gradient norm of G (0 = off)
grad_clip_d = 1.0  # max gradient norm of D's loss (0 = off); R1's gradient is added after the clip
grad_clip_r1 = 1.0  # max norm of R1's gradient, clipped on its own (0 = off). Not in the paper: a spike of single-
# sample R1, unclipped, flattens D in one step and fills its Adam second moment, and D then scores everything alike
# for hundreds of steps (toy/README.md). The log's gnorm_r1 is the norm before the clip: if it is always above, R1
# has become a fixed-length step and r1_gamma no longer sets its weight
ema_decay = 0.99  # EMA of G's weights (the EMA is what sample.py and eval.py use)
ema_warmup = False  # decay min(ema_decay, 1 - 9/(10+step)), ~the last 1/9 of the steps (0.9999 alone: 14% teacher at 20k)
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype of D and the losses; weights stay fp32
dtype_g = "float16" if torch.cuda.is_available() else "float32"  # G's autocast dtype: its x0 is eps x14.6, and bf16's
# 8-bit mantissa would put a noise floor on it (0.054 on the toy) that the teacher's pairs lack; fp16's is 8x lower
compile = False  # torch.compile G and D (raw modules kept for saving and R1); costs minutes: on in config/sd15.py, sdxl.py
# memory (README.md, Memory: bytes per parameter of each mode, and the peaks they give)
parallel = "ddp"  # ddp: every GPU holds all of G, D, their Adam states and the EMA; fsdp: each GPU holds 1/world of
# them (FSDP2, block by block; weights gathered in the autocast dtypes as each block runs), checkpoints in out_dir/ckpt/
activation_checkpointing = False  # each UNet block of G and D keeps only its inputs and recomputes its forward in the
# backward: most activation memory saved, for ~1/3 more compute per step
optim_dtype = "float32"  # Adam's two moments: float32 (8 bytes/param), bfloat16 (4, rounded every step: fine with the
# betas' 0.99), 8bit (2: bitsandbytes' AdamW8bit, CUDA and parallel=ddp only)
ema_cpu = False  # keep the EMA (fp32) in CPU memory: 4 bytes/param off the GPU, for copying G's weights to the CPU
# every step (a bf16 EMA is not offered: at ema_decay 0.9999 bf16 would round every update away)
seed = 0
log_interval = 20
sample_interval = 200  # a fixed-seed grid: student (EMA) beside teacher
ckpt_interval = 200
eval_samples = 500  # toy only: validation captions for the final metrics (0 = skip)
wandb_project = ""  # log to Weights & Biases (imported only when set)
tensorboard = False  # log to out_dir/tb (imported only when set)
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402

config = configure(globals())
import losses  # noqa: E402  (after the knobs so that --help is instant)
from common import DTYPES, autocast, image_grid, setup_distributed  # noqa: E402
from discriminator import Discriminator  # noqa: E402
from make_pairs import PairDataset, pairs_complete  # noqa: E402
from memory import AdamW, adamw_8bit, checkpoint_blocks, clip_grad_norm, local  # noqa: E402
from teacher import load_teacher, one_step, seeded_noise  # noqa: E402
from weights import (finish_sharded_save, load_checkpoint, load_sharded_checkpoint, save_checkpoint,  # noqa: E402
                     save_sharded_checkpoint)

toy = teacher == "toy"  # the embedded default: the toy world's committed models, pairs made here, metrics at the end
if toy:
    from toy import LPIPS as TOY_LPIPS, PIXEL_VGG as TOY_PIXEL_VGG, TEACHER as TOY_TEACHER, TEACHER_METRICS, shapes
if lpips == "toy" and not toy and regression in ("latent-lpips", "e-latent-lpips"):
    raise SystemExit(f"--lpips=toy is the toy world's LatentLPIPS: with --teacher={teacher} give sd15, sd21, sdxl or a file")

for knob, b1 in (("lr_g", beta1), ("lr_d", beta1_d)):  # values that cannot work stop here, by name
    if not 0 <= globals()[knob] / (1 - b1) < torch.finfo(torch.float32).max:  # Adam's first step is lr / (1 - beta1)
        raise SystemExit(f"--{knob}={globals()[knob]}: Adam's first step, lr / (1 - beta1), must be a float32 number "
                         "and not negative")
for knob in ("batch_size", "grad_accum", "max_steps", "log_interval", "ckpt_interval", "sample_interval", "r1_interval"):
    if globals()[knob] < 1:
        raise SystemExit(f"--{knob}={globals()[knob]}: must be at least 1")
if not 0 <= cooldown <= 1:
    raise SystemExit(f"--cooldown={cooldown}: the share of the steps that cool down is from 0 to 1")
if not d_real_noise >= 0 or d_real_noise_mode not in ("fixed", "error"):
    raise SystemExit(f"--d_real_noise={d_real_noise} --d_real_noise_mode={d_real_noise_mode}: the noise on D's reals "
                     "is 0 (off) or more, its mode fixed or error")
if parallel not in ("ddp", "fsdp") or optim_dtype not in ("float32", "bfloat16", "8bit"):
    raise SystemExit(f"--parallel={parallel} --optim_dtype={optim_dtype}: parallel is ddp or fsdp; optim_dtype is "
                     "float32, bfloat16 or 8bit")
if optim_dtype == "8bit" and parallel == "fsdp":
    raise SystemExit("--optim_dtype=8bit: bitsandbytes' AdamW8bit updates whole tensors, not FSDP's shards; use "
                     "--optim_dtype=bfloat16 with --parallel=fsdp")

# -----------------------------------------------------------------------------
# distributed: torchrun sets RANK; plain python runs the same lines with world = 1
distributed, rank, world, device = setup_distributed(device)  # nccl on GPU (one per rank), gloo on CPU
fsdp = parallel == "fsdp"
if fsdp and not distributed:  # plain python: a process group of one, so that one process runs the same sharded lines
    # and reads and writes the same sharded checkpoints as torchrun's N
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    distributed = True
ddp = distributed and not fsdp  # several processes that each hold all of G and D
master = rank == 0
if batch_size % (world * grad_accum):
    raise SystemExit(f"--batch_size={batch_size} must divide by the number of processes ({world}) x "
                     f"--grad_accum={grad_accum}")
micro = batch_size // (world * grad_accum)
if gan and mix_match > 0 and micro < 2:  # roll(1) of a one-sample batch is the sample itself: a real labelled fake
    raise SystemExit(f"--mix_match={mix_match} needs 2 or more samples per micro-batch (--batch_size={batch_size} over "
                     f"{world} process(es) x --grad_accum={grad_accum} gives 1): a mismatched fake takes the noise and "
                     "prompt of another sample of its micro-batch. Lower --grad_accum, or set --mix_match=0")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
ptdtype, ptdtype_g = DTYPES[dtype], DTYPES[dtype_g]
ctx, ctx_g = autocast(device, ptdtype), autocast(device, ptdtype_g)
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler  # noqa: E402
# fp16: loss scaling. Under FSDP each rank sees its shard of the gradients: ShardedGradScaler shares an inf among ranks
scaler = (ShardedGradScaler if fsdp else torch.amp.GradScaler)(device.split(":")[0],
                                                                enabled=torch.float16 in (ptdtype, ptdtype_g))
if master:
    os.makedirs(out_dir, exist_ok=True)
    print(f"world {world} | micro-batch {micro} x accum {grad_accum} = global {batch_size} | {device} {dtype}")

# -----------------------------------------------------------------------------
# the frozen teacher (text encoder, VAE, UNet) and the pairs
if toy and not os.path.exists(TOY_TEACHER):
    raise SystemExit(f"{TOY_TEACHER} is missing: run `python -m toy.build` to train the toy world")
T = load_teacher(TOY_TEACHER if toy else teacher, device, torch.float32)  # fp32: autocast handles precision
if toy and not pairs_complete(pairs):  # made here, or finished here after an interruption (make_pairs resumes)
    if master:  # rank 0 makes the toy pairs (minutes on a CPU), the others wait
        import make_pairs
        prompt_file = pairs.rstrip("/") + "-prompts.txt"
        os.makedirs(os.path.dirname(prompt_file) or ".", exist_ok=True)
        with open(prompt_file + ".tmp", "w") as f:  # training captions, one per pair (the same text every time)
            f.writelines(shapes.sample(i)[1] + "\n" for i in range(toy_pairs))
        os.replace(prompt_file + ".tmp", prompt_file)
        make_pairs.main(prompts=prompt_file, out_dir=pairs, teacher=TOY_TEACHER, steps=pair_steps,
                        guidance=pair_guidance, batch_size=250, shard_size=1000, device=device.split(":")[0],
                        dtype="float32", latent_dtype="float32", onednn=True)  # oneDNN: 1.5x faster on CPU
    if distributed:
        dist.barrier()
data = PairDataset(pairs)
made_by = data.index["settings"]["teacher_fingerprint"]  # pairs from another teacher would train G on the wrong task
if made_by != T.fingerprint(DTYPES[data.index["settings"]["dtype"]]):
    raise SystemExit(f"{pairs}/index.json: these pairs were made by another teacher than --teacher={teacher} "
                     "(its UNet, text encoder, tokenizer or schedule differ): make pairs with this teacher, or train "
                     "with the teacher that made them")
n_train = len(data) - holdout  # the held-out pairs are never trained on, with or without the GAN: arms compare
if n_train < 1:
    raise SystemExit(f"--holdout={holdout}: {pairs} holds only {len(data)} pairs, none would be left to train on")
abar = T.alphas_cumprod.to(device)
for knob in ("t_G", "t_D"):
    if not 0 <= globals()[knob] < len(abar):
        raise SystemExit(f"--{knob}={globals()[knob]}: a timestep of the teacher's schedule, 0 to {len(abar) - 1}")


def encode(prompts):
    """The prompt as the UNet takes it: context (+ pooled, time_ids for SDXL), at the pairs' resolution."""
    res = data.index["settings"]["resolution"]
    return T.encode_text(prompts) | dict(time_ids=T.time_ids(len(prompts), res, res))


@functools.lru_cache(maxsize=2)
def epoch_order(e):
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100003 + e))


def batches(step):
    """The micro-batches of this rank from `step` on. Epoch e visits the pairs in a permutation seeded by (seed, e);
    step s takes the global positions [s * batch_size, (s + 1) * batch_size) of that endless stream, split by rank
    and micro-step. Resuming at a step gives exactly the batches an uninterrupted run would have seen."""
    n = n_train
    while True:
        for m in range(grad_accum):
            start = step * batch_size + (m * world + rank) * micro
            idx = [epoch_order(p // n)[p % n].item() for p in range(start, start + micro)]
            z, x, prompts = zip(*(data[i] for i in idx))
            yield torch.stack(z).to(device), torch.stack(x).to(device), list(prompts)
        step += 1


# -----------------------------------------------------------------------------
# G, D, the regression loss, optimisers, EMA
G = copy.deepcopy(T.unet).float().train().requires_grad_(True)  # the student starts as the teacher
ema = copy.deepcopy(G).eval().requires_grad_(False)  # fp32; with ema_cpu in CPU memory (under FSDP: its shards)
if ema_cpu and not fsdp:
    ema.to("cpu")
D = None
if gan:
    torch.manual_seed(seed)  # the new heads (and with d_init=scratch, all of D) start the same in every run
    D = Discriminator(T.unet, init=d_init, z_cond=d_z_cond, ms_input=d_ms_input, ms_output=d_ms_output, t_D=t_D)
    D = D.to(device).train()


lpips_net = None
if regression in ("latent-lpips", "e-latent-lpips"):
    path = TOY_LPIPS if lpips == "toy" else lpips
    # a local file, or a name in the authors' hub repository (sd15, sd21, sdxl)
    lpips_net = losses.LatentLPIPS.from_file(path) if os.path.exists(path) else losses.LatentLPIPS.from_pretrained(lpips)
    lpips_net = lpips_net.to(device)
elif regression == "pixel-lpips":
    if not (pixel_vgg or toy):
        raise SystemExit("regression=pixel-lpips needs --pixel_vgg= an image-space VGG16-BN LPIPS file")
    lpips_net = losses.LatentLPIPS.from_file(pixel_vgg or TOY_PIXEL_VGG, latent=False).to(device)

# -----------------------------------------------------------------------------
# memory modes and sharding (README.md, Memory). Only G, D and the EMA change: the teacher's text encoder(s), VAE and
# LPIPS trunk stay frozen, unsharded, on every GPU
if gan and (fsdp or activation_checkpointing):  # R1's double backward needs D's blocks whole and not recomputed
    # (FSDP frees each block's gathered weights after its backward; recomputation cannot be differentiated twice):
    # it runs on this weightless plain D, fed D's weights (the loop)
    with torch.device("meta"):
        D_r1 = Discriminator(T.unet, init="scratch", z_cond=d_z_cond, ms_input=d_ms_input, ms_output=d_ms_output, t_D=t_D)
if activation_checkpointing:
    checkpoint_blocks(G)
    if gan:
        checkpoint_blocks(D)
if fsdp:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.tensor import Partial
    mesh = init_device_mesh(device.split(":")[0], (world,))

    def shard(net, dtype, offload=OffloadPolicy(), compiled=False):
        """FSDP2 block by block: each resnet and spatial transformer (net.blocks()) is a unit whose weights are
        gathered in `dtype` just before it runs and freed after, its gradients reduce-scattered in fp32; the root
        unit holds the rest (convs in and out, embeddings, resamplers, D's heads). Parameters become DTensors that
        hold this rank's shard of each fp32 weight, and the optimiser built on them keeps only that shard's state."""
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in net.blocks():
            if compiled:  # per block, before sharding, as the root's forward runs FSDP's hooks
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
        fully_shard(net, mesh=mesh, mp_policy=policy, offload_policy=offload)

    shard(G, ptdtype_g, compiled=compile)  # G's autocast dtype (fp16 on GPUs), D's (bf16)
    shard(ema, ptdtype_g, CPUOffloadPolicy(pin_memory=device.startswith("cuda")) if ema_cpu else OffloadPolicy())
    if gan:
        shard(D, ptdtype, compiled=compile)

if optim_dtype == "float32" and not fsdp:  # fused: one pass over the weights, foreach's ~10 passes
    adamw = functools.partial(torch.optim.AdamW, weight_decay=weight_decay, fused=device.startswith("cuda"))
elif optim_dtype in ("float32", "bfloat16"):  # memory.py's, on this rank's shards (and moments in bf16 if asked)
    adamw = functools.partial(AdamW, weight_decay=weight_decay, state_dtype=DTYPES[optim_dtype])
else:
    adamw = functools.partial(adamw_8bit, weight_decay=weight_decay)
opt_g = adamw(G.parameters(), lr=lr_g, betas=(beta1, beta2))
opt_d = adamw(D.parameters(), lr=lr_d, betas=(beta1_d, beta2_d)) if gan else None

step, saved_step = 0, None  # saved_step: the step of the last checkpoint written or resumed from
ckpt_path = os.path.join(out_dir, "ckpt" if fsdp else "ckpt.pt")  # fsdp: a folder of every rank's shards


def sharded_state():
    """What a sharded checkpoint holds: this rank's shards of G, the EMA, D and both optimisers' Adam moments, named by
    parameter so that any number of ranks can read them back (DCP reads into these very tensors). Its meta.json holds
    the step (which fixes the data position: batches()), the config and the loss scale."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    state = {"G": get_model_state_dict(G), "ema": get_model_state_dict(ema),
             "opt_g": get_optimizer_state_dict(G, opt_g)["state"]}
    if gan:
        state |= {"D": get_model_state_dict(D), "opt_d": get_optimizer_state_dict(D, opt_d)["state"]}
    return state


if fsdp:
    if master:
        finish_sharded_save(ckpt_path)  # a save killed between its two renames
    dist.barrier()
other = os.path.join(out_dir, "ckpt.pt" if fsdp else "ckpt")
if resume and not os.path.exists(ckpt_path) and os.path.exists(other):
    raise SystemExit(f"{other}: written with --parallel={'ddp' if fsdp else 'fsdp'}, which this run does not read: "
                     f"resume with that, or set a new --out_dir")
if resume and os.path.exists(ckpt_path):
    try:  # a damaged checkpoint stops the run before anything is written: it is never replaced by a fresh start
        # (sharded: every rank reads its shards of every tensor, whatever the world size that wrote them)
        ckpt = load_sharded_checkpoint(sharded_state(), ckpt_path) if fsdp else load_checkpoint(ckpt_path)
    except ValueError as e:
        back = f"rm -r {ckpt_path} && mv {ckpt_path}.prev {ckpt_path}" if fsdp else f"mv {ckpt_path}.prev {ckpt_path}"
        fix = (f"{back} goes on from the one before" if os.path.exists(ckpt_path + ".prev")
               else "delete it to start over, or set a new --out_dir")
        raise SystemExit(f"{e}. {fix}") from None
    if not fsdp:
        G.load_state_dict(ckpt["G"])
        ema.load_state_dict(ckpt["ema"])
        opt_g.load_state_dict(ckpt["opt_g"])
        if gan:
            D.load_state_dict(ckpt["D"])
            opt_d.load_state_dict(ckpt["opt_d"])
    optimisers = {"G": (opt_g, (beta1, beta2)), "D": (opt_d, (beta1_d, beta2_d))} if gan else {"G": (opt_g, (beta1, beta2))}
    for name, (opt, betas) in optimisers.items():  # this command's Adam settings win over the checkpoint's, as lr does
        for group in opt.param_groups:
            if master and (tuple(group["betas"]), group["weight_decay"]) != (betas, weight_decay):
                print(f"resume: {name}'s Adam betas {tuple(group['betas'])}, weight decay {group['weight_decay']} in "
                      f"the checkpoint; continuing with this command's {betas}, {weight_decay}")
            group["betas"], group["weight_decay"] = betas, weight_decay
    step = saved_step = ckpt["step"]
    if "scaler" in ckpt and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    if master:
        print(f"resumed from {ckpt_path} at step {step}")
    del ckpt

# compile first, then wrap in DDP; the raw modules stay for EMA, saving, and R1 (double backward). The compiled D
# gets one graph for its own step and one for G's (raw_D.requires_grad_ below switches them; tests check it).
# FSDP: G and D were sharded (and compiled block by block) in place above
raw_G, raw_D = G, D
if compile and not fsdp:
    G = torch.compile(G)
    D = torch.compile(D) if gan else None
D_frozen = D  # D as seen by G's loss: no DDP (D's weights do not change in G's step)
if ddp:
    G = DDP(G, device_ids=[int(os.environ["LOCAL_RANK"])] if device.startswith("cuda") else None)
    D = DDP(D, device_ids=[int(os.environ["LOCAL_RANK"])] if device.startswith("cuda") else None) if gan else None


def generate(net, z, cond):
    """G(z, c) as an fp32 x0 latent (teacher.one_step: one UNet call at t_G, read like the teacher's output)."""
    return one_step(net, z, cond, abar, T.prediction_type, t_G, g_param, ctx_g)


def regression_loss(x_hat, x):
    # pixel LPIPS decodes both latents, with gradients through the (frozen) decoder: T.decode is no_grad
    decode = (lambda lat: T.vae.decode(lat / T.vae.cfg.scaling_factor)) if regression == "pixel-lpips" else None
    with ctx:
        return losses.regression_loss(regression, x_hat, x, lpips=lpips_net, augment=augment, decode=decode)


def lr_at(s, base):
    scale = min(1.0, (s + 1) / warmup)
    if cooldown > 0:  # the last step keeps 1 / (cooldown * max_steps) of the rate
        scale *= min(1.0, (max_steps - s) / (cooldown * max_steps))
    return base * scale


def d_view(x, generator=None):
    """A latent as D sees it: noised to timestep t_D by the forward process (clean at t_D = 0)."""
    if t_D == 0:
        return x
    noise = torch.randn(x.shape, generator=generator, device="cpu" if generator else x.device).to(x.device)
    return abar[t_D].sqrt() * x + (1 - abar[t_D]).sqrt() * noise


def mixed_fakes(j, n):
    """Mix-and-match fakes in micro-steps 0..j-1 of n samples each: a fractional share spreads over micro-steps
    (0.25 of 2 gives 0, 1, 0, 1, ...) instead of rounding to none; rounded to 6 places so whole shares stay exact."""
    return math.floor(round(j * mix_match * n, 6))


def checkpoint():
    """Everything needed to resume (weights.save_checkpoint: checksummed, atomic, the previous one kept beside it;
    fsdp: every rank writes its shards, weights.save_sharded_checkpoint, as safe). No RNG state is needed: every
    random draw of step s comes from a generator seeded by (seed, s, rank)."""
    meta = {"step": step, "config": config,
            "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(raw_G.cfg).items()}}
    if scaler.is_enabled():  # fp16's loss scale, so that a resumed fp16 run continues exactly
        meta["scaler"] = scaler.state_dict()
    if fsdp:
        save_sharded_checkpoint(sharded_state(), meta, ckpt_path)
        return
    ckpt = meta | {"G": raw_G.state_dict(), "ema": ema.state_dict(), "opt_g": opt_g.state_dict()}
    if gan:
        ckpt |= {"D": raw_D.state_dict(), "opt_d": opt_d.state_dict()}
    save_checkpoint(ckpt, ckpt_path)


# -----------------------------------------------------------------------------
# fixed samples for the grid: validation prompts (toy) and seeded noise, the teacher's output computed once
if toy:
    grid_prompts = [shapes.sample(s, n_objects=1 + (i >= 8))[1] for i, s in enumerate(shapes.val_seeds(16))]
else:
    grid_prompts = ["a photo of a cat", "a red car parked on a street", "a bowl of fruit on a wooden table",
                    "an astronaut riding a horse", "a lighthouse at sunset", "a watercolor painting of a forest",
                    "a portrait of an old man", "a city skyline at night"]
grid_z = seeded_noise(range(10**6, 10**6 + len(grid_prompts)), data.shape, device)
# Under FSDP a forward of G, the EMA or D is a collective (each block gathers its weights from every rank): every rank
# runs the student's grids, D's held-out score and the toy metrics with the master, which keeps them
everyone = master or fsdp
if everyone:  # the prompts' conditions, and (master) the teacher's side of every grid, once (the pairs' sampler)
    s = data.index["settings"]
    grid_cond, grid_uncond = T.conditions(grid_prompts, s["resolution"], s["resolution"])
if master:
    with torch.no_grad():
        grid_teacher = T.decode(T.sample(grid_z, grid_cond, grid_uncond, s["steps"], s["guidance"], s["spacing"]))
if holdout and everyone:  # the held-out pairs: how G and D do on pairs they never trained on
    held_z, held_x, held_prompts = zip(*(data[i] for i in range(n_train, len(data))))
    held_z, held_x, held_cond = torch.stack(held_z).to(device), torch.stack(held_x).to(device), encode(list(held_prompts))


@torch.no_grad()
def heldout_scores():
    """On the held-out pairs, in micro-batches: G's latent MSE to the teacher's x, and D's mean score (as its loss reads
    the logits)."""
    se, scores, noise = 0.0, [], torch.Generator().manual_seed(0)  # with t_D > 0 the same noise at every log line
    for i in range(0, len(held_z), micro):
        z, x = held_z[i:i + micro], held_x[i:i + micro]
        c = {key: v[i:i + micro] if v is not None else None for key, v in held_cond.items()}
        se += (generate(raw_G, z, c) - x).square().sum()
        if gan:
            x = x + noise_std * torch.randn(x.shape, generator=noise).to(x) if d_real_noise else x  # as D's reals
            with ctx:
                scores.append(losses.d_score(raw_D(d_view(x, noise), z, **c)))
    out = {"mse_heldout": (se / held_x.numel()).item()}
    if gan:
        out["d_heldout"] = torch.cat(scores).mean().item()
    return out


T.unet.to("cpu")  # G and D are copies: the teacher UNet is not needed on the GPU again (3.4 GB for SD1.5, 10 for SDXL)


def ema_net():
    """The EMA as a module that runs on the device: itself (under FSDP it gathers its shards, from the CPU with
    ema_cpu), or with ema_cpu and DDP a copy on the device for the while."""
    return copy.deepcopy(ema).to(device) if ema_cpu and not fsdp else ema


@torch.no_grad()
def sample_grid(path):
    """Student (EMA) beside teacher for the same z and prompt, decoded with the VAE outside the training step."""
    student = T.decode(generate(ema_net(), grid_z, grid_cond))
    if not master:
        return
    pairs_ = torch.stack([student, grid_teacher], 1).flatten(0, 1)  # student, teacher, student, teacher, ...
    image_grid(pairs_, nrow=8).save(path)
    with open(path.rsplit(".", 1)[0] + ".txt", "w") as f:
        f.write("left: one-step student (EMA), right: teacher, same z and prompt\n")
        f.writelines(f"{i}: {p}\n" for i, p in enumerate(grid_prompts))


# -----------------------------------------------------------------------------
# logging
writer = run = None
if master and tensorboard:
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(out_dir, "tb"))
if master and wandb_project:
    import wandb
    run = wandb.init(project=wandb_project, config=config)
log_path = os.path.join(out_dir, "log.txt")
if master and step and os.path.exists(log_path):  # a resumed run: drop what the stopped run logged past its checkpoint
    lines = open(log_path).read().splitlines(keepends=True)
    past = next((i for i, l in enumerate(lines) if l.startswith("step ") and int(l[5:].split()[0].rstrip(":")) > step),
                len(lines))
    with open(log_path + ".tmp", "w") as f:
        f.writelines(lines[:past] + [f"resumed from {ckpt_path} at step {step}\n"])
    os.replace(log_path + ".tmp", log_path)
log_file = open(log_path, "a" if step else "w") if master else None  # a fresh start's log is its own, not appended
# to a stopped run's (one killed before its first checkpoint, or --resume=False)


def log(line, scalars=None):
    if not master:
        return
    print(line, flush=True)
    log_file.write(line + "\n")
    log_file.flush()
    if scalars and writer:
        for k, v in scalars.items():
            writer.add_scalar(k, v, step)
    if scalars and run:
        run.log(scalars, step=step)


def nonfinite_weight(net):
    """The first tensor of net whose fp32 norm is not finite, as 'name: norm', else None. The norm overflows for weights
    beyond about 1e19, far past any that a network still runs with."""
    params = list(net.named_parameters())
    norms = torch.stack(torch._foreach_norm([local(p.detach()) for _, p in params]))
    if fsdp:  # each rank holds a shard of each tensor: the squares' sum over ranks, the same answer on every rank
        norms = norms.to(device, torch.float64).square()
        dist.all_reduce(norms)
        norms = norms.sqrt()
    if torch.isfinite(norms).all():
        return None
    i = int((~torch.isfinite(norms)).nonzero()[0])
    return f"{params[i][0]}: norm {norms[i].item()}"


def stop(why):
    """Stop the run on a non-finite value, saying where, and that the last checkpoint written is the good one."""
    last = f"the last good checkpoint, {ckpt_path} (step {saved_step}), is untouched" if saved_step is not None \
        else "no checkpoint was written"
    raise SystemExit(f"{why}; stopping: {last}. Lower the learning rates or raise warmup")


# -----------------------------------------------------------------------------
# the training loop
batch_iter = batches(step)
noise_std = d_real_noise  # the std of the noise on D's reals (mode 'error': the last step's, a tensor)
history = []  # per step of the log interval: (step, {term: value}); values stay on the device until the log line
t_last, n_last = time.time(), step
while step < max_steps:
    torch.manual_seed(seed * 1_000_003 + step * world + rank)  # the augmentations: a function of the step and rank
    for g in opt_g.param_groups:
        g["lr"] = lr_at(step, lr_g)
    if gan:
        for g in opt_d.param_groups:
            g["lr"] = lr_at(step, lr_d)
    do_r1 = gan and r1_gamma > 0 and step % r1_interval == 0
    terms = {}  # this step's terms, a list of values over micro-steps each
    for m in range(grad_accum):
        z, x, prompts = next(batch_iter)
        with torch.no_grad():
            cond = encode(prompts)
        last = m == grad_accum - 1
        if ddp:  # sync gradients on the last micro-step only (FSDP reduce-scatters every micro-step: gradients left
            # unsynced would be whole on every rank, not sharded)
            G.require_backward_grad_sync = last
            if gan:
                D.require_backward_grad_sync = last
        x_hat = generate(G, z, cond)  # G(z, c), fp32 x0 in the UNet's latent space
        mse = (x_hat.detach() - x).square().mean()  # G's latent fit to the teacher's x on this batch
        step_terms = {}
        if gan:
            # --- D step: real (x, z, c) vs fake (G(z, c), z, c) and mix-and-match fakes (x, z', c')
            raw_D.requires_grad_(True)
            j = step * grad_accum + m
            k = mixed_fakes(j + 1, len(x)) - mixed_fakes(j, len(x))
            shift = lambda v: v.roll(1, 0)[:k]  # sample i gets sample i-1's noise and prompt
            cat = lambda a, b: torch.cat([a, a, b]) if a is not None else None
            d_cond = {key: cat(v, shift(v) if v is not None else None) for key, v in cond.items()}
            if d_real_noise_mode == "error":  # the noise follows G's error (no sync: a tensor on the device)
                noise_std = d_real_noise * mse.sqrt()
                step_terms["d_noise"] = noise_std
            x_r = x + noise_std * torch.randn_like(x) if d_real_noise else x  # the reals as D judges them
            x_d = d_view(torch.cat([x_r, x_hat.detach(), x_r[:k]]))  # fp32, as D sees them (noised when t_D > 0)
            with ctx:
                logits = D(x_d, torch.cat([z, z, shift(z)]), **d_cond)
            B = len(x)
            real = [l[:B] for l in logits]
            fake = [l[B:] for l in logits]  # G's outputs and the mismatched reals, both fake
            loss_d = losses.gan_loss_d(real, fake, drift=d_drift)
            scaler.scale(loss_d / grad_accum).backward()
            score = losses.d_score([l.detach() for l in logits])  # D's verdict per sample, as its loss reads it
            step_terms |= {"d_loss": loss_d.detach(), "d_real": score[:B].mean(), "d_fake": score[B:2 * B].mean(),
                           "d_real_pos": (score[:B] > 0).float().mean()}  # the share of reals D calls real
            if k:
                step_terms["d_mm"] = score[2 * B:].mean()
            if do_r1 and m == 0:  # the R1 sample(s): this step's first real(s), penalised after D's clip (below)
                n_r1 = 1 if r1_single else B
                r1_batch = (x_d[:n_r1], z[:n_r1], {key: v[:n_r1] if v is not None else None for key, v in cond.items()})
            raw_D.requires_grad_(False)  # G's step sends gradients through D, not into it
        # --- G step: regression to the teacher's x, plus the adversarial term through the frozen D. The two terms meet
        # at G's output: their gradients there are taken apart (so the log can show their ratio), then summed and sent
        # back through G in one backward
        x_out = x_hat.detach().requires_grad_(True)
        loss_rec = regression_loss(x_out, x)
        (grad,) = torch.autograd.grad(loss_rec, x_out)
        step_terms |= {"g_rec": loss_rec.detach(), "mse": mse}  # (the order is the log's, and the non-finite check's)
        if gan:
            with ctx:
                loss_adv = losses.gan_loss_g(D_frozen(d_view(x_out), z, **cond))
            (grad_adv,) = torch.autograd.grad(lambda_gan * loss_adv, x_out)
            step_terms |= {"g_adv": loss_adv.detach(), "adv_rec": grad_adv.norm() / grad.norm()}  # G's gradient ratio
            grad = grad + grad_adv
        x_hat.backward(scaler.scale(grad / grad_accum))
        for key, v in step_terms.items():
            terms.setdefault(key, []).append(v.float())
    # optimiser steps, gradient norms (before clipping), EMA
    scaler.unscale_(opt_g)
    norm_g = clip_grad_norm(raw_G.parameters(), grad_clip)
    scaler.step(opt_g)
    opt_g.zero_grad(set_to_none=True)
    norms = {"gnorm_g": norm_g}
    if gan:
        scaler.unscale_(opt_d)
        norms["gnorm_d"] = clip_grad_norm(raw_D.parameters(), grad_clip_d)
        if do_r1:  # R1 (Sec. 3.3), clipped apart from the D loss (together, every R1 step would be a step of fixed
            # length along R1, whatever r1_gamma). On the uncompiled, unwrapped D (double backward), in fp32
            xr, zr, cr = r1_batch
            d_loss_grads = [p.grad for p in raw_D.parameters()]  # set aside: R1's gradient is clipped on its own
            raw_D.zero_grad(set_to_none=True)
            raw_D.requires_grad_(True)
            D_for_r1 = lambda xx: raw_D(xx, zr, **cr)
            if fsdp or activation_checkpointing:  # on the plain D_r1 (above), with D's own weights; under FSDP with
                # D's fp32 weights gathered whole (D's size once more, for now): the gradient of each rank's penalty
                # flows back through the gather as a reduce-scatter that averages over ranks, into this rank's
                # shards (as DDP's average below)
                whole = ({k: p.full_tensor(grad_placements=[Partial("avg")]) for k, p in raw_D.named_parameters()}
                         if fsdp else dict(raw_D.named_parameters()))
                D_for_r1 = lambda xx: torch.func.functional_call(D_r1, whole, (xx, zr), cr)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # the backend with a double backward
                r1 = losses.r1_penalty(D_for_r1, xr, gamma=r1_gamma, interval=r1_interval)
            r1.backward()  # once per step, not per micro-step: no 1 / grad_accum
            D_for_r1 = whole = None  # (the gathered weights, freed before D's optimiser step)
            raw_D.requires_grad_(False)
            if ddp:  # every rank penalised its own sample: average, then clip (the same on every rank)
                for p in raw_D.parameters():
                    if p.grad is not None:  # (none for weights that R1 does not depend on: the heads' biases)
                        dist.all_reduce(p.grad)
                        p.grad /= world
            norms["gnorm_r1"] = clip_grad_norm(raw_D.parameters(), grad_clip_r1)
            for p, g in zip(raw_D.parameters(), d_loss_grads):  # + the D loss's clipped gradient
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
            d_loss_grads = None
            terms["r1"] = [r1.detach()]
        scaler.step(opt_d)
        opt_d.zero_grad(set_to_none=True)
    terms |= {key: [v.float()] for key, v in norms.items()}
    scaler.update()
    with torch.no_grad():
        decay = min(ema_decay, (1 + step) / (10 + step)) if ema_warmup else ema_decay
        weights = [local(p) for p in raw_G.parameters()]  # under FSDP this rank's shards, the EMA's are alike
        if ema_cpu:
            weights = [w.cpu() for w in weights]
        torch._foreach_lerp_([local(p) for p in ema.parameters()], weights, 1 - decay)
    step += 1
    history.append((step, {key: torch.stack(v).mean() for key, v in terms.items()}))

    # log, check for NaN/Inf (once per interval: one GPU sync for all its steps), sample, checkpoint
    if step % log_interval == 0 or step == max_steps or step % ckpt_interval == 0:
        n = step - n_last
        values = iter(torch.stack([v for _, t in history for v in t.values()]).tolist())
        history = [(s, {key: next(values) for key in t}) for s, t in history]
        for s, t in history:  # the first step, and its first term in the order computed, to go non-finite
            if bad := next((key for key, v in t.items() if not math.isfinite(v)), None):
                stop(f"step {s}: {bad} is {t[bad]} (the first term to go non-finite)")
        avg = {key: sum(t[key] for _, t in history if key in t) / sum(key in t for _, t in history)
               for key in dict.fromkeys(key for _, t in history for key in t)}
        if holdout and everyone:  # G and D on pairs they never trained on, beside mse and d_real on the ones they did
            avg |= heldout_scores()
        dt = (time.time() - t_last) / n
        mem = f" | peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else ""
        log(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in avg.items())
            + f" | lr {lr_at(step - 1, lr_g):.2e} | {dt * 1000:.0f} ms | {batch_size / dt:.1f} img/s" + mem,
            avg | {"ms_per_step": dt * 1000})
        history, t_last, n_last = [], time.time(), step
    if everyone and (step % sample_interval == 0 or step == max_steps):
        os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
        sample_grid(os.path.join(out_dir, "samples", f"step{step:06d}.png"))
    if step % ckpt_interval == 0 or step == max_steps:
        if ddp:  # every rank must hold the same G: compare a sum of its weights (float64, no copy) before the save
            sums = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(world)]
            dist.all_gather(sums, torch.stack([p.detach().sum(dtype=torch.float64) for p in raw_G.parameters()]).sum())
            if len({s.item() for s in sums}) != 1:
                raise RuntimeError(f"step {step}: G differs between ranks (weight sums {[s.item() for s in sums]})")
            log(f"step {step}: G identical on all {world} ranks")
        for name, net in (("G", raw_G), ("EMA", ema), ("D", raw_D)):  # the weights, once per checkpoint
            if net is not None and (bad := nonfinite_weight(net)):
                stop(f"step {step}: {name}'s weights are not finite ({bad}) after its last update")
        if master or fsdp:  # (fsdp: every rank writes its shards)
            checkpoint()
        saved_step = step

# -----------------------------------------------------------------------------
# the end: metrics on validation captions (toy), cleanup
if everyone and toy and eval_samples:
    from toy.metrics import markdown, toy_table
    student = ema_net()
    table = toy_table(T, {"student (EMA, 1 step)": lambda z, c: generate(student, z, c)}, n=eval_samples, teacher=False)
    log(markdown(table, eval_samples))
    if master and os.path.exists(TEACHER_METRICS):  # measured once by toy/build.py, at the same N
        log(f"the teacher, for reference ({TEACHER_METRICS}):\n" + open(TEACHER_METRICS).read())
    if master:
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"step": step, **table}, f, indent=2)
if distributed:
    dist.destroy_process_group()
