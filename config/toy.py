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
