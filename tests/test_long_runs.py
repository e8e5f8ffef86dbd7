"""Long `ddim-fast sample --out-dir` runs: resume keyed by what was asked, shards that prove
themselves, paths checked before any work, one process per folder, full disks, bounded memory,
and no pickles (CPU, the embedded digits model)."""

import errno
import hashlib
import os
import subprocess
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fast.apps.runs import run_folder
from ddim_fast.apps.pretrained import read_pretrained
from ddim_fast.apps.runs.files import write_npz
from ddim_fast.apps.runs.run_folder import RunFolder, RunFolderError, batches
from ddim_fast.cli import main
from ddim_fast.sampling import FastSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ("sample", "--steps", "3", "--eta", "0.5", "--num-samples", "7", "--batch-size", "3", "--quiet")
SHARDS = ["00000000-00003.npz", "00000003-00003.npz", "00000006-00001.npz"]


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _pngs(folder) -> list:
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


def _temporaries(folder) -> list:
    return [os.path.join(d, name) for d, _, names in os.walk(folder) for name in names if ".tmp" in name]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of RUN: its folder and samples.npz's bytes."""
    folder = tmp_path_factory.mktemp("finished") / "out"
    assert main([*RUN, "--out-dir", str(folder)]) == 0
    return folder, _bytes(folder / "samples.npz")


@pytest.fixture
def done(finished, tmp_path):
    """A copy of the finished run's folder to damage."""
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(finished[0], folder)
    return folder


# --- 1. a rerun with other arguments refuses, naming the difference ----------------------------------


def _other_weights_file(path):
    obj = read_pretrained(os.path.join(ROOT, "ddim_fast", "apps", "pretrained", "digits.pt"))
    name = next(iter(obj["state_dict"]))
    obj["state_dict"][name] = obj["state_dict"][name] + 1e-3
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize(
    "change, named",
    [
        (["--seed", "1"], "seed 0 there, 1 now"),
        (["--steps", "4"], "steps 3 there, 4 now"),
        (["--eta", "0"], "eta 0.5 there, 0.0 now"),
        (["--batch-size", "2"], "batch_size 3 there, 2 now"),
        (["--num-samples", "5"], "num_samples 7 there, 5 now"),
        (["--dtype", "bf16"], 'dtype "fp32" there, "bf16" now'),
        (["--clip"], "clip null there, [-1.0, 1.0] now"),
        (["--skip", "quad"], "grid"),
        (["--digit", "3"], "model_sha256"),
        ("other weights", "model_sha256"),
    ],
)
def test_a_rerun_with_other_settings_refuses_and_touches_nothing(done, finished, capsys, tmp_path, change, named):
    if change == "other weights":
        change = ["--model", _other_weights_file(tmp_path / "other.pt")]
    (done / ".lock").write_text("pid 1 on the host of the first run\n")  # a refused run must not even claim the lock
    before = {name: _bytes(done / name) for name in os.listdir(done) if os.path.isfile(done / name)}
    code, out, err = _run(capsys, *RUN, *change, "--out-dir", str(done))
    line = _one_line_error(err)
    assert code == 2 and "other settings" in line and named in line and "--overwrite" in line
    assert out == ""
    assert {name: _bytes(done / name) for name in os.listdir(done) if os.path.isfile(done / name)} == before
    assert sorted(os.listdir(done / "shards")) == SHARDS


def test_the_same_settings_resume_and_the_summary_counts_what_was_reused(done, finished, capsys):
    os.remove(done / "shards" / SHARDS[2])
    os.remove(done / "samples.npz")
    code, out, _ = _run(capsys, *RUN, "--out-dir", str(done))
    assert code == 0
    assert "1 samples in" in out and "6 more reused from an earlier run" in out
    assert _bytes(done / "samples.npz") == finished[1]


def test_overwrite_starts_over_and_leaves_no_png_of_the_other_run(done, capsys):
    (done / "notes.txt").write_text("the user's own file")
    code, out, err = _run(capsys, *RUN, "--num-samples", "4", "--seed", "2", "--overwrite", "--out-dir", str(done))
    assert code == 0, err
    assert "4 samples in" in out and "reused" not in out
    assert _pngs(done) == [f"{i:06d}.png" for i in range(4)]
    assert sorted(os.listdir(done / "shards")) == ["00000000-00003.npz", "00000003-00001.npz"]
    assert (done / "notes.txt").read_text() == "the user's own file"
    with np.load(done / "samples.npz") as f:
        assert f["arr_0"].shape == (4, 16, 16, 1)


def test_a_folder_of_samples_without_a_manifest_is_refused(done, capsys):
    os.remove(done / "manifest.json")  # as an older ddim-fast left it
    os.remove(done / ".lock")
    code, _, err = _run(capsys, *RUN, "--out-dir", str(done))
    assert code == 2 and "no manifest.json" in _one_line_error(err)
    assert not (done / ".lock").exists()


def test_a_folder_with_other_files_only_is_used(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    mine = ["README", "backup.tmp5", "data.tmp-3", "000001.png.bak"]
    for name in mine:
        (folder / name).write_text("mine")
    assert _run(capsys, *RUN, "--num-samples", "2", "--out-dir", str(folder))[0] == 0
    assert _run(capsys, *RUN, "--num-samples", "3", "--overwrite", "--out-dir", str(folder))[0] == 0
    assert all((folder / name).read_text() == "mine" for name in mine)


@pytest.mark.parametrize("obstacle", ["shards", "000002.png", "manifest.json"])
def test_a_run_file_that_is_not_a_file_is_refused_before_anything_is_removed(done, capsys, obstacle):
    import shutil

    if obstacle == "shards":
        shutil.rmtree(done / "shards")
        (done / "shards").write_text("not a folder")
    else:
        os.remove(done / obstacle)
        (done / obstacle).mkdir()
    names = sorted(os.listdir(done))
    code, _, err = _run(capsys, *RUN, "--overwrite", "--out-dir", str(done))
    line = _one_line_error(err)
    assert code == 2 and str(done / obstacle) in line and "move it away" in line
    assert sorted(os.listdir(done)) == names


def test_a_manifest_that_is_not_one_is_refused_in_one_line(done, capsys):
    (done / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = _run(capsys, *RUN, "--out-dir", str(done))
    assert code == 2 and "manifest.json cannot be read" in _one_line_error(err)
    (done / "manifest.json").write_text("[1, 2]")
    code, _, err = _run(capsys, *RUN, "--out-dir", str(done))
    assert code == 2 and "not a ddim-fast sampling manifest" in _one_line_error(err)
    assert _run(capsys, *RUN, "--overwrite", "--out-dir", str(done))[0] == 0


def test_the_digest_of_a_diffusers_model_does_not_depend_on_where_it_was_loaded_from():
    from diffusers import UNet2DModel

    from ddim_fast.apps.runs.run_folder import model_digest

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    first = model_digest(model)
    model.register_to_config(_name_or_path="/somewhere/else")
    assert model_digest(model) == first
    with torch.no_grad():
        next(model.parameters())[0] += 1e-3
    assert model_digest(model) != first


# --- 2-3. shards that prove themselves -------------------------------------------------------------


def _truncate(path):
    data = _bytes(path)
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte_of_the_images(path):
    with zipfile.ZipFile(path) as archive:
        entry = archive.getinfo("arr_0.npy")
    data = bytearray(_bytes(path))
    local_header = 30 + int.from_bytes(data[entry.header_offset + 26 : entry.header_offset + 28], "little") + int.from_bytes(data[entry.header_offset + 28 : entry.header_offset + 30], "little")
    data[entry.header_offset + local_header + entry.compress_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _rewrite(path, **changes):
    with np.load(path) as f:
        members = {k: f[k] for k in f.files}
    members.update(changes)
    members = {k: v for k, v in members.items() if v is not None}
    with open(path, "wb") as f:
        write_npz(f, members)


def _with_its_digest(images):
    return dict(arr_0=images, sha256=np.array(hashlib.sha256(np.ascontiguousarray(images)).hexdigest()))


DAMAGE = {
    "truncated": (_truncate, "unreadable"),
    "empty": (lambda p: p.write_bytes(b""), "unreadable"),
    "a flipped byte": (_flip_a_byte_of_the_images, "unreadable"),
    "zeros, no digest": (lambda p: np.savez_compressed(p, arr_0=np.zeros((3, 16, 16, 1), np.uint8)), "holds ['arr_0']"),
    "zeros, the old digest": (lambda p: _rewrite(p, arr_0=np.zeros((3, 16, 16, 1), np.uint8)), "do not match their sha256"),
    "another shape": (lambda p: _rewrite(p, **_with_its_digest(np.zeros((3, 16, 16, 3), np.uint8))), "not uint8 (3, 16, 16, 1)"),
    "float64": (lambda p: _rewrite(p, **_with_its_digest(np.zeros((3, 16, 16, 1), np.float64))), "float64"),
    "another run's": (lambda p: _rewrite(p, run=np.array("0" * 64)), "another run"),
    "another batch's": (lambda p: p.write_bytes(_bytes(p.parent / SHARDS[0])), "the batch from sample 0, not 3"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_is_sampled_again_and_the_result_is_byte_identical(done, finished, capsys, damage):
    spoil, reason = DAMAGE[damage]
    shard = done / "shards" / SHARDS[1]
    spoil(shard)
    os.remove(done / "samples.npz")
    code, out, err = _run(capsys, *RUN, "--out-dir", str(done))
    assert code == 0, err
    lines = [line for line in err.splitlines() if "shard" in line]
    assert len(lines) == 1 and str(shard) in lines[0] and reason in lines[0] and "sampling its batch again" in lines[0]
    assert "3 samples in" in out and "4 more reused" in out
    assert _bytes(done / "samples.npz") == finished[1]


def test_missing_pngs_of_a_finished_shard_are_written_from_it(done, finished, capsys):
    reference = np.asarray(Image.open(finished[0] / "000004.png"))
    for index in (1, 4):
        os.remove(done / f"{index:06d}.png")
    code, out, _ = _run(capsys, *RUN, "--out-dir", str(done))
    assert code == 0 and "0 samples in" in out and "wrote 2 PNGs (the other 5 were there)" in out
    np.testing.assert_array_equal(np.asarray(Image.open(done / "000004.png")), reference)


def test_every_file_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    assert main([*RUN, "--out-dir", str(tmp_path / "out")]) == 0
    renamed = [path for kind, path in events if kind == "replace"]
    assert len(renamed) == 7 + 3 + 2  # PNGs, shards, the manifest and samples.npz
    for path in renamed:
        position = events.index(("replace", path))
        assert ("fsync", os.path.realpath(path)) in events[:position], path


def test_leftover_temporary_files_are_removed_at_start(done, capsys):
    (done / "000003.png.tmp-99999").write_bytes(b"")
    (done / "shards" / f"{SHARDS[0]}.tmp-99999").write_bytes(b"half")
    (done / "shards" / f"{SHARDS[1]}.tmp4242.npz").write_bytes(b"")  # the name before the manifest
    assert _run(capsys, *RUN, "--out-dir", str(done))[0] == 0
    assert _temporaries(done) == []


def test_the_archives_are_the_same_bytes_for_the_same_images(tmp_path):
    images = np.arange(2 * 5 * 3 * 3, dtype=np.uint8).reshape(2, 5, 3, 3)
    for name in ("a.npz", "b.npz"):
        with open(tmp_path / name, "wb") as f:
            write_npz(f, {"arr_0": images})
        time.sleep(0.01)
    assert _bytes(tmp_path / "a.npz") == _bytes(tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(f["arr_0"], images)


# --- 4. paths are checked before any work -----------------------------------------------------------


@pytest.fixture
def no_sampling(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("sampled before the paths were checked")

    monkeypatch.setattr(FastSampler, "sample", refuse)


@pytest.mark.parametrize(
    "options, words",
    [
        (lambda t: ["--out", str(t / "a-file" / "x.png")], "is a file, not a folder"),
        (lambda t: ["--out", str(t / "grid.webpx")], "cannot write images as '.webpx'"),
        (lambda t: ["--out", str(t)], "is a folder"),
        (lambda t: ["--out", str(t / "grid")], "needs an image extension"),
        (lambda t: ["--out-dir", str(t / "a-file")], "not a folder"),
        (lambda t: ["--out-dir", str(t / "a-file" / "d")], "is a file, not a folder"),
        (lambda t: ["--out-dir", str(t / "d"), "--out", str(t / "d" / "000003.png")], "one of the files the run writes"),
        (lambda t: ["--out-dir", ""], "must name a folder"),
    ],
)
def test_a_bad_output_path_fails_in_under_a_second_with_no_sampling(tmp_path, capsys, no_sampling, options, words):
    (tmp_path / "a-file").write_text("x")
    start = time.perf_counter()
    code, out, err = _run(capsys, *RUN, *options(tmp_path))
    assert time.perf_counter() - start < 1.0
    assert code == 2 and words in _one_line_error(err) and out == ""


def test_interpolate_checks_its_out_first(tmp_path, capsys, no_sampling):
    code, _, err = _run(capsys, "interpolate", "--steps", "2", "--out", str(tmp_path / "x.bmpq"))
    assert code == 2 and ".bmpq" in _one_line_error(err)


# --- 5. one process per folder ----------------------------------------------------------------------


def test_a_second_process_on_the_folder_refuses_and_a_killed_one_leaves_no_stale_lock(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(f'pid {os.getpid()} on here'); f.flush(); print('held', flush=True); time.sleep(120)", str(folder / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out, err = _run(capsys, *RUN, "--out-dir", str(folder))
        line = _one_line_error(err)
        assert code == 2 and "in use by another ddim-fast run" in line and f"pid {holder.pid}" in line
        assert not (folder / "shards").exists() and _pngs(folder) == []
    finally:
        holder.kill()  # SIGKILL: the OS releases its lock
        holder.wait()
    assert _run(capsys, *RUN, "--out-dir", str(folder))[0] == 0


def test_a_run_that_would_be_refused_says_in_use_while_another_holds_the_folder(done, tmp_path, capsys):
    import fcntl

    with open(done / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.truncate(0)
        holder.write("pid 4242 on the other host")
        holder.flush()
        code, _, err = _run(capsys, *RUN, "--seed", "1", "--out-dir", str(done))
    assert code == 2 and "in use by another ddim-fast run (pid 4242 on the other host" in _one_line_error(err)


def test_the_lock_is_held_while_the_run_goes_on(tmp_path):
    folder = RunFolder(str(tmp_path), {"seed": 0}, num_samples=2, batch_size=1, image_shape=(1, 4, 4)).open()
    try:
        with pytest.raises(RunFolderError, match="in use"):
            RunFolder(str(tmp_path), {"seed": 0}, num_samples=2, batch_size=1, image_shape=(1, 4, 4)).open()
    finally:
        folder.close()
    RunFolder(str(tmp_path), {"seed": 0}, num_samples=2, batch_size=1, image_shape=(1, 4, 4)).open().close()


def _torchrun(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddim_fast.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _rank_errors(stderr: str) -> list:
    """Each rank's one-line error (two ranks may write theirs onto one line of the shared stderr)."""
    return ["ddim-fast: error:" + part for part in stderr.split("ddim-fast: error:")[1:]]


def test_under_torchrun_a_refusal_or_an_error_of_rank_0_stops_every_rank_with_one_line(done, tmp_path):
    # torchrun itself then reports ChildFailedError with its own traceback; ours must not have one
    refused = _torchrun(*RUN, "--seed", "1", "--device", "cpu", "--out-dir", str(done))
    errors = _rank_errors(refused.stderr)
    assert refused.returncode != 0 and len(errors) == 2 and all("seed 0 there, 1 now" in e for e in errors), refused.stderr
    assert f"{os.sep}ddim_fast{os.sep}" not in refused.stderr  # no traceback through our code
    broken = tmp_path / "broken"
    (broken / ".lock").mkdir(parents=True)  # the lock cannot be opened: an OSError, not a refusal
    failed = _torchrun(*RUN, "--device", "cpu", "--out-dir", str(broken))
    errors = _rank_errors(failed.stderr)
    assert failed.returncode != 0 and len(errors) == 2 and all(".lock" in e for e in errors), failed.stderr
    assert f"{os.sep}ddim_fast{os.sep}" not in failed.stderr


# --- 6. a full disk -----------------------------------------------------------------------------------


def _full_disk():
    def write(*args, **kwargs):
        f = next(a for a in args if hasattr(a, "write"))
        f.write(b"\0" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("what", ["shard", "png", "merge"])
def test_a_full_disk_gives_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch, finished, what):
    folder = tmp_path / "out"
    if what == "shard":
        monkeypatch.setattr(run_folder, "write_npz", _full_disk())
    elif what == "png":
        monkeypatch.setattr("ddim_fast.cli.sample.encode_png", _full_disk())
    else:
        monkeypatch.setattr(run_folder, "write_npz_stream", _full_disk())
    code, out, err = _run(capsys, *RUN, "--out-dir", str(folder))
    line = _one_line_error(err)
    assert code == 2 and "No space left on device" in line and str(folder) in line
    assert _temporaries(folder) == []
    assert all(os.path.getsize(folder / name) > 0 for name in _pngs(folder))
    assert not (folder / "samples.npz").exists()
    monkeypatch.undo()
    assert _run(capsys, *RUN, "--out-dir", str(folder))[0] == 0
    assert _bytes(folder / "samples.npz") == finished[1]


# --- 8. sizes: planned lazily, refused when they cannot fit -------------------------------------------


def test_a_trillion_samples_plan_without_a_list():
    tracemalloc.start()
    start = time.perf_counter()
    plan = batches(10**12, 64)
    first = next(plan)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert first == (0, 0, 64) and elapsed < 0.1 and peak < 100_000


def test_a_trillion_samples_in_memory_are_refused(tmp_path, capsys, no_sampling):
    code, _, err = _run(capsys, *RUN, "--num-samples", str(10**12), "--out", str(tmp_path / "g.png"))
    assert code == 2 and "--out-dir" in _one_line_error(err)


def test_a_trillion_samples_to_a_folder_start_at_once(tmp_path, capsys, monkeypatch):
    calls = []

    def interrupted(*_a, **_k):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(FastSampler, "sample", interrupted)
    start = time.perf_counter()
    code, _, err = _run(capsys, *RUN, "--num-samples", str(10**12), "--out-dir", str(tmp_path / "out"))
    assert code == 130 and calls == [1] and time.perf_counter() - start < 10
    assert "warning" in err and "GiB free" in err  # 10**12 digits need more disk than there is


def test_a_batch_that_does_not_fit_in_memory_names_the_batch_size(tmp_path, capsys, monkeypatch):
    def out_of_memory(*_a, **_k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 40000000000000 bytes")

    monkeypatch.setattr(FastSampler, "sample", out_of_memory)
    code, _, err = _run(capsys, *RUN, "--out-dir", str(tmp_path / "out"))
    assert code == 2 and "lower --batch-size" in _one_line_error(err)


# --- 9. bounded memory: the merge streams, the grid is capped ------------------------------------------


def test_the_merge_holds_one_shard_at_a_time(tmp_path):
    shape = (8, 64, 64, 3)
    folder = RunFolder(str(tmp_path), {}, num_samples=100 * shape[0], batch_size=shape[0], image_shape=(3, 64, 64)).open()
    rng = np.random.default_rng(0)
    for _, start, count in batches(folder.num_samples, folder.batch_size):
        folder.write_shard(start, count, rng.integers(0, 256, shape, dtype=np.uint8))
    shard_bytes = int(np.prod(shape))
    tracemalloc.start()
    path = folder.merge()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    folder.close()
    # a shard read, its copy into the archive, and zlib's fixed state (about 0.5 MiB); the
    # whole set is 100 shards (9.4 MiB), which the merge used to hold twice
    assert peak < 3 * shard_bytes + 2**20, (peak, shard_bytes)
    with np.load(path) as f:
        merged = f["arr_0"]
    assert merged.shape == (800, 64, 64, 3)
    np.testing.assert_array_equal(merged[8:16], folder.read_shard(8, 8))


def test_the_grid_is_capped_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ddim_fast.cli.common.GRID_MAX_IMAGES", 4)
    code, out, _ = _run(capsys, *RUN, "--num-samples", "6", "--out", str(tmp_path / "g.png"), "--scale", "1", "--out-dir", str(tmp_path / "out"))
    assert code == 0 and "first 4 of 6 samples" in out
    assert Image.open(tmp_path / "g.png").size == (2 * 18 + 2, 2 * 18 + 2)


# --- 2/5. no pickles: a planted one runs nothing, wherever a user file is read -------------------------


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


@pytest.mark.parametrize(
    "argv, suffix",
    [
        (lambda f, t: ["train", "--steps", "1", "--checkpoint", f, "--out", str(t / "o.pt")], ".pt"),
        (lambda f, t: ["sample", "--model", f, "--num-samples", "1", "--steps", "2", "--out", str(t / "g.png")], ".pt"),
        (lambda f, t: ["encode", "--input", f, "--out", str(t / "z.npz")], ".npz"),
    ],
)
def test_a_planted_pickle_runs_nothing(tmp_path, capsys, argv, suffix):
    marker = tmp_path / "the-pickle-ran"
    planted = tmp_path / f"planted{suffix}"
    if suffix == ".pt":
        torch.save({"model": _RunsCode(str(marker)), "state_dict": {}}, planted)
    else:
        np.savez(planted, arr_0=np.array([_RunsCode(str(marker))], dtype=object))
    code, _, err = _run(capsys, *argv(str(planted), tmp_path))
    assert code == 2, err
    _one_line_error(err)
    assert not marker.exists()
    # the plant is real: an unsafe load runs it
    if suffix == ".pt":
        torch.load(planted, weights_only=False)
    else:
        np.load(planted, allow_pickle=True)["arr_0"]
    assert marker.exists()
