"""Sample generation sharded across processes (torchrun), restartable, merged at the end.

    torchrun --nproc_per_node=N -m ddim_fast.cli sample --num-samples K --out-dir D

The K samples are cut into batches of --batch-size in index order; batch b goes to rank
b % N. Every sample index has its own seed (derived from --seed and the index), and each
batch's step noise its own seed (from --seed and b), so the same K images come out
whatever N. Each finished batch is written atomically as D/shards/<start>-<count>.npz
(uint8 NHWC) together with one PNG per sample named by its global index; a restarted run
skips the batches whose shard exists. At the end rank 0 merges the shards, in index
order, into D/samples.npz (key "arr_0", the format FID tools read).

Processes talk through torch.distributed: NCCL on GPUs, gloo on CPUs; without torchrun
(WORLD_SIZE unset) it is one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str) -> World:
    """Join the torchrun process group if there is one (NCCL for CUDA, gloo otherwise)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(0, 1, 0, False)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        here = True
    return World(rank, size, local, here)


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(world: World) -> None:
    if world.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def batches(num_samples: int, batch_size: int) -> list[tuple[int, int, int]]:
    """[(batch index, first sample index, count)] in index order."""
    return [(b, start, min(batch_size, num_samples - start)) for b, start in enumerate(range(0, num_samples, batch_size))]


def shard_path(out_dir: str, start: int, count: int) -> str:
    return os.path.join(out_dir, "shards", f"{start:08d}-{count:05d}.npz")


def _write_atomic(path: str, images: np.ndarray) -> None:
    tmp = path + f".tmp{os.getpid()}.npz"
    np.savez_compressed(tmp, arr_0=images)
    os.replace(tmp, path)  # a killed run leaves no half-written shard under the real name


def generate(
    sample_batch: Callable[[int, int, int], np.ndarray],
    num_samples: int,
    batch_size: int,
    out_dir: str,
    world: World,
    *,
    write_png: Optional[Callable[[np.ndarray, str], None]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
) -> Optional[np.ndarray]:
    """Run this rank's batches (skipping finished ones) and merge on rank 0.

    sample_batch(b, start, count) -> uint8 images (count, H, W, C). Returns the merged
    (num_samples, H, W, C) array on rank 0, None elsewhere. Writes D/shards/*.npz,
    D/<index>.png (with write_png) and, on rank 0, D/samples.npz.
    """
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    done = 0
    for b, start, count in batches(num_samples, batch_size):
        if b % world.size != world.rank:
            continue
        path = shard_path(out_dir, start, count)
        if os.path.exists(path):  # finished by an earlier run
            if on_batch:
                on_batch(count)
            continue
        images = sample_batch(b, start, count)
        if images.shape[0] != count:
            raise RuntimeError(f"sample_batch returned {images.shape[0]} images for a batch of {count}")
        if write_png is not None:
            for i, img in enumerate(images):
                write_png(img, os.path.join(out_dir, f"{start + i:06d}.png"))
        _write_atomic(path, images)
        done += count
        if on_batch:
            on_batch(count)
    barrier(world)
    if not world.is_main:
        return None
    parts = []
    for _, start, count in batches(num_samples, batch_size):
        path = shard_path(out_dir, start, count)
        if not os.path.exists(path):
            raise RuntimeError(f"shard {path} is missing after all ranks finished")
        with np.load(path) as f:
            parts.append(f["arr_0"])
    merged = np.concatenate(parts)
    _write_atomic(os.path.join(out_dir, "samples.npz"), merged)
    return merged
