"""
Retrain the toy world from nothing, with the project's own code, into out_dir (default toy/weights):
- the metrics classifier (toy/classifier.py; trained on its own, it shares nothing with the models it measures);
- the VAE, the text encoder + tokenizer and the teacher UNet, written as an SD1-style diffusers pipeline folder
  (sd/) that teacher.py loads exactly like Stable Diffusion 1.5;
- the latent VGG trunk for LatentLPIPS (toy_latest_vgg16_tuned.safetensors), and an image-space one for the pixel
  LPIPS row of the paper's ablation (toy_pixel_vgg16.safetensors);
- the teacher's rows of the toy table (teacher_metrics.md/.json, measured with the committed classifier) and a
  grid of its samples at guidance 3 and 1 (teacher_grid.png).

    python -m toy.build                      # every stage, in order
    python -m toy.build --stage=vae,teacher  # some stages (classifier, vae, teacher, lpips, pixel, eval); later stages
                                             # read the earlier ones' outputs from out_dir
"""
import json
import math
import os
import time

import torch
import torch.nn.functional as F

import model
import weights
from toy import shapes

# -----------------------------------------------------------------------------
# knobs
stage = "all"  # all, or a comma-separated list of: classifier, vae, teacher, lpips, pixel, eval
out_dir = "toy/weights"  # the pipeline goes to out_dir/sd
seed = 0
threads = 0  # torch threads (0 = torch's default)
# VAE: the component that caps everything after it (a lost object can never be generated), so it gets most care
vae_steps = 3000
vae_batch = 32
vae_lr = 2e-3
vae_object_weight = 5.0  # reconstruction weight of object pixels vs background pixels: small objects matter
vae_kl = 1e-6  # a whisper of KL, as SD, to keep the latent space smooth
# teacher: text encoder and UNet trained together with SD1's eps-prediction loss and schedule
teacher_steps = 5000
teacher_batch = 64
teacher_lr = 1e-3
caption_dropout = 0.1  # captions replaced by "" so that classifier-free guidance works, as in SD
caption_noise = 0.05  # chance that each attribute word of a training caption names a wrong value, as web alt-text
# often does: with always-right captions (0) the teacher follows them unguided and guidance adds ~1 point; with 0.05, ~13
text_width = 64  # the tiny CLIP text tower: width, layers, heads, token positions
text_layers = 2
text_heads = 2
text_positions = 32
# the latent VGG16-BN trunk of LatentLPIPS, trained to classify the shapes' attributes from their latents (our
# stand-in for the paper's ImageNet classification in latent space); its heads stay uncalibrated (ones)
lpips_width = 8  # channels in units of the real trunk's 64
lpips_steps = 1500
lpips_batch = 128
lpips_lr = 2e-3
pixel_steps = 1500  # the image-space VGG16-BN trunk (same width, batch and lr): the toy's ImageNet VGG of pixel LPIPS
# -----------------------------------------------------------------------------
from configurator import configure  # noqa: E402

config = configure(globals())


def batches(batch, step0=0):
    """Training images from seeds that never repeat across steps (and never reach the validation range)."""
    step = step0
    while True:
        yield shapes.make_batch(range(seed * 10**7 + step * batch, seed * 10**7 + (step + 1) * batch))
        step += 1


def cosine_lr(opt, base, step, total, warmup=100):
    lr = base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for g in opt.param_groups:
        g["lr"] = lr


def train_vae():
    torch.manual_seed(seed)
    vae = model.VAE(model.VAE_PRESETS["toy"])
    opt = torch.optim.Adam(vae.parameters(), lr=vae_lr)
    t0 = time.time()
    for step, (x, _, _) in zip(range(vae_steps), batches(vae_batch)):
        cosine_lr(opt, vae_lr, step, vae_steps)
        mean, logvar = vae.encode(x)
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        rec = vae.decode(z)
        # background is one flat colour: every pixel that differs from the corner pixel belongs to an object
        obj = (x != x[:, :, :1, :1]).any(1, keepdim=True).float()
        w = 1 + (vae_object_weight - 1) * obj
        rec_loss = (w * ((rec - x) ** 2 + (rec - x).abs())).mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        loss = rec_loss + vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            print(f"vae step {step} | rec {rec_loss.item():.4f} | kl {kl.item():.1f} | {time.time() - t0:.0f}s", flush=True)
    vae.eval()
    # SD's scaling factor makes the latents unit-variance (0.18215 for SD1): measure ours the same way
    with torch.no_grad():
        x, _, _ = shapes.make_batch(range(10**8, 10**8 + 2000))
        vae.cfg.scaling_factor = round(1.0 / vae.encode(x)[0].std().item(), 5)
    weights.save_pretrained(vae, os.path.join(out_dir, "sd", "vae"))
    print(f"vae: scaling_factor {vae.cfg.scaling_factor}, {time.time() - t0:.0f}s")
    return vae


def scaled_linear_alphas_cumprod(T=1000, beta_start=0.00085, beta_end=0.012):
    """SD's noise schedule: betas linear in sqrt space from 0.00085 to 0.012, alpha_bar their running product."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, dim=0)


def write_pipeline_files(sd_dir):
    """The small json files that make sd_dir a diffusers StableDiffusionPipeline folder (SD1.5's scheduler)."""
    with open(os.path.join(sd_dir, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": weights.DIFFUSERS_VERSION,
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
                   "feature_extractor": [None, None], "requires_safety_checker": False}, f, indent=2)
    os.makedirs(os.path.join(sd_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(sd_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", "_diffusers_version": weights.DIFFUSERS_VERSION,
                   "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                   "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
                   "prediction_type": "epsilon", "timestep_spacing": "trailing"}, f, indent=2)


def train_teacher():
    """Text encoder + UNet, trained jointly from scratch on VAE latents of the shapes: a tiny SD1.5."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from toy.tokenizer import write_clip_tokenizer
    sd_dir = os.path.join(out_dir, "sd")
    vae = weights.load_vae(sd_dir).requires_grad_(False)
    scale = vae.cfg.scaling_factor
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(sd_dir, "tokenizer"), shapes.VOCAB,
                                                             max_length=text_positions))
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, max_position_embeddings=text_positions, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        projection_dim=text_width))
    unet = model.UNet(model.UNET_PRESETS["toy"])
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=teacher_lr, weight_decay=0.01)
    abar = scaled_linear_alphas_cumprod()
    noise_rng = torch.Generator().manual_seed(seed + 1)  # its own RNG: caption_noise=0 leaves the run bit-identical
    t0 = time.time()
    for step, (x, caps, labels) in zip(range(teacher_steps), batches(teacher_batch, step0=10**5)):
        cosine_lr(opt, teacher_lr, step, teacher_steps)
        with torch.no_grad():
            z0 = vae.encode(x)[0] * scale
        if caption_noise:
            caps = [shapes.caption(l) for l in shapes.noisy_labels(labels, caption_noise, noise_rng)]
        caps = ["" if torch.rand(()) < caption_dropout else c for c in caps]
        ids = tok(caps, padding="max_length", max_length=text_positions, truncation=True, return_tensors="pt").input_ids
        context = text(ids).last_hidden_state  # SD1.x conditioning: the last layer after the final LayerNorm
        t = torch.randint(0, 1000, (x.shape[0],))
        eps = torch.randn_like(z0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * eps, t, context), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == teacher_steps - 1:
            print(f"teacher step {step} | loss {loss.item():.4f} | {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % 1000 == 0:  # save as we go: a usable teacher early
            save_teacher(sd_dir, unet, text)
    save_teacher(sd_dir, unet, text)
    print(f"teacher: {time.time() - t0:.0f}s")


def save_teacher(sd_dir, unet, text):
    weights.save_pretrained(unet, os.path.join(sd_dir, "unet"))
    text.save_pretrained(os.path.join(sd_dir, "text_encoder"))
    write_pipeline_files(sd_dir)


def train_lpips(pixel=False):
    """LatentLPIPS trunk for the toy latents, saved with the official checkpoint's keys (net.slice*, lin*).
    pixel=True: the same for images (all five pools, ImageNet-normalised input as losses.regression_loss gives
    it), the trunk of the 'pixel-lpips' regression loss; it learns the same attribute task from pixels."""
    from losses import IMAGENET_SCALE, IMAGENET_SHIFT, LatentLPIPS
    from toy.classifier import N_CLASSES
    vae = None if pixel else weights.load_vae(os.path.join(out_dir, "sd")).requires_grad_(False)  # pixels need none
    torch.manual_seed(seed)
    c = 3 if pixel else vae.cfg.latent_channels
    lp = LatentLPIPS(in_channels=c, width=lpips_width, latent=not pixel)
    steps, name = (pixel_steps, "pixel") if pixel else (lpips_steps, "lpips")
    lp.requires_grad_(True)
    for m in lp.modules():  # LatentLPIPS pins itself to eval mode for use as a loss; here it is being trained
        m.training = True
    head = torch.nn.Linear(8 * lpips_width, sum(N_CLASSES))
    params = list(lp.net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lpips_lr, weight_decay=1e-4)
    t0 = time.time()
    for step, (x, _, labels) in zip(range(steps), batches(lpips_batch, step0=10**6)):
        cosine_lr(opt, lpips_lr, step, steps)
        with torch.no_grad():
            z = (x - IMAGENET_SHIFT) / IMAGENET_SCALE if pixel else vae.encode(x)[0] * vae.cfg.scaling_factor
        logits = head(lp.features(z)[-1].mean((2, 3))).split(N_CLASSES, dim=1)
        loss = sum(F.cross_entropy(l, y) for l, y in zip(logits, labels.T)) / len(N_CLASSES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            acc = torch.stack([l.argmax(1) == y for l, y in zip(logits, labels.T)]).float().mean()
            print(f"{name} step {step} | loss {loss.item():.4f} | acc {acc:.3f} | {time.time() - t0:.0f}s", flush=True)
    from safetensors.torch import save_file
    lp.eval()
    path = os.path.join(out_dir, "toy_pixel_vgg16.safetensors" if pixel else "toy_latest_vgg16_tuned.safetensors")
    save_file({k: v.contiguous() for k, v in lp.state_dict().items()}, path + ".tmp",
              metadata={"width": str(lpips_width), "in_channels": str(c)})
    os.replace(path + ".tmp", path)
    print(f"{name}: {path}, {time.time() - t0:.0f}s")


def eval_teacher(n=500):
    """The teacher's rows of the toy table (eval.py), kept beside the weights so train.py can print them."""
    from toy.metrics import markdown, toy_table
    from teacher import load_teacher
    t0 = time.time()
    table = toy_table(load_teacher(os.path.join(out_dir, "sd")), {}, n=n)
    md = markdown(table, n)
    with open(os.path.join(out_dir, "teacher_metrics.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out_dir, "teacher_metrics.json"), "w") as f:
        json.dump(table, f, indent=2)
    # a grid by threes: a real image with the caption, the teacher at guidance 3, at guidance 1 (same z per caption)
    from PIL import Image

    from common import image_grid
    from teacher import seeded_noise
    T = load_teacher(os.path.join(out_dir, "sd"))
    n_obj = [1] * 8 + [2] * 8
    caps = [shapes.sample(s, k)[1] for s, k in zip(shapes.val_seeds(16), n_obj)]
    real = torch.cat([shapes.make_batch([s], k)[0] for s, k in zip(shapes.val_seeds(16), n_obj)])
    cond, uncond = T.conditions(caps)
    z = seeded_noise(range(10**6, 10**6 + 16), T.latent_shape())
    rows = [T.decode(T.sample(z, cond, uncond, 25, g)) for g in (3.0, 1.0)]
    grid = image_grid(torch.stack([real, *rows], 1).flatten(0, 1), nrow=12)
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(os.path.join(out_dir, "teacher_grid.png"))
    print(md + f"\neval: {time.time() - t0:.0f}s")


STAGES = ("classifier", "vae", "teacher", "lpips", "pixel", "eval")

if __name__ == "__main__":
    unknown = [s for s in stage.split(",") if s not in STAGES + ("all",)]
    if unknown:
        raise SystemExit(f"--stage={stage!r}: unknown {', '.join(unknown)} (stages: all, {', '.join(STAGES)})")
    if threads:
        torch.set_num_threads(threads)
    t_all = time.time()
    if stage == "all" or "classifier" in stage.split(","):  # the metric network, independent of all the rest
        from toy import classifier
        classifier.main(os.path.join(out_dir, "classifier.safetensors"))
    if stage == "all" or "vae" in stage.split(","):
        train_vae()
    if stage == "all" or "teacher" in stage.split(","):
        train_teacher()
    if stage == "all" or "lpips" in stage.split(","):
        train_lpips()
    if stage == "all" or "pixel" in stage.split(","):
        train_lpips(pixel=True)
    if stage == "all" or "eval" in stage.split(","):
        eval_teacher()
    print(f"toy.build {stage}: {time.time() - t_all:.0f}s")
