"""Run the CUDA extension's kernels and launch sequence on the CPU, without a GPU.

``csrc/`` is compiled by g++ against the emulated CUDA headers of this folder (``emu.h``):
``__shared__`` declarations and ``kernel<<<grid, block, smem, stream>>>(args)`` launches are
rewritten to plain C++ first, the rest of the source is compiled as it is. The torch-facing
``bindings.cpp`` is compiled too, against torch's headers (``torch_bindings.cpp``), into a Python
module over CPU tensors: :func:`load` gives an object with the interface of ``mtlora_kernels._C``
(``forward``, ``backward``, ``dropout_keep_mask``) whose ``forward`` and ``backward`` are the
extension's own boundary checks, allocations and dtype dispatch, which the tests put behind the
``cuda`` backend. :func:`build` also makes the sanitizer drivers (``check.cpp`` under
AddressSanitizer + UndefinedBehaviorSanitizer, and ThreadSanitizer), which run the launch
sequence without bindings.cpp.

This checks the kernels' arithmetic, indexing, bounds, barriers and launch configuration. It
says nothing about speed, and it is not a GPU: see the header of ``emu.h`` for what differs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
BUILD = ROOT / "build" / "cuda_emu"

CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=c++20", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function",
              "-Wno-unknown-pragmas"]
# name -> extra flags. "lib": the Python module of the tests, "lib-asan" the same under
# AddressSanitizer + UBSan (for a Python started with libasan preloaded: load() builds it when
# ``VARIANT_ENV`` says so); the others: check.cpp drivers. (The module's units share emu.h's
# inline globals with torch_bindings.cpp, so all of them take torch's C++ ABI.)
_ASAN = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer"]
_MODULE_FLAGS = ["-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
VARIANTS = {
    "lib": ["-O2", *_MODULE_FLAGS],
    "lib-asan": [*_ASAN, *_MODULE_FLAGS],
    "asan": _ASAN,
    "tsan": ["-O1", "-g", "-fsanitize=thread"],
}
# The module variant load() builds: "lib" unless this environment variable names another.
VARIANT_ENV = "CUDA_EMU_VARIANT"

# The extension's source that needs torch: only the "lib" variant compiles it, through
# torch_bindings.cpp (which includes it).
TORCH_FACING = "bindings.cpp"
MODULE = "_C_emu"  # the Python module of the "lib" variant

_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+([^;]*?)\b(\w+)\s*\[\s*\]\s*;")
_LAUNCH_EX = re.compile(r"\bcudaLaunchKernelEx\((\s*[^,()]+,\s*)((?:\w+::)*)(\w+)")
_SHARED = re.compile(r"__shared__\s+([^;]*?)\b(\w+)\s*\[([^\];]*)\]\s*;")


def _byte_buffer(m: re.Match, what: str) -> None:
    """Shared memory must be declared as bytes, aligned to at most the emulator's 128 B."""
    decl = re.fullmatch(r"(?:__align__\((\d+)\)\s+)?unsigned char\s*", m[1])
    if not decl or int(decl[1] or 1) > 128:
        raise ValueError(f"{what} shared memory must be unsigned char, aligned to <= 128 B: "
                         f"{m[0]!r}")


def _dynamic_shared(m: re.Match) -> str:
    _byte_buffer(m, "dynamic")
    return f"unsigned char* {m[2]} = ::emu::dynamic_shared();"


def _static_shared(m: re.Match) -> str:
    _byte_buffer(m, "static")
    return f"unsigned char* {m[2]} = ::emu::static_shared({m[3]}, __COUNTER__);"


def rewrite(text: str) -> str:
    """CUDA source -> C++ for emu.h: ``__shared__`` arrays (static and ``extern``, i.e. dynamic)
    and ``<<<...>>>`` launches."""
    text = _EXTERN_SHARED.sub(_dynamic_shared, text)
    text = _SHARED.sub(_static_shared, text)
    out, pos = [], 0
    while (start := text.find("<<<", pos)) != -1:
        stmt = max(text.rfind(c, 0, start) for c in ";{}") + 1  # the kernel expression starts here
        while text[stmt:start].lstrip().startswith("//"):  # after the comments before it
            stmt = text.index("\n", stmt + len(text[stmt:start]) - len(text[stmt:start].lstrip()))
        close = text.index(">>>", start)
        if text[close + 3] != "(":
            raise ValueError(f"cannot parse the launch at offset {start}: {text[stmt:close + 8]!r}")
        depth, end = 0, close + 3
        while True:
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
            if depth == 0:
                break
        lead = text[stmt:start]
        indent = lead[: len(lead) - len(lead.lstrip())]
        kernel, config, args = lead.strip(), text[start + 3:close], text[close + 4:end - 1]
        out.append(text[pos:stmt])
        name = kernel.split("<")[0].split("::")[-1].strip()
        out.append(f"{indent}::emu::launch({config}, reinterpret_cast<const void*>(&{kernel}),"
                   f' [&] {{ {kernel}({args}); }}, 1u, "{name}")')
        pos = end
    out.append(text[pos:])
    # cudaLaunchKernelEx(cfg, kernel<...>, args) -> emu::launch_kernel_ex("kernel", cfg, ...)
    return _LAUNCH_EX.sub(r'::emu::launch_kernel_ex("\3", \1\2\3', "".join(out))


def _sources() -> list[str]:
    """File names of the extension's torch-free sources (csrc/sources.txt)."""
    listed = [ln.strip() for ln in (CSRC / "sources.txt").read_text().splitlines()
              if ln.strip() and not ln.lstrip().startswith("#")]
    return [Path(s).name for s in listed if Path(s).name != TORCH_FACING]


def _key(variant: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout
    h.update((version + variant + " ".join(BASE_FLAGS + VARIANTS[variant])).encode())
    if variant.startswith("lib"):  # compiled against torch's headers, linked against its libs
        h.update((torch.__version__ + sysconfig.get_config_var("EXT_SUFFIX")).encode())
    for p in sorted([*CSRC.iterdir(), *HERE.rglob("*")]):
        if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".cpp", ".py"):
            h.update(str(p.relative_to(ROOT)).encode() + p.read_bytes())
    return h.hexdigest()[:16]


def write_sources(src_dir: Path) -> Path:
    """csrc/ as plain C++ for emu.h (`rewrite`, each ``.cu`` as ``.cpp``) in ``src_dir``; the
    translation units are ``unit_names()``. Returns ``src_dir``."""
    src_dir.mkdir(parents=True, exist_ok=True)
    for p in CSRC.iterdir():
        if p.suffix in (".cu", ".cuh", ".h", ".cpp"):
            (src_dir / (p.stem + ".cpp" if p.suffix == ".cu" else p.name)).write_text(
                rewrite(p.read_text()))
    return src_dir


def unit_names() -> list[str]:
    """The emulated torch-free translation units of csrc/ (as write_sources names them)."""
    return [Path(name).stem + ".cpp" for name in _sources()]


def _torch_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags of a Python extension module against this torch."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    compile_flags = [f"-DTORCH_EXTENSION_NAME={MODULE}", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    for inc in includes:  # after -I: include/c10/cuda's stand-ins win over torch's headers
        compile_flags += ["-isystem", inc]
    link = ["-shared"]
    for lib_dir in cpp_extension.library_paths():
        link += ["-L", lib_dir, f"-Wl,-rpath,{lib_dir}"]
    return compile_flags, link + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def build(variant: str = "lib") -> Path:
    """Compile the emulated extension (cached under build/cuda_emu by a hash of the sources):
    the Python module ``_C_emu`` (bindings.cpp, api.cpp's controls and the kernels) for
    ``variant="lib"`` or ``"lib-asan"`` (about 40 s of the build is bindings.cpp against
    torch's headers), else the sanitizer driver ``check.cpp``."""
    if shutil.which(CXX) is None:
        raise RuntimeError(f"the CUDA emulator needs a C++20 compiler; {CXX!r} is not on PATH")
    lib = variant.startswith("lib")
    out_dir = BUILD / f"{variant}-{_key(variant)}"
    target = out_dir / (MODULE + sysconfig.get_config_var("EXT_SUFFIX") if lib else "check")
    if target.exists():
        return target
    src_dir = write_sources(out_dir / "src")
    entries = ["torch_bindings.cpp", "api.cpp"] if lib else ["check.cpp"]
    units = [HERE / name for name in entries] + [src_dir / name for name in unit_names()]
    flags = BASE_FLAGS + VARIANTS[variant] + ["-I", str(HERE / "include"), "-I", str(src_dir)]
    torch_compile, torch_link = _torch_flags() if lib else ([], [])

    def compile_one(unit: Path) -> Path:
        obj = out_dir / (unit.stem + ".o")
        extra = torch_compile if unit.name == "torch_bindings.cpp" else []
        cmd = [CXX, *flags, *extra, "-c", str(unit), "-o", str(obj)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {unit.name} for the CUDA emulator failed:\n"
                               f"{' '.join(cmd)}\n{res.stderr}")
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, units))
    tmp = target.with_suffix(".tmp")
    res = subprocess.run([CXX, *flags, *map(str, objs), *torch_link, "-o", str(tmp)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulator failed:\n{res.stderr}")
    tmp.rename(target)  # atomic: a concurrent build never sees a half-written target
    return target


_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _poisoned(*shape, dtype) -> torch.Tensor:
    """An output buffer whose every element is NaN until a kernel writes it."""
    return torch.full(shape, float("nan"), dtype=dtype)


class Emulated:
    """``mtlora_kernels._C``'s interface over the emulated kernels, on CPU tensors.

    ``forward`` and ``backward`` are bindings.cpp's (``module``: its checks, allocations and
    dtype dispatch, then the launch sequence of ``csrc/mix.cpp``), run with every tensor they
    allocate filled with NaN (torch's deterministic mode fills uninitialized memory), so an
    output element no kernel writes shows. ``launch_forward`` and ``launch_backward`` run the
    launch sequence alone, on buffers allocated here (``lib``, the module's C entry points of
    api.cpp): for :meth:`windows`, which zero the call's workspace between phases.
    ``num_sms`` stands in for the device's SM count, which decides the column splits of the
    forward and of the backward's dy kernel, and the token splits of dB and dA/dW: 132 is an
    H100 / H200. ``max_cluster`` is ``forward_max_cluster`` of the device: 8 on sm_90 (the
    forward's column splits may share their projection in thread-block clusters), 1 for a
    device without clusters (bindings.cpp gets it from its switch MTLORA_CUDA_CLUSTERS=0).
    """

    def __init__(self, module, lib: ctypes.CDLL, num_sms: int = 132, max_cluster: int = 8):
        self._module = module
        self._lib = lib
        self.num_sms = num_sms
        self.max_cluster = max_cluster
        self._windows: tuple[dict, tuple] = ({}, ())
        for fn in (lib.emu_mix_forward, lib.emu_mix_backward, lib.emu_dropout_keep_mask):
            fn.restype = ctypes.c_int
        lib.emu_set_multiprocessor_count.restype = None
        lib.emu_set_multiprocessor_count.argtypes = [ctypes.c_int]
        lib.emu_cluster_launches.restype = ctypes.c_uint64
        lib.emu_forward_plan.restype = None
        lib.emu_forward_plan.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_void_p]
        lib.emu_forward_max_cluster.restype = ctypes.c_int
        lib.emu_forward_max_cluster.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.emu_refuse_clusters.restype = lib.emu_reverse_blocks.restype = None
        lib.emu_refuse_clusters.argtypes = lib.emu_reverse_blocks.argtypes = [ctypes.c_int]
        lib.emu_set_window.restype = lib.emu_clear_windows.restype = None
        lib.emu_set_window.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 3 + [
            ctypes.c_void_p, ctypes.c_size_t]
        lib.emu_backward_plan.restype = None
        lib.emu_backward_plan.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_void_p]
        lib.emu_mix_forward.argtypes = (
            [ctypes.c_int] + [ctypes.c_void_p] * 10 + [ctypes.c_void_p, ctypes.c_float,
                                                       ctypes.c_float, ctypes.c_uint64,
                                                       ctypes.c_int, ctypes.c_int,
                                                       ctypes.c_char_p, ctypes.c_int])
        lib.emu_mix_backward.argtypes = (
            [ctypes.c_int] + [ctypes.c_void_p] * 16 + [ctypes.c_void_p, ctypes.c_float,
                                                       ctypes.c_float, ctypes.c_uint64,
                                                       ctypes.c_int, ctypes.c_char_p,
                                                       ctypes.c_int])
        lib.emu_dropout_keep_mask.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_float, ctypes.c_uint64, ctypes.c_char_p,
                                              ctypes.c_int]

    # The build facts bindings.cpp records (mtlora_kernels._build_info reads them).
    arch_list = property(lambda self: self._module.arch_list)
    cuda_version = property(lambda self: self._module.cuda_version)
    torch_version = property(lambda self: self._module.torch_version)

    @staticmethod
    def _check(rc: int, err: ctypes.Array) -> None:
        if rc != 0:
            raise RuntimeError(f"mtlora_kernels._C (emulated): {err.value.decode()}")

    @staticmethod
    def _shape(x, A, B, groups) -> ctypes.Array:
        T, d_in = x.shape
        N, d_out, r = B.shape
        return (ctypes.c_int64 * 6)(T, d_in, d_out, r, N, groups)

    def forward_plan(self, T, d_in, d_out, r, N, g, router=True) -> tuple[int, int]:
        """(workspace floats, cluster size) of the forward for these sizes at ``num_sms`` and
        ``max_cluster`` (``forward_plan`` in mtlora.h), with a router (W) or without (external
        logits, N == 1): no workspace unless the launch splits the columns of d_out, a cluster
        of 1 unless its splits share their projection."""
        shape = (ctypes.c_int64 * 6)(T, d_in, d_out, r, N, g)
        out = (ctypes.c_int64 * 2)()
        self._lib.emu_forward_plan(shape, int(router), self.num_sms, self.max_cluster, out)
        return out[0], out[1]

    def device_max_cluster(self, cluster_launch: bool, ptx: int, binary: int) -> int:
        """``forward_max_cluster`` of csrc/mix_forward_cluster.cu on an emulated device with or
        without cluster launch, whose kernels were compiled from PTX for compute_<ptx> into
        machine code for sm_<binary>."""
        return self._lib.emu_forward_max_cluster(int(cluster_launch), int(ptx), int(binary))

    def forward_max_cluster(self, device_index: int) -> int:
        """bindings.cpp's ``forward_max_cluster``: the largest cluster the forward launches on
        the emulated device (``max_cluster``)."""
        with self._device():
            return self._module.forward_max_cluster(device_index)

    def refuse_clusters(self, refuse: bool) -> None:
        """Make every cluster launch fail (cudaErrorInvalidClusterSize), as on a GPU that
        cannot schedule one."""
        self._lib.emu_refuse_clusters(int(refuse))

    def cluster_launches(self) -> int:
        """How many thread-block cluster launches have run in this process."""
        return self._lib.emu_cluster_launches()

    def reverse_blocks(self, reverse: bool) -> None:
        """Run every launch's blocks (clusters, in y) in reverse index order, as a GPU may:
        an element that two blocks write passes in index order when the later one is right."""
        self._lib.emu_reverse_blocks(int(reverse))

    @contextlib.contextmanager
    def windows(self, first_blocks: dict, zero_workspace_before: tuple = ()):
        """Within the block, in ``launch_forward`` / ``launch_backward``, launches of each kernel
        named in ``first_blocks`` (``{"kernel": (x, y, z)}``, names without template arguments)
        skip its blocks whose index is below those in any axis (a cluster runs whole), and
        before a launch of a kernel named in ``zero_workspace_before`` the call's workspace is
        zeroed. So the far end of an input too large to emulate whole can be run: the token
        blocks past some row, and the token splits past it, whose skipped splits' workspace
        slabs then add nothing (the phases of the backward share one)."""
        self._windows = (dict(first_blocks), tuple(zero_workspace_before))
        try:
            yield
        finally:
            self._windows = ({}, ())

    def _run(self, ws: torch.Tensor, entry, *args) -> int:
        """entry(*args) with the current windows set for it (``ws``: the call's workspace)."""
        first_blocks, zero = self._windows
        for name in {*first_blocks, *zero}:
            self._lib.emu_set_window(name.encode(), *first_blocks.get(name, (0, 0, 0)),
                                     ws.data_ptr() if name in zero else None,
                                     ws.numel() * ws.element_size())
        try:
            return entry(*args)
        finally:
            self._lib.emu_clear_windows()

    def backward_plan(self, T, d_in, d_out, r, N, g, routed) -> tuple[int, int, int, int]:
        """(column splits of the dy kernel, token splits of dB, of dA/dW, workspace floats) at
        ``num_sms`` (``backward_plan`` in mtlora.h); the workspace is 0 unless a launch
        splits."""
        shape = (ctypes.c_int64 * 6)(T, d_in, d_out, r, N, g)
        out = (ctypes.c_int64 * 4)()
        self._lib.emu_backward_plan(shape, int(routed), self.num_sms, out)
        return out[0], out[1], out[2], out[3]

    @contextlib.contextmanager
    def _device(self):
        """The emulated device for a call of bindings.cpp: ``num_sms`` SMs, clusters up to
        ``max_cluster``, and torch's empty tensors filled with NaN."""
        if self.max_cluster not in (1, 8):
            raise ValueError(f"bindings.cpp knows max_cluster 8 (sm_90) or 1 (its switch "
                             f"MTLORA_CUDA_CLUSTERS=0), got {self.max_cluster}")
        self._lib.emu_set_multiprocessor_count(int(self.num_sms))
        env = os.environ.pop("MTLORA_CUDA_CLUSTERS", None)
        if self.max_cluster == 1:
            os.environ["MTLORA_CUDA_CLUSTERS"] = "0"
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        try:
            yield
        finally:
            torch.utils.deterministic.fill_uninitialized_memory = fill
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
            os.environ.pop("MTLORA_CUDA_CLUSTERS", None)
            if env is not None:
                os.environ["MTLORA_CUDA_CLUSTERS"] = env

    def forward(self, x, A, B, route_weight, logits, residual, groups, scaling, dropout_p, seed):
        with self._device():
            return self._module.forward(x, A, B, route_weight, logits, residual, groups, scaling,
                                        dropout_p, seed)

    def backward(self, dy, x, A, B, route_weight, h, pi, dpi, groups, scaling, dropout_p, seed):
        with self._device():
            return self._module.backward(dy, x, A, B, route_weight, h, pi, dpi, groups, scaling,
                                         dropout_p, seed)

    def launch_forward(self, x, A, B, route_weight, logits, residual, groups, scaling, dropout_p,
                       seed):
        """``forward`` without bindings.cpp: mix.cpp's launch sequence on buffers allocated
        here (NaN until written), within the current :meth:`windows`."""
        for name, t in (("x", x), ("lora_A", A), ("lora_B", B), ("route_weight", route_weight),
                        ("residual", residual)):
            assert t is None or (t.device.type == "cpu" and t.is_contiguous()), name
        T, _ = x.shape
        N, d_out, r = B.shape
        if logits is not None:
            logits = logits.float().contiguous()
        y = _poisoned(T, d_out, dtype=x.dtype)
        h = _poisoned(T, r, dtype=torch.float32)
        pi = _poisoned(T, groups, N, dtype=torch.float32)
        shape = self._shape(x, A, B, groups)
        ws = _poisoned(self.forward_plan(*shape, router=route_weight is not None)[0],
                       dtype=torch.float32)
        err = ctypes.create_string_buffer(256)
        rc = self._run(
            ws, self._lib.emu_mix_forward, _DTYPES[x.dtype], _ptr(x), _ptr(A), _ptr(B),
            _ptr(route_weight), _ptr(logits), _ptr(residual), _ptr(y), _ptr(h), _ptr(pi),
            _ptr(ws), shape, float(scaling), float(dropout_p), int(seed) & (2**64 - 1),
            int(self.num_sms), int(self.max_cluster), err, len(err))
        self._check(rc, err)
        return y, h, pi

    def launch_backward(self, dy, x, A, B, route_weight, h, pi, dpi, groups, scaling, dropout_p,
                        seed):
        """``backward`` without bindings.cpp, as ``launch_forward``."""
        T, d_in = x.shape
        N, d_out, r = B.shape
        routed = route_weight is not None
        dx = _poisoned(T, d_in, dtype=x.dtype)
        dA = _poisoned(*A.shape, dtype=x.dtype)
        dB = _poisoned(*B.shape, dtype=x.dtype)
        dW = (_poisoned(*route_weight.shape, dtype=x.dtype) if routed
              else torch.empty(0, dtype=x.dtype))
        dz = _poisoned(T, groups * N, dtype=torch.float32)
        dh_ws = _poisoned(T, r, dtype=torch.float32)
        dpi_ws = _poisoned(T, groups, N, dtype=torch.float32)
        ws = _poisoned(self.backward_plan(T, d_in, d_out, r, N, groups, routed)[3],
                       dtype=torch.float32)
        dy = dy.contiguous()
        err = ctypes.create_string_buffer(256)
        rc = self._run(
            ws, self._lib.emu_mix_backward, _DTYPES[x.dtype], _ptr(dy), _ptr(x), _ptr(A),
            _ptr(B), _ptr(route_weight), _ptr(h), _ptr(pi), _ptr(dpi), _ptr(dx), _ptr(dA),
            _ptr(dB), _ptr(dW) if routed else None, _ptr(dz), _ptr(dh_ws), _ptr(dpi_ws), _ptr(ws),
            self._shape(x, A, B, groups), float(scaling), float(dropout_p),
            int(seed) & (2**64 - 1), int(self.num_sms), err, len(err))
        self._check(rc, err)
        return dx, dA, dB, dW, dz

    def dropout_keep_mask(self, seed, T, d_in, dropout_p, device):
        """The mask as the device kernel draws it (the emulated dropout_keep_mask_kernel)."""
        keep = torch.zeros(T, d_in, dtype=torch.bool)
        if T * d_in:
            err = ctypes.create_string_buffer(256)
            self._check(self._lib.emu_dropout_keep_mask(
                _ptr(keep), int(T), int(d_in), float(dropout_p), int(seed) & (2**64 - 1), err,
                len(err)), err)
        return keep.to(device)


@functools.cache
def load() -> Emulated:
    """The emulated extension (the module variant named by ``$CUDA_EMU_VARIANT``, default
    "lib"), built on first use."""
    variant = os.environ.get(VARIANT_ENV, "lib")
    if variant not in ("lib", "lib-asan"):
        raise ValueError(f"{VARIANT_ENV} must be lib or lib-asan, got {variant!r}")
    if variant == "lib-asan" and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError("the lib-asan module needs libasan in LD_PRELOAD (see "
                           "test_bindings_allocations_under_address_sanitizer)")
    path = build(variant)
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Emulated(module, ctypes.CDLL(str(path)))  # the same library: dlopen'ed once


def install(monkeypatch) -> Emulated:
    """Put the emulated extension behind the ``cuda`` backend for CPU tensors, for one test
    (``monkeypatch`` is pytest's fixture; everything is restored after the test)."""
    from mtlora_kernels import backends

    emu = load()
    available = backends.available

    def emulated_available(name, device=None):
        if name == "cuda":
            return True, ""
        return available(name, device)

    monkeypatch.setattr(backends, "_cuda_extension", lambda: (emu, ""))
    monkeypatch.setattr(backends, "available", emulated_available)
    return emu
