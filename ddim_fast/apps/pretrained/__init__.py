"""Models that ship inside the package (no download): the "digits" UNet, its class-conditional
twin "digits-cond" (for classifier-free guidance) and the digit classifier.

Each file here is a plain `torch.save` of a dict that loads with weights_only=True:

    {"format": 1, "kind": "unet", "config": UNet kwargs, "schedule": {"name": "linear",
     "num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
     "state_dict": fp32 EMA weights, "meta": {how it was trained}}

and for the classifier {"format": 1, "kind": "classifier", "config": ..., "state_dict": ...,
"meta": ...}. digits.pt was made by `ddim-fast train` (apps/quality/train.py), digits_cond.pt by
`ddim-fast train --conditional` (the same recipe with labels, 10% of them dropped to the
null label 10) and digits_classifier.pt by `ddim-fast train --classifier`, on
apps/data/digits16.npz.

Importing this module registers each UNet here with `UNet.from_pretrained` (the package's
__init__ imports it, so the names are there whatever a user imports first).
"""

from __future__ import annotations

import functools
import os

import torch

from ...core.schedule import Schedule
from ...models.unet import UNet, register_pretrained
from ..quality.classifier import DigitClassifier

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"digits": "digits.pt", "digits-cond": "digits_cond.pt"}  # UNets
COND_MODEL = "digits-cond"  # the class-conditional twin of "digits" (labels 0-9, null label 10, for guidance)
CLASSIFIERS = {"digits": "digits_classifier.pt"}
FORMAT = 1


def _path(name, table: dict, what: str) -> str:
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown pretrained {what} {name!r}; known: {sorted(table)}")
    path = os.path.join(HERE, table[name])
    if not os.path.exists(path):
        raise FileNotFoundError(f"the pretrained {what} {name!r} is missing from the package ({path}); reinstall ddim-fast or regenerate it with `ddim-fast train{' --conditional' if name == COND_MODEL else ''}`")
    return path


def read_pretrained(path, kind: str = "unet") -> dict:
    """The dict stored in a pretrained file (see the module docstring), checked."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("kind") != kind:
        got = f"format {obj.get('format')!r}, kind {obj.get('kind')!r}" if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: not a ddim-fast pretrained {kind} file (expected format {FORMAT}, kind {kind!r}; got {got})")
    return obj


def _unet_weights(name: str) -> tuple:
    obj = read_pretrained(_path(name, MODELS, "model"), "unet")
    return obj["config"], obj["state_dict"]


for _name in MODELS:
    register_pretrained(_name, functools.partial(_unet_weights, _name))


def load_pretrained(name: str = "digits") -> UNet:
    """The embedded UNet `name` ("digits") with its EMA weights, in eval mode, on the CPU
    (the same as UNet.from_pretrained(name))."""
    return UNet.from_pretrained(name)


def load_schedule(name: str = "digits") -> Schedule:
    """The ddim_fast.Schedule the embedded model `name` was trained with."""
    return Schedule.from_spec(read_pretrained(_path(name, MODELS, "model"), "unet")["schedule"])


def pretrained_info(name: str = "digits") -> dict:
    """config, schedule and meta (training settings, final loss) of the embedded model `name`."""
    obj = read_pretrained(_path(name, MODELS, "model"), "unet")
    return {k: obj[k] for k in ("config", "schedule", "meta")}


def load_classifier(name: str = "digits") -> DigitClassifier:
    """The embedded digit classifier (apps.quality.classifier.DigitClassifier), in eval mode."""
    obj = read_pretrained(_path(name, CLASSIFIERS, "classifier"), "classifier")
    model = DigitClassifier(**obj["config"])
    model.load_state_dict(obj["state_dict"], strict=True)
    return model.eval()


@torch.no_grad()
def classify_digits(images) -> "torch.Tensor":
    """The embedded classifier's reading (0-9) of 16x16 digit images: uint8 (N, 16, 16, 1) or
    (N, 16, 16) as the CLI writes them, or a float tensor (N, 1, 16, 16) in [-1, 1]."""
    x = images
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        x = x.float().div(127.5).sub(1.0)
        x = x.view(x.shape[0], 1, *x.shape[1:3]) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return load_classifier().to(x.device)(x.float()).argmax(1).cpu()


def _plain_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}


def save_pretrained(path, model, schedule: dict, meta=None) -> None:
    """Write a UNet (fp32 weights, its config) and its schedule spec (e.g. train.DIGITS_SCHEDULE)."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items()}
    torch.save(dict(format=FORMAT, kind="unet", config=config, schedule=dict(schedule), state_dict=_plain_state(model), meta=meta or {}), path)


def save_classifier(path, model, meta=None) -> None:
    """Write a DigitClassifier (fp32 weights and its config)."""
    torch.save(dict(format=FORMAT, kind="classifier", config=dict(model.config), state_dict=_plain_state(model), meta=meta or {}), path)


__all__ = ["load_pretrained", "load_schedule", "load_classifier", "classify_digits", "COND_MODEL", "pretrained_info", "save_pretrained", "save_classifier", "MODELS", "CLASSIFIERS"]
