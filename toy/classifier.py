"""
The toy world's metric network: a small pixel-space CNN that predicts every attribute of a caption (the 9
labels of toy/shapes.py). It plays the role that Inception plays for FID: its penultimate features give an
FID-like Fréchet distance, and its predictions give the attribute accuracy (text alignment).

It is used for metrics only, never for training the student. It trains on blurred, noisy and colour-jittered
images, so that the slight softness of VAE reconstructions and one-step samples does not fool it.

Train (from the repo root; ~3 min on 2 free CPU cores, ~7 on one busy one), writes
toy/weights/classifier.safetensors with its config and validation accuracies in the metadata:
    python -m toy.classifier
"""
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from toy import shapes

DEFAULT_PATH = Path(__file__).parent / "weights" / "classifier.safetensors"
N_CLASSES = [len(c) for c in shapes.CLASSES.values()]
HAS_NONE = torch.tensor([c[0] == "none" for c in shapes.CLASSES.values()])


class Classifier(nn.Module):

    def __init__(self, width=16, dim=128):
        super().__init__()
        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        w = width
        self.trunk = nn.Sequential(*block(3, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                                   *block(4 * w, 8 * w, 2))  # [N, 8w, 4, 4]
        # pool over height only: captions name the horizontal position but never the vertical one
        self.fc = nn.Sequential(nn.Linear(8 * w * 4, dim), nn.ReLU())
        self.head = nn.Linear(dim, sum(N_CLASSES))

    def forward(self, x):
        """Images [N,3,32,32] in [-1,1] -> (features [N,dim], logits [N,sum(N_CLASSES)])."""
        h = self.trunk(x).mean(2).flatten(1)
        f = self.fc(h)
        return f, self.head(f)


def load_classifier(path=DEFAULT_PATH, device="cpu"):
    """The trained classifier, frozen and in eval mode."""
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = Classifier(**config)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def _run(model, images, batch_size=500):
    device = next(model.parameters()).device
    outs = [model(x.to(device)) for x in images.split(batch_size)]
    return torch.cat([f for f, _ in outs]).cpu(), torch.cat([l for _, l in outs]).cpu()


def features(model, images):
    """Penultimate features [N, dim] (float32) for the Fréchet distance."""
    return _run(model, images)[0]


def predict(model, images):
    """Predicted labels, LongTensor [N, 9], in the label encoding of toy/shapes.py."""
    logits = _run(model, images)[1]
    return torch.stack([l.argmax(1) for l in logits.split(N_CLASSES, dim=1)], 1)


def attribute_accuracy(model, images, labels):
    """The share of each caption's attributes that the classifier finds, averaged over images.
    A caption's attributes are the labels that are not "none": 5 for 1-object images, 9 for 2-object ones."""
    correct = predict(model, images) == labels
    in_caption = (labels != shapes.NONE) | ~HAS_NONE  # background has no "none": it is always in the caption
    return ((correct & in_caption).sum(1) / in_caption.sum(1)).mean().item()

# -----------------------------------------------------------------------------
# training


def blur(x, sigma):
    """Gaussian blur with one sigma per image (a [N] tensor; 0 keeps the image), separable, reflect-padded.
    The 7-tap kernel is exact enough up to sigma ~1.5, and still a strong blur at sigma 2."""
    n, c, h, w = x.shape
    r = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-r**2 / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [N*C, 7], one kernel per channel
    x = F.pad(x.reshape(1, n * c, h, w), (3, 3, 3, 3), mode="reflect")
    x = F.conv2d(x, k[:, None, :, None], groups=n * c)  # vertical pass
    x = F.conv2d(x, k[:, None, None, :], groups=n * c)  # horizontal pass
    return x.view(n, c, h, w)


def augment(x, g):
    """Blur (half the images, sigma up to 1.5 px), pixel noise and a slight colour jitter (gain and offset)."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=g) * 1.5 * (torch.rand(n, generator=g) < 0.5)
    x = blur(x, sigma)
    # +-10% per channel keeps orange between red and yellow: the colour names stay unambiguous
    gain, offset = (0.1 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) for _ in range(2))
    x = x * (1 + gain) + offset
    return x + torch.randn(x.shape, generator=g) * 0.1 * torch.rand(n, 1, 1, 1, generator=g)


def train(steps=2000, batch_size=128, lr=3e-3, seed=0, **config):
    """Trains on fresh images every step: training seeds 0 .. steps*batch_size-1, never validation seeds."""
    assert steps * batch_size <= shapes.VAL_SEED0
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier(**config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(steps):
        # warmup then cosine decay: lets the short run converge to a sharp final accuracy
        for group in opt.param_groups:
            group["lr"] = lr * min(1, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        x, _, y = shapes.make_batch(range(step * batch_size, (step + 1) * batch_size))
        _, logits = model(augment(x, g))
        loss = sum(F.cross_entropy(l, t) for l, t in zip(logits.split(N_CLASSES, 1), y.unbind(1)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} | loss {loss.item():.4f} | {time.time() - t0:.0f} s")
    return model.eval()


def main(path=DEFAULT_PATH):
    """Train the classifier, measure it on validation images, save it (with its report) to path."""
    path = Path(path)
    config, steps, batch_size = dict(width=16, dim=128), 2000, 128
    t0 = time.time()
    model = train(steps, batch_size, **config)
    minutes = (time.time() - t0) / 60
    report = {"train_minutes": round(minutes, 2), "threads": torch.get_num_threads(), "train_seeds": steps * batch_size}
    # validation: 2000 1-object and 2000 2-object images, clean, blurred (sigma 1 px is about as soft as a VAE
    # reconstruction), and noisy
    g = torch.Generator().manual_seed(0)
    for n in (1, 2):
        x, _, y = shapes.make_batch(shapes.val_seeds(2000), n_objects=n)
        ones = torch.ones(len(x))
        for name, xa in (("clean", x), ("blur1", blur(x, ones)), ("blur2", blur(x, 2 * ones)),
                         ("noise0.1", x + 0.1 * torch.randn(x.shape, generator=g))):
            report[f"acc_{n}obj_{name}"] = round(attribute_accuracy(model, xa, y), 4)
    print(json.dumps(report, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(config), "report": json.dumps(report)}
    save_file(model.state_dict(), str(path), metadata=metadata)
    print(f"saved {path} ({path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
