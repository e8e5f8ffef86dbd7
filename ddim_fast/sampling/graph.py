"""The captured sampling loop: CUDA graphs replayed with no host work between steps.

One step is (model forward; noise draw if σ > 0; fused Triton step; advance), and all
of it reads its inputs from static device buffers:

    x_buf      (B, C, H, W)  the sample, updated in place by the step kernel
    t_buf      (B,) int64    the model's timestep input (float32 for fractional timesteps)
    t_table    (S + 1, B)    the timesteps of every step (a spare last row)
    coefs      (S, 7) fp32   the coefficients of every step (core.plan.COEF_COLUMNS)
    step       (1,) int32    the device-side step counter that selects both rows
    history    (B, C, H, W)  fp32, x's layout: a multistep solver's previous x̂₀, zeroed per run
    table      (S, W) fp32   the time embeddings of every step, for a model that runs from a table
    z_draw     (B, C, H, W)  fp32 noise, drawn with torch.randn inside the graph (NCHW: the reference's order)
    z_buf      (B, C, H, W)  the same noise in x's layout (z_draw itself when x is NCHW)
    z_table    (S, B, C, H, W)  instead, for a generator on another device: every step's noise, in x's layout
    kwargs     the model_kwargs' tensors (class labels, text embeddings), copied in per run
    w          (1,) fp32     the guidance scale, read by the step kernel

Guided (classifier-free guidance), x_buf holds 2B samples and the sample is its first half:
the model runs on all 2B with the kwargs [uncond, cond], the step kernel reads both halves
of its output and writes the first half of x_buf, and one copy refreshes the second. A new
prompt (or label, or w) of the same shapes replays the same graphs.

The step kernel reads coefs[step]; the advance kernel then does step += 1 and
t_buf = t_table[step]. A model that runs from a table (models.prepare.runs_from_table)
reads its row of `table` with one index op on `step` instead. So one captured step graph serves every step ("step" mode),
replayed S times; or the S steps are captured into one graph ("loop" mode). A step with
σ = 0 replays a second graph without the noise draw, so the generator is consumed
exactly as ReferenceSampler consumes it: same generator, same noise, same samples.

Noise comes from a sampler-owned generator on x's device, registered with the graphs;
each run copies the caller's generator state in and back out, so the caller's generator
advances as if the eager loop had run. A generator on another device (a CPU generator,
which diffusers recommends for reproducible images) cannot feed a graph: then each run
draws the steps' noise from it in the reference's order, on its device, and copies them
in one go into a device table (S, B, C, H, W) that the step kernel reads by the step
counter (the graph is kept); so is a list of generators, one per sample (diffusers'
convention). noise_dtype (diffusers' pipelines draw in their UNet's dtype) is the dtype
of the draw, in the graph or into the table, converted to float32 for the kernel. With
fast_rng=True the step kernel draws the noise itself (Philox, seed from the generator
once per run): one pass less, but not the reference's stream.

What each step does comes from one immutable StepSpec (sampling/spec.py: the solver's
plan, the prediction, the clamp, the buffers it needs), not from the sampler.
Graphs are cached per (shape, dtype, layout, device, spec, conditioning, noise source)
with a bound (LRU); a changed key captures anew. A model that cannot be captured (a host sync, data-dependent
control flow) makes the sampler fall back to the eager loop, with one warning that
names the reason.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Optional

import torch

from ..core.checks import describe_error
from ..models.prepare import runs_from_table
from .capture import host_syncs_reported, restore_after_failed_capture
from .common import call_model, check_model_output, laid_out_like
from .noise import NoiseStream, philox_seed
from .conditioning import NONE, Conditioning, GuidanceBuffers, copy_into, signature, static_copy
from .spec import StepSpec, history_buffer, timestep_dtype

GRAPH_MODES = ("step", "loop")
__all__ = ["CapturedLoop", "GraphCache", "GRAPH_MODES", "foreign_noise_device"]


def _format(x: torch.Tensor):
    return torch.channels_last if (x.dim() == 4 and not x.is_contiguous()) else torch.contiguous_format


def _kernels():
    from ..kernels import ddim_step as k

    return k


def foreign_noise_device(generator, device: torch.device) -> Optional[torch.device]:
    """Where the step noise is drawn when a graph cannot draw it (then it is drawn there and
    copied in per run as a table), else None: the generator's device when it is not `device`,
    and for a list of generators (one per sample) theirs. generator: a generator, a list of
    them, a NoiseStream or None."""
    stream = NoiseStream.of(generator)
    if stream.generators is None and (stream.device is None or stream.device == device):
        return None
    return stream.device


def _rows_like(x: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """An empty (rows, *x.shape) tensor whose every row is laid out like x (dense), so that a
    kernel reads row r at r * x.numel() with x's flat offsets."""
    outer_first = sorted(range(x.dim()), key=lambda d: x.stride(d), reverse=True)
    base = torch.empty((rows, *[x.shape[d] for d in outer_first]), dtype=dtype, device=x.device)
    return base.permute(0, *[1 + outer_first.index(d) for d in range(x.dim())])


class CapturedLoop:
    """Static buffers and the captured graphs of one (shape, dtype, device, task).

    Made, it runs its steps one by one on its buffers (what cuda_graph="emulate" runs, on
    any device: on the CPU the Triton kernels run under TRITON_INTERPRET=1); after
    warm_up() and capture() on CUDA, run() replays the graphs instead."""

    def __init__(
        self,
        spec: StepSpec,
        model,
        x: torch.Tensor,
        cond: Conditioning = NONE,
        noise_device: Optional[torch.device] = None,
        noise_dtype: torch.dtype = torch.float32,
    ):
        """spec: what each step does (its plan included); model: the prepared model.
        noise_device: where the step noise is drawn when the graph cannot draw it
        (foreign_noise_device: it is then drawn there per run and copied in as a table);
        None: on x's, inside the graph. noise_dtype: the dtype torch.randn draws in."""
        k = _kernels()
        dev = x.device
        n = x.shape[0]
        plan = spec.plan
        self.spec = spec
        self.plan = plan
        self.mode = None  # "step" or "loop" once captured
        self.noisy = list(spec.noisy)
        self.fast_rng = spec.fast_rng
        self.n = n
        self.kwargs = static_copy(cond.kwargs)
        self.guide = None
        if cond.guided:  # the doubled batch; self.x is its first half, the sample
            self.x_buf = torch.empty((2 * n, *x.shape[1:]), dtype=x.dtype, device=dev, memory_format=_format(x))
            self.x = self.x_buf[:n]
            self.guide = GuidanceBuffers(self.x, cond)
        else:
            self.x_buf = torch.empty_like(x)
            self.x = self.x_buf
        self._load(x)
        m = self.x_buf.shape[0]
        rows = torch.tensor(list(plan.timesteps) + [plan.timesteps[-1]], dtype=timestep_dtype(plan.timesteps), device=dev)
        self.t_table = rows.repeat_interleave(m).view(plan.steps + 1, m).contiguous()
        self.t_buf = self.t_table[0].clone()
        self.coefs = torch.tensor(plan.coefs, dtype=torch.float32, device=dev).contiguous()
        self.step = torch.zeros(1, dtype=torch.int32, device=dev)
        self.z_draw = self.z_buf = self.z_host = self.z_host_draw = self.z_table = None
        self._z_copied = None  # the event after the last copy of z_host into z_table (CUDA)
        if any(self.noisy) and not self.fast_rng and noise_device is not None:
            # rows in the reference's order on the generator's device (pinned for a CPU one,
            # so the per-run copy does not wait for the device), and in x's layout on x's
            pinned = noise_device.type == "cpu" and dev.type == "cuda"
            self.z_host = torch.empty((plan.steps, *x.shape), dtype=torch.float32, device=noise_device, pin_memory=pinned)
            self.z_host_draw = None if noise_dtype == torch.float32 else torch.empty(x.shape, dtype=noise_dtype, device=noise_device)
            self.z_table = _rows_like(x, plan.steps, torch.float32).zero_()  # the warm-up reads it
        elif any(self.noisy) and not self.fast_rng:
            # the reference's draw is torch.randn(x.shape): element (b, c, h, w) gets the value at
            # its NCHW index, so the draw goes to a contiguous buffer, then into x's layout, which
            # the step kernel reads with x's flat offsets
            self.z_draw = torch.empty(x.shape, dtype=noise_dtype, device=dev)
            same = x.is_contiguous() and noise_dtype == torch.float32
            self.z_buf = self.z_draw if same else torch.empty_like(x, dtype=torch.float32)
        self.seed = torch.zeros(1, dtype=torch.int64, device=dev) if self.fast_rng else None
        self.gen = torch.Generator(device=dev) if self.z_buf is not None else None
        self.history = history_buffer(spec, self.x)
        self._k = k
        self._model = model
        self.table = model.time_table(plan.timesteps) if runs_from_table(model) else None
        # what depends on the prompt alone (a model's run_inputs: cross-attention K and V, ...):
        # once per run before the steps, which read its outputs (in a graph: static buffers)
        self._run_inputs = getattr(model, "run_inputs", None) if self.table is not None else None
        self.step_table, self.step_kwargs = self.table, self.kwargs
        self._shape = tuple(x.shape)
        self._output_checked = False
        self.out_buf = None  # the model output in x's layout, made if the model returns another
        self.graphs = {}

    def warm_up(self) -> Optional[str]:
        """Each kind of step twice, eagerly on a side stream, before capture(): the first time
        for lazy initialisation, cuDNN and Triton autotuning and compiles, the second with
        host syncs reported. Returns why the steps cannot be captured (a host sync: .item(),
        a device-to-host copy, torch.cuda.synchronize, which a capture refuses), or None."""
        dev = self.x_buf.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for noisy in sorted(set(self.noisy)):
                self._reset()
                self._prologue()
                self.one_step(noisy)
            with host_syncs_reported() as syncs:
                for noisy in sorted(set(self.noisy)):
                    self._reset()
                    self._prologue()
                    self.one_step(noisy)
        torch.cuda.current_stream(dev).wait_stream(side)
        if syncs:
            return f"a step synchronizes with the host ({syncs[0]}), which a CUDA graph cannot capture"
        return None

    @property
    def generators(self) -> list:
        """The generators the graphs draw from (registered with each graph)."""
        return [self.gen] if self.gen is not None else []

    def capture(self, mode: str, pool) -> None:
        """Capture the step graphs ("step": one per kind of step, replayed S times) or the
        whole loop ("loop": one graph of the S steps) into the memory pool `pool`."""
        if mode == "loop":
            g = torch.cuda.CUDAGraph()
            self._register(g)
            self._reset()
            with torch.cuda.graph(g, pool=pool):
                self._prologue()
                for i in range(self.plan.steps):
                    self.one_step(self.noisy[i])
            self.graphs["loop"] = g
        else:
            if self._run_inputs is not None:  # its outputs, made in the pool, stay the steps' inputs
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._prologue()
                self.graphs["prologue"] = g
            for noisy in sorted(set(self.noisy)):
                g = torch.cuda.CUDAGraph()
                self._register(g)
                self._reset()
                with torch.cuda.graph(g, pool=pool):
                    self.one_step(noisy)
                self.graphs[noisy] = g
        self.mode = mode

    def _register(self, g):
        for generator in self.generators:
            g.register_generator_state(generator)

    def _reset(self):
        """Before the steps of a run (never inside a capture): the counter, the timesteps and a
        multistep solver's history (its first step weighs it by 0, which a NaN left there
        by an earlier run would still poison)."""
        self.step.zero_()
        self.t_buf.copy_(self.t_table[0])
        if self.history is not None:
            self.history.zero_()

    def _prologue(self):
        if self._run_inputs is not None:
            self.step_table, self.step_kwargs = self._run_inputs(self.table, self.kwargs)

    def _load(self, x: torch.Tensor) -> None:
        self.x.copy_(x)
        if self.guide is not None:
            self.x_buf[self.n :].copy_(x)

    def _model_output(self) -> torch.Tensor:
        """The model's output on x_buf at this step, checked, in x_buf's dtype and layout.

        The step kernel reads it with x's flat offsets, so an output of another shape is
        refused (at the first step, which on CUDA is the warm-up: before any capture) and
        one in another layout (a wrapper's .contiguous(), a slice of a 2C output) is copied
        into a buffer laid out like x."""
        if self.table is not None:
            out = self._model.forward_rows(self.x_buf, self.step_table.index_select(0, self.step)[0], **self.step_kwargs)
        else:
            out = call_model(self._model, self.x_buf, self.t_buf, **self.kwargs)
        if not self._output_checked:
            check_model_output(out, self.x_buf, 0, self.plan.timesteps[0])
            self._output_checked = True
        if out.dtype != self.x_buf.dtype:
            out = out.to(self.x_buf.dtype)
        out, self.out_buf = laid_out_like(self.x_buf, out, self.out_buf)
        return out

    def one_step(self, noisy: bool):
        """One step at the device counter's step, on the static buffers (what a step graph
        holds; noisy: whether this step adds noise)."""
        out = self._model_output()
        noise = None
        noise_row_stride = 0
        if noisy and self.z_table is not None:  # this step's row of the run's table
            noise = self.z_table
            noise_row_stride = self.x.numel()
        elif noisy and self.z_buf is not None:
            torch.randn(self._shape, generator=self.gen, device=self.x_buf.device, dtype=self.z_draw.dtype, out=self.z_draw)
            noise = self.z_buf if self.z_buf is self.z_draw else self.z_buf.copy_(self.z_draw)
        m, mc, w = out, None, None
        if self.guide is not None and self.guide.rescale:
            m = self.guide.rescaled(out)
        elif self.guide is not None:
            m, mc, w = out[: self.n], out[self.n :], self.guide.w
        self._k.launch(
            self.x,
            m,
            self.coefs,
            self.step,
            self.x,
            prediction=self.spec.prediction,
            clip=self.spec.clip,
            clipped_eps=self.spec.clipped_eps,
            noise=noise,
            noise_row_stride=noise_row_stride,
            seed=self.seed if (noisy and self.fast_rng) else None,
            has_xt=self.spec.has_xt,
            cond=mc,
            guidance=w,
            history=self.history,
        )
        if self.guide is not None:
            self.x_buf[self.n :].copy_(self.x)
        self._k.advance(self.step, self.t_table, self.t_buf)

    def _draw_noise_table(self, stream: NoiseStream) -> None:
        """This run's step noise: one draw of x's shape per noisy step from the stream, in
        sampling order (the reference's stream), then one copy to the device table."""
        if self._z_copied is not None:
            self._z_copied.synchronize()  # the last run's copy has read z_host (long done, as a rule)
        for i, noisy in enumerate(self.noisy):
            if noisy and self.z_host_draw is None:
                stream.draw_into(self.z_host[i])
            elif noisy:
                self.z_host[i].copy_(stream.draw_into(self.z_host_draw))
        self.z_table.copy_(self.z_host, non_blocking=True)
        if self.z_table.is_cuda:
            self._z_copied = torch.cuda.Event()
            self._z_copied.record()

    def run(self, x: torch.Tensor, generator, cond: Conditioning = NONE) -> torch.Tensor:
        """Sample from x (already in this loop's shape, dtype and layout) with the conditioning
        `cond` (of this loop's signature) and the noise of `generator` (a generator, a list of
        them, a NoiseStream or None; of this loop's noise device and dtype). No host sync."""
        stream = NoiseStream.of(generator)
        dev = self.x_buf.device
        self._load(x)
        copy_into(self.kwargs, cond.kwargs)
        if self.guide is not None:
            self.guide.set_scale(cond.guidance)
        self._reset()
        source = None
        if self.gen is not None:  # the graphs draw from self.gen: it takes the caller's state
            source = stream.generator_or_default(dev)
            self.gen.set_state(source.get_state())
        if self.z_host is not None:
            self._draw_noise_table(stream)
        if self.seed is not None:
            self.seed.copy_(philox_seed(stream.generator_or_default(dev), dev))
        if not self.graphs:  # not captured (emulated): the same steps, launched one by one
            self._prologue()
            for i in range(self.plan.steps):
                self.one_step(self.noisy[i])
        elif self.mode == "loop":
            self.graphs["loop"].replay()
        else:
            if "prologue" in self.graphs:
                self.graphs["prologue"].replay()
            for i in range(self.plan.steps):
                self.graphs[self.noisy[i]].replay()
        if source is not None:
            source.set_state(self.gen.get_state())
        return self.x.clone()


class GraphCache:
    """Captured loops of one sampler, least recently used dropped first.

    capture=False keeps the loops uncaptured (cuda_graph="emulate"): the same buffers and
    kernels, the steps launched one by one, on any device."""

    def __init__(self, size: int, mode: str = "step", capture: bool = True):
        if mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, got {mode!r}")
        self.size = size
        self.mode = mode
        self.capture = capture
        self._entries: "OrderedDict[tuple, CapturedLoop]" = OrderedDict()
        self._pool = None
        self.disabled_reason: Optional[str] = None

    def key(self, spec: StepSpec, x: torch.Tensor, cond: Conditioning = NONE, noise_device: Optional[torch.device] = None, noise_dtype: torch.dtype = torch.float32) -> tuple:
        fmt = "channels_last" if (x.dim() == 4 and not x.is_contiguous()) else "contiguous"
        return (tuple(x.shape), x.dtype, fmt, x.device, spec, signature(cond), noise_device, noise_dtype)

    def __len__(self) -> int:
        return len(self._entries)

    def run(self, spec: StepSpec, prepared_model, x: torch.Tensor, generator, cond: Conditioning = NONE):
        """The result, or None when the caller should run the eager loop instead.

        prepared_model(device): the model as the sampler runs it there (made on first need)."""
        if self.disabled_reason is not None:
            return None
        stream = NoiseStream.of(generator)
        noise_device = foreign_noise_device(stream, x.device)
        key = self.key(spec, x, cond, noise_device, stream.dtype)
        entry = self._entries.get(key)
        if entry is None:
            model = prepared_model(x.device)
            entry = CapturedLoop(spec, model, x, cond=cond, noise_device=noise_device, noise_dtype=stream.dtype)
            if self.capture:
                reason = self._capture(entry, x.device)
                if reason is not None:
                    self.disabled_reason = reason
                    warnings.warn(
                        f"FastSampler: the model could not be captured in a CUDA graph ({reason}); "
                        "falling back to the eager fused loop (slower at small batch). Pass cuda_graph=False to silence this.",
                        RuntimeWarning,
                        stacklevel=4,
                    )
                    return None
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry.run(x, stream, cond)

    def _capture(self, entry: CapturedLoop, device: torch.device) -> Optional[str]:
        """None once entry's graphs are captured, else why the model cannot be captured."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # the warm-up runs the steps eagerly: what fails there (an output of the wrong shape)
        # fails the eager loop too, so it is raised, not taken for a model that cannot be captured
        reason = entry.warm_up()
        if reason is not None:
            return reason
        try:
            entry.capture(self.mode, self._pool)
        except Exception as e:  # noqa: BLE001 - any failure to capture means: run eagerly
            reason = describe_error(e)
            try:
                restore_after_failed_capture(device, self._pool, entry.generators)
            except Exception as restore_error:  # noqa: BLE001 - say so, and fall back all the same
                reason += f"; and the CUDA graph state could not be restored ({type(restore_error).__name__}: {restore_error})"
        return reason
