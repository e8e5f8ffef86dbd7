"""`ddim-fast train`: the embedded digits UNet's recipe, or the quality classifier's."""

from __future__ import annotations

import time

from ..apps.quality.train import DIGITS_COND_MODEL_CONFIG, ClassifierConfig, TrainConfig, train_classifier, train_diffusion
from .args import CLIError, common_args, nonneg_int, positive_float, positive_int


def cmd_train(args) -> int:
    from tqdm import tqdm

    log = (lambda s: tqdm.write(s)) if not args.quiet else None  # noqa: E731
    threads = args.threads or 1
    if args.classifier:
        out = args.out or "digits_classifier.pt"
        cfg = ClassifierConfig(seed=args.seed, num_threads=threads, **({"epochs": args.epochs} if args.epochs else {}), **({"lr": args.lr} if args.lr else {}))
        _model, acc = train_classifier(cfg, out=out, log=log)
        print(f"classifier: validation accuracy {acc:.4f}; wrote {out}")
        return 0
    out = args.out or ("digits_cond.pt" if args.conditional else "digits.pt")
    fields = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, label_dropout=args.label_dropout)
    if args.conditional:
        fields["model"] = dict(DIGITS_COND_MODEL_CONFIG)
    elif args.label_dropout is not None:
        raise CLIError("ddim-fast train: error: --label-dropout needs --conditional")
    cfg = TrainConfig(seed=args.seed, num_threads=threads, **{k: v for k, v in fields.items() if v is not None}).validate()
    t0 = time.perf_counter()
    _ema, history = train_diffusion(cfg, out=out, checkpoint=args.checkpoint, log=log, log_every=args.log_every, progress=not args.quiet)
    final = history[-1][1] if history else float("nan")
    print(f"trained {cfg.steps} steps in {time.perf_counter() - t0:.0f} s on {threads} thread(s); final loss {final:.5f}; wrote {out}")
    return 0


def add_parsers(sub) -> None:
    """The train command."""
    t = sub.add_parser("train", help="train the digits UNet (or, with --classifier, the quality classifier)", description="L_simple with EMA on the 16x16 digits, on --threads CPU threads (default 1); the embedded model is the default settings.")
    common_args(t, model=False, device=False)
    t.add_argument("--classifier", action="store_true", help="train the digit classifier of the quality metric instead")
    t.add_argument("--conditional", action="store_true", help="train the class-conditional twin (digits_cond.pt: labels with label dropout, for guidance)")
    t.add_argument("--label-dropout", type=float, default=None, help="with --conditional: probability of training on the null label (default 0.1)")
    t.add_argument("--out", default=None, help="where to save (default digits.pt, digits_cond.pt with --conditional, or digits_classifier.pt)")
    t.add_argument("--steps", type=positive_int, default=None, help="optimiser steps (default 8000)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="default 128")
    t.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default 5e-4; classifier 1e-3)")
    t.add_argument("--ema-decay", type=float, default=None, help="default 0.999")
    t.add_argument("--epochs", type=positive_int, default=None, help="classifier epochs (default 40)")
    t.add_argument("--seed", type=nonneg_int, default=0)
    t.add_argument("--checkpoint", default=None, help="resumable checkpoint file: written during training, resumed from when it exists")
    t.add_argument("--log-every", type=positive_int, default=100, help="steps between log lines (default 100)")
    t.set_defaults(func=cmd_train)
