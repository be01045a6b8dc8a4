"""The build on a machine without a GPU: metadata, the one source list, the fallback when the
extension is missing, the wheel tag, and the host twin of the kernels' dropout RNG."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.version import Version

from mtlora_kernels import backends, mix, mix_reference
from mtlora_kernels._build_info import build_info
from mtlora_kernels.ops import mix as mix_mod
from conftest import assert_close_to_reference, load_module

ROOT = Path(__file__).resolve().parents[1]


def _load_tool(name: str):
    return load_module(ROOT / "python" / "tools" / f"{name}.py")


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend mtlora_kernels._C was never built (a None entry makes `import` raise)."""
    monkeypatch.setitem(sys.modules, "mtlora_kernels._C", None)
    backends._cuda_extension.cache_clear()
    yield
    backends._cuda_extension.cache_clear()


def _extension_or_skip():
    ext, why = backends._cuda_extension()
    if ext is None:
        pytest.skip(f"needs the built extension: {why}")
    return ext


def _host_dropout_module():
    """What runs bindings.cpp's dropout_keep_mask on a CPU device: the built extension or,
    without one (CI builds it into a wheel of its own), the emulator's build of the same file.
    Skipping without the extension left these checks out of every CI run."""
    import cuda_emu

    return backends._cuda_extension()[0] or cuda_emu.load()._module


# ---- the one list of sources ------------------------------------------------------------------


def test_sources_list_is_complete_and_torch_free():
    listed = [ln.strip() for ln in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
              if ln.strip() and not ln.strip().startswith("#")]
    on_disk = sorted(str(p.relative_to(ROOT)) for ext in ("*.cu", "*.cpp")
                     for p in (ROOT / "csrc").glob(ext))
    assert sorted(listed) == on_disk, "csrc/sources.txt must list every .cu / .cpp, nothing else"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "csrc/sources.txt" in cmake
    assert "add_library" in cmake.replace("Python_add_library", "add_library")
    # Keeping torch out of the .cu files is what makes the build fit in CI (SPEC section 6).
    for path in (ROOT / "csrc").glob("*.cu*"):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        torchy = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10")]
        assert not torchy, f"{path.name} includes torch headers {torchy}"


# ---- setup.py's switches (through its real command line) -----------------------------------------


def _setup(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "setup.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_setup_skips_extension_when_told_and_tags_local_version():
    out = _setup({"MTLORA_BUILD_CUDA": "0", "MTLORA_LOCAL_VERSION": "cu130torch2.14"},
                 "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0.1.0+cu130torch2.14"
    assert "without the CUDA extension: MTLORA_BUILD_CUDA=0" in out.stderr


def test_setup_rejects_unknown_build_mode():
    out = _setup({"MTLORA_BUILD_CUDA": "maybe"}, "--version")
    assert out.returncode != 0
    assert "MTLORA_BUILD_CUDA must be auto, 1 or 0" in out.stderr


def test_setup_told_to_build_the_extension_fails_without_a_toolkit(tmp_path):
    """MTLORA_BUILD_CUDA=1 (gpu_prebuilt.py make, build_wheel.py, gpu_check.sh's build) must
    fail when the extension cannot be built, not build a package without it."""
    out = _setup({"MTLORA_BUILD_CUDA": "1", "CUDA_HOME": str(tmp_path)}, "--version")
    assert out.returncode != 0
    assert "MTLORA_BUILD_CUDA=1 but the CUDA extension cannot be built" in out.stderr, out.stderr


def _compile_flags(command: list[str]) -> dict[str, set[str]]:
    """The flags of one compile command that make the object what it is: defines, optimization,
    language standard, nvcc's options and the SASS targets."""
    flags: dict[str, set[str]] = {"defines": set(), "options": set(), "sass": set()}
    for tok in command:
        if tok.startswith("-D"):
            flags["defines"].add(tok[2:])
        elif re.fullmatch(r"-O\d|-std=.+|-lineinfo|--expt-relaxed-constexpr|--use_fast_math",
                          tok):
            flags["options"].add(tok)
        flags["sass"].update(re.findall(r"sm_\d+", tok) if "code=" in tok else ())
    return flags


def test_cmake_and_setup_compile_with_the_same_flags(tmp_path):
    """CMakeLists.txt builds the extension setup.py builds: each source with the same defines,
    -O level, standard and nvcc options. setup.py's commands come from the build.ninja its
    build_ext writes (with a stand-in ninja that compiles nothing), CMake's from a configure.
    The CMake build once compiled the C++ files at -O0 without NDEBUG."""
    import shlex

    from torch.utils.cpp_extension import CUDA_HOME

    cuda_home = os.environ.get("CUDA_HOME", CUDA_HOME or "/usr/local/cuda")
    if shutil.which("cmake") is None or not (Path(cuda_home) / "bin" / "nvcc").exists():
        pytest.skip("needs cmake and a CUDA toolkit")
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch (setup.py builds _C only against one)")
    fake = tmp_path / "bin" / "ninja"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = dict(os.environ, CUDA_HOME=cuda_home, MTLORA_BUILD_CUDA="1",
               TORCH_CUDA_ARCH_LIST="8.0 9.0", PATH=f"{fake.parent}:{os.environ['PATH']}")
    # Both at once (each is a few seconds); setup.py's link fails on the missing objects.
    setup = subprocess.Popen([sys.executable, "setup.py", "build_ext", "--build-temp",
                              str(tmp_path / "sp"), "--build-lib", str(tmp_path / "lib")],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    cmake = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path / "cm"),
                            f"-DPython_EXECUTABLE={sys.executable}",
                            f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc",
                            "-DCMAKE_CUDA_ARCHITECTURES=80-real;90-real"],
                           env=env, capture_output=True, text=True, timeout=120)
    setup.wait(timeout=120)
    assert cmake.returncode == 0, cmake.stdout + cmake.stderr
    ninja = (tmp_path / "sp" / "build.ninja").read_text()
    var = dict(re.findall(r"^(\w+) = (.*)$", ninja, re.M))
    rule_flags = {"compile": var["cflags"] + " " + var["post_cflags"],
                  "cuda_compile": var["cuda_cflags"] + " " + var["cuda_post_cflags"]}
    from_setup = {Path(src).name: _compile_flags(shlex.split(rule_flags[rule]))
                  for rule, src in re.findall(r"^build \S+: (\w+) (\S+)$", ninja, re.M)}
    from_cmake = {Path(e["file"]).name: _compile_flags(shlex.split(e["command"]))
                  for e in json.loads((tmp_path / "cm" / "compile_commands.json").read_text())}
    assert set(from_setup) == set(from_cmake) and len(from_setup) >= 8, (from_setup, from_cmake)
    abi = f"_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    for name, flags in from_cmake.items():
        # CMake's own define for a shared library; the ABI define torch 2.14 no longer passes
        # (its ABI is the compiler's default), CMake takes from torch.
        flags["defines"] -= {"_C_EXPORTS", abi}
        from_setup[name]["defines"].discard(abi)
        assert flags == from_setup[name], (name, flags, from_setup[name])


# ---- wheel tag ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cuda, torch_version, label",
    [("13.0", "2.14.1+cu130", "cu130torch2.14"), ("12.8", "2.11.0", "cu128torch2.11"),
     (None, "2.13.0+cpu", "cputorch2.13")],
)
def test_wheel_local_version(cuda, torch_version, label):
    build_wheel = _load_tool("build_wheel")
    got = build_wheel.local_version(cuda, torch_version)
    assert got == label
    assert Version(f"0.1.0+{got}").local == label  # a valid PEP 440 local label


# ---- the extension built here for a lent GPU machine (python/tools/gpu_prebuilt.py) -----------

# A stand-in for _C with the build facts build_info() reads: a real extension module, so the
# check's import is the one a prebuilt library goes through on the GPU machine.
_FAKE_EXTENSION = r"""
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&def);
  PyModule_AddStringConstant(m, "arch_list", ARCHS);
  PyModule_AddStringConstant(m, "torch_version", TORCH);
  PyModule_AddStringConstant(m, "cuda_version", "13.0");
  return m;
}
"""


def _prebuilt_tree(tmp_path: Path, arch: str, library: bytes | None = None) -> Path:
    """A tree with this repo's csrc/, setup.py and mtlora_kernels package (without _C) and a
    gpu_prebuilt/ made for ``arch`` from those sources (holding ``library``)."""
    tool = _load_tool("gpu_prebuilt")
    root = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", root / "csrc")
    shutil.copy2(ROOT / "setup.py", root / "setup.py")
    shutil.copytree(ROOT / "mtlora_kernels", root / "mtlora_kernels",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    (root / "gpu_prebuilt").mkdir()
    (root / "gpu_prebuilt" / name).write_bytes(library if library is not None else b"not ELF")
    (root / "gpu_prebuilt" / "manifest.json").write_text(json.dumps(
        {"library": name, "arch": arch, "digest": tool.source_digest(root, arch)}))
    return root


def _fake_extension(tmp_path: Path, archs: str, torch_version: str) -> bytes:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("needs a C compiler for the stand-in extension")
    src, lib = tmp_path / "fake.c", tmp_path / "fake.so"
    src.write_text(_FAKE_EXTENSION)
    subprocess.run([cc, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                    f'-DARCHS="{archs}"', f'-DTORCH="{torch_version}"', str(src), "-o", str(lib)],
                   check=True)
    return lib.read_bytes()


def test_wheel_ships_no_file_of_an_earlier_build(tmp_path):
    """setuptools packs what its staging directory build/lib holds: a module an earlier build
    left there (deleted from the sources since) must not ship in the next wheel."""
    tool = _load_tool("build_wheel")
    stale = tool.ROOT / "build" / "lib" / "mtlora_kernels" / "deleted_since.py"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("")
    names = zipfile.ZipFile(tool.build("8.0", tmp_path, cuda=False)).namelist()
    assert "mtlora_kernels/ops/mix.py" in names
    assert "mtlora_kernels/deleted_since.py" not in names


def test_wheel_build_gives_setup_the_archs_label_and_build_mode(tmp_path, monkeypatch):
    """What build() hands `pip wheel` (run for real by the test above) in its environment: the
    arch list asked for (ci_build_check.sh's "8.0 9.0"), else none of its own, the label of the
    torch and CUDA here, and whether to build the extension."""
    tool = _load_tool("build_wheel")
    envs = []

    def pip_wheel(cmd, env, check):
        envs.append(env)
        out = Path(cmd[cmd.index("-w") + 1])
        (out / f"mtlora_kernels-0.1.0+{env['MTLORA_LOCAL_VERSION']}-py3-none-any.whl").touch()

    monkeypatch.setattr(tool, "subprocess", SimpleNamespace(run=pip_wheel))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    wheel = tool.build("8.0 9.0", tmp_path / "cuda", cuda=True)
    assert wheel.name == f"mtlora_kernels-0.1.0+cu130torch{minor}-py3-none-any.whl"
    assert (envs[0]["TORCH_CUDA_ARCH_LIST"], envs[0]["MTLORA_BUILD_CUDA"]) == ("8.0 9.0", "1")
    wheel = tool.build(None, tmp_path / "cpu", cuda=False)
    assert wheel.name == f"mtlora_kernels-0.1.0+cputorch{minor}-py3-none-any.whl"
    assert "TORCH_CUDA_ARCH_LIST" not in envs[1] and envs[1]["MTLORA_BUILD_CUDA"] == "0"


def test_prebuilt_digest_follows_sources_and_arch(tmp_path):
    tool = _load_tool("gpu_prebuilt")
    root = _prebuilt_tree(tmp_path, "9.0")
    d = tool.source_digest(root, "9.0")
    assert tool.source_digest(root, "9.0") == d
    assert tool.source_digest(root, "8.0") != d
    (root / "csrc" / "mix_forward.cu").write_text((root / "csrc" / "mix_forward.cu").read_text()
                                                  + " ")
    assert tool.source_digest(root, "9.0") != d
    d2 = tool.source_digest(root, "9.0")
    (root / "csrc" / "new.cuh").write_text("")
    assert tool.source_digest(root, "9.0") != d2
    d3 = tool.source_digest(root, "9.0")
    (root / "setup.py").write_text((root / "setup.py").read_text() + "\n")
    assert tool.source_digest(root, "9.0") != d3


def test_prebuilt_finds_a_device_python_that_runs(tmp_path, monkeypatch):
    """pyenv puts a python3.12 shim on PATH that fails unless 3.12 is the active version:
    make's venv then comes from pyenv's own 3.12, and with no working one it says so."""
    tool = _load_tool("gpu_prebuilt")
    shim = tmp_path / "shims" / tool.DEVICE_PYTHON
    real = tmp_path / "pyenv" / "versions" / "3.12.1" / "bin" / tool.DEVICE_PYTHON
    for path, rc in ((shim, 127), (real, 0)):
        path.parent.mkdir(parents=True)
        path.write_text(f"#!/bin/sh\nexit {rc}\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim.parent}:/usr/bin:/bin")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    assert tool._device_python_base() == str(real)
    real.write_text("#!/bin/sh\nexit 1\n")
    with pytest.raises(SystemExit, match="no working python3.12 found"):
        tool._device_python_base()


def test_prebuilt_extension_is_refused_for_other_sources_or_arch(tmp_path):
    tool = _load_tool("gpu_prebuilt")
    root = _prebuilt_tree(tmp_path, "9.0")
    library = json.loads((root / "gpu_prebuilt" / "manifest.json").read_text())["library"]
    (root / "mtlora_kernels" / library).write_bytes(b"left by an earlier call")
    ok, why = tool.use("8.0", root=root)
    assert not ok and "built for '9.0'" in why
    assert not (root / "mtlora_kernels" / library).exists()  # not left for the tests to load
    (root / "csrc" / "common.cuh").write_text("// changed\n")
    ok, why = tool.use("9.0", root=root)
    assert not ok and "other sources" in why
    assert not list((root / "mtlora_kernels").glob("_C*"))
    # Built by another Python: refused before the load check, whose import could find an
    # extension an earlier build left on a warm machine under this Python's name.
    (root / "csrc" / "common.cuh").write_text((ROOT / "csrc" / "common.cuh").read_text())
    other = "_C.cpython-399-x86_64-linux-gnu.so"
    manifest = json.loads((root / "gpu_prebuilt" / "manifest.json").read_text())
    (root / "gpu_prebuilt" / "manifest.json").write_text(json.dumps(dict(manifest,
                                                                         library=other)))
    (root / "gpu_prebuilt" / library).rename(root / "gpu_prebuilt" / other)
    ok, why = tool.use("9.0", root=root)
    assert not ok and why.startswith(f"{other} is not for this Python"), why
    (root / "gpu_prebuilt" / other).rename(root / "gpu_prebuilt" / library)
    (root / "gpu_prebuilt" / "manifest.json").write_text(json.dumps(manifest))
    (root / "gpu_prebuilt" / library).unlink()
    assert tool.use("9.0", root=root) == (False, f"gpu_prebuilt/{library} is missing")
    (root / "gpu_prebuilt" / "manifest.json").unlink()
    assert tool.use("9.0", root=root) == (False, "no gpu_prebuilt/manifest.json")


def test_prebuilt_extension_that_does_not_load_is_removed(tmp_path):
    tool = _load_tool("gpu_prebuilt")
    root = _prebuilt_tree(tmp_path, "9.0")  # the library is not an ELF file
    ok, why = tool.use("9.0", root=root)
    assert not ok and "does not load here" in why, why
    assert not list((root / "mtlora_kernels").glob("_C*"))
    # Loads, but for another torch (its C++ ABI is per version) or without the GPU's arch.
    here = torch.__version__.split("+")[0]
    for archs, version in (("900", "1.0.0"), ("800", here)):
        root = _prebuilt_tree(tmp_path / archs, "9.0", _fake_extension(tmp_path, archs, version))
        ok, why = tool.use("9.0", root=root)
        assert not ok and "does not load here" in why, why
        assert not list((root / "mtlora_kernels").glob("_C*"))


def test_prebuilt_extension_that_fits_is_installed(tmp_path):
    tool = _load_tool("gpu_prebuilt")
    lib = _fake_extension(tmp_path, "800,900", torch.__version__.split("+")[0])
    root = _prebuilt_tree(tmp_path, "9.0", lib)
    ok, why = tool.use("9.0", root=root)
    assert ok, why
    assert "archs ['sm_80', 'sm_90']" in why
    (installed,) = (root / "mtlora_kernels").glob("_C*")
    assert installed.read_bytes() == lib


def test_prebuilt_make_leaves_what_use_installs_on_the_device(tmp_path, monkeypatch):
    """make, end to end with a stand-in interpreter for the build (it records what it is asked
    and leaves a library): it builds for the arch asked, and its manifest is accepted by use
    in the copy of the tree a run sends (tracked and untracked files, no ignored ones: here an
    untracked new header and an ignored object file in csrc/; gpu_prebuilt/ carried)."""
    tool = _load_tool("gpu_prebuilt")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copy2(ROOT / "setup.py", tree / "setup.py")
    (tree / ".gitignore").write_text("*.o\n/build/\n/gpu_prebuilt/\n")
    subprocess.run(["git", "init", "-q"], cwd=tree, check=True)
    subprocess.run(["git", "add", "."], cwd=tree, check=True)
    (tree / "csrc" / "new.cuh").write_text("// not added yet: sent all the same\n")
    (tree / "csrc" / "stale.o").write_bytes(b"ignored: not sent")
    name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    (tmp_path / "lib.so").write_bytes(_fake_extension(tmp_path, "800", "2.11.0"))
    builder = tmp_path / "python"
    builder.write_text("#!/usr/bin/env bash\n"
                       'if [ "$1" = setup.py ]; then\n'
                       f'  echo "$TORCH_CUDA_ARCH_LIST $MTLORA_BUILD_CUDA $*" > {tmp_path}/asked\n'
                       f"  mkdir -p mtlora_kernels && cp {tmp_path}/lib.so mtlora_kernels/{name}\n"
                       'else echo "2.11.0 3 12"; fi\n')
    builder.chmod(0o755)
    monkeypatch.setattr(tool, "ROOT", tree)
    monkeypatch.setattr(tool, "OUT", tree / "gpu_prebuilt")
    assert tool.make(builder, "8.0") == tree / "gpu_prebuilt" / name
    assert (tmp_path / "asked").read_text().split() == ["8.0", "1", "setup.py", "-q",
                                                        "build_ext", "--inplace"]
    manifest = json.loads((tree / "gpu_prebuilt" / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("library", "arch", "torch", "python")} == {
        "library": name, "arch": "8.0", "torch": "2.11.0", "python": "3.12"}
    device = tmp_path / "device"
    shutil.copytree(tree, device, ignore=shutil.ignore_patterns("*.o", ".git", "build"))
    (device / "mtlora_kernels").mkdir()
    loads = tmp_path / "loads"  # the load check itself: test_prebuilt_extension_that_fits_...
    loads.write_text('#!/bin/sh\necho "loads: $3"\n')
    loads.chmod(0o755)
    assert tool.use("8.0", root=device, python=str(loads)) == (True, "loads: sm_80")
    assert (device / "mtlora_kernels" / name).is_file()


def _gpu_check(tmp_path, steps, cases: str, timeout: float = 120, budget: int = 200):
    """gpu_check.sh STEPS with a stand-in interpreter (``cases``: its extra ``case`` arms; it
    reports an sm_90 GPU, runs `info`, and prints anything else it is asked and exits 3) ->
    (returncode, stdout, the log). Run in its own process group, killed whole at ``timeout``
    (children a killed script leaves behind would otherwise hold the pipes open)."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'case "$*" in\n'
                    '  *get_device_capability*) echo 9.0 ;;\n'
                    '  *setuptools.__version__*) exit 0 ;;\n'
                    '  *"-m mtlora_kernels info"*) echo "info: fake" ;;\n'
                    + cases +
                    '  *) echo "ran: $*"; exit 3 ;;\n'
                    "esac\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(ROOT / "python" / "tools" / "gpu_check.sh"), *steps],
                            env=dict(os.environ, PY=str(fake), OUT=str(out), BUDGET=str(budget)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        # `timeout` puts each step in a process group of its own: end those too.
        subprocess.run(["pkill", "-9", "-f", str(fake)], check=False)
        stdout, _ = proc.communicate()
    log = out / "gpu_check.log"
    return proc.returncode, stdout, log.read_text() if log.exists() else ""


@pytest.mark.parametrize("prebuilt_fits", [True, False])
def test_gpu_check_build_step_uses_the_prebuilt_extension_or_compiles(tmp_path, prebuilt_fits):
    """gpu_check.sh's build step: when gpu_prebuilt.py use succeeds (asked for the GPU's
    capability as make's --arch writes it, 9.0) the step passes without compiling, else it
    compiles (the stand-in's compile fails, so the script must exit 1)."""
    rc, stdout, log = _gpu_check(tmp_path, ["build"], '  *"gpu_prebuilt.py use --arch 9.0") echo'
                                 f' "prebuilt: fake"; exit {0 if prebuilt_fits else 1} ;;\n')
    summary = stdout[stdout.index("== summary"):]
    assert "info: fake" in log  # `info` after the steps
    if prebuilt_fits:
        assert rc == 0, stdout
        assert "rc 0 in" in summary and "prebuilt" in summary, summary
        assert "ran: setup.py build_ext" not in log
    else:
        assert rc == 1, stdout
        assert "build                rc 3" in summary, summary
        assert "ran: setup.py build_ext --inplace" in log


def test_gpu_check_refuses_an_unknown_step_before_running_any(tmp_path):
    rc, stdout, log = _gpu_check(tmp_path, ["build", "tset"], "")
    assert rc == 2 and "unknown step tset" in stdout, stdout
    assert "ran:" not in stdout + log


def test_gpu_check_steps_fail_at_once_without_the_extension(tmp_path):
    """Without an importable _C the tests would skip and the benchmark leave the cuda backend
    out, each passing; they fail instead, without running. Steps after a build step ask
    again (the answer was kept from the first check: `test build test-more` failed both)."""
    rc, stdout, log = _gpu_check(tmp_path, ["test", "bench", "sanitize", "profile"],
                                 '  *"import mtlora_kernels._C"*) exit 1 ;;\n')
    assert rc == 1, stdout
    for s in ("test", "bench", "sanitize", "profile"):
        assert re.search(rf"^{s} +failed: mtlora_kernels._C does not import", stdout, re.M), stdout
    assert "ran:" not in log.replace("ran: -c import sys, torch", "")  # only the environment
    # A build between them (the prebuilt installed) makes the later steps ask again.
    rc, stdout, log = _gpu_check(tmp_path, ["test", "build", "test-more"],
                                 f'  *"import mtlora_kernels._C"*) [ -e {tmp_path}/built ] ;;\n'
                                 f'  *"gpu_prebuilt.py use"*) touch {tmp_path}/built ;;\n'
                                 '  *"import pytest_timeout"*) ;;\n'
                                 '  *"-m pytest"*) echo "pytest ran" ;;\n')
    assert rc == 1, stdout  # the first test step still failed
    assert re.search(r"^test +failed: mtlora_kernels._C does not import", stdout, re.M), stdout
    assert re.search(r"^test-more-fuzz +rc 0", stdout, re.M), stdout


def test_gpu_check_logs_a_step_as_it_runs(tmp_path):
    """A step killed with the whole command (the device's limit) keeps its output in the log,
    and leaves no other file under $OUT (the machine returns 8 at most); the tests run with
    pytest-timeout where it is installed."""
    rc, stdout, log = _gpu_check(tmp_path, ["test"], '  *"import mtlora_kernels._C"*) ;;\n'
                                 '  *"import pytest_timeout"*) ;;\n'
                                 '  *"-m pytest"*) echo "pytest: $*"; sleep 60 ;;\n', timeout=8)
    assert rc != 0
    assert re.search(r"pytest: -m pytest .*-p timeout --timeout 120 --timeout-method thread "
                     r"-m not emulator -k not triton or agrees_with_triton "
                     r"tests/test_cuda_mix\.py", log), log
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_check.log"]


# A stand-in for every step's command that passes: _C imports, the prebuilt fits, and pytest,
# the benchmark, the profile and a compute-sanitizer's run of the snippet (where one is found)
# print what they were asked and exit 0.
_PASSING = ('  *"import mtlora_kernels._C"* | *"import pytest_timeout"*) ;;\n'
            '  *"gpu_prebuilt.py use --arch 9.0") echo "prebuilt: fake" ;;\n'
            '  *"-m pytest"* | *" bench "* | *profile_mix.py* | *"from mtlora_kernels.ops.mix"*)'
            ' echo "asked: $*" ;;\n')


def test_gpu_check_runs_the_default_steps_in_order_and_passes(tmp_path):
    """No STEP: build, test, bench, sanitize, test-more and profile, in that order, then `info`;
    exit 0 when every step passed or was skipped (here compute-sanitizer may be missing)."""
    rc, stdout, log = _gpu_check(tmp_path, [], _PASSING)
    assert rc == 0, stdout
    headers = [h for h in re.findall(r"^== (\S+)", log, re.M) if not h.startswith("sanitize")]
    assert headers == ["test-cuda_mix", "bench", "bench-noclusters", "test-more-extreme",
                       "test-more-determinism", "test-more-fuzz", "profile", "info",
                       "summary"], log
    summary = stdout[stdout.index("== summary"):]
    assert re.search(r"^build +rc 0 in \d+ s \(the prebuilt", summary, re.M), summary
    assert re.search(r"^sanitize-memcheck +(rc 0|compute-sanitizer not found|skipped)", summary,
                     re.M) or re.search(r"^sanitize +skipped: gVisor", summary, re.M), summary


def test_gpu_check_steps_share_the_budget(tmp_path):
    """A step's limit is cut to what is left of $BUDGET (less 15 s for the summary), and a step
    with under 30 s left is skipped, which is no failure."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    rc, stdout, log = _gpu_check(tmp_path / "a", ["test"], _PASSING, budget=100)
    assert rc == 0, stdout
    limit = int(re.search(r"^== test-cuda_mix \(limit (\d+)s\)", log, re.M).group(1))
    assert 70 <= limit <= 85, log  # not its own 200 s
    rc, stdout, log = _gpu_check(tmp_path / "b", ["test", "bench"], _PASSING, budget=44)
    assert rc == 0, stdout
    for s in ("test-cuda_mix", "bench", "info"):
        assert re.search(rf"^{s} +skipped: budget spent", stdout, re.M), stdout
    assert "asked:" not in log


def test_ci_build_check_checks_the_archs_it_builds_and_runs_tests_that_exist():
    """ci_build_check.sh runs in CI only (its two-arch build takes minutes): the archs its
    wheel and its CMake compile are built for must be those it asserts the wheel reports, and
    each name in its pytest -k must still select a test (a renamed one would drop out of the
    selection without a failure)."""
    script = (ROOT / "python" / "tools" / "ci_build_check.sh").read_text()
    asserted = ast.literal_eval(re.search(r'set\(info\["extension_archs"\]\) == (\{[^}]*\})',
                                          script).group(1))
    wheel = re.search(r'build_wheel\.py" --archs "([^"]+)"', script).group(1).split()
    assert {f"sm_{a.replace('.', '')}" for a in wheel} == asserted, (wheel, asserted)
    cmake = re.search(r'-DCMAKE_CUDA_ARCHITECTURES="([^"]+)"', script).group(1).split(";")
    assert {f"sm_{a}" for a in cmake} == asserted, (cmake, asserted)
    (selection,) = re.findall(r'test_build\.py" \\\n\s*-k "([^"]+)"', script)
    tests = re.findall(r"^def (test_\w+)", (ROOT / "tests" / "test_build.py").read_text(), re.M)
    for name in selection.split(" or "):
        assert any(name in t for t in tests), f"-k {name!r} selects no test of test_build.py"


# ---- build metadata -----------------------------------------------------------------------------


def test_build_info_with_extension():
    ext = _extension_or_skip()
    info = build_info()
    assert info["cuda_extension"] is True
    assert info["torch"] == torch.__version__
    assert info["extension_archs"], info
    assert all(re.fullmatch(r"sm_\d+", a) for a in info["extension_archs"])
    assert info["extension_cuda"] == str(ext.cuda_version) and re.fullmatch(r"\d+\.\d+",
                                                                            info["extension_cuda"])
    assert info["extension_torch_matches"] == (torch.__version__.split("+")[0]
                                               == info["extension_torch"])


def test_build_info_without_extension(no_extension):
    info = build_info()
    assert info["cuda_extension"] is False
    assert "not built or failed to load" in info["cuda_extension_reason"]
    assert "extension_archs" not in info


def test_build_info_extension_torch_matches_like_the_wheel_label(monkeypatch):
    """A wheel labelled torch2.14 is good for every 2.14.x (its label names major.minor), so
    an extension built against 2.14.0 matches a running 2.14.1; one built against 2.13.x does
    not."""
    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    for built, matches in (("2.14.0", True), ("2.14.1", True), ("2.13.1", False),
                           ("3.14.1", False)):
        ext = SimpleNamespace(arch_list="800,900", cuda_version="13.0", torch_version=built)
        monkeypatch.setattr(backends, "_cuda_extension", lambda ext=ext: (ext, ""))
        info = build_info()
        assert info["extension_archs"] == ["sm_80", "sm_90"]
        assert info["extension_torch_matches"] is matches, built


def test_build_info_shows_the_wheel_label(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {
        "mtlora-kernels": "0.1.0+cu130torch2.14"}[name])
    assert build_info()["installed_version"] == "0.1.0+cu130torch2.14"


def test_missing_extension_of_a_wheel_for_another_torch_says_so(no_extension, monkeypatch):
    """A wheel's _C fails to import under another torch (undefined symbols); the reason names
    the torch the wheel was built for and the one running, from the wheel's label."""
    here = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    for label, says in (("cu130torch1.0", True), (f"cu130torch{here}", False), (None, False)):
        version = "0.1.0" + (f"+{label}" if label else "")
        monkeypatch.setattr(importlib.metadata, "version", lambda name, v=version: {
            "mtlora-kernels": v}[name])
        backends._cuda_extension.cache_clear()
        why = build_info()["cuda_extension_reason"]
        assert "not built or failed to load" in why
        assert (f"was built for torch 1.0, not torch {torch.__version__}" in why) is says, why
        assert ("was built for torch" in why) is says, why  # not for a wheel for this torch


# ---- fallback when _C is missing -----------------------------------------------------------------


def test_missing_extension_falls_back_to_torch(no_extension):
    ok, why = backends.available("cuda")
    assert not ok and "mtlora_kernels._C" in why
    assert backends.report()["cuda"] == why
    assert mix_mod.resolve_backend("auto", torch.device("cpu")) == "torch"

    torch.manual_seed(0)
    x, A = torch.randn(5, 12), torch.randn(3, 12)
    B, W = torch.randn(2, 8, 3), torch.randn(2 * 2, 12)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' was requested but is unavailable.*_C"):
        mix(x, A, B, W, groups=2, scaling=2.0, backend="cuda")
    y = mix(x, A, B, W, groups=2, scaling=2.0, backend="auto")
    ref = mix_reference(x.double(), A.double(), B.double(), W.double(), groups=2, scaling=2.0)
    assert_close_to_reference(y, ref, torch.float32, "auto fallback forward")


def test_missing_extension_warns_once_with_a_gpu(no_extension, monkeypatch):
    """With a GPU, an extension that fails to load is said once, with the reason, however many
    calls ask for the backend; without one, ``info`` says why and nothing warns."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not backends.available("cuda", "cpu")[0]
    assert seen == []
    backends._cuda_extension.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            ok, why = backends.available("cuda", "cuda")
            assert not ok and "mtlora_kernels._C" in why
    assert len(seen) == 1, [str(w.message) for w in seen]
    assert why in str(seen[0].message) and "falling back" in str(seen[0].message)


def test_backend_checks_trace_under_torch_compile_without_warnings(no_extension):
    """A compiled layer picks its backend inside the trace (``auto`` on a GPU asks for cuda,
    then triton). Traced, the cached checks made dynamo warn that it ignores the cache, and the
    extension's import (importlib.import_module) is a call dynamo refuses: fullgraph=True
    failed, and without it every layer broke the graph. ``available`` is a constant to dynamo
    now, called at trace time."""

    def pick(x):
        return x + int(backends.available("cuda", "cuda")[0]) + 2 * int(
            backends.available("triton", "cuda")[0])

    torch._dynamo.reset()
    x = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.compile(pick, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(y, pick(x))


def test_cuda_backend_module_raises_clearly_without_extension(no_extension):
    from mtlora_kernels.ops import cuda_mix

    with pytest.raises(RuntimeError, match="cuda backend is unavailable"):
        cuda_mix.dropout_keep_mask(0, 2, 2, 0.5, "cpu")


# ---- the dropout RNG (host twin of the device code) ---------------------------------------------


def test_host_dropout_mask_matches_triton_rand(monkeypatch):
    """keep = tl.rand(seed, t * d_in + k) >= p, bit for bit, against Triton's own Philox run by
    its interpreter: an independent implementation of the same generator."""
    ext = _host_dropout_module()
    triton = pytest.importorskip("triton")
    import triton.language as tl

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    @triton.jit
    def rand_kernel(out, seed, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, tl.rand(seed, offs), mask=offs < n)

    T, d_in = 13, 37
    for seed in (0, 2**31 - 1, 2**40 + 5):
        u = torch.empty(T * d_in)
        rand_kernel[(triton.cdiv(T * d_in, 256),)](u, seed, T * d_in, BLOCK=256)
        for p in (0.05, 0.5):
            keep = ext.dropout_keep_mask(seed, T, d_in, p, torch.device("cpu"))
            assert keep.dtype == torch.bool and keep.shape == (T, d_in)
            assert torch.equal(keep, (u >= p).view(T, d_in)), (seed, p)


def test_host_dropout_mask_rate_and_seed():
    ext = _host_dropout_module()
    a = ext.dropout_keep_mask(7, 256, 64, 0.3, torch.device("cpu"))
    b = ext.dropout_keep_mask(7, 256, 64, 0.3, torch.device("cpu"))
    c = ext.dropout_keep_mask(8, 256, 64, 0.3, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - 0.7) < 0.02  # 16k draws: std 0.004
    assert ext.dropout_keep_mask(7, 4, 4, 0.0, torch.device("cpu")).all()
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ext.dropout_keep_mask(7, 4, 4, 1.0, torch.device("cpu"))


def test_extension_boundary_rejects_cpu_tensors():
    """The checks in bindings.cpp run before any CUDA call, so they are testable here."""
    ext = _extension_or_skip()
    x, A, B = torch.randn(3, 8), torch.randn(2, 8), torch.randn(1, 4, 2)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.forward(x, A, B, None, None, None, 1, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ext.backward(torch.randn(3, 4), x, A, B, None, torch.randn(3, 2), torch.ones(3, 1, 1),
                     None, 1, 1.0, 0.0, 0)
