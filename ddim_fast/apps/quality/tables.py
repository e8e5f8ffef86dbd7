"""The paper's tables on the embedded digits model, with no download.

- Table 1 of the DDIM paper in shape: FID and KID (apps/quality/metrics.py) for S x η
  (`fid_table`); Table 2: reconstruction error of encode-then-decode
  (`reconstruction_table`); run_quality reports the real-data FID floor beside them.
- Common random numbers: sample i of every (S, η) cell starts from the same x_T
  (indexed_noise) and draws its step noise from the same stream, so that differences
  between cells measure the sampler, not the draw; the difference of two cells' KID gets
  a paired standard error (`comparisons`), smaller than either cell's own when the two
  samplers stay close and about the same when they part early (η = 0 against η = 1).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ...core.checks import ETA_DDPM_NOISY, check_eta
from ...sampling import FastSampler
from ...sampling.noise import derive_seed, indexed_noise
from ..data import load_digits
from ..pretrained import load_pretrained, load_schedule
from .metrics import DigitMetric, KidReference, feature_statistics, fid_from_features, frechet_distance, jackknife_se, kid, polynomial_kernel, to_uint8_levels

FID_STEPS = (10, 20, 50, 100, 1000)
FID_ETAS = (0.0, 0.2, 0.5, 1.0, ETA_DDPM_NOISY)
RECON_STEPS = (10, 20, 50, 100, 1000)


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
