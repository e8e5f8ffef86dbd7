"""The embedded data, the embedded models and the training that makes them."""

import os

import numpy as np
import pytest
import torch

from ddim_fast import Schedule, UNet
from ddim_fast.apps.data import DIGITS_PATH, load_digits
from ddim_fast.apps.pretrained import (
    CLASSIFIERS,
    HERE,
    MODELS,
    load_classifier,
    load_pretrained,
    load_schedule,
    pretrained_info,
    read_pretrained,
    save_pretrained,
)
from ddim_fast.apps.quality.classifier import DigitClassifier
from ddim_fast.apps.quality.train import DIGITS_MODEL_CONFIG, TrainConfig, diffusion_loss, lr_at, train_diffusion


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def model():
    return load_pretrained("digits")


# --- the data ------------------------------------------------------------------------------


def test_digits_data(digits):
    x, y = digits
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert y.dtype == torch.int64 and sorted(torch.unique(y).tolist()) == list(range(10))
    # the background is black and every image has ink
    assert (x.flatten(1).max(dim=1).values > 0.5).all()
    assert os.path.getsize(DIGITS_PATH) < 400 * 1024


def test_load_digits_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_digits"):
        load_digits(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((2, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="'images' and 'labels'"):
        load_digits(bad)


# --- the embedded UNet -------------------------------------------------------------------------


def test_load_pretrained(model):
    assert isinstance(model, UNet) and not model.training
    assert (model.in_channels, model.out_ch, model.resolution) == (1, 1, 16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        out = model(torch.randn(3, 1, 16, 16), torch.tensor([0, 500, 999]))
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()


def test_from_pretrained_matches_load_pretrained(model):
    other = UNet.from_pretrained("digits")
    assert not other.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("name", ["cifar10", "Digits", "", None])
def test_unknown_pretrained_name(name):
    with pytest.raises(ValueError, match=r"unknown pretrained model .*known: \['digits', 'digits-cond'\]"):
        load_pretrained(name)
    with pytest.raises(ValueError, match="known"):
        UNet.from_pretrained(name)


def test_pretrained_schedule_and_info():
    s = load_schedule("digits")
    np.testing.assert_array_equal(s.betas64, Schedule.linear().betas64)
    info = pretrained_info("digits")
    assert info["config"]["resolution"] == 16 and info["schedule"]["name"] == "linear"


def test_pretrained_files_are_small_fp32_and_weights_only():
    for name in list(MODELS.values()) + list(CLASSIFIERS.values()):
        path = os.path.join(HERE, name)
        assert os.path.getsize(path) < 5 * 1024 * 1024, f"{name} is {os.path.getsize(path)} bytes"
        obj = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
        assert all(v.dtype == torch.float32 for v in obj["state_dict"].values())


def test_pretrained_model_predicts_noise(model, digits):
    """The trained eps-model's L_simple on real digits is far below 1 (the loss of predicting 0)."""
    x0 = digits[0][:64]
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        loss = diffusion_loss(model, x0, load_schedule("digits"), t, eps).item()
    assert loss < 0.05  # the shipped model: about 0.02


def test_class_conditional_twin():
    """digits-cond: the digits UNet with 10 labels and the null label, trained with label
    dropout; its conditional and unconditional predictions both fit the data, and the
    conditional one (right label) fits better than with a wrong one."""
    model = UNet.from_pretrained("digits-cond")
    assert model.num_classes == 10 and model.null_label == 10
    info = pretrained_info("digits-cond")
    assert info["config"] == dict(pretrained_info("digits")["config"], num_classes=10)
    assert info["meta"]["train"]["label_dropout"] == 0.1 and info["meta"]["train"]["steps"] == 8000
    x0, y = load_digits()
    x0, y = x0[:256], y[:256]
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 600, (256,), generator=g)  # where the label matters: not pure noise
    eps = torch.randn(x0.shape, generator=g)
    schedule = load_schedule("digits-cond")
    with torch.no_grad():
        right = diffusion_loss(model, x0, schedule, t, eps, y).item()
        null = diffusion_loss(model, x0, schedule, t, eps, torch.full_like(y, 10)).item()
        wrong = diffusion_loss(model, x0, schedule, t, eps, (y + 5) % 10).item()
    assert right < 0.05 and null < 0.05
    assert right < null < wrong


def test_conditional_training_drops_labels(tmp_path):
    """label_dropout: the trained model sees the null label (its embedding row moves), and a
    conditional config needs labels."""
    data, labels = load_digits()
    cfg = TrainConfig(model=dict(_TINY, num_classes=10), steps=3, batch_size=16, warmup=1, label_dropout=0.5)
    model, _ = train_diffusion(cfg, data=data[:32], labels=labels[:32], log=None)
    torch.manual_seed(cfg.seed)
    init = UNet(**cfg.model)
    assert not torch.equal(model.class_emb.weight[10], init.class_emb.weight[10])
    with pytest.raises(ValueError, match="needs labels"):
        train_diffusion(cfg, data=data[:32], labels=None, log=None)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes = 10\)"):
        train_diffusion(cfg, data=data[:32], labels=labels[:32] + 10, log=None)


# --- the classifier ----------------------------------------------------------------------------


def test_load_classifier(digits):
    clf = load_classifier("digits")
    assert isinstance(clf, DigitClassifier) and not clf.training
    x, y = digits
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
        feats = clf.features(x[:5])
    assert acc > 0.97
    assert feats.shape == (5, clf.config["features"])
    with pytest.raises(ValueError, match="unknown pretrained classifier"):
        load_classifier("mnist")
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        clf(torch.zeros(2, 1, 8, 8))


# --- saving and training ------------------------------------------------------------------------


def test_save_and_read_pretrained(tmp_path):
    torch.manual_seed(0)
    m = UNet(**{**DIGITS_MODEL_CONFIG, "ch_mult": (1, 2)})
    path = tmp_path / "m.pt"
    save_pretrained(path, m, {"name": "linear", "num_train_timesteps": 1000})
    obj = read_pretrained(path)
    m2 = UNet(**obj["config"])
    m2.load_state_dict(obj["state_dict"], strict=True)
    assert m2.config == m.config
    with pytest.raises(ValueError, match="not a ddim-fast pretrained classifier"):
        read_pretrained(path, "classifier")
    torch.save(m.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a ddim-fast pretrained unet"):
        read_pretrained(tmp_path / "bare.pt")


_TINY = dict(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.1, in_channels=1, resolution=16)


def _tiny_cfg(steps):
    return TrainConfig(model=dict(_TINY), steps=steps, batch_size=8, warmup=2, checkpoint_every=2)


def test_training_is_seeded_and_resumable(tmp_path):
    data = load_digits()[0][:40]
    a, hist_a = train_diffusion(_tiny_cfg(4), data=data, log=None, log_every=1)
    b, _ = train_diffusion(_tiny_cfg(4), data=data, log=None, log_every=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # stop after 2 steps (a checkpoint at step 2), then resume to 4: the same weights
    ck = tmp_path / "ck.pt"
    train_diffusion(_tiny_cfg(2), data=data, checkpoint=ck, log=None)
    state = torch.load(ck, weights_only=True)
    state["config"]["steps"] = 4  # the 4-step run's config at its step 2 is the same state
    torch.save(state, ck)
    c, hist_c = train_diffusion(_tiny_cfg(4), data=data, checkpoint=ck, log=None, log_every=1, out=tmp_path / "c.pt")
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)
    assert hist_a[-2:] == hist_c[-2:]  # the losses of steps 3 and 4
    assert read_pretrained(tmp_path / "c.pt")["meta"]["train"]["steps"] == 4
    # another seed gives other weights
    d, _ = train_diffusion(TrainConfig(model=dict(_TINY), steps=4, batch_size=8, warmup=2, seed=1), data=data, log=None)
    assert any(not torch.equal(pa, pd) for pa, pd in zip(a.parameters(), d.parameters()))


def test_training_lowers_the_loss():
    data = load_digits()[0][:64]
    _, hist = train_diffusion(TrainConfig(model=dict(_TINY), steps=30, batch_size=16, lr=2e-3, warmup=5), data=data, log=None, log_every=10)
    assert hist[-1][1] < 0.5 * hist[0][1]


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, final_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.01)
    lrs = [lr_at(i, cfg) for i in range(10, 100)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("steps", 0, "steps must be a positive int"),
        ("batch_size", 1.5, "batch_size must be a positive int"),
        ("lr", -1.0, "lr must be"),
        ("ema_decay", 1.0, r"ema_decay must be in \[0, 1\)"),
        ("warmup", -1, "warmup must be"),
        ("label_dropout", 1.0, r"label_dropout must be in \[0, 1\)"),
    ],
)
def test_train_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value}).validate()
