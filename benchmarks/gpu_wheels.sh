#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that benchmarks/gpu_run.sh installs on the device
# machine (which reaches no registry): diffusers, for the diffusers tests and the SD-1.5-sized
# guided rows, and the one dependency of it the GPU image lacks (importlib_metadata; it has
# filelock, huggingface-hub 1.33, numpy, regex, requests, safetensors 0.8 and Pillow, which
# diffusers 0.42.1 accepts); then transformers and what it needs beyond those (tokenizers,
# typer and its own, pyyaml), for the Stable Diffusion pipelines of tests/test_pipelines.py
# and benchmarks/test_pipelines.py (which skip without it; not yet tried on the GPU image,
# whose Python is 3.12); then peft and accelerate (and psutil) for the LoRA tests and
# benchmarks/lora_switch.py (gpu_run.sh's "lora" stage). They go to .whl/ (git-ignored, about
# 25 MB): name it in the device call's carry.
#
#   bash benchmarks/gpu_wheels.sh && run(command="bash benchmarks/gpu_run.sh $OUT", carry=[".whl"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
"${PYTHON:-python3}" -m pip download --no-deps --quiet -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 \
  transformers==5.24.0 typer==0.29.2 click==8.5.1 shellingham==1.5.4 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments \
  peft==0.21.2 accelerate==1.16.0
# the compiled ones for the GPU image's CPython 3.12 on x86-64
"${PYTHON:-python3}" -m pip download --no-deps --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d .whl tokenizers==0.23.3 pyyaml==6.0.4 psutil==7.2.2
ls -l .whl
