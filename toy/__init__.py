"""The toy world: the embedded default of every script (see toy/README.md). Its committed weights, by path."""
import os

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TEACHER = os.path.join(WEIGHTS, "sd")  # an SD1-style diffusers pipeline folder: VAE, text encoder, tokenizer, UNet
LPIPS = os.path.join(WEIGHTS, "toy_latest_vgg16_tuned.safetensors")  # LatentLPIPS for the toy's latents
PIXEL_VGG = os.path.join(WEIGHTS, "toy_pixel_vgg16.safetensors")  # the image-space VGG of the pixel-LPIPS ablation
TEACHER_METRICS = os.path.join(WEIGHTS, "teacher_metrics.md")  # the teacher's rows of the toy table
