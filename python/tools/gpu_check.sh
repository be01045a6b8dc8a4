#!/usr/bin/env bash
# The GPU check of the CUDA and Triton backends, for a lent GPU machine (which has torch, triton,
# nvcc, pytest, pytest-timeout, hypothesis and compute-sanitizer but nothing of this project):
#
#   bash python/tools/gpu_check.sh [STEP ...]
#   steps: build test bench sanitize test-more profile triton
#
# With no STEP it runs build, test, bench, sanitize, test-more and profile, in that order, most
# needed first: build (the extension for this GPU), test (tests/test_cuda_mix.py's GPU cases:
# the cuda backend against the reference and against Triton), bench (decode, a prefill and
# the SPEC's floor shape, with the sm_90 clusters and without), sanitize (compute-sanitizer
# memcheck, then racecheck, on a forward and backward per dtype and shape), test-more (the
# extreme-value, determinism and fuzz files on the GPU), profile (per-kernel times of one
# forward + backward on the cuda and triton backends, python/tools/profile_mix.py). `triton`
# adds the Triton test files, whose first run JIT-compiles many kernels. After the steps,
# `mtlora-kernels info` logs the build and the cluster size the cuda forward takes.
# Each step has its own time limit, and all of them share a budget of $BUDGET seconds (default
# 560, inside the lent machine's 600 s per command): a step gets what is left and is skipped
# when under 30 s remain, so the summary and the logs always come back. A session has 15
# minutes of device time in all, the machine's start included, and the machine stays warm only
# 30 s after a call, so:
#   run 1: bash python/tools/gpu_check.sh            (timeout_s 600; carry gpu_prebuilt)
#   run 2, only if status shows time left (>= 150 s) and at once, on the warm machine:
#          BUDGET=<budget_left_s - 60> bash python/tools/gpu_check.sh build <the skipped steps>
#   (build is seconds on the warm machine: the prebuilt or already-built _C is reused).
# Logs: $OUT/gpu_check.log (default OUT=./gpu_out) holds the environment and every step's
# output as it runs (a step killed with the command keeps what it printed); bench writes 2 + 2
# files beside it (with the sm_90 clusters and without), profile 3: 8 files, what the machine
# returns at most.
# Builds for this GPU's architecture only: ~2.5 min on 2 cores with torch 2.11 (bindings.cpp,
# one file, is the longest; the .cu files compile in parallel), measured on a CPU machine. To
# spend no device time on it, build it here first and carry it (the build step uses it when it
# was built from the same sources for this arch and loads there, else it compiles):
#   python python/tools/gpu_prebuilt.py make        # then run(..., carry=["gpu_prebuilt"])
# The steps that need the extension fail at once, saying so, when mtlora_kernels._C does not
# import (their tests would skip and their benchmarks leave the cuda backend out, silently).
# Exits 1 when a step that ran failed (a step skipped for lack of budget or of
# compute-sanitizer does not count), 2 for an unknown step (before running any), 0 otherwise.
# Nothing here has run on a GPU yet: it was written, with the rest of the GPU path, without one.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
DEADLINE=$((SECONDS + ${BUDGET:-560}))
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
KNOWN="build test bench sanitize test-more profile triton"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench sanitize test-more profile)
for s in "${steps[@]}"; do
  case " $KNOWN " in *" $s "*) ;; *) echo "unknown step $s (steps: $KNOWN)"; exit 2 ;; esac
done
declare -A status
# pytest-timeout names a test that hangs (a kernel that never returns) and ends its run
# instead of spending the step's whole limit on it. Its thread method: the default, SIGALRM,
# acts only between Python bytecodes, never while the host waits in a CUDA synchronize.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --maxfail=20)
"$PY" -c 'import pytest_timeout' > /dev/null 2>&1 &&
  PYTEST+=(-p timeout --timeout 120 --timeout-method thread)

step() {  # step NAME LIMIT_SECONDS COMMAND...: run it within the limit and the budget
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS - 15))
  shift 2
  if [ "$left" -lt 30 ]; then
    status[$name]="skipped: budget spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  local t0=$SECONDS
  # Into the log as it runs, so a step killed with the whole command keeps its output there.
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 15
  status[$name]="rc ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
}

EXT=unknown
need_ext() {  # need_ext STEP: 0 when mtlora_kernels._C imports, else marks STEP failed
  if [ "$EXT" = unknown ]; then
    "$PY" -c 'import mtlora_kernels._C' >> "$LOG" 2>&1 && EXT=yes || EXT=no
  fi
  [ "$EXT" = yes ] && return 0
  status[$1]="failed: mtlora_kernels._C does not import (see the build step)"
  return 1
}

{ nvidia-smi -L; echo "kernel $(uname -r)"
  "$PY" -c 'import sys, torch, triton, setuptools; print("python",
  sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "setuptools",
  setuptools.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
  nvcc --version | tail -n 2
  echo "compute-sanitizer: ${SANITIZER:-not found}"; } 2>&1 | tee -a "$LOG"

for s in "${steps[@]}"; do
  case $s in
    build)
      EXT=unknown  # asked again after this build (a step before it may have found no _C)
      arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' \
        2>>"$LOG")
      if [ -z "$arch" ]; then
        echo "torch sees no CUDA device (its error is in $LOG): build skipped" | tee -a "$LOG"
        status[build]="rc 1: no device capability"
        continue
      fi
      # An extension built for this arch from these sources on a CPU machine (gpu_prebuilt.py
      # make; carry gpu_prebuilt) saves the compile, if it loads here.
      t0=$SECONDS
      if timeout 120 "$PY" python/tools/gpu_prebuilt.py use --arch "$arch" 2>&1 | tee -a "$LOG"
      then
        status[build]="rc 0 in $((SECONDS - t0)) s (the prebuilt extension, gpu_prebuilt/)"
        continue
      fi
      # setuptools before 77 rejects pyproject's SPDX license string (a table then); the lent
      # machine's version is unknown, and its copy of the tree is thrown away after the lease.
      old='import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)'
      if ! "$PY" -c "$old"; then
        sed -i 's/^license = "\(.*\)"$/license = {text = "\1"}/' pyproject.toml
        echo "setuptools < 77: pyproject's license rewritten as a table for this build" \
          | tee -a "$LOG"
      fi
      step build 400 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" MTLORA_BUILD_CUDA=1 \
        "$PY" setup.py build_ext --inplace ;;
    sanitize)
      need_ext sanitize || continue
      if [ "$(uname -r)" = 4.4.0 ]; then  # KINDS.md, 2026-11-04: "Device not supported"
        status[sanitize]="skipped: gVisor (kernel 4.4.0), where compute-sanitizer refuses the GPU"
        continue
      fi
      # One forward and backward per dtype and shape on the cuda backend (router, odd sizes,
      # column splits, decode tiles; with dropout, and without it: the forward's cp.async
      # pipeline; on sm_90 clusters of 4 splits, of one group and of 16, and with external
      # logits at g = d_out), under memcheck and racecheck, kernels of the extension only.
      snippet='
import torch
from mtlora_kernels.ops.mix import mix
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for T, d_in, d_out, N, g, p, ext in (
            (133, 96, 80, 4, 2, 0.1, 0), (70, 64, 512, 16, 512, 0.1, 0),
            (133, 256, 128, 4, 2, 0.0, 0), (3, 256, 128, 4, 2, 0.0, 0),
            (3, 512, 256, 4, 1, 0.1, 0), (3, 512, 256, 4, 16, 0.1, 0),
            (3, 512, 256, 4, 256, 0.1, 1)):
        x = torch.randn(T, d_in, device="cuda", dtype=dt, requires_grad=True)
        A = (torch.randn(16, d_in, device="cuda", dtype=dt) / 8).requires_grad_()
        B = (torch.randn(N, d_out, 16, device="cuda", dtype=dt) / 4).requires_grad_()
        if ext:  # external logits
            W, L = None, torch.randn(T, g * N, device="cuda", dtype=dt, requires_grad=True)
        else:
            W, L = (torch.randn(g * N, d_in, device="cuda", dtype=dt) / 8).requires_grad_(), None
        y = mix(x, A, B, W, logits=L, groups=g, scaling=2.0, dropout_p=p, seed=3,
                backend="cuda")
        y.float().square().sum().backward()
torch.cuda.synchronize()
print("ran")'
      # API errors are torch's business (they would set the exit code with clean kernels).
      # Without torch's caching allocator every tensor is its own allocation: an overrun
      # would otherwise land in a neighbour inside the same cached block, unseen by memcheck.
      for tool in memcheck racecheck; do
        if [ -z "$SANITIZER" ]; then
          status[sanitize-$tool]="compute-sanitizer not found"
          continue
        fi
        step "sanitize-$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
          --tool "$tool" --error-exitcode 9 --report-api-errors no --kernel-name kns=mtlora \
          "$PY" -c "$snippet"
      done ;;
    test | test-more)
      # Not the emulator's cases (they test nothing here), not the Triton backend's (their JIT
      # compiles are the `triton` step's; the CUDA-vs-Triton comparison stays), and not
      # stopping at the first failure: the kernels have never run, and one early failure must
      # not hide the rest. One process per file: an illegal memory access ends the CUDA
      # context, and with it only that file's run.
      need_ext "$s" || continue
      if [ "$s" = test ]; then files=(test_cuda_mix); else files=(test_extreme test_determinism test_fuzz); fi
      for f in "${files[@]}"; do
        step "$s-${f#test_}" 200 "${PYTEST[@]}" -m "not emulator" \
          -k "not triton or agrees_with_triton" "tests/$f.py"
      done ;;
    bench)
      need_ext bench || continue
      # Decode (T = 1, 16), a prefill whose cuda forward trades 13 splits for 10 in clusters
      # (T = 1280) and the SPEC's floor shape (T = 8192, d = 4096, r = 16, N = 16, g = 2).
      step bench 200 "$PY" -m mtlora_kernels bench --tokens 1,16,1280,8192 --experts 16 --groups 2 \
        --dtype bf16 --min-time 0.5 --out "$OUT/bench" --no-progress
      # The same shapes again on the cuda backend with the sm_90 cluster path turned off, to
      # tell what the clusters give (each takes one there: 8 blocks at T = 1 and 16, 5 at 1280,
      # 2 at 8192; on sm_80 the two runs time the same kernels).
      step bench-noclusters 90 env MTLORA_CUDA_CLUSTERS=0 "$PY" -m mtlora_kernels bench \
        --tokens 1,16,1280,8192 --experts 16 --groups 2 --dtype bf16 --min-time 0.5 \
        --providers mtlora-cuda --out "$OUT/bench-noclusters" --no-progress ;;
    profile)
      need_ext profile || continue
      step profile 120 "$PY" python/tools/profile_mix.py --out "$OUT/profile" ;;
    triton)
      step test-triton 500 "${PYTEST[@]}" tests/test_triton_mix.py tests/test_linalg.py ;;
  esac
done

# After any steps: the backends, the build's metadata and the cluster size the forward takes.
step info 60 "$PY" -m mtlora_kernels info
echo "== summary" | tee -a "$LOG"
for s in "${!status[@]}"; do printf '%-20s %s\n' "$s" "${status[$s]}"; done | sort | tee -a "$LOG"
rc=0
for s in "${!status[@]}"; do
  case ${status[$s]} in "rc 0 "* | skipped* | *"not found") ;; *) rc=1 ;; esac
done
exit $rc
