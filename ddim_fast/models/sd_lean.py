"""Stable Diffusion's UNet, lean: diffusers' UNet2DConditionModel (SD 1.x, 2.x, SDXL)
rewritten for sampling like LeanUNet (models/lean.py) rewrites ours, the same function in
fewer, fatter ops and one layout.

- channels_last from conv_in to conv_out: the transformer blocks read and write NHWC
  (models/sd_transformer.py), so no op sees an NCHW activation;
- nothing per step that depends only on t: the time embedding and every ResNet block's
  projection of it are one table per plan (`time_table`), a row per step;
- nothing per step that depends only on the prompt: every cross-attention's K and V are
  one GEMM of encoder_hidden_states per sample(), and SDXL's added text/time embedding
  joins the time embedding in a per-sample table, both made by `run_inputs` before the
  steps (on CUDA inside the captured graphs, so a new prompt replays without recapture);
- ResNet blocks as LeanUNet's: GroupNorm (+ SiLU) with the time bias in one kernel, the
  residual add that ends a block formed by the next GroupNorm, a 1x1 shortcut and its
  residual add as one addmm; nearest upsampling and its 3x3 conv as one 4x4 stride-2
  transposed conv.

PEFT LoRA layers (load_lora_weights, add_adapter) are folded into plain layers first
(models/lora.py `merged_view`), so a UNet with LoRA adapters runs lean too. `lean_source(unet)`
gives that view, or says why the UNet does not fit (a custom attention processor, a LoRA
variant such as DoRA, FreeU, ControlNet-style block types, ...); it then runs as TabledUNet2D
(models/diffusers_lean.py), with the note. The weights are copies in the sampling dtype and
layout: a later change to the UNet's weights (a LoRA switch, fuse_lora, a training step)
reaches them through `refresh(unet)`, which copies the new ones into the same storages.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lean import _Norm, _ResBlock, _Up, _arithmetic_dtype, _copy, _formed, deferred_copies, fill_copy
from .lora import merged_view
from .sd_transformer import CrossKV, _Transformer, transformer_refusal
from .time_tables import TimeTables

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = "UNetMidBlock2DCrossAttn"
_CALL_KWARGS = ("encoder_hidden_states", "added_cond_kwargs")


def lean_refusal(unet) -> Optional[str]:
    """Why `unet` cannot run as a LeanConditionUNet, in one line (None when it can)."""
    if "diffusers" not in sys.modules or type(unet).__name__ != "UNet2DConditionModel":
        return f"{type(unet).__name__} is not diffusers' UNet2DConditionModel"
    cfg = unet.config
    if "forward" in unet.__dict__:
        return "its forward is replaced"
    if type(unet.time_proj).__name__ != "Timesteps" or unet.class_embedding is not None or unet.time_embed_act is not None:
        return "a time embedding that is not positional, or a class embedding, or an activation after the MLP"
    te = unet.time_embedding
    if te.cond_proj is not None or te.post_act is not None or type(te.act) is not nn.SiLU:
        return "a time embedding with a condition projection or another activation"
    if cfg.addition_embed_type not in (None, "text_time") or unet.encoder_hid_proj is not None or getattr(unet, "position_net", None) is not None:
        return f"addition_embed_type={cfg.addition_embed_type!r}, an encoder_hid_proj or GLIGEN"
    if cfg.center_input_sample or unet.conv_norm_out is None or type(unet.conv_act) is not nn.SiLU:
        return "center_input_sample, or an output head other than GroupNorm + SiLU"
    if type(unet.mid_block).__name__ != _MID or any(type(b).__name__ not in _DOWN for b in unet.down_blocks) or any(type(b).__name__ not in _UP for b in unet.up_blocks):
        return "block types other than SD's (CrossAttn)Down/UpBlock2D and UNetMidBlock2DCrossAttn"
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    if any("forward" in b.__dict__ for b in blocks) or any(all(getattr(b, k, None) is not None for k in ("s1", "s2", "b1", "b2")) for b in unet.up_blocks):
        return "a replaced block forward, or FreeU"
    for block in blocks:
        for resnet in block.resnets:
            reason = _resnet_refusal(resnet)
            if reason is not None:
                return reason
        for t2d in getattr(block, "attentions", []):
            reason = transformer_refusal(t2d)
            if reason is not None:
                return reason
        for down in getattr(block, "downsamplers", None) or []:
            if type(down).__name__ != "Downsample2D" or not down.use_conv or down.norm is not None or type(down.conv) is not nn.Conv2d:
                return "a downsampler that is not a strided convolution"
        for up in getattr(block, "upsamplers", None) or []:
            if type(up).__name__ != "Upsample2D" or not up.use_conv or up.use_conv_transpose or not up.interpolate or up.norm is not None or type(up.conv) is not nn.Conv2d or up.conv.kernel_size != (3, 3):
                return "an upsampler that is not nearest x2 then a 3x3 convolution"
    widths = {layer.attn2.to_k.in_features for t2d in _transformers(unet) for layer in t2d.transformer_blocks}
    if len(widths) > 1:
        return f"cross-attention over contexts of different widths {sorted(widths)}"
    return None


def lean_source(unet) -> tuple:
    """(what a LeanConditionUNet of `unet` is built from: unet with its LoRA layers folded, why
    unet does not run lean or None)."""
    source, note = merged_view(unet)
    if note is None:
        note = lean_refusal(source)
    if note is None and unet.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in unet.modules()):
        note = "it is in training mode, with dropout"
    return source, note


def _resnet_refusal(resnet) -> Optional[str]:
    if type(resnet).__name__ != "ResnetBlock2D" or "forward" in resnet.__dict__:
        return f"a ResNet block of type {type(resnet).__name__}"
    if resnet.time_embedding_norm != "default" or resnet.output_scale_factor != 1.0 or resnet.up or resnet.down or resnet.skip_time_act:
        return f"a ResNet block with time_embedding_norm={resnet.time_embedding_norm!r}, a rescaled output or its own resampling"
    if type(resnet.nonlinearity) is not nn.SiLU or any(type(n) is not nn.GroupNorm or not n.affine for n in (resnet.norm1, resnet.norm2)):
        return "a ResNet block with another activation or norm"
    convs = [resnet.conv1, resnet.conv2] + ([resnet.conv_shortcut] if resnet.conv_shortcut is not None else [])
    if type(resnet.time_emb_proj) is not nn.Linear or any(type(c) is not nn.Conv2d or c.bias is None for c in convs):
        return "a ResNet block with LoRA layers or convolutions without bias"
    if resnet.conv_shortcut is not None and resnet.conv_shortcut.kernel_size != (1, 1):
        return "a ResNet block with a 3x3 shortcut"
    return None


def _transformers(unet) -> list:
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    return [t2d for b in blocks for t2d in getattr(b, "attentions", [])]


def _official(resnet) -> SimpleNamespace:
    """A diffusers ResnetBlock2D under the names of ours, for lean._ResBlock."""
    return SimpleNamespace(norm1=resnet.norm1, conv1=resnet.conv1, norm2=resnet.norm2, conv2=resnet.conv2, in_channels=resnet.in_channels, out_channels=resnet.out_channels, use_conv_shortcut=False, nin_shortcut=resnet.conv_shortcut)


class _Down2D(nn.Module):
    def __init__(self, down, dtype, memory_format):
        super().__init__()
        self.pad = down.padding  # 0: diffusers pads (0, 1, 0, 1) first, as the official UNet
        self.register_buffer("w", _copy(down.conv.weight, dtype, memory_format))
        self.register_buffer("b", _copy(down.conv.bias, dtype))

    def run(self, x):
        if self.pad == 0:
            return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.w, self.b, stride=2)
        return F.conv2d(x, self.w, self.b, stride=2, padding=self.pad)


class _Linear(nn.Module):
    def __init__(self, linear: nn.Linear, dtype):
        super().__init__()
        self.register_buffer("weight", _copy(linear.weight, dtype))
        self.register_buffer("bias", _copy(linear.bias, dtype))

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)


class _Embedding(nn.Module):
    """diffusers' TimestepEmbedding: linear, SiLU, linear."""

    def __init__(self, embedding, dtype):
        super().__init__()
        self.linear_1, self.linear_2 = _Linear(embedding.linear_1, dtype), _Linear(embedding.linear_2, dtype)

    def __call__(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class LeanConditionUNet(nn.Module):
    """The sampling form of a UNet2DConditionModel: `time_table(timesteps)` once per plan,
    `run_inputs(table, kwargs)` once per sample(), then `forward_rows(x, table[i], **run_kwargs)`
    per step; forward(x, t, encoder_hidden_states, added_cond_kwargs=None) as the model's
    (returning the sample tensor). Sampling only: no autograd, eval mode."""

    @torch.no_grad()
    def __init__(self, unet, dtype: torch.dtype, channels_last: bool = True, table_cache_size: int = 8):
        super().__init__()
        reason = lean_refusal(unet)
        if reason is not None:
            raise TypeError(f"LeanConditionUNet: {reason}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype, self.memory_format = dtype, fmt
        self.config = unet.config
        self.in_channels = unet.config.in_channels
        self.time_proj = unet.time_proj  # sinusoids, no weights
        self.time_embedding = _Embedding(unet.time_embedding, dtype)
        self.text_time = unet.config.addition_embed_type == "text_time"
        if self.text_time:  # SDXL: text_embeds and time_ids, embedded and added to the time embedding
            self.add_time_proj = unet.add_time_proj
            self.add_embedding = _Embedding(unet.add_embedding, dtype)
        projections, cross = [], []

        def resnet(block):
            projections.append(block.time_emb_proj)
            return _ResBlock(_official(block), sum(p.out_features for p in projections[:-1]), dtype, fmt)

        def transformer(t2d):
            lean = _Transformer(t2d, dtype, first_kv=len(cross))
            cross.extend(layer.attn2 for layer in t2d.transformer_blocks)
            return lean

        def level(block):
            m = nn.Module()
            m.resnets = nn.ModuleList()
            m.attentions = nn.ModuleList()
            for i, r in enumerate(block.resnets):
                m.resnets.append(resnet(r))
                if hasattr(block, "attentions"):
                    m.attentions.append(transformer(block.attentions[i]))
            downs, ups = getattr(block, "downsamplers", None), getattr(block, "upsamplers", None)
            m.down = _Down2D(downs[0], dtype, fmt) if downs else None
            m.up = _Up(SimpleNamespace(with_conv=True, conv=ups[0].conv), dtype, fmt) if ups else None
            return m

        self.register_buffer("conv_in_w", _copy(unet.conv_in.weight, dtype, fmt))
        self.register_buffer("conv_in_b", _copy(unet.conv_in.bias, dtype))
        self.conv_in_pad = unet.conv_in.padding
        self.down = nn.ModuleList([level(b) for b in unet.down_blocks])
        mid = unet.mid_block
        self.mid_resnets = nn.ModuleList([resnet(mid.resnets[0])])
        self.mid_attentions = nn.ModuleList()
        for t2d, r in zip(mid.attentions, mid.resnets[1:]):
            self.mid_attentions.append(transformer(t2d))
            self.mid_resnets.append(resnet(r))
        self.up = nn.ModuleList([level(b) for b in unet.up_blocks])
        self.norm_out = _Norm(unet.conv_norm_out, dtype)
        self.register_buffer("conv_out_w", _copy(unet.conv_out.weight, dtype, fmt))
        self.register_buffer("conv_out_b", _copy(unet.conv_out.bias, dtype))
        self.conv_out_pad = unet.conv_out.padding
        # every block's time projection as one matrix: one linear gives a row of all their biases
        self.register_buffer("proj_w", _copy([p.weight for p in projections], dtype))
        self.register_buffer("proj_b", _copy([p.bias for p in projections], dtype))
        self.cross_kv = CrossKV(cross, dtype)
        self.upsamplings = sum(m.up is not None for m in self.up)
        # SDXL's table holds the time embeddings; run_inputs adds each sample's and projects
        self.table_width = self.time_embedding.linear_2.weight.shape[0] if self.text_time else self.proj_w.shape[0]
        self._tables = TimeTables(table_cache_size)

    @classmethod
    def from_unet(cls, unet, *, dtype: Optional[torch.dtype] = None, channels_last: bool = True) -> "LeanConditionUNet":
        return cls(unet, dtype or unet.conv_in.weight.dtype, channels_last)

    def refresh(self, unet) -> bool:
        """Take `unet`'s weights now (its LoRA layers folded: lean_source) in place: each buffer
        copied into its own storage and each cached time table made again into its own tensor,
        so captured CUDA graphs and compiled code that read them stay valid. False, with
        nothing changed, when unet no longer runs lean or its lean form differs from this one
        in more than the values (a buffer's name, shape, dtype or device, a module's type or
        plain attributes): a new LeanConditionUNet is then needed.

        The lean form of `unet` is built with its weight copies deferred (placeholders): each
        buffer is copied from the UNet's tensors straight into its storage, so a refresh holds
        no second copy of the weights (only the folded weights of the LoRA layers, in the
        UNet's dtype, while it runs)."""
        source, note = lean_source(unet)
        if note is not None:
            return False
        channels_last = self.memory_format == torch.channels_last
        # inference mode: the sampler made these buffers inside it (inference tensors)
        with torch.inference_mode():
            with deferred_copies() as sources:
                fresh = LeanConditionUNet(source, self.dtype, channels_last=channels_last, table_cache_size=self._tables._size)
            if _structure(fresh) != _structure(self):
                return False
            fresh_buffers = dict(fresh.named_buffers(remove_duplicate=False))
            for name, buffer in self.named_buffers(remove_duplicate=False):
                fill_copy(buffer, fresh_buffers[name], sources)
            self._tables.recompute(self.conv_in_w.device, self.time_rows)
        return True

    # --- what depends on t alone, or on the prompt alone ----------------------------------------
    def time_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, table_width) at timesteps t (B,): every ResNet block's time bias in fp32 (fp64
        for fp64); for SDXL the time embedding itself, in the model's dtype."""
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))
        return emb if self.text_time else self._project(emb)

    def _project(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(emb), self.proj_w, self.proj_b).to(_arithmetic_dtype(self.dtype))

    def time_table(self, timesteps: Sequence[int]) -> torch.Tensor:
        """(S, table_width): row i for timesteps[i]; made once per plan (a small LRU cache)."""
        return self._tables.get(timesteps, self.conv_in_w.device, self.time_rows)

    def _added(self, added_cond_kwargs) -> torch.Tensor:
        """SDXL's added embedding (B, D) of text_embeds (B, E) and time_ids (B, k)."""
        if not isinstance(added_cond_kwargs, dict) or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("LeanConditionUNet: this SDXL UNet needs added_cond_kwargs={'text_embeds': ..., 'time_ids': ...}")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(self.dtype))

    def run_inputs(self, table: torch.Tensor, kwargs: dict) -> tuple:
        """(the table the steps read, the keyword arguments of every forward_rows) from a plan's
        table and the model call's kwargs: the prompt's K and V for every cross-attention, and
        for SDXL a (S, B, width) table of time and added embeddings projected. Once per run."""
        unknown = sorted(set(kwargs) - set(_CALL_KWARGS))
        if unknown:
            raise TypeError(f"LeanConditionUNet takes encoder_hidden_states and added_cond_kwargs, got {unknown}; lean=False runs the model with them")
        if kwargs.get("encoder_hidden_states") is None:
            raise ValueError("LeanConditionUNet: encoder_hidden_states is required")
        kv = self.cross_kv.pairs(kwargs["encoder_hidden_states"])
        if self.text_time:
            table = self._project(table[:, None, :] + self._added(kwargs.get("added_cond_kwargs"))[None])
        elif kwargs.get("added_cond_kwargs"):
            raise ValueError("LeanConditionUNet: added_cond_kwargs given, but this UNet has no added embedding")
        return table, {"kv": kv}

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states=None, added_cond_kwargs=None) -> torch.Tensor:
        """The UNet's forward(x, t, encoder_hidden_states[, added_cond_kwargs]).sample; t: (B,) or a scalar."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        kwargs = {"encoder_hidden_states": encoder_hidden_states}
        if added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = added_cond_kwargs
        rows = self.time_rows(t)
        table, run_kwargs = self.run_inputs(rows, kwargs)
        # SDXL: the rows of all B timesteps for all B samples; sample b's is at (b, b)
        rows = table.diagonal(dim1=0, dim2=1).t() if self.text_time else table
        return self.forward_rows(x, rows, **run_kwargs)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, kv: list) -> torch.Tensor:
        """The UNet at x (B, C, H, W, in this model's dtype and layout) with time rows
        ((table_width,) for the batch or (B, table_width)) and the prompt's K and V (run_inputs)."""
        scale = 2**self.upsamplings
        if x.dim() != 4 or x.shape[2] % scale or x.shape[3] % scale:
            raise ValueError(f"LeanConditionUNet: x must be (B, C, H, W) with H and W multiples of {scale}, got {tuple(x.shape)}; lean=False runs other sizes")
        hs = [F.conv2d(x, self.conv_in_w, self.conv_in_b, padding=self.conv_in_pad)]
        for level in self.down:
            for i, block in enumerate(level.resnets):
                h = block.run(hs[-1], rows)
                if len(level.attentions) > 0:
                    h = level.attentions[i].run(h, kv)
                hs.append(h)
            if level.down is not None:
                hs.append(level.down.run(_formed(hs[-1])))
        h = self.mid_resnets[0].run(hs[-1], rows)
        for attn, block in zip(self.mid_attentions, self.mid_resnets[1:]):
            h = block.run(attn.run(h, kv), rows)
        for level in self.up:
            for i, block in enumerate(level.resnets):
                h = block.run(torch.cat([_formed(h), _formed(hs.pop())], dim=1), rows)
                if len(level.attentions) > 0:
                    h = level.attentions[i].run(h, kv)
            if level.up is not None:
                h = level.up.run(_formed(h))
        _, y = self.norm_out.run(h, silu=True)
        return F.conv2d(y, self.conv_out_w, self.conv_out_b, padding=self.conv_out_pad)

    @property
    def fused_sites(self) -> int:
        """GroupNorm+SiLU pairs that run as one kernel (two per ResNet block, and the head)."""
        return 2 * sum(isinstance(m, _ResBlock) for m in self.modules()) + 1

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, memory_format={self.memory_format}, table_width={self.table_width}, text_time={self.text_time}"


# what a module's plain attributes may hold that a refresh compares (heads, eps, padding, slices)
_PLAIN_TYPES = (type(None), bool, int, float, str, slice, torch.dtype, torch.memory_format)


def _plain_attributes(module: nn.Module) -> tuple:
    """The module's public attributes of plain values (tuples and lists of them included)."""
    plain = []
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        if all(isinstance(item, _PLAIN_TYPES) for item in items):
            plain.append((key, tuple(value) if isinstance(value, list) else value))
    return tuple(plain)


def _structure(model: nn.Module) -> tuple:
    """What a copy of buffer values cannot change: every module's name, type and plain
    attributes, and every buffer's name, shape, dtype and device."""
    modules = tuple((name, type(m).__qualname__, _plain_attributes(m)) for name, m in model.named_modules(remove_duplicate=False))
    buffers = tuple((name, tuple(b.shape), b.dtype, b.device) for name, b in model.named_buffers(remove_duplicate=False))
    return modules, buffers


__all__ = ["LeanConditionUNet", "lean_refusal", "lean_source"]
