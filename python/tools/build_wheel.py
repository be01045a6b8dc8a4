"""Build a wheel of mtlora-kernels with the CUDA extension compiled for given GPU architectures.

The wheel's local version carries the CUDA and torch versions it was built against, e.g.
``mtlora_kernels-0.1.0+cu130torch2.14-cp311-cp311-linux_x86_64.whl``: the extension links
against one torch's C++ ABI and one CUDA major, so a wheel is only good with those.

    python python/tools/build_wheel.py --archs "8.0 9.0" --out dist/
    python python/tools/build_wheel.py --no-cuda        # pure-Python wheel, tagged +cpu...

Needs the torch the wheel is for in the running environment (the build uses
--no-build-isolation) and, for the extension, a CUDA toolkit (CUDA_HOME, default
/usr/local/cuda). MAX_JOBS bounds the parallel compile jobs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the tree's package, whose wheel this builds (installed or not)

from mtlora_kernels.backends import _torch_major_minor  # noqa: E402


def local_version(cuda: str | None, torch_version: str) -> str:
    """PEP 440 local label for a build: ``cu130torch2.14`` (CUDA 13.0, torch 2.14.x) or
    ``cputorch2.14`` without CUDA. Only torch's major.minor (the rule the installed package
    checks its label against: ``backends._torch_major_minor``): patch releases keep the ABI."""
    tag = "cu" + cuda.replace(".", "") if cuda else "cpu"
    return f"{tag}torch{_torch_major_minor(torch_version)}"


def build(archs: str | None, out: Path, cuda: bool) -> Path:
    """Build the wheel into ``out`` and return its path; ``archs`` None: setup.py's default
    TORCH_CUDA_ARCH_LIST (or the environment's)."""
    import torch

    label = local_version(torch.version.cuda if cuda else None, torch.__version__)
    env = dict(os.environ, MTLORA_LOCAL_VERSION=label, MTLORA_BUILD_CUDA="1" if cuda else "0")
    if archs is not None:
        env["TORCH_CUDA_ARCH_LIST"] = archs
    if cuda:
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
    out.mkdir(parents=True, exist_ok=True)
    # setuptools packs what its staging directories hold: a module an earlier build left
    # there (deleted from the sources since) would ship in this wheel.
    for staged in (*ROOT.glob("build/lib*"), *ROOT.glob("build/bdist*")):
        shutil.rmtree(staged)
    before = set(out.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
           "-w", str(out), str(ROOT)]
    print(f"building {label} wheel for TORCH_CUDA_ARCH_LIST="
          f"{env.get('TORCH_CUDA_ARCH_LIST', 'setup.py default')!r}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wheels = sorted(set(out.glob(f"*+{label}-*.whl")) - before) or sorted(out.glob(f"*+{label}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip wheel succeeded but no *+{label}-*.whl appeared in {out}")
    print(f"built {wheels[-1].name} in {time.perf_counter() - start:.0f} s", flush=True)
    return wheels[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", help="TORCH_CUDA_ARCH_LIST for the extension (default: the "
                    "environment's, else setup.py's DEFAULT_ARCHS)")
    ap.add_argument("--out", type=Path, default=ROOT / "dist", help="output directory")
    ap.add_argument("--no-cuda", action="store_true", help="build without the CUDA extension")
    args = ap.parse_args(argv)
    print(build(args.archs, args.out, cuda=not args.no_cuda))
    return 0


if __name__ == "__main__":
    sys.exit(main())
