"""The `ddim-fast` command line, in-process through main(argv) and once as a subprocess."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_fast.cli import main
from ddim_fast.sampling.noise import slerp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# --- sample ------------------------------------------------------------------------------------------


def test_sample_writes_grid_and_files(tmp_path, capsys):
    grid, d = tmp_path / "grid.png", tmp_path / "samples"
    code, out, _ = _run(capsys, "sample", "--steps", "10", "--num-samples", "6", "--batch-size", "4", "--seed", "3", "--out", str(grid), "--out-dir", str(d), "--scale", "1", "--quiet")
    assert code == 0
    assert re.search(r"6 samples in [\d.]+ s: [\d.]+ ms/sample", out)
    img = np.asarray(Image.open(grid))
    assert img.shape == (2 * 18 + 2, 3 * 18 + 2)  # 2 rows x 3 columns of 16 px + 2 px padding
    cells = [img[2 + 18 * r : 18 + 18 * r, 2 + 18 * c : 18 + 18 * c] for r in range(2) for c in range(3)]
    assert all(cell.std() > 20 for cell in cells), "a blank (or flat) sample in the grid"
    assert sorted(os.listdir(d)) == [".lock"] + [f"{i:06d}.png" for i in range(6)] + ["manifest.json", "samples.npz", "shards"]
    assert sorted(os.listdir(d / "shards")) == ["00000000-00004.npz", "00000004-00002.npz"]
    arr = _npz(d / "samples.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 1) and arr.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(Image.open(d / "000004.png")), arr[4, :, :, 0])
    np.testing.assert_array_equal(cells[4], arr[4, :, :, 0])


def _batch_runs(tmp_path, capsys, device):
    runs = {}
    for bs in ("5", "2"):
        d = tmp_path / f"{device}-{bs}"
        assert _run(capsys, "sample", "--steps", "5", "--num-samples", "5", "--batch-size", bs, "--out-dir", str(d), "--device", device, "--quiet")[0] == 0
        runs[bs] = _npz(d / "samples.npz")["arr_0"]
    return runs


def test_sample_same_seed_same_images_whatever_the_batch(tmp_path, capsys):
    """On the CPU the images are the same bytes whatever the batch size (the kernels do not
    depend on it); the GPU's promise is the test below."""
    runs = _batch_runs(tmp_path, capsys, "cpu")
    np.testing.assert_array_equal(runs["5"], runs["2"])
    d = tmp_path / "other-seed"
    main(["sample", "--steps", "5", "--num-samples", "5", "--seed", "1", "--out-dir", str(d), "--device", "cpu", "--quiet"])
    assert not np.array_equal(runs["5"], _npz(d / "samples.npz")["arr_0"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sample_same_seed_whatever_the_batch_on_cuda_to_one_level(tmp_path, capsys):
    """On a GPU, cuDNN picks convolution algorithms by batch size, so the same image computed
    in a batch of 5 and of 2 differs by fp32 rounding, which can move a pixel across an 8-bit
    rounding boundary: at most one level, in a few pixels (README says so)."""
    runs = _batch_runs(tmp_path, capsys, "cuda")
    diff = np.abs(runs["5"].astype(np.int16) - runs["2"].astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_sample_with_eta_and_clip(tmp_path, capsys):
    code, out, _ = _run(capsys, "sample", "--steps", "4", "--eta", "ddpm_noisy", "--clip", "--skip", "quad", "--num-samples", "2", "--out", str(tmp_path / "g.png"), "--quiet")
    assert code == 0 and "eta=ddpm_noisy" in out and (tmp_path / "g.png").exists()


def test_sample_compare(tmp_path, capsys):
    code, out, _ = _run(capsys, "sample", "--steps", "3", "--num-samples", "2", "--out", str(tmp_path / "g.png"), "--compare", "--quiet")
    assert code == 0
    assert re.search(r"reference [\d.]+ ms/sample, fast [\d.]+ ms/sample \([\d.]+x\)", out)


def test_sample_as_subprocess(tmp_path):
    d = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "ddim_fast.cli", "sample", "--steps", "5", "--num-samples", "3", "--out-dir", str(d), "--out", str(tmp_path / "g.png"), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "ms/sample" in res.stdout
    assert len([f for f in os.listdir(d) if f.endswith(".png")]) == 3
    assert (tmp_path / "g.png").exists()


def test_sample_restart_skips_finished_batches(tmp_path, capsys):
    """A killed run leaves finished shards; the rerun keeps them, samples only what is missing,
    and writes the same samples.npz, byte for byte (tests/test_long_runs.py: damaged shards, other
    settings)."""
    d = tmp_path / "out"
    argv = ("sample", "--steps", "4", "--eta", "0.5", "--num-samples", "7", "--batch-size", "3", "--out-dir", str(d), "--quiet")
    assert _run(capsys, *argv)[0] == 0
    with open(d / "samples.npz", "rb") as f:
        full = f.read()
    # as if the run was killed during the last batch
    os.remove(d / "shards" / "00000006-00001.npz")
    os.remove(d / "samples.npz")
    reused_before = os.stat(d / "shards" / "00000003-00003.npz").st_mtime_ns
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and "1 samples in" in out and "6 more reused from an earlier run" in out
    assert os.stat(d / "shards" / "00000003-00003.npz").st_mtime_ns == reused_before  # read back, not rewritten
    with open(d / "samples.npz", "rb") as f:
        assert f.read() == full
    assert not [f for f in os.listdir(d / "shards") if ".tmp" in f]


def test_sample_killed_and_rerun_gives_the_same_bytes(tmp_path):
    """SIGKILL in the middle of a run, then the same command: samples.npz as an uninterrupted run's."""
    argv = [sys.executable, "-m", "ddim_fast.cli", "sample", "--steps", "20", "--num-samples", "40", "--batch-size", "4", "--quiet"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run([*argv, "--out-dir", str(whole)], cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    run = subprocess.Popen([*argv, "--out-dir", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(os.listdir(killed / "shards") if (killed / "shards").exists() else []) < 2:
            time.sleep(0.05)
    finally:
        run.kill()
        run.wait()
    assert not (killed / "samples.npz").exists(), "the run finished before it was killed; make it longer"
    res = subprocess.run([*argv, "--out-dir", str(killed)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "more reused from an earlier run" in res.stdout, res.stdout + res.stderr
    with open(whole / "samples.npz", "rb") as a, open(killed / "samples.npz", "rb") as b:
        assert a.read() == b.read()
    assert not [f for _, _, names in os.walk(killed) for f in names if ".tmp" in f]


def test_sample_sharded_over_two_processes(tmp_path, capsys):
    """torchrun with 2 gloo processes writes the same K images as one process."""
    one = tmp_path / "one"
    # both on the CPU: gloo shards CPU work here, and a GPU run would differ by rounding (above)
    common = ["--steps", "4", "--eta", "1", "--num-samples", "7", "--batch-size", "2", "--device", "cpu", "--quiet"]
    assert _run(capsys, "sample", *common, "--out-dir", str(one))[0] == 0
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddim_fast.cli",
         "sample", *common, "--out-dir", str(two)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rank 0 of 2" in res.stdout and "rank 1 of 2" in res.stdout
    merged = _npz(two / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(merged, _npz(one / "samples.npz")["arr_0"])
    assert sorted(f for f in os.listdir(two) if f.endswith(".png")) == [f"{i:06d}.png" for i in range(7)]
    np.testing.assert_array_equal(np.asarray(Image.open(two / "000005.png")), merged[5, :, :, 0])


def test_sample_without_out_dir_under_torchrun(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _run(capsys, "sample", "--steps", "2")
    assert code == 2 and "--out-dir" in err and len(err.strip().splitlines()) == 1


def test_sample_from_an_official_layout_checkpoint(tmp_path, capsys):
    """A bare state dict in the official layout: the config is read off the weights (no --config)."""
    from ddim_fast import UNet

    torch.manual_seed(0)
    cifar = UNet.from_config("cifar10")
    ckpt = tmp_path / "model-790000.ckpt"
    torch.save(cifar.state_dict(), ckpt)
    code, out, _ = _run(capsys, "sample", "--model", str(ckpt), "--steps", "2", "--num-samples", "1", "--out", str(tmp_path / "g.png"), "--quiet")
    assert code == 0 and "checkpoint" in out and "ch=128" in out and "resolution=32" in out
    cifar = UNet.from_config("cifar10")
    small = dict(cifar.state_dict())
    small["conv_in.weight"] = small["conv_in.weight"][:, :1]  # a wrong shape
    torch.save(small, ckpt)
    code, _, err = _run(capsys, "sample", "--model", str(ckpt), "--config", "cifar10", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert code == 2 and "conv_in.weight" in err and len(err.strip().splitlines()) == 1


def test_sample_from_a_trained_file(tmp_path, capsys):
    """`train` writes a pretrained file that `sample --model FILE` loads (2 steps: not a good model)."""
    model_file = tmp_path / "m.pt"
    code, out, _ = _run(capsys, "train", "--steps", "2", "--batch-size", "4", "--out", str(model_file), "--quiet")
    assert code == 0 and "final loss" in out and model_file.exists()
    code, out, _ = _run(capsys, "sample", "--model", str(model_file), "--steps", "2", "--num-samples", "2", "--out", str(tmp_path / "g.png"), "--quiet")
    assert code == 0 and "file" in out


# --- encode, interpolate, bench, quality -------------------------------------------------------------------


def test_encode_digits(tmp_path, capsys):
    out = tmp_path / "lat.npz"
    code, stdout, _ = _run(capsys, "encode", "--input", "digits", "--num-samples", "3", "--steps", "20", "--out", str(out), "--reconstruct", "--quiet")
    assert code == 0
    z = _npz(out)
    assert z["latents"].shape == (3, 1, 16, 16) and np.isfinite(z["latents"]).all()
    assert z["labels"].tolist() == [0, 1, 2] and int(z["steps"]) == 20
    mse = float(re.search(r"scale ([\d.e+-]+)", stdout).group(1))
    assert mse < 0.01  # encode then decode gives the digits back
    assert 0.5 < float(np.std(z["latents"])) < 2  # about unit-variance noise, not images


def test_encode_sampled_npz(tmp_path, capsys):
    d = tmp_path / "s"
    main(["sample", "--steps", "5", "--num-samples", "2", "--out-dir", str(d), "--quiet"])
    code, _, _ = _run(capsys, "encode", "--input", str(d / "samples.npz"), "--steps", "5", "--out", str(tmp_path / "z.npz"), "--quiet")
    assert code == 0 and _npz(tmp_path / "z.npz")["latents"].shape == (2, 1, 16, 16)
    code, _, _ = _run(capsys, "encode", "--input", str(d), "--steps", "5", "--out", str(tmp_path / "z2.npz"), "--quiet")
    assert code == 0
    np.testing.assert_allclose(_npz(tmp_path / "z2.npz")["latents"], _npz(tmp_path / "z.npz")["latents"])


def test_interpolate(tmp_path, capsys):
    png = tmp_path / "i.png"
    code, out, _ = _run(capsys, "interpolate", "--seeds", "4", "9", "--frames", "5", "--steps", "10", "--out", str(png), "--scale", "1", "--quiet")
    assert code == 0
    img = np.asarray(Image.open(png))
    assert img.shape == (18 + 2, 5 * 18 + 2)
    frames = [img[2:18, 2 + 18 * i : 18 + 18 * i].astype(int) for i in range(5)]
    # the ends are the first images of `sample --seed 4` and `--seed 9`
    for seed, frame in ((4, frames[0]), (9, frames[-1])):
        d = tmp_path / f"s{seed}"
        main(["sample", "--steps", "10", "--num-samples", "1", "--seed", str(seed), "--out-dir", str(d), "--quiet"])
        assert np.abs(_npz(d / "samples.npz")["arr_0"][0, :, :, 0].astype(int) - frame).max() <= 1
    assert np.abs(frames[0] - frames[-1]).mean() > 5


def test_slerp():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 8, 8, generator=g), torch.randn(1, 8, 8, generator=g)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() - (a.norm() + b.norm()) / 2) < 0.1 * a.norm()  # stays near the sphere, unlike lerp
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)


def test_bench(capsys):
    code, out, _ = _run(capsys, "bench", "--steps", "2", "3", "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--quiet")
    assert code == 0
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", out, re.M)
    assert [r[0] for r in rows] == ["2", "3"]
    for _, ref, fast, ratio, _ in rows:
        assert float(ratio) == pytest.approx(float(fast) / float(ref), rel=0.02, abs=0.002)


def test_quality_quick_json(tmp_path, capsys):
    path = tmp_path / "q" / "quality.json"
    code, out, _ = _run(capsys, "quality", "--quick", "--num-samples", "4", "--num-reconstruct", "2", "--steps", "2", "3", "--recon-steps", "2", "4", "--json", str(path), "--quiet")
    assert code == 0, out
    res = json.loads(path.read_text())
    etas = [0.0, 1.0, "ddpm_noisy"]  # the quick run's rows (--steps without 1000: no reduced column)
    assert [(r["eta"], r["steps"]) for r in res["fid"]] == [(e, s) for e in etas for s in (2, 3)]
    assert res["meta"]["cells"] == [{"eta": e, "steps": s, "num_samples": 4} for e in etas for s in (2, 3)]
    assert all(isinstance(r["fid"], float) and r["fid"] >= 0 for r in res["fid"])
    assert [r["steps"] for r in res["reconstruction"]] == [2, 4]
    assert all(r["mse"] > 0 for r in res["reconstruction"])
    assert res["meta"]["mode"] == "quick" and res["meta"]["settings"]["num_samples"] == 4
    assert "| η \\ S | 2 | 3 |" in out


def test_sample_a_digit_with_guidance(tmp_path, capsys):
    grid = tmp_path / "sevens.png"
    code, out, _ = _run(capsys, "sample", "--digit", "7", "--guidance", "2", "--steps", "10", "--num-samples", "8", "--batch-size", "4", "--out", str(grid), "--quiet")
    assert code == 0, out
    assert "embedded 'digits-cond'" in out and "digit 7, guidance 2" in out
    hits = int(re.search(r"the digit classifier reads (\d+) of 8 samples as a 7", out).group(1))
    assert hits >= 6  # guided sevens of the trained model (seeded: the same run every time)
    code, out_all, _ = _run(capsys, "sample", "--digit", "all", "--guidance", "2", "--steps", "10", "--num-samples", "10", "--out", str(tmp_path / "all.png"), "--quiet")
    assert code == 0 and re.search(r"reads \d+ of 10 samples as the digit asked for", out_all)


def test_guidance_command_json(tmp_path, capsys):
    path = tmp_path / "g.json"
    code, out, _ = _run(capsys, "guidance", "--scales", "0", "3", "--per-digit", "3", "--steps", "5", "--json", str(path), "--quiet")
    assert code == 0, out
    res = json.loads(path.read_text())
    assert [r["w"] for r in res["rows"]] == [0.0, 3.0]
    for r in res["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["confidence"] <= 1
        assert sorted(int(d) for d in r["per_digit"]) == list(range(10))
    assert res["settings"]["per_digit"] == 3 and res["meta"]["model"] == "embedded 'digits-cond'"
    assert "| guidance w |" in out


# --- bad arguments: one line on stderr, exit code 2 -------------------------------------------------------


@pytest.mark.parametrize(
    "argv,match",
    [
        (["sample", "--steps", "0"], "--steps"),
        (["sample", "--steps", "2000"], "steps must be in"),  # the sampler's own check
        (["sample", "--eta", "2"], "--eta"),
        (["sample", "--eta", "lots"], "--eta"),
        (["sample", "--skip", "bogus"], "--skip"),
        (["sample", "--skip", "5,5"], "distinct"),
        (["sample", "--model", "no/such/file.pt"], "not a file"),
        (["sample", "--model", "cifar10", "--config", "celeba"], "--config"),
        (["sample", "--num-samples", "-3"], "--num-samples"),
        (["sample", "--dtype", "fp64"], "--dtype"),
        (["interpolate", "--frames", "1"], "--frames"),
        (["encode", "--input", "nothing.txt"], "--input"),
        (["quality", "--etas", "0", "7"], "--etas"),
        (["sample", "--guidance", "2"], "--guidance needs --digit"),
        (["sample", "--digit", "10"], "--digit must be a class of the model, 0 to 9"),
        (["sample", "--digit", "seven"], "--digit"),
        (["sample", "--digit", "3", "--guidance", "nan"], "--guidance"),
        (["sample", "--digit", "3", "--model", "cifar10", "--quiet"], "needs a class-conditional model"),
        (["guidance", "--model", "digits"], "not class-conditional"),
        (["guidance", "--scales", "inf"], "--scales"),
        (["train", "--label-dropout", "0.2"], "--label-dropout needs --conditional"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written by accident
    code, out, err = _run(capsys, *argv)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and match in lines[0]
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_bad_checkpoint_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    code, _, err = _run(capsys, "sample", "--model", str(bad), "--out", str(tmp_path / "g.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when there is no GPU")
def test_cuda_without_gpu(capsys):
    code, _, err = _run(capsys, "sample", "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_bad_argument_as_subprocess():
    res = subprocess.run([sys.executable, "-m", "ddim_fast.cli", "sample", "--eta", "3"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_help(capsys):
    code, out, _ = _run(capsys, "sample", "--help")
    assert code == 0 and "--batch-size" in out and "eta=0" in out
