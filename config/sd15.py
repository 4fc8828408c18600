# Stable Diffusion 1.5 -> one step, the paper's SD-CFG-3 setting. First make the pairs (see README), e.g.
#   torchrun --standalone --nproc_per_node=8 make_pairs.py --prompts=captions.txt --out_dir=pairs/sd15-cfg3 \
#       --teacher=stable-diffusion-v1-5/stable-diffusion-v1-5 --guidance=3 --steps=50
# then: torchrun --standalone --nproc_per_node=8 train.py config/sd15.py
# The paper trained on 64 A100s at batch 1024; 8 GPUs at batch 128 is the same recipe at 1/8 of the batch.
out_dir = "out/sd15-cfg3"
teacher = "stable-diffusion-v1-5/stable-diffusion-v1-5"
pairs = "pairs/sd15-cfg3"
lpips = "sd15"  # the authors' calibrated LatentLPIPS (CC-BY-NC), downloaded once
regression = "e-latent-lpips"
# R1: the gradient of D's per-sample score (a mean over logit positions) w.r.t. its input shrinks with the
# latent's area (measured on the toy's D: ||grad||^2 falls 4x per 4x area, 8x8 -> 64x64), so gamma grows
# with it to keep R1's pull beside D's loss: the toy's 0.1 at 8x8 latents, x64 for 64x64. The batch does not
# enter: R1 is on one sample and D's loss is a batch mean, neither grows with the batch
r1_gamma = 6.4  # R1 every step (train.py's default) adds the cost of most of a step at SD1.5 size (R1 401 ms
# beside a 534 ms step, bench.md); --r1_interval=16 is the paper's lazy R1, which the toy's D did not survive
# d_real_noise and lambda_gan keep train.py's defaults (0.3 and 0.3, set on the toy, untested at this size): the
# noise is a std per latent element, and SD's scaled latents have std ~1 as the toy's do, so it does not scale
# with the area as gamma does. --d_real_noise=0 shows D clean reals, as the paper does
batch_size = 128
max_steps = 20000  # the paper's ablations ran 20k iterations
lr_g = 1e-5
lr_d = 1e-5
warmup = 500
cooldown = 0.0  # a constant rate after the warmup, as the paper trains (train.py's 0.3 is the toy's)
ema_decay = 0.9999
ema_warmup = True  # decay 1 - 9/(10+step), ~the last 1/9 of the steps (0.99955 at 20k): else 14% teacher weights
log_interval = 50
sample_interval = 1000
ckpt_interval = 1000
eval_samples = 0
compile = True  # torch.compile G and D: minutes of compiling at the start, repaid over a long run (not yet measured)
