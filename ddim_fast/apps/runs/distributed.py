"""Sample generation sharded across processes (torchrun), restartable, merged at the end.

    torchrun --nproc_per_node=N -m ddim_fast.cli sample --num-samples K --out-dir D

The K samples are cut into batches of --batch-size in index order; batch b goes to rank
b % N. Every sample index has its own seed (derived from --seed and the index), and each
batch's step noise its own seed (from --seed and b), so the same K images come out
whatever N. Rank 0 opens the run's folder (apps/runs/run_folder.py: the lock, the manifest of
what was asked, the clean-up) and tells the other ranks whether it may go on. Each
finished batch is written as one PNG per sample (named by global index) and then its
shard D/shards/<start>-<count>.npz, both renamed into place after an fsync; a rerun of
the same run reuses the shards that prove themselves (this run's, the right shape, their
digest) and samples the others again. At the end rank 0 streams the shards, in index
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

from ...core.checks import describe_error
from .run_folder import DamagedShard, RunFolder, batches


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


class RankFailed(ValueError):
    """Another rank stopped (its own error is its own one line); the CLI prints this as one line."""


def barrier(world: World) -> None:
    """Wait for every rank. A rank that fails exits at once (torchrun then stops the others);
    one waiting here finds the connection closed and says so in one line, not a traceback."""
    if world.size == 1:
        return
    import torch.distributed as dist

    try:
        dist.barrier()
    except RuntimeError as e:  # DistBackendError and gloo's "Connection closed by peer"
        raise RankFailed(f"rank {world.rank}: another rank of the run stopped before it finished (see that rank's error): {describe_error(e)}") from None


def finish(world: World) -> None:
    if world.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def share_from_main(world: World, value):
    """Rank 0's value on every rank (a picklable object; itself when there is one process)."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    box = [value if world.is_main else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as e:  # rank 0 stopped before it got here (its own error says why)
        raise RankFailed(f"rank {world.rank}: rank 0 stopped before the run began (see its error): {describe_error(e)}") from None
    return box[0]


@dataclass
class Tally:
    """What one rank's generate() did: samples drawn and reused, damaged shards sampled again,
    PNGs written."""

    drawn: int = 0
    reused: int = 0
    resampled_shards: int = 0
    pngs: int = 0


def generate(
    sample_batch: Callable[[int, int, int], np.ndarray],
    folder: RunFolder,
    world: World,
    *,
    encode_png: Optional[Callable[[np.ndarray, object], None]] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Tally:
    """Run this rank's batches of the folder's run, reusing the shards that prove themselves,
    then (rank 0) stream the shards into D/samples.npz.

    sample_batch(b, start, count) -> uint8 images (count, H, W, C). encode_png(image, file)
    writes one PNG; with it every sample gets D/<index>.png (a reused shard's missing PNGs are
    written from the shard). The folder must have been opened by rank 0 (RunFolder.open).
    """
    tally = Tally()
    _run_batches(sample_batch, folder, world, tally, encode_png, on_batch, log)
    barrier(world)  # every rank's shards are written
    if world.is_main:
        folder.merge()
    return tally


def _run_batches(sample_batch, folder: RunFolder, world: World, tally: Tally, encode_png, on_batch, log) -> None:
    for b, start, count in batches(folder.num_samples, folder.batch_size):
        if b % world.size != world.rank:
            continue
        images = _proven_shard(folder, start, count, tally, log)
        drawn = images is None
        if drawn:
            images = sample_batch(b, start, count)
            if images.shape[0] != count:
                raise RuntimeError(f"sample_batch returned {images.shape[0]} images for a batch of {count}")
            tally.drawn += count
        else:
            tally.reused += count
        if encode_png is not None:
            for index in range(start, start + count) if drawn else folder.missing_pngs(start, count):
                folder.write_png(index, lambda f, image=images[index - start]: encode_png(image, f))
                tally.pngs += 1
        if drawn:  # last: a shard on disk says that its batch, PNGs included, is done
            folder.write_shard(start, count, images)
        if on_batch is not None:
            on_batch(count)


def _proven_shard(folder: RunFolder, start: int, count: int, tally: Tally, log) -> Optional[np.ndarray]:
    """The images of a finished batch's shard, or None when it must be sampled (no shard, or one
    that does not prove itself: said in one line)."""
    try:
        return folder.read_shard(start, count)
    except FileNotFoundError:
        return None
    except DamagedShard as e:
        tally.resampled_shards += 1
        if log is not None:
            log(f"shard {folder.shard_path(start, count)} is {e}: sampling its batch again")
        return None
