"""
One-step text-to-image with a Diffusion2GAN student: prompt -> z -> one UNet call -> VAE decode.

    python sample.py --ckpt=out/toy/ckpt.pt --prompt="a large blue square on the left on a white background"
    python sample.py --ckpt=out/toy/ckpt.pt --prompts=captions.txt --out_dir=out/samples --with_teacher=True
    python sample.py --ckpt=out/toy/ckpt.pt --export=out/toy/student_unet    # the student as a diffusers UNet folder

The checkpoint's config names the teacher (for the text encoder, VAE and noise schedule) and G's parameterisation.
An exported student runs in diffusers as one DDIM step from t=999 that lands exactly on x0 (set_alpha_to_one=True;
the default False would add sqrt(1 - alpha_bar_0) = 0.029 of the predicted noise back), with no guidance:

    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    pipe = StableDiffusionPipeline.from_pretrained(teacher_folder, safety_checker=None,
        unet=UNet2DConditionModel.from_pretrained("out/toy/student_unet"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    image = pipe(prompt, latents=z, num_inference_steps=1, guidance_scale=1.0).images[0]

(tests/test_sample.py checks that this gives our latents within 1e-4; it holds for g_param='teacher'.)
"""
import os
import time

import torch
from PIL import Image

from common import autocast
from teacher import one_step, seeded_noise


def to_image(x):
    """One [3,H,W] float image in [-1,1] as an 8-bit PIL image."""
    return Image.fromarray(((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())


def load_student(ckpt_path, device="cpu", ema=True):
    """(teacher, G, config) from a train.py checkpoint: the teacher it names (text encoder, VAE, schedule) and G
    (its EMA weights by default) in eval mode."""
    import model
    from teacher import load_teacher
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = ckpt["config"]
    T = load_teacher("toy/weights/sd" if cfg["teacher"] == "toy" else cfg["teacher"], device)
    G = model.UNet(model.UNetConfig(**ckpt["unet_config"]))
    G.load_state_dict(ckpt["ema" if ema else "G"])
    return T, G.to(device).eval().requires_grad_(False), cfg


# -----------------------------------------------------------------------------
ckpt = "out/toy/ckpt.pt"  # a train.py checkpoint
prompt = ""  # one prompt ...
prompts = ""  # ... or a prompt file (.txt, .jsonl, COCO .json: see make_pairs.py)
n = 8  # images per prompt
seed = 0  # image i of the run uses noise seed + i
out_dir = "out/samples"
batch_size = 64
resolution = 0  # image side in pixels; 0 = the teacher's native one (make_pairs' default, so what G learned)
with_teacher = False  # also write a grid with the teacher's DDIM sample for the same z and prompt (slow)
teacher_steps = 25
teacher_guidance = 3.0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "float16" if torch.cuda.is_available() else "float32"  # the student's autocast: fp16, not bf16 (its x0 is
# eps x14.6, and bf16's rounding of eps would show; train.py's dtype_g)
compile = False  # torch.compile the student (worth it on a GPU for many batches)
compile_mode = "default"  # or "reduce-overhead": CUDA graphs, for small launch-bound batches (README: Speed)
export = ""  # instead of sampling: write the student (EMA) here as a diffusers UNet folder

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    from make_pairs import read_prompts
    from toy.shapes import to_pil
    T, G, cfg = load_student(ckpt, device)
    if export:
        if cfg["t_G"] != 999 or cfg["g_param"] != "teacher":  # the diffusers recipe reads t=999 and eps (or v)
            raise SystemExit(f"{ckpt}: a student trained with t_G={cfg['t_G']}, g_param={cfg['g_param']!r} does not "
                             "run as diffusers' one DDIM step (that needs t_G=999, g_param='teacher'); sample it here")
        from model import save_pretrained
        save_pretrained(G, export)
        print(f"wrote the student to {export} (diffusers UNet2DConditionModel; see this file's docstring)")
        raise SystemExit(0)
    texts = [prompt] if prompt else read_prompts(prompts)
    texts = [p for p in texts for _ in range(n)]
    res = resolution or T.resolution
    shape = T.latent_shape(res)
    ctx = autocast(device, dtype)
    net = torch.compile(G, mode=compile_mode) if compile else G
    os.makedirs(out_dir, exist_ok=True)
    images, teacher_images, t0 = [], [], time.time()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = texts[i:i + batch_size]
            z = seeded_noise(range(seed + i, seed + i + len(batch)), shape, device)
            cond, uncond = T.conditions(batch, res, res)
            images.append(T.decode(one_step(net, z, cond, T.alphas_cumprod, T.prediction_type, cfg["t_G"],
                                            cfg["g_param"], ctx)).cpu())
            if with_teacher:
                teacher_images.append(T.decode(T.sample(z, cond, uncond, teacher_steps, teacher_guidance)).cpu())
    dt = time.time() - t0
    images = torch.cat(images)
    for i, img in enumerate(images):
        to_image(img).save(os.path.join(out_dir, f"{i:05d}.png"))
    if with_teacher:
        to_pil(torch.stack([images, torch.cat(teacher_images)], 1).flatten(0, 1), nrow=8).save(
            os.path.join(out_dir, "student_vs_teacher.png"))
    print(f"{len(images)} images in {dt:.2f}s ({len(images) / dt:.1f} images/s"
          + (", teacher included" if with_teacher else "") + f") -> {out_dir}")
