"""Benchmark options and the machine information recorded with every result.

    pytest benchmarks/ --benchmark-only [--ddim-model digits|small|cifar10] [--ddim-batch 1,16]
                                        [--ddim-steps 10,20,50,100,1000] [--ddim-compile-budget SECONDS]
                                        [--ddim-full]

Defaults fit the machine: on a CPU the embedded digits UNet at batch 1 and 16; on a GPU
the CIFAR-10 UNet at batch 1 and 64. The default run times the reference and ours at every
S and, of the torch.compile rows, the S-sweep's likeliest best peer (DEFAULT_PEER); on a CPU
S = 1000 and the peer at the smallest batch only, test_step's bf16 rows only with AVX-512, and rows of
seconds 3 rounds (_full_matrix_only, DEFAULT_MIN_ROUNDS). It is meant to finish within 8
minutes on the 2-core CPU VM (tests/test_benchmark_matrix.py records its row count), and
prints the time each file took at the end. --ddim-full adds every other row
(FastSampler(compile=True), the lean and accelerate compile rows, the other peer modes, the
per-step, guided and pipeline peers, S = 1000 and the peer at every batch, bf16 steps on any CPU): the
full matrix, half an hour or more there.
"""

import ctypes
import os
import platform
import time

import pytest
import torch

from ddim_fast.apps.census.machine import cpu_name, git_commit

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_addoption(parser):
    g = parser.getgroup("ddim-fast benchmarks")
    g.addoption("--ddim-model", default=None, help="digits (embedded), small, cifar10, celeba, lsun (default: digits on CPU, cifar10 on GPU)")
    g.addoption("--ddim-batch", default=None, help="comma-separated batch sizes (default: 1,16 on CPU, 1,64 on GPU)")
    g.addoption("--ddim-steps", default="10,20,50,100,1000", help="comma-separated S values")
    g.addoption(
        "--ddim-compile-budget",
        type=float,
        default=None,
        help="seconds the torch.compile rows may spend compiling (first calls) in this run; a row that would not fit is skipped, with why (default: no limit)",
    )
    g.addoption(
        "--ddim-scheduler",
        default="ddim",
        help="the scheduler of the pipeline rows (test_pipelines.py), made from the pipeline's own config: ddim (default), dpmpp_2m, dpmpp_2m_karras, euler, euler_a, lcm",
    )
    g.addoption(
        "--ddim-full",
        action="store_true",
        help="the full matrix: every torch.compile row of every suite (default: of those, only the S-sweep's likeliest best peer)",
    )


# The compiled row the default run keeps, in test_sampling.py: the peer a user would pick,
# the fastest of the H100 run at c872cfc on a GPU and Inductor's default on a CPU
DEFAULT_PEER = {"cuda": "peer-reduce-overhead", "cpu": "peer-default"}


# The default run on a CPU: every S at the smallest batch, S < 1000 at the larger ones (an
# S = 1000 row at batch 16 is two calls of 10-40 s each on 2 cores); the peer at the
# smallest batch only (each batch is a compile of about a minute there); bf16 rows only where
# the CPU computes bf16 at speed (AVX-512: on an AVX2 machine oneDNN's bf16 convolutions
# ran 16x fp32, 8 of the 23 minutes of the default run). Rows with a call of seconds are
# timed 3 rounds instead of pytest-benchmark's 5 (median of 3) unless --benchmark-min-rounds
# is given. --ddim-full keeps them all, with the CLI's rounds.
FULL_MATRIX_S = 1000
SLOW_ROW_FILES = ("test_sampling.py", "test_guided.py", "test_step.py")
DEFAULT_MIN_ROUNDS = 3


def _fast_cpu_bf16() -> bool:
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _full_matrix_only(item, default_peer: str, smallest_batch: dict) -> str | None:
    """Why the default run leaves this row to --ddim-full, or None when it runs it."""
    if os.path.dirname(str(item.path)) != HERE:
        return None
    params = getattr(getattr(item, "callspec", None), "params", {})
    impl = params.get("impl")
    if isinstance(impl, str) and ("compile" in impl or impl.startswith("peer-")):
        if not (item.path.name == "test_sampling.py" and impl == default_peer):
            return "a torch.compile row other than test_sampling's default peer"
    if torch.cuda.is_available():
        return None
    above_smallest_batch = params.get("batch", 0) > smallest_batch.get(item.path.name, 0)
    if params.get("steps") == FULL_MATRIX_S and above_smallest_batch:
        return f"S = {FULL_MATRIX_S} above the smallest batch"
    if impl == default_peer and above_smallest_batch:
        return "the peer above the smallest batch (a compile of a minute on a CPU)"
    if params.get("dtype") in ("bf16", torch.bfloat16) and item.path.name == "test_step.py" and not _fast_cpu_bf16():
        return "bf16 on a CPU without AVX-512"
    return None


def _smallest_batches(items) -> dict:
    """{file name: the smallest batch of its rows}."""
    smallest = {}
    for item in items:
        batch = getattr(getattr(item, "callspec", None), "params", {}).get("batch")
        if isinstance(batch, int):
            smallest[item.path.name] = min(batch, smallest.get(item.path.name, batch))
    return smallest


def pytest_collection_modifyitems(config, items):
    if config.getoption("--ddim-full"):
        return
    default_peer = DEFAULT_PEER["cuda" if torch.cuda.is_available() else "cpu"]
    smallest_batch = _smallest_batches(items)
    left_out = [item for item in items if _full_matrix_only(item, default_peer, smallest_batch)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        dropped = set(map(id, left_out))
        items[:] = [item for item in items if id(item) not in dropped]
    if config.getoption("benchmark_min_rounds", default=None) == 5:  # pytest-benchmark's default: not asked for
        for item in items:
            if item.path.name in SLOW_ROW_FILES and os.path.dirname(str(item.path)) == HERE:
                item.add_marker(pytest.mark.benchmark(min_rounds=DEFAULT_MIN_ROUNDS))


def pytest_report_header(config):
    if config.getoption("--ddim-full", default=False):
        return "ddim-fast benchmarks: the full matrix (--ddim-full)"
    return (
        "ddim-fast benchmarks: the default matrix (of the torch.compile rows only test_sampling's default peer; on a CPU "
        f"S = {FULL_MATRIX_S} at the smallest batch, bf16 step rows with AVX-512 only; --ddim-full: all of them)"
    )


def _ints(text):
    return [int(v) for v in str(text).split(",") if v.strip()]


@pytest.fixture(scope="session")
def bench_config(request):
    cuda = torch.cuda.is_available()
    opt = request.config.getoption
    return {
        "device": "cuda" if cuda else "cpu",
        "model": opt("--ddim-model") or ("cifar10" if cuda else "digits"),
        "batches": _ints(opt("--ddim-batch") or ("1,64" if cuda else "1,16")),
        "steps": _ints(opt("--ddim-steps")),
        "full_matrix": bool(opt("--ddim-full")),
    }


def _steady_allocator() -> str:
    """Pin glibc malloc's thresholds for the run, so that a timing does not depend on the
    allocator's history. By default glibc serves a large allocation with a fresh mmap (page
    faults on first touch) until some earlier free raises its dynamic threshold: on the
    2-core VM the eager DDIM step at 64x3x32x32 measured 1.4 ms in one run and 0.18 ms in
    the next, and aten GroupNorm+SiLU at 16x128x32x32 0.77 ms or 4.9 ms. With blocks up to
    32 MB (glibc's maximum) served from a heap that is never trimmed, every implementation
    reuses warm memory, as it would in a long sampling job. DDIM_FAST_BENCH_MALLOC=default
    keeps glibc's behaviour."""
    if os.environ.get("DDIM_FAST_BENCH_MALLOC", "") == "default":
        return "glibc default (DDIM_FAST_BENCH_MALLOC=default)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return "default (not glibc)"
    return "glibc: mmap threshold 32 MB, no trim" if ok else "glibc default (mallopt refused)"


class CompileBudget:
    """The compile time a time-limited run (one GPU call) allows its torch.compile rows.

    A compiled row asks `admit(name)` before its first call: it is skipped, with the reason,
    once the seconds spent plus the longest first call so far would pass the budget; after
    the first call it reports `spent(seconds)`. The skipped rows go into the benchmark JSON
    ("skipped"), and report.py lists them under the tables."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.used = 0.0
        self.longest = 0.0
        self.skipped = []

    def admit(self, name: str) -> None:
        if self.seconds is None or self.used + self.longest <= self.seconds:
            return
        reason = (
            f"compile budget: {self.used:.0f} s of the {self.seconds:.0f} s of --ddim-compile-budget spent, "
            f"and the longest first call so far took {self.longest:.0f} s"
        )
        self.skipped.append({"name": name, "reason": reason})
        pytest.skip(reason)

    def admit_compiled(self, benchmark, name: str, *, checked_by: str = "") -> None:
        """A torch.compile row: skipped without --benchmark-only (minutes of compiling for no
        number; checked_by names the test that checks the compiled path instead), else admit(name)."""
        if benchmark.disabled:
            pytest.skip("torch.compile rows are timed with --benchmark-only" + (f" ({checked_by} checks compile=True)" if checked_by else ""))
        self.admit(name)

    def spent(self, seconds: float) -> None:
        self.used += seconds
        self.longest = max(self.longest, seconds)

    def first_call(self, benchmark, warm_up, compiled: bool) -> None:
        """Run warm_up() off the clock (the compile, the graph capture, oneDNN's set-up), record
        its wall time as extra_info["first_call_s"] and, for a compiled row, charge it here."""
        start = time.perf_counter()
        warm_up()
        benchmark.extra_info["first_call_s"] = time.perf_counter() - start
        if compiled:
            self.spent(benchmark.extra_info["first_call_s"])


@pytest.fixture(scope="session")
def compile_budget(request):
    return request.config._ddim_compile_budget


class FileTimes:
    """Wall time per benchmark file (set-up, call and tear-down of each row, compiles and
    warm-ups included), printed at the end of a timed run so that a user sees where it went."""

    def __init__(self):
        self.seconds = {}
        self.rows = {}

    def add(self, report) -> None:
        path = report.nodeid.split("::", 1)[0]
        if not path.startswith("benchmarks/"):
            return
        self.seconds[path] = self.seconds.get(path, 0.0) + report.duration
        if report.when == "call":
            self.rows[path] = self.rows.get(path, 0) + 1

    def lines(self) -> list:
        out = [f"{_minutes(s):>9}  {self.rows.get(p, 0):4d} rows  {p}" for p, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])]
        out.append(f"{_minutes(sum(self.seconds.values())):>9}  {sum(self.rows.values()):4d} rows  in all")
        return out


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:4.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


def pytest_runtest_logreport(report):
    _FILE_TIMES.add(report)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if config.getoption("benchmark_disable", default=False) or not _FILE_TIMES.seconds:
        return
    terminalreporter.section("ddim-fast benchmarks: time per file")
    for line in _FILE_TIMES.lines():
        terminalreporter.write_line(line)


_FILE_TIMES = FileTimes()


def pytest_configure(config):
    config._ddim_malloc = _steady_allocator()
    config._ddim_compile_budget = CompileBudget(config.getoption("--ddim-compile-budget", default=None))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    budget = getattr(config, "_ddim_compile_budget", None)
    if budget is not None and budget.skipped:
        output_json["skipped"] = budget.skipped


def pytest_benchmark_update_machine_info(config, machine_info):
    import ddim_fast

    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine_info["cpu_model"] = cpu_name()
    machine_info["cpu_count"] = os.cpu_count()
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["malloc"] = getattr(config, "_ddim_malloc", None)
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["ddim_fast"] = ddim_fast.__version__
    machine_info["ddim_fast_backends"] = {k: v["available"] for k, v in ddim_fast.backends().items()}
    machine_info["commit"] = git_commit(HERE) or "unknown"
    machine_info["platform"] = platform.platform()


