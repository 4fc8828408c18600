"""
The toy world's metrics, measured with the pixel-space classifier of toy/classifier.py (our stand-in for Inception,
since no machine of ours can download the real metric networks), on fixed validation captions and noise seeds:
- fid: an FID-like Fréchet distance between classifier features of the images and of real validation images;
- acc: attribute accuracy, the share of each caption's attributes that the classifier finds (text alignment);
- to_teacher: per-sample feature distance to the teacher's image for the same z and caption (the paper's
  DreamSim-to-teacher column);
- sharpness: high-frequency power relative to the teacher's images for the same z and captions (1 = as sharp as the
  teacher); the classifier learned to ignore blur, so fid barely sees softness, which this does.
eval.py prints the table; train.py measures its student with it at the end of a toy run.
"""
import functools

import torch

from teacher import seeded_noise
from toy import shapes
from toy.classifier import DEFAULT_PATH, attribute_accuracy, features, load_classifier


def feature_stats(feats):
    """Mean [D] and covariance [D,D] (unbiased, like np.cov) of features [N,D], in float64."""
    f = torch.as_tensor(feats, dtype=torch.float64)
    d = f - f.mean(0)
    return f.mean(0), d.T @ d / (len(f) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), the formula of FID (Heusel et al. 2017):
        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).
    sigma1 sigma2 is not symmetric, but it has the same eigenvalues as s sigma2 s with s = sigma1^(1/2), which is
    symmetric PSD: two eigh calls in float64 replace scipy's sqrtm, and no complex parts appear."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    s = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T  # clamp: round-off makes tiny eigenvalues negative
    m = s @ sigma2 @ s
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean).item()

@functools.lru_cache(maxsize=None)
def _classifier(path):
    return load_classifier(path)


@functools.lru_cache(maxsize=None)
def toy_reference_stats(n_objects=None, n=5000, path=DEFAULT_PATH):
    """Feature stats of the first n validation images (all, or only 1- or 2-object ones), computed once."""
    x, _, _ = shapes.make_batch(shapes.val_seeds(n), n_objects)
    return feature_stats(features(_classifier(path), x))


def toy_metrics(images, labels, n_objects=None, n_ref=5000, path=DEFAULT_PATH):
    """fid and acc of images [N,3,32,32] in [-1,1] made for captions with labels [N,9].
    n_objects: compare against the 1- or 2-object reference set (the images' captions should match it).
    Like FID, fid is biased upwards at small N: compare runs at the same N and n_ref only."""
    model = _classifier(path)
    mu, sigma = feature_stats(features(model, images))
    return {"fid": frechet_distance(mu, sigma, *toy_reference_stats(n_objects, n_ref, path)),
            "acc": attribute_accuracy(model, images, labels)}


def hf_power(images, cutoff=0.25):
    """Mean power of images [N,C,H,W] at spatial frequencies above `cutoff` cycles per pixel (Nyquist is 0.5): what
    blur removes and a sharp edge has. The ratio of a model's to its teacher's on the same z and captions is the toy's
    sharpness metric (1 = as sharp as the teacher, below 1 softer), which the classifier's FID-like distance, trained
    to ignore blur, barely sees."""
    x = images.float() - images.float().mean((2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().square()  # [N, C, H, W]
    fy, fx = torch.fft.fftfreq(x.shape[2]), torch.fft.fftfreq(x.shape[3])
    high = (fy[:, None].square() + fx[None, :].square()).sqrt() > cutoff
    return power[..., high].mean().item()


def feature_distance(model, a, b):
    """Mean cosine distance between the classifier features of paired images a[i], b[i]: our stand-in for the
    paper's DreamSim-to-the-teacher column (how far the one-step student strays from its teacher per sample)."""
    fa, fb = features(model, a), features(model, b)
    return (1 - torch.nn.functional.cosine_similarity(fa, fb, dim=1)).mean().item()


@torch.no_grad()
def toy_table(T, students, n=500, teacher_steps=25, guidance=3.0, seed0=2 * 10**6, batch_size=250, teacher=True):
    """The toy results: for 1- and 2-object validation captions (fixed seeds, one z per caption), the teacher
    (DDIM, `teacher_steps` steps, guidance and guidance 1), the teacher in one DDIM step, and each student
    (name -> function(z, cond) -> latent). Returns {name: {objects: {acc, fid, to_teacher, sharpness}}}, the last
    two against the first teacher row for the same z and caption; teacher=False leaves the teacher rows out of the
    table (the first is still made, as the reference)."""
    model = _classifier(DEFAULT_PATH)
    ref_name = f"teacher, DDIM {teacher_steps} steps, guidance {guidance:g}"
    rows = {ref_name: lambda z, c, u: T.sample(z, c, u, teacher_steps, guidance),
            f"teacher, DDIM {teacher_steps} steps, guidance 1": lambda z, c, u: T.sample(z, c, u, teacher_steps, 1.0),
            f"teacher, DDIM 1 step, guidance {guidance:g}": lambda z, c, u: T.sample(z, c, u, 1, guidance)}
    rows = rows if teacher else {ref_name: rows[ref_name]}  # the first row is the reference of to_teacher, sharpness
    rows |= {name: (lambda z, c, u, f=f: f(z, c)) for name, f in students.items()}
    table = {name: {} for name in rows}
    for n_objects in (1, 2):
        _, caps, labels = shapes.make_batch(shapes.val_seeds(n), n_objects)
        z = seeded_noise(range(seed0, seed0 + n), T.latent_shape(), T.device)
        for name, fn in rows.items():
            images = []
            for i in range(0, n, batch_size):
                cond, uncond = T.conditions(caps[i:i + batch_size])
                images.append(T.decode(fn(z[i:i + batch_size], cond, uncond)).cpu())
            images = torch.cat(images)
            if name == ref_name:
                reference, ref_power = images, hf_power(images)
            table[name][n_objects] = toy_metrics(images, labels, n_objects) | {
                "to_teacher": feature_distance(model, images, reference), "sharpness": hf_power(images) / ref_power}
    return table if teacher else {k: v for k, v in table.items() if k != ref_name}


def markdown(table, n):
    cols = [k for k in ("acc", "fid", "to_teacher", "sharpness") if k in next(iter(table.values()))[1]]
    names = {"acc": "acc", "fid": "FID-like", "to_teacher": "to teacher", "sharpness": "sharpness"}
    lines = [f"| model ({n} captions per object count) | " + " | ".join(f"{names[c]}, {k} obj." for k in (1, 2)
                                                                      for c in cols) + " |",
             "|---" * (1 + 2 * len(cols)) + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k][c]:.3f}" for k in (1, 2) for c in cols) + " |")
    return "\n".join(lines)
