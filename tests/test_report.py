"""benchmarks/report.py on synthetic pytest-benchmark files."""

import json

from benchmarks import report


def _bench(impl, dtype, steps, batch, median_s):
    return {"stats": {"median": median_s}, "extra_info": {"impl": impl, "dtype": dtype, "steps": steps, "batch": batch, "model": "digits", "device": "cpu"}}


def test_table_has_medians_and_ratios(tmp_path):
    mi = {"cpu_model": "Test CPU", "cpu_count": 2, "torch": "2.13.0", "commit": "abc123"}
    a = {"machine_info": mi, "benchmarks": [_bench("reference", "fp32", 10, 1, 0.2), _bench("fast", "fp32", 10, 1, 0.1), _bench("reference", "fp32", 50, 1, 1.0), _bench("fast", "fp32", 50, 1, 0.25)]}
    b = {"machine_info": mi, "benchmarks": [_bench("compile", "fp32", 10, 1, 0.15)]}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    md = report.markdown(report.load([str(pa), str(pb)]))
    assert "digits UNet, batch 1" in md and "Test CPU (2 cores)" in md and "abc123" in md
    assert "| 10 | 200.0 | 150.0 | 100.0 | 2.00x | 1.50x |" in md
    assert "| 50 | 1000.0 | - | 250.0 | 4.00x | - |" in md
    out = tmp_path / "t.md"
    assert report.main([str(pa), "--md", str(out)]) == 0
    assert "2.00x" in out.read_text()
