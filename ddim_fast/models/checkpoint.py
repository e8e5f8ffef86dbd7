"""Loading UNet weights: bare state dicts and the official DDIM training checkpoints."""

from __future__ import annotations

import os

import torch

from .presets import PRESETS


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


def infer_config(state: dict) -> dict:
    """The UNet config of an official-layout state dict, read off its key shapes.

    Channels, multipliers, blocks per level and which levels have attention come from
    the weights; the resolution does not (convolutions do not depend on it), so it comes
    from the official preset with the same structure. Raises ValueError when no preset
    matches; pass config= then.
    """
    try:
        ch = state["conv_in.weight"].shape[0]
        in_channels = state["conv_in.weight"].shape[1]
        out_ch = state["conv_out.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an official-layout UNet state dict: no {e.args[0]!r} key") from None
    levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("down."))
    blocks = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("down.0.block."))
    ch_mult = tuple(state[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    attn_levels = tuple(i for i in range(levels) if f"down.{i}.attn.0.q.weight" in state)
    structure = (ch, in_channels, out_ch, ch_mult, blocks)
    for name, cfg in PRESETS.items():
        res = cfg["resolution"]
        preset_attn = tuple(i for i in range(len(cfg["ch_mult"])) if res // 2**i in cfg["attn_resolutions"])
        if (cfg["ch"], cfg["in_channels"], cfg["out_ch"], tuple(cfg["ch_mult"]), cfg["num_res_blocks"]) == structure and preset_attn == attn_levels:
            return dict(cfg)
    raise ValueError(
        f"the checkpoint's UNet (ch={ch}, ch_mult={ch_mult}, num_res_blocks={blocks}, in/out channels {in_channels}/{out_ch}, "
        f"attention at levels {attn_levels}) matches none of the presets {tuple(PRESETS)}; pass config= (a preset name or the official config)"
    )


def describe_mismatch(model, state: dict) -> str:
    """Missing, unexpected and differently shaped keys, a few of each."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    parts = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:5])}{more}")
    return "; ".join(parts)
