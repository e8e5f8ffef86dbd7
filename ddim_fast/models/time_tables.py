"""The time tables of a model that runs from a table (LeanUNet, TabledUNet2D): one per plan's
timesteps, made once, the least recently used dropped past a bound."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch


class TimeTables:
    def __init__(self, size: int = 8):
        self._size = size
        self._tables: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()

    def get(self, timesteps: Sequence[int], device: torch.device, rows: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """(S, width): row i = rows(timesteps[i]), made by one call of `rows` on the first use."""
        key = tuple(int(t) for t in timesteps)
        table = self._tables.get(key)
        if table is None:
            with torch.no_grad():
                table = rows(torch.tensor(key, dtype=torch.long, device=device)).contiguous()
            self._tables[key] = table
            while len(self._tables) > self._size:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table
