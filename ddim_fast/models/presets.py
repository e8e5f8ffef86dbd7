"""The official UNet configurations and how a config is read (ermongroup/ddim's configs/*.yml)."""

from __future__ import annotations

PRESETS = {
    # the official configs: configs/cifar10.yml, celeba.yml, church.yml (bedroom, cat alike)
    "cifar10": dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, in_channels=3, resolution=32, resamp_with_conv=True),
    "celeba": dict(ch=128, out_ch=3, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, in_channels=3, resolution=64, resamp_with_conv=True),
    "lsun": dict(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=256, resamp_with_conv=True),
}


def config_kwargs(config) -> dict:
    """UNet(**kwargs) from the official config: a dict (its "model" part, "data.image_size"
    for the resolution) or an object with the same attributes."""
    keys = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "in_channels", "resolution", "resamp_with_conv")
    if isinstance(config, dict):
        src = dict(config.get("model", config))
        if "resolution" not in src and "data" in config:
            src["resolution"] = config["data"]["image_size"]
        get = src.get
    else:
        src = getattr(config, "model", config)
        get = lambda k, d=None: getattr(src, k, d)  # noqa: E731
    kw = {k: get(k) for k in keys if get(k) is not None}
    if "resolution" not in kw and not isinstance(config, dict) and getattr(config, "data", None) is not None:
        kw["resolution"] = config.data.image_size
    for k in ("ch_mult", "attn_resolutions"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return kw


def describe(cfg: dict) -> str:
    """The structure of a UNet config in one line: "ch=128, ch_mult=(1, 2, 2, 2), ..."."""
    keys = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels", "out_ch", "resolution")
    return ", ".join(f"{k}={cfg[k]}" for k in keys)
