"""Turn pytest-benchmark JSON files into markdown tables and a log-log plot.

    python benchmarks/report.py results/*.json [--md table.md] [--png plot.png] [--best-of] [--write-json merged.json]

Tables, with the machine each file came from: for each (model, batch) of test_sampling,
the median milliseconds of one sampling run per implementation and S, and the speed-ups
of fast over the reference (and over torch.compile when measured); for test_step, ms and
ops per step of each implementation; for test_kernels, each op's median microseconds and
bandwidth as a fraction of the copy in its group; for the GPU rows that carry the FLOPs of
one step (extra_info["flops_per_step"]), the TFLOP/s they achieve and, on a GPU named in
GPU_PEAK_TFLOPS, the fraction of its peak in the row's dtype. The plot needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

IMPL_ORDER = ["reference", "compile-fp32", "fast-fp32", "fast-bf16", "fast-compile-fp32", "fast-compile-bf16"]  # then the peers, by name

# Dense peak TFLOP/s per dtype, from NVIDIA's H100 and H200 datasheets: bf16 and fp16 on the
# tensor cores without sparsity (half the datasheets' "with sparsity" 1,979), fp32 on the CUDA
# cores. Keyed by the name torch.cuda.get_device_name() reports (machine_info["gpu"]); the
# H100 PCIe and NVL and the H200 NVL have lower peaks and other names, so they get no fraction.
# The benchmarks leave cuDNN's TF32 on (PyTorch's default), so an fp32 convolution may run on
# the tensor cores: an fp32 row above 1.0 of the fp32 peak says that it did.
H100_SXM_AND_H200 = {"bf16": 989.4, "fp16": 989.4, "fp32": 67.0}
GPU_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": H100_SXM_AND_H200,  # H100 SXM5
    "NVIDIA H200": H100_SXM_AND_H200,  # H200 SXM
}


def load(paths, best_of: bool = False):
    """[(machine label, GPU name or None, [benchmark dicts])]: files from the same machine and
    commit are merged. A later file's number for the same benchmark wins, or with best_of the
    lowest median of all the files (repeated runs on a noisy machine: each benchmark's least
    disturbed run)."""
    merged = {}
    gpus = {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine_info = data.get("machine_info", {})
        label = machine_label(machine_info)
        gpus[label] = machine_info.get("gpu")
        runs = merged.setdefault(label, {})
        for b in data.get("benchmarks", []):
            key = b.get("fullname") or b.get("name") or id(b)
            if key in runs and best_of and runs[key]["stats"]["median"] <= b["stats"]["median"]:
                continue
            runs[key] = b
    return [(label, gpus[label], list(runs.values())) for label, runs in merged.items()]


def write_json(paths, out: str, best_of: bool) -> None:
    """The merged benchmarks of `paths` (one machine) as one pytest-benchmark file, without
    the per-round raw data, for benchmarks/results/."""
    with open(paths[0]) as f:
        first = json.load(f)
    (label, _gpu, benchmarks), *others = load(paths, best_of)
    if others:
        raise SystemExit(f"report.py: --write-json merges files of one machine and commit; got {len(others) + 1}")
    for b in benchmarks:
        b.get("stats", {}).pop("data", None)
    first["benchmarks"] = benchmarks
    first["merged_from"] = {"files": len(paths), "rule": "lowest median of the files" if best_of else "last file wins"}
    with open(out, "w") as f:
        json.dump(first, f, indent=1)


def machine_label(mi: dict) -> str:
    dev = mi.get("gpu") or f"CPU: {mi.get('cpu_model', mi.get('processor', '?'))} ({mi.get('cpu_count', '?')} cores)"
    commit = str(mi.get("commit", "?"))[:12]
    return f"{dev}; torch {mi.get('torch', '?')}, triton {mi.get('triton', '-')}; commit {commit}"


def sampling_rows(benchmarks):
    """{(model, batch): {steps: {impl: median ms}}} for the test_sample benchmarks."""
    table = defaultdict(lambda: defaultdict(dict))
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "steps" not in info or "impl" not in info or info.get("kind") == "step":
            continue
        impl = info["impl"] if info["impl"] == "reference" else f"{info['impl']}-{info['dtype']}"
        table[(info["model"], info["batch"])][info["steps"]][impl] = b["stats"]["median"] * 1e3
    return table


def step_rows(benchmarks):
    """{(model, batch): [(impl-dtype, ms per step, ops per step, first-call seconds)]} for the test_step benchmarks."""
    table = defaultdict(list)
    for b in benchmarks:
        info = b.get("extra_info", {})
        if info.get("kind") == "step":
            ms = info.get("ms_per_step", b["stats"]["median"] * 1e3 / info["steps"])
            table[(info["model"], info["batch"])].append((f"{info['impl']}-{info['dtype']}", ms, info.get("ops_per_step"), info.get("first_call_s")))
    return table


def step_markdown(label, benchmarks) -> list:
    lines = []
    for (model, batch), rows in sorted(step_rows(benchmarks).items()):
        ref = next((ms for name, ms, *_ in rows if name == "reference-fp32"), None)
        best = {}  # dtype -> the fastest torch.compile peer in that dtype, any mode
        for name, ms, *_ in rows:
            if name.startswith("peer-"):
                dtype = name.rsplit("-", 1)[1]
                best[dtype] = min(ms, best.get(dtype, ms))
        lines += [f"**One step, {model} UNet, batch {batch}** — {label}\n",
                  "| implementation | ms per step | ops per step | speed-up over reference | vs best compile peer (same dtype) | first call (s) |", "|---|---|---|---|---|---|"]
        for name, ms, n_ops, first in rows:
            cells = [name, f"{ms:.2f}", "-" if n_ops is None else f"{n_ops:.0f}", f"{ref / ms:.2f}x" if ref else "-",
                     f"{best[name.rsplit('-', 1)[1]] / ms:.2f}x" if name.rsplit("-", 1)[1] in best else "-", "-" if first is None else f"{first:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def kernel_markdown(label, benchmarks) -> list:
    groups = defaultdict(dict)
    for b in benchmarks:
        info = b.get("extra_info", {})
        if "gbps" in info and "steps" not in info:
            groups[b["group"]][info["impl"]] = (b["stats"]["median"] * 1e6, info["gbps"])
    if not groups:
        return []
    lines = [f"**Kernels** — {label}\n", "| op, shape | impl | median µs | GB/s | fraction of copy |", "|---|---|---|---|---|"]
    for group, impls in sorted(groups.items()):
        copy = impls.get("copy", (None, None))[1]
        for impl, (us, gbps) in impls.items():
            lines.append(f"| {group} | {impl} | {us:.1f} | {gbps:.1f} | {f'{gbps / copy:.2f}' if copy else '-'} |")
    lines.append("")
    return lines


def ms_per_step(benchmark) -> float:
    """Milliseconds of one step: test_step's own ms_per_step, else a sampling run's median over S."""
    info = benchmark["extra_info"]
    return info.get("ms_per_step", benchmark["stats"]["median"] * 1e3 / info["steps"])


def throughput_markdown(label, gpu, benchmarks) -> list:
    """One row per GPU benchmark with extra_info["flops_per_step"] (one step of the reference
    loop, its model call and update, as torch.utils.flop_counter counts them): effective
    TFLOP/s = those FLOPs / this row's time per step, and its fraction of the peak in the row's
    dtype on a GPU of GPU_PEAK_TFLOPS. A path that does less work than the reference (the lean
    SD UNet computes the prompt's K and V once per run: 5% of an SD-1.5 step) shows it as
    throughput. CPU rows are left out."""
    rows = [b for b in benchmarks if "flops_per_step" in b.get("extra_info", {}) and b["extra_info"].get("device") == "cuda"]
    if not rows:
        return []
    peaks = GPU_PEAK_TFLOPS.get(gpu, {})
    lines = [f"**Effective TFLOP/s per step** (the reference loop's FLOPs over each row's time) — {label}\n",
             "| group | implementation | S | ms per step | GFLOP per step | TFLOP/s | peak TFLOP/s | fraction of peak |", "|---|---|---|---|---|---|---|---|"]
    for b in sorted(rows, key=lambda b: b.get("group") or ""):
        info = b["extra_info"]
        ms = ms_per_step(b)
        tflops = info["flops_per_step"] / (ms * 1e-3) / 1e12
        peak = peaks.get(info["dtype"])
        implementation = f"{info.get('impl') or info.get('solver')}-{info['dtype']}"
        cells = [b.get("group", "-"), implementation, str(info["steps"]), f"{ms:.3f}", f"{info['flops_per_step'] / 1e9:.2f}", f"{tflops:.2f}",
                 f"{peak:.1f}" if peak else "-", f"{tflops / peak:.3f}" if peak else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def markdown(files) -> str:
    lines = []
    for label, gpu, benchmarks in files:
        lines += step_markdown(label, benchmarks) + kernel_markdown(label, benchmarks) + throughput_markdown(label, gpu, benchmarks)
    for label, _gpu, benchmarks in files:
        for (model, batch), by_steps in sorted(sampling_rows(benchmarks).items()):
            impls = [i for i in IMPL_ORDER if any(i in row for row in by_steps.values())]
            impls += sorted({i for row in by_steps.values() for i in row} - set(impls))
            lines.append(f"**{model} UNet, batch {batch}** — {label}\n")
            peers = [i for i in impls if i.startswith("peer-")]
            head = ["S"] + [f"{i} (ms)" for i in impls] + ["fast / reference"]
            if "compile-fp32" in impls:  # files before the peers: one compile baseline
                head.append("fast / compile")
            if peers:
                head += ["best peer", "fast / best peer", "fast-compile / best peer"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for steps in sorted(by_steps):
                row = by_steps[steps]
                cells = [str(steps)] + [f"{row[i]:.1f}" if i in row else "-" for i in impls]
                fast = row.get("fast-fp32")
                cells.append(f"{row['reference'] / fast:.2f}x" if fast and "reference" in row else "-")
                if "compile-fp32" in impls:
                    cells.append(f"{row['compile-fp32'] / fast:.2f}x" if fast and "compile-fp32" in row else "-")
                if peers:  # fp32 against fp32: the fastest peer mode of the row
                    timed = {i: row[i] for i in peers if i in row and i.endswith("-fp32")}
                    best = min(timed, key=timed.get) if timed else None
                    fc = row.get("fast-compile-fp32")
                    cells += [best[len("peer-"):].rsplit("-", 1)[0] if best else "-", f"{timed[best] / fast:.2f}x" if best and fast else "-",
                              f"{timed[best] / fc:.2f}x" if best and fc else "-"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def skipped_markdown(paths) -> str:
    """The rows a run skipped for its compile budget (benchmarks/conftest.py), with why."""
    lines = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for row in data.get("skipped", []):
            lines.append(f"- not run: {row['name']} ({row['reason']}; {path})")
    return "\n".join(lines)


def plot(files, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(label, key, by) for label, _gpu, bm in files for key, by in sorted(sampling_rows(bm).items())]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (label, (model, batch), by_steps) in zip(axes[0], groups):
        impls = sorted({i for row in by_steps.values() for i in row}, key=lambda i: IMPL_ORDER.index(i) if i in IMPL_ORDER else 99)
        for impl in impls:
            pts = sorted((s, row[impl]) for s, row in by_steps.items() if impl in row)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("steps S")
        ax.set_ylabel("ms per sampling run (median)")
        ax.set_title(f"{model}, batch {batch}\n{label.split(';')[0]}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    p.add_argument("--md", help="write the markdown table here (default: print it)")
    p.add_argument("--png", help="write the plot here (needs matplotlib)")
    p.add_argument("--best-of", action="store_true", help="each benchmark's lowest median over the files (repeated runs of one commit)")
    p.add_argument("--write-json", help="also write the merged benchmarks, without raw data, to this file")
    args = p.parse_args(argv)
    files = load(args.files, args.best_of)
    if args.write_json:
        write_json(args.files, args.write_json, args.best_of)
    text = markdown(files)
    skipped = skipped_markdown(args.files)
    if skipped:
        text += "\n" + skipped + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if args.png:
        try:
            plot(files, args.png)
        except ImportError:
            print("report.py: matplotlib is not installed; no plot (pip install matplotlib)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
