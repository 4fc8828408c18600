"""
One-step text-to-image with a Diffusion2GAN student: prompt -> z -> one UNet call -> VAE decode.

    python sample.py --ckpt=out/toy/ckpt.pt --prompt="a large blue square on the left on a white background"
    python sample.py --ckpt=out/toy/ckpt.pt --prompts=captions.txt --out_dir=out/samples --with_teacher=True
    python sample.py --ckpt=out/toy/ckpt.pt --export=out/toy/student_unet    # the student as a diffusers UNet folder
    python sample.py --ckpt=out/toy/ckpt.pt --export=out/toy/student.safetensors  # or as one original-layout file
    python sample.py --ckpt=out/sdxl-cfg3/ckpt --export=out/sdxl-cfg3/student_unet  # a sharded (parallel=fsdp) one

The checkpoint's config names the teacher (for the text encoder, VAE and noise schedule) and G's parameterisation.
An exported student runs in diffusers as one DDIM step from t=999 that lands exactly on x0 (set_alpha_to_one=True;
the default False would add sqrt(1 - alpha_bar_0) = 0.029 of the predicted noise back), with no guidance:

    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    pipe = StableDiffusionPipeline.from_pretrained(teacher_folder, safety_checker=None,
        unet=UNet2DConditionModel.from_pretrained("out/toy/student_unet"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)
    image = pipe(prompt, latents=z, num_inference_steps=1, guidance_scale=1.0).images[0]

A .safetensors export is the single file of A1111, ComfyUI and civitai (the student UNet under
model.diffusion_model., the teacher's VAE and text encoder(s) beside it); in diffusers it is
StableDiffusionPipeline.from_single_file(path, config=teacher_folder) (StableDiffusionXLPipeline for SDXL), with the
same scheduler line; in other tools, one sampler step from t=999 (sigma_max) to 0 at CFG 1 (not tested: only
diffusers runs in our tests). tests/test_sample.py and tests/test_export.py check both exports against our latents
within 1e-4; it holds for g_param='teacher'.
"""
import os
import time

import torch

from common import autocast, image_grid, to_image
from teacher import one_step, seeded_noise


def teacher_of(cfg):
    """The teacher a train.py config names, with 'toy' resolved to the toy world's committed folder."""
    if cfg["teacher"] == "toy":
        import toy
        return toy.TEACHER
    return cfg["teacher"]


def read_student(ckpt_path, ema=True):
    """A train.py checkpoint as {config, unet_config, and its EMA (or G) weights under 'ema' ('G')}: from the file
    ckpt.pt, or from the sharded folder that parallel=fsdp writes (its shards put together whole, any world size)."""
    from weights import load_checkpoint, read_sharded_part
    if os.path.isdir(ckpt_path):
        part = "ema" if ema else "G"
        sd, meta = read_sharded_part(ckpt_path, part)
        return meta | {part: sd}
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path}: no such checkpoint (--ckpt= a train.py checkpoint: out_dir/ckpt.pt, "
                                "or the folder out_dir/ckpt of parallel=fsdp)")
    return load_checkpoint(ckpt_path)


def load_student(ckpt_path, device="cpu", ema=True):
    """(teacher, G, config) from a train.py checkpoint (a path, or the checkpoint already read): the teacher it names
    (text encoder, VAE, schedule) and G (its EMA weights by default) in eval mode."""
    import model
    from teacher import load_teacher
    ckpt = read_student(ckpt_path, ema) if isinstance(ckpt_path, str) else ckpt_path
    cfg = ckpt["config"]
    cfg["teacher"] = teacher_of(cfg)
    T = load_teacher(cfg["teacher"], device)
    G = model.UNet(model.UNetConfig(**ckpt["unet_config"]))
    G.load_state_dict(ckpt["ema" if ema else "G"])
    return T, G.to(device).eval().requires_grad_(False), cfg


def check_export_target(path, teacher, force):
    """Refuse an existing file or a non-empty folder unless force, and anything inside the teacher's own folder (or
    its single file) even with force: an export must never overwrite the weights it was distilled from."""
    real, home = os.path.realpath(path), os.path.realpath(teacher)
    if os.path.exists(teacher) and os.path.commonpath([real, home]) == home:
        raise SystemExit(f"--export={path}: is inside the teacher {teacher}, which an export never writes into "
                         "(not even with --force=True); export somewhere else")
    if path.endswith((".ckpt", ".pt", ".pth", ".bin")):
        raise SystemExit(f"--export={path}: we write single files as .safetensors only (loading a pickle can run "
                         "code); name it .safetensors")
    single = path.endswith(".safetensors")
    if os.path.isdir(path) if single else os.path.isfile(path):
        raise SystemExit(f"--export={path}: is a {'folder' if single else 'file'}; a name ending in .safetensors "
                         "writes one file, any other a diffusers UNet folder: choose another path")
    if not force and (os.path.isfile(path) or os.path.isdir(path) and os.listdir(path)):
        raise SystemExit(f"--export={path}: already exists" + ("" if single else " and is not empty")
                         + "; choose another path, or add --force=True to replace what is there")


def export_student(ckpt_path, path, force=False):
    """Write the EMA student of a train.py checkpoint to path: one original-layout .safetensors, or a diffusers UNet
    folder."""
    from teacher import save_single_file
    from weights import save_pretrained
    if not os.path.exists(ckpt_path):
        raise SystemExit(f"--ckpt={ckpt_path}: no such checkpoint (a train.py checkpoint: out_dir/ckpt.pt, or the "
                         "folder out_dir/ckpt of parallel=fsdp)")
    ck = read_student(ckpt_path)
    c = ck["config"]
    if c["t_G"] != 999 or c["g_param"] != "teacher":  # the diffusers recipe reads t=999 and eps (or v)
        raise SystemExit(f"{ckpt_path}: a student trained with t_G={c['t_G']}, g_param={c['g_param']!r} does not "
                         "run as diffusers' one DDIM step (that needs t_G=999, g_param='teacher'); sample it here")
    check_export_target(path, teacher_of(c), force)  # before the teacher is loaded: a refusal costs nothing
    T, G, _ = load_student(ck, "cpu")
    if path.endswith(".safetensors"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_single_file(T, G, path, {"sampler": "one step at t=999: DDIM with set_alpha_to_one=True, CFG 1"})
        print(f"wrote the student to {path} (one original-layout file: the student UNet with the teacher's VAE and "
              "text encoders; see this file's docstring)")
    else:
        save_pretrained(G, path)
        print(f"wrote the student to {path} (diffusers UNet2DConditionModel; see this file's docstring)")


# -----------------------------------------------------------------------------
ckpt = "out/toy/ckpt.pt"  # a train.py checkpoint (or the folder out_dir/ckpt that parallel=fsdp writes)
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
export = ""  # instead of sampling: write the student (EMA) here, as a diffusers UNet folder or (.safetensors) one
# original-layout file with the teacher's VAE and text encoders, for A1111, ComfyUI, diffusers' from_single_file
force = False  # --export may replace an existing file or write into a non-empty folder (never the teacher's)

if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    from make_pairs import read_prompts
    if export:
        export_student(ckpt, export, force)
        raise SystemExit(0)
    T, G, cfg = load_student(ckpt, device)
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
        image_grid(torch.stack([images, torch.cat(teacher_images)], 1).flatten(0, 1), nrow=8).save(
            os.path.join(out_dir, "student_vs_teacher.png"))
    print(f"{len(images)} images in {dt:.2f}s ({len(images) / dt:.1f} images/s"
          + (", teacher included" if with_teacher else "") + f") -> {out_dir}")
