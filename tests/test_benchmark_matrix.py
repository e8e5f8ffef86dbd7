"""What `pytest benchmarks/ --benchmark-only` runs: by default the reference and ours at every
S the package promises and, of the torch.compile rows, only the S-sweep's likeliest best peer
(a run that fits 10 minutes on the 2-core CPU VM); --ddim-full adds every other compiled row."""

import subprocess
import sys

import pytest
import torch

from benchmarks.conftest import DEFAULT_PEER

from .test_gpu_run import ROOT

ARGS = ["benchmarks", "--benchmark-only", "--collect-only", "-q", "-p", "no:cacheprovider", "--ddim-model", "digits", "--ddim-batch", "1,16"]


def _collected(*extra) -> list:
    res = subprocess.run([sys.executable, "-m", "pytest", *ARGS, *extra], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return [line.split("::", 1)[1] for line in res.stdout.splitlines() if "::" in line]


def _compiled(name: str) -> bool:
    params = name[name.index("[") + 1 : -1] if "[" in name else ""
    return "compile" in params or "peer-" in params


@pytest.mark.slow
def test_the_default_run_times_reference_and_fast_at_every_S_and_one_peer():
    default = _collected()
    full = _collected("--ddim-full")
    peer = DEFAULT_PEER["cuda" if torch.cuda.is_available() else "cpu"]
    for steps in (10, 20, 50, 100, 1000):
        for batch in (1, 16):
            for impl in ("reference", "fast-fp32", f"{peer}-fp32"):
                assert f"test_sample[digits-b{batch}-S{steps}-{impl}]" in default
    compiled = [name for name in default if _compiled(name)]
    assert compiled and all(name.startswith("test_sample[") and f"-{peer}-" in name for name in compiled), compiled
    assert set(default) < set(full)
    left_out = set(full) - set(default)
    assert all(_compiled(name) for name in left_out), sorted(left_out)
    for kind in ("fast-compile", "lean-compile", "max-autotune-no-cudagraphs", "test_guided_sample[", "test_pipeline_call["):
        assert any(kind in name for name in left_out), kind
