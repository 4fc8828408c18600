"""
Metrics and the results table: the toy world's table (toy/metrics.py: an FID-like distance, attribute accuracy,
distance to the teacher and sharpness, all read by a classifier trained on the toy's images), or, for real teachers
and their students, the field's COCO protocol (clean-fid FID and CLIP score; see the README).

    python eval.py                                   # the teacher rows of the toy table
    python eval.py --ckpt=out/toy/ckpt.pt --out=out/toy/results   # + a student, written as .md and .json
    python eval.py --sanity=True                     # the toy metric's floor on real images, and its reactions
    torchrun --standalone --nproc_per_node=8 eval.py --coco=coco2014 --ckpt=out/sd15-cfg3/ckpt.pt --out=DIR
"""
import hashlib
import json
import os
import random

import torch
from PIL import Image

from common import to_image


# -----------------------------------------------------------------------------
# real models: the COCO protocol

COCO = {  # protocol -> (captions file, image folder, captions, image side)
    "coco2014": ("annotations/captions_val2014.json", "val2014", 30000, 256),  # SD1.5 / SD2.1 tables
    "coco2017": ("annotations/captions_val2017.json", "val2017", 5000, 512),  # SDXL tables
}
COCO_FETCH = ("mkdir -p {d} && cd {d} && wget http://images.cocodataset.org/zips/{f}.zip "
              "http://images.cocodataset.org/annotations/annotations_trainval{y}.zip && unzip -q {f}.zip && "
              "unzip -q annotations_trainval{y}.zip")
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLIP_PREFIX = "A photo depicts "  # the protocol's caption prefix for the CLIP score


def need(package, pip_name, what):
    """Import an optional package, or stop with the command that installs it."""
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"{what} needs the optional package {pip_name}: pip install {pip_name}") from None


def center_crop_resize(img, size):
    """The protocol's image transform: the largest centred square, then a PIL LANCZOS resize to size x size."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.convert("RGB").crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def coco_captions(path, n, seed=0):
    """n distinct images of a COCO captions file drawn with a fixed seed, one of each image's captions (also drawn):
    [{"image_id", "file_name", "caption"}], the same list on every machine and rank."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: COCO captions file not found (see --help for the command that fetches it)")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise ValueError(f"{path}: not a COCO captions file (needs 'images' and 'annotations')")
    files = {im["id"]: im["file_name"] for im in data["images"]}
    caps = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        caps.setdefault(a["image_id"], []).append(" ".join(a["caption"].split()))
    ids = sorted(caps)
    if n > len(ids):
        raise ValueError(f"{path}: {n} captions asked for, but only {len(ids)} images have captions")
    rng = random.Random(seed)
    return [{"image_id": i, "file_name": files[i], "caption": rng.choice(caps[i])} for i in rng.sample(ids, n)]


def rank_share(n, rank, world):
    """The indices rank `rank` of `world` handles: every index in 0..n-1 belongs to exactly one rank."""
    return range(rank, n, world)


def save_png(img, path):
    """Atomic PNG write: an interrupted run never leaves a half-written image that a resume would keep. The
    temporary name is the process's own: runs that share the reference folder may write the same image at once."""
    tmp = f"{path}.{os.getpid()}.tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def check_folder_settings(folder, settings):
    """Record what decides a folder's images in folder/settings.json, or check it against the run that wrote them:
    a resumed run must not keep images of another model, sampler or caption draw. Every rank may call this at once
    (they write the same text, atomically)."""
    from make_pairs import settings_diff
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != settings:
            raise SystemExit(f"{path}: the images here were made with other settings ({settings_diff(old, settings)})."
                             " Use another --out (--ref_dir for the reference images), or delete the folder to start "
                             "over")
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)


def write_images(make, rows, folder, size, rank=0, world=1, batch_size=16, desc="images"):
    """Write image i of rows as folder/{i:06d}.png (centre-cropped, resized to size) for this rank's share,
    skipping those already there: a stopped run resumes. make(indices) returns the PIL images or [-1,1] tensors
    for those rows; with per-index seeds the images do not depend on the rank count or the batch size."""
    from tqdm import tqdm

    os.makedirs(folder, exist_ok=True)
    todo = [i for i in rank_share(len(rows), rank, world) if not os.path.exists(os.path.join(folder, f"{i:06d}.png"))]
    for k in tqdm(range(0, len(todo), batch_size), desc=f"{desc} (rank {rank})", disable=not todo):
        batch = todo[k:k + batch_size]
        for i, img in zip(batch, make(batch)):
            img = to_image(img) if isinstance(img, torch.Tensor) else img
            save_png(center_crop_resize(img, size), os.path.join(folder, f"{i:06d}.png"))
    return len(todo)


def real_images(rows, image_dir):
    """make() for write_images: the real COCO images of rows."""
    def make(indices):
        out = []
        for i in indices:
            path = os.path.join(image_dir, rows[i]["file_name"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: COCO image not found (is --coco_dir the folder the fetch command "
                                        "unpacked into?)")
            out.append(Image.open(path))
        return out
    return make


def clean_fid(gen_dir, ref_dir, inception="", device="cuda"):
    """FID between two folders with clean-fid in 'clean' mode (Inception 2015-12-05). inception: a folder holding
    inception-2015-12-05.pt for machines that cannot download it ('' = clean-fid fetches it itself)."""
    cleanfid = need("cleanfid.fid", "clean-fid", "FID")
    extractor = None
    if inception:
        if not os.path.isfile(os.path.join(inception, "inception-2015-12-05.pt")):
            raise FileNotFoundError(f"{inception}/inception-2015-12-05.pt not found: fetch it with "
                                    f"wget -P {inception} {INCEPTION_URL}")
        from cleanfid.inception_torchscript import InceptionV3W
        net = InceptionV3W(inception, download=False).to(device).eval()
        extractor = lambda x: net(x)  # noqa: E731
    return float(cleanfid.compute_fid(gen_dir, ref_dir, mode="clean", device=torch.device(device),
                                      custom_feat_extractor=extractor, num_workers=0))


def load_clip(weights="", device="cuda"):
    """open_clip ViT-g/14 (laion2b_s12b_b42k), or the same architecture from a local weights file."""
    open_clip = need("open_clip", "open_clip_torch", "The CLIP score")
    if weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: CLIP weights not found (the file is open_clip_pytorch_model.bin of "
                                "laion/CLIP-ViT-g-14-laion2B-s12B-b42K on the Hugging Face hub)")
    net, _, preprocess = open_clip.create_model_and_transforms("ViT-g-14", pretrained=weights or "laion2b_s12b_b42k")
    return net.to(device).eval(), preprocess, open_clip.get_tokenizer("ViT-g-14")


@torch.no_grad()
def clip_score(folder, captions, net, preprocess, tokenizer, device="cuda", batch_size=64):
    """The mean raw cosine (not x100, not clipped at 0) between image i of folder and CLIP_PREFIX + captions[i]."""
    total = 0.0
    for k in range(0, len(captions), batch_size):
        idx = range(k, min(k + batch_size, len(captions)))
        x = torch.stack([preprocess(Image.open(os.path.join(folder, f"{i:06d}.png"))) for i in idx]).to(device)
        t = tokenizer([CLIP_PREFIX + captions[i] for i in idx]).to(device)
        a = torch.nn.functional.normalize(net.encode_image(x).float(), dim=-1)
        b = torch.nn.functional.normalize(net.encode_text(t).float(), dim=-1)
        total += (a * b).sum().item()
    return total / len(captions)


# -----------------------------------------------------------------------------
ckpt = ""  # comma-separated train.py checkpoints to add as rows (their EMA students); '' = teacher rows only
n = 500  # toy: validation captions per object count
teacher_steps = 25
guidance = 3.0
out = ""  # toy: also write the table here as .md and .json ('' = print only); coco: the run's folder
sanity = False  # toy: instead, the metric's own sanity table on real (and damaged) validation images
# the COCO protocol (real models). Fetch COCO first, e.g. for coco2014:
#   mkdir -p data/coco && cd data/coco && wget http://images.cocodataset.org/zips/val2014.zip \
#     http://images.cocodataset.org/annotations/annotations_trainval2014.zip && unzip -q val2014.zip && \
#     unzip -q annotations_trainval2014.zip
coco = ""  # '' = the toy table; coco2014 (SD1.5/2.1: 30k captions, 256 px) or coco2017 (SDXL: 5k, 512 px)
coco_dir = "data/coco"  # holds annotations/ and val2014/ (val2017/)
coco_n = 0  # captions (0 = the protocol's 30k or 5k)
coco_seed = 0  # draws the captions; image i uses noise seed coco_seed * 10**6 + i
teacher = ""  # coco: evaluate this teacher (DDIM teacher_steps, guidance) instead of a --ckpt student
ref_dir = ""  # the real images, cropped and resized ('' = data/coco/{coco}-{n}-{size}); shared by all runs
inception = ""  # a folder with inception-2015-12-05.pt for offline machines ('' = clean-fid downloads it)
clip = ""  # a local open_clip ViT-g-14 weights file ('' = open_clip downloads laion2b_s12b_b42k)
metrics = "fid,clip"
batch_size = 16
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # coco: the teacher's weights and compute
dtype_g = "float16" if torch.cuda.is_available() else "float32"  # coco: the student's autocast (fp16: see train.py)

def sanity_table():
    """The toy metric's own floor and reactions: real validation images (not in the reference set), and damaged ones."""
    from toy import shapes
    from toy.classifier import blur
    from toy.metrics import toy_metrics
    # real images that are not in the reference set set the floor; damaged ones show that the metrics react
    n = 1000
    g = torch.Generator().manual_seed(0)
    print(f"{'images (N=%d)' % n:28s} {'objects':>8s} {'fid':>8s} {'acc':>6s}")
    for n_objects in (1, 2):
        seeds = range(shapes.VAL_SEED0 + 10**6, shapes.VAL_SEED0 + 10**6 + n)  # validation seeds past the reference
        x, _, y = shapes.make_batch(seeds, n_objects)
        rows = {"real": x, "real, blur sigma 1": blur(x, torch.ones(n)),
                "real, blur sigma 2": blur(x, 2 * torch.ones(n)),
                "real, noise 0.2": x + 0.2 * torch.randn(x.shape, generator=g),
                "real, wrong captions": x[torch.randperm(n, generator=g)]}
        for name, images in rows.items():
            m = toy_metrics(images, y, n_objects)
            print(f"{name:28s} {n_objects:8d} {m['fid']:8.3f} {m['acc']:6.3f}")


def main():
    """The toy table: the teacher rows, and a row for each --ckpt student."""
    import toy
    from sample import load_student
    from teacher import load_teacher, one_step
    from toy.metrics import markdown, toy_table
    if out:  # written after minutes of sampling: check the place first
        check_writable(os.path.dirname(os.path.abspath(out)), "out", out)
    T, students, teachers = None, {}, {}
    for path in [p for p in ckpt.split(",") if p]:
        T, G, cfg = load_student(path)
        teachers[path] = cfg["teacher"]
        if len(set(teachers.values())) > 1:  # one table: the same captions, conditions and decoder for every row
            raise SystemExit(f"--ckpt: the checkpoints name different teachers ({teachers}); evaluate them apart")
        students[f"student {path} (EMA, 1 step)"] = (lambda z, c, G=G, cfg=cfg, T=T: one_step(
            G, z, c, T.alphas_cumprod, T.prediction_type, cfg["t_G"], cfg["g_param"]))
    T = T or load_teacher(toy.TEACHER)
    table = toy_table(T, students, n, teacher_steps, guidance)
    md = markdown(table, n)
    print(md)
    if out:
        write_text(out + ".md", md + "\n")
        write_text(out + ".json", json.dumps(table, indent=2))


def check_writable(folder, knob, value=None):
    """Create folder (and its parents) and write a file in it, or stop with one line naming the knob (--knob=value)."""
    probe = os.path.join(folder, f".write-test.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        what = "this folder" if value is None else f"its folder {folder}"
        why = "a file is where a folder must be" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise SystemExit(f"--{knob}={value or folder}: cannot create or write {what} ({why}: {e.filename or folder}); "
                         f"choose a --{knob} in a writable place") from None


def write_text(path, text):
    """Atomic text write: a temporary name (this process's own), then a rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def coco_main():
    """The COCO protocol for one model, a student (--ckpt) or a teacher (--teacher): this rank's share of the
    images (skipping those already written), the reference images likewise, then FID and CLIP score on rank 0."""
    import torch.distributed as dist

    from common import autocast, setup_distributed
    from sample import load_student
    from teacher import hash_weights, load_teacher, one_step, seeded_noise
    if coco not in COCO:
        raise SystemExit(f"--coco={coco!r}: choose coco2014 or coco2017")
    if bool(ckpt) == bool(teacher) or "," in ckpt:
        raise SystemExit("--coco evaluates one model: give --ckpt=a train.py checkpoint or --teacher=a teacher")
    if not out:
        raise SystemExit("--coco needs --out=a folder for the images and the results")
    cap_file, image_folder, n_default, size = COCO[coco]
    cap_path = os.path.join(coco_dir, cap_file)
    if not os.path.isfile(cap_path) or not os.path.isdir(os.path.join(coco_dir, image_folder)):
        raise SystemExit(f"{cap_path} or {os.path.join(coco_dir, image_folder)}/ not found. Fetch COCO with:\n  "
                         + COCO_FETCH.format(d=coco_dir, f=image_folder, y=coco[4:]))
    # fail now, not after hours of generation: the metric files, then the metric packages
    if "fid" in metrics and inception and not os.path.isfile(os.path.join(inception, "inception-2015-12-05.pt")):
        raise SystemExit(f"{inception}/inception-2015-12-05.pt not found: fetch it with "
                         f"wget -P {inception} {INCEPTION_URL}")
    if "clip" in metrics and clip and not os.path.isfile(clip):
        raise SystemExit(f"{clip}: CLIP weights not found (open_clip_pytorch_model.bin of "
                         "laion/CLIP-ViT-g-14-laion2B-s12B-b42K on the Hugging Face hub)")
    if "fid" in metrics:
        need("cleanfid.fid", "clean-fid", "FID")
    if "clip" in metrics:
        need("open_clip", "open_clip_torch", "The CLIP score")
    check_writable(out, "out")  # the results are written last: a folder that cannot take them must stop us first
    ddp, rank, world, dev = setup_distributed(device, timeout_hours=24)  # ranks meet once, when all images exist
    N = coco_n or n_default
    rows = coco_captions(cap_path, N, coco_seed)
    ptdtype = getattr(torch, dtype)
    if ckpt:
        T, G, cfg = load_student(ckpt, dev)
        ctx = autocast(dev, dtype_g)
        sample_fn = lambda z, c, u: one_step(G, z, c, T.alphas_cumprod, T.prediction_type, cfg["t_G"],  # noqa: E731
                                             cfg["g_param"], ctx)
    else:
        T = load_teacher(teacher, dev, ptdtype)
        sample_fn = lambda z, c, u: T.sample(z, c, u, teacher_steps, guidance)  # noqa: E731

    @torch.no_grad()
    def make(indices):  # image i: caption i, noise seed coco_seed * 10**6 + i, at the teacher's resolution
        cond, uncond = T.conditions([rows[i]["caption"] for i in indices])
        z = seeded_noise([coco_seed * 10**6 + i for i in indices], T.latent_shape(), dev)
        return T.decode(sample_fn(z, cond, uncond)).cpu()

    images, ref = os.path.join(out, "images"), ref_dir or os.path.join(coco_dir, f"{coco}-{N}-{size}px-seed{coco_seed}")
    draw = dict(protocol=coco, captions=N, coco_seed=coco_seed, image_size=size)
    h = hashlib.sha256(T.fingerprint().encode())  # the weights that make the images: teacher, VAE, student
    hash_weights(h, "vae", T.vae)
    if ckpt:
        hash_weights(h, "student", G)
    sampler = (f"one step (EMA) at t={cfg['t_G']}, {cfg['g_param']}" if ckpt
               else f"DDIM {teacher_steps} steps, guidance {guidance:g}")
    check_folder_settings(images, dict(draw, model=ckpt or teacher, weights_sha256=h.hexdigest(), sampler=sampler,
                                       dtype=dtype_g if ckpt else dtype))
    check_folder_settings(ref, draw)
    write_images(make, rows, images, size, rank, world, batch_size, "generated")
    write_images(real_images(rows, os.path.join(coco_dir, image_folder)), rows, ref, size, rank, world, 64, "reference")
    if ddp:
        dist.barrier()
    if rank == 0:
        for folder in (images, ref):
            missing = [i for i in range(N) if not os.path.exists(os.path.join(folder, f"{i:06d}.png"))]
            if missing:
                raise SystemExit(f"{folder}: {len(missing)} of {N} images missing (first {missing[0]:06d}.png); "
                                 "re-run the same command to finish them")
        res = {"protocol": coco, "captions": N, "image_size": size, "coco_seed": coco_seed, "model": ckpt or teacher,
               "sampler": sampler,
               "images": images, "reference": ref}
        if "fid" in metrics:
            res["fid"] = clean_fid(images, ref, inception, dev)
        if "clip" in metrics:
            res["clip"] = clip_score(images, [r["caption"] for r in rows], *load_clip(clip, dev), dev)
        write_text(os.path.join(out, "captions.json"), json.dumps(rows))  # the exact captions and images, recorded
        write_text(os.path.join(out, "results.json"), json.dumps(res, indent=2))
        md = (f"| model | sampler | {coco} FID-{N // 1000}k | CLIP score |\n|---|---|---|---|\n| {res['model']} | "
              f"{res['sampler']} | {res.get('fid', float('nan')):.2f} | {res.get('clip', float('nan')):.4f} |")
        write_text(os.path.join(out, "results.md"), md + "\n")
        print(md)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    coco_main() if coco else sanity_table() if sanity else main()
