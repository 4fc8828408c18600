# The embedded default, spelled out: `python train.py` and `python train.py config/toy.py` are the same run.
# The toy world (toy/build.py): 32x32 captioned shapes, 8x8x4 latents, a 1.8M-parameter SD1-style teacher.
out_dir = "out/toy"
teacher = "toy"
pairs = "pairs/toy"
regression = "e-latent-lpips"
lpips = "toy"
gan = True
batch_size = 64
max_steps = 400
lr_g = 3e-4  # G at 3x D's rate, both cooling down linearly to 0 over the last 30% of the steps
lr_d = 1e-4
cooldown = 0.3
