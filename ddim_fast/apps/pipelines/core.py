"""What the fast pipelines (ddim, stable_diffusion, stable_diffusion_xl) share: the call's
arguments bound as the pipeline binds them, the fallback to the pipeline's own call, the
samplers per (schedule, grid, η) sharing one prepared UNet, and the watch on its weights."""

from __future__ import annotations

import inspect
import numbers
import warnings
from collections import OrderedDict
from typing import Optional

import torch

from ...core.diffusers_config import SUPPORTED_SCHEDULERS
from ...core.schedule import Schedule
from ...sampling import FastSampler
from ...sampling.noise import NoiseStream

SAMPLER_CACHE_SIZE = 8
SWITCH_LINE = "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
# the solvers whose schedulers keep the latents in the variance-exploding frame x sqrt(1 + σ²)
SIGMA_FRAME_SOLVERS = ("euler", "euler_ancestral")


def check_scheduler(scheduler, supported: tuple = SUPPORTED_SCHEDULERS) -> None:
    name = type(scheduler).__name__
    if name not in supported:
        raise ValueError(f"the pipeline's scheduler is a {name}; ddim_fast.accelerate runs {', '.join(supported)} there. Switch it first: {SWITCH_LINE}")


def diffusers_draws(solver: str, eta, steps: int) -> int:
    """How many step-noise draws diffusers' scheduler.step makes in a run of `steps` steps:
    DDIMScheduler one per step for η > 0 (at σ = 0 too), EulerAncestralDiscreteScheduler one
    per step (at σ_up = 0 too), LCMScheduler one per step but the last, the ODE solvers none."""
    if solver == "ddim":
        return steps if eta > 0 else 0
    if solver == "euler_ancestral":
        return steps
    if solver == "lcm":
        return steps - 1
    return 0


def frame_scales(sampler: FastSampler) -> tuple:
    """(into the sampler's frame, back into the scheduler's): diffusers' Euler schedulers keep
    x sqrt(1 + σ²) = x / sqrt(ᾱ), so their latents are divided by sqrt(1 + σ_0²) before the loop
    and multiplied by sqrt(1 + σ_S²) after it (1 when the run ends at σ = 0)."""
    if sampler.options.solver not in SIGMA_FRAME_SOLVERS:
        return 1.0, 1.0
    alphas = sampler.options.levels.alphas
    return alphas[0] ** 0.5, alphas[-1] ** -0.5


# --- what a call may hold -------------------------------------------------------------------


def guided_call_refusal(pipe, values: dict) -> Optional[str]:
    """Why a text-to-image call of pipe (SD, SDXL) is not covered by its guided fast loop, or
    None: a UNet with a guidance embedding, or a guidance_rescale above 1."""
    if pipe.unet.config.time_cond_proj_dim is not None:
        return "a UNet with a guidance embedding (unet.config.time_cond_proj_dim) is not covered"
    rescale = values.get("guidance_rescale", 0.0)
    if values["guidance_scale"] > 1 and isinstance(rescale, numbers.Real) and rescale > 1:
        return f"guidance_rescale={rescale!r} above 1 is not covered"
    return None


def prompt_batch_size(values: dict) -> int:
    """The prompts' batch as the SD pipelines count it: one for a string, the list's length,
    else the prompt embeddings' first dimension."""
    prompt = values["prompt"]
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return values["prompt_embeds"].shape[0]


def _bound_arguments(pipe, args, kwargs) -> tuple:
    """(every argument of pipe.__call__ with its value, the names given a value other than the
    default, the extra **kwargs)."""
    signature = inspect.signature(type(pipe).__call__)
    bound = signature.bind(pipe, *args, **kwargs)
    extra = {}
    given = set()
    for name, value in bound.arguments.items():
        parameter = signature.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(value)
        elif name != "self" and not _same(value, parameter.default):
            given.add(name)
    bound.apply_defaults()
    values = {k: v for k, v in bound.arguments.items() if k != "self" and signature.parameters[k].kind is not inspect.Parameter.VAR_KEYWORD}
    return values, given, extra


def _same(value, default) -> bool:
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - an object without a plain equality is not the default
        return False


# --- a fingerprint of the UNet's weights ------------------------------------------------------

_SKIP = object()
_SCALARS = (type(None), bool, int, float, str)
# what every Module holds (parameter and hook dicts), but for its training flag
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}


def _plain(value):
    """value as a hashable of plain Python values, or _SKIP for anything else."""
    if type(value) in _SCALARS:
        return value
    if isinstance(value, (list, tuple)):
        items = tuple(_plain(v) for v in value)
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict):
        items = tuple((str(k), _plain(v)) for k, v in value.items())
        return _SKIP if any(v is _SKIP for _, v in items) else tuple(sorted(items))
    return _SKIP


def _module_state(module: torch.nn.Module) -> tuple:
    """A module's plain attributes (training, LoRA scales and active adapters, flags)."""
    state = []
    for key, value in vars(module).items():
        if key in _MODULE_INTERNALS:
            continue
        plain = _plain(value)
        if plain is not _SKIP:
            state.append((key, plain))
    return tuple(sorted(state))


def _float32_norms(tensors: list) -> list:
    """Each tensor's L2 norm accumulated and returned in float32: in bf16 or fp16 a norm does not
    see a change of a few elements (bf16 keeps 3 significant digits)."""
    try:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    except (TypeError, RuntimeError):  # a torch whose _foreach_norm takes no dtype
        return [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors]


class WeightsWatch:
    """Whether a module's weights changed since the last look: its module tree with their plain
    attributes, every parameter's and buffer's storage, version, shape and dtype, and with
    `content` each floating-point tensor's norm (one read of the weights, one host sync)."""

    def __init__(self, module: torch.nn.Module, content: bool = True):
        self.module = module
        self.content = content
        self._last = self.fingerprint()

    def fingerprint(self) -> tuple:
        structure = tuple((name, type(m).__qualname__, _module_state(m)) for name, m in self.module.named_modules())
        tensors = list(self.module.named_parameters()) + list(self.module.named_buffers())
        storage = tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for name, t in tensors)
        norms = None
        floating = [t.detach() for _, t in tensors if t.is_floating_point() and t.numel() > 0 and t.device.type != "meta"]
        if self.content and floating:
            with torch.no_grad():
                norms = _float32_norms(floating)
                norms = torch.stack([n.to(norms[0].device) for n in norms]).cpu().numpy().tobytes()  # one copy to the host
        return structure, storage, norms

    def changed(self) -> bool:
        """True when the fingerprint differs from the last look (which it then becomes)."""
        now = self.fingerprint()
        if now == self._last:
            return False
        self._last = now
        return True


# --- the fast pipelines -------------------------------------------------------------------------


class FastPipeline:
    """What both fast pipelines share: the fallback, the samplers per (schedule, steps, η) and
    the weights watch. Attributes it does not have are pipe's (fast.unet is pipe.unet)."""

    covered: tuple = ()
    schedulers: tuple = SUPPORTED_SCHEDULERS  # the schedulers whose loop this pipeline runs

    def __init__(self, pipe, options: dict, check_weights: bool):
        self.pipe = pipe
        self.options = dict(options)
        self.check_weights = bool(check_weights)
        self._samplers: "OrderedDict[tuple, FastSampler]" = OrderedDict()
        self._schedules: dict = {}
        self._watch = WeightsWatch(pipe.unet, self.check_weights)
        self._new_samplers()  # the options are checked here, not at the first call

    def _new_samplers(self) -> None:
        """A template sampler (never run) of pipe.unet as it is now, whose siblings, one per
        (schedule, steps, η), share one prepared model of it."""
        self._template = FastSampler(self.pipe.unet, Schedule.linear(), steps=1, **self.options)
        self._samplers.clear()

    @property
    def sampler(self) -> FastSampler:
        """The template sampler: every call's sampler shares its prepared UNet (lean_note,
        fused_sites, prepared_model(device), refresh_weights())."""
        return self._template

    def _weights_changed(self) -> None:
        """pipe.unet's weights changed (a LoRA switch, fuse_lora, a training step): the prepared
        model takes the new ones in place where it can (samplers, compiled code and captured
        graphs kept), else the samplers are made anew."""
        if not self._template.refresh_weights():
            self._new_samplers()

    def __getattr__(self, name):
        if name == "pipe":  # not yet set (copy, pickle): no recursion through pipe
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipe).__name__}, options={self.options})"

    def __call__(self, *args, **kwargs):
        values, given, extra = _bound_arguments(self.pipe, args, kwargs)
        reason = self._uncovered(values, given, extra)
        if reason is None:
            check_scheduler(self.pipe.scheduler, self.schedulers)
            values["num_inference_steps"] = _as_int(values["num_inference_steps"])
            sampler, reason = self._sampler(values, self._steps_run(values))
        if reason is not None:
            warnings.warn(f"ddim_fast.accelerate: {reason}; this call runs the original {type(self.pipe).__name__}", UserWarning, stacklevel=2)
            return self.pipe(*args, **kwargs)
        with torch.no_grad():  # as the pipeline's own call
            return self._generate(sampler, values)

    def _uncovered(self, values: dict, given: set, extra: dict) -> Optional[str]:
        """Why this call cannot run here, or None."""
        names = sorted((given - set(self.covered)) | set(extra))
        if names:
            return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not covered"
        return _offload_reason(self.pipe)

    def _steps_run(self, values: dict) -> Optional[int]:
        """How many of the grid's steps this call runs (its last ones), or None: all of them."""
        return None

    # samplers ---------------------------------------------------------------------------------
    def _schedule(self) -> tuple:
        """(Schedule, options) of pipe.scheduler's config, made once per config."""
        config = self.pipe.scheduler.config
        key = type(self.pipe.scheduler).__name__ + repr(sorted((k, repr(v)) for k, v in dict(config).items()))
        if key not in self._schedules:
            self._schedules[key] = Schedule.from_diffusers_config(self.pipe.scheduler)
        return key, *self._schedules[key]

    def _sampler(self, values: dict, run: Optional[int] = None) -> tuple:
        """(the FastSampler of this call, None), or (None, why this call falls back). The solver
        and its options come from pipe.scheduler; η from the call for DDIMScheduler alone (the
        others' step takes none: the pipelines then drop it). run: only the grid's last `run`
        steps (its `run` lowest timesteps), as an image-to-image call."""
        if self._watch.module is not self.pipe.unet:
            self._watch = WeightsWatch(self.pipe.unet, self.check_weights)
            self._new_samplers()
        elif self._watch.changed():  # the watch holds the new fingerprint already
            self._weights_changed()
        try:
            key, schedule, algorithm = self._schedule()
        except ValueError as error:  # a scheduler option the samplers do not implement
            return None, str(error)
        steps = values["num_inference_steps"]
        solver = algorithm.get("solver", "ddim")
        eta = None
        if solver == "ddim":
            eta = values.get("eta", 0.0)
            if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
                return None, f"eta={eta!r} is outside [0, 1]"
            eta = float(eta)
            off_grid = _off_grid_steps(schedule, steps, algorithm)
            if off_grid is not None:
                return None, off_grid
        if run is not None and run < 1:
            return None, f"this call runs no step of the {steps} (strength too low)"
        use_clipped_model_output = bool(values.get("use_clipped_model_output"))
        cache_key = (key, steps, eta, use_clipped_model_output, run)
        sampler = self._samplers.get(cache_key)
        if sampler is None:
            sampler = self._new_sampler(schedule, dict(algorithm, steps=steps, eta=eta, use_clipped_model_output=use_clipped_model_output), run)
            self._samplers[cache_key] = sampler
            while len(self._samplers) > SAMPLER_CACHE_SIZE:
                self._samplers.popitem(last=False)
        else:
            self._samplers.move_to_end(cache_key)
        generator = values.get("generator")
        if self.options.get("fast_rng") and isinstance(generator, list) and len(generator) > 1 and sampler.plan.noisy_steps:
            return None, "fast_rng draws the step noise from one seed, so a list of generators is not covered"
        return sampler, None

    def _new_sampler(self, schedule: Schedule, algorithm: dict, run: Optional[int]) -> FastSampler:
        steps = algorithm["steps"]
        if run is not None and run < steps:  # the grid's lowest `run` points, as an explicit grid
            grid = schedule.timesteps(steps, algorithm["skip"], steps_offset=algorithm.pop("steps_offset", 0))
            algorithm.update(skip=grid[:run], steps=run)
        return self._template.sibling(schedule, **algorithm)

    def _sample(self, sampler: FastSampler, latents: torch.Tensor, generator, **conditioning) -> torch.Tensor:
        """The denoising loop from the pipeline's latents (in its scheduler's frame, and back),
        drawing the step noise as its scheduler.step draws, behind the pipeline's progress bar
        (updated once the loop is done: no host sync inside it)."""
        steps = sampler.options.steps
        if isinstance(generator, list) and len(generator) == 1:
            generator = generator[0]  # as randn_tensor takes it
        fast_rng = self.options.get("fast_rng", False)
        if fast_rng:  # the kernel draws the step noise: the stream only seeds it
            stream = NoiseStream(generator[0] if isinstance(generator, list) else generator)
        else:
            stream = NoiseStream(generator, self.pipe.unet.dtype)
        scale_in, scale_out = frame_scales(sampler)
        with self.pipe.progress_bar(total=steps) as bar:
            sample = sampler.sample(latents * scale_in if scale_in != 1.0 else latents, generator=stream, **conditioning)
            bar.update(steps)
        if not fast_rng:  # where diffusers draws at a step that adds no noise (σ = 0), the sampler does not
            plan = sampler.plan
            for _ in range(diffusers_draws(plan.solver, sampler.options.eta, plan.steps) - plan.noisy_steps):
                stream.draw(latents.shape, latents.device)
        return sample * scale_out if scale_out != 1.0 else sample


def _as_int(value):
    """An integral value (a NumPy int, as diffusers accepts) as an int; anything else as it is,
    for the sampler to refuse with its own error."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _offload_reason(pipe) -> Optional[str]:
    """Why pipe.unet cannot run where the pipeline runs (offloaded), or None."""
    unet = pipe.unet
    if getattr(unet, "_hf_hook", None) is not None or any(p.device.type == "meta" for p in unet.parameters()):
        return "an offloaded UNet (enable_model_cpu_offload, sequential or group offloading) is not covered"
    device = next((p.device for p in unet.parameters()), None)
    execution = torch.device(pipe._execution_device)
    if device is not None and (device.type, device.index or 0) != (execution.type, execution.index or 0):
        return f"the UNet is on {device} while the pipeline runs on {execution} (offloading) and that is not covered"
    return None


def _off_grid_steps(schedule: Schedule, steps, algorithm: dict) -> Optional[str]:
    """Why DDIMScheduler with these options steps somewhere our grid does not, or None.

    DDIMScheduler steps from each t to t − T // S (α of a negative one: the final α); the
    samplers step to the grid's next point, the same for "leading" spacing and for the
    others when S divides T."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 < steps <= schedule.num_train_timesteps:
        return None  # the sampler refuses it with its own error
    grid = schedule.timesteps(steps, algorithm["skip"], steps_offset=algorithm.get("steps_offset", 0))
    ratio = schedule.num_train_timesteps // steps
    ours = [-1] + grid[:-1]
    theirs = [t - ratio if t - ratio >= 0 else -1 for t in grid]
    if ours == theirs:
        return None
    return (
        f"with timestep_spacing={algorithm['skip']!r} and {steps} steps DDIMScheduler steps from t to t - T // S = t - {ratio}, "
        "off its own grid; ddim-fast keeps to the grid and would give other images"
    )
