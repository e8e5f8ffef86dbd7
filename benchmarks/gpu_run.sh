#!/usr/bin/env bash
# On a bare GPU machine holding this repo: build offline, run the GPU tests, the kernel
# and sampling benchmarks and the step profile, and write everything under OUTDIR.
#
#   bash benchmarks/gpu_run.sh OUTDIR [stages]
#   GPU_RUN_DRY=1 bash benchmarks/gpu_run.sh OUTDIR [stages]   # print the plan, run nothing
#
# stages (default "build tests kernels profile step sampling guided"; "compile",
# "guided-compile", "pipelines", "sd15", "sd15-dpm", "lora", "lora-memory" and "solvers" only when named). Each stage has its own time limit, and every limit is
# cut to what is left before the deadline (GPU_RUN_SECONDS, default 570: one 10-minute
# device call with time to bring the files back), so that the call always returns with
# results; a stage with no time left is recorded as skipped. The default stages' limits
# sum to the deadline less the 20 s kept for the report (the dry run prints the sum and
# tests/test_gpu_run.py checks it):
#   build     pip install --no-build-isolation --no-deps -e .  (CUDA arch 90 only; 80 s; 39 s on
#             the H100 at c872cfc), and the wheels in .whl/ when it holds any
#             (benchmarks/gpu_wheels.sh: diffusers; 20 s)
#   native    tests/test_extension.py in one process, with faulthandler -> OUTDIR/native.log (30 s)
#   tests     the GPU tier, pytest tests -m "gpu and not autotune" (tests/conftest.py: every CUDA
#             test and the extension's own; max-autotune compiles run in the compile stage),
#             12 xdist workers, 60 s per test -> OUTDIR/tests.xml, tests.log (170 s)
#   kernels   benchmarks/test_kernels.py -> OUTDIR/kernels.json                 (50 s)
#   profile   benchmarks/profile_step.py, fp32 and bf16 -> OUTDIR/profile-*.json (25 s each)
#   step      benchmarks/test_step.py: ms and ops per step, CIFAR-10 UNet, batch 1 and 64 -> OUTDIR/step.json (40 s)
#   sampling  reference / fast / fast-bf16, CIFAR-10 UNet, batch 1 and 64 -> OUTDIR/sampling.json (70 s)
#   guided    guided sampling (w = 7.5), reference / fast / fast-bf16, S = 10 and 50, batch 1: the
#             digits-cond architecture and (with diffusers installed) an SD-1.5-sized
#             UNet2DConditionModel -> OUTDIR/guided.json (40 s)
#   compile   the max-autotune test (tests -m autotune: half the stage, 250 s at most), then
#             per step, FastSampler(compile=True) and the torch.compile peers (three modes,
#             fp32 and bf16) -> OUTDIR/compile-step.json, then the S-sweep's, batch 1 ->
#             OUTDIR/compile.json (whatever is left, 450 s at most; --ddim-compile-budget keeps
#             each inside its share, and the rows that do not fit are listed as skipped, with
#             why, in the JSON and report)
#   guided-compile  the guided rows' compile peers (reference over torch.compile(model)), S = 10 and
#             50, batch 1 -> OUTDIR/guided-compile.json (only when named; whatever is left, 300 s at most)
#   pipelines whole StableDiffusionPipeline calls, pipe(...) against ddim_fast.accelerate(pipe)(...),
#             the tiny and the SD-1.5-sized pipeline in fp16, S = 10 and 50 (needs the diffusers and
#             transformers wheels) -> OUTDIR/pipelines.json (only when named; 150 s)
#   sd15      the SD-1.5-sized StableDiffusionPipeline (fp16, 512x512, w = 7.5, batch 1) at S = 50
#             (needs the wheels; only when named): pipe(...), ddim_fast.accelerate(pipe) and pipe
#             with torch.compile(pipe.unet, mode="reduce-overhead") -> OUTDIR/sd15.json (240 s),
#             then with mode="max-autotune", whose compile may outlast what is left, in a pytest
#             of its own so that the first file survives -> OUTDIR/sd15-autotune.json (the rest,
#             300 s at most)
#   sd15-dpm  the same pipeline with DPM++ 2M Karras (DPMSolverMultistepScheduler, use_karras_sigmas,
#             from its config) at S = 20: pipe(...) and ddim_fast.accelerate(pipe) -> OUTDIR/sd15-dpm.json
#             (only when named; 150 s)
#   lora      benchmarks/lora_switch.py on the GPU: the first call after a LoRA switch against a
#             steady call, the tiny SD pipeline in fp16, captured (no compile) -> OUTDIR/lora.json (only when named; 90 s)
#   lora-memory  benchmarks/refresh_memory.py on the GPU: the memory a weight refresh of SD-1.5's lean
#             UNet (fp16) holds beside it, after a change of values and after a LoRA added, by
#             torch.cuda.max_memory_allocated too -> OUTDIR/lora-memory.json (only when named; 60 s)
#   solvers   DDIM at S = 10, 20, 50 and DPM-Solver++(2M) at S = 10, 20, CIFAR-10 UNet, batch 1
#             and 64 -> OUTDIR/solvers.json (only when named; 60 s)
# Then benchmarks/report.py writes OUTDIR/report.md (and report.png with matplotlib).
# A stage that fails or times out is recorded in OUTDIR/status.txt and the next runs.
set -uo pipefail

out=${1:?usage: gpu_run.sh OUTDIR [stages]}
stages=${2:-"build tests kernels profile step sampling guided"}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
dry=${GPU_RUN_DRY:-0}
clock=0  # the dry run's clock: every stage takes its whole limit
now() { if [[ $dry == 1 ]]; then echo "$clock"; else date +%s; fi; }
start=$(now)
status="$out/status.txt"
: > "$status"

deadline=$(( start + ${GPU_RUN_SECONDS:-570} ))
planned=0

stage() {  # stage NAME SECONDS CMD...: at most SECONDS, and never past the deadline (20 s kept for the report)
  local name=$1 secs=$2; shift 2
  local t0
  t0=$(now)
  local left=$(( deadline - t0 - 20 ))
  planned=$(( planned + secs ))
  (( secs > left )) && secs=$left
  if (( secs < 15 )); then
    echo "$name skipped: ${left}s left before the deadline" | tee -a "$status"
    return
  fi
  if [[ $dry == 1 ]]; then
    echo "=== $name (limit ${secs}s): $*"
    echo "$name dry seconds=$secs" >> "$status"
    clock=$(( clock + secs ))
    return
  fi
  echo "=== $name (limit ${secs}s)"
  timeout --signal=INT --kill-after=10 "$secs" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(now) - t0 ))" | tee -a "$status"
  tail -n 25 "$out/$name.log"
}

has() { [[ " $stages " == *" $1 "* ]]; }

[[ $dry == 1 ]] || {
  echo "host: $(hostname)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  "$py" -c "import triton; print('triton', triton.__version__)" 2>/dev/null
  git rev-parse HEAD 2>/dev/null
  echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  c++ --version 2>/dev/null | head -n 1
} > "$out/machine.txt" 2>&1
[[ $dry == 1 ]] || cat "$out/machine.txt"

has build && stage build 80 env DDIM_FAST_CUDA_ARCHS=90 MAX_JOBS=16 "$py" -m pip install --no-build-isolation --no-deps --no-index -e .
if has build && { [[ $dry == 1 ]] || compgen -G ".whl/*.whl" > /dev/null; }; then
  stage wheels 20 "$py" -m pip install --no-index --no-deps .whl/*.whl
fi
if [[ $dry != 1 ]]; then
  "$py" -c "import ddim_fast, json; print(json.dumps(ddim_fast.backends(), indent=1))" | tee "$out/backends.json"
  # the OpenMP and C++ runtimes mapped once torch and the extension are loaded (two OpenMP
  # runtimes in one process would be a crash suspect)
  "$py" -c "
import torch, ddim_fast.ops.extension as e
e._load_extension()
print('loaded:', *sorted({l.split()[-1] for l in open('/proc/self/maps') if any(k in l for k in ('omp', 'stdc++', '_C.'))}), sep='\n  ')
" >> "$out/machine.txt" 2>&1
fi

# the extension's own tests in one process first: the H100 run at c872cfc lost an xdist
# worker to a segfault in test_native_errors_say_what_was_expected; here faulthandler's
# traceback (and the C++ one) lands in native.log
has tests && stage native 30 env TORCH_SHOW_CPP_STACKTRACES=1 "$py" -X faulthandler -m pytest tests/test_extension.py -q -rfE -p no:cacheprovider -p no:xdist

has tests && stage tests 170 "$py" -m pytest tests -m "gpu and not autotune" -n 12 -q -rfE --timeout 60 -p no:cacheprovider --junitxml="$out/tests.xml"
has tests && [[ $dry != 1 ]] && tail -n 1 "$out/tests.log" > "$out/tests-summary.txt"
has kernels && stage kernels 50 "$py" -m pytest benchmarks/test_kernels.py --benchmark-only --benchmark-max-time=0.2 -q -p no:cacheprovider --benchmark-json="$out/kernels.json"
has profile && stage profile-fp32 25 "$py" benchmarks/profile_step.py --json "$out/profile-fp32.json"
has profile && stage profile-bf16 25 "$py" benchmarks/profile_step.py --dtype bf16 --json "$out/profile-bf16.json"
has step && stage step 40 "$py" -m pytest benchmarks/test_step.py --benchmark-only -q -p no:cacheprovider -k "not compile and not peer" --benchmark-json="$out/step.json"
has sampling && stage sampling 70 "$py" -m pytest benchmarks/test_sampling.py --benchmark-only -q -p no:cacheprovider -k "not compile and not peer" --benchmark-json="$out/sampling.json"
has guided && stage guided 40 "$py" -m pytest benchmarks/test_guided.py --benchmark-only -q -rs -p no:cacheprovider -k "not peer" --ddim-steps 10,50 --ddim-batch 1 --benchmark-json="$out/guided.json"
if has compile; then
  left=$(( deadline - 20 - $(now) ))
  (( left > 450 )) && left=450
  if (( left > 60 )); then
    # half (250 s at most) for the max-autotune test (it compiled for over 200 s on the H100),
    # then two thirds of the rest for the per-step rows (the issue's measure) and the rest for
    # the S-sweep; each compile budget leaves a quarter of its stage for the timed rounds
    # after the last compile
    autotune_s=$(( left / 2 )); (( autotune_s > 250 )) && autotune_s=250
    left=$(( left - autotune_s ))
    stage compile-tests "$autotune_s" "$py" -m pytest tests -m autotune -q -rfE --timeout 240 -p no:cacheprovider -p no:xdist --junitxml="$out/compile-tests.xml"
    step_s=$(( left * 2 / 3 )); sweep_s=$(( left - step_s ))
    stage compile-step "$step_s" "$py" -m pytest benchmarks/test_step.py --benchmark-only -q -rs -p no:cacheprovider -k "compile or peer" --ddim-full \
      --ddim-compile-budget $(( step_s * 3 / 4 )) --benchmark-json="$out/compile-step.json"
    stage compile "$sweep_s" "$py" -m pytest benchmarks/test_sampling.py --benchmark-only -q -rs -p no:cacheprovider -k "compile or peer or reference" --ddim-batch 1 --ddim-full \
      --ddim-compile-budget $(( sweep_s * 3 / 4 )) --benchmark-json="$out/compile.json"
  else
    echo "compile skipped: ${left}s left" | tee -a "$status"
  fi
fi
if has guided-compile; then
  left=$(( deadline - 20 - $(now) ))
  (( left > 300 )) && left=300
  stage guided-compile "$left" "$py" -m pytest benchmarks/test_guided.py --benchmark-only -q -rs -p no:cacheprovider -k "peer or reference" --ddim-full \
    --ddim-steps 10,50 --ddim-batch 1 --ddim-compile-budget $(( left * 3 / 4 )) --benchmark-json="$out/guided-compile.json"
fi
if has pipelines; then
  stage pipelines 150 "$py" -m pytest benchmarks/test_pipelines.py --benchmark-only -q -rs -p no:cacheprovider -k "not compile" \
    --ddim-steps 10,50 --benchmark-json="$out/pipelines.json"
fi
if has sd15; then
  stage sd15 240 "$py" -m pytest benchmarks/test_pipelines.py --benchmark-only -q -rs -p no:cacheprovider -k "sd15 and not accelerate-compile and not max-autotune" \
    --ddim-full --ddim-steps 50 --benchmark-json="$out/sd15.json"
  left=$(( deadline - 20 - $(now) ))
  (( left > 300 )) && left=300
  stage sd15-autotune "$left" "$py" -m pytest benchmarks/test_pipelines.py --benchmark-only -q -rs -p no:cacheprovider -k "sd15 and max-autotune" \
    --ddim-full --ddim-steps 50 --benchmark-json="$out/sd15-autotune.json"
fi
if has sd15-dpm; then
  stage sd15-dpm 150 "$py" -m pytest benchmarks/test_pipelines.py --benchmark-only -q -rs -p no:cacheprovider -k "sd15 and not compile" \
    --ddim-scheduler dpmpp_2m_karras --ddim-steps 20 --benchmark-json="$out/sd15-dpm.json"
fi
if has lora; then
  stage lora 90 "$py" benchmarks/lora_switch.py --device cuda --engines default --out "$out/lora.json"
fi
if has lora-memory; then
  stage lora-memory 60 "$py" benchmarks/refresh_memory.py --unet sd15 --dtype fp16 --device cuda --out "$out/lora-memory.json"
fi
if has solvers; then
  stage solvers 60 "$py" -m pytest benchmarks/test_solvers.py --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/solvers.json"
fi

if [[ $dry == 1 ]]; then
  echo "planned ${planned}s of ${GPU_RUN_SECONDS:-570}s (20s kept for the report)"
  cat "$status"
  exit 0
fi
jsons=$(ls "$out"/step.json "$out"/compile-step.json "$out"/sampling.json "$out"/guided.json "$out"/guided-compile.json "$out"/compile.json "$out"/kernels.json "$out"/pipelines.json "$out"/sd15.json "$out"/sd15-autotune.json "$out"/sd15-dpm.json "$out"/solvers.json 2>/dev/null)
if [ -n "$jsons" ]; then
  # shellcheck disable=SC2086
  "$py" benchmarks/report.py $jsons --md "$out/report.md" --png "$out/report.png" && cat "$out/report.md"
fi
echo "total $(( $(now) - start ))s"
cat "$status"
