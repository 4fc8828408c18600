"""
The toy world's data: procedural captioned shapes, 32x32 RGB, drawn with Pillow.

Every image comes from its own seed (one random.Random per seed), so a sample never depends on the batch
size, the order, or the number of GPUs. Seeds 0 .. VAL_SEED0-1 are for training, VAL_SEED0 = 10**9 and up
are the fixed validation set: the two ranges never overlap.

An image holds 1 or 2 objects and a caption such as
    "a small red circle on the left on a black background"
    "a large blue square on the left and a small green triangle on the right on a white background"
Every word of the caption is also an attribute label (LABELS / CLASSES), so the metrics can check it.

Label encoding: a LongTensor of 9 class indices, in caption order, two object slots and the background:
    size1 colour1 shape1 position1 | size2 colour2 shape2 position2 | background
Slot 1 is the only object (1-object images) or the left one; slot 2 is the right one, or all "none" (index 0).

Look at samples: python -m toy.shapes /tmp/toy_grid.png   (from the repo root)
"""
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

# -----------------------------------------------------------------------------
# the world: every attribute that a caption can mention, with its classes

SIZE = 32  # image side in pixels; the toy VAE downsamples 4x to 8x8 latents
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (230, 30, 30), "orange": (255, 140, 0), "yellow": (245, 230, 30),
           "green": (30, 190, 50), "blue": (30, 80, 240), "purple": (160, 40, 210)}
BACKGROUNDS = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255)}  # far from all COLOURS
SIZES = {"small": (10, 12), "large": (15, 16)}  # side in px; a prototype VAE lost 6 px objects, so >= 10
POSITIONS = {"left": (0, 16), "center": (8, 24), "right": (16, 32)}  # x range an object must stay in
PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}

# "none" (always index 0) fills slot 2 of 1-object images
_slot = {"size": ("none", *SIZES), "colour": ("none", *COLOURS), "shape": ("none", *SHAPES),
         "position": ("none", *POSITIONS)}
CLASSES = {f"{k}{i}": v for i in (1, 2) for k, v in _slot.items()} | {"background": tuple(BACKGROUNDS)}
LABELS = tuple(CLASSES)  # the order of the 9 entries of a label vector
NONE = 0

# every word a caption can use, for the toy tokenizer; sorted, since the order of a set of str changes from run to
# run (hash randomisation) and token ids must not
VOCAB = tuple(sorted({"a", "and", "background"} | set(SHAPES) | set(COLOURS) | set(BACKGROUNDS) | set(SIZES)
                     | {w for p in PHRASES.values() for w in p.split()}))

VAL_SEED0 = 10**9  # validation seeds: VAL_SEED0, VAL_SEED0 + 1, ...; training seeds stay below it


def val_seeds(n):
    return list(range(VAL_SEED0, VAL_SEED0 + n))

# -----------------------------------------------------------------------------


def caption(labels):
    """The caption that a label vector (9 ints) describes."""
    name = {k: CLASSES[k][int(i)] for k, i in zip(LABELS, labels)}
    objects = [f"a {name[f'size{i}']} {name[f'colour{i}']} {name[f'shape{i}']} {PHRASES[name[f'position{i}']]}"
               for i in (1, 2) if name[f"shape{i}"] != "none"]
    return " and ".join(objects) + f" on a {name['background']} background"


def noisy_labels(labels, p, generator=None):
    """Web-like label noise for training captions: each attribute that a caption mentions (every non-"none" entry
    of [N,9] labels, and the background) is replaced, with probability p, by a different value of the same
    attribute. Real alt-text is often wrong; perfectly clean captions leave classifier-free guidance little to do."""
    out = labels.clone()
    for j, k in enumerate(LABELS):
        n = len(CLASSES[k])
        hit = torch.rand(labels.shape[0], generator=generator) < p
        lo = 0 if k == "background" else 1  # slot attributes never turn into or out of "none": objects stay as drawn
        if lo:
            hit &= labels[:, j] != NONE
        # a uniform draw from the other n - lo - 1 values: shift past the true one
        other = torch.randint(lo, n - 1, (labels.shape[0],), generator=generator)
        other = other + (other >= labels[:, j]).long()
        out[:, j] = torch.where(hit, other, labels[:, j])
    return out


def _draw(draw, shape, colour, x0, y0, s):
    x1, y1 = x0 + s - 1, y0 + s - 1  # Pillow's boxes include the last pixel
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
    elif shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def sample(seed, n_objects=None):
    """One (PIL image, caption, labels) from its own RNG. n_objects: force 1 or 2 (default: either, 50/50)."""
    rng = random.Random(seed)
    n = n_objects or rng.choice((1, 2))
    assert n in (1, 2), n_objects
    # two objects always sit left and right: their x ranges are disjoint, so they never overlap
    positions = [rng.choice(tuple(POSITIONS))] if n == 1 else ["left", "right"]
    bg = rng.choice(tuple(BACKGROUNDS))
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    labels = [NONE] * len(LABELS)
    for i, pos in enumerate(positions, start=1):
        size, colour, shape = rng.choice(tuple(SIZES)), rng.choice(tuple(COLOURS)), rng.choice(SHAPES)
        s = rng.randint(*SIZES[size])
        lo, hi = POSITIONS[pos]
        # jitter the centre by +-2 px around the middle of the range, then keep the object inside it
        x0 = min(max((lo + hi) // 2 + rng.randint(-2, 2) - s // 2, lo), hi - s)
        y0 = rng.randint(2, SIZE - 2 - s)  # vertical position is free: captions never mention it
        _draw(draw, shape, COLOURS[colour], x0, y0, s)
        for k, v in (("size", size), ("colour", colour), ("shape", shape), ("position", pos)):
            labels[LABELS.index(f"{k}{i}")] = CLASSES[f"{k}{i}"].index(v)
    labels[LABELS.index("background")] = CLASSES["background"].index(bg)
    return img, caption(labels), labels


def make_batch(seeds, n_objects=None):
    """Images as float [N,3,32,32] in [-1,1], captions (list of str), labels LongTensor [N,9]."""
    imgs, caps, labels = zip(*(sample(s, n_objects) for s in seeds))
    x = torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1, list(caps), torch.tensor(labels, dtype=torch.long)


if __name__ == "__main__":
    import sys
    path = sys.argv[1] if len(sys.argv) > 1 else "toy_grid.png"
    x, caps, _ = make_batch(val_seeds(64))
    from common import image_grid
    image_grid(x).resize((8 * 34 * 4, 8 * 34 * 4), Image.NEAREST).save(path)
    for i, c in enumerate(caps):
        print(f"{i // 8},{i % 8}: {c}")
    print(f"saved {path}; vocabulary of {len(VOCAB)} words: {' '.join(VOCAB)}")
