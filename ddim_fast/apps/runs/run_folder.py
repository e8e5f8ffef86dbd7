"""The folder of a long sampling run (`ddim-fast sample --out-dir D`): what was asked, what is
done, and the merge, so that a run can be killed and rerun and never mixes or loses samples.

    D/manifest.json                what was asked (model and schedule digests, S, eta, grid,
                                   seed, labels, image shape, version, ...)
    D/.lock                        held (flock) by the process that runs the folder; the OS
                                   releases it when that process dies, so a kill leaves no
                                   stale lock
    D/shards/<first>-<count>.npz   one batch: arr_0 (uint8 NHWC), sha256 (of arr_0's bytes),
                                   first (its first sample's index) and run (the manifest's
                                   digest)
    D/<index>.png                  one PNG per sample, by global index
    D/samples.npz                  the merge in index order (key arr_0, as FID tools read it)

Every file is written under a temporary name (`<name>.tmp-<pid>`, which no *.png or *.npz
glob matches), fsynced and renamed into place (apps/runs/files.py), so neither a kill nor a power
loss leaves half a file under a final name; leftover temporary files are removed when a run
opens the folder. A run whose manifest differs from the folder's is refused, naming the differences
(overwrite=True first removes what earlier runs wrote: shards, PNGs, samples.npz, the
manifest; nothing else). A shard that does not prove itself (unreadable, another run's, of
another dtype, shape or digest) is sampled again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .files import write_atomic, write_npz, write_npz_stream

MANIFEST_FORMAT = "ddim-fast sampling run 1"
MANIFEST = "manifest.json"
LOCK = ".lock"
MERGED = "samples.npz"
SHARDS = "shards"
SHARD_MEMBERS = ("arr_0", "first", "run", "sha256")
_PNG_NAME = re.compile(r"^\d{6,}\.png$")
_SHARD_NAME = re.compile(r"^\d{8,}-\d{5,}\.npz$")
# a run file's temporary name: ours (<name>.tmp-<pid>) and the <name>.tmp<pid>.npz of before the manifest
_TEMPORARY_NAME = re.compile(r"^(\d{6,}\.png|\d{8,}-\d{5,}\.npz|samples\.npz|manifest\.json)\.tmp(-\d+|\d+\.npz)$")


class RunFolderError(ValueError):
    """The folder cannot take this run (another run's, in use, not writable); the CLI prints it as one line."""


class DamagedShard(Exception):
    """A shard that does not prove itself; str() is the reason."""


def batches(num_samples: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """(batch index, first sample index, count) in index order, generated lazily (10**12
    samples plan as fast as 10)."""
    for b, start in enumerate(range(0, num_samples, batch_size)):
        yield b, start, min(batch_size, num_samples - start)


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of what makes the model's outputs: its class, its config (when it has one) and every
    tensor of its state dict (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    config = getattr(model, "config", None)
    if config is not None:  # less diffusers' bookkeeping (_name_or_path: where it was loaded from)
        kept = {key: value for key, value in dict(config).items() if not str(key).startswith("_")}
        digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def schedule_digest(schedule) -> str:
    """sha256 of a Schedule's ᾱ_t (float64) and its final ᾱ."""
    digest = hashlib.sha256(np.ascontiguousarray(schedule.alphas_cumprod64, dtype=np.float64))
    digest.update(repr(float(schedule.final_alpha_cumprod)).encode())
    return digest.hexdigest()


def array_digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images)).hexdigest()


def canonical(value):
    """value as JSON reads it back (tuples become lists), so a manifest compares equal to its file."""
    return json.loads(json.dumps(value))


class RunFolder:
    """One sampling run's folder. Every rank of a torchrun job builds one from the same manifest;
    rank 0 opens it (the lock, the manifest check, the clean-up) before any rank samples.

    asked: what the run was asked for (JSON values), compared key by key with the folder's
    manifest; num_samples, batch_size and image_shape (C, H, W) are part of it too. about:
    what the manifest also records for people (the model's description, the torch version),
    not compared.
    """

    def __init__(self, path: str, asked: dict, *, num_samples: int, batch_size: int, image_shape: tuple, about: Optional[dict] = None):
        self.path = str(path)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        channels, height, width = (int(v) for v in image_shape)
        self.image_hwc = (height, width, channels)
        self.asked = canonical(dict(format=MANIFEST_FORMAT, **asked, num_samples=self.num_samples, batch_size=self.batch_size, image_shape=[channels, height, width]))
        self.run_id = hashlib.sha256(json.dumps(self.asked, sort_keys=True).encode()).hexdigest()
        self.about = canonical(about or {})
        self._lock_file = None

    # --- opening: the lock, the manifest, the clean-up (rank 0) --------------------------------

    def open(self, *, overwrite: bool = False, log: Optional[Callable[[str], None]] = None) -> "RunFolder":
        """Take the folder for this run: lock it, refuse another run's manifest (or clear it with
        overwrite), remove leftover temporary files and write the manifest. Raises RunFolderError."""
        self.check_writable()
        self._check_layout()
        refusal = None if overwrite else self._refusal(self._read_manifest())
        if refusal is not None:  # refused before the lock is touched: the folder stays as it was
            raise RunFolderError(self._in_use() or refusal)
        self._lock()
        try:
            on_disk = None if overwrite else self._read_manifest()  # again, now that no other run can write
            refusal = None if overwrite else self._refusal(on_disk)
            if refusal is not None:
                raise RunFolderError(refusal)
            self._write_holder()
            if overwrite:
                removed = self._remove_outputs()
                if removed and log:
                    log(f"--overwrite: removed {removed} files of an earlier run from {self.path}")
            self._remove_temporaries()
            os.makedirs(os.path.join(self.path, SHARDS), exist_ok=True)
            if on_disk is None:
                manifest = dict(self.asked, about=self.about)
                write_atomic(os.path.join(self.path, MANIFEST), lambda f: f.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()))
        except BaseException:
            self.close()
            raise
        return self

    def _check_layout(self) -> None:
        """Refuse, before anything is removed or written, a folder whose run files are not files
        (a folder named 000003.png or manifest.json, a file named shards)."""
        shards = os.path.join(self.path, SHARDS)
        if os.path.exists(shards) and not os.path.isdir(shards):
            raise RunFolderError(f"--out-dir {self.path}: {shards} is not a folder; move it away")
        for path in self._outputs():
            if not os.path.isfile(path):
                raise RunFolderError(f"--out-dir {self.path}: {path} has the name of a file the run writes but is not a plain file; move it away")

    def _in_use(self) -> Optional[str]:
        """The in-use message when another process holds the lock (the lock file is not created)."""
        import fcntl

        path = os.path.join(self.path, LOCK)
        if not os.path.isfile(path):
            return None
        with open(path) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return self._in_use_message(probe.read().strip())
            fcntl.flock(probe, fcntl.LOCK_UN)
        return None

    def _in_use_message(self, holder: str) -> str:
        return f"--out-dir {self.path} is in use by another ddim-fast run ({holder or 'another process'}); wait for it to finish or pick another --out-dir (torchrun's ranks share one run; two separate commands do not)"

    def _refusal(self, on_disk: Optional[dict]) -> Optional[str]:
        """Why this run may not use the folder whose manifest is on_disk (another run's, or none
        beside samples), or None."""
        if on_disk is None and self._outputs():
            return f"--out-dir {self.path} holds samples but no {MANIFEST} (an older ddim-fast's run, or another tool's): what they are cannot be told, so they are not reused; pass --overwrite to remove them ({', '.join(self._output_kinds())}) and start over, or pick another --out-dir"
        if on_disk is not None and _compared(on_disk) != self.asked:
            return f"--out-dir {self.path} holds a run with other settings: {describe_differences(_compared(on_disk), self.asked)}. Rerun with its settings to resume it, pick another --out-dir, or pass --overwrite to start over (it removes that run's shards, PNGs and {MERGED})"
        return None

    def close(self) -> None:
        """Release the lock (kept as a file: removing a lock file races with its next taker)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def check_writable(self) -> None:
        """Create the folder and check that this process can write in it (before any work)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunFolderError(f"--out-dir {self.path}: exists and is not a folder")
        os.makedirs(self.path, exist_ok=True)
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise RunFolderError(f"--out-dir {self.path}: this process cannot write there")

    def _lock(self) -> None:
        import fcntl

        path = os.path.join(self.path, LOCK)
        lock_file = open(path, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                lock_file.close()
                raise OSError(e.errno, e.strerror, path) from None
            lock_file.seek(0)
            holder = lock_file.read().strip()
            lock_file.close()
            raise RunFolderError(self._in_use_message(holder)) from None
        self._lock_file = lock_file

    def _write_holder(self) -> None:
        """Who holds the lock, for the message of a process that finds it taken."""
        try:
            self._lock_file.seek(0)
            self._lock_file.truncate()
            self._lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self._lock_file.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, os.path.join(self.path, LOCK)) from None

    def _read_manifest(self) -> Optional[dict]:
        path = os.path.join(self.path, MANIFEST)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise RunFolderError(f"--out-dir {self.path}: its {MANIFEST} cannot be read ({type(e).__name__}: {e}); pass --overwrite to start over") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise RunFolderError(f"--out-dir {self.path}: its {MANIFEST} is not a ddim-fast sampling manifest ({MANIFEST_FORMAT!r}); pass --overwrite to start over")
        return manifest

    def _outputs(self) -> list[str]:
        """The files in the folder that a sampling run writes (PNGs, shards, the merge, the manifest)."""
        found = [os.path.join(self.path, name) for name in os.listdir(self.path) if _PNG_NAME.match(name) or name in (MERGED, MANIFEST)]
        shards = os.path.join(self.path, SHARDS)
        if os.path.isdir(shards):
            found += [os.path.join(shards, name) for name in os.listdir(shards) if _SHARD_NAME.match(name)]
        return found

    def _output_kinds(self) -> list[str]:
        names = [os.path.basename(p) for p in self._outputs()]
        kinds = ["NNNNNN.png" if any(_PNG_NAME.match(n) for n in names) else None, f"{SHARDS}/" if any(_SHARD_NAME.match(n) for n in names) else None, MERGED if MERGED in names else None]
        return [k for k in kinds if k]

    def _remove_outputs(self) -> int:
        outputs = self._outputs()
        for path in outputs:
            os.remove(path)
        return len(outputs)

    def _remove_temporaries(self) -> None:
        for folder in (self.path, os.path.join(self.path, SHARDS)):
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if _TEMPORARY_NAME.match(name):
                        os.remove(os.path.join(folder, name))

    # --- shards and PNGs ----------------------------------------------------------------------

    def shard_path(self, start: int, count: int) -> str:
        return os.path.join(self.path, SHARDS, f"{start:08d}-{count:05d}.npz")

    def png_path(self, index: int) -> str:
        return os.path.join(self.path, f"{index:06d}.png")

    def read_shard(self, start: int, count: int) -> np.ndarray:
        """The shard's images, proven: this run's, uint8 (count, H, W, C), its digest. Raises
        DamagedShard naming what is wrong (FileNotFoundError when there is none)."""
        path = self.shard_path(start, count)
        try:
            with np.load(path, allow_pickle=False) as archive:
                if sorted(archive.files) != sorted(SHARD_MEMBERS):
                    raise DamagedShard(f"holds {sorted(archive.files)}, not {list(SHARD_MEMBERS)}")
                images = archive["arr_0"]
                first, run_id, digest = int(archive["first"]), str(archive["run"]), str(archive["sha256"])
        except FileNotFoundError:
            raise
        except DamagedShard:
            raise
        except Exception as e:  # truncated, empty, a flipped byte (CRC), not a zip at all, ...
            raise DamagedShard(f"unreadable ({type(e).__name__}: {e})") from None
        if run_id != self.run_id:
            raise DamagedShard("written by another run")
        if first != start:  # copied or renamed from another batch's name
            raise DamagedShard(f"the shard of the batch from sample {first}, not {start}")
        if images.dtype != np.uint8 or images.shape != (count, *self.image_hwc):
            raise DamagedShard(f"holds {images.dtype} {images.shape}, not uint8 {(count, *self.image_hwc)}")
        if array_digest(images) != digest:
            raise DamagedShard("its images do not match their sha256")
        return images

    def write_shard(self, start: int, count: int, images: np.ndarray) -> None:
        if images.dtype != np.uint8 or images.shape != (count, *self.image_hwc):
            raise ValueError(f"a shard of {count} samples must be uint8 {(count, *self.image_hwc)}, got {images.dtype} {images.shape}")
        members = dict(arr_0=images, first=np.array(start, dtype=np.int64), run=np.array(self.run_id), sha256=np.array(array_digest(images)))
        write_atomic(self.shard_path(start, count), lambda f: write_npz(f, members))

    def missing_pngs(self, start: int, count: int) -> list[int]:
        return [i for i in range(start, start + count) if not os.path.isfile(self.png_path(i))]

    def write_png(self, index: int, encode: Callable[[object], None]) -> None:
        """encode(file) writes sample index's PNG into a binary file."""
        write_atomic(self.png_path(index), encode)

    # --- the merge ------------------------------------------------------------------------------

    def images(self) -> Iterator[np.ndarray]:
        """Every shard's images in index order, each proven (RunFolderError on one that is not)."""
        for _, start, count in batches(self.num_samples, self.batch_size):
            try:
                yield self.read_shard(start, count)
            except (DamagedShard, FileNotFoundError) as e:
                reason = "missing" if isinstance(e, FileNotFoundError) else str(e)
                raise RunFolderError(f"shard {self.shard_path(start, count)} is {reason} after every batch was sampled; rerun the same command to sample it again") from None

    def merge(self) -> str:
        """Stream every shard, in index order, into D/samples.npz (key arr_0): one shard in memory
        at a time. Returns its path."""
        path = os.path.join(self.path, MERGED)
        shape = (self.num_samples, *self.image_hwc)
        write_atomic(path, lambda f: write_npz_stream(f, "arr_0", shape=shape, dtype=np.uint8, parts=self.images()))
        return path


def _compared(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key != "about"}


def is_run_output(out_dir: str, path: str) -> bool:
    """Whether path is (or would be) a file that a run in out_dir writes: a sample's PNG, a shard,
    samples.npz, the manifest or the lock."""
    folder, name = os.path.split(os.path.realpath(path))
    root = os.path.realpath(out_dir)
    if folder == root:
        return bool(_PNG_NAME.match(name)) or name in (MERGED, MANIFEST, LOCK)
    return folder == os.path.join(root, SHARDS)


def describe_differences(then: dict, now: dict) -> str:
    """'seed 0 there, 1 now; steps 50 there, 10 now' for the keys whose values differ."""
    parts = []
    for key in sorted(set(then) | set(now)):
        if then.get(key, _MISSING) != now.get(key, _MISSING):
            parts.append(f"{key} {_short(then.get(key, _MISSING))} there, {_short(now.get(key, _MISSING))} now")
    return "; ".join(parts)


_MISSING = object()


def _short(value) -> str:
    text = "not recorded" if value is _MISSING else json.dumps(value)
    return text if len(text) <= 80 else text[:36] + "..." + text[-36:]


def disk_estimate(num_samples: int, image_shape: tuple) -> int:
    """An upper bound on the bytes a run writes: PNGs, shards and samples.npz, each at most about
    the raw uint8 size (compression only shrinks natural images)."""
    channels, height, width = image_shape
    return 3 * num_samples * channels * height * width
