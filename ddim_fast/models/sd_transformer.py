"""The transformer blocks of Stable Diffusion's UNet (diffusers' Transformer2DModel over
BasicTransformerBlocks) as the lean SD UNet runs them (models/sd_lean.py).

The activation stays channels_last: proj_in reads the normalised NHWC activation as the
(B, HW, C) matrix it is, proj_out writes one, and the result goes back to the UNet as an
NHWC view. Per transformer layer, what diffusers' forward dispatches that this does not:

- q, k and v of self-attention as one GEMM (their weights stacked), and the heads as
  views of its output: SDPA reads them strided and writes (B, L, heads, d), which is
  the (B, L, D) matrix the output projection reads;
- cross-attention's K and V: they depend on the prompt alone, so every block's come from
  one GEMM per sample() (`CrossKV`), before the steps;
- the residual add before norm2 and norm3 (and before the next layer's norm1) and that
  LayerNorm are one kernel (ops.add_layer_norm, which writes the sum too: the next
  residual), and GEGLU's chunk, GELU and product one more (ops.geglu);
- the last feed-forward GEMM and its residual add as one addmm, its bias folded into
  proj_out's (P(h + gW) + (p + P b) is proj_out(h + gW + b));
- dropout, and the no-op `/ rescale_output_factor` (1.0).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .lean import _Norm, _Sum, _copy

_DEFAULT_PROCESSORS = ("AttnProcessor2_0",)  # diffusers' default on torch 2: SDPA, nothing else


def transformer_refusal(t2d) -> Optional[str]:
    """Why a Transformer2DModel cannot run as a _Transformer (None when it can)."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import BasicTransformerBlock, FeedForward

    if type(t2d).__name__ != "Transformer2DModel" or "forward" in t2d.__dict__:
        return f"{type(t2d).__name__} is not diffusers' Transformer2DModel"
    if not t2d.is_input_continuous or type(t2d.norm) is not nn.GroupNorm or not t2d.norm.affine:
        return "a transformer block without continuous input and an affine GroupNorm"
    for name in ("proj_in", "proj_out"):
        proj = getattr(t2d, name)
        if type(proj) not in (nn.Linear, nn.Conv2d) or proj.bias is None or (type(proj) is nn.Conv2d and proj.kernel_size != (1, 1)):
            return f"a transformer {name} that is not a 1x1 convolution or a linear with bias ({type(proj).__name__}: LoRA?)"
    for block in t2d.transformer_blocks:
        if type(block) is not BasicTransformerBlock or "forward" in block.__dict__:
            return f"a transformer layer of type {type(block).__name__}"
        if block.norm_type != "layer_norm" or block.pos_embed is not None or block.only_cross_attention or block._chunk_size is not None:
            return f"a transformer layer with norm_type={block.norm_type!r}, positional embeddings, only cross-attention or a chunked feed-forward"
        if block.attn2 is None or getattr(block, "fuser", None) is not None:
            return "a transformer layer without cross-attention, or with GLIGEN"
        for norm in (block.norm1, block.norm2, block.norm3):
            if type(norm) is not nn.LayerNorm or not norm.elementwise_affine:
                return f"a transformer layer norm of type {type(norm).__name__}"
        for attn in (block.attn1, block.attn2):
            reason = _attention_refusal(attn)
            if reason is not None:
                return reason
        ff = block.ff
        if type(ff) is not FeedForward or type(ff.net[0]) is not GEGLU or type(ff.net[0].proj) is not nn.Linear or type(ff.net[2]) is not nn.Linear:
            return "a feed-forward that is not GEGLU then a linear (LoRA, or another activation)"
        if ff.net[0].proj.bias is None or ff.net[2].bias is None:
            return "a feed-forward without biases"
    return None


def _attention_refusal(attn) -> Optional[str]:
    processor = type(attn.processor).__name__
    if processor not in _DEFAULT_PROCESSORS:
        return f"a custom attention processor ({processor})"
    for name in ("to_q", "to_k", "to_v"):
        if type(getattr(attn, name)) is not nn.Linear:
            return f"attention {name} of type {type(getattr(attn, name)).__name__} (LoRA?)"
    if type(attn.to_out[0]) is not nn.Linear or attn.to_out[0].bias is None:
        return "an attention output projection that is not a linear with bias"
    extras = (attn.group_norm, attn.spatial_norm, attn.norm_q, attn.norm_k, attn.norm_cross)
    if attn.residual_connection or attn.rescale_output_factor != 1.0 or any(e is not None for e in extras):
        return "attention with a residual connection, a rescaled output or extra norms"
    if not attn.scale_qk or attn.heads * (attn.to_q.out_features // attn.heads) != attn.to_q.out_features:
        return "attention with an unscaled q k^T or heads that do not divide its width"
    return None


class _LayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm, dtype):
        super().__init__()
        self.eps = float(norm.eps)
        self.register_buffer("weight", _copy(norm.weight, dtype))
        self.register_buffer("bias", _copy(norm.bias, dtype))

    def run(self, h):
        """(the residual, layer_norm(residual)); h: a tensor, or a pending (x, add) pair
        whose sum the kernel forms and writes."""
        if isinstance(h, tuple):
            return ops.add_layer_norm(h[1], h[0], self.weight, self.bias, self.eps)
        return h, F.layer_norm(h, self.weight.shape, self.weight, self.bias, self.eps)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, heads, L, D / heads), a view."""
    b, length, width = t.shape
    return t.view(b, length, heads, width // heads).transpose(1, 2)


def _merged(a: torch.Tensor) -> torch.Tensor:
    """SDPA's (B, heads, L, d) output -> (B, L, heads * d); a view of its (B, L, heads, d) storage."""
    b, heads, length, d = a.shape
    return a.transpose(1, 2).reshape(b, length, heads * d)


class _Layer(nn.Module):
    """One BasicTransformerBlock: self-attention, cross-attention (K, V given), GEGLU MLP."""

    def __init__(self, block, dtype):
        super().__init__()
        a1, a2, ff = block.attn1, block.attn2, block.ff
        self.heads1, self.heads2 = a1.heads, a2.heads
        self.norm1, self.norm2, self.norm3 = (_LayerNorm(n, dtype) for n in (block.norm1, block.norm2, block.norm3))
        self.register_buffer("w_qkv", _copy([a1.to_q.weight, a1.to_k.weight, a1.to_v.weight], dtype))
        qkv_bias = [p.bias for p in (a1.to_q, a1.to_k, a1.to_v)]
        self.register_buffer("b_qkv", None if all(b is None for b in qkv_bias) else _copy([b if b is not None else torch.zeros_like(p.weight[:, 0]) for b, p in zip(qkv_bias, (a1.to_q, a1.to_k, a1.to_v))], dtype))
        self.register_buffer("w_out1", _copy(a1.to_out[0].weight, dtype))
        self.register_buffer("b_out1", _copy(a1.to_out[0].bias, dtype))
        self.register_buffer("w_q2", _copy(a2.to_q.weight, dtype))
        self.register_buffer("b_q2", None if a2.to_q.bias is None else _copy(a2.to_q.bias, dtype))
        self.register_buffer("w_out2", _copy(a2.to_out[0].weight, dtype))
        self.register_buffer("b_out2", _copy(a2.to_out[0].bias, dtype))
        self.register_buffer("w_ff1", _copy(ff.net[0].proj.weight, dtype))
        self.register_buffer("b_ff1", _copy(ff.net[0].proj.bias, dtype))
        self.register_buffer("w_ff2", _copy(ff.net[2].weight, dtype))
        self.register_buffer("b_ff2", _copy(ff.net[2].bias, dtype))

    def run(self, h, key, value, last: bool):
        """h: (B, L, D) tokens, or the previous layer's pending (residual, output) pair.
        Returns the pending (residual, output) pair; for the last layer of a block the
        output lacks the feed-forward bias and the sum is formed already (see _Transformer)."""
        h, y = self.norm1.run(h)
        qkv = F.linear(y, self.w_qkv, self.b_qkv)
        q, k, v = (_heads(part, self.heads1) for part in qkv.chunk(3, dim=-1))
        attn = F.linear(_merged(F.scaled_dot_product_attention(q, k, v)), self.w_out1, self.b_out1)
        h, y = self.norm2.run((h, attn))
        q = _heads(F.linear(y, self.w_q2, self.b_q2), self.heads2)
        attn = F.linear(_merged(F.scaled_dot_product_attention(q, key, value)), self.w_out2, self.b_out2)
        h, y = self.norm3.run((h, attn))
        gated = ops.geglu(F.linear(y, self.w_ff1, self.b_ff1))
        if last:  # h + gated W2^T in one addmm; the bias b_ff2 rides in proj_out's
            width = h.shape[-1]
            return torch.addmm(h.view(-1, width), gated.view(-1, gated.shape[-1]), self.w_ff2.t()).view(h.shape)
        return h, F.linear(gated, self.w_ff2, self.b_ff2)


def _matrix(proj) -> torch.Tensor:
    """A 1x1 conv's or a linear's weight as the (out, in) matrix."""
    w = proj.weight.detach()
    return w[:, :, 0, 0] if w.dim() == 4 else w


class _Transformer(nn.Module):
    """A Transformer2DModel on NHWC activations; its cross-attention K and V come from
    CrossKV (keys `first_kv` on: one (K, V) pair per layer)."""

    def __init__(self, t2d, dtype, first_kv: int):
        super().__init__()
        self.norm = _Norm(t2d.norm, dtype)
        self.register_buffer("w_in", _copy(_matrix(t2d.proj_in), dtype))
        self.register_buffer("b_in", _copy(t2d.proj_in.bias, dtype))
        self.layers = nn.ModuleList([_Layer(b, dtype) for b in t2d.transformer_blocks])
        # proj_out(s + b_ff2) = s P^T + (p + P b_ff2): the last layer leaves its bias out
        p_out = _matrix(t2d.proj_out).double()
        last_bias = t2d.transformer_blocks[-1].ff.net[2].bias.detach().double()
        self.register_buffer("w_out", _copy(_matrix(t2d.proj_out), dtype))
        self.register_buffer("b_out", (t2d.proj_out.bias.detach().double() + p_out @ last_bias).to(dtype))
        self.kv = slice(first_kv, first_kv + len(self.layers))

    def run(self, h, kv: list) -> _Sum:
        x, y = self.norm.run(h, silu=False)
        n, c, height, width = x.shape
        tokens = F.linear(y.permute(0, 2, 3, 1).reshape(n, height * width, c), self.w_in, self.b_in)
        pairs = kv[self.kv]
        h = tokens
        for i, layer in enumerate(self.layers):
            h = layer.run(h, *pairs[i], last=i == len(self.layers) - 1)
        out = F.linear(h, self.w_out, self.b_out)  # (n, hw, c): NHWC storage
        return _Sum(x, out.view(n, height, width, c).permute(0, 3, 1, 2))


class CrossKV(nn.Module):
    """Every cross-attention's K and V projections as one matrix: one GEMM of the prompt's
    encoder_hidden_states gives them all, once per sample()."""

    def __init__(self, attentions: list, dtype):
        super().__init__()
        weights, biases, self.heads, self.widths = [], [], [], []
        for attn in attentions:
            for proj in (attn.to_k, attn.to_v):
                weights.append(proj.weight.detach())
                biases.append(proj.bias.detach() if proj.bias is not None else torch.zeros_like(proj.weight[:, 0]))
            self.heads.append(attn.heads)
            self.widths.append(attn.to_k.out_features)
        has_bias = any(a.to_k.bias is not None or a.to_v.bias is not None for a in attentions)
        self.register_buffer("weight", _copy(weights, dtype))
        self.register_buffer("bias", _copy(biases, dtype) if has_bias else None)

    def pairs(self, encoder_hidden_states: torch.Tensor) -> list:
        """[(K, V)] per cross-attention, each (B, heads, L, d): views of one GEMM's output."""
        kv = F.linear(encoder_hidden_states, self.weight, self.bias)
        out, offset = [], 0
        for heads, width in zip(self.heads, self.widths):
            out.append((_heads(kv[..., offset : offset + width], heads), _heads(kv[..., offset + width : offset + 2 * width], heads)))
            offset += 2 * width
        return out


__all__ = ["CrossKV", "transformer_refusal"]
