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


def test_step_and_kernel_tables(tmp_path):
    step = lambda impl, dtype, ms, n: {"group": "step-digits-b1", "stats": {"median": ms * 10 / 1e3},  # noqa: E731
                                        "extra_info": {"kind": "step", "impl": impl, "dtype": dtype, "steps": 10, "batch": 1, "model": "digits", "ms_per_step": ms, "ops_per_step": n}}
    kern = lambda impl, us, gbps: {"group": "add_group_norm_silu-b1-c256-16x16-bfloat16-cl", "stats": {"median": us / 1e6},  # noqa: E731
                                   "extra_info": {"impl": impl, "gbps": gbps}}
    data = {"machine_info": {"cpu_model": "Test CPU", "cpu_count": 2}, "benchmarks": [step("reference", "fp32", 4.0, 300), step("lean", "bf16", 1.0, 150), kern("copy", 5.0, 40.0), kern("fused", 12.0, 30.0)]}
    p = tmp_path / "s.json"
    p.write_text(json.dumps(data))
    md = report.markdown(report.load([str(p)]))
    assert "| lean-bf16 | 1.00 | 150 | 4.00x |" in md and "| reference-fp32 | 4.00 | 300 | 1.00x |" in md
    assert "| add_group_norm_silu-b1-c256-16x16-bfloat16-cl | fused | 12.0 | 30.0 | 0.75 |" in md
    assert "S | reference" not in md  # step benchmarks stay out of the S-sweep table


def test_best_of_keeps_each_benchmarks_lowest_median(tmp_path):
    mi = {"cpu_model": "Test CPU", "cpu_count": 2, "commit": "abc123"}

    def run(ref_s, fast_s):
        bs = [_bench("reference", "fp32", 10, 1, ref_s), _bench("fast", "fp32", 10, 1, fast_s)]
        for b, name in zip(bs, ("test_sample[ref]", "test_sample[fast]")):
            b["fullname"] = name
            b["stats"]["data"] = [b["stats"]["median"]] * 3
        return {"machine_info": mi, "benchmarks": bs}

    paths = []
    for i, (r, f) in enumerate([(0.30, 0.10), (0.20, 0.15)]):  # the reference's quiet run is the second, fast's the first
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(run(r, f)))
    paths = [str(p) for p in paths]
    assert "| 10 | 200.0 | 150.0 | 1.33x |" in report.markdown(report.load(paths))  # last file wins
    assert "| 10 | 200.0 | 100.0 | 2.00x |" in report.markdown(report.load(paths, best_of=True))
    out = tmp_path / "merged.json"
    assert report.main(paths + ["--best-of", "--write-json", str(out), "--md", str(tmp_path / "m.md")]) == 0
    merged = json.loads(out.read_text())
    assert sorted(b["stats"]["median"] for b in merged["benchmarks"]) == [0.10, 0.20]
    assert all("data" not in b["stats"] for b in merged["benchmarks"])
    assert merged["merged_from"] == {"files": 2, "rule": "lowest median of the files"}


def test_peer_columns_compare_with_the_fastest_peer_of_the_same_dtype(tmp_path):
    mi = {"cpu_model": "Test CPU", "cpu_count": 2, "commit": "abc123"}
    sweep = [_bench("reference", "fp32", 10, 1, 0.4), _bench("fast", "fp32", 10, 1, 0.1), _bench("fast-compile", "fp32", 10, 1, 0.08),
             _bench("peer-default", "fp32", 10, 1, 0.2), _bench("peer-max-autotune-no-cudagraphs", "fp32", 10, 1, 0.3)]
    step = lambda impl, dtype, ms, first: {"group": "step-digits-b1", "stats": {"median": ms * 10 / 1e3},  # noqa: E731
                                           "extra_info": {"kind": "step", "impl": impl, "dtype": dtype, "steps": 10, "batch": 1, "model": "digits", "ms_per_step": ms, "first_call_s": first}}
    steps = [step("lean", "fp32", 2.0, 0.1), step("lean", "bf16", 1.0, 0.1), step("peer-default", "fp32", 3.0, 40.0), step("peer-default", "bf16", 4.0, 50.0),
             step("peer-max-autotune-no-cudagraphs", "bf16", 2.5, 60.0)]
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"machine_info": mi, "benchmarks": sweep + steps}))
    md = report.markdown(report.load([str(p)]))
    assert "| 10 | 400.0 | 100.0 | 80.0 | 200.0 | 300.0 | 4.00x | default | 2.00x | 2.50x |" in md
    assert "| lean-fp32 | 2.00 | - | - | 1.50x | 0.1 |" in md  # against peer-default-fp32 (3.0)
    assert "| lean-bf16 | 1.00 | - | - | 2.50x | 0.1 |" in md  # against peer-max-autotune-...-bf16 (2.5), not an fp32 peer
    assert "| peer-default-bf16 | 4.00 | - | - | 0.62x | 50.0 |" in md


def test_rows_skipped_for_the_compile_budget_are_listed_with_why(tmp_path):
    import pytest

    from benchmarks.conftest import CompileBudget

    budget = CompileBudget(60.0)
    budget.admit("a")
    budget.spent(25.0)
    budget.admit("b")  # 25 + 25 <= 60
    budget.spent(30.0)
    with pytest.raises(pytest.skip.Exception, match="55 s of the 60 s"):
        budget.admit("c")  # 55 + 30 > 60
    assert [row["name"] for row in budget.skipped] == ["c"]
    CompileBudget(None).admit("no limit")

    data = {"machine_info": {"cpu_model": "Test CPU", "cpu_count": 2}, "benchmarks": [], "skipped": budget.skipped}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    out = tmp_path / "r.md"
    assert report.main([str(p), "--md", str(out)]) == 0
    assert "- not run: c (compile budget: 55 s of the 60 s of --ddim-compile-budget spent" in out.read_text()


def test_gpu_rows_with_their_flops_show_tflops_and_the_fraction_of_peak(tmp_path):
    def row(impl, dtype, device, median_s, steps=10, group="sample-sd15-S10-b1"):
        info = {"impl": impl, "dtype": dtype, "steps": steps, "batch": 1, "model": "sd15", "device": device, "flops_per_step": 1.5e12}
        return {"group": group, "stats": {"median": median_s}, "extra_info": info}

    mi = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "commit": "abc123"}
    gpu = {"machine_info": mi, "benchmarks": [row("fast", "bf16", "cuda", 0.030), row("reference", "fp32", "cuda", 0.300)]}
    cpu_row = row("fast", "fp32", "cpu", 3.0)
    other = {"machine_info": {"gpu": "NVIDIA A100-SXM4-80GB", "commit": "abc123"}, "benchmarks": [row("fast", "bf16", "cuda", 0.060), cpu_row]}
    paths = []
    for name, data in (("h200.json", gpu), ("a100.json", other)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(data))
    md = report.markdown(report.load(paths))
    # 1.5 TFLOP per step in 3 ms: 500 TFLOP/s, 0.505 of the H200's dense bf16 989.4
    assert "| sample-sd15-S10-b1 | fast-bf16 | 10 | 3.000 | 1500.00 | 500.00 | 989.4 | 0.505 |" in md
    assert "| sample-sd15-S10-b1 | reference-fp32 | 10 | 30.000 | 1500.00 | 50.00 | 67.0 | 0.746 |" in md
    # a GPU without a known peak: TFLOP/s, no fraction; a CPU row: no line at all
    assert "| sample-sd15-S10-b1 | fast-bf16 | 10 | 6.000 | 1500.00 | 250.00 | - | - |" in md
    assert md.count("| sample-sd15-S10-b1 |") == 3


def test_flops_per_step_is_the_models_call_doubled_when_guided():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks._models import flops_per_step
    from ddim_fast import UNet
    from ddim_fast.apps.quality.train import DIGITS_COND_MODEL_CONFIG

    torch.manual_seed(0)
    model = UNet(**DIGITS_COND_MODEL_CONFIG).eval()
    x = torch.randn(3, 1, 16, 16)
    labels = torch.tensor([1, 2, 3])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.full((3,), 500), class_labels=labels)
    one_call = counter.get_total_flops()
    assert flops_per_step(model, x, model_kwargs={"class_labels": labels}) == one_call
    guided = flops_per_step(model, x, model_kwargs={"class_labels": labels}, guidance_scale=2.0, uncond_kwargs={"class_labels": torch.full_like(labels, 10)})
    assert guided == 2 * one_call
