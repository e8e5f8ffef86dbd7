"""DDIM against DPM-Solver++(2M) on the embedded digits model, on the CPU: distance to the
ODE's solution, KID and time per sample.

    python benchmarks/solver_quality.py --out benchmarks/results/cpu-solvers-2026-12-02.json
    python benchmarks/solver_quality.py --skip uniform --out benchmarks/results/cpu-solvers-uniform-2026-12-02.json

1. Distance: sample i starts from the quality run's x_T for index i (indexed_noise(seed, i)).
   The ODE's solution is DDIM (η = 0) at S = 1000 from the same x_T; each solver at each S
   in --steps is scored by rms = sqrt(mean((x_S - x_ref)²)) over all samples and pixels.
   Every row uses one grid, --skip: "trailing" by default, whose top timestep is T - 1 at
   every S, as the reference's is, so that every row solves the same ODE from the same
   start. With "uniform" (FastSampler's default, and the quality run's) the top timestep
   is T - T / S, so a smaller S also starts the ODE at a lower t (800 at S = 5, 999 at
   S = 1000): that gap is then part of every distance.
2. KID: the quick quality run's cells at η = 0 (its sample count, batch size and seed; the
   same x_T per sample in every cell), on the same grid, for both solvers, and the paired difference of the
   two solvers' KID with its jackknife standard error.
3. Time: one FastSampler.sample call per (solver, S) at the distance batch, after one
   warm-up call of the same sampler and batch.

FastSampler in float32 throughout. The JSON's "meta" says where the numbers come from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch

from ddim_fast import FastSampler
from ddim_fast.apps.census.machine import cpu_name
from ddim_fast.apps.quality.metrics import DigitMetric, jackknife_se
from ddim_fast.apps.pretrained import load_pretrained, load_schedule
from ddim_fast.apps.quality.tables import QUICK, QualitySettings, cell_samples
from ddim_fast.core.grids import timestep_grid
from ddim_fast.sampling.noise import indexed_noise

SOLVERS = ("ddim", "dpmpp_2m")
DISTANCE_STEPS = (5, 10, 20, 50)
REFERENCE_STEPS = 1000
KID_STEPS = (10, 20)
# 256 samples: the S = 1000 reference is most of the run (256,000 model calls, near 0.8 ms
# each on 2 quiet cores: about 3.5 minutes), which keeps the whole script near 6 minutes
NUM_SAMPLES = 256
SEED = 0
SKIP = "trailing"  # top timestep T - 1 at every S, as the S = 1000 reference's
DTYPE = torch.float32
CHECK_STEPS = 10  # where the second-order solver should at least halve DDIM's distance


def print_now(line: str) -> None:
    print(line, flush=True)  # a long run's progress, even when stdout is a file


# --- where it ran -----------------------------------------------------------------------


def _short_commit() -> dict:
    """{"commit": short HEAD, "tree_dirty": tracked files changed} of this checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "tree_dirty": None}
    commit = head.stdout.strip() if head.returncode == 0 else None
    return {"commit": commit or None, "tree_dirty": bool(status.stdout.strip())}


def _is_virtual_machine() -> bool:
    """Whether /proc/cpuinfo carries the 'hypervisor' flag (a guest of a hypervisor)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " hypervisor" in line for line in f)
    except OSError:
        return False


def machine_meta(batch: int) -> dict:
    cores = os.cpu_count()
    kind = "VM" if _is_virtual_machine() else "machine"
    return {
        "device": "cpu",
        "machine": f"{cores}-core CPU {kind}",
        "cpu": cpu_name(),
        "cpu_count": cores,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "batch": batch,
        **_short_commit(),
        "torch": str(torch.__version__),
        "python": sys.version.split()[0],
        "date": datetime.date.today().isoformat(),
        "sampler": "FastSampler",
    }


# --- 1 and 3: distance to the ODE's solution, and time per sample ------------------------


def timed_sample(model, schedule, x_T: torch.Tensor, solver: str, steps: int, skip: str, *, warm_up: bool = True) -> tuple:
    """(x_S, seconds of one sample call): with warm_up, the call after a warm-up call of the
    same sampler and batch (the warm-up prepares the lean model and the plan). η = 0 adds no
    noise, so both calls give the same x_S."""
    sampler = FastSampler(model, schedule, steps=steps, eta=0.0, skip=skip, solver=solver, dtype=DTYPE)
    if warm_up:
        sampler.sample(x_T)
    start = time.perf_counter()
    x_S = sampler.sample(x_T)
    seconds = time.perf_counter() - start
    return x_S.float(), seconds


def rms_distance(x: torch.Tensor, reference: torch.Tensor) -> float:
    """sqrt(mean((x - reference)²)) over every sample and pixel, accumulated in float64."""
    return math.sqrt((x.double() - reference.double()).pow(2).mean().item())


def distance_table(model, schedule, x_T: torch.Tensor, steps: tuple, reference_steps: int, skip: str, log) -> tuple:
    """(rows [{"solver", "steps", "top_timestep", "rms", "seconds", "ms_per_sample"}],
    the reference's {"solver", "eta", "steps", "seconds", "ms_per_sample"})."""
    batch = x_T.shape[0]
    num_train_timesteps = len(schedule.betas64)
    # one call: the reference's time is not a row of the comparison, and a warm-up call at
    # S = 1000 would cost as much again as the reference itself
    reference, seconds = timed_sample(model, schedule, x_T, "ddim", reference_steps, skip, warm_up=False)
    reference_top = timestep_grid(num_train_timesteps, reference_steps, skip)[-1]
    reference_row = {"solver": "ddim", "eta": 0.0, "steps": reference_steps, "top_timestep": reference_top, "seconds": seconds, "ms_per_sample": 1e3 * seconds / batch, "timing": "one call, no warm-up"}
    log(f"reference: DDIM S = {reference_steps}, {seconds:.1f} s")
    rows = []
    for solver in SOLVERS:
        for s in steps:
            x_S, seconds = timed_sample(model, schedule, x_T, solver, s, skip)
            rms = rms_distance(x_S, reference)
            top = timestep_grid(num_train_timesteps, s, skip)[-1]
            rows.append({"solver": solver, "steps": s, "top_timestep": top, "rms": rms, "seconds": seconds, "ms_per_sample": 1e3 * seconds / batch})
            log(f"{solver} S = {s}: rms {rms:.4f}, {1e3 * seconds / batch:.2f} ms per sample")
    return rows, reference_row


def smallest_matching_steps(rows: list, bar_steps: int) -> dict:
    """{"bar": DDIM's row at bar_steps, solver: the smallest S whose distance is at most the
    bar's (None when none is)} for each solver."""
    bar = next(r for r in rows if r["solver"] == "ddim" and r["steps"] == bar_steps)
    out = {"bar": {"solver": "ddim", "steps": bar_steps, "rms": bar["rms"]}}
    for solver in SOLVERS:
        reaching = [r["steps"] for r in rows if r["solver"] == solver and r["rms"] <= bar["rms"]]
        out[solver] = min(reaching) if reaching else None
    return out


def halving_check(rows: list, steps: int) -> dict:
    """Whether dpmpp_2m's distance at `steps` is at most half of DDIM's there."""
    rms = {r["solver"]: r["rms"] for r in rows if r["steps"] == steps}
    ratio = rms["dpmpp_2m"] / rms["ddim"]
    statement = f"S = {steps}: rms(dpmpp_2m) {rms['dpmpp_2m']:.4f} <= 0.5 x rms(ddim) {rms['ddim']:.4f} (ratio {ratio:.3f})"
    return {"statement": statement, "holds": bool(ratio <= 0.5), "ratio": ratio}


# --- 2: KID of the quick quality run's cells ----------------------------------------------


def quick_kid_settings(steps: tuple) -> QualitySettings:
    """The quick run's settings (sample count, batch size, seed) for η = 0 at `steps`."""
    return QualitySettings(**{**QUICK.__dict__, "steps": tuple(steps), "etas": (0.0,)}).validate()


def kid_table(model, schedule, steps: tuple, skip: str, log) -> tuple:
    """(rows [{"solver", "steps", "num_samples", "batch_size", "seed", "fid", "kid", "kid_se",
    "confidence"}], paired [{"steps", "kid_diff", "se"}]: KID(dpmpp_2m) - KID(ddim) with the
    paired jackknife's standard error, sample i having the same x_T in both)."""
    settings = quick_kid_settings(steps)
    metric = DigitMetric()
    rows, leave_one_out = [], {}
    for solver in SOLVERS:
        for eta, s, n in settings.cells():
            images = cell_samples(model, schedule, settings, eta, s, n, sampler_kwargs={"solver": solver, "skip": skip, "dtype": DTYPE})
            row, leave_one_out[(solver, s)] = metric.evaluate(images)
            rows.append({"solver": solver, "steps": s, "eta": eta, "num_samples": n, "batch_size": settings.batch_size, "seed": settings.seed, **row})
            log(f"{solver} S = {s}: KID x 1000 {1e3 * row['kid']:.2f} ± {1e3 * row['kid_se']:.2f} ({n} samples)")
    kid = {(r["solver"], r["steps"]): r["kid"] for r in rows}
    paired = []
    for s in steps:
        loo_difference = leave_one_out[("dpmpp_2m", s)] - leave_one_out[("ddim", s)]
        paired.append({"steps": s, "kid_diff": kid[("dpmpp_2m", s)] - kid[("ddim", s)], "se": jackknife_se(loo_difference)})
    return rows, paired


# --- the whole measurement ----------------------------------------------------------------


def measure(
    model=None,
    schedule=None,
    *,
    num_samples: int = NUM_SAMPLES,
    steps: tuple = DISTANCE_STEPS,
    reference_steps: int = REFERENCE_STEPS,
    kid_steps: tuple = KID_STEPS,
    seed: int = SEED,
    skip: str = SKIP,
    log=print_now,
) -> dict:
    """Every number of this benchmark, as the JSON it writes. model and schedule default to
    the embedded digits model; kid_steps=() leaves KID out."""
    start = time.perf_counter()
    # read before sampling: the commit a long run started from is the code it imported
    meta = machine_meta(num_samples)
    load_before = os.getloadavg()  # other work on the machine slows the timed calls; say so
    if model is None:
        model, schedule = load_pretrained("digits"), load_schedule("digits")
    model = model.eval()
    shape = (model.in_channels, model.resolution, model.resolution)
    x_T = indexed_noise(seed, 0, num_samples, shape)
    with torch.no_grad():
        rows, reference = distance_table(model, schedule, x_T, tuple(steps), reference_steps, skip, log)
        kid_rows, kid_paired = kid_table(model, schedule, tuple(kid_steps), skip, log) if kid_steps else ([], [])
    checks = [halving_check(rows, CHECK_STEPS)] if CHECK_STEPS in steps else []
    meta["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    return {
        "meta": meta,
        "model": "digits",
        "grid": {"skip": skip, "top_timestep_note": "trailing: T - 1 at every S, as the reference's; uniform: T - T / S, so each S also starts the ODE at its own t"},
        "distance": {
            "what": "rms = sqrt(mean((x_S - x_ref)^2)) over all samples and pixels; x_ref: DDIM (eta 0) at the reference's S from the same x_T",
            "x_T": f"indexed_noise(seed={seed}, i) for i < {num_samples}",
            "reference": reference,
            "rows": rows,
            "smallest_steps_reaching_ddim": smallest_matching_steps(rows, max(steps)),
        },
        "kid": {
            "what": "the quick quality run's eta-0 cells (its sample count, batch size and seed) per solver; paired: KID(dpmpp_2m) - KID(ddim) with the paired jackknife's standard error",
            "rows": kid_rows,
            "paired": kid_paired,
        },
        "timing": {"what": "one FastSampler.sample call per (solver, S) after one warm-up call, at the distance batch: rows' seconds and ms_per_sample"},
        "checks": checks,
        "seconds_total": time.perf_counter() - start,
    }


def format_report(result: dict) -> str:
    """The numbers as markdown tables."""
    distance = result["distance"]
    lines = ["| solver | S | top t | rms to DDIM-1000 | ms / sample |", "|---|---|---|---|---|"]
    for r in distance["rows"]:
        lines.append(f"| {r['solver']} | {r['steps']} | {r['top_timestep']} | {r['rms']:.4f} | {r['ms_per_sample']:.2f} |")
    reaching = distance["smallest_steps_reaching_ddim"]
    bar = reaching["bar"]
    lines += ["", f"smallest S reaching DDIM-{bar['steps']}'s rms {bar['rms']:.4f}: " + ", ".join(f"{s} {reaching[s]}" for s in SOLVERS)]
    if result["kid"]["rows"]:
        lines += ["", "| solver | S | samples | KID x 1000 | FID | confidence |", "|---|---|---|---|---|---|"]
        for r in result["kid"]["rows"]:
            lines.append(f"| {r['solver']} | {r['steps']} | {r['num_samples']} | {1e3 * r['kid']:.2f} ± {1e3 * r['kid_se']:.2f} | {r['fid']:.2f} | {r['confidence']:.4f} |")
        for p in result["kid"]["paired"]:
            lines.append(f"- S = {p['steps']}: KID(dpmpp_2m) - KID(ddim) = {1e3 * p['kid_diff']:+.2f} ± {1e3 * p['se']:.2f} (x 1000, paired)")
    for check in result["checks"]:
        lines.append(f"{'[ok]  ' if check['holds'] else '[not]'} {check['statement']}")
    lines.append(f"took {result['seconds_total']:.0f} s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON to write")
    p.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help=f"x_T of the distance rows, one batch (default {NUM_SAMPLES})")
    p.add_argument("--steps", type=int, nargs="+", default=list(DISTANCE_STEPS))
    p.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS)
    p.add_argument("--kid-steps", type=int, nargs="*", default=list(KID_STEPS), help="S of the KID cells (none: no KID)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--skip", default=SKIP, help=f"the grid of every row, the reference's too (default {SKIP})")
    args = p.parse_args()
    result = measure(num_samples=args.num_samples, steps=tuple(args.steps), reference_steps=args.reference_steps, kid_steps=tuple(args.kid_steps), seed=args.seed, skip=args.skip)
    print(format_report(result))
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, allow_nan=False)
        f.write("\n")


if __name__ == "__main__":
    main()
