"""The standard DDPM UNet, as in the official DDIM code (ermongroup/ddim, models/diffusion.py).

Same constructor arguments and the same state-dict keys, so that official checkpoints
load with strict=True: temb.dense.{0,1}, conv_in, down.{i}.block.{j}.{norm1, conv1,
temb_proj, norm2, conv2, nin_shortcut}, down.{i}.attn.{j}.{norm, q, k, v, proj_out},
down.{i}.downsample.conv, mid.{block_1, attn_1, block_2}, up.{i}.block.{j}, up.{i}.attn.{j},
up.{i}.upsample.conv, norm_out, conv_out.

GroupNorm(32, eps 1e-6) everywhere, swish (SiLU) activations, the sinusoidal timestep
embedding of the official code. Two differences in form, none in the function:
activations are SiLU modules (`act1`, `act2`, ... hold no parameters) and the norms take
an optional per-(n, c) bias to add first, so that the fusion pass (models.fuse, with the
rules of models.unet_rules) can swap each norm + activation pair for one fused kernel;
attention can run as F.scaled_dot_product_attention (the same softmax(q kᵀ / sqrt(c)) v),
which the sampling preparation (models.prepare) turns on for CUDA.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.checks import check_positive_int
from .checkpoint import describe_mismatch, infer_config, load_state_dict
from .presets import PRESETS, config_kwargs, describe

def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, embedding_dim) float32 (DDPM / tensor2tensor)."""
    if timesteps.dim() != 1:
        raise ValueError(f"timesteps must have shape (B,), got {tuple(timesteps.shape)}")
    half_dim = embedding_dim // 2
    emb = math.log(10000) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float32, device=timesteps.device) * -emb)
    emb = timesteps.float()[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that can first add a per-(n, c) bias (the ResNet block's time embedding)."""

    def forward(self, x: torch.Tensor, add_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if add_bias is not None:
            x = x + add_bias[:, :, None, None]
        return super().forward(x)


def Normalize(in_channels: int) -> GroupNorm:
    return GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # no asymmetric padding in torch conv: pad (0, 1, 0, 1) by hand, then stride 2
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: Optional[int] = None, conv_shortcut: bool = False, dropout: float, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.act1 = nn.SiLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_act = nn.SiLU()
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.act2 = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x, temb):
        h = self.conv1(self.act1(self.norm1(x)))
        h = self.act2(self.norm2(h, self.temb_proj(self.temb_act(temb))))  # norm2(h + temb_proj(...))
        h = self.conv2(self.dropout(h))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    # F.scaled_dot_product_attention is faster on CUDA, the official bmm + softmax on the
    # CPU; FastSampler turns this on for CUDA copies of the model.
    use_sdpa = False

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, hh, ww = q.shape
        if self.use_sdpa:  # (b, 1, hw, c): one head over all channels
            q, k, v = (m.reshape(b, 1, c, hh * ww).transpose(2, 3) for m in (q, k, v))
            h_ = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, hh, ww)
        elif q.dim() == 4 and not q.is_contiguous() and q.is_contiguous(memory_format=torch.channels_last):
            # the same product on (b, hw, c) views of channels_last storage: no copies
            q, k, v = (m.permute(0, 2, 3, 1).reshape(b, hh * ww, c) for m in (q, k, v))
            w_ = F.softmax(torch.bmm(q, k.transpose(1, 2)) * (int(c) ** (-0.5)), dim=2)
            h_ = torch.bmm(w_, v).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        else:  # softmax(q k^T / sqrt(c)) v, as the official code computes it
            q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
            w_ = torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** (-0.5))
            w_ = F.softmax(w_, dim=2)
            h_ = torch.bmm(v.reshape(b, c, hh * ww), w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h_)


class UNet(nn.Module):
    """The DDPM/DDIM UNet (ermongroup/ddim `Model`), taking the official config's arguments.

    forward(x, t): x (B, in_channels, resolution, resolution), t (B,) timesteps -> (B, out_ch, H, W).

    num_classes (not in the official code; default None): a class-conditional UNet, as
    diffusers' UNet2DModel(num_class_embeds=...) makes it: an embedding of the label is added
    to the time embedding after its MLP. It has num_classes + 1 rows; the last,
    `null_label` (= num_classes), is "no label", the unconditional model that classifier-free
    guidance needs (trained by dropping labels). forward(x, t, class_labels): (B,) int64
    labels in [0, num_classes]; None means null_label for every sample.
    """

    def __init__(
        self,
        ch: int = 128,
        out_ch: int = 3,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions=(16,),
        dropout: float = 0.1,
        in_channels: int = 3,
        resolution: int = 32,
        resamp_with_conv: bool = True,
        num_classes: Optional[int] = None,
    ):
        super().__init__()
        if ch % 32:
            raise ValueError(f"ch must be a multiple of 32 (GroupNorm with 32 groups), got {ch}")
        for name, v in (("out_ch", out_ch), ("num_res_blocks", num_res_blocks), ("in_channels", in_channels), ("resolution", resolution)):
            check_positive_int(name, v)
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or any(m < 1 for m in ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
        if resolution % (2 ** (len(ch_mult) - 1)):
            raise ValueError(f"resolution {resolution} must be divisible by 2**(len(ch_mult) - 1) = {2 ** (len(ch_mult) - 1)}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be None or a positive int, got {num_classes!r}")
        self.config = dict(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions), dropout=dropout, in_channels=in_channels, resolution=resolution, resamp_with_conv=resamp_with_conv)
        if num_classes is not None:  # only then, so that an official config round-trips unchanged
            self.config["num_classes"] = num_classes
        self.num_classes = num_classes
        self.ch = ch
        self.temb_ch = ch * 4
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.out_ch = out_ch

        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])
        self.temb_act = nn.SiLU()
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, self.temb_ch)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1,) + ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=self.temb_ch, dropout=dropout)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            skip_in = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[i_level]
                block.append(ResnetBlock(in_channels=block_in + skip_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)

        self.norm_out = Normalize(block_in)
        self.act_out = nn.SiLU()
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    @property
    def null_label(self) -> Optional[int]:
        """The label of the unconditional model (num_classes), or None for an unconditional UNet."""
        return self.num_classes

    def label_embedding(self, class_labels: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
        """(B, temb_ch): the class embedding added to the time embedding (checked labels; None: null_label)."""
        if class_labels is None:
            class_labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        if not isinstance(class_labels, torch.Tensor) or class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
            raise TypeError(f"UNet: class_labels must be an integer tensor of shape (B,), got {getattr(class_labels, 'dtype', type(class_labels).__name__)}")
        if class_labels.dim() == 0:
            class_labels = class_labels.expand(batch)
        if class_labels.shape != (batch,):
            raise ValueError(f"UNet: class_labels must have shape ({batch},), one label per sample, got {tuple(class_labels.shape)}")
        return self.class_emb(class_labels.long())

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"UNet: x must be (B, {self.in_channels}, {self.resolution}, {self.resolution}), got {tuple(x.shape)}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = get_timestep_embedding(t, self.ch).to(self.conv_in.weight.dtype)
        temb = self.temb.dense[1](self.temb_act(self.temb.dense[0](temb)))
        if self.num_classes is not None:
            temb = temb + self.label_embedding(class_labels, x.shape[0], x.device)
        elif class_labels is not None:
            raise ValueError("UNet: class_labels given, but this UNet is not class-conditional (num_classes=None)")

        hs = [self.conv_in(x)]
        for i_level in range(self.num_resolutions):
            down = self.down[i_level]
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](hs[-1], temb)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
                hs.append(h)
            if i_level != self.num_resolutions - 1:
                hs.append(down.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_1(h, temb)
        h = self.mid.attn_1(h)
        h = self.mid.block_2(h, temb)

        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)

        return self.conv_out(self.act_out(self.norm_out(h)))

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_config(cls, config) -> "UNet":
        """A preset name ("cifar10", "celeba", "lsun"), or a dict / object with the official keys."""
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"unknown UNet preset {config!r}; expected one of {tuple(PRESETS)}")
            return cls(**PRESETS[config])
        return cls(**config_kwargs(config))

    @classmethod
    def from_checkpoint(cls, path, config=None, *, map_location="cpu", prefer_ema: bool = True) -> "UNet":
        """A UNet with weights from `path`, loaded with strict key checking.

        `path` holds a bare state dict (the converted DDPM checkpoints `model-*.ckpt` that the
        official DDIM code uses), or the official training checkpoint list [state
        ('module.' keys), optimizer, epoch, step, ema] whose EMA weights are taken when
        present (prefer_ema). config: a preset name, the official model config, or None to
        read the structure off the weights and take the matching preset's resolution.
        """
        state = load_state_dict(path, map_location=map_location, prefer_ema=prefer_ema)
        model = cls.from_config(infer_config(state) if config is None else config)
        problems = describe_mismatch(model, state)
        if problems:
            raise ValueError(f"{path}: the checkpoint does not fit UNet({describe(model.config)}): {problems}")
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def from_pretrained(cls, name: str = "digits") -> "UNet":
        """A model that ships inside the package (no download): "digits". In eval mode, on the CPU.

        The names are those registered with `register_pretrained` (the embedded models of
        ddim_fast.apps.pretrained register themselves when ddim_fast is imported).
        """
        if not isinstance(name, str) or name not in _PRETRAINED:
            raise ValueError(f"unknown pretrained model {name!r}; known: {sorted(_PRETRAINED)}")
        config, state = _PRETRAINED[name]()
        model = cls(**config)
        model.load_state_dict(state, strict=True)
        return model.eval()


_PRETRAINED = {}  # name -> () -> (UNet kwargs, state dict)


def register_pretrained(name: str, weights) -> None:
    """Make `UNet.from_pretrained(name)` build UNet(**config) with the state dict that
    `weights()` returns as (config, state_dict)."""
    _PRETRAINED[name] = weights
