"""The first fast call after a LoRA switch: the prepared UNet refreshed in place against the
samplers made anew (the behaviour before LeanConditionUNet.refresh), next to a steady call.

    python benchmarks/lora_switch.py --out benchmarks/results/cpu-lora-switch-<date>.json

On the tiny StableDiffusionPipeline (tests/tiny_pipelines.py: random weights, 16x16 images,
8x8 latents, guided at w = 7.5) with two LoRA adapters "a" and "b" (rank 4, random A and B)
on the attention, feed-forward, proj_in/proj_out and ResNet layers, fp32 on the CPU (fp16 and
the captured loop with --device cuda: benchmarks/gpu_run.sh's "lora" stage). For each
engine ("default": accelerate(pipe); "compile": accelerate(pipe, compile=True), Inductor for
the lean UNet's forward_rows) it runs `--repeats` rounds of three timed calls, interleaved so
that a drift of the machine's load reaches all three alike, and reports each one's median:

- a steady call: nothing changed since the last one (the weights watch still runs);
- the first call after `pipe.unet.set_adapters("b")`, "in place": the watch sees the change,
  FastSampler.refresh_weights folds the adapters again and copies the new weights into the
  prepared model's buffers (samplers, compiled code, graphs kept);
- the first call after `pipe.unet.set_adapters("a")`, "new samplers": FastPipeline's
  _weights_changed forced to _new_samplers(), as every weight change went before: a new
  prepared model (and with compile=True, unless torch._dynamo's cache takes the new one, a
  new compile).

Each switched call's images are checked against pipe(...)'s (the largest difference is
recorded), and the compiles each switch cost (torch._dynamo's unique graphs) are counted.
The machine's load average is recorded at the start and the end: calls of a fraction of a
second on a 2-core VM move with whatever else runs there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # tests.tiny_pipelines, and this checkout's ddim_fast

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"]
PROMPT = "a cat on a mat"  # the tiny tokenizer keeps 14 characters
GUIDANCE = 7.5
ENGINES = {"default": {}, "compile": {"compile": True}}


def lora_pipeline(device: str = "cpu"):
    """The tiny SD pipeline with adapters "a" and "b" on its UNet ("b" active), on `device` (in
    fp16 on a GPU, as users load it)."""
    from peft import LoraConfig

    from tests.tiny_pipelines import sd_pipeline

    pipe = sd_pipeline(tempfile.mkdtemp(prefix="ddim-fast-tokenizer-"))
    for seed, name in enumerate(("a", "b"), start=1):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
        pipe.unet.add_adapter(lora, adapter_name=name)
    return pipe.to(device=device, dtype=torch.float16 if device == "cuda" else torch.float32)


def _call(pipeline, steps: int, batch: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipeline([PROMPT] * batch, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator, output_type="np").images


def _timed(pipeline, steps: int, batch: int) -> tuple:
    start = time.perf_counter()
    images = _call(pipeline, steps, batch)  # images to the host: the call has ended on the GPU too
    return time.perf_counter() - start, images


def _compiles() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class _Series:
    """One kind of timed call: its seconds, the compiles each cost, and the largest difference
    of its images from pipe(...)'s."""

    def __init__(self):
        self.seconds, self.compiles, self.max_abs_diff_vs_pipe = [], [], 0.0

    def time(self, pipe, fast, steps: int, batch: int) -> None:
        compiled_before = _compiles()
        elapsed, images = _timed(fast, steps, batch)
        self.seconds.append(elapsed)
        self.compiles.append(_compiles() - compiled_before)
        difference = float(np.abs(images - _call(pipe, steps, batch)).max())  # untimed
        self.max_abs_diff_vs_pipe = max(self.max_abs_diff_vs_pipe, difference)

    def summary(self) -> dict:
        return {"median_s": statistics.median(self.seconds), "all_s": self.seconds, "compiles": self.compiles, "max_abs_diff_vs_pipe": self.max_abs_diff_vs_pipe}


def measure(engine: str, steps: int, batch: int, repeats: int, device: str = "cpu") -> dict:
    """`repeats` rounds of (a steady call, a switch taken in place, a switch taken with new
    samplers), interleaved so that a drift of the machine's load reaches all three alike."""
    import ddim_fast

    pipe = lora_pipeline(device)
    pipe.unet.set_adapters("a")  # each round switches to "b" in place, then back to "a" anew
    fast = ddim_fast.accelerate(pipe, **ENGINES[engine])
    compiled_before = _compiles()
    first_call_s, _ = _timed(fast, steps, batch)  # prepares (and compiles) the model
    first_call_compiles = _compiles() - compiled_before
    for _ in range(2):  # warm-up
        _call(fast, steps, batch)
    steady, in_place, new_samplers = _Series(), _Series(), _Series()
    kept, lean = [], []
    for _ in range(repeats):
        steady.time(pipe, fast, steps, batch)
        pipe.unet.set_adapters("b")
        prepared = fast.sampler.prepared_model(pipe.unet.device)
        in_place.time(pipe, fast, steps, batch)
        kept.append(fast.sampler.prepared_model(pipe.unet.device) is prepared)
        lean.append(fast.sampler.lean_note is None)
        fast._weights_changed = fast._new_samplers  # the behaviour before the in-place refresh
        pipe.unet.set_adapters("a")
        new_samplers.time(pipe, fast, steps, batch)
        del fast._weights_changed  # FastPipeline's own again
    return {
        "options": ENGINES[engine],
        "lean": all(lean),
        "in_place_kept_the_prepared_model": all(kept),
        "first_call_s": first_call_s,
        "first_call_compiles": first_call_compiles,
        "steady": steady.summary(),
        "after_switch_in_place": in_place.summary(),
        "after_switch_new_samplers": new_samplers.summary(),
    }


def main(argv=None) -> int:
    from ddim_fast.apps.census.machine import cpu_name, git_commit

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--steps", type=int, default=10, help="S, the DDIM steps of each call")
    parser.add_argument("--batch", type=int, default=1, help="images per call (the UNet runs on twice as many: guided)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: fp16, and the captured loop (a switch taken with new samplers captures its graphs again)")
    # one thread: the tiny UNet's ops gain nothing from a second, and on a 2-core VM shared with
    # other work two threads' OpenMP barriers spun: calls of 0.6 s took 11.8 s now and then
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    import peft

    result = {
        "what": "the first accelerate(pipe) call after a LoRA switch (set_adapters a <-> b): in place vs new samplers (benchmarks/lora_switch.py)",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "commit": git_commit(_ROOT),
        "pipeline": "tiny StableDiffusionPipeline (tests/tiny_pipelines.py), 16x16 images, 8x8 latents",
        "dtype": "fp16" if args.device == "cuda" else "fp32",
        "S": args.steps,
        "batch": args.batch,
        "guidance_scale": GUIDANCE,
        "repeats": args.repeats,
        "adapters": {"names": ["a", "b"], "rank": 4, "targets": TARGETS},
        "load_average_start": list(os.getloadavg()),
        "engines": {},
    }
    for engine in args.engines:
        result["engines"][engine] = measure(engine, steps=args.steps, batch=args.batch, repeats=args.repeats, device=args.device)
        print(engine, json.dumps(result["engines"][engine]), flush=True)
    result["load_average_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
