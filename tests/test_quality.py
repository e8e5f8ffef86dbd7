"""The quality metric (FID and KID on classifier features, confidence), seeded noise, the
quality run's cells and common random numbers, and the paper's claims."""

import math

import numpy as np
import pytest
import torch

from ddim_fast import FastSampler
from ddim_fast.apps.data import load_digits
from ddim_fast.apps.pretrained import load_pretrained, load_schedule
from ddim_fast.apps.quality.tables import (
    QUICK,
    DigitMetric,
    KidReference,
    QualitySettings,
    cell_samples,
    check_trends,
    compare_cells,
    jackknife_se,
    kid,
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


# --- KID --------------------------------------------------------------------------------------------


def _direct_kid(real, fake):
    """The unbiased MMD² with the cubic kernel on features centred and scaled by the real
    set's mean and RMS deviation, by explicit sums."""
    mu = real.mean(0)
    sd = np.sqrt(((real - mu) ** 2).mean())
    x, y = (real - mu) / sd, (fake - mu) / sd
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[a], y[b]) for a in range(m) for b in range(m) if a != b) / (m * (m - 1))
    xy = sum(k(x[i], y[a]) for i in range(n) for a in range(m)) / (n * m)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("n,m,d", [(13, 7, 5), (9, 11, 3)])
def test_kid_matches_the_direct_sums_and_its_leave_one_out_values_the_recomputation(n, m, d):
    g = np.random.default_rng(n * m)
    real, fake = g.standard_normal((n, d)) * 3 + 1, g.standard_normal((m, d)) * 2
    ref = KidReference(real)
    est, loo = ref.leave_one_out(fake)
    assert est == pytest.approx(_direct_kid(real, fake), rel=1e-10, abs=1e-12)
    for j in range(m):
        assert loo[j] == pytest.approx(_direct_kid(real, np.delete(fake, j, axis=0)), rel=1e-10, abs=1e-12)
    assert kid(real, fake) == (est, pytest.approx(jackknife_se(loo)))


def test_jackknife_se_of_the_mean_is_the_standard_error():
    # for the sample mean, the jackknife reproduces std / sqrt(M) exactly
    v = np.random.default_rng(0).standard_normal(40)
    loo = (v.sum() - v) / (len(v) - 1)
    assert jackknife_se(loo) == pytest.approx(v.std(ddof=1) / math.sqrt(len(v)), rel=1e-12)


def test_kid_is_unbiased_for_the_same_distribution_and_separates_a_shift():
    g = np.random.default_rng(1)
    real = g.standard_normal((400, 8))
    same = [kid(real, g.standard_normal((30, 8)))[0] for _ in range(200)]
    # unbiased: the mean over 200 draws of 30 is within 4 standard errors of 0 (FID at 30 is far above 0)
    assert abs(np.mean(same)) < 4 * np.std(same) / math.sqrt(len(same))
    est, se = kid(real, g.standard_normal((200, 8)) + 0.5)
    assert est > 5 * se > 0


def test_paired_differences_of_cells_sharing_their_draws_have_a_small_standard_error():
    g = np.random.default_rng(2)
    ref = KidReference(g.standard_normal((300, 6)))
    base = g.standard_normal((120, 6))
    loo, rows = {}, []
    for eta, shift in ((0.0, 0.0), (1.0, 0.01)):  # the same draws, the second shifted a little
        est, loo[(eta, 10)] = ref.leave_one_out(base + shift)
        rows.append({"eta": eta, "steps": 10, "num_samples": 120, "kid": est, "kid_se": jackknife_se(loo[(eta, 10)])})
    (c,) = compare_cells(rows, loo)
    assert (c["steps"], c["lower"], c["higher"]) == (10, 0.0, 1.0)
    assert c["kid_diff"] == pytest.approx(rows[1]["kid"] - rows[0]["kid"])
    assert c["se"] < 0.2 * min(r["kid_se"] for r in rows)


@pytest.mark.parametrize("bad,match", [(np.zeros((2, 4)), "N >= 3"), (np.full((5, 4), np.nan), "NaN"), (np.zeros(5), "N >= 3")])
def test_kid_input_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        kid(np.random.default_rng(0).standard_normal((10, 4)), bad)


def test_kid_survives_a_dimension_that_is_constant_on_the_real_set():
    g = np.random.default_rng(3)
    real = np.concatenate([g.standard_normal((200, 4)), np.zeros((200, 1))], axis=1)  # a dead ReLU unit
    fake = np.concatenate([g.standard_normal((50, 4)), np.full((50, 1), 0.5)], axis=1)
    est, se = kid(real, fake)
    assert 0 < est < 1 and math.isfinite(se)


def test_kid_dimension_mismatch():
    with pytest.raises(ValueError, match="D = 3, the real ones 4"):
        kid(np.zeros((10, 4)) + np.arange(4), np.zeros((5, 3)))


# --- the quality run's cells ----------------------------------------------------------------------


def test_cells_with_a_reduced_column():
    s = QualitySettings(num_samples=8, steps=(2, 5, 9), etas=(0.0, 1.0), reduced=((9, (0.0,), 4), (7, (1.0,), 3))).validate()
    assert s.cells() == [(0.0, 2, 8), (0.0, 5, 8), (0.0, 9, 4), (1.0, 2, 8), (1.0, 5, 8)]  # the entry for S = 7 is ignored
    assert s.model_calls() == 8 * 2 + 8 * 5 + 4 * 9 + 8 * 2 + 8 * 5 + 2 * s.num_reconstruct * sum(s.recon_steps)
    assert s.describe() == "S = 2, 5 for η = 0, 1: 8 samples each; S = 9 for η = 0: 4 samples each"


def test_the_quick_preset_keeps_the_papers_rows_and_whole_batches():
    s = QualitySettings(**QUICK.__dict__).validate()
    assert {e for e, _, _ in s.cells()} == {0.0, 1.0, "ddpm_noisy"}
    assert all(n % s.batch_size == 0 for _, _, n in s.cells())  # whole batches: sample i is one draw in every cell
    assert {(e, n) for e, steps, n in s.cells() if steps == 1000} == {(0.0, 100)}
    assert {n for _, steps, n in s.cells() if steps in (10, 20)} == {1000}  # where the ordering is checked


@pytest.mark.parametrize(
    "reduced,match",
    [(((10, (0.0,), 1),), "num_samples must be an int >= 3"), (((10, (3.0,), 5),), "reduced entries"), ((10,), "reduced entries")],
)
def test_reduced_errors(reduced, match):
    with pytest.raises(ValueError, match=match):
        QualitySettings(reduced=reduced).validate()


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


def test_cells_share_their_draws_sample_by_sample(model_and_schedule):
    """Common random numbers: a cell of 4 samples holds the first 4 of a cell of 6 (batches
    of 2), for η = 1 as for η = 0; a third stream (another seed) differs."""
    model, schedule = model_and_schedule
    s = QualitySettings(batch_size=2, seed=5)
    for eta in (0.0, 1.0):
        small = cell_samples(model, schedule, s, eta, 3, 4)
        large = cell_samples(model, schedule, s, eta, 3, 6)
        assert torch.equal(small, large[:4])
    other = cell_samples(model, schedule, QualitySettings(batch_size=2, seed=6), 1.0, 3, 4)
    assert not torch.equal(other, small)


def test_reconstruction_error_falls_with_S(model_and_schedule):
    model, schedule = model_and_schedule
    images = load_digits()[0][:4]
    rows = reconstruction_table(model, schedule, images, QualitySettings(recon_steps=(5, 50)))
    assert [r["steps"] for r in rows] == [5, 50]
    assert rows[1]["mse"] < rows[0]["mse"]


def test_run_quality_small(model_and_schedule):
    model, schedule = model_and_schedule
    s = QualitySettings(num_samples=6, num_reconstruct=2, batch_size=3, steps=(2, 3), etas=(0.0, "ddpm_noisy"), recon_steps=(2,), reduced=((3, (0.0,), 3),))
    res = run_quality(model, schedule, s)
    assert [(r["eta"], r["steps"], r["num_samples"]) for r in res["fid"]] == [(0.0, 2, 6), (0.0, 3, 3), ("ddpm_noisy", 2, 6)]
    assert res["meta"]["cells"] == [{"eta": r["eta"], "steps": r["steps"], "num_samples": r["num_samples"]} for r in res["fid"]]
    for r in res["fid"]:
        assert math.isfinite(r["fid"]) and r["fid"] >= 0 and 0 <= r["confidence"] <= 1
        assert math.isfinite(r["kid"]) and r["kid_se"] > 0
    (c,) = res["comparisons"]  # S = 3 has one row, so only S = 2 pairs
    assert (c["steps"], c["lower"], c["higher"]) == (2, 0.0, "ddpm_noisy") and c["se"] > 0
    assert [f["num_samples"] for f in res["reference"]["floors"]] == [6, 3]
    assert len(res["reconstruction"]) == 1 and res["reconstruction"][0]["mse"] > 0
    assert res["meta"]["settings"]["num_samples"] == 6
    text = format_tables(res)
    assert "| σ̂ (ddpm_noisy) |" in text and "reconstruction MSE" in text and "KID x 1000" in text and "samples per cell" in text
    assert "S = 2: KID(η=σ̂) - KID(η=0) = " in text
    again = run_quality(model, schedule, s)  # the same seed, the same table
    assert again["fid"] == res["fid"] and again["comparisons"] == res["comparisons"] and again["reconstruction"] == res["reconstruction"]


def test_check_trends():
    def res(f0, f5, f1, fn, mses, kids=None, etas=(0.0, 0.5, 1.0, "ddpm_noisy")):
        fid = [{"eta": e, "steps": 10, "fid": v, "confidence": 1.0} for e, v in zip(etas, (f0, f5, f1, fn))]
        for row, k in zip(fid, kids or ()):
            row.update(kid=k, kid_se=0.1)
        return {"fid": fid, "reconstruction": [{"steps": s, "mse": m} for s, m in zip((10, 20), mses)]}

    assert [ok for _, ok in check_trends(res(1, 2, 3, 4, (0.1, 0.01)), steps=(10,))] == [True, True]
    assert [ok for _, ok in check_trends(res(2, 1, 3, 4, (0.01, 0.1)), steps=(10,))] == [False, False]
    # FID and KID judged apart; the quick run's three rows (no 0.5) are enough
    checks = check_trends(res(1, 3, 4, None, (0.1, 0.01), kids=(0.2, 0.1, 0.3), etas=(0.0, 1.0, "ddpm_noisy")), steps=(10,))
    assert [ok for _, ok in checks] == [True, False, True]
    assert checks[0][0] == "S=10: FID(η=0) 1.000 < FID(η=1) 3.000 < FID(η=σ̂) 4.000"
    assert checks[1][0].startswith("S=10: KID(η=0) 200.00 < KID(η=1) 100.00")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_samples=2), "num_samples must be an int >= 3"),
        (dict(etas=(0.0, 1.5)), "eta must be in"),
        (dict(steps=(10, 0)), "steps must be positive ints"),
        (dict(num_reconstruct=-1), "num_reconstruct"),
    ],
)
def test_quality_settings_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        QualitySettings(**kw).validate()
