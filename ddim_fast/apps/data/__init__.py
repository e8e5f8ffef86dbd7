"""The embedded data set: 16x16 handwritten digits (1,797 images, 10 classes), offline.

`digits16.npz` is the UCI ML hand-written digits data set (CC BY 4.0) as scikit-learn
ships it (8x8, BSD-3-Clause), resized to 16x16; `make_digits.py` regenerates it and
README.md beside it says how and where it comes from.
"""

from __future__ import annotations

import os

import numpy as np
import torch

DIGITS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits16.npz")


def load_digits(path=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16x16 digits: (images (N, 1, 16, 16) float32 in [-1, 1], labels (N,) int64).

    path: another .npz written by make_digits.py (default: the one in the package).
    """
    path = DIGITS_PATH if path is None else os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits data not found at {path}; regenerate it with `python -m ddim_fast.apps.data.make_digits`")
    with np.load(path) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: expected arrays 'images' and 'labels', missing {sorted(missing)}")
        images, labels = f["images"], f["labels"]
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"{path}: 'images' must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]
    return x, torch.from_numpy(labels.astype(np.int64))


__all__ = ["load_digits", "DIGITS_PATH"]
