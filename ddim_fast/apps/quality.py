"""Sample quality with no download: a digit classifier's FID and confidence, and the paper's tables.

- FID (Heusel et al., 2017) here is the Fréchet distance between Gaussians fitted to the
  penultimate features (64-d) of a small CNN trained on the same 16x16 digits
  (apps/pretrained/digits_classifier.pt, apps/classifier.py), for real and generated images. It plays
  the role of Inception's pool features on CIFAR-10; its values are on another scale
  than published FIDs and are comparable only with each other at the same sample count.
  FID is biased upwards and noisy at small N: with these features, N = 100 real images
  against all 1,797 score 60-140, N = 250 about 25-50, N = 1000 about 3-5; so
  run_quality reports that real-data floor beside the table ("reference").
- KID (Bińkowski et al., 2018) beside it: the unbiased estimate of the squared MMD between
  real and generated features with the kernel (xᵀy / D + 1)³. Its expectation does not
  depend on the sample count, so cells with fewer samples are comparable, and it comes
  with a standard error (the jackknife's over the generated samples; the real set, all of
  it, taken as fixed).
- Confidence: the classifier's mean max softmax probability over generated images.
- Table 1 of the DDIM paper in shape: FID and KID for S x η (`fid_table`); Table 2:
  reconstruction error of encode-then-decode (`reconstruction_table`).
- Common random numbers: sample i of every (S, η) cell starts from the same x_T
  (indexed_noise) and draws its step noise from the same stream, so that differences
  between cells measure the sampler, not the draw; and the difference of two cells' KID
  gets a paired standard error (`comparisons`), far smaller than either cell's own.

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


# --- KID: the unbiased MMD² with a polynomial kernel ------------------------------------------


def _as_float64(name: str, features) -> np.ndarray:
    f = features.detach().cpu().double().numpy() if torch.is_tensor(features) else np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 3:
        raise ValueError(f"{name} must be (N, D) with N >= 3, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} holds NaN or Inf")
    return f


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
        real = _as_float64("real features", real)
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
        y = _as_float64("generated features", fake)
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


# --- the tables -------------------------------------------------------------------------------


@dataclass
class QualitySettings:
    """What `run_quality` measures and on how many images.

    num_samples: generated images per (S, η) cell of the FID table; num_reconstruct: real
    images encoded and decoded per S; batch_size: images per sampler call; seed: x_T, the
    step noise and the choice of real images. reduced: ((S, etas, n), ...): at that S only
    the cells of those η run, with n samples each (the first n of every other cell's); an
    entry for an S or η the table does not have is ignored. Sample i is the same draw in
    every cell when the cells' sample counts are multiples of batch_size (the presets' are):
    a sampler call draws its step noise for the whole batch at once.
    """

    num_samples: int = 1000
    num_reconstruct: int = 256
    batch_size: int = 250
    seed: int = 0
    steps: tuple = FID_STEPS
    etas: tuple = FID_ETAS
    recon_steps: tuple = RECON_STEPS
    reduced: tuple = ()

    def validate(self) -> "QualitySettings":
        for name in ("num_samples", "batch_size"):
            v = getattr(self, name)
            least = 3 if name == "num_samples" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
        if isinstance(self.num_reconstruct, bool) or not isinstance(self.num_reconstruct, int) or self.num_reconstruct < 0:
            raise ValueError(f"num_reconstruct must be an int >= 0, got {self.num_reconstruct!r}")
        self.etas = tuple(check_eta(e) for e in self.etas)
        for name in ("steps", "recon_steps"):
            v = tuple(getattr(self, name))
            if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in v):
                raise ValueError(f"{name} must be positive ints, got {v!r}")
            setattr(self, name, v)
        reduced = []
        for entry in self.reduced:
            try:
                steps, etas, n = entry
                etas = tuple(check_eta(e) for e in etas)
            except (TypeError, ValueError) as e:
                raise ValueError(f"reduced entries must be (S, etas, num_samples), got {entry!r} ({e})") from None
            if isinstance(n, bool) or not isinstance(n, int) or n < 3:
                raise ValueError(f"reduced: num_samples must be an int >= 3, got {n!r} in {entry!r}")
            reduced.append((steps, etas, n))
        self.reduced = tuple(reduced)
        return self

    def cells(self) -> list:
        """[(η, S, samples)] of the FID table, η-major as the paper prints it."""
        reduced = {steps: (etas, n) for steps, etas, n in self.reduced}
        out = []
        for eta in self.etas:
            for steps in self.steps:
                if steps not in reduced:
                    out.append((eta, steps, self.num_samples))
                elif eta in reduced[steps][0]:
                    out.append((eta, steps, min(reduced[steps][1], self.num_samples)))
        return out

    def model_calls(self) -> int:
        """Model evaluations (one image at one step) that run_quality makes."""
        return sum(n * steps for _, steps, n in self.cells()) + 2 * self.num_reconstruct * sum(self.recon_steps)

    def describe(self) -> str:
        """What the FID table runs, in words (the CLI prints it)."""
        by_n = {}
        for eta, steps, n in self.cells():
            by_n.setdefault(n, {}).setdefault(steps, []).append(eta)
        parts = []
        for n, by_steps in sorted(by_n.items(), reverse=True):
            groups = {}
            for steps, etas in by_steps.items():
                groups.setdefault(tuple(etas), []).append(steps)
            for etas, steps in groups.items():
                names = ", ".join(eta_name(e) for e in etas)
                parts.append(f"S = {', '.join(map(str, steps))} for η = {names}: {n} samples each")
        return "; ".join(parts)


def eta_name(eta) -> str:
    return "σ̂" if eta == ETA_DDPM_NOISY else f"{eta:g}"


# The quick run, under 5 minutes on a 2-core VM: the three rows of the paper's ordering
# (DDIM, η = 1, DDPM's σ̂); 1000 samples per cell where that ordering is checked (S = 10,
# 20: cheap cells), 200 at S = 50 and 100, and S = 1000 for DDIM only on 100 (a sample
# there costs 100 of S = 10); 16 reconstructions per S. Every count a whole number of
# batches, so that sample i is one draw in every cell.
QUICK = QualitySettings(
    num_samples=1000,
    num_reconstruct=16,
    batch_size=100,
    etas=(0.0, 1.0, ETA_DDPM_NOISY),
    reduced=((50, (0.0, 1.0, ETA_DDPM_NOISY), 200), (100, (0.0, 1.0, ETA_DDPM_NOISY), 200), (1000, (0.0,), 100)),
)
FULL = QualitySettings()

# the paper's ordering at small S, of the rows a table has: FID(0) < FID(0.5) < FID(1) < FID(σ̂)
PAPER_ORDER = (0.0, 0.5, 1.0, ETA_DDPM_NOISY)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="call", unit_scale=True, dynamic_ncols=True)


def fid_table(model, schedule, metric: DigitMetric, settings: QualitySettings, *, device="cpu", progress: bool = False, sampler_kwargs=None, comparisons: Optional[list] = None) -> list:
    """Table 1 in shape: [{"eta", "steps", "num_samples", "fid", "kid", "kid_se", "confidence"}]
    for every cell of `settings`.

    Sample i of every cell starts from indexed_noise(seed, i); the step noise of batch b
    comes from a generator seeded by (seed, 1, b), the same in every cell. comparisons,
    when given a list, receives the paired KID differences of neighbours in the paper's
    order (`compare_cells`).
    """
    s = settings.validate()
    cells = s.cells()
    bar = _progress(sum(n * steps for _, steps, n in cells), progress, "FID table")
    rows, loo = [], {}
    for eta, steps, n in cells:
        images = cell_samples(model, schedule, s, eta, steps, n, device=device, bar=bar, sampler_kwargs=sampler_kwargs)
        row, loo[(eta, steps)] = metric.evaluate(images)
        rows.append({"eta": eta, "steps": steps, "num_samples": n, **row})
    if bar is not None:
        bar.close()
    if comparisons is not None:
        comparisons += compare_cells(rows, loo)
    return rows


def cell_samples(model, schedule, settings: QualitySettings, eta, steps: int, n: int, *, device="cpu", bar=None, sampler_kwargs=None) -> torch.Tensor:
    """The n images of one (η, S) cell, on the CPU in fp32: sample i from
    indexed_noise(seed, i), batch b's step noise from a generator seeded by (seed, 1, b)."""
    s = settings
    shape = (model.in_channels, model.resolution, model.resolution)
    x_T = indexed_noise(s.seed, 0, n, shape)
    sampler = FastSampler(model, schedule, steps=steps, eta=eta, **(sampler_kwargs or {}))
    out = []
    for b, i in enumerate(range(0, n, s.batch_size)):
        xb = x_T[i : i + s.batch_size].to(device)
        g = torch.Generator(device=xb.device).manual_seed(derive_seed(s.seed, 1, b))
        out.append(sampler.sample(xb, generator=g).float().cpu())
        if bar is not None:
            bar.update(xb.shape[0] * steps)
    return torch.cat(out)


def compare_cells(rows: list, loo: dict) -> list:
    """[{"steps", "lower", "higher", "kid_diff", "se"}]: for each S, KID(higher) - KID(lower)
    of the neighbours in the paper's order (η = 0, 0.5, 1, σ̂, of those the table has), with
    the paired jackknife's standard error: cells share sample i's x_T and noise, so leaving
    sample i out of both cancels most of the draw's noise. Only cells of equal size pair."""
    out = []
    cell = {(r["eta"], r["steps"]): r for r in rows}
    for steps in sorted({r["steps"] for r in rows}):
        present = [e for e in PAPER_ORDER if (e, steps) in loo]
        for lo, hi in zip(present, present[1:]):
            a, b = cell[(lo, steps)], cell[(hi, steps)]
            if a["num_samples"] != b["num_samples"]:
                continue
            se = jackknife_se(loo[(hi, steps)] - loo[(lo, steps)])
            out.append({"steps": steps, "lower": lo, "higher": hi, "kid_diff": b["kid"] - a["kid"], "se": se})
    return out


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

    {"fid": [{"eta", "steps", "num_samples", "fid", "kid", "kid_se", "confidence"}, ...],
     "comparisons": [{"steps", "lower", "higher", "kid_diff", "se"}, ...],
     "reconstruction": [{"steps", "mse"}, ...],
     "reference": {"fid_real_subset", "floors", "confidence_real"},
     "meta": {settings, cells, timings, versions}}
    reference.floors holds, for each sample count the table uses, the FID of that many real
    images against all of them: the floor that sampling noise alone gives there
    (fid_real_subset: the one at num_samples). KID needs no floor: its expectation for
    samples of the real distribution is 0 at any count (a subset of the reference set
    itself would score below 0, so none is reported). The same seed gives the same result.
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
    floors = []
    for n in sorted({n for _, _, n in s.cells()} | {s.num_samples}, reverse=True):
        m = metric(real[perm[: min(n, real.shape[0])]])
        floors.append({"num_samples": min(n, real.shape[0]), "fid": m["fid"]})
        if log:
            log(f"real digits: FID of {floors[-1]['num_samples']} real images against all {real.shape[0]}: {m['fid']:.3f} (the floor at that sample count)")
    reference = {"fid_real_subset": floors[0]["fid"], "floors": floors, "confidence_real": metric.real_confidence}
    t1 = time.perf_counter()
    comparisons = []
    fid = fid_table(model, schedule, metric, s, device=device, progress=progress, comparisons=comparisons)
    t2 = time.perf_counter()
    recon_images = real[perm[: min(s.num_reconstruct, real.shape[0])]]
    recon = reconstruction_table(model, schedule, recon_images, s, device=device, progress=progress) if s.num_reconstruct else []
    t3 = time.perf_counter()
    meta = dict(
        settings={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        cells=[{"eta": eta, "steps": steps, "num_samples": n} for eta, steps, n in s.cells()],
        num_reconstruct_used=int(recon_images.shape[0]),
        seconds={"fid": round(t2 - t1, 1), "reconstruction": round(t3 - t2, 1), "total": round(t3 - t0, 1)},
        device=str(device),
        dtype="float32",
        threads=torch.get_num_threads(),
        torch=str(torch.__version__),
        sampler="FastSampler",
        feature_dim=int(metric.real_stats[0].shape[0]),
    )
    return {"fid": fid, "comparisons": comparisons, "reconstruction": recon, "reference": reference, "meta": meta}


def format_tables(result: dict) -> str:
    """run_quality's result as markdown: FID, KID and confidence (η rows x S columns, as in
    the paper), the paired KID differences, the reconstruction error and the real floors."""
    lines = []
    fid = result.get("fid", [])
    etas = list(dict.fromkeys(r["eta"] for r in fid))
    steps = sorted({r["steps"] for r in fid})
    cell = {(r["eta"], r["steps"]): r for r in fid}
    tables = [
        ("FID (classifier features; lower is better)", lambda r: f"{r['fid']:.3f}"),
        ("KID x 1000 ± standard error (unbiased at any sample count; lower is better)", lambda r: f"{1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f}" if "kid" in r else ""),
        ("mean classifier confidence", lambda r: f"{r['confidence']:.4f}"),
    ]
    if len({r.get("num_samples") for r in fid}) > 1:
        tables.append(("samples per cell", lambda r: str(r.get("num_samples", ""))))
    for title, fmt in tables if fid else ():
        lines += [f"{title}", "", "| η \\ S | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for e in etas:
            name = "σ̂ (ddpm_noisy)" if e == ETA_DDPM_NOISY else f"{e:g}"
            vals = [fmt(cell[(e, s)]) if (e, s) in cell else "" for s in steps]
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        lines.append("")
    comp = result.get("comparisons", [])
    if comp:
        lines += ["paired KID differences (same x_T and noise per sample; ± the paired standard error)", ""]
        for c in comp:
            z = c["kid_diff"] / c["se"] if c["se"] > 0 else float("inf")
            lines.append(f"- S = {c['steps']}: KID(η={eta_name(c['higher'])}) - KID(η={eta_name(c['lower'])}) = {1e3 * c['kid_diff']:+.2f} ± {1e3 * c['se']:.2f} (x 1000; {z:+.1f} standard errors)")
        lines.append("")
    rec = result.get("reconstruction", [])
    if rec:
        lines += ["reconstruction MSE per dimension ([0, 1] scale)", "", "| S | " + " | ".join(str(r["steps"]) for r in rec) + " |", "|---" * (len(rec) + 1) + "|"]
        lines.append("| MSE | " + " | ".join(f"{r['mse']:.2e}" for r in rec) + " |")
        lines.append("")
    ref = result.get("reference")
    if ref:
        floors = ref.get("floors") or [{"num_samples": None, "fid": ref["fid_real_subset"]}]
        text = "; ".join(f"{f['num_samples']} real images: FID {f['fid']:.3f}" for f in floors)
        lines.append(f"FID of real digits against all of them (the floor at each sample count): {text}; mean confidence {ref['confidence_real']:.4f}; KID's floor is 0 at any count")
    return "\n".join(lines)


def check_trends(result: dict, steps=(10, 20)) -> list:
    """The issue's goals, as (statement, holds) pairs: at each S in `steps`, FID and KID rising
    along the paper's order η = 0 < 0.5 < 1 < σ̂ (of the rows the table has, at least two),
    and the reconstruction error falling as S grows."""
    cell = {(r["eta"], r["steps"]): r for r in result.get("fid", [])}
    out = []
    for s in steps:
        order = [e for e in PAPER_ORDER if (e, s) in cell]
        if len(order) < 2:
            continue
        for key, name in (("fid", "FID"), ("kid", "KID")):
            if not all(key in cell[(e, s)] for e in order):
                continue
            v = [cell[(e, s)][key] for e in order]
            scale, fmt = (1.0, "{:.3f}") if key == "fid" else (1e3, "{:.2f}")
            text = " < ".join(f"{name}(η={eta_name(e)}) {fmt.format(scale * x)}" for e, x in zip(order, v))
            out.append((f"S={s}: {text}" + (" (KID x 1000)" if key == "kid" else ""), all(a < b for a, b in zip(v, v[1:]))))
    rec = result.get("reconstruction", [])
    if len(rec) > 1:
        mses = [r["mse"] for r in sorted(rec, key=lambda r: r["steps"])]
        out.append(("reconstruction MSE falls as S grows: " + " > ".join(f"{m:.2e}" for m in mses), all(a > b for a, b in zip(mses, mses[1:]))))
    return out


__all__ = [
    "DigitMetric", "feature_statistics", "frechet_distance", "fid_from_features", "to_uint8_levels", "QualitySettings", "QUICK", "FULL", "fid_table", "reconstruction_table", "run_quality",
    "format_tables", "check_trends", "FID_STEPS", "FID_ETAS", "RECON_STEPS", "KidReference", "kid", "jackknife_se", "polynomial_kernel", "compare_cells", "cell_samples", "PAPER_ORDER",
]  # fmt: skip
