"""Sample quality with no download: a digit classifier's FID and confidence, and the paper's tables.

- FID (Heusel et al., 2017) here is the Fréchet distance between Gaussians fitted to the
  penultimate features (64-d) of a small CNN trained on the same 16x16 digits
  (apps/pretrained/digits_classifier.pt, apps/classifier.py), for real and generated images. It plays
  the role of Inception's pool features on CIFAR-10; its values are on another scale
  than published FIDs and are comparable only with each other at the same sample count.
  FID is biased upwards and noisy at small N: with these features, N = 100 real images
  against all 1,797 score 60-140, N = 250 about 25-50, N = 1000 about 3-5; so
  run_quality reports that real-data floor beside the table ("reference").
- Confidence: the classifier's mean max softmax probability over generated images.
- Table 1 of the DDIM paper in shape: FID for S x η (`fid_table`), every cell from the
  same x_T; Table 2: reconstruction error of encode-then-decode (`reconstruction_table`).

Generated images are clamped to [-1, 1] and quantised to 8 bits (as if saved as PNG)
before the classifier sees them; the real digits are 8-bit already.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..core.checks import ETA_DDPM_NOISY, check_eta
from ..sampling import FastSampler
from ..sampling.noise import derive_seed, indexed_noise
from .classifier import DigitClassifier
from .data import load_digits
from .pretrained import load_classifier, load_pretrained, load_schedule

FID_STEPS = (10, 20, 50, 100, 1000)
FID_ETAS = (0.0, 0.2, 0.5, 1.0, ETA_DDPM_NOISY)
RECON_STEPS = (10, 20, 50, 100, 1000)


# --- the Fréchet distance -----------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) in float64 of features (N, D), N >= 2 (unbiased covariance)."""
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or Inf")
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


# --- the metric on images ---------------------------------------------------------------


def to_uint8_levels(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] clamped and rounded to the 256 levels of an 8-bit PNG (still in [-1, 1])."""
    return torch.round((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


class DigitMetric:
    """FID and mean confidence of generated 16x16 digits against the real ones.

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

    def __call__(self, images: torch.Tensor) -> dict:
        """{"fid": FID against the real images, "confidence": mean max softmax probability}."""
        feats, probs = self.features(images)
        fid = frechet_distance(*self.real_stats, *feature_statistics(feats))
        return {"fid": fid, "confidence": float(probs.max(dim=1).values.mean())}


# --- the tables -------------------------------------------------------------------------------


@dataclass
class QualitySettings:
    """What `run_quality` measures and on how many images.

    num_samples: generated images per (S, η) cell of the FID table (all cells share x_T);
    num_reconstruct: real images encoded and decoded per S; batch_size: images per
    sampler call; seed: x_T, the step noise and the choice of real images.
    """

    num_samples: int = 1000
    num_reconstruct: int = 256
    batch_size: int = 250
    seed: int = 0
    steps: tuple = FID_STEPS
    etas: tuple = FID_ETAS
    recon_steps: tuple = RECON_STEPS

    def validate(self) -> "QualitySettings":
        for name in ("num_samples", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "num_samples" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'num_samples' else 1}, got {v!r}")
        if isinstance(self.num_reconstruct, bool) or not isinstance(self.num_reconstruct, int) or self.num_reconstruct < 0:
            raise ValueError(f"num_reconstruct must be an int >= 0, got {self.num_reconstruct!r}")
        self.etas = tuple(check_eta(e) for e in self.etas)
        for name in ("steps", "recon_steps"):
            v = tuple(getattr(self, name))
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in v):
                raise ValueError(f"{name} must be positive ints, got {v!r}")
            setattr(self, name, v)
        return self

    def model_calls(self) -> int:
        """Model evaluations (one image at one step) that run_quality makes."""
        return self.num_samples * len(self.etas) * sum(self.steps) + 2 * self.num_reconstruct * sum(self.recon_steps)


QUICK = QualitySettings(num_samples=250, num_reconstruct=50, batch_size=250)
FULL = QualitySettings()


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="call", unit_scale=True, dynamic_ncols=True)


def fid_table(model, schedule, metric: DigitMetric, settings: QualitySettings, *, device="cpu", progress: bool = False, sampler_kwargs=None) -> list:
    """Table 1 in shape: [{"eta", "steps", "fid", "confidence"}] for every (η, S) of `settings`.

    Every cell samples the same settings.num_samples x_T (indexed_noise(seed, i)); the step
    noise of batch b comes from a generator seeded by (seed, 1, b), the same in every cell.
    """
    s = settings.validate()
    shape = (model.in_channels, model.resolution, model.resolution)
    x_T = indexed_noise(s.seed, 0, s.num_samples, shape)
    bar = _progress(s.num_samples * len(s.etas) * sum(s.steps), progress, "FID table")
    rows = []
    for eta in s.etas:
        for steps in s.steps:
            sampler = FastSampler(model, schedule, steps=steps, eta=eta, **(sampler_kwargs or {}))
            out = []
            for b, i in enumerate(range(0, s.num_samples, s.batch_size)):
                xb = x_T[i : i + s.batch_size].to(device)
                g = torch.Generator(device=xb.device).manual_seed(derive_seed(s.seed, 1, b))
                out.append(sampler.sample(xb, generator=g).float().cpu())
                if bar is not None:
                    bar.update(xb.shape[0] * steps)
            rows.append({"eta": eta, "steps": steps, **metric(torch.cat(out))})
    if bar is not None:
        bar.close()
    return rows


def reconstruction_table(model, schedule, images: torch.Tensor, settings: QualitySettings, *, device="cpu", progress: bool = False, sampler_kwargs=None) -> list:
    """Table 2 in shape: [{"steps", "mse"}]: x0 -> encode with S steps -> decode with S steps.

    images: (N, C, H, W) in [-1, 1]. mse: per-dimension mean squared error on the [0, 1]
    scale, ((x_rec - x0) / 2)² averaged over all images and pixels (no clamp).
    """
    s = settings.validate()
    bar = _progress(2 * images.shape[0] * sum(s.recon_steps), progress, "reconstruction")
    rows = []
    for steps in s.recon_steps:
        sampler = FastSampler(model, schedule, steps=steps, eta=0.0, **(sampler_kwargs or {}))
        se, n = 0.0, 0
        for i in range(0, images.shape[0], s.batch_size):
            x0 = images[i : i + s.batch_size].to(device)
            rec = sampler.sample(sampler.encode(x0)).float()
            se += (((rec - x0.float()) / 2.0) ** 2).sum().item()
            n += x0.numel()
            if bar is not None:
                bar.update(2 * x0.shape[0] * steps)
        rows.append({"steps": steps, "mse": se / n})
    if bar is not None:
        bar.close()
    return rows


def run_quality(
    model=None,
    schedule=None,
    settings: Optional[QualitySettings] = None,
    *,
    device="cpu",
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Both tables for the embedded digits model (or `model` with `schedule`), as the JSON of `ddim-fast quality`.

    {"fid": [{"eta", "steps", "fid", "confidence"}, ...], "reconstruction": [{"steps", "mse"}, ...],
     "reference": {"fid_real_subset", "confidence_real"}, "meta": {settings, timings, versions}}
    reference.fid_real_subset is the FID of num_samples real images against all of them:
    the floor that sampling noise alone gives at this sample count.
    """
    s = (settings or QualitySettings()).validate()
    if model is None:
        model = load_pretrained("digits")
        schedule = load_schedule("digits") if schedule is None else schedule
    if schedule is None:
        raise ValueError("pass the schedule the model was trained with (schedule=...)")
    model = model.to(device).eval()
    t0 = time.perf_counter()
    metric = DigitMetric()
    real, _ = load_digits()
    perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(derive_seed(s.seed, 2)))
    subset = real[perm[: min(s.num_samples, real.shape[0])]]
    reference = {"fid_real_subset": metric(subset)["fid"], "confidence_real": metric.real_confidence}
    if log:
        log(f"real digits: FID of {subset.shape[0]} real images vs all {real.shape[0]}: {reference['fid_real_subset']:.3f}; mean confidence {reference['confidence_real']:.4f}")
    t1 = time.perf_counter()
    fid = fid_table(model, schedule, metric, s, device=device, progress=progress)
    t2 = time.perf_counter()
    recon_images = real[perm[: min(s.num_reconstruct, real.shape[0])]]
    recon = reconstruction_table(model, schedule, recon_images, s, device=device, progress=progress) if s.num_reconstruct else []
    t3 = time.perf_counter()
    meta = dict(
        settings={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        num_reconstruct_used=int(recon_images.shape[0]),
        seconds={"fid": round(t2 - t1, 1), "reconstruction": round(t3 - t2, 1), "total": round(t3 - t0, 1)},
        device=str(device),
        dtype="float32",
        threads=torch.get_num_threads(),
        torch=str(torch.__version__),
        sampler="FastSampler",
        feature_dim=int(metric.real_stats[0].shape[0]),
    )
    return {"fid": fid, "reconstruction": recon, "reference": reference, "meta": meta}


def format_tables(result: dict) -> str:
    """The two tables of run_quality's result as markdown (η rows x S columns, as in the paper)."""
    lines = []
    fid = result.get("fid", [])
    etas = list(dict.fromkeys(r["eta"] for r in fid))
    steps = sorted({r["steps"] for r in fid})
    cell = {(r["eta"], r["steps"]): r for r in fid}
    for key, title, fmt in (("fid", "FID (classifier features; lower is better)", "{:.3f}"), ("confidence", "mean classifier confidence", "{:.4f}")):
        if not fid:
            break
        lines += [f"{title}", "", "| η \\ S | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for e in etas:
            name = "σ̂ (ddpm_noisy)" if e == ETA_DDPM_NOISY else f"{e:g}"
            vals = [fmt.format(cell[(e, s)][key]) if (e, s) in cell else "" for s in steps]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
    rec = result.get("reconstruction", [])
    if rec:
        lines += ["reconstruction MSE per dimension ([0, 1] scale)", "", "| S | " + " | ".join(str(r["steps"]) for r in rec) + " |", "|---" * (len(rec) + 1) + "|"]
        lines.append("| MSE | " + " | ".join(f"{r['mse']:.2e}" for r in rec) + " |")
        lines.append("")
    ref = result.get("reference")
    if ref:
        lines.append(f"real digits: FID of a real subset {ref['fid_real_subset']:.3f} (the floor at this sample count), mean confidence {ref['confidence_real']:.4f}")
    return "\n".join(lines)


def check_trends(result: dict, steps=(10, 20)) -> list:
    """The issue's goals, as (statement, holds) pairs: FID(0) < FID(0.5) < FID(1) < FID(σ̂) at
    each S in `steps`, and reconstruction error falling as S grows."""
    cell = {(r["eta"], r["steps"]): r["fid"] for r in result.get("fid", [])}
    out = []
    for s in steps:
        keys = [(0.0, s), (0.5, s), (1.0, s), (ETA_DDPM_NOISY, s)]
        if all(k in cell for k in keys):
            v = [cell[k] for k in keys]
            out.append((f"S={s}: FID(η=0) {v[0]:.3f} < FID(0.5) {v[1]:.3f} < FID(1) {v[2]:.3f} < FID(σ̂) {v[3]:.3f}", all(a < b for a, b in zip(v, v[1:]))))
    rec = result.get("reconstruction", [])
    if len(rec) > 1:
        mses = [r["mse"] for r in sorted(rec, key=lambda r: r["steps"])]
        out.append(("reconstruction MSE falls as S grows: " + " > ".join(f"{m:.2e}" for m in mses), all(a > b for a, b in zip(mses, mses[1:]))))
    return out


__all__ = [
    "DigitMetric", "feature_statistics", "frechet_distance", "fid_from_features", "to_uint8_levels", "QualitySettings", "QUICK", "FULL", "fid_table", "reconstruction_table", "run_quality",
    "format_tables", "check_trends", "FID_STEPS", "FID_ETAS", "RECON_STEPS",
]  # fmt: skip
