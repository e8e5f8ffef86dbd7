#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that benchmarks/gpu_run.sh installs on the device
# machine (which reaches no registry): diffusers, for the diffusers tests and the SD-1.5-sized
# guided rows, and the one dependency of it the GPU image lacks (importlib_metadata; it has
# filelock, huggingface-hub 1.33, numpy, regex, requests, safetensors 0.8 and Pillow, which
# diffusers 0.42.1 accepts). They go to .whl/ (git-ignored): name it in the device call's carry.
#
#   bash benchmarks/gpu_wheels.sh && run(command="bash benchmarks/gpu_run.sh $OUT", carry=[".whl"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
"${PYTHON:-python3}" -m pip download --no-deps --quiet -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
ls -l .whl
