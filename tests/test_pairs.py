"""make_pairs.py: the pairs are the teacher's ODE solutions for exact seeded noise; the files are bit-identical for
another batch size, for two processes (torchrun, gloo) and after a resume; PairDataset reads them lazily and catches
truncated or corrupted shards; every bad input is a clear error. A tiny random SD1-like teacher on CPU, written with
model.py and transformers only (no diffusers needed)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import make_pairs
import model
import weights
from make_pairs import PairDataset
from teacher import load_teacher
from toy.tokenizer import write_clip_tokenizer

WORDS = "a small large red green blue circle square on the left right".split()
PROMPTS = ["a small red circle on the left", "a large green square", "a blue circle on the right", "a red square",
           "a small green circle", "a large blue square on the left", "a red circle", "a green square on the right",
           "a blue square", "a large red circle on the right", "a small blue circle"]  # 11: shards of 4, 4, 3
RUN = dict(steps=3, guidance=3.0, resolution=16, shard_size=4, batch_size=4, device="cpu", dtype="float32", seed=5)


def write_teacher(root, seed=0):
    """A tiny SD1-like pipeline folder in the diffusers layout: our UNet/VAE, a transformers CLIP, a toy tokenizer."""
    torch.manual_seed(seed)
    weights.save_pretrained(model.UNet(model.UNET_PRESETS["tiny-sd1"]), os.path.join(root, "unet"))
    weights.save_pretrained(model.VAE(model.VAE_PRESETS["tiny"]), os.path.join(root, "vae"))
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(root, "tokenizer"), WORDS))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(os.path.join(root, "text_encoder"))
    os.makedirs(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1}, f)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a trailing blank line is skipped
    return dict(teacher=write_teacher(str(d / "teacher")), prompts=str(prompts))


def run(setup, out_dir, **kw):
    knobs = dict(teacher=setup["teacher"], prompts=setup["prompts"], out_dir=str(out_dir)) | RUN | kw
    return make_pairs.main(**knobs)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """One uninterrupted single-process run with batch 4: the pairs every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert run(setup, out) == len(PROMPTS)
    return out


def read_shards(folder):
    """Every shard's tensors and metadata, by file name."""
    from safetensors import safe_open
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("shard-"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out[name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def assert_same_pairs(a, b, shards=3):
    sa, sb = read_shards(a), read_shards(b)
    assert list(sa) == list(sb) == [f"shard-{k:06d}.safetensors" for k in range(shards)]
    for name in sa:
        (ta, ma), (tb, mb) = sa[name], sb[name]
        assert ma == mb, name
        for k in ["z", "x", "index"]:
            assert torch.equal(ta[k], tb[k]), f"{name}: {k} differs by {(ta[k].float() - tb[k].float()).abs().max()}"


# -----------------------------------------------------------------------------
# what the pairs are


def test_pairs_are_teacher_odes_from_exact_noise(setup, reference):
    index = json.loads((reference / "index.json").read_text())
    s = index["settings"]
    assert s["num_pairs"] == 11 and s["num_prompts"] == 11 and s["latent_shape"] == [4, 8, 8]
    assert s["guidance"] == 3.0 and s["steps"] == 3 and s["spacing"] == "trailing" and s["seed"] == 5
    assert sorted(os.listdir(reference)) == ["index.json"] + [f"shard-{k:06d}.safetensors" for k in range(3)]
    shard = load_file(str(reference / "shard-000002.safetensors"))
    assert shard["z"].dtype == torch.float32 and shard["x"].dtype == torch.float16
    assert shard["index"].tolist() == [8, 9, 10]
    t = load_teacher(setup["teacher"])
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(5 + i)) for i in [8, 9, 10]])
    assert torch.equal(shard["z"], z)  # exact noise, from seed + global index
    cond, uncond = t.conditions(PROMPTS[8:], 16, 16)
    x = t.sample(z, cond, uncond, steps=3, guidance=3.0)
    assert torch.allclose(shard["x"].float(), x, rtol=1e-3, atol=1e-3)  # fp16 storage
    assert json.loads(read_shards(reference)["shard-000002.safetensors"][1]["prompts"]) == PROMPTS[8:]


def test_pair_dataset(reference):
    ds = PairDataset(str(reference))
    assert len(ds) == 11
    z, x, prompt = ds[9]
    shard = load_file(str(reference / "shard-000002.safetensors"))
    assert torch.equal(z, shard["z"][1]) and torch.equal(x, shard["x"][1].float()) and prompt == PROMPTS[9]
    assert x.dtype == torch.float32 and z.shape == (4, 8, 8)
    with pytest.raises(IndexError):
        ds[11]
    # two forked workers, each with its own open files
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    zs, prompts = [], []
    for z, x, p in loader:
        zs.append(z)
        prompts += p
    assert prompts == PROMPTS and torch.equal(torch.cat(zs)[9], ds[9][0])


def test_prompt_file_formats(setup, tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({k: p}) for k, p in zip(["prompt", "caption", "text"] * 4, PROMPTS)) + "\n")
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"id": i, "image_id": i, "caption": p + " \n"}
                                                              for i, p in enumerate(PROMPTS)]}))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(PROMPTS))
    for f in [jsonl, coco, listed]:
        assert make_pairs.read_prompts(str(f)) == PROMPTS, f
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"label": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a 'prompt', 'caption' or 'text'"):
        make_pairs.read_prompts(str(tmp_path / "bad.jsonl"))
    for name, text, msg in [("broken.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"broken.jsonl:2: not a JSON line"),
                            ("bare.jsonl", '"a red circle"\n', r"bare.jsonl:1: expected an object"),
                            ("nums.json", "[1, 2]", r"nums.json: expected COCO captions or a JSON list of prompt"),
                            ("other.json", '{"images": []}', r"other.json: not COCO captions")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=msg):
            make_pairs.read_prompts(str(tmp_path / name))


# -----------------------------------------------------------------------------
# determinism: batch size, process count, resume


def test_same_pairs_for_any_batch_size(setup, tmp_path):
    for bs in [4, 7, 1]:  # with shards of 8: batches 4+4|3, 7+1|3 and 1+...+1
        run(setup, tmp_path / str(bs), batch_size=bs, shard_size=8, steps=2)
    for bs in [7, 1]:
        assert_same_pairs(tmp_path / "4", tmp_path / str(bs), shards=2)


def test_same_pairs_for_any_thread_count(setup, tmp_path):
    """oneDNN's convolutions round differently for other thread counts; make_pairs runs CPU convolutions without it.
    The same bits on most CPUs, but an AVX-512/AMX Xeon rounds some GEMMs by thread count (3e-6 inside the UNet), so
    x (and with it each pair's checksum) may differ by one fp16 step there; z and all other fields are exact."""
    try:
        for n in [1, 2]:
            torch.set_num_threads(n)
            run(setup, tmp_path / str(n), num_pairs=3, shard_size=3, batch_size=3, steps=1)
    finally:
        torch.set_num_threads(1)
    (a, ma), (b, mb) = (read_shards(tmp_path / str(n))["shard-000000.safetensors"] for n in [1, 2])
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["index"], b["index"])
    assert {k: v for k, v in ma.items() if k != "checksums"} == {k: v for k, v in mb.items() if k != "checksums"}
    step = torch.finfo(torch.float16).eps * a["x"].float().abs().clamp(min=1)  # one fp16 step at x's size
    assert ((a["x"].float() - b["x"].float()).abs() <= step).all()


def test_same_pairs_with_two_processes(setup, reference, tmp_path, root):
    """torchrun with 2 CPU processes (gloo): rank r makes the pending shards r, r+2, ...; the files are the same."""
    args = [f"--{k}={v}" for k, v in (RUN | dict(teacher=setup["teacher"], prompts=setup["prompts"],
                                                   out_dir=str(tmp_path))).items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(root, "make_pairs.py"), *args], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "made 11 pairs" in p.stdout and "2 processes); 3 of 3 shards (11 pairs) are complete" in p.stdout
    assert_same_pairs(reference, tmp_path)
    assert json.loads((tmp_path / "index.json").read_text())["info"]["world_size"] == 2


def test_resume_gives_the_uninterrupted_pairs(setup, reference, tmp_path):
    assert run(setup, tmp_path, max_shards=1) == 4
    assert sorted(os.listdir(tmp_path)) == ["index.json", "shard-000000.safetensors"]
    with pytest.raises(FileNotFoundError, match=r"2 of 3 shards are missing \(shard-000001.safetensors, "
                                                r"shard-000002.safetensors\): the run is unfinished"):
        PairDataset(str(tmp_path))
    assert len(PairDataset(str(tmp_path), partial=True)) == 4
    # a killed run leaves a temporary file: it is never mistaken for a shard, and is replaced
    (tmp_path / "shard-000001.safetensors.tmp").write_bytes(b"half a shard")
    first = (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns
    assert run(setup, tmp_path, max_shards=1) == 4  # shard 1
    assert run(setup, tmp_path) == 3  # shard 2
    assert (tmp_path / "shard-000000.safetensors").stat().st_mtime_ns == first  # never remade
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))
    assert_same_pairs(reference, tmp_path)
    assert run(setup, tmp_path) == 0  # all done: nothing to make


# -----------------------------------------------------------------------------
# bad input: each a clear error


def test_error_missing_or_empty_prompt_file(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompt file '.*nope.txt' not found \(set --prompts="):
        run(setup, tmp_path / "out", prompts=str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"empty.txt: the prompt file holds no prompts"):
        run(setup, tmp_path / "out", prompts=str(tmp_path / "empty.txt"))
    assert not (tmp_path / "out").exists()  # nothing written


def test_long_prompt_is_truncated_with_a_warning_and_stored_whole(setup, tmp_path):
    long = " ".join(["a small red circle on the left"] * 15)  # 105 words > 77 tokens
    (tmp_path / "long.txt").write_text(long + "\n" + PROMPTS[0] + "\n")
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) longer than 77 tokens were truncated to 77 tokens"):
        run(setup, tmp_path / "out", prompts=str(tmp_path / "long.txt"), steps=1)
    assert PairDataset(str(tmp_path / "out"))[0][2] == long


def test_error_folder_made_with_another_teacher(setup, reference, tmp_path):
    other = write_teacher(str(tmp_path / "other_teacher"), seed=1)
    with pytest.raises(ValueError, match=r"was made with other settings \(teacher_fingerprint '[0-9a-f]{64}' there, "
                                         r"'[0-9a-f]{64}' now\)\. It was made with another teacher\. Use a new "
                                         r"--out_dir"):
        run(setup, reference, teacher=other)


def test_error_folder_made_with_other_settings(setup, reference):
    with pytest.raises(ValueError, match=r"was made with other settings \(guidance 3.0 there, 8.0 now; "
                                         r"steps 3 there, 50 now\)\. Use a new --out_dir"):
        run(setup, reference, guidance=8.0, steps=50)
    with pytest.raises(ValueError, match=r"other settings \(seed 5 there, 6 now\)"):
        run(setup, reference, seed=6)


def test_error_shards_without_index(setup, reference, tmp_path):
    (tmp_path / "shard-000000.safetensors").write_bytes((reference / "shard-000000.safetensors").read_bytes())
    with pytest.raises(ValueError, match="holds shards but no index.json, so their settings are unknown"):
        run(setup, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"index.json: no such file: .* is not a make_pairs folder"):
        PairDataset(str(tmp_path))


def copy_folder(src, dst):
    os.makedirs(dst)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_error_truncated_shard(reference, tmp_path):
    d = copy_folder(reference, tmp_path / "pairs")
    path = d / "shard-000001.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    ds = PairDataset(str(d))
    assert ds[0][2] == PROMPTS[0]  # other shards still read
    with pytest.raises(ValueError, match=r"shard-000001.safetensors: shard is truncated or corrupted .*; delete it and "
                                         r"re-run make_pairs"):
        ds[5]


def test_error_corrupted_shard(reference, tmp_path):
    d = copy_folder(reference, tmp_path / "pairs")
    path = d / "shard-000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one byte of the last pair's x
    path.write_bytes(bytes(data))
    ds = PairDataset(str(d))
    assert ds[8][2] == PROMPTS[8]  # the intact pairs of the shard still read
    with pytest.raises(ValueError, match=r"shard-000002.safetensors: pair 2 \(global index 10\) fails its checksum: "
                                         r"the shard is corrupted; delete it and re-run make_pairs"):
        ds[10]
    # a shard from another run (its settings hash differs) is refused too
    meta_path = d / "index.json"
    index = json.loads(meta_path.read_text())
    index["settings"]["guidance"] = 8.0
    meta_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard-000000.safetensors: shard is from another run"):
        PairDataset(str(d))[0]


def test_error_shard_copied_over_another_or_damaged_index(reference, tmp_path):
    d = copy_folder(reference, tmp_path / "pairs")
    (d / "shard-000001.safetensors").write_bytes((d / "shard-000000.safetensors").read_bytes())
    ds = PairDataset(str(d))
    assert ds[0][2] == PROMPTS[0]
    with pytest.raises(ValueError, match=r"shard-000001.safetensors: shard holds other pairs than \[4, 8\)"):
        ds[4]  # without the check: pair 0's noise and prompt, silently
    index = json.loads((d / "index.json").read_text())
    del index["settings"]["shard_size"]
    (d / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index.json: settings lack shard_size: the index is damaged"):
        PairDataset(str(d))
