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
        """(S, width): row i = rows(timesteps[i]), made by one call of `rows` on the first use
        (int64 timesteps, or float32 where one is fractional, as the model would get them)."""
        key = tuple(float(t) for t in timesteps)
        table = self._tables.get(key)
        if table is None:
            with torch.no_grad():
                table = rows(_timestep_tensor(key, device)).contiguous()
            self._tables[key] = table
            while len(self._tables) > self._size:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def recompute(self, device: torch.device, rows: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Every cached table made again by `rows` (the model's weights changed) into its own
        tensor: the same storage, so a captured graph or a loop that holds the table reads the
        new rows."""
        with torch.no_grad():
            for key, table in self._tables.items():
                table.copy_(rows(_timestep_tensor(key, device)))


def _timestep_tensor(key: tuple, device: torch.device) -> torch.Tensor:
    """A table's timesteps as the model gets them: int64, or float32 where one is fractional."""
    integral = all(t.is_integer() for t in key)
    return torch.tensor(key, dtype=torch.long if integral else torch.float32, device=device)
