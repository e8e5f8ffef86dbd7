"""Conditioning and classifier-free guidance, shared by both samplers.

    sampler.sample(x_T, model_kwargs={"class_labels": y})                  # model(x, t, class_labels=y)
    sampler.sample(x_T, model_kwargs={"encoder_hidden_states": c},
                   guidance_scale=7.5, uncond_kwargs={"encoder_hidden_states": u})

`model_kwargs` go to every model call as keyword arguments. Tensors in them (also inside
nested dicts, such as diffusers' added_cond_kwargs) are per sample: batched along dim 0
with x. Other values pass through as they are.

With `guidance_scale` w and `uncond_kwargs` (classifier-free guidance, Ho & Salimans
2022): each step makes one model call on the doubled batch [x, x] with the kwargs
[uncond, cond] (the unconditional half first, as diffusers does) and combines the two
halves of the output as ε = ε_u + w·(ε_c − ε_u). `guidance_rescale` φ (Lin et al. 2023,
as diffusers' rescale_noise_cfg defines it) then rescales ε towards the conditional
output's per-sample standard deviation: ε ← φ·ε·std(ε_c)/std(ε) + (1 − φ)·ε.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, NamedTuple, Optional

import torch


class Conditioning(NamedTuple):
    """What a sampler passes to the model, checked and batched.

    kwargs: the keyword arguments of every model call, at the model's batch (2B when
    guided: uncond then cond), or {} without conditioning. guidance: w, or None.
    rescale: φ (0: none). batch: B, x's batch.
    """

    kwargs: dict
    guidance: Optional[float]
    rescale: float
    batch: int

    @property
    def guided(self) -> bool:
        return self.guidance is not None


NONE = Conditioning({}, None, 0.0, 0)


def _leaves(value, path: str):
    """(path, tensor) of every tensor in a kwargs value, nested dicts included."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, f"{path}[{k!r}]")


def _check_kwargs(kwargs, name: str, batch: int, device: torch.device) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments for the model, got {type(kwargs).__name__}")
    for k in kwargs:
        if not isinstance(k, str):
            raise TypeError(f"{name}: keys must be argument names (str), got {k!r}")
        if k in ("x", "t", "sample", "timestep"):
            raise ValueError(f"{name}: {k!r} is the sampler's own argument to the model; pass the other arguments only")
    for path, t in _leaves(kwargs, name):
        if t.dim() == 0 or t.shape[0] != batch:
            got = "a scalar" if t.dim() == 0 else f"batch {t.shape[0]} (shape {tuple(t.shape)})"
            raise ValueError(f"{path} must be batched with x along dim 0 (batch {batch}), got {got}")
        if t.device != device:
            raise ValueError(f"{path} is on {t.device} but x is on {device}; move it")
    return dict(kwargs)


def _same_structure(cond, uncond, path: str) -> None:
    if isinstance(cond, Mapping) != isinstance(uncond, Mapping) or isinstance(cond, torch.Tensor) != isinstance(uncond, torch.Tensor):
        raise ValueError(f"uncond_kwargs{path} is a {type(uncond).__name__} but model_kwargs{path} is a {type(cond).__name__}")
    if isinstance(cond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(f"uncond_kwargs{path} must have model_kwargs{path}'s keys {sorted(cond)}, got {sorted(uncond)}")
        for k in cond:
            _same_structure(cond[k], uncond[k], f"{path}[{k!r}]")
    elif isinstance(cond, torch.Tensor):
        if cond.shape != uncond.shape or cond.dtype != uncond.dtype:
            raise ValueError(f"uncond_kwargs{path} must have model_kwargs{path}'s shape {tuple(cond.shape)} and dtype {cond.dtype}, got {tuple(uncond.shape)} {uncond.dtype}")


def _stack(uncond, cond):
    """[uncond, cond] along dim 0 for every tensor; other values from cond (the same in both, or cond's)."""
    if isinstance(cond, torch.Tensor):
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        return {k: _stack(uncond[k], cond[k]) for k in cond}
    return cond


def _check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def make_conditioning(x: torch.Tensor, model_kwargs, guidance_scale, uncond_kwargs, guidance_rescale=None) -> Conditioning:
    """Check the conditioning arguments of sample() / encode() against x and batch them."""
    batch, device = x.shape[0], x.device
    cond = _check_kwargs(model_kwargs, "model_kwargs", batch, device)
    if guidance_scale is None and uncond_kwargs is None:
        if guidance_rescale is not None:
            raise ValueError("guidance_rescale needs guidance_scale and uncond_kwargs (it rescales the guided output)")
        return Conditioning(cond, None, 0.0, batch)
    if guidance_scale is None:
        raise ValueError("uncond_kwargs given without guidance_scale: pass guidance_scale=w for classifier-free guidance")
    w = _check_scale("guidance_scale", guidance_scale)
    if uncond_kwargs is None:
        raise ValueError("guidance_scale needs uncond_kwargs, the model_kwargs of the unconditional model (e.g. the empty prompt's embeddings, or the null class label)")
    if not cond:
        raise ValueError("guidance_scale needs model_kwargs to condition on (the conditional half); got none")
    uncond = _check_kwargs(uncond_kwargs, "uncond_kwargs", batch, device)
    _same_structure(cond, uncond, "")
    rescale = 0.0
    if guidance_rescale is not None:
        rescale = _check_scale("guidance_rescale", guidance_rescale)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    return Conditioning(_stack(uncond, cond), w, rescale, batch)


def combine(out: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """The guided model output from the doubled batch's: ε_u + w·(ε_c − ε_u), rescaled when asked
    (the reference's arithmetic, in out's dtype)."""
    uncond, c = out.chunk(2)
    eps = uncond + cond.guidance * (c - uncond)
    if cond.rescale:
        dims = list(range(1, out.dim()))
        eps_rescaled = eps * (c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
        eps = cond.rescale * eps_rescaled + (1.0 - cond.rescale) * eps
    return eps



def _map_tensors(fn, value):
    """value with fn applied to every tensor in it (nested dicts included); other values as they are."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    return value


def cast_kwargs(cond: Conditioning, dtype: torch.dtype) -> Conditioning:
    """The kwargs' floating-point tensors in `dtype` (a model run in another dtype than the
    caller's, e.g. FastSampler(dtype="bf16"), needs its embeddings in that dtype)."""
    if not cond.kwargs:
        return cond
    return cond._replace(kwargs=_map_tensors(lambda t: t.to(dtype) if t.is_floating_point() else t, cond.kwargs))


def static_copy(value):
    """A copy of the kwargs with every tensor cloned: the static buffers of a captured graph."""
    return _map_tensors(torch.Tensor.clone, value)


def copy_into(dst, src) -> None:
    """Copy the tensors of `src` into the static buffers `dst` (same structure, shapes and dtypes)."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, Mapping):
        for k in dst:
            copy_into(dst[k], src[k])


def signature(cond: Conditioning) -> tuple:
    """What a captured graph bakes in: the kwargs' structure, tensor shapes and dtypes, other
    values, and whether (and how) it is guided. Not the tensors' values, nor w."""

    def sig(v):
        if isinstance(v, torch.Tensor):
            return ("tensor", tuple(v.shape), v.dtype, v.device)
        if isinstance(v, Mapping):
            return ("dict", tuple((k, sig(v[k])) for k in sorted(v)))
        return ("value", repr(v))

    return (sig(cond.kwargs), cond.guided, cond.rescale)


class GuidanceBuffers:
    """The preallocated buffers of a guided loop (no allocation per step): w as a device
    scalar (the Triton kernel reads it, so a captured graph replays any scale) and, with
    guidance_rescale, the combined output and two per-sample standard deviations."""

    def __init__(self, x: torch.Tensor, cond: Conditioning):
        self.w = torch.tensor([cond.guidance if cond.guided else 0.0], dtype=torch.float32, device=x.device)
        self.rescale = cond.rescale
        self.guidance = cond.guidance
        self.eps = torch.empty_like(x) if cond.rescale else None
        stat = (x.shape[0],) + (1,) * (x.dim() - 1)
        self.std_c = torch.empty(stat, dtype=x.dtype, device=x.device) if cond.rescale else None
        self.std_g = torch.empty(stat, dtype=x.dtype, device=x.device) if cond.rescale else None

    def set_scale(self, w: float) -> None:
        self.guidance = w
        self.w.fill_(w)

    def rescaled(self, out: torch.Tensor) -> torch.Tensor:
        """combine(out, cond) with guidance_rescale, into self.eps (out= ops only; w from the device scalar)."""
        uncond, c = out.chunk(2)
        dims = list(range(1, out.dim()))
        eps = torch.sub(c, uncond, out=self.eps)
        eps.mul_(self.w.to(eps.dtype)).add_(uncond)
        torch.std(c, dim=dims, keepdim=True, out=self.std_c)
        torch.std(eps, dim=dims, keepdim=True, out=self.std_g)
        factor = self.std_c.div_(self.std_g).mul_(self.rescale).add_(1.0 - self.rescale)  # φ·std_c/std + (1 − φ)
        return eps.mul_(factor)
