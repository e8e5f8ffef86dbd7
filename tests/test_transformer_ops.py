"""The transformer-block ops, add_layer_norm and geglu, on every backend this machine has,
against float64 references.

Every output an op allocates starts as NaN (the `poisoned_outputs` fixture: torch's
deterministic mode fills uninitialised memory, the extension's C++ allocations included), so
an element a kernel leaves unwritten fails. In fp32 the largest error is held to 1e-5 of the
output's scale; in fp16 and bf16 to twice PyTorch's own at that dtype (its add, LayerNorm,
GELU and product: err(ours, ref64) <= 2 * err(torch, ref64), as STYLE.md asks) plus one
rounding of the output, which Triton's interpreter truncates where a GPU rounds to nearest.
"""

import pytest
import torch
import torch.nn.functional as F

from ddim_fast import ops

from .conftest import requires_cuda, requires_triton_interpreter
from .test_ops import BACKENDS, native_cpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Uninitialised memory (torch.empty, at::empty_like) reads as NaN for the test's length."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(3).isnan().all()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


class RowOpTester:
    """One op on rows of the last dimension. A subclass gives `run(inputs, backend)` (the op's
    outputs, a tuple), `expected(inputs)` (the same in float64) and `same_dtype(inputs)` (what
    PyTorch's own ops give at the inputs' dtype), and `inputs(shape, dtype, device, seed)`;
    it inherits every backend x dtype x shape case, non-contiguous inputs, an odd storage
    offset (no vector access may assume more alignment than the pointers have) and empty inputs."""

    SHAPES = [
        (3, 5, 7),  # odd everything
        (2, 16, 320),  # SD-1.5's first level: 320 channels per token
        (1, 3, 1280),  # SD-1.5's deepest level, a row longer than a vector loop's block
        (17, 33),  # (tokens, channels): one level of batch less
        (5, 1),  # one channel per row
        (9,),  # a single row
    ]

    def run(self, inputs, backend):
        raise NotImplementedError

    def expected(self, inputs):
        raise NotImplementedError

    def same_dtype(self, inputs):
        raise NotImplementedError

    def inputs(self, shape, dtype, device, seed=0):
        raise NotImplementedError

    def _check(self, got, inputs, dtype):
        for out, ref, own in zip(got, self.expected(inputs), self.same_dtype(inputs)):
            assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
            assert not out.isnan().any(), "unwritten (poisoned) output elements"
            if not ref.numel():
                continue
            err = (out.double() - ref).abs().max().item()
            scale = ref.abs().max().item()
            if dtype == torch.float32:
                bound = 1e-5 * (1 + scale)
            else:
                bound = 2 * (own.double() - ref).abs().max().item() + torch.finfo(dtype).eps * scale
            assert err <= bound, f"max err {err:.3g} > {bound:.3g} ({dtype})"

    @pytest.mark.parametrize("backend, device", BACKENDS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", SHAPES)
    def test_against_float64(self, backend, device, dtype, shape):
        inputs = self.inputs(shape, dtype, device)
        self._check(self.run(inputs, backend), inputs, dtype)

    @pytest.mark.parametrize("backend, device", BACKENDS)
    def test_non_contiguous_inputs_are_taken(self, backend, device):
        """A transposed view (what a caller may hand in) is copied, not misread."""
        inputs = self.inputs((6, 4, 10), torch.float32, device, seed=3)
        strided = [t.transpose(0, 1).contiguous().transpose(0, 1) if isinstance(t, torch.Tensor) and t.dim() == 3 else t for t in inputs]
        assert not strided[0].is_contiguous()
        self._check(self.run(strided, backend), inputs, torch.float32)

    @pytest.mark.parametrize("backend, device", BACKENDS)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_at_an_odd_storage_offset(self, backend, device, dtype):
        def shifted(t):
            if not isinstance(t, torch.Tensor) or t.dim() < 2:
                return t
            buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
            return buf[1:].view(t.shape).copy_(t)

        inputs = [shifted(t) for t in self.inputs((3, 4, 24), dtype, device, seed=4)]
        self._check(self.run(inputs, backend), inputs, dtype)

    @pytest.mark.parametrize("backend, device", BACKENDS)
    def test_empty_inputs(self, backend, device):
        inputs = self.inputs((0, 5, 8), torch.float32, device)
        for out, ref in zip(self.run(inputs, backend), self.expected(inputs)):
            assert out.shape == ref.shape


class TestAddLayerNorm(RowOpTester):
    """(s, y) = (x + residual, layer_norm(x + residual)): the sum rounded to x's dtype as an add
    stores it, and the norm of the stored sum."""

    def inputs(self, shape, dtype, device, seed=0, param_dtype=None, params=("weight", "bias")):
        g = _gen(seed + sum(shape))
        x = (torch.randn(shape, generator=g) * 3 + 5).to(device=device, dtype=dtype)  # a mean far from 0
        residual = (torch.randn(shape, generator=g) * 2 - 1).to(device=device, dtype=dtype)
        width = shape[-1]
        weight = torch.randn(width, generator=g).to(device=device, dtype=param_dtype or dtype)
        bias = torch.randn(width, generator=g).to(device=device, dtype=param_dtype or dtype)
        return [x, residual, weight if "weight" in params else None, bias if "bias" in params else None, 1e-5]

    def run(self, inputs, backend):
        return ops.add_layer_norm(*inputs[:4], eps=inputs[4], backend=backend)

    def expected(self, inputs):
        x, residual, weight, bias, eps = inputs
        s = x.double() + residual.double()
        as_double = [None if p is None else p.double() for p in (weight, bias)]
        return s, F.layer_norm(s, (x.shape[-1],), *as_double, eps)

    def same_dtype(self, inputs):
        x, residual, weight, bias, eps = inputs
        s = x + residual
        cast = [None if p is None else p.to(x.dtype) for p in (weight, bias)]
        return s, F.layer_norm(s, (x.shape[-1],), *cast, eps)

    @pytest.mark.parametrize("backend, device", BACKENDS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("param_dtype", [torch.float32, None], ids=["fp32-params", "x-dtype-params"])
    @pytest.mark.parametrize("params", [("weight",), ("bias",), ()], ids=["weight-only", "bias-only", "neither"])
    def test_one_parameter_or_none(self, backend, device, dtype, param_dtype, params):
        """A weight without a bias, a bias without a weight (each in fp32 or x's dtype: the
        kernels take the parameters' dtype from whichever is given), or neither."""
        inputs = self.inputs((2, 7, 48), dtype, device, seed=5, param_dtype=param_dtype, params=params)
        self._check(self.run(inputs, backend), inputs, dtype)

    @pytest.mark.parametrize("backend, device", BACKENDS)
    def test_mean_much_larger_than_spread(self, backend, device):
        """fp32 rows around 1000 with a spread of 0.01: a one-pass E[s²] - E[s]² would lose the variance."""
        g = _gen(6)
        x = (torch.randn(4, 300, generator=g) * 0.01 + 1000).to(device)
        residual = torch.zeros_like(x)
        s, y = ops.add_layer_norm(x, residual, backend=backend)
        ref = F.layer_norm(x.double(), (300,))
        assert (y.double() - ref).abs().max().item() < 2e-2  # ~1 fp32 ulp of 1000, over a spread of 0.01

    @pytest.mark.parametrize("device", [pytest.param("cpu", marks=requires_triton_interpreter), pytest.param("cuda", marks=requires_cuda)])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("width", [37, 64, 1])
    def test_triton_wide_plan(self, device, dtype, width):
        """The plan for rows longer than a program holds, reached on short rows with a small step."""
        from ddim_fast.kernels.layer_norm import Plan, add_layer_norm

        inputs = self.inputs((3, width), dtype, device, seed=7)
        self._check(add_layer_norm(*inputs[:4], inputs[4], launch_plan=Plan("wide", block_d=16)), inputs, dtype)

    @pytest.mark.parametrize("device", [pytest.param("cpu", marks=requires_triton_interpreter), pytest.param("cuda", marks=requires_cuda)])
    def test_triton_wide_plan_with_an_outlying_first_channel(self, device):
        """Rows of 20000 values (the wide plan, as plan() picks it) around 1000 with a spread of
        0.01 and a first value 50 away: moments about that value (or E[s²] - E[s]²) would
        cancel most of the variance (0.04) away."""
        from ddim_fast.kernels.layer_norm import add_layer_norm, plan

        width = 20000
        assert plan(2, width).kind == "wide"
        g = _gen(8)
        x = torch.randn(2, width, generator=g) * 0.01 + 1000
        x[:, 0] += 50
        x = x.to(device)
        s, y = add_layer_norm(x, torch.zeros_like(x), None, None, 1e-5)
        ref = F.layer_norm(x.double(), (width,))
        # measured 1.7e-6 (PyTorch's own fp32 LayerNorm 2.1e-6); moments about the first value 1.6e-3
        assert (y.double() - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()

    def test_triton_plan_choice(self):
        pytest.importorskip("triton")
        from ddim_fast.kernels.layer_norm import ROW_MAX, TILE, plan

        assert plan(8192, 320) == ("rows", 4, 512)  # SD-1.5's first level at 64x64, guided
        assert plan(3, 32) == ("rows", 4, 32)  # never more rows per program than there are
        assert plan(10, ROW_MAX).kind == "rows" and plan(10, ROW_MAX + 1) == ("wide", 1, TILE)

    def test_bad_input_says_what_was_expected(self):
        x = torch.randn(2, 3, 8)
        with pytest.raises(ValueError, match=r"add_layer_norm: residual must have x's shape \(2, 3, 8\), got \(2, 3\)"):
            ops.add_layer_norm(x, torch.randn(2, 3))
        with pytest.raises(TypeError, match="add_layer_norm: residual must have x's dtype torch.float32, got torch.bfloat16"):
            ops.add_layer_norm(x, x.bfloat16())
        with pytest.raises(ValueError, match=r"add_layer_norm: weight must have shape \(8,\), got \(3,\)"):
            ops.add_layer_norm(x, x, torch.ones(3))
        with pytest.raises(TypeError, match="add_layer_norm: bias must have x's dtype torch.bfloat16 or float32, got torch.float16"):
            ops.add_layer_norm(x.bfloat16(), x.bfloat16(), None, torch.ones(8, dtype=torch.float16))
        with pytest.raises(TypeError, match="add_layer_norm: weight and bias must have one dtype, got torch.bfloat16 and torch.float32"):
            ops.add_layer_norm(x.bfloat16(), x.bfloat16(), torch.ones(8, dtype=torch.bfloat16), torch.ones(8))
        with pytest.raises(ValueError, match="add_layer_norm: eps must be a finite number >= 0, got -1"):
            ops.add_layer_norm(x, x, eps=-1)
        with pytest.raises(ValueError, match="add_layer_norm: x must have at least one dimension"):
            ops.add_layer_norm(torch.tensor(1.0), torch.tensor(1.0))
        with pytest.raises(TypeError, match="add_layer_norm: x must be a floating-point tensor"):
            ops.add_layer_norm(x.long(), x.long())

    @native_cpu
    def test_native_errors_say_what_was_expected(self):
        x = torch.randn(2, 3, 8)
        with pytest.raises(RuntimeError, match="add_layer_norm: x must be contiguous"):
            torch.ops.ddim_fast.add_layer_norm(x.transpose(0, 1), x.transpose(0, 1), None, None, 1e-5)
        with pytest.raises(RuntimeError, match=r"add_layer_norm: residual must have x's shape \[2, 3, 8\], got \[2, 8\]"):
            torch.ops.ddim_fast.add_layer_norm(x, torch.randn(2, 8), None, None, 1e-5)
        with pytest.raises(RuntimeError, match=r"add_layer_norm: weight must have shape \(8,\), got \[3\]"):
            torch.ops.ddim_fast.add_layer_norm(x, x, torch.ones(3), None, 1e-5)
        with pytest.raises(RuntimeError, match="add_layer_norm: weight and bias must have one dtype"):
            torch.ops.ddim_fast.add_layer_norm(x.half(), x.half(), torch.ones(8), torch.ones(8).half(), 1e-5)
        with pytest.raises(RuntimeError, match="add_layer_norm: x must be float32, float16 or bfloat16, got Double"):
            torch.ops.ddim_fast.add_layer_norm(x.double(), x.double(), None, None, 1e-5)


class TestGeglu(RowOpTester):
    """out = a * gelu(gate) for h = [a, gate] along the last dimension (exact GELU)."""

    def inputs(self, shape, dtype, device, seed=0):
        g = _gen(seed + sum(shape))
        h = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 2).to(device=device, dtype=dtype)
        return [h]

    def run(self, inputs, backend):
        return (ops.geglu(inputs[0], backend=backend),)

    def expected(self, inputs):
        a, gate = inputs[0].double().chunk(2, dim=-1)
        return (a * F.gelu(gate),)

    def same_dtype(self, inputs):
        a, gate = inputs[0].chunk(2, dim=-1)  # diffusers' GEGLU, as it runs
        return (a * F.gelu(gate),)

    def test_bad_input_says_what_was_expected(self):
        with pytest.raises(ValueError, match=r"geglu: h's last dimension holds \[a, gate\] and must be even, got shape \(2, 5\)"):
            ops.geglu(torch.randn(2, 5))
        with pytest.raises(TypeError, match="geglu: h must be a floating-point tensor"):
            ops.geglu(torch.ones(2, 4, dtype=torch.int32))

    @native_cpu
    def test_native_errors_say_what_was_expected(self):
        with pytest.raises(RuntimeError, match=r"geglu: h's last dimension holds \[a, gate\] and must be even, got 5"):
            torch.ops.ddim_fast.geglu(torch.randn(2, 5))
        with pytest.raises(RuntimeError, match="geglu: h must be contiguous"):
            torch.ops.ddim_fast.geglu(torch.randn(4, 6).t())
