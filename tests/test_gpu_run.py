"""benchmarks/gpu_run.sh fits its device call: checked by its dry run (GPU_RUN_DRY=1), which
prints every stage's limit and command and runs nothing, with a clock on which each stage
takes its whole limit (the worst case)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")


def _dry_run(tmp_path, stages=None, seconds=None):
    env = dict(os.environ, GPU_RUN_DRY="1", PYTHON=sys.executable)
    if seconds is not None:
        env["GPU_RUN_SECONDS"] = str(seconds)
    args = ["bash", SCRIPT, str(tmp_path)] + ([stages] if stages else [])
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    limits = {name: int(secs) for name, secs in re.findall(r"^=== (\S+) \(limit (\d+)s\)", res.stdout, re.M)}
    commands = dict(re.findall(r"^=== (\S+) \(limit \d+s\): (.*)$", res.stdout, re.M))
    planned = int(re.search(r"^planned (\d+)s of (\d+)s", res.stdout, re.M).group(1))
    status = (tmp_path / "status.txt").read_text()
    return limits, commands, planned, status


def test_the_default_stages_fit_the_deadline(tmp_path):
    limits, commands, planned, status = _dry_run(tmp_path)
    assert list(limits) == ["build", "wheels", "native", "tests", "kernels", "profile-fp32", "profile-bf16", "step", "sampling", "guided"]
    assert planned == sum(limits.values()) <= 570 - 20  # the deadline, less the report's 20 s
    assert "skipped" not in status
    assert not any(name.startswith("compile") for name in limits)  # only when named


def test_the_tier_has_its_own_limits_and_no_max_autotune(tmp_path):
    limits, commands, _, _ = _dry_run(tmp_path)
    tier = commands["tests"]
    assert "-m gpu and not autotune" in tier
    per_test = int(re.search(r"--timeout (\d+)", tier).group(1))
    assert per_test < limits["tests"]


def test_the_compile_stage_budgets_the_max_autotune_test(tmp_path):
    limits, commands, planned, status = _dry_run(tmp_path, "build tests compile")
    assert "-m autotune" in commands["compile-tests"]
    assert planned <= 570 - 20 and "skipped" not in status
    alone, _, planned_alone, _ = _dry_run(tmp_path, "build compile")
    assert alone["compile-tests"] >= 200  # max-autotune compiled for over 200 s on the H100
    assert planned_alone <= 570 - 20


def test_a_short_deadline_skips_the_later_stages_and_says_so(tmp_path):
    limits, _, _, status = _dry_run(tmp_path, seconds=300)
    assert sum(limits.values()) <= 300 - 20
    assert re.search(r"^sampling skipped: -?\d+s left before the deadline", status, re.M), status
    assert "build" in limits and "tests" in limits


def test_the_tier_selection_leaves_the_max_autotune_case_out():
    args = [sys.executable, "-m", "pytest", "tests/test_compile.py", "--collect-only", "-q", "-p", "no:cacheprovider"]
    tier = subprocess.run(args + ["-m", "gpu and not autotune"], capture_output=True, text=True, cwd=ROOT, timeout=300).stdout
    autotune = subprocess.run(args + ["-m", "autotune"], capture_output=True, text=True, cwd=ROOT, timeout=300).stdout
    assert "[max-autotune]" not in tier and "test_compiled_model_inside_our_cuda_graph_matches_eager[True]" in tier
    assert "test_compiled_model_inside_our_cuda_graph_matches_eager[max-autotune]" in autotune


def test_the_sd15_stages_time_pipe_compile_and_ours_in_one_call(tmp_path):
    """pipe(...), accelerate(pipe) and the reduce-overhead peer in one pytest, then the
    max-autotune peer in its own: a compile that outlasts the call loses only its own file."""
    limits, commands, planned, status = _dry_run(tmp_path, "build sd15")
    assert planned <= 570 - 20 and "skipped" not in status
    first, autotune = commands["sd15"], commands["sd15-autotune"]
    for command in (first, autotune):
        assert "benchmarks/test_pipelines.py" in command and "--ddim-full" in command and "--ddim-steps 50" in command
    assert "-k sd15 and not accelerate-compile and not max-autotune" in first and "sd15.json" in first
    assert "-k sd15 and max-autotune" in autotune and "sd15-autotune.json" in autotune
    assert list(limits).index("sd15") < list(limits).index("sd15-autotune") and limits["sd15-autotune"] <= 300


def test_the_dpm_karras_stage_times_pipe_and_ours_at_s20(tmp_path):
    """DPM++ 2M Karras, the scheduler most SD users run, on the SD-1.5-sized pipeline in fp16."""
    limits, commands, planned, status = _dry_run(tmp_path, "build sd15-dpm lora lora-memory")
    assert planned <= 570 - 20 and "skipped" not in status
    command = commands["sd15-dpm"]
    assert "benchmarks/test_pipelines.py" in command and "--ddim-scheduler dpmpp_2m_karras" in command and "--ddim-steps 20" in command
    assert "-k sd15 and not compile" in command and "sd15-dpm.json" in command
    assert "benchmarks/lora_switch.py --device cuda" in commands["lora"]
    assert "benchmarks/refresh_memory.py --unet sd15 --dtype fp16 --device cuda" in commands["lora-memory"]
