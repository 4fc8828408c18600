"""
Metrics and the results table. The toy world's numbers are measured with the pixel-space classifier of
toy/classifier.py (our stand-in for Inception, since no machine of ours can download the real metric networks):
- fid: an FID-like Fréchet distance between classifier features of the images and of real validation images;
- acc: attribute accuracy, the share of each caption's attributes that the classifier finds (text alignment);
- to_teacher: per-sample feature distance to the teacher's image for the same z and caption (the paper's
  DreamSim-to-teacher column).
TODO: the COCO protocol (FID with clean-fid, CLIP score) for real SD runs.

    python eval.py                                   # the teacher rows of the toy table
    python eval.py --ckpt=out/toy/ckpt.pt --out=out/toy/results   # + a student, written as .md and .json
    python eval.py --sanity=True                     # the metric's floor on real images, and its reactions
"""
import functools

import torch

from toy import shapes
from toy.classifier import DEFAULT_PATH, attribute_accuracy, blur, features, load_classifier


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

# -----------------------------------------------------------------------------
# the toy world


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


def feature_distance(model, a, b):
    """Mean cosine distance between the classifier features of paired images a[i], b[i]: our stand-in for the
    paper's DreamSim-to-the-teacher column (how far the one-step student strays from its teacher per sample)."""
    fa, fb = features(model, a), features(model, b)
    return (1 - torch.nn.functional.cosine_similarity(fa, fb, dim=1)).mean().item()


@torch.no_grad()
def toy_table(T, students, n=500, teacher_steps=25, guidance=3.0, seed0=2 * 10**6, batch_size=250, teacher=True):
    """The toy results: for 1- and 2-object validation captions (fixed seeds, one z per caption), the teacher
    (DDIM, `teacher_steps` steps, guidance and guidance 1), the teacher in one DDIM step, and each student
    (name -> function(z, cond) -> latent). Returns {name: {objects: {acc, fid[, to_teacher]}}}; teacher=False
    skips the teacher rows (and so the distance to the teacher, which is measured against the first row)."""
    from sample import seeded_noise
    model = _classifier(DEFAULT_PATH)
    rows = {f"teacher, DDIM {teacher_steps} steps, guidance {guidance:g}": lambda z, c, u: T.sample(z, c, u, teacher_steps, guidance),
            f"teacher, DDIM {teacher_steps} steps, guidance 1": lambda z, c, u: T.sample(z, c, u, teacher_steps, 1.0),
            f"teacher, DDIM 1 step, guidance {guidance:g}": lambda z, c, u: T.sample(z, c, u, 1, guidance)} if teacher else {}
    rows |= {name: (lambda z, c, u, f=f: f(z, c)) for name, f in students.items()}
    table = {name: {} for name in rows}
    for n_objects in (1, 2):
        _, caps, labels = shapes.make_batch(shapes.val_seeds(n), n_objects)
        z = seeded_noise(range(seed0, seed0 + n), T.latent_shape(), T.device)
        reference = None
        for name, fn in rows.items():
            images = []
            for i in range(0, n, batch_size):
                cond, uncond = T.conditions(caps[i:i + batch_size])
                images.append(T.decode(fn(z[i:i + batch_size], cond, uncond)).cpu())
            images = torch.cat(images)
            reference = images if reference is None and teacher else reference  # the first row is the teacher
            m = toy_metrics(images, labels, n_objects)
            table[name][n_objects] = m | ({"to_teacher": feature_distance(model, images, reference)} if teacher else {})
    return table


def markdown(table, n):
    cols = [k for k in ("acc", "fid", "to_teacher") if k in next(iter(table.values()))[1]]
    names = {"acc": "acc", "fid": "FID-like", "to_teacher": "to teacher"}
    lines = [f"| model ({n} captions per object count) | " + " | ".join(f"{names[c]}, {k} obj." for k in (1, 2)
                                                                      for c in cols) + " |",
             "|---" * (1 + 2 * len(cols)) + "|"]
    for name, r in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k][c]:.3f}" for k in (1, 2) for c in cols) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
ckpt = ""  # comma-separated train.py checkpoints to add as rows (their EMA students); '' = teacher rows only
n = 500  # validation captions per object count
teacher_steps = 25
guidance = 3.0
out = ""  # also write the table here as .md and .json ('' = print only)
sanity = False  # instead: the metric's own sanity table on real (and damaged) validation images

def sanity_table():
    """The metric's own floor and reactions: real validation images (not in the reference set), and damaged ones."""
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
    import json
    from sample import load_student, one_step
    from teacher import load_teacher
    T, students = None, {}
    for path in [p for p in ckpt.split(",") if p]:
        T, G, cfg = load_student(path)
        students[f"student {path} (EMA, 1 step)"] = (
            lambda z, c, G=G, cfg=cfg: one_step(G, z, c, T.alphas_cumprod, T.prediction_type, cfg["t_G"], cfg["g_param"]))
    T = T or load_teacher("toy/weights/sd")
    table = toy_table(T, students, n, teacher_steps, guidance)
    md = markdown(table, n)
    print(md)
    if out:
        with open(out + ".md", "w") as f:
            f.write(md + "\n")
        with open(out + ".json", "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    from configurator import configure
    configure(globals())
    sanity_table() if sanity else main()
