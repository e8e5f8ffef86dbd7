"""benchmarks/solver_quality.py's measurement on a tiny setting: the JSON has its keys and
finite, positive numbers (what the numbers are is the benchmark's business, not a test's)."""

import json
import math

import pytest

from benchmarks import solver_quality
from ddim_fast.apps.pretrained import load_pretrained, load_schedule

STEPS = (2, 3)  # two short rows per solver; DDIM-3 is the bar the smallest-S search uses
REFERENCE_STEPS = 20
NUM_SAMPLES = 4


@pytest.fixture(scope="module")
def result():
    model, schedule = load_pretrained("digits"), load_schedule("digits")
    out = solver_quality.measure(model, schedule, num_samples=NUM_SAMPLES, steps=STEPS, reference_steps=REFERENCE_STEPS, kid_steps=(), log=lambda line: None)
    return json.loads(json.dumps(out, allow_nan=False))  # what the script writes, read back


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_meta_says_where_the_numbers_come_from(result):
    meta = result["meta"]
    for key in ("device", "machine", "cpu", "dtype", "batch", "commit", "torch", "date"):
        assert key in meta, key
    assert meta["device"] == "cpu"
    assert meta["dtype"] == "float32"
    assert meta["batch"] == NUM_SAMPLES
    assert result["grid"]["skip"] == solver_quality.SKIP


def test_every_distance_row_is_there_with_positive_numbers(result):
    distance = result["distance"]
    rows = {(r["solver"], r["steps"]): r for r in distance["rows"]}
    assert set(rows) == {(solver, s) for solver in solver_quality.SOLVERS for s in STEPS}
    for row in rows.values():
        for key in ("rms", "seconds", "ms_per_sample"):
            assert _positive_finite(row[key]), (row, key)
    reference = distance["reference"]
    assert reference["steps"] == REFERENCE_STEPS
    assert _positive_finite(reference["ms_per_sample"])


def test_smallest_steps_reaching_ddims_bar(result):
    reaching = result["distance"]["smallest_steps_reaching_ddim"]
    assert reaching["bar"]["steps"] == max(STEPS)
    assert _positive_finite(reaching["bar"]["rms"])
    assert reaching["ddim"] in STEPS  # DDIM reaches its own bar at the latest
    assert reaching["dpmpp_2m"] is None or reaching["dpmpp_2m"] in STEPS


def test_no_kid_and_no_check_when_not_asked(result):
    assert result["kid"]["rows"] == [] and result["kid"]["paired"] == []
    assert result["checks"] == []  # the S = 10 halving check needs S = 10 among the steps
    assert _positive_finite(result["seconds_total"])
