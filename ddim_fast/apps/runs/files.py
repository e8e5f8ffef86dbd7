"""Files written whole or not at all, and .npz archives whose bytes depend on their arrays
alone (a fixed timestamp per entry), written from parts as they come."""

from __future__ import annotations

import os
import zipfile
from typing import Callable, Iterable

import numpy as np

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def write_atomic(path: str, write: Callable[[object], None]) -> None:
    """write(f) into path's temporary name, fsync, rename into place and fsync the folder. On
    any failure (a full disk, a kill signal) the temporary file is removed and nothing is left
    under path's name; an OSError names path."""
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        try:
            os.remove(temporary)
        except OSError:
            pass
        if isinstance(e, OSError) and (not e.filename or e.filename == temporary):
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the rename itself survives a power loss
    except OSError:
        pass
    finally:
        os.close(fd)


def _zip_entry(name: str) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    entry.compress_type = zipfile.ZIP_DEFLATED
    entry.external_attr = 0o644 << 16
    return entry


def write_npz(f, members: dict) -> None:
    """np.savez_compressed's format (np.load reads it), with a fixed timestamp per entry."""
    with zipfile.ZipFile(f, "w") as archive:
        for name, array in members.items():
            with archive.open(_zip_entry(f"{name}.npy"), "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def write_npz_stream(f, name: str, *, shape: tuple, dtype, parts: Iterable[np.ndarray]) -> None:
    """An npz of one array `name` of `shape`, written from `parts` (consecutive slices along axis
    0) as they come: the whole array is never in memory."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    rows = 0
    with zipfile.ZipFile(f, "w") as archive:
        with archive.open(_zip_entry(f"{name}.npy"), "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_1_0(entry, header)
            for part in parts:
                if part.dtype != dtype or part.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"a part of {dtype} {tuple(shape)} is {part.dtype} {part.shape}")
                entry.write(np.ascontiguousarray(part).data)
                rows += part.shape[0]
    if rows != shape[0]:
        raise ValueError(f"{rows} rows written of {shape[0]}")
