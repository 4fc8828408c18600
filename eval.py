"""
Metrics. So far the toy world's two numbers, measured with the pixel-space classifier of toy/classifier.py
(our stand-in for Inception, since no machine of ours can download the real metric networks):
- fid: an FID-like Fréchet distance between classifier features of the images and of real validation images;
- acc: attribute accuracy, the share of each caption's attributes that the classifier finds (text alignment).
TODO: FID / CLIP score and fidelity to the teacher for real SD runs; a results table from a checkpoint.

Sanity table on real validation images, from the repo root:
    python eval.py
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


if __name__ == "__main__":
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
