# SDXL -> one step at 1024 px. Pairs from make_pairs.py with --teacher=stabilityai/stable-diffusion-xl-base-1.0.
# G and D are each a 2.57B-parameter UNet: their fp32 weights, gradients and Adam moments (16 bytes per parameter)
# and G's EMA (4) hold 86 GiB per GPU under DDP before activations, more than an 80 GB card. Run it with
# --parallel=fsdp, which shards all of that over the GPUs: 10.8 GiB each on 8 (computed; README.md, Memory).
out_dir = "out/sdxl-cfg3"
teacher = "stabilityai/stable-diffusion-xl-base-1.0"
pairs = "pairs/sdxl-cfg3"
lpips = "sdxl"
regression = "e-latent-lpips"
# R1: the gradient of D's per-sample score (a mean over logit positions) w.r.t. its input shrinks with the
# latent's area (measured on the toy's D: ||grad||^2 falls 4x per 4x area, 8x8 -> 64x64), so gamma grows
# with it to keep R1's pull beside D's loss: the toy's 0.1 at 8x8 latents, x256 for 128x128. The batch does not
# enter: R1 is on one sample and D's loss is a batch mean, neither grows with the batch
r1_gamma = 25.6  # R1 every step (train.py's default) adds the cost of most of a step at SD1.5 size (R1 401 ms
# beside a 534 ms step, bench.md); --r1_interval=16 is the paper's lazy R1, which the toy's D did not survive
# d_real_noise and lambda_gan keep train.py's defaults (0.3 and 0.3, set on the toy, untested at this size): the
# noise is a std per latent element, and SD's scaled latents have std ~1 as the toy's do, so it does not scale
# with the area as gamma does. --d_real_noise=0 shows D clean reals, as the paper does
batch_size = 64
grad_accum = 4
max_steps = 20000
lr_g = 5e-6
lr_d = 5e-6
warmup = 500
cooldown = 0.0  # a constant rate after the warmup, as the paper trains (train.py's 0.3 is the toy's)
ema_decay = 0.9999
ema_warmup = True  # decay 1 - 9/(10+step), ~the last 1/9 of the steps (0.99955 at 20k): else 14% teacher weights
log_interval = 50
sample_interval = 1000
ckpt_interval = 1000
eval_samples = 0
compile = True  # torch.compile G and D: minutes of compiling at the start, repaid over a long run (not yet measured)
