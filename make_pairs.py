"""
Stage 1 of Diffusion2GAN: run the frozen teacher's deterministic DDIM ODE (with classifier-free guidance) from noise
z and a prompt, and store the (z, prompt, x) pairs that the one-step student regresses. One process or many:

    python make_pairs.py --prompts=captions.txt --out_dir=pairs/sd15-cfg3 --teacher=path/or/org/name
    torchrun --standalone --nproc_per_node=8 make_pairs.py --prompts=captions.txt --out_dir=pairs/sd15-cfg3 ...

Pair i uses prompt i % len(prompts) and its own noise, randn from a generator seeded with seed + i (CPU, fp32).
Shard k holds pairs [k*S, (k+1)*S) and is made by one process, in batches that start at its first pair, so the files
do not depend on the number of processes. Re-running the same command resumes (finished shards are skipped); a folder
made with another teacher or other settings is refused. On most CPUs, with an SD1.x/SD2.x teacher, the files are also
the same bits for any batch size and thread count (SDXL's per-sample added embedding still rounds by batch size); an
AVX-512/AMX Xeon rounds some GEMMs of the toy UNet by both (~1e-5, an fp16 step of x at most). On a GPU, cuBLAS/cuDNN
pick kernels by shape, so there the bits depend on batch_size (never on the process count).

Prompt files: .txt (one prompt per line, blank lines skipped), .jsonl (one object per line with a "prompt",
"caption" or "text" field) or .json (COCO captions {"annotations": [{"caption": ...}, ...]}, or a list of strings).

Pair folder format, version 1 (PairDataset below reads it):

    out_dir/index.json                  {"format": "diffusion2gan-pairs", "version": 1, "settings": {}, "info": {}}
                                        settings decide the data and must match to resume: teacher_fingerprint,
                                        prediction_type, prompts_sha256, num_prompts, num_pairs, guidance, steps,
                                        spacing, steps_offset, resolution, latent_shape, negative_prompt, seed,
                                        shard_size, latent_dtype, dtype; info does not (paths, batch size, versions)
    out_dir/shard-000000.safetensors    pairs [0, S), S = shard_size; shard k: [k*S, min((k+1)*S, num_pairs))
    out_dir/shard-000001.safetensors    ... each written as shard-XXXXXX.safetensors.tmp, renamed when complete

    tensors of a shard with n pairs:
      z      float32 [n, C, h, w]   the initial noise x_T, exact (randn with a generator seeded with seed + index)
      x      float16 [n, C, h, w]   the teacher's final latent, in the UNet's (scaled) latent space; latent_dtype
      index  int64   [n]            the global pair indices
    string metadata of a shard:
      format           "diffusion2gan-pairs/1"
      settings_sha256  sha256 of the index's settings (json.dumps(settings, sort_keys=True))
      prompts          JSON list of the n prompts (full text, never truncated)
      checksums        JSON list of n CRC-32s, one per pair, of the bytes of z[j], then x[j], then the UTF-8 prompt
"""
import bisect
import hashlib
import json
import os
import time
import zlib
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from common import DTYPES, setup_distributed
from configurator import configure

# -----------------------------------------------------------------------------
# knobs (python make_pairs.py --help lists them; config files and --key=value override them)
prompts = ""  # prompt file: .txt (one per line), .jsonl (prompt/caption/text field) or COCO captions .json
out_dir = "pairs/run"  # where shards and index.json go
teacher = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers folder, hub id, or single .safetensors/.ckpt
tokenizer = ""  # single-file teachers only (a file holds no tokenizer): a tokenizer folder or hub id
prediction_type = ""  # single-file teachers only: 'epsilon' or 'v_prediction' ('' = guess from the family)
guidance = 3.0  # classifier-free guidance w: eps_u + w (eps_c - eps_u); <= 1 turns it off. Paper: 3 and 8
steps = 50  # DDIM steps (eta = 0)
spacing = "trailing"  # 'trailing': the ODE starts at t=999 from x_T = z, as the student does; 'leading', 'linspace'
resolution = 0  # image side in pixels; 0 = the teacher's native size
num_pairs = 0  # 0 = one pair per prompt; more cycles through the prompts with fresh noise
seed = 0  # pair i's noise is randn from torch.Generator().manual_seed(seed + i)
negative_prompt = ""  # the unconditional prompt; '' = what the reference pipelines use (zeros for SDXL)
batch_size = 8  # pairs per teacher call (the UNet sees 2x as many rows with guidance)
shard_size = 1000  # pairs per shard file (~100 MB at SD1.5 size)
latent_dtype = "float16"  # storage of x: float16, bfloat16 or float32 (z is always stored exactly, in float32)
max_shards = 0  # make at most this many shards in this run, then stop (0 = all); re-run to continue
device = "cuda" if torch.cuda.is_available() else "cpu"  # 'cuda' or 'cpu'; torchrun gives each process its own GPU
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # teacher weights and compute
compile = False  # torch.compile the UNet (worth it on a GPU for long runs)
onednn = False  # CPU: oneDNN convs are ~1.5x faster, but then the bits depend on the thread count and batch size

# -----------------------------------------------------------------------------
# the pair folder format (see the docstring)

_FORMAT, _VERSION = "diffusion2gan-pairs", 1
_SETTINGS = ("teacher_fingerprint", "num_pairs", "shard_size", "latent_shape", "latent_dtype", "dtype", "resolution",
             "guidance", "steps", "spacing")  # the settings that readers (PairDataset, train.py) use


def shard_name(k):
    return f"shard-{k:06d}.safetensors"


def pair_checksum(z, x, prompt):
    """CRC-32 of one pair's bytes: z, then x (as stored), then the UTF-8 prompt."""
    crc = zlib.crc32(z.contiguous().view(torch.uint8).numpy())
    crc = zlib.crc32(x.contiguous().view(torch.uint8).numpy(), crc)
    return zlib.crc32(prompt.encode("utf-8"), crc)


def settings_sha256(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def read_index(folder):
    path = os.path.join(folder, "index.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file: {folder} is not a make_pairs folder (or its run has not "
                                "started)")
    try:
        with open(path) as f:
            index = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not a valid make_pairs index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != _FORMAT or not isinstance(index.get("settings"), dict):
        raise ValueError(f"{path}: not a make_pairs index (no format '{_FORMAT}' and settings)")
    if index.get("version") != _VERSION:
        raise ValueError(f"{path}: format version {index.get('version')}, this reader knows version {_VERSION}")
    missing = [k for k in _SETTINGS if k not in index["settings"]]
    if missing:
        raise ValueError(f"{path}: settings lack {', '.join(missing)}: the index is damaged; remake the pairs")
    return index


def pairs_complete(folder):
    """Whether folder holds a finished make_pairs run: its index and every shard it lists."""
    try:
        s = read_index(folder)["settings"]
    except (FileNotFoundError, ValueError):
        return False
    return all(os.path.exists(os.path.join(folder, shard_name(k))) for k in range(-(-s["num_pairs"] // s["shard_size"])))


class PairDataset(torch.utils.data.Dataset):
    """The (z, x, prompt) pairs of a make_pairs folder, a map-style Dataset. Shards are memory-mapped with safetensors
    and only the requested pair is read, so a 100 GB folder costs no memory. Open files are cached per process
    (each DataLoader worker opens its own). z is exact float32 [C, h, w], x is returned as float32, prompt a str.
    Every pair is checked against its CRC-32 when read: a truncated or corrupted shard is an error naming the file.
    A folder whose run has not finished is refused unless partial=True (then only the finished shards are used)."""

    def __init__(self, folder, partial=False, max_open=64):
        self.folder, self.max_open = folder, max_open
        self.index = read_index(folder)
        s = self.index["settings"]
        self.num_pairs, self.shard_size, self.shape = s["num_pairs"], s["shard_size"], tuple(s["latent_shape"])
        self.x_dtype, self.sha = DTYPES[s["latent_dtype"]], settings_sha256(s)
        num_shards = -(-self.num_pairs // self.shard_size)
        self.shards = [k for k in range(num_shards) if os.path.exists(os.path.join(folder, shard_name(k)))]
        missing = sorted(set(range(num_shards)) - set(self.shards))
        if missing and not partial:
            names = ", ".join(shard_name(k) for k in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise FileNotFoundError(f"{folder}: {len(missing)} of {num_shards} shards are missing ({names}): the run "
                                    "is unfinished. Re-run make_pairs with the same settings to finish it, or pass "
                                    "partial=True to use the finished shards")
        sizes = [min(self.shard_size, self.num_pairs - k * self.shard_size) for k in self.shards]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]  # position of each shard in this dataset
        self.files, self.pid = {}, None

    def __len__(self):
        return self.starts[-1]

    def open(self, k):
        """The open shard k, its prompts and checksums; validated against the index on first open."""
        if self.pid != os.getpid():  # a forked DataLoader worker must not share its parent's handles
            self.files, self.pid = {}, os.getpid()
        if k not in self.files:
            path = os.path.join(self.folder, shard_name(k))
            n = min(self.shard_size, self.num_pairs - k * self.shard_size)
            try:
                f = safe_open(path, framework="pt")
                meta = f.metadata()
                prompts, sums = json.loads(meta["prompts"]), json.loads(meta["checksums"])
                shapes = [f.get_slice(key).get_shape() for key in ("z", "x")]
                other_run = meta["settings_sha256"] != self.sha
                first = k * self.shard_size  # a shard renamed or copied over another holds other pairs' indices
                problem = ("is from another run (its settings differ from index.json)" if other_run
                           else "has the wrong number of pairs" if len(prompts) != n or len(sums) != n
                           else "has wrong tensor shapes" if shapes != [[n, *self.shape]] * 2
                           else f"holds other pairs than [{first}, {first + n})"
                           if not torch.equal(f.get_tensor("index"), torch.arange(first, first + n)) else None)
            except Exception as e:  # safetensors' own errors for headers and buffers it cannot read
                problem = f"is truncated or corrupted ({type(e).__name__}: {str(e)[:200]})"
            if problem:
                raise ValueError(f"{path}: shard {problem}; delete it and re-run make_pairs to remake it")
            if len(self.files) >= self.max_open:
                self.files.pop(next(iter(self.files)))
            self.files[k] = (f, prompts, sums)
        return self.files[k]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} out of range [0, {len(self)})")
        pos = bisect.bisect_right(self.starts, i) - 1
        k, j = self.shards[pos], i - self.starts[pos]
        f, prompts, sums = self.open(k)
        try:
            z, x = f.get_slice("z")[j:j + 1][0], f.get_slice("x")[j:j + 1][0]
        except Exception as e:
            z = x = None
            err = f"{type(e).__name__}: {str(e)[:200]}"
        if z is None or pair_checksum(z, x, prompts[j]) != sums[j]:
            what = f"cannot be read ({err})" if z is None else "fails its checksum"
            raise ValueError(f"{os.path.join(self.folder, shard_name(k))}: pair {j} (global index "
                             f"{k * self.shard_size + j}) {what}: the shard is corrupted; delete it and re-run "
                             "make_pairs to remake it")
        return z, x.float(), prompts[j]


# -----------------------------------------------------------------------------
# prompts


def read_prompts(path):
    """The prompts of a .txt, .jsonl or COCO-captions .json file, in file order, stripped of surrounding whitespace."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} not found (set --prompts=a .txt, .jsonl or COCO captions .json)")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # e.g. latin-1 or cp1252 from an old export: guessing would change prompts
        row = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{row}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the prompt file as UTF-8, "
                         f"e.g. iconv -f latin1 -t utf-8 {path} > prompts-utf8.txt") from None
    if path.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
                row = row if isinstance(row, dict) else {}  # a bare string or list: refused below
                field = next((k for k in ("prompt", "caption", "text") if k in row), None)
                if field is None or not isinstance(row[field], str):
                    raise ValueError(f"{path}:{n}: expected an object with a 'prompt', 'caption' or 'text' string, "
                                     f"got {line[:100]!r}")
                out.append(row[field])
    elif path.endswith(".json"):
        try:
            data = json.loads(text)
            out = [a["caption"] for a in data["annotations"]] if isinstance(data, dict) else data
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not COCO captions (annotations with a caption each) or a list of prompts "
                             f"({type(e).__name__}: {e})") from None
        if not isinstance(out, list) or not all(isinstance(p, str) for p in out):
            raise ValueError(f"{path}: expected COCO captions or a JSON list of prompt strings")
    else:
        out = text.splitlines()
    out = [p.strip() for p in out if p.strip()]
    if not out:
        raise ValueError(f"{path}: the prompt file holds no prompts (expected one per line in a .txt, a prompt/caption/"
                         "text field per line in a .jsonl, or COCO captions in a .json)")
    return out


@contextmanager
def use_onednn(enabled):
    """oneDNN (PyTorch's fast CPU convolutions) on or off for a block, restored after it."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check_index(folder, settings, info):
    """Write index.json for a new run, or check that the existing one has the same settings (then we resume)."""
    path = os.path.join(folder, "index.json")
    if not os.path.exists(path):
        if any(f.startswith("shard-") and f.endswith(".safetensors") for f in os.listdir(folder)):
            raise ValueError(f"{folder}: holds shards but no index.json, so their settings are unknown: "
                             "use a new out_dir, or delete the shards to start over")
        with open(path + ".tmp", "w") as f:
            json.dump(dict(format=_FORMAT, version=_VERSION, settings=settings, info=info), f, indent=1)
        os.replace(path + ".tmp", path)
        return
    old = read_index(folder)["settings"]
    if old != settings:
        other_teacher = old.get("teacher_fingerprint") != settings.get("teacher_fingerprint")
        raise ValueError(f"{folder}: was made with other settings ({settings_diff(old, settings)})."
                         + (" It was made with another teacher." if other_teacher else "")
                         + " Use a new --out_dir, or delete the folder to start over")


def settings_diff(old, new):
    """The keys on which two settings dicts differ, as 'key old there, new now; ...' (also eval.py's folders)."""
    return "; ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


# -----------------------------------------------------------------------------
# the run


def main(**overrides):
    """Make the pairs and return how many this call made; overrides are knob values (as --key=value gives them)."""
    c = SimpleNamespace(**configure(dict(globals()), [f"--{k}={v!r}" for k, v in overrides.items()]))
    from teacher import ddim_sample, ddim_timesteps, load_teacher  # here: train.py imports PairDataset without them
    for knob in ["dtype", "latent_dtype"]:
        if getattr(c, knob) not in DTYPES:
            raise ValueError(f"--{knob}={getattr(c, knob)!r}: use one of {', '.join(DTYPES)}")
    if c.batch_size < 1 or c.shard_size < 1 or c.steps < 1:
        raise ValueError("batch_size, shard_size and steps must be at least 1")
    ddim_timesteps(c.steps, c.spacing)  # a bad spacing fails now, not after loading the teacher

    ddp, rank, world, dev = setup_distributed(c.device, timeout_hours=24)  # each process makes its own shards
    master = rank == 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # prompts and the teacher
    prompt_list = read_prompts(c.prompts)
    n = c.num_pairs or len(prompt_list)
    t = load_teacher(c.teacher, dev, DTYPES[c.dtype], tokenizer=c.tokenizer or None,
                     prediction_type=c.prediction_type or None)
    res = c.resolution or t.resolution
    shape = t.latent_shape(res)
    unet = torch.compile(t.unet) if c.compile else t.unet

    # the index: rank 0 records the settings, or checks them against the earlier run, and lists the missing shards
    S, num_shards = c.shard_size, -(-n // c.shard_size)
    settings = dict(teacher_fingerprint=t.fingerprint() if master else None, prediction_type=t.prediction_type,
                    prompts_sha256=file_sha256(c.prompts), num_prompts=len(prompt_list), num_pairs=n,
                    guidance=c.guidance, steps=c.steps, spacing=c.spacing, steps_offset=t.steps_offset,
                    resolution=res, latent_shape=list(shape), negative_prompt=c.negative_prompt, seed=c.seed,
                    shard_size=S, latent_dtype=c.latent_dtype, dtype=c.dtype)
    info = dict(teacher=c.teacher, tokenizer=c.tokenizer, prompts=os.path.abspath(c.prompts), batch_size=c.batch_size,
                world_size=world, device=dev, torch=torch.__version__, created=time.strftime("%Y-%m-%d %H:%M:%S"))
    error, pending = None, None
    if master:
        try:
            os.makedirs(c.out_dir, exist_ok=True)
            check_index(c.out_dir, settings, info)
            pending = [k for k in range(num_shards) if not os.path.exists(os.path.join(c.out_dir, shard_name(k)))]
            pending = pending[:c.max_shards] if c.max_shards > 0 else pending
        except (ValueError, OSError) as e:
            error = e
    if ddp:  # every rank needs the verdict and the same work list
        msg = [error, pending]
        dist.broadcast_object_list(msg, src=0)
        error, pending = msg
    if error is not None:
        if ddp:
            dist.destroy_process_group()
        raise error
    sha = settings_sha256(read_index(c.out_dir)["settings"])

    # generate: this rank's shards, each in batches that start at the shard's first index (so a pair's batch never
    # depends on the process count). On CPU, oneDNN's convolutions round differently for other thread counts and batch
    # sizes: without it (PyTorch's own im2col + GEMM) the pairs are the same bits however the run is launched, on
    # most CPUs (see the docstring).
    mine = pending[rank::world]
    sizes = {k: min(S, n - k * S) for k in mine}
    pbar = tqdm(total=sum(sizes.values()), unit="pair", desc=f"rank 0 of {world}", disable=not master)
    t0 = time.time()
    with use_onednn(c.onednn or dev != "cpu"):
        for k in mine:
            idx = range(k * S, k * S + sizes[k])
            shard_prompts = [prompt_list[i % len(prompt_list)] for i in idx]
            # each pair's noise from its own generator, drawn on CPU in fp32: the same z for any batch or process
            # count. It is stored exactly rather than as its seed: the regression target is only right if z matches
            # bit for bit, and torch does not promise that its CPU normal sampler stays the same across versions.
            # That costs 64 KB per SD1.5 pair (x in fp16 is 32 KB); the seed is still seed + index.
            z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(c.seed + i)) for i in idx])
            xs = []
            for b in range(0, len(idx), c.batch_size):
                cond, uncond = t.conditions(shard_prompts[b:b + c.batch_size], res, res, c.negative_prompt)
                x = ddim_sample(unet, z[b:b + c.batch_size].to(dev), cond, uncond, c.steps, c.guidance, c.spacing,
                                alphas_cumprod=t.alphas_cumprod, prediction_type=t.prediction_type,
                                steps_offset=t.steps_offset)
                xs.append(x.to(DTYPES[c.latent_dtype]).cpu())
                pbar.update(len(xs[-1]))
            x = torch.cat(xs)
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"shard {k}: the teacher's latents are not finite in {c.latent_dtype}; "
                                         "try --dtype=float32 or --latent_dtype=float32")
            meta = dict(format=f"{_FORMAT}/{_VERSION}", settings_sha256=sha, prompts=json.dumps(shard_prompts),
                        checksums=json.dumps([pair_checksum(z[j], x[j], p) for j, p in enumerate(shard_prompts)]))
            path = os.path.join(c.out_dir, shard_name(k))
            save_file({"z": z, "x": x, "index": torch.tensor(list(idx))}, path + ".tmp", metadata=meta)
            with open(path + ".tmp", "rb") as f:
                os.fsync(f.fileno())  # on disk before the rename: after a power cut the name never holds an empty file
            os.replace(path + ".tmp", path)  # a killed run never leaves a half shard under the final name
    pbar.close()

    # summary
    made = torch.tensor([sum(sizes.values())], device=dev)
    if ddp:
        dist.all_reduce(made)
        dist.destroy_process_group()
    made, secs = made.item(), time.time() - t0
    if master:
        done = sum(os.path.exists(os.path.join(c.out_dir, shard_name(k))) for k in range(num_shards))
        print(f"made {made} pairs in {secs:.1f}s ({made / max(secs, 1e-9):.2f} pairs/s, {world} "
              f"process{'es' if world > 1 else ''}); {done} of {num_shards} shards ({n} pairs) are complete in "
              f"{c.out_dir}" + ("" if done == num_shards else "; run the same command again to continue"))
    return made


if __name__ == "__main__":
    main(**configure(globals()))
