"""The digit classifier behind the quality metric: its penultimate features play the role of
Inception's pool features for FID on the 16x16 digits."""

from __future__ import annotations

import torch
import torch.nn as nn


class DigitClassifier(nn.Module):
    """A small CNN for 1 x 16 x 16 digits in [-1, 1]: two conv stages, then a 64-d feature layer.

    features(x): (B, 1, 16, 16) -> (B, features), the penultimate activations FID uses.
    forward(x): (B, 1, 16, 16) -> (B, num_classes) logits.
    """

    def __init__(self, width: int = 32, features: int = 64, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.config = dict(width=width, features=features, num_classes=num_classes, dropout=dropout)
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(2 * w * 16, features), nn.ReLU(),
        )  # fmt: skip
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(features, num_classes)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"DigitClassifier: x must be (B, 1, 16, 16) images in [-1, 1], got {tuple(getattr(x, 'shape', ()))}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
