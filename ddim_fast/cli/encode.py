"""`ddim-fast encode`: DDIM inversion of images to their latents x_T."""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np
import torch

from ..apps.data import load_digits
from ..models.unet import UNet
from .args import CLIError, common_args, positive_int, sampling_args
from .common import fast_sampler, image_shape, load_model, mkdir_for, pick_device, progress_bar, resolved_skip, set_threads


def _read_images(spec: str, model: UNet, limit: Optional[int]) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """(images (N, C, H, W) in [-1, 1], labels or None) from --input."""
    c, r, _ = image_shape(model)
    labels = None
    if spec == "digits":
        x, y = load_digits()
        x, labels = x, y.numpy()
    elif os.path.isdir(spec) or spec.lower().endswith(".png"):
        from PIL import Image

        files = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(".png")) if os.path.isdir(spec) else [spec]
        if not files:
            raise CLIError(f"--input {spec!r}: no .png files in that folder")
        if not all(os.path.isfile(f) for f in files):
            raise CLIError(f"--input {spec!r}: no such file")
        arr = np.stack([np.asarray(Image.open(f).convert("L" if c == 1 else "RGB")) for f in files[:limit]])
        x = _uint8_to_tensor(arr if arr.ndim == 4 else arr[..., None], spec)
    elif spec.lower().endswith(".npz"):
        if not os.path.isfile(spec):
            raise CLIError(f"--input {spec!r}: no such file")
        with np.load(spec) as f:
            key = "arr_0" if "arr_0" in f.files else "images" if "images" in f.files else None
            if key is None:
                raise CLIError(f"--input {spec!r}: expected an array 'arr_0' (uint8 N,H,W,C, as `sample --out-dir` writes) or 'images'")
            arr = f[key]
        if arr.ndim == 3:
            arr = arr[..., None]
        x = _uint8_to_tensor(arr, spec)
    else:
        raise CLIError(f"--input {spec!r}: expected 'digits' (the embedded data), a .npz, a .png or a folder of .png files")
    if limit is not None:
        x = x[:limit]
        labels = None if labels is None else labels[:limit]
    if tuple(x.shape[1:]) != (c, r, r):
        raise CLIError(f"--input {spec!r}: images are {tuple(x.shape[1:])} (C, H, W) but the model takes ({c}, {r}, {r}); resize them first")
    return x, labels


def _uint8_to_tensor(arr: np.ndarray, spec: str) -> torch.Tensor:
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise CLIError(f"--input {spec!r}: expected uint8 images (N, H, W, C), got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def cmd_encode(args) -> int:
    set_threads(args)
    device = pick_device(args.device)
    model, schedule, desc, options = load_model(args.model, args.config, device, args)
    x, labels = _read_images(args.input, model, args.num_samples)
    args.eta, args.clip = 0.0, False  # DDIM inversion; --reconstruct decodes without a clamp too
    sampler = fast_sampler(model, schedule, args, options)
    latents, se = [], 0.0
    bar = progress_bar(args, x.shape[0], "encode", "img")
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], args.batch_size):
        xb = x[i : i + args.batch_size].to(device)
        z = sampler.encode(xb)
        latents.append(z.float().cpu())
        if args.reconstruct:
            se += (((sampler.sample(z).float() - xb) / 2) ** 2).sum().item()
        bar.update(xb.shape[0])
    bar.close()
    latents = torch.cat(latents)
    extra = {} if labels is None else {"labels": labels}
    mkdir_for(args.out)
    np.savez_compressed(args.out, latents=latents.numpy(), steps=np.int64(args.steps), skip=np.array(str(resolved_skip(args, options))), **extra)
    print(f"encoded {x.shape[0]} images with S={args.steps} ({desc}) in {time.perf_counter() - t0:.2f} s; wrote {args.out} (latents {tuple(latents.shape)} float32)")
    if args.reconstruct:
        print(f"reconstruction (encode then decode, S={args.steps} each way): MSE per dimension on the [0, 1] scale {se / x.numel():.3e}")
    return 0


def add_parsers(sub) -> None:
    """The encode command."""
    e = sub.add_parser("encode", help="DDIM inversion: images -> latents x_T (.npz)", description="Encode images to x_T with the deterministic (eta = 0) DDIM ODE run forward.")
    common_args(e)
    sampling_args(e, eta=False, clip=False)
    e.add_argument("--input", default="digits", help="'digits' (the embedded data, default), a .npz (arr_0 uint8 NHWC, as `sample --out-dir` writes), a .png or a folder of .png files")
    e.add_argument("--num-samples", type=positive_int, default=None, help="encode only the first N images")
    e.add_argument("--batch-size", type=positive_int, default=256, help="images per sampler call (default 256)")
    e.add_argument("--out", default="latents.npz", help="where to write the latents (key 'latents', float32 NCHW; default latents.npz)")
    e.add_argument("--reconstruct", action="store_true", help="also decode the latents and print the reconstruction MSE")
    e.set_defaults(func=cmd_encode)
