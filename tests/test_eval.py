"""eval.py's COCO protocol: the image transform, the fixed caption draw, the per-rank split, resumable image
writing, the CLIP-score arithmetic, the messages for missing files and packages, and one whole run on a toy 'COCO'."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev

def random_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("w,h,box", [(640, 480, (80, 0, 560, 480)), (480, 640, (0, 80, 480, 560)),
                                     (37, 23, (7, 0, 30, 23)), (300, 300, (0, 0, 300, 300))])
def test_center_crop_resize_matches_pil(w, h, box):
    img = random_image(w, h)
    got = np.asarray(ev.center_crop_resize(img, 256))
    want = np.asarray(img.crop(box).resize((256, 256), resample=Image.Resampling.LANCZOS))
    assert got.shape == (256, 256, 3)
    np.testing.assert_array_equal(got, want)
    if (w, h) != (300, 300):  # the filter matters: bicubic gives other pixels
        assert not np.array_equal(got, np.asarray(img.crop(box).resize((256, 256), Image.Resampling.BICUBIC)))


def test_center_crop_resize_makes_rgb():
    for mode in ("L", "RGBA"):
        assert ev.center_crop_resize(random_image(50, 40, mode=mode), 32).mode == "RGB"


@pytest.mark.parametrize("n", [0, 1, 7, 30000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_split_covers_every_caption_once(n, world):
    seen = [i for rank in range(world) for i in ev.rank_share(n, rank, world)]
    assert sorted(seen) == list(range(n))  # none lost, none twice
    sizes = [len(ev.rank_share(n, rank, world)) for rank in range(world)]
    assert max(sizes) - min(sizes) <= 1  # balanced


def fake_coco(folder, n_images=12, per_image=3):
    """A captions file in COCO's layout (with ids deliberately out of order) and its images."""
    os.makedirs(folder / "annotations", exist_ok=True)
    os.makedirs(folder / "val2014", exist_ok=True)
    images, anns = [], []
    for k in range(n_images):
        iid = 1000 - 7 * k
        name = f"COCO_val2014_{iid:012d}.jpg"
        random_image(40 + k, 30, seed=k).save(folder / "val2014" / name)
        images.append({"id": iid, "file_name": name})
        anns += [{"id": 10 * iid + j, "image_id": iid, "caption": f" image {iid}  caption {j}\n"} for j in range(per_image)]
    with open(folder / "annotations" / "captions_val2014.json", "w") as f:
        json.dump({"images": images[::-1], "annotations": anns[::-1]}, f)
    return folder / "annotations" / "captions_val2014.json"


def test_coco_captions_fixed_distinct_and_true(tmp_path):
    path = fake_coco(tmp_path)
    rows = ev.coco_captions(str(path), 8, seed=0)
    assert rows == ev.coco_captions(str(path), 8, seed=0)  # the same draw every time
    assert rows != ev.coco_captions(str(path), 8, seed=1)
    assert len({r["image_id"] for r in rows}) == 8  # one caption per image, 8 distinct images
    for r in rows:
        assert r["caption"].startswith(f"image {r['image_id']} caption ")  # whitespace normalised, its own image
        assert r["file_name"] == f"COCO_val2014_{r['image_id']:012d}.jpg"
    with pytest.raises(ValueError, match="only 12 images"):
        ev.coco_captions(str(path), 13)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        ev.coco_captions(str(tmp_path / "nothere.json"), 1)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        ev.coco_captions(str(tmp_path / "list.json"), 1)


def make_fn(calls):
    """A stand-in generator: image i is noise from seed i (so it depends on i only), as eval.py's per-image seeds."""
    def make(indices):
        calls.extend(indices)
        return [torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in indices]
    return make


def read_all(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}


def test_ranks_and_resume_give_the_same_images(tmp_path):
    rows = list(range(10))
    calls = []
    for rank in range(3):  # three ranks, batch 2
        ev.write_images(make_fn(calls), rows, str(tmp_path / "ranks"), 16, rank, 3, batch_size=2)
    assert sorted(calls) == rows
    calls = []
    ev.write_images(make_fn(calls), rows, str(tmp_path / "one"), 16, batch_size=4)  # one rank, batch 4
    assert read_all(tmp_path / "ranks") == read_all(tmp_path / "one")
    assert sorted(read_all(tmp_path / "one")) == [f"{i:06d}.png" for i in rows]

    # a stopped run: an exception in the third batch keeps the finished images and leaves no partial file
    calls = []

    def failing(indices):
        if indices[0] >= 6:
            raise KeyboardInterrupt
        return make_fn(calls)(indices)
    with pytest.raises(KeyboardInterrupt):
        ev.write_images(failing, rows, str(tmp_path / "resumed"), 16, batch_size=3)
    assert sorted(os.listdir(tmp_path / "resumed")) == [f"{i:06d}.png" for i in range(6)]
    calls = []
    assert ev.write_images(make_fn(calls), rows, str(tmp_path / "resumed"), 16, batch_size=3) == 4
    assert calls == [6, 7, 8, 9]  # the re-run makes only what is missing
    assert read_all(tmp_path / "resumed") == read_all(tmp_path / "one")


def test_an_image_interrupted_while_written_is_not_kept(tmp_path):
    class HalfWritten:  # writes part of a file, then the run is killed
        def save(self, path, format):
            open(path, "wb").write(b"\x89PNG half")
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ev.save_png(HalfWritten(), str(tmp_path / "000000.png"))
    assert not os.path.exists(tmp_path / "000000.png")  # a resume makes it again


def test_a_folder_of_other_settings_is_refused(tmp_path):
    settings = {"protocol": "coco2014", "captions": 5, "weights_sha256": "a" * 64}
    ev.check_folder_settings(str(tmp_path / "images"), settings)
    ev.check_folder_settings(str(tmp_path / "images"), dict(settings))  # the same run resumes
    with pytest.raises(SystemExit, match=r"images/settings.json: the images here were made with other settings "
                                         r"\(captions 5 there, 6 now; weights_sha256 'a+' there, 'b+' now\)"):
        ev.check_folder_settings(str(tmp_path / "images"), dict(settings, captions=6, weights_sha256="b" * 64))


def test_clip_score_is_the_mean_cosine_with_the_prefix(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, c in enumerate(colours):
        Image.new("RGB", (8, 8), c).save(tmp_path / f"{i:06d}.png")
    texts = {"A photo depicts red": [1.0, 0, 0], "A photo depicts green": [1.0, 1.0, 0], "A photo depicts blue": [0, 0, -2.0]}

    class Net:  # image embedding: the mean colour; text embedding: looked up (so a missing prefix fails)
        def encode_image(self, x):
            return x.mean((2, 3))

        def encode_text(self, t):
            return t
    preprocess = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # noqa: E731
    tokenizer = lambda strings: torch.tensor([texts[s] for s in strings])  # noqa: E731
    score = ev.clip_score(str(tmp_path), ["red", "green", "blue"], Net(), preprocess, tokenizer, "cpu", batch_size=2)
    assert score == pytest.approx((1 + 2 ** -0.5 - 1) / 3, abs=1e-6)  # raw cosines, negatives kept


def test_missing_packages_and_files_say_how_to_get_them(tmp_path, monkeypatch, run):
    with pytest.raises(SystemExit, match="pip install clean-fid"):
        ev.need("no_such_package_for_this_test", "clean-fid", "FID")
    with pytest.raises(SystemExit, match="pip install open_clip_torch"):
        monkeypatch.setitem(sys.modules, "open_clip", None)  # an import of it now fails
        ev.load_clip("", "cpu")
    r = run(["eval.py", "--coco=coco2014", f"--coco_dir={tmp_path}", "--teacher=toy/weights/sd", f"--out={tmp_path}/o"])
    assert r.returncode != 0
    assert "captions_val2014.json" in r.stderr and "wget http://images.cocodataset.org/zips/val2014.zip" in r.stderr
    r = run(["eval.py", "--coco=coco2015", "--teacher=toy/weights/sd", "--out=x"])
    assert r.returncode != 0 and "coco2014 or coco2017" in r.stderr
    fake_coco(tmp_path / "coco", n_images=1)  # the metric files are checked before any image is made
    r = run(["eval.py", "--coco=coco2014", f"--coco_dir={tmp_path}/coco", "--teacher=toy/weights/sd",
             f"--out={tmp_path}/o", f"--inception={tmp_path}/inc"])
    assert r.returncode != 0 and f"wget -P {tmp_path}/inc {ev.INCEPTION_URL}" in r.stderr, r.stderr[-2000:]
    r = run(["eval.py", "--coco=coco2014", f"--coco_dir={tmp_path}/coco", "--teacher=toy/weights/sd",
             f"--out={tmp_path}/o", f"--clip={tmp_path}/clip.bin", "--metrics=clip"])
    assert r.returncode != 0 and "clip.bin: CLIP weights not found" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o")


def test_coco_run_on_a_toy_teacher(tmp_path, run):
    """The whole --coco path (captions, generation, reference images, records) with an untrained toy teacher;
    metrics are left out (clean-fid and open_clip are optional and their weights cannot be fetched here)."""
    fake_coco(tmp_path / "coco")
    r = run(["-m", "toy.build", f"--out_dir={tmp_path}/toy", "--stage=vae,teacher", "--vae_steps=0", "--teacher_steps=1",
             "--teacher_batch=4", "--caption_noise=0.5"])  # one step, through the caption-noise path too
    assert r.returncode == 0, r.stderr[-2000:]
    args = ["eval.py", "--coco=coco2014", f"--coco_dir={tmp_path}/coco", "--coco_n=5", f"--teacher={tmp_path}/toy/sd",
            "--teacher_steps=2", f"--out={tmp_path}/run", "--metrics=", "--batch_size=2"]
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    images = read_all(tmp_path / "run" / "images")
    assert sorted(images) == [f"{i:06d}.png" for i in range(5)] + ["settings.json"]
    assert Image.open(tmp_path / "run" / "images" / "000000.png").size == (256, 256)
    ref = tmp_path / "coco" / "coco2014-5-256px-seed0"
    rows = json.loads((tmp_path / "run" / "captions.json").read_text())
    assert rows == ev.coco_captions(str(tmp_path / "coco" / "annotations" / "captions_val2014.json"), 5)
    want = ev.center_crop_resize(Image.open(tmp_path / "coco" / "val2014" / rows[3]["file_name"]), 256)
    np.testing.assert_array_equal(np.asarray(Image.open(ref / "000003.png")), np.asarray(want))
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["captions"] == 5 and res["image_size"] == 256 and "fid" not in res
    os.remove(tmp_path / "run" / "images" / "000002.png")  # resume: only the missing image is made, again
    r = run(args)
    assert r.returncode == 0, r.stderr[-2000:]
    again = read_all(tmp_path / "run" / "images")
    others = lambda files: {f: v for f, v in files.items() if f != "000002.png"}
    assert others(again) == others(images)  # the images that were there are untouched
    # made alone instead of in a batch of 2: oneDNN's convolutions (on by default) and, on some CPUs (an AVX-512/AMX
    # Xeon), the GEMMs round by batch size, so one 8-bit level of difference is allowed
    new, old = (np.asarray(Image.open(io.BytesIO(v["000002.png"]))).astype(int) for v in (again, images))
    assert np.abs(new - old).max() <= 1, np.abs(new - old).max()
    r = run(args[:-4] + ["--teacher_steps=3"] + args[-3:])  # another sampler into the same folder: refused
    assert r.returncode != 0 and "images/settings.json: the images here were made with other settings" in r.stderr
    assert "sampler 'DDIM 2 steps, guidance 3' there, 'DDIM 3 steps, guidance 3' now" in r.stderr, r.stderr[-2000:]
