"""Training the embedded models on the 16x16 digits: the diffusion UNet and the classifier.

The UNet is trained with DDPM's L_simple (Algorithm 1 of Ho et al., 2020): x0 from the
data, t ~ U{0, ..., T-1}, eps ~ N(0, I), x_t = sqrt(α_t) x0 + sqrt(1 - α_t) eps, and the
loss is the MSE between eps and model(x_t, t). Adam with a linear warm-up then a cosine
decay, gradient clipping, and an exponential moving average (EMA) of the weights, which
is what ships. No augmentation: flips do not preserve digits.

Everything is seeded: the same TrainConfig on the same torch build and thread count
gives the same weights. Training runs on `num_threads` CPU threads (default 1).

    from ddim_fast.apps.quality.train import TrainConfig, train_diffusion
    ema_model, history = train_diffusion(TrainConfig(steps=8000), out="digits.pt")
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ...core.checks import check_positive_int, describe_error
from ...core.schedule import Schedule
from ...models.unet import UNet
from ..data import load_digits
from ..pretrained import save_classifier, save_pretrained
from .classifier import DigitClassifier

# the embedded model: the standard UNet at a small width for 1 x 16 x 16 images. ch_mult
# (1, 1, 2) keeps 32 channels at 16x16 and 8x8 (where most of the compute is) so that
# the quality tables, 5,900 model calls per sample, run on a CPU core.
DIGITS_MODEL_CONFIG = dict(
    ch=32, out_ch=1, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1, in_channels=1, resolution=16, resamp_with_conv=True
)
# its class-conditional twin ("digits-cond"): the same UNet with a label embedding (10 digits
# and the null label), trained with label dropout for classifier-free guidance
DIGITS_COND_MODEL_CONFIG = dict(DIGITS_MODEL_CONFIG, num_classes=10)
# the schedule it is trained with (DDPM's linear betas), as pretrained files record it
DIGITS_SCHEDULE = dict(name="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


@dataclass
class TrainConfig:
    """Hyper-parameters of the diffusion training (defaults: the embedded "digits" model).

    steps: optimiser steps of `batch_size` images; lr: Adam's peak learning rate, reached
    after `warmup` steps, then a cosine decay to lr * final_lr_ratio; ema_decay: the EMA's
    decay per step; grad_clip: max global gradient norm (0: none); seed: every random
    choice (init, dropout, batches, t, eps); num_threads: torch CPU threads;
    checkpoint_every: steps between resumable checkpoints (when a checkpoint path is given);
    label_dropout: for a class-conditional model (model has num_classes), the probability
    that a training label is replaced by the null label (Ho & Salimans 2022), so that one
    network learns both the conditional and the unconditional model.
    """

    model: dict = field(default_factory=lambda: dict(DIGITS_MODEL_CONFIG))
    schedule: dict = field(default_factory=lambda: dict(DIGITS_SCHEDULE))
    steps: int = 8000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 200
    final_lr_ratio: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    num_threads: int = 1
    checkpoint_every: int = 500
    label_dropout: float = 0.1

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "num_threads", "checkpoint_every"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip!r}")
        return self


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warm-up, then cosine decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    floor = cfg.lr * cfg.final_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class _Batches:
    """Epochs of a seeded permutation of the data: (B, ...) batches, wrapping around."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(out)

    def state(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "generator": self.generator.get_state()}

    def load(self, state: dict) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])
        self.generator.set_state(state["generator"])


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def diffusion_loss(model, x0: torch.Tensor, schedule: Schedule, t: torch.Tensor, eps: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_simple: mean over all elements of (eps - model(x_t, t))², x_t = sqrt(α_t) x0 + sqrt(1 - α_t) eps.

    x0, eps: (B, C, H, W); t: (B,) int64 in [0, T); class_labels: (B,) for a
    class-conditional model (model(x_t, t, class_labels)).
    """
    a = schedule.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
    out = model(x_t, t) if class_labels is None else model(x_t, t, class_labels)
    return F.mse_loss(out, eps)


def train_diffusion(
    cfg: Optional[TrainConfig] = None,
    *,
    data: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    out=None,
    checkpoint=None,
    log: Optional[Callable[[str], None]] = print,
    log_every: int = 100,
    progress: bool = False,
) -> tuple[UNet, list]:
    """Train a UNet with L_simple on `data` (default: the 16x16 digits) and return (EMA model, history).

    data: (N, C, H, W) float images in [-1, 1]; labels: (N,) int64 class labels, needed when
    cfg.model has num_classes (default: the digits' labels). out: where to save the EMA weights as a
    pretrained file (apps.pretrained.save_pretrained). checkpoint: a path for
    resumable checkpoints, written every cfg.checkpoint_every steps; training resumes from
    it when it exists. history: (step, mean loss over the last log_every steps) pairs.
    The returned model is the EMA copy, in eval mode. Runs on cfg.num_threads torch
    threads and restores the caller's thread count afterwards.
    """
    cfg = (cfg or TrainConfig()).validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train_diffusion(cfg, data, labels, out, checkpoint, log, log_every, progress)
    finally:
        torch.set_num_threads(threads)


def _train_diffusion(cfg, data, labels, out, checkpoint, log, log_every, progress):
    conditional = cfg.model.get("num_classes") is not None
    if data is None:
        data, digit_labels = load_digits()
        labels = digit_labels if labels is None else labels
    if not isinstance(data, torch.Tensor) or data.dim() != 4 or not data.is_floating_point():
        raise ValueError(f"data must be a float tensor (N, C, H, W), got {getattr(data, 'shape', type(data).__name__)}")
    data = data.float().contiguous()
    if conditional:
        n_cls = cfg.model["num_classes"]
        if not isinstance(labels, torch.Tensor) or labels.shape != (data.shape[0],) or labels.is_floating_point():
            raise ValueError(f"a class-conditional model needs labels, an int tensor of shape ({data.shape[0]},), got {getattr(labels, 'shape', type(labels).__name__)}")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < n_cls):
            raise ValueError(f"labels must lie in [0, num_classes = {n_cls}), got [{int(labels.min())}, {int(labels.max())}]")
        labels = labels.long()
    schedule = Schedule.from_spec(cfg.schedule)
    T = schedule.num_train_timesteps

    torch.manual_seed(cfg.seed)  # init and dropout
    model = UNet(**cfg.model)
    model.train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    batches = _Batches(data.shape[0], cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 1))
    noise_gen = torch.Generator().manual_seed(cfg.seed + 2)  # t and eps
    history: list = []
    start = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        ck = load_checkpoint(checkpoint)
        if ck["config"] != asdict(cfg):
            raise ValueError(f"checkpoint {checkpoint} was written with another TrainConfig: {ck['config']}; delete it or pass that config")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        batches.load(ck["batches"])
        noise_gen.set_state(ck["noise_generator"])
        torch.set_rng_state(ck["torch_rng"])
        start, history = int(ck["step"]), list(ck["history"])
        if log:
            log(f"resumed from {checkpoint} at step {start}")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t0, running, count = time.perf_counter(), 0.0, 0
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = batches.next()
        x0 = data[idx]
        t = torch.randint(0, T, (x0.shape[0],), generator=noise_gen)
        eps = torch.randn(x0.shape, generator=noise_gen)
        y = None
        if conditional:  # label dropout: the null label trains the unconditional model
            drop = torch.rand(x0.shape[0], generator=noise_gen) < cfg.label_dropout
            y = torch.where(drop, torch.full_like(labels[idx], n_cls), labels[idx])
        loss = diffusion_loss(model, x0, schedule, t, eps, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        _ema_update(ema, model, cfg.ema_decay)
        running += loss.item()
        count += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % log_every == 0 or done == cfg.steps:
            history.append((done, running / count))
            if log:
                el = time.perf_counter() - t0
                log(f"step {done}/{cfg.steps}  loss {running / count:.5f}  lr {lr:.2e}  {el:.0f}s ({el / (done - start):.3f} s/step)")
            running, count = 0.0, 0
        if checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(checkpoint, cfg, done, model, ema, opt, batches, noise_gen, history)
    if bar is not None:
        bar.close()
    if out is not None:
        meta = dict(train=asdict(cfg), final_loss=history[-1][1] if history else None, seconds=round(time.perf_counter() - t0, 1), torch=str(torch.__version__))
        save_pretrained(out, ema, cfg.schedule, meta=meta)
        if log:
            log(f"saved the EMA weights to {out}")
    return ema, history


CHECKPOINT_KEYS = ("config", "step", "model", "ema", "optimizer", "batches", "noise_generator", "torch_rng", "history")


def load_checkpoint(path) -> dict:
    """A training checkpoint that _save_checkpoint wrote, loaded with weights_only=True: it
    holds only tensors, numbers, strings and containers of them, so a file whose pickle would
    run code is refused (ValueError naming the file) rather than run."""
    import pickle

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path}: not a ddim-fast training checkpoint that loads safely (weights_only=True): {describe_error(e)}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"checkpoint {path}: not a ddim-fast training checkpoint (missing {', '.join(missing)})")
    return ck


def _save_checkpoint(path, cfg, step, model, ema, opt, batches, noise_gen, history) -> None:
    tmp = f"{path}.tmp"
    torch.save(
        dict(config=asdict(cfg), step=step, model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), batches=batches.state(), noise_generator=noise_gen.get_state(), torch_rng=torch.get_rng_state(), history=history),
        tmp,
    )
    os.replace(tmp, path)  # never a half-written checkpoint


# --- the classifier behind the quality metric ------------------------------------------


@dataclass
class ClassifierConfig:
    """Training of apps.quality.classifier.DigitClassifier on the 16x16 digits.

    A seeded split keeps `val_fraction` of the images out for the reported accuracy;
    augmentation: random shifts by up to `max_shift` pixels (no flips).
    """

    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    val_fraction: float = 0.15
    seed: int = 0
    num_threads: int = 1


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to max_shift pixels in each direction, filling with -1 (background)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([pad[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def train_classifier(cfg: Optional[ClassifierConfig] = None, *, out=None, log: Optional[Callable[[str], None]] = print):
    """Train the digit classifier; return (model in eval mode, validation accuracy).

    out: where to save it (apps.pretrained.save_classifier).
    """
    cfg = cfg or ClassifierConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train_classifier(cfg, out, log)
    finally:
        torch.set_num_threads(threads)


def _train_classifier(cfg, out, log):
    x, y = load_digits()
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_val = int(round(cfg.val_fraction * x.shape[0]))
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(cfg.seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    acc = float("nan")
    for epoch in range(cfg.epochs):
        model.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb = _random_shift(x[idx], cfg.max_shift, g)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(x[val]).argmax(1) == y[val]).float().mean().item() if n_val else float("nan")
        if log:
            log(f"epoch {epoch + 1}/{cfg.epochs}  loss {total / len(tr):.4f}  val acc {acc:.4f}")
    model.eval()
    if out is not None:
        save_classifier(out, model, meta=dict(train=asdict(cfg), val_accuracy=acc, torch=str(torch.__version__)))
        if log:
            log(f"saved the classifier to {out}")
    return model, acc
