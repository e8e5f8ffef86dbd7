"""Peak memory of merging a finished run's shards into samples.npz (`ddim-fast sample --out-dir`).

    python benchmarks/merge_memory.py --shards 2000 --per-shard 4 --size 256 --json out.json

Writes --shards fake shards of --per-shard random RGB images (--size squared) into a temporary
folder, then, in a fresh process, runs the merge of a rerun whose shards all exist and reports
that process's peak resident memory (ru_maxrss) above its resident memory just before the merge
(the interpreter, numpy and torch are in both). Runs against whichever ddim_fast is importable, so
the same script measured the merge before the run folder (PYTHONPATH=<an older checkout>):
there, generate() read every shard, concatenated them and wrote the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _fake_images(rng, count: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def write_shards(folder: str, shards: int, per_shard: int, size: int) -> None:
    from ddim_fast.apps.runs import distributed

    rng = np.random.default_rng(0)
    num_samples = shards * per_shard
    if hasattr(distributed, "RunFolder"):
        from ddim_fast.apps.runs.run_folder import RunFolder, batches

        run = RunFolder(folder, {"what": "merge benchmark"}, num_samples=num_samples, batch_size=per_shard, image_shape=(3, size, size)).open()
        for _, start, count in batches(num_samples, per_shard):
            run.write_shard(start, count, _fake_images(rng, count, size))
        run.close()
    else:  # the shard layout before the run folder: D/shards/<start>-<count>.npz, arr_0 only
        os.makedirs(os.path.join(folder, "shards"), exist_ok=True)
        for _, start, count in distributed.batches(num_samples, per_shard):
            np.savez_compressed(distributed.shard_path(folder, start, count), arr_0=_fake_images(rng, count, size))


def merge(folder: str, shards: int, per_shard: int, size: int) -> dict:
    from ddim_fast.apps.runs import distributed

    num_samples = shards * per_shard
    world = distributed.World(0, 1, 0, False)
    if hasattr(distributed, "RunFolder"):
        from ddim_fast.apps.runs.run_folder import RunFolder

        run = RunFolder(folder, {"what": "merge benchmark"}, num_samples=num_samples, batch_size=per_shard, image_shape=(3, size, size)).open()
        before = _resident_kib()
        start = time.perf_counter()
        distributed.generate(_never, run, world)
        run.close()
    else:
        before = _resident_kib()
        start = time.perf_counter()
        distributed.generate(_never, num_samples, per_shard, folder, world)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(peak_above_start_mib=(peak - before) / 1024, resident_at_start_mib=before / 1024, peak_rss_mib=peak / 1024, seconds=seconds)


def _resident_kib() -> int:
    """This process's resident memory now (ru_maxrss is the peak so far, the imports' included)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _never(*_args):
    raise AssertionError("every shard exists: nothing is sampled")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=2000)
    p.add_argument("--per-shard", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--merge-only", default=None, help=argparse.SUPPRESS)  # the fresh process
    args = p.parse_args()
    if args.merge_only:
        print(json.dumps(merge(args.merge_only, args.shards, args.per_shard, args.size)))
        return
    folder = tempfile.mkdtemp(prefix="merge-memory-")
    try:
        write_shards(folder, args.shards, args.per_shard, args.size)
        run = subprocess.run([sys.executable, __file__, "--shards", str(args.shards), "--per-shard", str(args.per_shard), "--size", str(args.size), "--merge-only", folder], capture_output=True, text=True, check=True)
        import ddim_fast

        data_mib = args.shards * args.per_shard * 3 * args.size**2 / 2**20
        result = dict(json.loads(run.stdout.strip().splitlines()[-1]), data_mib=data_mib, shards=args.shards, per_shard=args.per_shard, size=args.size, ddim_fast=os.path.dirname(ddim_fast.__file__), machine=platform.processor() or platform.machine(), python=platform.python_version(), numpy=np.__version__)
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
