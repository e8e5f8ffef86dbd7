"""diffusers' UNet2DModel (and UNet2DConditionModel) with its time embeddings from a table,
like LeanUNet (models/lean.py).

Per step, UNet2DModel computes the sinusoidal embedding of t, its MLP and, in every
ResnetBlock2D, SiLU and a linear projection of it: work that depends only on t. Wrapped
in a TabledUNet2D, those are one table of all S timesteps of a plan (`time_table`), made
once; each ResNet block reads its slice of the step's row as the bias of its fused
GroupNorm+SiLU. The rest of UNet2DModel.forward runs as it is (two small ops per step
remain of the time path: its broadcast of t).

Where the structure allows it: positional time embedding, no class embedding, and every
ResnetBlock2D fused by the pass (models/diffusers_compat.py) with the default time
embedding norm; for a UNet2DConditionModel (Stable Diffusion 1.x/2.x) also no added
embedding (SDXL's text-time), no timestep condition and no activation after the MLP, so
that the blocks' embedding depends on t alone. Anything else is left to run as it is.
Conditioning (encoder_hidden_states, ...) passes through forward_rows' keyword arguments.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn as nn

from .diffusers_compat import _fused_resnet_forward
from .time_tables import TimeTables


def _resnets(model):
    from diffusers.models.resnet import ResnetBlock2D

    return [m for m in model.modules() if isinstance(m, ResnetBlock2D)]


def is_tableable(model) -> bool:
    """Whether `model` is a UNet2DModel (or UNet2DConditionModel) whose time embeddings
    TabledUNet2D can make a table of."""
    if "diffusers" not in sys.modules or type(model).__name__ not in ("UNet2DModel", "UNet2DConditionModel"):
        return False
    cfg = model.config
    if getattr(cfg, "time_embedding_type", "positional") != "positional" or getattr(model, "class_embedding", None) is not None:
        return False
    if type(model).__name__ == "UNet2DConditionModel":  # the blocks' embedding must be a function of t alone
        if getattr(model, "add_embedding", None) is not None or getattr(model, "time_embed_act", None) is not None or getattr(cfg, "time_cond_proj_dim", None) is not None:
            return False
    blocks = _resnets(model)
    fused = all(getattr(b.forward, "__func__", None) is _fused_resnet_forward for b in blocks)
    return bool(blocks) and fused and all(b.time_embedding_norm == "default" and b.time_emb_proj is not None for b in blocks)


class _Returns(nn.Module):
    """Stands in for UNet2DModel's time_proj and time_embedding: the blocks read the table."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs):
        return self.value


class _Rows:
    """The time-embedding rows of the step running now, read by the wrapped ResNet blocks."""

    rows = None


class TabledUNet2D(nn.Module):
    """A fused copy of a UNet2DModel or UNet2DConditionModel (which it changes) whose time
    embeddings come from a table: forward(x, t) as the model's (returning the sample tensor), and for a loop over
    a plan `time_table(timesteps)` once, then `forward_rows(x, table[i])` per step."""

    def __init__(self, model, table_cache_size: int = 8):
        super().__init__()
        if not is_tableable(model):
            raise TypeError("TabledUNet2D takes a fused UNet2DModel or UNet2DConditionModel with positional time embeddings that depend on t alone (no class or added embedding)")
        self.unet = model
        self.config = model.config
        self.in_channels = model.config.in_channels
        self.dtype = model.dtype
        self._time_proj, self._time_embedding = model.time_proj, model.time_embedding
        self._blocks = _resnets(model)
        self._rows = _Rows()
        offset = 0
        for b in self._blocks:  # the fused forward reads its bias from the row (diffusers_compat)
            b._ddim_fast_time_rows = self._rows
            b._ddim_fast_time_slice = slice(offset, offset + b.time_emb_proj.out_features)
            offset += b.time_emb_proj.out_features
        self.table_width = offset
        dummy = torch.zeros(1, dtype=self.dtype, device=model.conv_in.weight.device)
        model.time_proj, model.time_embedding = _Returns(dummy), _Returns(dummy)
        self.register_buffer("_t0", torch.zeros((), dtype=torch.long, device=dummy.device), persistent=False)
        self._tables = TimeTables(table_cache_size)

    def time_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, table_width) fp32: every ResNet block's time-embedding bias at timesteps t (B,)."""
        emb = self._time_embedding(self._time_proj(t).to(dtype=self.dtype))
        rows = []
        for b in self._blocks:
            rows.append(b.time_emb_proj(emb if b.skip_time_act else b.nonlinearity(emb)))
        return torch.cat(rows, dim=1).float()

    def time_table(self, timesteps: Sequence[int]) -> torch.Tensor:
        """(S, table_width): row i for timesteps[i]; made once per plan (a small LRU cache)."""
        return self._tables.get(timesteps, self._t0.device, self.time_rows)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.forward_rows(x, self.time_rows(t), **model_kwargs)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """The model at x with time-embedding rows: (table_width,) for the batch or (B, table_width);
        model_kwargs (a UNet2DConditionModel's encoder_hidden_states, ...) go to the model."""
        self._rows.rows = rows
        try:
            out = self.unet(x, self._t0, **model_kwargs)
            return out[0] if isinstance(out, tuple) else out.sample  # return_dict=False: a tuple
        finally:
            self._rows.rows = None


__all__ = ["TabledUNet2D", "is_tableable"]
