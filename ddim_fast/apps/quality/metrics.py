"""The quality metrics on a digit classifier's features: FID, KID and confidence.

- FID (Heusel et al., 2017) here is the Fréchet distance between Gaussians fitted to the
  penultimate features (64-d) of a small CNN trained on the same 16x16 digits
  (apps/pretrained/digits_classifier.pt, apps/quality/classifier.py), for real and generated images. It plays
  the role of Inception's pool features on CIFAR-10; its values are on another scale
  than published FIDs and are comparable only with each other at the same sample count.
  FID is biased upwards and noisy at small N: with these features, N = 100 real images
  against all 1,797 score 60-140, N = 200 about 30-35, N = 1000 about 3-5.
- KID (Bińkowski et al., 2018): the unbiased estimate of the squared MMD between real and
  generated features with the kernel (xᵀy / D + 1)³. Its expectation does not depend on
  the sample count, so cells with fewer samples are comparable, and it comes with a
  standard error (the jackknife's over the generated samples; the real set, all of it,
  taken as fixed) and leave-one-out values for paired comparisons.
- Confidence: the classifier's mean max softmax probability over generated images.

Generated images are clamped to [-1, 1] and quantised to 8 bits (as if saved as PNG)
before the classifier sees them; the real digits are 8-bit already.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..data import load_digits
from ..pretrained import load_classifier
from .classifier import DigitClassifier


# --- the Fréchet distance -----------------------------------------------------------------


def _as_float64(name: str, features, least: int) -> np.ndarray:
    """features (a tensor or array) as a float64 (N, D) array, checked: N >= least, finite."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < least:
        raise ValueError(f"{name} must be (N, D) with N >= {least}, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} hold NaN or Inf")
    return f


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of features (N, D), N >= 2 (unbiased covariance)."""
    f = _as_float64("features", features, 2)
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (float64).

    a = V diag(w) Vᵀ (numpy.linalg.eigh) -> V diag(sqrt(max(w, 0))) Vᵀ; the clamp drops the
    tiny negative eigenvalues that rounding gives a rank-deficient covariance.
    """
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² between N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2), which has the same eigenvalues
    as sigma1 sigma2; so two symmetric eigendecompositions, no scipy.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: expected mu (D,) and sigma (D, D) for one D, got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    r1 = _sqrtm_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def fid_from_features(real, fake) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


# --- KID: the unbiased MMD² with a polynomial kernel ------------------------------------------


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel (Bińkowski et al., 2018): k(x, y) = (xᵀy / D + 1)³, float64."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


class KidReference:
    """The real features' part of KID, computed once: mean_{i≠j} k(xᵢ, xⱼ) over the real set.

    Every feature vector is first centred on the real mean and divided by one number, the
    real features' RMS deviation per dimension, so that xᵀy / D is of order one whatever the
    network's scale (the digit classifier's features have norms near 56 in 64 dimensions,
    where the raw cubic kernel is dominated by their magnitude). One scale for all
    dimensions, not one each: a dimension that is (nearly) constant on real digits must not
    blow up a generated image that moves it. A fixed affine map, so KID is still the MMD of
    a fixed kernel."""

    def __init__(self, real):
        real = _as_float64("real features", real, 3)
        self.shift = real.mean(axis=0)
        self.scale = float(np.sqrt(((real - self.shift) ** 2).mean())) or 1.0
        self.real = (real - self.shift) / self.scale
        n = self.real.shape[0]
        k = polynomial_kernel(self.real, self.real)
        self.mean_xx = (k.sum() - np.trace(k)) / (n * (n - 1))

    def leave_one_out(self, fake) -> tuple[float, np.ndarray]:
        """(KID of `fake` against the real set, the M leave-one-out estimates, one per fake sample).

        KID = mean_{i≠j} k(xᵢ, xⱼ) + mean_{a≠b} k(yₐ, y_b) - 2 mean_{i,a} k(xᵢ, yₐ): the unbiased
        estimate of MMD² (real x, generated y), so its expectation does not depend on the number
        of samples, unlike FID's. The leave-one-out values drop one generated sample at a time,
        from the kernel's row sums (no recomputation): the jackknife's input."""
        y = _as_float64("generated features", fake, 3)
        if y.shape[1] != self.real.shape[1]:
            raise ValueError(f"generated features have D = {y.shape[1]}, the real ones {self.real.shape[1]}")
        y = (y - self.shift) / self.scale
        n, m = self.real.shape[0], y.shape[0]
        kyy = polynomial_kernel(y, y)
        np.fill_diagonal(kyy, 0.0)
        row_yy = kyy.sum(axis=1)
        s_yy = row_yy.sum()
        col_xy = polynomial_kernel(self.real, y).sum(axis=0)
        s_xy = col_xy.sum()
        est = self.mean_xx + s_yy / (m * (m - 1)) - 2.0 * s_xy / (n * m)
        loo = self.mean_xx + (s_yy - 2.0 * row_yy) / ((m - 1) * (m - 2)) - 2.0 * (s_xy - col_xy) / (n * (m - 1))
        return float(est), loo


def jackknife_se(loo: np.ndarray) -> float:
    """The jackknife standard error from leave-one-out estimates: sqrt((M-1)/M Σ (θ₍ᵢ₎ - θ̄)²)."""
    m = loo.shape[0]
    return float(np.sqrt((m - 1) / m * ((loo - loo.mean()) ** 2).sum()))


def kid(real, fake) -> tuple[float, float]:
    """(KID, its standard error) of generated features against real ones, both (N, D).

    The standard error is the jackknife's over the generated samples, the real set taken as
    fixed (it is the whole embedded data set here)."""
    est, loo = KidReference(real).leave_one_out(fake)
    return est, jackknife_se(loo)


# --- the metric on images ---------------------------------------------------------------


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] clamped and rounded to the 256 levels of an 8-bit PNG (still in [-1, 1])."""
    return torch.round((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


class DigitMetric:
    """FID, KID (with its standard error) and mean confidence of generated 16x16 digits against the real ones.

    classifier: a DigitClassifier (default: the embedded one). real: (N, 1, 16, 16) real
    images in [-1, 1] (default: all 1,797 embedded digits).
    """

    def __init__(self, classifier: Optional[DigitClassifier] = None, real: Optional[torch.Tensor] = None, batch_size: int = 512):
        if classifier is None:
            classifier = load_classifier("digits")
        if real is None:
            real = load_digits()[0]
        self.classifier = classifier.eval()
        self.batch_size = batch_size
        feats, probs = self.features(real)
        self.real_stats = feature_statistics(feats)
        self.real_kid = KidReference(feats)
        self.real_confidence = float(probs.max(dim=1).values.mean())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features (N, D), softmax probabilities (N, 10)) of images (N, 1, 16, 16)."""
        dev = next(self.classifier.parameters()).device
        feats, probs = [], []
        for i in range(0, images.shape[0], self.batch_size):
            x = to_uint8_levels(images[i : i + self.batch_size]).to(dev)
            f = self.classifier.features(x)
            feats.append(f.cpu())
            probs.append(torch.softmax(self.classifier.head(f), dim=1).cpu())
        return torch.cat(feats).double(), torch.cat(probs)

    def evaluate(self, images: torch.Tensor) -> tuple[dict, np.ndarray]:
        """({"fid", "kid", "kid_se", "confidence"} of images (N >= 3) against the real ones,
        KID's N leave-one-out estimates, for paired comparisons of cells)."""
        feats, probs = self.features(images)
        fid = frechet_distance(*self.real_stats, *feature_statistics(feats))
        kid, loo = self.real_kid.leave_one_out(feats)
        return {"fid": fid, "kid": kid, "kid_se": jackknife_se(loo), "confidence": float(probs.max(dim=1).values.mean())}, loo

    def __call__(self, images: torch.Tensor) -> dict:
        """{"fid": FID, "kid": KID, "kid_se": its standard error, "confidence": mean max
        softmax probability} of images (N >= 3) against the real ones."""
        return self.evaluate(images)[0]


__all__ = [
    "feature_statistics", "frechet_distance", "fid_from_features", "polynomial_kernel", "KidReference", "jackknife_se", "kid", "to_uint8_levels", "DigitMetric",
]  # fmt: skip
