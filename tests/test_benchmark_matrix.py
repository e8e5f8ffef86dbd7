"""What `pytest benchmarks/ --benchmark-only` runs: by default the reference and ours at every
S the package promises and, of the torch.compile rows, only the S-sweep's likeliest best peer
(a run meant to fit 8 minutes on the 2-core CPU VM: on a CPU S = 1000 at the smallest batch
only, and bf16 step rows only with AVX-512); --ddim-full adds every other row. Its row count
is recorded here, so that it does not shrink silently."""

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


# The default run's rows on a CPU (--ddim-model digits --ddim-batch 1,16, as the README's
# run): a change of the matrix must change this number, and README's row count and time with it.
DEFAULT_CPU_ROWS = 145
FAST_BF16_CPU_ROWS = 8  # test_step's bf16 rows, which the default run keeps on AVX-512 CPUs only
EVERY_S = {10, 20, 50, 100, 1000}


def _param(name: str, prefix: str):
    """The S of a row named ...-S<steps>-... or ...-b<batch>-..."""
    for part in name[name.index("[") + 1 : -1].split("-"):
        if part.startswith(prefix) and part[len(prefix) :].isdigit():
            return int(part[len(prefix) :])
    return None


@pytest.mark.slow
def test_the_default_run_times_reference_and_fast_at_every_S_and_one_peer():
    default = _collected()
    full = _collected("--ddim-full")
    cuda = torch.cuda.is_available()
    peer = DEFAULT_PEER["cuda" if cuda else "cpu"]
    for steps in sorted(EVERY_S):
        # on a CPU S = 1000 runs at the smallest batch only (two calls of 10-40 s each at batch
        # 16), and so does the peer (a compile of about a minute for each batch)
        for batch in (1, 16) if steps < 1000 or cuda else (1,):
            for impl in ("reference", "fast-fp32", f"{peer}-fp32"):
                name = f"test_sample[digits-b{batch}-S{steps}-{impl}]"
                assert (name in default) == (cuda or batch == 1 or impl != f"{peer}-fp32"), name
    compiled = [name for name in default if _compiled(name)]
    assert compiled and all(name.startswith("test_sample[") and f"-{peer}-" in name for name in compiled), compiled
    assert set(default) < set(full)
    left_out = set(full) - set(default)
    for kind in ("fast-compile", "lean-compile", "max-autotune-no-cudagraphs", "test_guided_sample[", "test_pipeline_call["):
        assert any(kind in name for name in left_out), kind
    if cuda:
        assert all(_compiled(name) for name in left_out), sorted(left_out)
        return
    assert all(f"test_sample[digits-b16-S{steps}-{peer}-fp32]" in left_out for steps in EVERY_S)
    uncompiled = sorted(name for name in left_out if not _compiled(name))
    assert all("-S1000-" in name or (name.startswith("test_step[") and "-bf16-" in name) for name in uncompiled), uncompiled
    assert "test_sample[digits-b16-S1000-reference]" in full and "test_step[lean-bf16-digits-b1]" in full


@pytest.mark.slow
def test_the_default_run_does_not_shrink_silently():
    """Its row count is recorded here (and in README), and each S-sweep keeps every S."""
    if torch.cuda.is_available():
        pytest.skip("the recorded row count is the CPU run's")
    from benchmarks.conftest import _fast_cpu_bf16

    default = _collected()
    expected = DEFAULT_CPU_ROWS + (FAST_BF16_CPU_ROWS if _fast_cpu_bf16() else 0)
    assert len(default) == expected, f"the default benchmark run has {len(default)} rows, {expected} recorded: update DEFAULT_CPU_ROWS and README"
    for suite in ("test_sample[", "test_guided_sample[", "test_pipeline_call["):
        steps = {_param(name, "S") for name in default if name.startswith(suite)}
        assert steps == EVERY_S, f"{suite}: the default run times S = {sorted(s for s in steps if s)}, not every S of {sorted(EVERY_S)}"
        for impl in ("reference", "fast-fp32") if suite != "test_pipeline_call[" else ("pipe-", "accelerate-"):
            with_impl = {_param(name, "S") for name in default if name.startswith(suite) and f"-{impl}" in name}
            assert with_impl == EVERY_S, f"{suite} {impl}: S = {sorted(s for s in with_impl if s)}"
