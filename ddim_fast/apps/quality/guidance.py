"""How well guidance steers the class-conditional digits model: for each guidance scale w,
samples of every digit, read by the embedded digit classifier.

    from ddim_fast.apps.quality.guidance import GuidanceSettings, run_guidance
    result = run_guidance(UNet.from_pretrained("digits-cond"), load_schedule("digits-cond"), GuidanceSettings())

Every scale draws sample i of digit d from the same x_T (common random numbers), so the
differences between scales are the guidance's, not the draw's. w = 0 is the unconditional
model (the null label), w = 1 the conditional model alone, w > 1 guidance beyond it.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ...core.checks import check_positive_int
from ...core.schedule import Schedule
from ...sampling import FastSampler
from ...sampling.noise import indexed_noise
from ..pretrained import load_classifier


@dataclass
class GuidanceSettings:
    """scales: guidance scales w; per_digit: samples of each digit per scale; steps, eta: the
    sampler's; batch_size: samples per sampler call; seed: sample i of digit d has x_T from
    (seed, 1000 d + i)."""

    scales: tuple = (0.0, 1.0, 2.0, 4.0)
    per_digit: int = 100
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 250
    seed: int = 0

    def validate(self) -> "GuidanceSettings":
        if not self.scales or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in self.scales):
            raise ValueError(f"scales must be finite numbers, got {self.scales!r}")
        for name in ("per_digit", "steps", "batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.per_digit > 1000:
            raise ValueError(f"per_digit must be at most 1000 (sample indices of digit d are 1000 d + i), got {self.per_digit}")
        return self


@torch.no_grad()
def run_guidance(model, schedule: Schedule, settings: GuidanceSettings, *, device=None, log: Optional[Callable[[str], None]] = None) -> dict:
    """{"settings", "rows": [{"w", "accuracy", "per_digit", "confidence"}], "meta"}: accuracy is
    the share of samples the classifier reads as the digit asked for, confidence the mean
    classifier probability of that digit."""
    settings = settings.validate()
    null = getattr(model, "null_label", None)
    if null is None:
        raise ValueError("run_guidance needs a class-conditional model (UNet(num_classes=...))")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    classes = list(range(null))
    classifier = load_classifier().to(device)
    sampler = FastSampler(model, schedule, steps=settings.steps, eta=settings.eta)
    shape = (model.in_channels, model.resolution, model.resolution)
    t0 = time.perf_counter()
    rows = []
    for w in settings.scales:
        hits, conf, per = 0, 0.0, {}
        for d in classes:
            d_hits = 0
            for start in range(0, settings.per_digit, settings.batch_size):
                count = min(settings.batch_size, settings.per_digit - start)
                x_T = indexed_noise(settings.seed, 1000 * d + start, count, shape).to(device)
                g = torch.Generator(device=device).manual_seed(settings.seed * 7919 + 1000 * d + start)
                labels = torch.full((count,), d, dtype=torch.long, device=device)
                x = sampler.sample(x_T, generator=g, model_kwargs={"class_labels": labels}, guidance_scale=float(w), uncond_kwargs={"class_labels": torch.full_like(labels, null)})
                p = classifier(x.float().clamp(-1, 1)).softmax(1)
                d_hits += int((p.argmax(1) == d).sum())
                conf += float(p[:, d].sum())
            per[d] = d_hits / settings.per_digit
            hits += d_hits
        n = settings.per_digit * len(classes)
        rows.append(dict(w=float(w), accuracy=hits / n, per_digit=per, confidence=conf / n))
        if log:
            log(f"w = {w:g}: {hits} of {n} read as the digit asked for ({100 * hits / n:.1f}%), mean confidence {conf / n:.3f}")
    meta = dict(seconds=round(time.perf_counter() - t0, 1), device=device.type, threads=torch.get_num_threads(), torch=str(torch.__version__), model_calls=2 * len(settings.scales) * len(classes) * settings.per_digit * settings.steps)
    return dict(settings={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}, rows=rows, meta=meta)


def format_table(result: dict) -> str:
    """A markdown table: w, accuracy, mean confidence, and the worst digit."""
    lines = ["| guidance w | read as the digit asked for | mean confidence | worst digit |", "|---|---|---|---|"]
    for r in result["rows"]:
        worst = min(r["per_digit"], key=lambda d: r["per_digit"][d])
        lines.append(f"| {r['w']:g} | {100 * r['accuracy']:.1f}% | {r['confidence']:.3f} | {worst} ({100 * r['per_digit'][worst]:.0f}%) |")
    return "\n".join(lines)
