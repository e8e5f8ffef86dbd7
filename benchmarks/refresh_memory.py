"""Memory a weight refresh of the lean SD UNet holds beside the lean model (LeanConditionUNet.refresh,
what accelerate(pipe) runs after a LoRA switch or any change of the UNet's weights).

    python benchmarks/refresh_memory.py --unet sd15 --out benchmarks/results/cpu-refresh-memory-<date>.json

The UNet is built from a config with random weights (tests/tiny_pipelines.py: "tiny", "sdxl-tiny",
or "sd15", SD-1.5's full-size UNet), its lean form made in --dtype on --device, and two changes
refreshed in turn:

- "values changed": every base weight moved in place through .data (as a training step, or
  PEFT's merge, writes it);
- "lora added": a rank-4 LoRA adapter (random A and B) on the attention, feed-forward,
  proj_in/proj_out and ResNet layers (benchmarks/lora_switch.py's targets), which the refresh
  folds in (W + s B A) before it copies.

For each, the peak bytes of tensor storage made during the refresh and alive at once
(ddim_fast/apps/census/memory.py's StoragePeak, on any device), as a fraction of the lean model's
buffers; on CUDA also torch.cuda.max_memory_allocated above what was allocated before. The
folded weights (the LoRA layers' base weights, in the UNet's dtype) are recorded too: the
refresh holds them while it copies. Runs against whichever ddim_fast is importable
(PYTHONPATH=<another checkout> measures that one).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(_ROOT)  # tests.tiny_pipelines; ddim_fast is the first importable (PYTHONPATH, then the installed one)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _unet_config(name: str) -> dict:
    from tests.tiny_pipelines import SD15_UNET, TINY_SDXL_UNET, TINY_UNET

    return {"tiny": TINY_UNET, "sdxl-tiny": TINY_SDXL_UNET, "sd15": SD15_UNET}[name]


def _storage_peak():
    """This checkout's StoragePeak (it needs torch alone), whichever ddim_fast is measured."""
    path = os.path.join(_ROOT, "ddim_fast", "apps", "census", "memory.py")
    spec = importlib.util.spec_from_file_location("_ddim_fast_storage_peak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StoragePeak()


def _refresh_peak(lean, unet, device: torch.device) -> dict:
    lean_bytes = sum(b.nbytes for b in lean.buffers())
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    with _storage_peak() as counter:
        assert lean.refresh(unet), "the refresh was refused"
    out = {"peak_bytes": counter.peak, "peak_of_lean": round(counter.peak / lean_bytes, 4)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        rise = torch.cuda.max_memory_allocated() - allocated
        out.update(cuda_peak_rise_bytes=rise, cuda_peak_rise_of_lean=round(rise / lean_bytes, 4))
    return out


def measure(unet_name: str, dtype: torch.dtype, device: torch.device) -> dict:
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from ddim_fast.models.sd_lean import LeanConditionUNet

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**_unet_config(unet_name)).eval().to(device=device, dtype=dtype)
    lean = LeanConditionUNet.from_unet(unet)
    lean_bytes = sum(b.nbytes for b in lean.buffers())
    result = {"lean_bytes": lean_bytes}
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.data += 0.01
    result["values changed"] = _refresh_peak(lean, unet, device)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False), adapter_name="a")
    folded = sum(m.base_layer.weight.nbytes for m in unet.modules() if hasattr(m, "base_layer"))
    result["folded_bytes"] = folded
    result["folded_of_lean"] = round(folded / lean_bytes, 4)
    result["lora added"] = _refresh_peak(lean, unet, device)
    return result


def main(argv=None) -> int:
    from ddim_fast.apps.census.machine import cpu_name, git_commit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--unet", default="sd15", choices=["tiny", "sdxl-tiny", "sd15"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    import diffusers
    import peft

    import ddim_fast

    result = {
        "what": "peak tensor memory of LeanConditionUNet.refresh beside the lean model (benchmarks/refresh_memory.py)",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "commit": git_commit(_ROOT),
        "ddim_fast_from": os.path.dirname(os.path.dirname(os.path.abspath(ddim_fast.__file__))),
        "unet": args.unet,
        "dtype": args.dtype,
        "adapter": {"rank": 4, "targets": TARGETS},
    }
    result.update(measure(args.unet, DTYPES[args.dtype], device))
    print(json.dumps(result, indent=1), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
