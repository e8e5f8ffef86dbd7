"""How the native kernels get here: a build without torch ships the sources and compiles
nothing; the first process that needs the kernels compiles them (two at once: one builds,
the other waits and loads); a cache for another torch is never looked in; no compiler or
an unwritable cache leaves the package working on PyTorch, with the reason."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ddim_fast.ops import build, jit
from ddim_fast.ops.extension import stale_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
HAVE_TOOLS = shutil.which(os.environ.get("CXX", "c++")) is not None
needs_compiler = pytest.mark.skipif(not HAVE_TOOLS, reason="no C++ compiler on PATH: the first-use build cannot run here")

# Prints what backends() says of the CPU kernels, and checks them against the PyTorch backend.
_PROBE = textwrap.dedent(
    """
    import json, warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as w:
        import ddim_fast
        from ddim_fast import FastSampler, Schedule, UNet, ops
        b = ddim_fast.backends()["cpu"]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 8, 5, 7, generator=g)
        err = None
        if b["available"]:
            native = ops.group_norm_silu(x, 4, None, None, backend="cpu")
            err = float((native - ops.group_norm_silu(x, 4, None, None, backend="torch")).abs().max())
        m = UNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, in_channels=1, out_ch=1, resolution=4).eval()
        y = FastSampler(m, Schedule.linear(), steps=3).sample(torch.randn(2, 1, 4, 4, generator=g))
    warned = [str(x.message) for x in w if "fused native cpu ops are off" in str(x.message)]
    print("RESULT " + json.dumps({"available": b["available"], "build": b["build"], "path": b["path"], "reason": b["reason"],
                                  "err": err, "finite": bool(torch.isfinite(y).all()), "warnings": len(warned), "file": ddim_fast.__file__}))
    """
)


def _env(cache, **extra):
    env = dict(os.environ, DDIM_FAST_CACHE_DIR=str(cache), DDIM_FAST_JIT="1", DDIM_FAST_SKIP_CUDA="1", **extra)
    for k in ("TRITON_INTERPRET", "DDIM_FAST_DISABLE_EXTENSION"):
        env.pop(k, None)
    return env


def _result(proc_stdout: str) -> dict:
    line = next(line for line in proc_stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _probe(env, cwd):
    """Runs _PROBE in a fresh process, in `cwd` (`python -c` puts the working folder first on sys.path)."""
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return _result(res.stdout), res.stderr


# --- the install: a build that cannot see torch --------------------------------------------


def test_a_build_without_torch_ships_the_sources_and_compiles_nothing(tmp_path):
    """What pip's isolated build does (no torch in it): setup.py says so, installs csrc/ as
    ddim_fast/_csrc, and the first-use build finds the sources there."""
    hide_torch = f"import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '-q', 'build_py', '--build-lib', {str(tmp_path)!r}]; runpy.run_path('setup.py', run_name='__main__')"
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", hide_torch], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch is not visible to this build" in res.stderr and "first use" in res.stderr
    installed = tmp_path / "ddim_fast"
    shipped = sorted(os.path.relpath(p, installed / "_csrc") for p in map(str, (installed / "_csrc").rglob("*")) if os.path.isfile(p))
    expected = sorted(os.path.relpath(p, CSRC) for p in map(str, __import__("pathlib").Path(CSRC).rglob("*")) if os.path.isfile(p))
    assert shipped == expected and "ops.cpp" in shipped and "cuda/group_norm_silu.cu" in shipped
    assert not list(installed.glob("_C*.so"))
    assert build.source_root(str(installed)) == str(installed / "_csrc")
    assert build.source_root(os.path.join(ROOT, "ddim_fast")) == CSRC  # a source tree or an editable install
    assert build.sources_digest(str(installed / "_csrc")) == build.sources_digest(CSRC)


# --- the first-use build -------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A kernel cache made by two processes that start at once on an empty cache folder."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache), cwd=cache) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return cache, [(_result(out), err) for out, err in outs]


@needs_compiler
@pytest.mark.slow  # compiles the CPU kernels: about 20 s on 2 cores
def test_two_processes_at_once_build_the_kernels_once_and_both_load_them(built_cache):
    cache, runs = built_cache
    hows = sorted(r["build"] for r, _ in runs)
    assert hows == ["jit-built", "jit-cached"], runs
    (builder, builder_err), = [(r, e) for r, e in runs if r["build"] == "jit-built"]
    assert "compiling the native CPU kernels" in builder_err and "built in" in builder_err
    for r, _ in runs:
        assert r["available"] and r["warnings"] == 0 and r["finite"]
        assert r["err"] is not None and r["err"] < 1e-5
        assert r["path"] == builder["path"] and r["path"].startswith(str(cache))
    folders = [p for p in os.listdir(cache) if os.path.isdir(os.path.join(cache, p))]
    assert len(folders) == 1 and folders[0].startswith(f"torch{torch.__version__}-cpu-")
    # a third process loads the cache and compiles nothing
    third, err = _probe(_env(cache), cwd=cache)
    assert third["build"] == "jit-cached" and third["available"] and "compiling" not in err


def _package_copy(tmp_path, record_torch=None):
    """ddim_fast and csrc/ copied under tmp_path, with a planted ahead-of-time library (not a
    loadable one) whose record names `record_torch`, if given."""
    dest = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "ddim_fast"), dest / "ddim_fast", ignore=shutil.ignore_patterns("__pycache__", "_C*"))
    shutil.copytree(CSRC, dest / "csrc")
    if record_torch is None:
        return dest
    suffix = next(s for s in __import__("importlib.machinery").machinery.EXTENSION_SUFFIXES if s.endswith(".so"))
    (dest / "ddim_fast" / f"_C{suffix}").write_bytes(b"not a library")
    (dest / "ddim_fast" / "_C.build.json").write_text(json.dumps({"torch": record_torch}))
    return dest


@needs_compiler
@pytest.mark.slow
@pytest.mark.parametrize("record", ["0.0.1", "this torch"])
def test_an_ahead_of_time_library_that_is_not_for_this_torch_is_replaced(built_cache, tmp_path, record):
    """A library whose record names another torch is not even loaded (that can crash, not
    only fail); one that names this torch but fails to load is reported. Either way the
    kernels come from the first-use build, with a line saying why."""
    cache, _ = built_cache
    pkg = _package_copy(tmp_path, torch.__version__ if record == "this torch" else record)
    env = _env(cache, PYTHONPATH=str(pkg))
    env.pop("DDIM_FAST_JIT")
    got, err = _probe(env, cwd=tmp_path)
    assert got["file"].startswith(str(pkg)), got["file"]
    assert got["available"] and got["build"] == "jit-cached" and got["err"] < 1e-5
    why = "built against torch 0.0.1" if record == "0.0.1" else "ddim_fast._C failed to load"
    assert why in err and "compiling the kernels for this torch instead" in err


@needs_compiler
@pytest.mark.slow
def test_a_failed_build_leaves_pytorch_working_and_says_where_the_log_is(tmp_path):
    pkg = _package_copy(tmp_path)
    ops_cpp = pkg / "csrc" / "ops.cpp"
    ops_cpp.write_text(ops_cpp.read_text() + "\n#error planted by test_install\n")
    got, err = _probe(_env(tmp_path / "cache", PYTHONPATH=str(pkg)), cwd=tmp_path)
    assert got["file"].startswith(str(pkg)) and not got["available"] and got["build"] == "absent"
    assert "first-use build of the native kernels failed" in got["reason"] and "#error planted by test_install" in got["reason"]
    log = got["reason"].rsplit("the whole log: ", 1)[1].rstrip(")")
    assert "planted by test_install" in open(log).read()
    assert got["warnings"] == 1 and got["finite"]


def test_the_record_of_an_ahead_of_time_build_is_read_before_loading_it(tmp_path):
    info = tmp_path / "_C.build.json"
    assert stale_reason(str(info), "2.13.0+cpu") is None  # no record (an older build): it is tried
    info.write_text(json.dumps({"torch": "2.13.0+cpu", "cuda_kernels": False}))
    assert stale_reason(str(info), "2.13.0+cpu") is None
    assert stale_reason(str(info), "2.11.0+cu130") == "ddim_fast._C was built against torch 2.13.0+cpu, and this is torch 2.11.0+cu130"
    info.write_text("{not json")
    assert stale_reason(str(info), "2.13.0+cpu") is None


def test_the_cache_folder_changes_with_torch_flags_and_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_FAST_SKIP_CUDA", "1")
    spec = jit.recipe(CSRC)
    key = jit.cache_key(CSRC, spec)
    assert key == jit.cache_key(CSRC, jit.recipe(CSRC))  # deterministic
    other_torch = "2.11.0+cu130" if torch.__version__ != "2.11.0+cu130" else "2.13.0+cpu"
    assert jit.cache_key(CSRC, spec, torch_version=other_torch) != key  # another torch: another folder
    other_flags = dict(spec, extra_cflags=spec["extra_cflags"] + ["-DX=1"])
    assert jit.cache_key(CSRC, other_flags) != key
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy)
    spec_copy = jit.recipe(str(copy))
    assert jit.cache_key(str(copy), spec_copy) == key  # the folder the sources are in does not matter
    header = copy / "common.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert jit.cache_key(str(copy), spec_copy) != key  # a header changed: a new build


def test_cache_folder_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("DDIM_FAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "te"))
    assert jit.cache_root() == str(tmp_path / "te" / "ddim_fast")
    monkeypatch.setenv("DDIM_FAST_CACHE_DIR", str(tmp_path / "mine"))
    assert jit.cache_root() == str(tmp_path / "mine")


# --- when the kernels cannot be built: the package works, and says why ----------------------


def test_no_compiler_falls_back_to_pytorch_with_the_reason(tmp_path):
    got, _ = _probe(_env(tmp_path / "cache", CXX=str(tmp_path / "no-such-compiler")), cwd=tmp_path)
    assert not got["available"] and got["build"] == "absent" and got["path"] is None
    assert "no C++ compiler" in got["reason"] and "no-such-compiler" in got["reason"]
    assert got["warnings"] == 1 and got["finite"]


def test_an_unwritable_cache_falls_back_to_pytorch_with_the_reason(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # a cache folder cannot be made under a file, even by root
    got, _ = _probe(_env(blocker / "cache"), cwd=tmp_path)
    if not HAVE_TOOLS:
        assert "no C++ compiler" in got["reason"]
        return
    assert not got["available"] and got["build"] == "absent"
    assert "is not writable" in got["reason"] and "DDIM_FAST_CACHE_DIR" in got["reason"]
    assert got["warnings"] == 1 and got["finite"]
