# SDXL -> one step at 1024 px. Pairs from make_pairs.py with --teacher=stabilityai/stable-diffusion-xl-base-1.0.
# G and D are each a 2.6B-parameter UNet: with fp32 master weights and Adam this needs ~42 GB per model per GPU
# before activations, so plain DDP fits only on 80 GB+ cards at small micro-batches (FSDP is not wired in yet).
out_dir = "out/sdxl-cfg3"
teacher = "stabilityai/stable-diffusion-xl-base-1.0"
pairs = "pairs/sdxl-cfg3"
lpips = "sdxl"
regression = "e-latent-lpips"
batch_size = 64
grad_accum = 4
max_steps = 20000
lr_g = 5e-6
lr_d = 5e-6
warmup = 500
ema_decay = 0.9999
ema_warmup = True  # decay 1 - 9/(10+step), ~the last 1/9 of the steps (0.99955 at 20k): else 14% teacher weights
log_interval = 50
sample_interval = 1000
ckpt_interval = 1000
eval_samples = 0
compile = True  # torch.compile G and D: minutes of compiling at the start, repaid over a long run (not yet measured)
