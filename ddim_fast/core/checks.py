"""Argument checks shared by the schedule, the samplers and the ops.

Every error names the argument, the value that came and what is allowed, as a
ValueError (a wrong value) or a TypeError (a wrong kind of value).
"""

from __future__ import annotations

import math
import numbers

PREDICTIONS = ("eps", "x0", "v")
PREDICTION_CODE = {"eps": 0, "x0": 1, "v": 2}  # the `prediction` int of the native ops
ETA_DDPM_NOISY = "ddpm_noisy"


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_num_train_timesteps(T) -> int:
    if not _is_int(T):
        raise TypeError(f"num_train_timesteps must be an int, got {type(T).__name__} {T!r}")
    if T < 1:
        raise ValueError(f"num_train_timesteps must be positive, got {T}")
    return int(T)


def check_steps(steps, T: int) -> int:
    if not _is_int(steps):
        raise TypeError(f"steps must be an int in [1, {T}], got {type(steps).__name__} {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the number of training timesteps), got {steps}")
    return int(steps)


def check_eta(eta):
    """A float in [0, 1], or the string "ddpm_noisy" (the DDPM posterior variance σ̂)."""
    if isinstance(eta, str):
        if eta == ETA_DDPM_NOISY:
            return eta
        raise ValueError(f"eta must be a number in [0, 1] or {ETA_DDPM_NOISY!r}, got {eta!r}")
    if not _is_real(eta):
        raise TypeError(f"eta must be a number in [0, 1] or {ETA_DDPM_NOISY!r}, got {type(eta).__name__} {eta!r}")
    eta = float(eta)
    if not (0.0 <= eta <= 1.0):
        # above 1, 1 - alpha_prev - sigma^2 can go negative and the update has no real solution
        raise ValueError(f"eta must be in [0, 1] (above 1 the DDIM update's square root goes negative), got {eta}")
    return eta


def check_prediction(prediction) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def check_clip(clip):
    """clip_x0 as None (no clamp) or a (lo, hi) pair of floats.

    False/None: no clamp (the official default); True: [-1, 1]; a float r > 0: [-r, r];
    a pair (lo, hi) with lo < hi: that range.
    """
    if clip is None or clip is False:
        return None
    if clip is True:
        return (-1.0, 1.0)
    if _is_real(clip):
        r = float(clip)
        if not (r > 0 and math.isfinite(r)):
            raise ValueError(f"clip_x0 as a number is the half-width r of [-r, r] and must be finite and > 0, got {clip}")
        return (-r, r)
    if isinstance(clip, (tuple, list)) and len(clip) == 2 and all(_is_real(v) for v in clip):
        lo, hi = float(clip[0]), float(clip[1])
        if not lo < hi:
            raise ValueError(f"clip_x0 range must have lo < hi, got {tuple(clip)}")
        return (lo, hi)
    raise TypeError(f"clip_x0 must be False, True, a float r (for [-r, r]) or a (lo, hi) pair, got {clip!r}")


def check_positive_int(name: str, v) -> int:
    """A count or size from a config: a plain int >= 1 (bool refused)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return v


def describe_error(error: BaseException) -> str:
    """"TypeName: the first line of its message" (the type alone when the message is empty), for
    errors that are passed on inside a one-line message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
