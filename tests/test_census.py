"""The bytes-and-FLOPs census (apps/opcount.OpCensus, census_per_step) and the roofline model
(apps/census/roofline.py): counts equal ops_per_step's, FLOPs and bytes equal the hand formulas, a
fake-tensor census equals the real one, the model's arithmetic, the command, and a full-size
SD-1.5 UNet counted on fake tensors."""

import contextlib
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ddim_fast import FastSampler, Schedule, UNet
from ddim_fast.apps.census import opcount
from ddim_fast.apps.census.memory import StoragePeak
from ddim_fast.apps.census.models import cast_parameters, fake_case
from ddim_fast.apps.census.opcount import OpCensus, census_per_step, ops_per_step
from ddim_fast.apps.census.roofline import GPUS, format_roofline, gpu_numbers, roofline

SCHEDULE = Schedule.linear()
TINY_UNET = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=1, out_ch=1, resolution=8)
# diffusers' tiny SD-shaped UNet (tests/test_diffusers._unet2d_condition's config)
TINY_SD = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=16, attention_head_dim=8, norm_num_groups=32)
FIELDS = ("count", "bytes_read", "bytes_written", "flops")


def _fields(census: dict) -> dict:
    return {op: {f: row[f] for f in FIELDS} for op, row in census.items()}


def _one_call(fn, *args, **kwargs) -> dict:
    """{op: {count, bytes_read, bytes_written, flops}} of fn(*args, **kwargs), in inference mode
    as the samplers run (outside it, autograd splits aten::linear into addmm before a mode sees it)."""
    with torch.inference_mode(), OpCensus() as census:
        fn(*args, **kwargs)
    return _fields(census.totals())


def _tiny_sd_inputs(batch=1):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, 5, 16, generator=g)
    kwargs = dict(model_kwargs={"encoder_hidden_states": context}, guidance_scale=7.5, uncond_kwargs={"encoder_hidden_states": torch.zeros_like(context)})
    return x_T, kwargs


# --- the census counts what ops_per_step counts -----------------------------------------------


def _overload(name: str):
    """torch.ops.aten.to.dtype from "aten::to.dtype"."""
    namespace, rest = name.split("::")
    packet, _, overload = rest.partition(".")
    return getattr(getattr(getattr(torch.ops, namespace), packet), overload or "default")


def _assert_counts_are_ops_per_steps(census: dict, counts: dict) -> None:
    """The census's counts are ops_per_step's, and besides them only copies that OpCounter
    skips as views (an op whose schema lets it return a view: aten::to, contiguous)."""
    census_counts = {op: row["count"] for op, row in census.items() if row["count"] != 0}
    shared = {op: n for op, n in census_counts.items() if op in counts}
    assert shared == counts
    extra = set(census_counts) - set(counts)
    assert all(_overload(op).is_view for op in extra), extra
    assert all(census[op]["bytes_written"] > 0 for op in extra), extra


@pytest.mark.parametrize("lean", [True, False])
def test_census_counts_equal_ops_per_step_on_the_unet(lean):
    torch.manual_seed(0)
    model = UNet(**TINY_UNET).eval()
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def sampler_for_steps(s):
        return FastSampler(model, SCHEDULE, steps=s, eta=0.5, lean=lean)

    counts, _ = ops_per_step(sampler_for_steps, x_T)
    census = census_per_step(sampler_for_steps, x_T)
    _assert_counts_are_ops_per_steps(census, counts)


@pytest.mark.parametrize("lean", [True, False])
def test_census_counts_equal_ops_per_step_on_a_guided_unet2dcondition(lean):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_SD).eval()
    x_T, kwargs = _tiny_sd_inputs()

    def sampler_for_steps(s):
        return FastSampler(unet, SCHEDULE, steps=s, lean=lean)

    counts, _ = ops_per_step(sampler_for_steps, x_T, **kwargs)
    census = census_per_step(sampler_for_steps, x_T, **kwargs)
    _assert_counts_are_ops_per_steps(census, counts)
    # the step's FLOPs are the model's, on the doubled batch
    assert census["aten::scaled_dot_product_attention"]["flops"] > 0
    assert census["aten::conv2d"]["flops"] > 0


# --- FLOPs and bytes of single ops, by hand -----------------------------------------------------


def test_flops_of_linear_conv_bmm_and_attention_equal_the_hand_formulas():
    x = torch.randn(3, 7, 16)
    w = torch.randn(24, 16)
    b = torch.randn(24)
    # a multiply-add is 2 FLOPs: 2 * rows * in * out
    assert _one_call(F.linear, x, w, b)["aten::linear"]["flops"] == 2 * (3 * 7) * 16 * 24
    image = torch.randn(2, 5, 9, 11)
    kernel = torch.randn(6, 5, 3, 3)
    conv = _one_call(F.conv2d, image, kernel, None, padding=1)["aten::conv2d"]
    # 2 * N * C_out * H_out * W_out * C_in * k_h * k_w
    assert conv["flops"] == 2 * 2 * 6 * 9 * 11 * 5 * 3 * 3
    strided = _one_call(F.conv2d, image, kernel, None, stride=2)["aten::conv2d"]
    assert strided["flops"] == 2 * 2 * 6 * 4 * 5 * 5 * 3 * 3  # H_out = (9 - 3) // 2 + 1, W_out = (11 - 3) // 2 + 1
    a, m = torch.randn(4, 6, 8), torch.randn(4, 8, 10)
    assert _one_call(torch.bmm, a, m)["aten::bmm"]["flops"] == 2 * 4 * 6 * 8 * 10
    q, k, v = torch.randn(2, 3, 13, 8), torch.randn(2, 3, 17, 8), torch.randn(2, 3, 17, 8)
    attention = _one_call(F.scaled_dot_product_attention, q, k, v)["aten::scaled_dot_product_attention"]
    # QK^T: 2 * B * H * L * S * E, then PV: 2 * B * H * L * S * E_v
    assert attention["flops"] == 2 * (2 * 2 * 3 * 13 * 17 * 8)
    assert _one_call(torch.add, a, a)["aten::add.Tensor"]["flops"] == 0  # only matmuls and convolutions count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_of_elementwise_ops_equal_the_hand_formulas(dtype):
    a = torch.randn(3, 5, 7).to(dtype)
    b = torch.randn(3, 5, 7).to(dtype)
    size = a.numel() * a.element_size()
    add = _one_call(torch.add, a, b)["aten::add.Tensor"]
    assert (add["count"], add["bytes_read"], add["bytes_written"]) == (1, 2 * size, size)
    assert _one_call(torch.add, a, a)["aten::add.Tensor"]["bytes_read"] == size  # one tensor twice is one read
    bias = torch.randn(1, 5, 1).to(dtype)
    assert _one_call(torch.add, a, bias.expand(3, 5, 7))["aten::add.Tensor"]["bytes_read"] == size + 5 * a.element_size()  # a broadcast reads its 5 elements
    in_place = _one_call(a.add_, b)["aten::add_.Tensor"]
    assert (in_place["bytes_read"], in_place["bytes_written"]) == (2 * size, size)
    out = torch.empty_like(a)
    out_variant = _one_call(torch.add, a, b, out=out)["aten::add.out"]
    assert (out_variant["bytes_read"], out_variant["bytes_written"]) == (2 * size, size)  # out= is written, not read
    copy = _one_call(out.copy_, a)["aten::copy_"]
    assert (copy["bytes_read"], copy["bytes_written"]) == (size, size)
    half = _one_call(torch.mul, a[:, :2], 2.0)["aten::mul.Tensor"]  # a view: the bytes it addresses, not its storage's
    assert (half["bytes_read"], half["bytes_written"]) == (3 * 2 * 7 * a.element_size(), 3 * 2 * 7 * a.element_size())
    # aten::to may return its input: OpCounter skips it as a view; the census counts it when it copies
    cast = _one_call(a.to, torch.float64)["aten::to.dtype"]
    assert (cast["count"], cast["bytes_read"], cast["bytes_written"]) == (1, size, a.numel() * 8)
    assert _one_call(a.to, dtype) == {}  # nothing to do: a itself, no kernel
    transposed = _one_call(a.transpose(0, 2).contiguous)["aten::contiguous"]
    assert (transposed["bytes_read"], transposed["bytes_written"]) == (size, size)
    assert _one_call(torch.empty, 3, 5)["aten::empty.memory_format"] == dict(count=1, bytes_read=0, bytes_written=0, flops=0)


def test_a_linear_reads_its_weights_and_writes_its_output():
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    linear = _one_call(F.linear, x, w, b)["aten::linear"]
    assert (linear["bytes_read"], linear["bytes_written"]) == (4 * (4 * 16 + 8 * 16 + 8), 4 * 4 * 8)


# --- fake tensors: the same census, nothing computed ---------------------------------------------


def test_fake_census_equals_the_real_census_on_the_unet():
    torch.manual_seed(0)
    real_model = UNet(**TINY_UNET).eval()
    x_T = torch.randn(2, 1, 8, 8)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake_model = UNet(**TINY_UNET).eval()
        fake_x_T = torch.randn(2, 1, 8, 8)
    real = census_per_step(lambda s: FastSampler(real_model, SCHEDULE, steps=s, eta=1.0), x_T)
    fake = census_per_step(lambda s: FastSampler(fake_model, SCHEDULE, steps=s, eta=1.0), fake_x_T)
    assert isinstance(fake_model.conv_in.weight, FakeTensor)
    assert fake == real


@pytest.mark.parametrize("lean", [True, False])
def test_fake_census_equals_the_real_census_on_a_guided_unet2dcondition(lean):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    torch.manual_seed(0)
    real_unet = diffusers.UNet2DConditionModel(**TINY_SD).eval()
    x_T, kwargs = _tiny_sd_inputs()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake_unet = diffusers.UNet2DConditionModel(**TINY_SD).eval()
        fake_x_T, fake_kwargs = _tiny_sd_inputs()
    real = census_per_step(lambda s: FastSampler(real_unet, SCHEDULE, steps=s, lean=lean), x_T, **kwargs)
    fake = census_per_step(lambda s: FastSampler(fake_unet, SCHEDULE, steps=s, lean=lean), fake_x_T, **fake_kwargs)
    assert fake == real


def test_a_fake_model_in_the_sampling_dtype_runs_in_bf16():
    """Built in the sampling dtype (cast_parameters): no sampler casts a fake module with
    Module.to, which cannot swap a FakeTensor parameter."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        model = cast_parameters(UNet(**TINY_UNET).eval(), torch.bfloat16)
        x_T = torch.randn(1, 1, 8, 8)
    census = census_per_step(lambda s: FastSampler(model, SCHEDULE, steps=s, dtype="bf16"), x_T)
    conv = census["aten::conv2d"]
    assert conv["flops"] > 0
    assert all(isinstance(p, FakeTensor) and p.dtype == torch.bfloat16 for p in model.parameters())


# --- the roofline model ---------------------------------------------------------------------------


def test_roofline_arithmetic_on_a_synthetic_census():
    peak, bandwidth, peak_source, bandwidth_source = gpu_numbers("H200", "bf16")
    assert (peak, bandwidth, peak_source, bandwidth_source) == (798e12, 4.3e12, "measured", "measured")
    assert gpu_numbers("h200", torch.bfloat16, numbers="datasheet")[:2] == (989.4e12, 4.8e12)
    assert gpu_numbers("H100 SXM", "bf16")[2:] == ("datasheet", "measured")  # no matmul measured on the H100
    census = {
        "matmul": dict(count=2, bytes_read=2e6, bytes_written=2e6, flops=2 * 1e12),  # 1 TFLOP a call: compute-bound
        "elementwise": dict(count=4, bytes_read=4 * 2e9, bytes_written=4 * 1e9, flops=0),  # 3 GB a call: memory-bound
        "tiny": dict(count=10, bytes_read=10 * 8, bytes_written=10 * 4, flops=0),  # 12 bytes a call: launch-bound
        "allocation": dict(count=3, bytes_read=0, bytes_written=0, flops=0),  # no kernel
    }
    launch = 2e-6
    estimate = roofline(census, "H200", "bf16", launch_us=2.0)
    by_op = {r.op: r for r in estimate.rows}
    assert by_op["matmul"].ms == pytest.approx(2 * (1e12 / peak + launch) * 1e3)
    assert by_op["elementwise"].ms == pytest.approx(4 * (3e9 / bandwidth + launch) * 1e3)
    assert by_op["tiny"].ms == pytest.approx(10 * (12 / bandwidth + launch) * 1e3)
    assert (by_op["allocation"].ms, by_op["allocation"].kernels, by_op["allocation"].bound) == (0, 0, "none")
    assert [by_op[op].bound for op in ("matmul", "elementwise", "tiny")] == ["compute", "memory", "launch"]
    assert [r.op for r in estimate.rows] == ["elementwise", "matmul", "tiny", "allocation"]  # slowest first
    assert estimate.ms == pytest.approx(sum(r.ms for r in estimate.rows))
    assert estimate.kernels == 16
    assert estimate.compute_ms == pytest.approx(2e12 / peak * 1e3)
    assert estimate.memory_ms == pytest.approx((4e6 + 12e9 + 120) / bandwidth * 1e3)
    assert estimate.launch_ms == pytest.approx(16 * launch * 1e3)
    text = format_roofline(estimate)
    assert "MODEL" in text and "798.0 TFLOP/s [measured]" in text and "4.30 TB/s [measured]" in text


def test_roofline_takes_each_calls_own_cost():
    """max() per call, not of the op's sums: a compute-bound and a memory-bound call of one op."""
    peak, bandwidth, _, _ = gpu_numbers("H100", "bf16")
    row = dict(count=2, bytes_read=1e9, bytes_written=0, flops=1e12, calls=[(1, 1e9, 0, 0), (1, 0, 0, 1e12)])
    estimate = roofline({"conv": row}, "H100", "bf16", launch_us=0.0)
    assert estimate.ms == pytest.approx((1e9 / bandwidth + 1e12 / peak) * 1e3)


def test_roofline_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="unknown gpu"):
        roofline({}, "A100")
    with pytest.raises(ValueError, match="unknown numbers"):
        roofline({}, "H200", numbers="guessed")
    assert sorted(GPUS) == ["h100", "h200"]


# --- the command ----------------------------------------------------------------------------------


def _main(*argv) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert opcount.main(list(argv)) == 0
    return stdout.getvalue()


def test_the_command_prints_the_census_and_the_model_of_each_gpu():
    text = _main("--model", "digits", "--gpu", "h100", "h200", "--dtype", "fp32", "--top", "3")
    assert "on fake tensors: digits: UNet" in text
    assert "ops per step" in text and "GB read" in text and "GFLOP" in text
    assert "roofline MODEL of one step on the H100 SXM, float32" in text
    assert "roofline MODEL of one step on the H200, float32" in text
    assert "66.9 TFLOP/s [datasheet]" in text  # no fp32 matmul measured


def test_the_command_runs_guided_digits_and_refuses_a_guided_unconditional_model():
    assert "guided (scale 2)" in _main("--model", "digits", "--guided", "--no-lean", "--batch", "3")
    with pytest.raises(SystemExit, match="unconditional"):
        _main("--model", "cifar10", "--guided")


def test_the_command_counts_the_reference_loop_too():
    """--sampler reference: the plain loop over the model as it is, in the sampling dtype: more
    ops per step than FastSampler's lean step, the same FLOPs within the update's few."""
    def totals(text):
        line = next(line for line in text.splitlines() if "ops per step" in line)
        ops, flops = line.split(" ops per step")[0].split()[-1], line.split(" GFLOP")[0].split()[-1]
        return float(ops), float(flops)

    reference = _main("--model", "digits", "--sampler", "reference", "--dtype", "bf16", "--top", "1")
    assert "census of one ReferenceSampler step (bf16" in reference
    fast = _main("--model", "digits", "--dtype", "bf16", "--top", "1")
    assert "census of one FastSampler (lean=True) step (bf16" in fast
    (ref_ops, ref_gflop), (fast_ops, fast_gflop) = totals(reference), totals(fast)
    assert ref_ops > 1.5 * fast_ops and abs(ref_gflop - fast_gflop) <= 0.01 * ref_gflop, (reference, fast)


def test_the_command_counts_a_unet_the_lean_rewrite_refuses(capsys):
    text = _main("--model", "sd15", "--lean-refused", "--gpu", "h200", "--top", "1")
    assert "runs without the lean rewrite: a replaced block forward" in capsys.readouterr().err
    ops = float(next(line for line in text.splitlines() if "ops per step" in line).split()[0])
    assert 377 < ops < 859  # between the lean step and the reference loop (README's table)
    with pytest.raises(SystemExit, match="lean_refused applies to sd15"):
        _main("--model", "digits", "--lean-refused")


def test_the_command_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "ddim_fast.apps.census.opcount", "--model", "digits", "--gpu", "h200", "--top", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "roofline MODEL of one step on the H200, bfloat16" in done.stdout


# --- full size: SD-1.5's UNet on fake tensors ---------------------------------------------------


def _sd15_attention_flops(batch: int) -> int:
    """SD-1.5's attention FLOPs per call by hand: each transformer block attends its L = H*W
    tokens to themselves and to the 77 text tokens, QK^T and PV at 2 * L * S * C each (C the
    width, heads * head size); 5 blocks at 64x64 (320 wide), 32x32 (640) and 16x16 (1280)
    (2 down, 3 up), 1 in the middle at 8x8."""
    blocks = [(64 * 64, 320, 5), (32 * 32, 640, 5), (16 * 16, 1280, 5), (8 * 8, 1280, 1)]
    return sum(n * 4 * batch * tokens * (tokens + 77) * width for tokens, width, n in blocks)


@pytest.mark.slow  # about 8 s on 2 cores: two sample() calls of S = 2 and 5 of the 860M-parameter UNet, on fake tensors
def test_full_size_sd15_census_on_fake_tensors():
    """SD-1.5's UNet (860M parameters), guided, bf16, batch 1, 64x64 latents, counted in seconds
    with nothing allocated; lean=False runs the model's own code, so the step's FLOPs are one
    model call's on the doubled batch: FlopCounterMode's count (which on a CPU leaves the
    attention kernel out) plus attention's by hand."""
    pytest.importorskip("diffusers", reason="diffusers is an optional dependency")
    from torch.utils.flop_counter import FlopCounterMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    case = fake_case("sd15", mode=mode, dtype=torch.bfloat16, batch=1, guided=True)
    assert sum(p.numel() for p in case.model.parameters()) == 859_520_964
    assert all(isinstance(p, FakeTensor) for p in case.model.parameters())
    census = census_per_step(lambda s: FastSampler(case.model, case.schedule, steps=s, dtype="bf16", lean=False), case.x_T, **case.sample_kwargs)
    with mode, torch.inference_mode(), FlopCounterMode(display=False) as flop_counter:
        x = torch.randn(2, 4, 64, 64, dtype=torch.bfloat16)
        t = torch.full((2,), 500, dtype=torch.long)
        context = torch.randn(2, 77, 768, dtype=torch.bfloat16)
        case.model(x, t, encoder_hidden_states=context)
    attention = census["aten::scaled_dot_product_attention"]
    assert attention["count"] == 32 and attention["flops"] == _sd15_attention_flops(batch=2)
    assert sum(row["flops"] for row in census.values()) == flop_counter.get_total_flops() + attention["flops"]
    # every weight is read at least once a step: 2 bytes a parameter in bf16
    assert sum(row["bytes_read"] for row in census.values()) > 2 * 859_520_964
    estimate = roofline(census, "H200", "bf16")
    assert estimate.rows[0].op == "aten::conv2d"
    assert 1.0 < estimate.ms < 10.0



def test_storage_peak_counts_new_storages_while_they_live():
    given = torch.zeros(100)
    with StoragePeak() as counter:
        first = torch.ones(1000)  # 4000 bytes
        view = first[10:20].view(2, 5)  # no new storage
        given.add_(1.0)  # in place: none
        del first, view
        second = torch.empty(500, dtype=torch.float64)  # 4000 bytes, after the first is freed
        third = second.to(torch.float32)  # 2000 more
    assert counter.peak == 6000
    assert counter.live == 6000
    del second
    assert counter.live == 2000
    del third
    assert counter.live == 0
