"""The quality metric (FID on classifier features, confidence), seeded noise, and the paper's claims."""

import math

import numpy as np
import pytest
import torch

from ddim_fast import FastSampler
from ddim_fast.apps.data import load_digits
from ddim_fast.apps.pretrained import load_pretrained, load_schedule
from ddim_fast.apps.quality import (
    DigitMetric,
    QualitySettings,
    check_trends,
    feature_statistics,
    fid_from_features,
    format_tables,
    frechet_distance,
    reconstruction_table,
    run_quality,
    to_uint8_levels,
)
from ddim_fast.sampling.noise import indexed_noise


def _spd(d, seed, rank=None):
    g = np.random.default_rng(seed)
    a = g.standard_normal((d, rank or d))
    return a @ a.T + (1e-3 * np.eye(d) if rank is None else 0.0)


def _direct_fid(mu1, s1, mu2, s2):
    """FID with tr sqrt(s1 s2) from the (non-symmetric) eigenvalues of s1 @ s2."""
    ev = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(ev.real, 0, None))))


# --- the Fréchet distance ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,d,rtol",
    [
        (50, 8, 1e-10),  # full rank
        (7, 16, 1e-6),  # rank-deficient (n < d): sqrt of rounding-level eigenvalues adds ~1e-8 each
    ],
)
def test_fid_of_identical_features_is_zero(n, d, rtol):
    f = np.random.default_rng(0).standard_normal((n, d)) * 3 + 1
    scale = np.trace(np.cov(f, rowvar=False))
    assert abs(fid_from_features(f, f)) < rtol * scale
    assert abs(fid_from_features(torch.from_numpy(f), torch.from_numpy(f.copy()))) < rtol * scale


def test_fid_of_shifted_features_is_the_squared_shift():
    f = np.random.default_rng(1).standard_normal((200, 6))
    shift = np.array([0.5, -1.0, 0.0, 2.0, 0.25, 0.0])
    fid = fid_from_features(f, f + shift)
    assert fid > 0
    assert fid == pytest.approx(float(shift @ shift), rel=1e-9)
    # a scaled copy: same mean, covariance 4x -> tr(S) + tr(4S) - 2 tr(2S) = tr(S)
    assert fid_from_features(f, 2 * (f - f.mean(0)) + f.mean(0)) == pytest.approx(np.trace(np.cov(f, rowvar=False)), rel=1e-9)


@pytest.mark.parametrize("d,seed", [(2, 0), (5, 1), (12, 2)])
def test_fid_matches_direct_formula(d, seed):
    g = np.random.default_rng(seed + 10)
    mu1, mu2 = g.standard_normal(d), g.standard_normal(d)
    s1, s2 = _spd(d, seed), _spd(d, seed + 100)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_direct_fid(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)
    # diagonal covariances: sum (mu1 - mu2)² + sum (sqrt(a) - sqrt(b))²
    a, b = np.abs(g.standard_normal(d)) + 0.1, np.abs(g.standard_normal(d)) + 0.1
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)


def test_fid_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")  # scipy is not a dependency: only a cross-check
    d = 10
    mu1, mu2 = np.zeros(d), np.ones(d) * 0.1
    s1, s2 = _spd(d, 3), _spd(d, 4, rank=4)  # one rank-deficient
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_fid_is_symmetric_and_nonnegative_when_rank_deficient():
    g = np.random.default_rng(5)
    f1, f2 = g.standard_normal((5, 20)), g.standard_normal((6, 20)) + 0.3
    a, b = fid_from_features(f1, f2), fid_from_features(f2, f1)
    assert a > 0 and math.isfinite(a)
    assert a == pytest.approx(b, rel=1e-8)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros(5), r"\(N, D\) with N >= 2"),
        (np.zeros((1, 4)), r"N >= 2"),
        (np.full((3, 2), np.nan), "NaN or Inf"),
    ],
)
def test_feature_statistics_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        feature_statistics(bad)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="expected mu"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- the metric on images ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric():
    return DigitMetric()


def test_metric_separates_real_digits_from_noise(metric):
    real = load_digits()[0]
    g = torch.Generator().manual_seed(0)
    half = real[torch.randperm(real.shape[0], generator=g)[:500]]
    noise = torch.rand((500, 1, 16, 16), generator=g) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(half, 3, stride=1, padding=1)
    m_real, m_noise, m_blur = metric(half), metric(noise), metric(blurred)
    assert m_real["fid"] < m_blur["fid"] < m_noise["fid"]
    assert m_real["confidence"] > 0.95 and m_real["confidence"] > m_noise["confidence"]
    assert 0.0 <= m_noise["confidence"] <= 1.0


def test_uint8_levels():
    x = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 7.0])
    y = to_uint8_levels(x)
    assert y.min() == -1 and y.max() == 1
    assert torch.allclose((y + 1) * 127.5, torch.round((y + 1) * 127.5), atol=1e-4)


# --- seeded noise ----------------------------------------------------------------------------------


def test_indexed_noise_does_not_depend_on_batching():
    whole = indexed_noise(3, 0, 7, (1, 4, 4))
    parts = torch.cat([indexed_noise(3, 0, 2, (1, 4, 4)), indexed_noise(3, 2, 5, (1, 4, 4))])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, indexed_noise(4, 0, 7, (1, 4, 4)))
    assert not torch.equal(whole[0], whole[1])
    assert abs(indexed_noise(0, 0, 64, (1, 16, 16)).std().item() - 1) < 0.05


# --- the paper's claims on the embedded model ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_schedule():
    return load_pretrained("digits"), load_schedule("digits")


@pytest.mark.slow  # about 10 s on one CPU thread: 4 samples x 1020 model calls
def test_samples_from_one_x_T_agree_across_S(model_and_schedule):
    """DDIM's consistency (Sec. 5.3 of the paper): with η = 0, the image is a function of x_T,
    so S = 20 and S = 1000 from one x_T are far closer than samples from different x_T."""
    model, schedule = model_and_schedule
    x_T = indexed_noise(0, 0, 4, (1, 16, 16))
    short = FastSampler(model, schedule, steps=20).sample(x_T)
    long = FastSampler(model, schedule, steps=1000).sample(x_T)
    same = ((short - long) ** 2).flatten(1).mean(1)
    diff = torch.stack([((long[i] - long[j]) ** 2).mean() for i in range(4) for j in range(4) if i != j])
    assert same.max() < 0.05 * diff.min(), (same, diff)


def test_reconstruction_error_falls_with_S(model_and_schedule):
    model, schedule = model_and_schedule
    images = load_digits()[0][:4]
    rows = reconstruction_table(model, schedule, images, QualitySettings(recon_steps=(5, 50)))
    assert [r["steps"] for r in rows] == [5, 50]
    assert rows[1]["mse"] < rows[0]["mse"]


def test_run_quality_small(model_and_schedule):
    model, schedule = model_and_schedule
    s = QualitySettings(num_samples=6, num_reconstruct=2, batch_size=4, steps=(2, 3), etas=(0.0, "ddpm_noisy"), recon_steps=(2,))
    res = run_quality(model, schedule, s)
    assert [(r["eta"], r["steps"]) for r in res["fid"]] == [(0.0, 2), (0.0, 3), ("ddpm_noisy", 2), ("ddpm_noisy", 3)]
    for r in res["fid"]:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["confidence"] <= 1
    assert len(res["reconstruction"]) == 1 and res["reconstruction"][0]["mse"] > 0
    assert res["meta"]["settings"]["num_samples"] == 6
    text = format_tables(res)
    assert "| σ̂ (ddpm_noisy) |" in text and "reconstruction MSE" in text


def test_check_trends():
    def res(f0, f5, f1, fn, mses):
        fid = [{"eta": e, "steps": 10, "fid": v, "confidence": 1.0} for e, v in zip((0.0, 0.5, 1.0, "ddpm_noisy"), (f0, f5, f1, fn))]
        return {"fid": fid, "reconstruction": [{"steps": s, "mse": m} for s, m in zip((10, 20), mses)]}

    assert [ok for _, ok in check_trends(res(1, 2, 3, 4, (0.1, 0.01)), steps=(10,))] == [True, True]
    assert [ok for _, ok in check_trends(res(2, 1, 3, 4, (0.01, 0.1)), steps=(10,))] == [False, False]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_samples=1), "num_samples must be an int >= 2"),
        (dict(etas=(0.0, 1.5)), "eta must be in"),
        (dict(steps=(10, 0)), "steps must be positive ints"),
        (dict(num_reconstruct=-1), "num_reconstruct"),
    ],
)
def test_quality_settings_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        QualitySettings(**kw).validate()
