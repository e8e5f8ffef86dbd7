"""Loading UNet weights: bare state dicts and the official DDIM training checkpoints."""

from __future__ import annotations

import os

import torch


def _strip_module(state: dict) -> dict:
    """Drop the 'module.' prefix that nn.DataParallel adds to every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def extract_state_dict(obj, *, prefer_ema: bool = True, source: str = "checkpoint") -> dict:
    """The model's state dict from what torch.load returned.

    Takes a bare state dict; the official training checkpoint, a list
    [model state ('module.' keys), optimizer state, epoch, step, ema state] (the EMA
    weights when present and prefer_ema); or a dict with "ema", "state_dict" or "model".
    """
    if isinstance(obj, (list, tuple)):
        if not obj or not isinstance(obj[0], dict):
            raise ValueError(f"{source}: a checkpoint list must start with the model's state dict, got {type(obj[0]).__name__ if obj else 'an empty list'}")
        state = obj[0]
        if prefer_ema and len(obj) >= 5 and isinstance(obj[4], dict) and obj[4]:
            state = obj[4]  # the official EMAHelper.state_dict(): the shadow weights, 'module.' keys
        return _strip_module(dict(state))
    if isinstance(obj, dict):
        for key in (("ema", "state_dict", "model") if prefer_ema else ("state_dict", "model", "ema")):
            if key in obj and isinstance(obj[key], dict):
                return _strip_module(dict(obj[key]))
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _strip_module(dict(obj))
    raise ValueError(f"{source}: not a state dict nor an official checkpoint list (got {type(obj).__name__})")


def load_state_dict(path, *, map_location="cpu", prefer_ema: bool = True) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    return extract_state_dict(obj, prefer_ema=prefer_ema, source=str(path))
