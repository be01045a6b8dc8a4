"""The CUDA extension built on a CPU machine for a lent GPU machine, so that device time is not
spent compiling (~2.5 min of a 15-minute lease: bindings.cpp alone is one long compile).

    python python/tools/gpu_prebuilt.py make [--python PY] [--arch 9.0]   # here, no GPU needed
    python python/tools/gpu_prebuilt.py use --arch 9.0                     # there (gpu_check.sh)

``make`` compiles ``mtlora_kernels._C`` for one architecture against the torch of ``--python``
(an interpreter with the GPU machine's torch: its C++ ABI is per torch version) from a copy of
this tree, and leaves ``gpu_prebuilt/`` (ignored by git; name it in the run's ``carry``): the
library and ``manifest.json`` with a digest of the sources it was built from. Without
``--python`` it makes ``build/gpu_prebuilt/venv`` with ``python3.12`` and ``torch==2.11.0``, the
H200 image's (/work/.library/device/KINDS.md), from the package registry.

``use`` installs that library into ``mtlora_kernels/`` only when its digest matches the tree
(sources and architecture), it loads against the torch there and, on a GPU, runs a kernel;
otherwise it leaves no copy of it there and exits 1, and gpu_check.sh builds as before. A
library built on one system image may not load on another (other system libraries), which is
what the load check is for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "gpu_prebuilt"
DEVICE_TORCH = "2.11.0"
DEVICE_PYTHON = "python3.12"

# What the extension's binary depends on in this tree: its sources and the build script.
_INPUTS = ("csrc", "setup.py")


def source_digest(root: Path, arch: str) -> str:
    """sha256 over the extension's inputs in ``root`` (paths and contents) and the arch."""
    h = hashlib.sha256(f"arch {arch}\n".encode())
    for name in _INPUTS:
        top = root / name
        files = (sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir()
                 else [top] if top.is_file() else [])
        for f in files:
            h.update(f"{f.relative_to(root)}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _device_python_base() -> str:
    """An interpreter of DEVICE_PYTHON's version that runs: the one on PATH, else one of
    pyenv's versions (pyenv puts a shim for every version on PATH, which fails unless that
    version is the active one)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = sorted(pyenv.glob(f"versions/{DEVICE_PYTHON.removeprefix('python')}*/bin/"
                              f"{DEVICE_PYTHON}"))
    for cand in filter(None, [shutil.which(DEVICE_PYTHON), *map(str, found)]):
        if subprocess.run([cand, "-c", ""], capture_output=True).returncode == 0:
            return cand
    sys.exit(f"no working {DEVICE_PYTHON} found: pass --python with the GPU machine's torch")


def _default_python() -> Path:
    venv = ROOT / "build" / "gpu_prebuilt" / "venv"
    py, ready = venv / "bin" / "python", venv / ".ready"
    if not ready.exists():  # also after an earlier attempt failed half-way
        subprocess.run([_device_python_base(), "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={DEVICE_TORCH}",
                        "setuptools", "ninja"], check=True)
        ready.touch()
    return py


def make(python: Path | None, arch: str) -> Path:
    """Build _C for ``arch`` against ``python``'s torch into gpu_prebuilt/; returns the library."""
    py = python or _default_python()
    src = ROOT / "build" / "gpu_prebuilt" / "src"
    shutil.rmtree(src, ignore_errors=True)
    # The files git would send: tracked and untracked-not-ignored (the device's copy).
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MTLORA_BUILD_CUDA="1",
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    env.setdefault("CUDA_HOME", "/usr/local/cuda")
    subprocess.run([str(py), "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                   check=True)
    (lib,) = (src / "mtlora_kernels").glob("_C.*.so")
    probe = ("import sys, torch; print(torch.__version__.split('+')[0], sys.version_info[0], "
             "sys.version_info[1])")
    torch_version, *pyver = subprocess.run([str(py), "-c", probe], check=True, text=True,
                                           capture_output=True).stdout.split()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    shutil.copy2(lib, OUT / lib.name)
    # Host debug info only (the device code keeps its -lineinfo): 22 MB -> 17 MB for sm_90.
    subprocess.run(["strip", "--strip-debug", str(OUT / lib.name)], check=True)
    manifest = {"library": lib.name, "arch": arch, "torch": torch_version,
                "python": ".".join(pyver), "digest": source_digest(src, arch)}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return OUT / lib.name


# The tree's own account of its extension (build_info), and on a GPU one of its kernels.
_LOAD_CHECK = """
import sys, torch
from mtlora_kernels._build_info import build_info
info = build_info()
assert info["cuda_extension"], info["cuda_extension_reason"]
assert info["extension_torch_matches"], ("built for torch", info["extension_torch"], "here",
                                         info["torch"])
assert sys.argv[1] in info["extension_archs"], (sys.argv[1], info["extension_archs"])
if torch.cuda.is_available():
    import mtlora_kernels._C as ext
    keep = ext.dropout_keep_mask(1, 64, 64, 0.5, torch.device("cuda"))
    assert keep.is_cuda and 0.3 < keep.float().mean().item() < 0.7
print("prebuilt mtlora_kernels._C loads: archs", info["extension_archs"], "torch",
      info["extension_torch"])
"""


def use(arch: str, root: Path = ROOT, python: str = sys.executable) -> tuple[bool, str]:
    """Install gpu_prebuilt/'s library into root/mtlora_kernels/ if it was built from these
    sources for ``arch`` and loads with ``python``; ``(installed, why)``."""
    manifest_file = root / "gpu_prebuilt" / "manifest.json"
    if not manifest_file.is_file():
        return False, f"no {manifest_file.relative_to(root)}"
    m = json.loads(manifest_file.read_text())
    dest = root / "mtlora_kernels" / m["library"]
    dest.unlink(missing_ok=True)  # a copy from an earlier call on this machine
    if not (root / "gpu_prebuilt" / m["library"]).is_file():
        return False, f"gpu_prebuilt/{m['library']} is missing"
    if m.get("arch") != arch:
        return False, f"built for {m.get('arch')!r}, this GPU is {arch!r}"
    if m.get("digest") != source_digest(root, arch):
        return False, "built from other sources than this tree's csrc/ and setup.py"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not m["library"].endswith(suffix):
        return False, f"{m['library']} is not for this Python ({suffix})"
    shutil.copy2(root / "gpu_prebuilt" / m["library"], dest)
    r = subprocess.run([python, "-c", _LOAD_CHECK, "sm_" + arch.replace(".", "")], cwd=root,
                       text=True, capture_output=True)
    if r.returncode != 0:
        dest.unlink()
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"it does not load here: {tail[0]}"
    return True, r.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("make", help="build gpu_prebuilt/ here")
    pm.add_argument("--python", type=Path, help="interpreter with the GPU machine's torch")
    pm.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST entry (default 9.0)")
    pu = sub.add_parser("use", help="install gpu_prebuilt/'s library if it fits")
    pu.add_argument("--arch", required=True, help="the GPU's capability, e.g. 9.0")
    a = p.parse_args(argv)
    if a.cmd == "make":
        lib = make(a.python, a.arch)
        print(f"{lib.relative_to(ROOT)} ({lib.stat().st_size / 2**20:.1f} MiB): carry "
              f"'gpu_prebuilt' in the run")
        return 0
    ok, why = use(a.arch)
    print(("using the prebuilt extension: " if ok else "not using gpu_prebuilt/: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
