"""Regenerate digits16.npz from the 8x8 handwritten digits that scikit-learn ships.

    pip install scikit-learn    # needed for this script only, never at run time
    python -m ddim_fast.apps.data.make_digits [--out PATH]

The 1,797 8x8 images (pixel values 0..16) are scaled to [0, 1], resized to 16x16 with
bilinear interpolation (torch's F.interpolate, align_corners=False, no antialias),
clamped to [0, 1] and stored as uint8 (round(255 v)) with their labels, in a compressed
.npz: images (1797, 16, 16) uint8, labels (1797,) uint8. ddim_fast.apps.data.load_digits
maps the uint8 values to [-1, 1] as v / 127.5 - 1.

Origin and licence: the UCI ML hand-written digits data set (E. Alpaydin, C. Kaynak,
1998; https://archive.ics.uci.edu/dataset/80, CC BY 4.0), as shipped by scikit-learn
(sklearn.datasets.load_digits; scikit-learn is BSD-3-Clause).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 16


def make_digits16() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 16, 16) uint8, labels (1797,) uint8) from sklearn's 8x8 digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("make_digits needs scikit-learn (pip install scikit-learn); the package itself does not") from None
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=False)
    images = torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)[:, 0].numpy()
    return images, d.target.astype(np.uint8)


def main(argv=None) -> None:
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits16.npz")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=default, help=f"where to write the .npz (default: {default})")
    args = p.parse_args(argv)
    images, labels = make_digits16()
    np.savez_compressed(args.out, images=images, labels=labels)
    print(f"wrote {args.out}: images {images.shape} {images.dtype}, labels {labels.shape}, {os.path.getsize(args.out) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
