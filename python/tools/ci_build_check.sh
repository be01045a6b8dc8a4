#!/usr/bin/env bash
# CI check of the build: compile the CUDA extension for sm_80 and sm_90 (no GPU needed), pack it
# into a wheel tagged +cu<CUDA>torch<X.Y>, install the wheel into a fresh venv and check it there:
# the package imports, _C loads and reports the two archs, the cuda backend says why it is
# unavailable (no GPU) and the torch backend matches the reference.
#
#   python/tools/ci_build_check.sh /path/to/venv/bin/python
#
# The fresh venv borrows torch and the other dependencies from the given interpreter's
# site-packages through a .pth file (offline, no copy of a 5 GB torch); the wheel itself goes in
# with --no-deps --no-index. Budget: the whole check took ~4 min from a clean tree
# on 2 shared cores (207 s of it the two-arch build; see
# the README, "Building"); MAX_JOBS defaults to 2.
set -euo pipefail

PY=${1:-python3}
# An absolute path: CMake resolves a relative Python_EXECUTABLE from its build directory and
# silently falls back to the system python (which has no torch). Not readlink -f: that would
# resolve the venv's symlink to the base interpreter and lose the venv.
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

start=$(date +%s)
echo "== build the wheel (compiles _C for sm_80 and sm_90)"
"$PY" "$ROOT/python/tools/build_wheel.py" --archs "8.0 9.0" --out "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/mtlora_kernels-*.whl)
echo "   $(basename "$WHEEL") in $(( $(date +%s) - start )) s"

if command -v cmake >/dev/null && command -v ninja >/dev/null; then
  # One .cu compiled through it (10 s; all six took 87 s, which the wheel above has just spent):
  # CMake's nvcc flags are its own, and without torch's --expt-relaxed-constexpr every kernel
  # file once failed there while setup.py's build passed.
  echo "== the CMake build: configure, and compile csrc/mix_backward_dx.cu through it"
  { cmake -S "$ROOT" -B "$WORK/cmake" -G Ninja -DPython_EXECUTABLE="$(command -v "$PY")" \
      -DCMAKE_CUDA_ARCHITECTURES="80;90" \
    && ninja -C "$WORK/cmake" CMakeFiles/_C.dir/csrc/mix_backward_dx.cu.o
  } > "$WORK/cmake.log" 2>&1 || { cat "$WORK/cmake.log"; exit 1; }
fi

echo "== install it into a fresh venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VSITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$SITE" > "$VSITE/_ci_borrowed_deps.pth"   # torch & co., after the venv's own packages
"$VPY" -m pip install --quiet --no-deps --no-index "$WHEEL"

echo "== check the installed wheel"
cd "$WORK"   # not the repo root: the import must come from the wheel, not the source tree
"$VPY" - "$WORK/venv" "$(basename "$WHEEL")" <<'PYEOF'
import sys
import torch
import mtlora_kernels
from mtlora_kernels import backends, mix, mix_reference
from mtlora_kernels._build_info import build_info

venv = sys.argv[1]
assert mtlora_kernels.__file__.startswith(venv), f"imported from {mtlora_kernels.__file__}"
info = build_info()
print("   build_info:", info)
assert info["cuda_extension"], f"the wheel's _C does not import: {info}"
assert set(info["extension_archs"]) == {"sm_80", "sm_90"}, info["extension_archs"]
assert info["extension_torch_matches"], info
assert info["installed_version"] in sys.argv[2], (info["installed_version"], sys.argv[2])
ok, why = backends.available("cuda")
assert ok == torch.cuda.is_available(), (ok, why)
print(f"   cuda backend available: {ok} ({why or 'GPU present'})")

torch.manual_seed(0)
x, A = torch.randn(7, 24), torch.randn(4, 24)
B, W = torch.randn(3, 10, 4), torch.randn(2 * 3, 24)
y = mix(x, A, B, W, groups=2, scaling=2.0, backend="torch")
ref = mix_reference(x.double(), A.double(), B.double(), W.double(), groups=2, scaling=2.0)
err = ((y.double() - ref).norm() / ref.norm()).item()
assert err < 1e-5, err
from mtlora_kernels.ops.mix import resolve_backend
assert resolve_backend("auto", x.device) == "torch"
print(f"   torch backend ok (rel. err. {err:.1e}), auto -> torch on CPU")
PYEOF

# make test runs on an install without _C (MTLORA_BUILD_CUDA=0), where two of these skip and the
# host dropout-mask ones run on the CUDA emulator's build; here all run against the wheel's _C
# (from $WORK, so the package is the installed one, not the source tree).
echo "== the tests that need a compiled _C, on the installed wheel"
"$VPY" -m pytest -q -p no:cacheprovider -rs "$ROOT/tests/test_build.py" \
  -k "build_info_with_extension or extension_boundary_rejects_cpu_tensors or host_dropout" \
  > "$WORK/pytest.log" 2>&1 || { cat "$WORK/pytest.log"; exit 1; }
if grep -q SKIPPED "$WORK/pytest.log"; then cat "$WORK/pytest.log"; echo "a test skipped"; exit 1; fi
echo "   $(tail -n 1 "$WORK/pytest.log")"
echo "== ci_build_check passed in $(( $(date +%s) - start )) s"
