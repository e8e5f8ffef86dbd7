"""FastSampler: the same samples as ReferenceSampler, with fused kernels and no per-step overhead.

- ddim_fast's UNet runs as a LeanUNet (models/lean.py): one dtype and one layout
  (channels_last) throughout, its time embeddings a table made once per plan, residual
  adds inside the next norm's kernel, and fewer, fatter ops. Other models run as a fused
  copy (GroupNorm+SiLU in one kernel) sharing the caller's weights. The caller's module
  is not changed (fuse="inplace" asks for that).
- Each step is one fused op (x̂₀, clamp, update and noise in one pass) writing into a
  static buffer; coefficients and timesteps are computed once, before the loop.
- On CUDA (cuda_graph=True) the steps replay a captured CUDA graph (sampling/graph.py);
  elsewhere, or if the model cannot be captured, the eager loop below runs.

With the same generator it draws the same noise as ReferenceSampler (see its docstring
for the order), so the two agree to float rounding for any η.
"""

from __future__ import annotations

import sys
import threading
from typing import Optional

import torch

from .. import ops
from ..ops.dispatch import pick_backend
from ..core.checks import check_bool
from ..core.options import check_dtype, make_options
from ..core.plan import StepPlan
from ..core.schedule import Schedule
from ..core.solvers import plan_of_levels
from ..core.solvers.ddim import inversion_plan
from ..models.prepare import COMPILE_MODES, compile_model, model_dtype, prepare_model, runs_from_table
from . import common as S
from .conditioning import NONE, Conditioning, GuidanceBuffers, cast_kwargs, make_conditioning
from .capture import EMULATE, check_emulation
from .graph import GRAPH_MODES, CapturedLoop, GraphCache
from .noise import NoiseStream, initial_noise
from .spec import StepSpec, step_spec, timestep_dtype
from .steppers import kernel_stepper, op_stepper


class _Preparation:
    """The model as a sampler runs it: prepared for one device, made on first use."""

    def __init__(self):
        self.device: Optional[torch.device] = None
        self.model = None
        self.fused_sites = 0
        self.lean_note: Optional[str] = None


class FastSampler:
    """DDIM (or DPM-Solver++(2M), Euler, Euler ancestral, LCM) sampling with fused kernels and,
    on CUDA, a captured loop.

    The options, by concern (the first eight positional, as ReferenceSampler's; the rest
    keyword-only):

    The algorithm (ReferenceSampler's, same meaning and defaults): steps, eta, skip, clip_x0,
    prediction, steps_offset, use_clipped_model_output, and
    solver: the update each step makes, all of them one fused step in the same loops:
        "ddim" (default); "dpmpp_2m" (DPM-Solver++(2M), Lu et al. 2022: the previous step's
        x̂₀ kept in a buffer; give skip="dpm_linspace" or "trailing", as a grid ending at
        t = 0 ends on a large extrapolation); "euler" (Karras et al. 2022, Algorithm 1;
        skip="euler_linspace" calls the model at fractional timesteps, σ interpolated);
        "euler_ancestral" (its ancestral form: fresh noise of σ_up each step, eta its share,
        1 by default); "lcm" (Luo et al. 2023: the consistency function and fresh noise each
        step, on skip="lcm"). eta=None takes the solver's own (0; euler_ancestral 1; lcm
        none). Schedule.from_diffusers_config maps diffusers' DDIM, DPMSolverMultistep,
        EulerDiscrete, EulerAncestralDiscrete and LCM schedulers to these, grid included.
        The Euler solvers keep x in the variance-preserving frame (the model's input), where
        diffusers' Euler schedulers keep x sqrt(1 + σ²): x_T is unit noise at the first level.
        encode() is DDIM's inversion through the same levels whatever the solver.
    sigmas: None (the grid's own noise levels) or "karras" (Karras et al. 2022's σ, Eq. 5:
        diffusers' use_karras_sigmas=True), for dpmpp_2m and the Euler solvers.

    The model as it runs (prepared once per device):
    fuse: True (default) fuses GroupNorm+SiLU in a copy of the model that shares its
        weights; "inplace" fuses the caller's module itself; False runs the model as is.
    lean: with fuse=True, run ddim_fast's UNet as a LeanUNet and diffusers'
        UNet2DConditionModel as a LeanConditionUNet, its LoRA layers folded (default True):
        copies of the weights in the sampling dtype and layout, made once per device, so
        later changes to the UNet's weights need a new sampler, or for a
        LeanConditionUNet refresh_weights() (in place: compiled code and graphs kept).
    dtype: sampling dtype ("fp32", "fp16", "bf16" or a torch dtype); default the model's.
        A dtype other than the model's runs a cast copy of the model.
    channels_last: run the model on channels_last tensors, with a channels_last copy of
        its conv weights (default True: cuDNN and oneDNN convolutions take NHWC without
        transposes, and every kernel of ours reads and writes it).
    compile: False (default), True or "max-autotune": run the prepared model (lean or
        fused) through torch.compile (Inductor; its C++ backend on a CPU) with
        fullgraph=True and static shapes, in a mode that leaves CUDA graphs to ours
        ("max-autotune" is Inductor's "max-autotune-no-cudagraphs"). One compile per
        shape, dtype and device, on the first sample(); our fused step stays outside it,
        and on CUDA model and step are still captured together in one graph.

    The engine (how the steps run):
    cuda_graph: replay a captured CUDA graph on CUDA (default True; falls back to the
        eager loop with one warning if the model cannot be captured). "emulate" runs the
        captured loop's own code (its static buffers, device-side step counter, noise
        buffers and Triton kernels) without capturing, on any device: a debugging switch,
        on the CPU with the Triton kernels under TRITON_INTERPRET=1. False: the eager loop.
    graph_mode: "step" (one captured step replayed S times, the default) or "loop"
        (all S steps captured in one graph: less launch work, more capture time and
        graph memory; for small S).
    graph_cache_size: how many captured graphs to keep (LRU), one per
        (batch, shape, dtype, device, step spec, conditioning, noise source).
    fast_rng: on CUDA, draw the noise inside the step kernel (Philox) instead of
        torch.randn: one pass less for η > 0, but not the reference's stream (checked by
        moments, not bit for bit).
    backend: force the backend of the step op ("cpu", "cuda", "triton", "torch").

    check_finite: raise at the first step that makes NaN or Inf (a host sync per step).
    """

    def __init__(
        self,
        model,
        schedule: Schedule,
        steps: int = 50,
        eta=None,
        skip="uniform",
        clip_x0=False,
        prediction: str = "eps",
        check_finite: bool = False,
        *,
        steps_offset: int = 0,
        use_clipped_model_output: bool = False,
        solver: str = "ddim",
        sigmas=None,
        cuda_graph: bool = True,
        fuse=True,
        lean: bool = True,
        dtype=None,
        channels_last: Optional[bool] = None,
        fast_rng: bool = False,
        graph_cache_size: int = 4,
        graph_mode: str = "step",
        backend: Optional[str] = None,
        compile=False,
    ):
        S.check_model(model, "FastSampler")
        self.options = make_options(schedule, steps, eta, skip, clip_x0, prediction, check_finite, steps_offset, use_clipped_model_output, solver, sigmas)
        self.schedule = schedule
        if not (cuda_graph is True or cuda_graph is False or cuda_graph == EMULATE):
            raise ValueError(f"cuda_graph must be True, False or {EMULATE!r}, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        if channels_last is not None:
            check_bool("channels_last", channels_last)
        self._channels_last_opt = channels_last
        self.fast_rng = check_bool("fast_rng", fast_rng)
        if fuse not in (True, False, "inplace"):
            raise ValueError(f"fuse must be True, False or 'inplace', got {fuse!r}")
        self.lean = check_bool("lean", lean)
        if isinstance(graph_cache_size, bool) or not isinstance(graph_cache_size, int) or graph_cache_size < 1:
            raise ValueError(f"graph_cache_size must be an int >= 1, got {graph_cache_size!r}")
        if graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {graph_mode!r}")
        self.graph_mode = graph_mode
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {ops.BACKENDS}")
        self.backend = backend
        if not (compile is False or compile is True or (isinstance(compile, str) and compile in COMPILE_MODES)):
            raise ValueError(f"compile must be False, True or 'max-autotune', got {compile!r}")
        self.compile = compile
        S.warn_if_training(model, "FastSampler")
        self.model = model
        self.dtype = check_dtype(dtype) or model_dtype(model) or torch.float32
        self._fuse = fuse
        self._engine = dict(cuda_graph=cuda_graph, fuse=fuse, lean=lean, dtype=dtype, channels_last=channels_last, fast_rng=fast_rng, graph_cache_size=graph_cache_size, graph_mode=graph_mode, backend=backend, compile=compile)
        self._preparation = _Preparation()  # the model as run on a device, shared with siblings
        self._plan = plan_of_levels(self.options.solver, self.options.levels, self.options.eta)
        self._specs: dict = {}  # "sampling" / "encoding" -> StepSpec, made on first use
        self._graphs = None  # graph.GraphCache, made on first CUDA use
        self._graph_cache_size = graph_cache_size
        self._lock = threading.Lock()  # one sample() at a time per sampler: buffers are shared

    # --- set-up ------------------------------------------------------------------------------
    def prepared_model(self, device: torch.device):
        """The model as this sampler runs it on `device`, made once per device.

        See models.prepare.prepare_model: a LeanUNet, or a copy that shares the caller's
        weights with GroupNorm+SiLU fused. fuse="inplace" changes the caller's module instead.
        """
        prep = self._preparation
        if prep.model is not None and prep.device == device:
            return prep.model
        model, prep.fused_sites, prep.lean_note = prepare_model(self.model, device=device, dtype=self.dtype, fuse=self._fuse, channels_last=self._channels_last(device), lean=self.lean)
        if prep.lean_note is not None:
            print(f"ddim_fast: {type(self.model).__name__} runs without the lean rewrite: {prep.lean_note}", file=sys.stderr, flush=True)
        if self.compile is not False:
            model = compile_model(model, self.compile)
        prep.device, prep.model = device, model
        return model

    @property
    def fused_sites(self) -> int:
        """How many GroupNorm+SiLU sites the prepared model runs fused (0 before the first run)."""
        return self._preparation.fused_sites

    @property
    def lean_note(self) -> Optional[str]:
        """Why a UNet2DConditionModel runs without the lean rewrite (None when it runs lean, or before the first run)."""
        return self._preparation.lean_note

    def refresh_weights(self) -> bool:
        """Bring the prepared model (shared with this sampler's siblings) up to the model's
        weights now, in place: the same buffers, so compiled code and captured graphs stay
        valid (LeanConditionUNet.refresh, which folds LoRA layers again). True when done, or
        when nothing is prepared yet; False when the prepared model cannot take them in place
        (another kind of model, a change of structure, or of the model's dtype when the
        sampling dtype follows it): a new sampler is then needed."""
        model = self._preparation.model
        if model is None:
            return True
        if self._engine["dtype"] is None and (model_dtype(self.model) or torch.float32) != self.dtype:
            return False  # the sampling dtype follows the model's, which changed
        refresh = getattr(model, "refresh", None)  # through a torch.compile wrapper too
        if refresh is None:
            return False
        with self._lock:  # not while a sample() of a sibling reads the buffers
            return bool(refresh(self.model))

    def sibling(self, schedule: Schedule, **algorithm) -> "FastSampler":
        """A sampler of the same model and engine options with another schedule and algorithm
        options (steps, eta, skip, clip_x0, prediction, steps_offset, use_clipped_model_output, solver, sigmas),
        sharing this one's prepared model (its weight copies, compiled code) and its lock: a
        pipeline (apps/pipelines) makes one per (steps, eta) without preparing the model again."""
        sibling = FastSampler(self.model, schedule, check_finite=self.options.check_finite, **algorithm, **self._engine)
        sibling._preparation = self._preparation
        sibling._lock = self._lock
        return sibling

    def _channels_last(self, device: torch.device) -> bool:
        return True if self._channels_last_opt is None else self._channels_last_opt

    @property
    def timesteps(self) -> list:
        """The model timesteps in sampling order."""
        return list(self._plan.timesteps)

    @property
    def plan(self) -> StepPlan:
        """What each step does (core.plan.StepPlan: the solver's coefficient rows, immutable)."""
        return self._plan

    def _format(self, x: torch.Tensor):
        return torch.channels_last if (self._channels_last(x.device) and x.dim() == 4) else torch.contiguous_format

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype=self.dtype, memory_format=self._format(x), copy=True)

    # --- public -------------------------------------------------------------------------------
    def sample(
        self,
        x_T=None,
        *,
        batch_size=None,
        generator=None,
        shape=None,
        return_x0: bool = False,
        return_trajectory: bool = False,
        model_kwargs=None,
        guidance_scale=None,
        uncond_kwargs=None,
        guidance_rescale=None,
        noise_dtype=None,
    ):
        """Sample x0 from x_T (drawn from `generator` when not given); see ReferenceSampler.sample
        (generator, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale, noise_dtype
        as there).

        Guided, the combination ε_u + w·(ε_c − ε_u) is formed inside the fused step, and on
        CUDA the conditioning tensors and w are static buffers of the captured graph: new
        values of the same shapes replay it without a new capture.
        The result has the sampling dtype and x_T's memory format is not kept (contiguous).
        """
        stream = NoiseStream.of(generator, noise_dtype)
        x = initial_noise(self.model, x_T, batch_size, stream, shape, None, None)
        stream.check_batch(x.shape[0])
        cond = make_conditioning(x, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale)
        return self._run(self.spec("sampling"), x, stream, return_x0, return_trajectory, cond)

    def encode(self, x0, *, return_trajectory: bool = False, model_kwargs=None, guidance_scale=None, uncond_kwargs=None, guidance_rescale=None):
        """DDIM inversion (η = 0) of x0 along the same grid, whatever the solver; see
        ReferenceSampler.encode."""
        x = S.check_input(self.model, x0, "x0")
        cond = make_conditioning(x, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale)
        res = self._run(self.spec("encoding"), x, NoiseStream(), False, return_trajectory, cond)
        return (res.sample, res.trajectory) if return_trajectory else res

    def step_loop(self, x: torch.Tensor) -> CapturedLoop:
        """The captured loop's buffers and steps for a batch like x (sampling, unguided), not
        captured: what benchmarks/profile_step.py times one step of, with or without a graph."""
        return CapturedLoop(self.spec("sampling"), self.prepared_model(x.device), self._layout(x))

    def spec(self, what: str) -> StepSpec:
        """The step spec of sampling or encoding with this sampler's options, made once."""
        spec = self._specs.get(what)
        if spec is None:
            encoding = what == "encoding"
            plan = inversion_plan(self.options.levels) if encoding else self._plan
            spec = self._specs[what] = step_spec(self.options, plan, encoding=encoding, fast_rng=self.fast_rng)
        return spec

    # --- the loops ----------------------------------------------------------------------------
    def _run(self, spec: StepSpec, x, stream: NoiseStream, return_x0, return_trajectory, cond: Conditioning = NONE):
        plan = spec.plan
        want_extra = return_x0 or return_trajectory
        if x.shape[0] == 0:
            x = self._layout(x)
            return S.SamplerOutput(x, [] if return_x0 else None, [x] if return_trajectory else None) if want_extra else x
        emulate = self.cuda_graph == EMULATE
        if emulate:
            check_emulation(x, return_x0=return_x0, return_trajectory=return_trajectory, check_finite=self.options.check_finite)
        elif self.fast_rng and x.device.type != "cuda":
            raise ValueError(f"fast_rng draws the noise inside the CUDA step kernel; x is on {x.device} (use fast_rng=False there)")
        if self.fast_rng and not stream.plain and plan.noisy_steps:
            raise ValueError("fast_rng draws the noise inside the step kernel from one seed: it takes one generator and float32 noise, not a list of generators or noise_dtype")
        with self._lock, torch.inference_mode(), S.on_device(x):
            x = self._layout(x)
            cond = cast_kwargs(cond, self.dtype)
            captured = x.device.type == "cuda" and self.cuda_graph is True and not want_extra and not self.options.check_finite
            if emulate or captured:
                if self._graphs is None:
                    self._graphs = GraphCache(self._graph_cache_size, self.graph_mode, capture=not emulate)
                out = self._graphs.run(spec, self.prepared_model, x, stream, cond)
                if out is not None:
                    return out
            return self._eager(spec, x, stream, return_x0, return_trajectory, cond)

    def _model_caller(self, model, plan: StepPlan, batch: int, device, cond: Conditioning):
        """call(x, i): the prepared model at step i on the model batch x (2B when guided)."""
        kw = cond.kwargs
        if runs_from_table(model):  # the time embeddings of the whole plan, once
            table = model.time_table(plan.timesteps)
            if hasattr(model, "run_inputs"):  # what depends on the prompt alone, once per run
                table, kw = model.run_inputs(table, kw)
            return lambda x, i: model.forward_rows(x, table[i], **kw)  # noqa: E731
        t_table = torch.tensor(plan.timesteps, dtype=timestep_dtype(plan.timesteps), device=device).repeat_interleave(batch).view(plan.steps, batch)
        return lambda x, i: S.call_model(model, x, t_table[i], **kw)  # noqa: E731

    def _eager(self, spec: StepSpec, x, stream: NoiseStream, return_x0, return_trajectory, cond: Conditioning = NONE):
        """The loop over static buffers: one model call and one fused op per step.

        Guided, the model runs on a buffer xx of 2B samples whose first half is x: the step
        writes x (reading both halves of the output), then x is copied into the second half."""
        plan = spec.plan
        n, dev = x.shape[0], x.device
        model = self.prepared_model(dev)
        xx = x
        if cond.guided:
            xx = torch.empty((2 * n, *x.shape[1:]), dtype=x.dtype, device=dev, memory_format=self._format(x))
            xx[:n].copy_(x)
            xx[n:].copy_(x)
            x = xx[:n]
        call = self._model_caller(model, plan, xx.shape[0], dev, cond)
        noisy = spec.noisy
        guide = GuidanceBuffers(x, cond) if cond.guided else None
        step_op = "guided_step" if (guide is not None and not guide.rescale) else "ddim_step"
        on_kernel = spec.fast_rng or pick_backend(step_op, x, self.backend) == "triton"
        step = kernel_stepper(spec, x, stream, guide) if on_kernel else op_stepper(spec, x, stream, guide, self.backend)
        what = "encoding" if spec.encoding else "sampling"
        x0_preds = [] if return_x0 else None
        xs = [x.clone()] if return_trajectory else None
        out_buf = None  # the model output in x's layout, made if the model returns another
        for i in range(plan.steps):
            out = call(xx, i)
            if i == 0:
                S.check_model_output(out, xx, i, plan.timesteps[i])
            if out.dtype != x.dtype:
                out = out.to(x.dtype)
            out, out_buf = S.laid_out_like(xx, out, out_buf)
            x0_out = torch.empty_like(x) if return_x0 else None
            step(i, out, noisy[i], x0_out)  # x updated in place
            if guide is not None:
                xx[n:].copy_(x)
            if self.options.check_finite:
                S.check_finite(x, i, plan.timesteps[i], what)
            if return_x0:
                x0_preds.append(x0_out)
            if return_trajectory:
                xs.append(x.clone())
        if guide is not None:
            x = x.clone()  # not a view of the doubled buffer
        if return_x0 or return_trajectory:
            return S.SamplerOutput(x, x0_preds, xs)
        return x

    def __repr__(self) -> str:
        o = self.options
        return (
            f"FastSampler(steps={o.steps}, eta={o.eta!r}, skip={o.skip!r}, clip_x0={o.clip}, prediction={o.prediction!r}, "
            f"solver={o.solver!r}, dtype={self.dtype}, cuda_graph={self.cuda_graph}, fused_sites={self.fused_sites})"
        )

