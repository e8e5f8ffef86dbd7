"""diffusers interoperability (optional: `pip install ddim-fast[diffusers]`).

- The fusion rules of diffusers' blocks, registered with the pass (models/fuse.py):
  ResnetBlock2D (whose one `nonlinearity` module is shared with the time embedding,
  which keeps its SiLU) and the output head (conv_norm_out -> conv_act) of UNet2DModel and
  UNet2DConditionModel (Stable Diffusion's UNet; its transformer blocks stay as they are).
- `official_to_diffusers` / `diffusers_to_official`: state-dict key mapping between the
  official DDPM/DDIM layout (our UNet) and UNet2DModel, both ways; `to_diffusers(unet)`
  and `from_diffusers(unet2d)` convert whole models.

A DDIMScheduler config becomes our Schedule and sampler options in the base layer
(`Schedule.from_diffusers_config`). Nothing here imports diffusers until it is needed.
"""

from __future__ import annotations

import re
import sys

import torch

from .fuse import FusedGroupNormSiLU, fuse_pair, register_rule, replace, replace_forward
from .unet import UNet

# --- the fusion pass for diffusers' modules -------------------------------------------------


def _is_resnet2d(m) -> bool:
    if "diffusers" not in sys.modules:  # nothing of diffusers can exist yet
        return False
    from diffusers.models.resnet import ResnetBlock2D

    return isinstance(m, ResnetBlock2D)


def _is_unet2d(m) -> bool:
    """UNet2DModel or UNet2DConditionModel with an output head (the latter's is optional)."""
    return "diffusers" in sys.modules and type(m).__name__ in ("UNet2DModel", "UNet2DConditionModel") and getattr(m, "conv_norm_out", None) is not None


def _fuse_resnet(block) -> int:
    if not isinstance(block.nonlinearity, torch.nn.SiLU) or "forward" in block.__dict__:
        return 0
    if type(block.norm1) is not torch.nn.GroupNorm or type(block.norm2) is not torch.nn.GroupNorm:
        return 0
    n = 1
    replace(block, "norm1", FusedGroupNormSiLU.from_group_norm(block.norm1))
    if block.time_embedding_norm == "default":
        replace(block, "norm2", FusedGroupNormSiLU.from_group_norm(block.norm2))
        n += 1
    # the shared `nonlinearity` stays a SiLU: the time path still needs it
    replace_forward(block, _fused_resnet_forward)
    return n


def _fuse_head(unet2d) -> int:
    return int(fuse_pair(unet2d, "conv_norm_out", "conv_act"))


register_rule(_is_resnet2d, _fuse_resnet)
register_rule(_is_unet2d, _fuse_head)


def _fused_resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward with norm1+SiLU and (bias add +) norm2+SiLU fused."""
    hidden_states = self.norm1(input_tensor)  # fused with SiLU
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    rows = self.__dict__.get("_ddim_fast_time_rows")
    if rows is not None:  # in a TabledUNet2D (models/diffusers_lean.py): this block's slice of the table row
        temb = rows.rows[..., self._ddim_fast_time_slice]
    elif self.time_emb_proj is not None and temb is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)
    if self.time_embedding_norm == "default":
        hidden_states = self.norm2(hidden_states, add_bias=temb if self.time_emb_proj is not None else None)  # fused
    else:
        if self.time_embedding_norm == "scale_shift":
            time_scale, time_shift = torch.chunk(temb[:, :, None, None], 2, dim=1)
            hidden_states = self.norm2(hidden_states) * (1 + time_scale) + time_shift
        else:
            hidden_states = self.norm2(hidden_states)
        hidden_states = self.nonlinearity(hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + hidden_states
    return out / self.output_scale_factor if self.output_scale_factor != 1 else out  # x / 1.0 is x: no op


# --- key mapping between the official layout and UNet2DModel ---------------------------------

_RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _num_levels(state: dict, prefix: str) -> int:
    return 1 + max(int(m.group(1)) for k in state for m in [re.match(prefix + r"\.(\d+)\.", k)] if m)


def official_to_diffusers(state: dict) -> dict:
    """Official (ermongroup/ddim) UNet keys -> UNet2DModel keys; 1x1 attention convs become linears."""
    levels = _num_levels(state, "down")
    out = {}
    for k, v in state.items():
        nk, attn_proj = _map_official_key(k, levels)
        if attn_proj and v.dim() == 4:
            v = v[:, :, 0, 0]
        out[nk] = v
    return out


def _map_official_key(k: str, levels: int):
    simple = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2", "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    for a, b in simple.items():
        if k.startswith(a + "."):
            return b + k[len(a):], False
    m = re.match(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)$", k)
    if m:
        side, lvl, kind, j, name, wb = m.groups()
        blk = f"down_blocks.{lvl}" if side == "down" else f"up_blocks.{levels - 1 - int(lvl)}"
        if kind == "block":
            return f"{blk}.resnets.{j}.{_RESNET[name]}.{wb}", False
        return f"{blk}.attentions.{j}.{_ATTN[name]}.{wb}", name != "norm"
    m = re.match(r"down\.(\d+)\.downsample\.conv\.(weight|bias)$", k)
    if m:
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}", False
    m = re.match(r"up\.(\d+)\.upsample\.conv\.(weight|bias)$", k)
    if m:
        return f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}", False
    m = re.match(r"mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)$", k)
    if m:
        part, name, wb = m.groups()
        if part == "attn_1":
            return f"mid_block.attentions.0.{_ATTN[name]}.{wb}", name != "norm"
        return f"mid_block.resnets.{0 if part == 'block_1' else 1}.{_RESNET[name]}.{wb}", False
    raise ValueError(f"official_to_diffusers: unexpected key {k!r} for the official UNet layout")


def diffusers_to_official(state: dict) -> dict:
    """UNet2DModel keys -> official keys (the inverse of official_to_diffusers)."""
    levels = _num_levels(state, "down_blocks")
    inverse = {}
    for k in _official_keys_like(state, levels):
        nk, attn_proj = _map_official_key(k, levels)
        inverse[nk] = (k, attn_proj)
    out = {}
    for k, v in state.items():
        if k not in inverse:
            raise ValueError(f"diffusers_to_official: key {k!r} has no counterpart in the official UNet layout")
        ok, attn_proj = inverse[k]
        out[ok] = v[:, :, None, None] if attn_proj and v.dim() == 2 else v
    return out


def _official_keys_like(state: dict, levels: int):
    """Every official key that could map onto this UNet2DModel state dict."""
    keys = ["temb.dense.0.weight", "temb.dense.0.bias", "temb.dense.1.weight", "temb.dense.1.bias", "conv_in.weight", "conv_in.bias", "norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias"]
    pat = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.")
    seen = set()
    for k in state:
        m = pat.match(k)
        if m:
            seen.add(m.groups())
    for side, blk, kind, j in seen:
        lvl = blk if side == "down" else str(levels - 1 - int(blk))
        names = _RESNET if kind == "resnets" else _ATTN
        for name in names:
            for wb in ("weight", "bias"):
                keys.append(f"{side}.{lvl}.{'block' if kind == 'resnets' else 'attn'}.{j}.{name}.{wb}")
    for i in range(levels):
        for wb in ("weight", "bias"):
            keys += [f"down.{i}.downsample.conv.{wb}", f"up.{i}.upsample.conv.{wb}"]
    for part, names in (("block_1", _RESNET), ("block_2", _RESNET), ("attn_1", _ATTN)):
        for name in names:
            for wb in ("weight", "bias"):
                keys.append(f"mid.{part}.{name}.{wb}")
    return keys


def unet2d_config(config: dict) -> dict:
    """UNet2DModel(**kwargs) equivalent to our UNet(**config) (official argument names)."""
    ch, mult = config["ch"], tuple(config["ch_mult"])
    res = config["resolution"]
    attn_levels = [res // 2**i in tuple(config["attn_resolutions"]) for i in range(len(mult))]
    if not config.get("resamp_with_conv", True):
        raise ValueError("to_diffusers: resamp_with_conv=False has no UNet2DModel equivalent here")
    return dict(
        sample_size=res,
        in_channels=config["in_channels"],
        out_channels=config["out_ch"],
        block_out_channels=tuple(ch * m for m in mult),
        layers_per_block=config["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)),
        attention_head_dim=None,  # one head over all channels, as in the official AttnBlock
        norm_num_groups=32,
        norm_eps=1e-6,
        act_fn="silu",
        flip_sin_to_cos=False,  # [sin, cos]
        freq_shift=1,  # exp(-log(10000) * i / (half - 1))
        downsample_padding=0,  # the official pad (0, 1, 0, 1) then a stride-2 conv
        dropout=config.get("dropout", 0.0),
        resnet_time_scale_shift="default",
    )


def to_diffusers(unet):
    """A diffusers UNet2DModel with the same weights as our UNet."""
    from diffusers import UNet2DModel

    model = UNet2DModel(**unet2d_config(unet.config))
    model.load_state_dict(official_to_diffusers(unet.state_dict()), strict=True)
    return model.to(next(unet.parameters()).device).train(unet.training)


def from_diffusers(model):
    """Our UNet with the weights of a UNet2DModel built like unet2d_config would build it."""
    cfg = model.config
    mult = [c // cfg.block_out_channels[0] for c in cfg.block_out_channels]
    res = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    attn = tuple(res // 2**i for i, t in enumerate(cfg.down_block_types) if t.startswith("Attn"))
    unet = UNet(ch=cfg.block_out_channels[0], out_ch=cfg.out_channels, ch_mult=tuple(mult), num_res_blocks=cfg.layers_per_block, attn_resolutions=attn, dropout=cfg.dropout, in_channels=cfg.in_channels, resolution=res)
    unet.load_state_dict(diffusers_to_official(model.state_dict()), strict=True)
    return unet.to(next(model.parameters()).device)
