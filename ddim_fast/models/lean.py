"""The lean UNet: ddim_fast's UNet (models/unet.py) rewritten for sampling, the same function
in fewer, fatter ops. What one step of the official UNet dispatches that this one does not:

- nothing that depends only on t: the sinusoidal embedding, its MLP and every ResNet
  block's time-embedding projection are one table of all S timesteps of a plan, made once
  (`time_table`); a step reads its row (a view in the eager loop, one index op in a graph);
- no dropout (sampling is eval);
- GroupNorm (+ SiLU) in one kernel with the time-embedding bias in its prologue, and the
  residual add that ends a block folded into the next block's norm (ops.group_norm_act
  with a residual: the kernel writes the sum, which is still the skip);
- a 1x1 shortcut and the residual add as one addmm on the NHWC matrix views (its bias
  folded into conv2's);
- attention: q, k and v as one 1x1 convolution, then F.scaled_dot_product_attention;
- nearest upsampling and its 3x3 convolution as one 4x4 stride-2 transposed convolution
  (an exact rewrite of the weights, with 16 instead of 36 multiply-adds per input pixel).

A class-conditional UNet (num_classes) keeps its label embedding: its table holds the time
embeddings before the projections, and each step adds the labels' rows and projects (one
embedding lookup, one add, one SiLU and one linear per step).

Activations stay in one dtype and one layout (channels_last by default) from x to the
output. The weights are copies in that dtype and layout, made from the UNet's when the
lean model is built: a later change to the UNet's weights does not reach it.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops import has_native_kernel
from .unet import AttnBlock, Downsample, ResnetBlock, UNet, Upsample, get_timestep_embedding
from .time_tables import TimeTables

# nearest x2 then a 3x3 conv (padding 1) along one axis is a stride-2 transposed conv with
# 4 taps (padding 1): K = A w, K0 = w2, K1 = w1 + w2, K2 = w0 + w1, K3 = w0
_UPSAMPLE_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))


def is_lean_convertible(model) -> bool:
    """Whether `model` is ddim_fast's UNet made of its own blocks (not subclasses, no replaced
    forward), with affine GroupNorms: what LeanUNet rewrites."""
    if type(model) is not UNet or "forward" in model.__dict__:
        return False
    blocks, attns, resamplers = [model.mid.block_1, model.mid.block_2], [model.mid.attn_1], []
    for lvl in list(model.down) + list(model.up):
        blocks += list(lvl.block)
        attns += list(lvl.attn)
        resamplers += [getattr(lvl, name) for name in ("downsample", "upsample") if hasattr(lvl, name)]
    norms = [model.norm_out] + [b.norm1 for b in blocks] + [b.norm2 for b in blocks] + [a.norm for a in attns]
    return (
        all(type(b) is ResnetBlock and "forward" not in b.__dict__ for b in blocks)
        and all(type(a) is AttnBlock and "forward" not in a.__dict__ for a in attns)
        and all(type(r) in (Upsample, Downsample) for r in resamplers)
        and all(isinstance(n, nn.GroupNorm) and n.affine for n in norms)
    )


class _Sum:
    """a + b, not formed yet: the next GroupNorm forms (and writes) it in its own kernel,
    any other consumer with one add."""

    __slots__ = ("a", "b", "value")

    def __init__(self, a, b):
        self.a, self.b, self.value = a, b, None


def _formed(h):
    if isinstance(h, _Sum):
        if h.value is None:
            h.value = torch.add(h.a, h.b)
        return h.value
    return h


# The blocks below are nn.Modules for their buffers; the forward pass calls their `run`
# directly, without nn.Module.__call__'s hook handling (about a hundred calls a step).


def _arithmetic_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the GroupNorm kernels compute in: fp32, or fp64 for an fp64 model. Their
    per-channel parameters and the time-embedding table are kept in it (no cast per call)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Norm(nn.Module):
    """GroupNorm parameters in the kernels' arithmetic dtype."""

    def __init__(self, gn: nn.GroupNorm, dtype: torch.dtype):
        super().__init__()
        self.groups, self.eps = gn.num_groups, float(gn.eps)
        self.register_buffer("weight", gn.weight.detach().to(_arithmetic_dtype(dtype), copy=True))
        self.register_buffer("bias", gn.bias.detach().to(_arithmetic_dtype(dtype), copy=True))

    def run(self, h, silu: bool, add_bias=None):
        """(h formed, act(group_norm(h + add_bias))): a pending sum is formed by the kernel."""
        residual = None
        if isinstance(h, _Sum) and h.value is None:
            x, residual = h.a, h.b
        else:
            x = _formed(h)
        if (x.is_cpu or x.is_cuda) and x.dtype != torch.float64 and has_native_kernel("add_group_norm_act", "cpu" if x.is_cpu else "cuda"):
            if residual is None:
                return x, torch.ops.ddim_fast.group_norm_act(x, self.groups, self.weight, self.bias, add_bias, self.eps, silu)
            s, y = torch.ops.ddim_fast.add_group_norm_act(x, residual, self.groups, self.weight, self.bias, add_bias, self.eps, silu)
        else:
            out = ops.group_norm_act(x, self.groups, self.weight, self.bias, self.eps, silu=silu, add_bias=add_bias, residual=residual)
            if residual is None:
                return x, out
            s, y = out
        h.value = s
        return s, y


# while a deferred_copies() block runs: {id(placeholder): (placeholder, the sources it stands for)}
_DEFERRED_COPIES: contextvars.ContextVar = contextvars.ContextVar("ddim_fast_deferred_copies", default=None)


def _copy(w, dtype, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A copy of a weight in the sampling dtype (and, for conv weights, layout); `w` a tensor,
    or a list of tensors copied as their concatenation along dim 0. Inside deferred_copies()
    the copy is a placeholder of its shape, dtype and device that holds one element (a
    broadcast NaN, so that a value read from it shows), and what it stands for is recorded
    for fill_copy."""
    parts = [part.detach() for part in w] if isinstance(w, (list, tuple)) else [w.detach()]
    deferred = _DEFERRED_COPIES.get()
    if deferred is not None:
        # what torch.cat would refuse: the fill would broadcast or copy across devices instead
        if any(part.device != parts[0].device or part.shape[1:] != parts[0].shape[1:] for part in parts):
            raise ValueError(f"_copy: parts on {sorted({str(p.device) for p in parts})} of shapes {[tuple(p.shape) for p in parts]} do not concatenate")
        shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
        placeholder = torch.full((), float("nan"), dtype=dtype, device=parts[0].device).expand(shape)
        deferred[id(placeholder)] = (placeholder, parts)
        return placeholder
    whole = parts[0] if len(parts) == 1 else torch.cat(parts)
    return whole.to(dtype=dtype, memory_format=memory_format if whole.dim() == 4 else torch.contiguous_format, copy=True)


@contextlib.contextmanager
def deferred_copies():
    """Build a lean model whose weight copies are placeholders (no memory), to fill another
    lean model of the same structure in place with fill_copy: a refresh then needs no second
    copy of the weights. Yields what fill_copy reads."""
    sources: dict = {}
    token = _DEFERRED_COPIES.set(sources)
    try:
        yield sources
    finally:
        _DEFERRED_COPIES.reset(token)


def fill_copy(target: torch.Tensor, value: torch.Tensor, sources: dict) -> None:
    """target.copy_(the copy `value` stands for): a placeholder's sources, each into its rows
    (copy_ converts dtype and layout as _copy does), or `value` itself."""
    recorded = sources.get(id(value))
    if recorded is None or recorded[0] is not value:
        target.copy_(value)
        return
    offset = 0
    for part in recorded[1]:
        target[offset : offset + part.shape[0]].copy_(part)
        offset += part.shape[0]


def _nhwc_matrix(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels_last storage as the (N*H*W, C) matrix it is (a view)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _ResBlock(nn.Module):
    def __init__(self, block: ResnetBlock, temb_offset: int, dtype, memory_format):
        super().__init__()
        self.norm1, self.norm2 = _Norm(block.norm1, dtype), _Norm(block.norm2, dtype)
        self.register_buffer("w1", _copy(block.conv1.weight, dtype, memory_format))
        self.register_buffer("b1", _copy(block.conv1.bias, dtype))
        self.register_buffer("w2", _copy(block.conv2.weight, dtype, memory_format))
        b2 = block.conv2.bias.detach().double()
        self.shortcut = None  # "mm": 1x1 conv + residual add as one addmm; "conv": a 3x3 (or NCHW 1x1) conv
        if block.in_channels != block.out_channels:
            sc = block.conv_shortcut if block.use_conv_shortcut else block.nin_shortcut
            if sc.weight.shape[-1] == 1 and memory_format == torch.channels_last:
                self.shortcut = "mm"
                self.register_buffer("ws", _copy(sc.weight[:, :, 0, 0].t(), dtype))  # (Cin, Cout)
                b2 = b2 + sc.bias.detach().double()  # conv2's bias carries the shortcut's
            else:
                self.shortcut = "conv"
                self.register_buffer("ws", _copy(sc.weight, dtype, memory_format))
                self.register_buffer("bs", _copy(sc.bias, dtype))
        self.register_buffer("b2", b2.to(dtype))
        self.pad = block.conv1.padding
        self.temb = slice(temb_offset, temb_offset + block.out_channels)
        self.memory_format = memory_format

    def run(self, h, rows):
        x, y = self.norm1.run(h, silu=True)
        y = F.conv2d(y, self.w1, self.b1, padding=self.pad)
        _, y = self.norm2.run(y, silu=True, add_bias=rows[..., self.temb])
        y = F.conv2d(y, self.w2, self.b2, padding=self.pad)
        if self.shortcut == "mm":  # x @ W_s + y, written as y's NHWC matrix
            out = torch.addmm(_nhwc_matrix(y), _nhwc_matrix(x), self.ws)
            n, _, hh, ww = y.shape
            return out.view(n, hh, ww, -1).permute(0, 3, 1, 2)
        if self.shortcut == "conv":  # a 1x1 weight is both layouts: pin the output to the model's
            x = F.conv2d(x, self.ws, self.bs, padding=self.ws.shape[-1] // 2).contiguous(memory_format=self.memory_format)
        return _Sum(x, y)


class _Attn(nn.Module):
    def __init__(self, attn: AttnBlock, dtype, memory_format):
        super().__init__()
        self.norm = _Norm(attn.norm, dtype)
        self.nhwc = memory_format == torch.channels_last
        qkv_w = torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]).detach()
        self.register_buffer("w_qkv", _copy(qkv_w, dtype, memory_format))
        self.register_buffer("b_qkv", _copy(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]), dtype))
        self.register_buffer("w_proj", _copy(attn.proj_out.weight, dtype, memory_format))
        self.register_buffer("b_proj", _copy(attn.proj_out.bias, dtype))

    def run(self, h):
        x, y = self.norm.run(h, silu=False)
        n, c, hh, ww = x.shape
        qkv = F.conv2d(y, self.w_qkv, self.b_qkv)
        # (n, 1, hw, c) views of q, k, v: one head over all channels, softmax(q kᵀ / sqrt(c)) v
        flat = qkv.permute(0, 2, 3, 1).reshape(n, 1, hh * ww, 3 * c)
        a = F.scaled_dot_product_attention(flat[..., :c], flat[..., c : 2 * c], flat[..., 2 * c :])
        if self.nhwc:
            a = a.reshape(n, hh, ww, c).permute(0, 3, 1, 2)  # a view: NHWC storage
            return _Sum(x, F.conv2d(a, self.w_proj, self.b_proj))
        # an NCHW model: copies into its layout (a 1x1 weight is both layouts, so the conv
        # may answer channels_last), so that the residual sum matches x's
        a = a.transpose(2, 3).reshape(n, c, hh, ww)
        return _Sum(x, F.conv2d(a, self.w_proj, self.b_proj).contiguous())


class _Up(nn.Module):
    def __init__(self, up: Upsample, dtype, memory_format):
        super().__init__()
        self.with_conv = up.with_conv
        if self.with_conv:
            taps = torch.tensor(_UPSAMPLE_TAPS, dtype=torch.float64, device=up.conv.weight.device)
            kt = torch.einsum("ya,xb,oiab->ioyx", taps, taps, up.conv.weight.detach().double())
            # rounded now: a refresh (deferred_copies) holds it until it fills the buffer
            self.register_buffer("w", _copy(kt.to(dtype), dtype, memory_format))
            self.register_buffer("b", _copy(up.conv.bias, dtype))

    def run(self, x):
        if self.with_conv:
            return F.conv_transpose2d(x, self.w, self.b, stride=2, padding=1)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class _Down(nn.Module):
    def __init__(self, down: Downsample, dtype, memory_format):
        super().__init__()
        self.with_conv = down.with_conv
        if self.with_conv:
            self.register_buffer("w", _copy(down.conv.weight, dtype, memory_format))
            self.register_buffer("b", _copy(down.conv.bias, dtype))

    def run(self, x):
        if self.with_conv:  # the official asymmetric pad, then a stride-2 conv
            return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.w, self.b, stride=2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class LeanUNet(nn.Module):
    """The sampling form of a ddim_fast UNet: forward(x, t) as the UNet's, and for a loop
    over a plan, `time_table(timesteps)` once and then `forward_rows(x, table[i])` per step.

    Build with `LeanUNet.from_unet(unet, dtype=..., channels_last=True)`; the UNet must be
    in eval mode for sampling (dropout is dropped). Sampling only: no autograd.
    """

    @torch.no_grad()
    def __init__(self, unet: UNet, dtype: torch.dtype, channels_last: bool = True, table_cache_size: int = 8):
        super().__init__()
        if not is_lean_convertible(unet):
            raise TypeError(f"LeanUNet rewrites ddim_fast's UNet made of its own blocks, got {type(unet).__name__}")
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype, self.memory_format = dtype, fmt
        self.ch, self.resolution, self.in_channels, self.out_ch = unet.ch, unet.resolution, unet.in_channels, unet.out_ch
        self.config = dict(unet.config)
        # the time-embedding MLP, kept to make tables (in the sampling dtype, as the UNet runs it)
        self.register_buffer("temb_w0", _copy(unet.temb.dense[0].weight, dtype))
        self.register_buffer("temb_b0", _copy(unet.temb.dense[0].bias, dtype))
        self.register_buffer("temb_w1", _copy(unet.temb.dense[1].weight, dtype))
        self.register_buffer("temb_b1", _copy(unet.temb.dense[1].bias, dtype))
        self.num_classes = unet.num_classes
        if self.num_classes is not None:  # labels' rows, added to the time embedding (the last row: no label)
            self.register_buffer("class_emb", _copy(unet.class_emb.weight, dtype))
        projections = []  # every ResNet block's temb_proj, in the order the blocks are made here

        def res(block):
            projections.append(block.temb_proj)
            return _ResBlock(block, sum(p.out_features for p in projections[:-1]), dtype, fmt)

        def level(lvl, resample, kind):
            m = nn.Module()
            m.block = nn.ModuleList([res(b) for b in lvl.block])
            m.attn = nn.ModuleList([_Attn(a, dtype, fmt) for a in lvl.attn])
            m.resample = kind(resample, dtype, fmt) if resample is not None else None
            return m

        self.register_buffer("conv_in_w", _copy(unet.conv_in.weight, dtype, fmt))
        self.register_buffer("conv_in_b", _copy(unet.conv_in.bias, dtype))
        self.down = nn.ModuleList([level(lvl, getattr(lvl, "downsample", None), _Down) for lvl in unet.down])
        self.mid_block_1 = res(unet.mid.block_1)
        self.mid_attn_1 = _Attn(unet.mid.attn_1, dtype, fmt)
        self.mid_block_2 = res(unet.mid.block_2)
        self.up = nn.ModuleList([level(lvl, getattr(lvl, "upsample", None), _Up) for lvl in unet.up])
        self.norm_out = _Norm(unet.norm_out, dtype)
        self.register_buffer("conv_out_w", _copy(unet.conv_out.weight, dtype, fmt))
        self.register_buffer("conv_out_b", _copy(unet.conv_out.bias, dtype))
        # every block's projection as one matrix: one linear gives a row of all their biases
        self.register_buffer("proj_w", _copy(torch.cat([p.weight for p in projections]), dtype))
        self.register_buffer("proj_b", _copy(torch.cat([p.bias for p in projections]), dtype))
        # a conditional model's table holds the time embeddings; the projection runs per step
        self.table_width = self.proj_w.shape[0] if self.num_classes is None else self.temb_w1.shape[0]
        self._tables = TimeTables(table_cache_size)

    @classmethod
    def from_unet(cls, unet: UNet, *, dtype: Optional[torch.dtype] = None, channels_last: bool = True) -> "LeanUNet":
        return cls(unet, dtype or unet.conv_in.weight.dtype, channels_last)

    # --- time embedding -----------------------------------------------------------------
    def time_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B, table_width) at timesteps t (B,): every block's time-embedding bias, in fp32 (fp64
        for fp64); for a class-conditional model the time embedding itself, in the model's dtype."""
        emb = get_timestep_embedding(t, self.ch).to(self.dtype)
        temb = F.linear(F.silu(F.linear(emb, self.temb_w0, self.temb_b0)), self.temb_w1, self.temb_b1)
        if self.num_classes is not None:
            return temb
        return self._project(temb)

    def _project(self, temb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(temb), self.proj_w, self.proj_b).to(_arithmetic_dtype(self.dtype))

    def _conditioned(self, rows: torch.Tensor, class_labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        """A conditional model's projection rows (B, width) from time-embedding rows and labels."""
        if class_labels is None:
            return self._project(rows + self.class_emb[self.num_classes])
        if class_labels.shape != (batch,):
            raise ValueError(f"LeanUNet: class_labels must have shape ({batch},), one label per sample, got {tuple(class_labels.shape)}")
        return self._project(rows + F.embedding(class_labels, self.class_emb))

    def time_table(self, timesteps: Sequence[int]) -> torch.Tensor:
        """(S, table_width): row i for timesteps[i]; made once per plan (a small LRU cache)."""
        return self._tables.get(timesteps, self.conv_in_w.device, self.time_rows)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The UNet's forward(x, t[, class_labels]), t of shape (B,) or a scalar."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return self.forward_rows(x, self.time_rows(t), class_labels)

    def forward_rows(self, x: torch.Tensor, rows: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The UNet at x with time-embedding rows: (table_width,) shared by the batch (a row
        of time_table) or (B, table_width). x: (B, C, H, W) in this model's dtype and layout.
        class_labels: (B,) for a class-conditional model (None: the null label)."""
        if x.dim() != 4 or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"LeanUNet: x must be (B, {self.in_channels}, {self.resolution}, {self.resolution}), got {tuple(x.shape)}")
        if self.num_classes is not None:
            rows = self._conditioned(rows, class_labels, x.shape[0])
        elif class_labels is not None:
            raise ValueError("LeanUNet: class_labels given, but this UNet is not class-conditional (num_classes=None)")
        hs = [F.conv2d(x, self.conv_in_w, self.conv_in_b, padding=1)]
        for level in self.down:
            for i_block, block in enumerate(level.block):
                h = block.run(hs[-1], rows)
                if len(level.attn) > 0:
                    h = level.attn[i_block].run(h)
                hs.append(h)
            if level.resample is not None:
                hs.append(level.resample.run(_formed(hs[-1])))
        h = self.mid_block_1.run(hs[-1], rows)
        h = self.mid_attn_1.run(h)
        h = self.mid_block_2.run(h, rows)
        for level in reversed(self.up):
            for i_block, block in enumerate(level.block):
                h = block.run(torch.cat([_formed(h), _formed(hs.pop())], dim=1), rows)
                if len(level.attn) > 0:
                    h = level.attn[i_block].run(h)
            if level.resample is not None:
                h = level.resample.run(_formed(h))
        _, y = self.norm_out.run(h, silu=True)
        return F.conv2d(y, self.conv_out_w, self.conv_out_b, padding=1)

    @property
    def fused_sites(self) -> int:
        """GroupNorm+SiLU pairs that run as one kernel (two per ResNet block, and the head)."""
        return 2 * sum(isinstance(m, _ResBlock) for m in self.modules()) + 1

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, memory_format={self.memory_format}, table_width={self.table_width}"


__all__ = ["LeanUNet", "is_lean_convertible"]
