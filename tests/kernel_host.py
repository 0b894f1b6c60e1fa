"""Build kernels/ for the host with g++ and run it: the math header's functions over arrays,
and every CUDA kernel instantiation through the CPU emulator in cuda_emulator.h.

`EmulatorRuntime` plugs into gpuloss.backends.cuda in place of CuPy, so the backend's own
launch code runs the real kernels on NumPy arrays. `emulated_compute` is the one stable entry
point for checking a change to the CUDA path without a GPU:

    from kernel_host import emulated_compute
    value, grad = emulated_compute("bce", "value_and_grad", p, y, sample_weight=w)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

import gpuloss
from gpuloss.backends import cuda as _cuda_backend

HERE = Path(__file__).resolve().parent

# math functions exported for direct tests: name, C++ call on element i, arguments after n
MATH_WRAPPERS = """
#define GL_EXPORT_MATH(T, S)                                                                  \\
extern "C" void gl_mse_##S(const T* p, const T* y, long long n, T* l, T* g) {                \\
    for (long long i = 0; i < n; ++i) l[i] = gl_mse(p[i], y[i], &g[i]);                      \\
}                                                                                             \\
extern "C" void gl_bce_##S(const T* p, const T* y, long long n, T lo, T hi, T* l, T* g) {    \\
    for (long long i = 0; i < n; ++i) l[i] = gl_bce(p[i], y[i], lo, hi, &g[i]);              \\
}                                                                                             \\
extern "C" void gl_bce_logits_##S(const T* z, const T* y, const T* c, long long n, T* l,     \\
                                  T* g) {                                                     \\
    for (long long i = 0; i < n; ++i) l[i] = gl_bce_logits(z[i], y[i], c[i], &g[i]);         \\
}                                                                                             \\
extern "C" void gl_smooth_binary_##S(const T* y, long long n, T s, T* out) {                 \\
    for (long long i = 0; i < n; ++i) out[i] = gl_smooth_binary(y[i], s);                     \\
}                                                                                             \\
extern "C" void gl_lse_rows_##S(const T* z, long long rows, long long k, long long split,    \\
                                T* out) {                                                     \\
    for (long long r = 0; r < rows; ++r) {                                                    \\
        GlLse<T> a = gl_lse_empty<T>(), b = gl_lse_empty<T>();                                \\
        for (long long j = 0; j < k; ++j)                                                     \\
            if (j < split) a = gl_lse_push(a, z[r * k + j]); else b = gl_lse_push(b, z[r * k + j]); \\
        GlLse<T> ab = gl_lse_merge(a, b);                                                     \\
        out[r] = ab.m + gl_lse_log_sum(ab);                                                   \\
    }                                                                                         \\
}                                                                                             \\
extern "C" void gl_xent_##S(const T* z, const T* c, long long n, T m, T rest, T c_sum,      \\
                            T* l, T* g) {                                                     \\
    for (long long i = 0; i < n; ++i) {                                                       \\
        l[i] = gl_xent_term(z[i], m, gl_log1p(rest), c[i]);                                   \\
        g[i] = gl_xent_grad(z[i], m, rest, c_sum, c[i]);                                      \\
    }                                                                                         \\
}                                                                                             \\
extern "C" void gl_label_coef_##S(const int* is_label, const T* cw, long long n, T cw_label, \\
                                  T s, T inv_k, T* out) {                                     \\
    for (long long i = 0; i < n; ++i)                                                         \\
        out[i] = gl_label_coef(is_label[i] != 0, cw_label, cw[i], s, inv_k);                 \\
}                                                                                             \\
extern "C" void gl_cce_term_##S(const T* p, const T* c, long long n, T lo, T hi, T* l, T* g) \\
{                                                                                             \\
    for (long long i = 0; i < n; ++i) l[i] = gl_cce_term(p[i], c[i], lo, hi, &g[i]);         \\
}                                                                                             \\
extern "C" void gl_outside_unit_##S(const T* x, long long n, int* out) {                     \\
    for (long long i = 0; i < n; ++i) out[i] = gl_outside_unit(x[i]);                         \\
}                                                                                             \\
extern "C" void gl_bad_weight_##S(const T* x, long long n, int* out) {                       \\
    for (long long i = 0; i < n; ++i) out[i] = gl_bad_weight(x[i]);                           \\
}
GL_EXPORT_MATH(float, f32)
GL_EXPORT_MATH(double, f64)
// a * b + c as the build compiles it: one rounding when contracted into an FMA, two otherwise
extern "C" float gl_emu_fma_probe(float a, float b, float c) { return a * b + c; }
extern "C" void gl_half_to_float_n(const unsigned short* h, long long n, float* out) {
    for (long long i = 0; i < n; ++i) out[i] = gl_half_to_float(h[i]);
}
extern "C" void gl_float_to_half_n(const float* f, long long n, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = gl_float_to_half(f[i]);
}
extern "C" void gl_bf16_to_float_n(const unsigned short* b, long long n, float* out) {
    for (long long i = 0; i < n; ++i) out[i] = gl_bf16_to_float(b[i]);
}
extern "C" void gl_float_to_bf16_n(const float* f, long long n, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = gl_float_to_bf16(f[i]);
}
"""


MODES = ("device", "ieee")
# device: the rules CuPy compiles with (-ftz=true for float arithmetic, FMA contraction on);
# ieee: strict IEEE arithmetic (no flushing, no contraction), to tell the two apart
_CONTRACT = {"device": ["-ffp-contract=fast"], "ieee": ["-ffp-contract=off"]}
FLT_TINY = float(np.finfo(np.float32).tiny)


def launch_bounds(source: str | None = None) -> dict[str, int]:
    """Each __global__ template's __launch_bounds__, read from the kernel source (the macros
    it names resolved), so that the emulator refuses a launch the device would refuse."""
    source = source or _cuda_backend.kernel_source()
    macros = dict(re.findall(r"^#define\s+(\w+)\s+(\d+)", source, flags=re.MULTILINE))
    # (the first value is the block size; the second, the blocks per SM, is ptxas's business)
    kernels = re.findall(
        r"__global__\s+void\s+(?:__launch_bounds__\((\w+)[^)]*\)\s+)?(\w+)\s*\(", source)
    bounds = {}
    for bound, name in kernels:
        if not bound:
            raise RuntimeError(f"kernel {name} declares no __launch_bounds__")
        bounds[name] = int(macros.get(bound, bound))
    return bounds


def kernel_parameters(source: str | None = None) -> dict[str, list[str]]:
    """Each __global__ template's parameter names, in order, read from the kernel source: the
    names under which `EmulatorRuntime.traffic` reports the arrays a launch accessed."""
    source = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source or _cuda_backend.kernel_source(),
                    flags=re.DOTALL)
    found = re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*"
                       r"\(([^)]*)\)", source)
    return {name: [re.findall(r"\w+", p)[-1] for p in params.split(",")]
            for name, params in found}


# the memory-traffic counts of the last launch (cuda_emulator.h), one row per array and
# direction: base pointer, write flag, then TRACE_FIELDS
TRACE_FIELDS = ("accesses", "bytes", "groups", "sectors", "group_bytes", "distinct")
TRACE_EXPORTS = """
extern "C" void gl_emu_set_tracing(int on) { gl_emu_tracing = on != 0; }
extern "C" int gl_emu_trace_count() { return (int)gl_emu_trace_rows.size(); }
extern "C" void gl_emu_trace_row(int i, unsigned long long* out) {
    const GlEmuTraceRow& r = gl_emu_trace_rows.at(i);
    const GlEmuFlow& f = r.flow;
    unsigned long long v[8] = {(unsigned long long)(uintptr_t)r.base, (unsigned long long)r.write,
                               f.accesses, f.bytes, f.groups, f.sectors, f.group_bytes,
                               f.distinct};
    for (int j = 0; j < 8; ++j) out[j] = v[j];
}
"""


def _fma_flags() -> list[str]:
    # x86-64's baseline has no FMA instruction: without -mfma nothing would be contracted
    return ["-mfma"] if platform.machine() in ("x86_64", "AMD64") else []


def _ieee_kernels(names: list[str]) -> list[str]:
    """The IEEE build holds what runs in strict IEEE mode (mse's kernels and the checks: it
    tells flushing and contraction apart), not every instantiation: a minute of g++ less."""
    return [n for n in names if "<GlMse," in n or n.startswith("gpuloss_check")]


def emulator_sources(mode: str = "device", names=None, source: str | None = None,
                     parts: int = 1) -> list[str]:
    """The emulator library's translation units: the kernels, the math wrappers, and per kernel
    a launcher (gl_emu_k<i>, i its place in all_kernel_names) and its signature (gl_emu_sig<i>),
    the launchers dealt over `parts` units that compile at once; the first also holds the
    library's own exports."""
    source = source or _cuda_backend.kernel_source()
    bounds = launch_bounds(source)
    full = _cuda_backend.all_kernel_names()
    index = {n: i for i, n in enumerate(full)}
    if names is None:
        names = full if mode == "device" else _ieee_kernels(full)
    launchers = []
    for name in names:
        i = index[name]
        ftz = int(mode == "device" and _cuda_backend.compute_is_float32(name))
        bound = bounds[name.split("<", 1)[0]]
        launchers.append(
            f'extern "C" int gl_emu_k{i}(unsigned g, unsigned t, void** a) '
            f"{{ return gl_emu_launch(&{name}, g, t, a, {ftz}, {bound}u); }}\n"
            f'extern "C" int gl_emu_sig{i}(int* sizes, char* kinds) '
            f"{{ return gl_emu_signature(&{name}, sizes, kinds); }}"
        )
    units = []
    for k in range(parts):
        head = ['#include "cuda_emulator.h"', source]
        if k == 0:
            reverse = 'extern "C" void gl_emu_set_reverse_blocks(int r) { gl_emu_reverse_blocks = r; }'
            head += [MATH_WRAPPERS, reverse, TRACE_EXPORTS]
        else:
            head.insert(0, "#define GL_EMU_SECONDARY_TU")
        units.append("\n".join(head + launchers[k::parts]) + "\n")
    return units


def emulator_source(mode: str = "device", names=None, source: str | None = None) -> str:
    """The emulator library as one translation unit (see `emulator_sources`)."""
    return emulator_sources(mode, names, source)[0]


def _cxx() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        msg = "g++ is needed to compile kernels/ for the host tests"
        raise RuntimeError(msg)
    return cxx


_CXX_FLAGS = ["-std=c++20", "-pthread", "-fno-fast-math", "-Wall", "-Wno-unused-function",
              f"-I{HERE}"]


def _compile(cxx_args: list[str], source: str, out: Path, shared: bool) -> None:
    _compile_units(cxx_args, [source], out, shared)


def _compile_units(cxx_args: list[str], sources: list[str], out: Path, shared: bool) -> None:
    """Compile the translation units at once (one g++ each: the cores a build finds idle),
    then link them into `out`."""
    cxx = _cxx()
    # per-process names, then an atomic rename: processes building at once do not collide
    tag = f"{os.getpid()}"
    srcs = [out.with_name(f"{out.name}.{tag}.{k}.cpp") for k in range(len(sources))]
    objs = [out.with_name(f"{out.name}.{tag}.{k}.o") for k in range(len(sources))]
    tmp = f"{out}.{tag}.tmp"
    pic = ["-fPIC"] if shared else []
    try:
        for src, text in zip(srcs, sources):
            src.write_text(text)
        if len(sources) == 1:
            jobs = [[cxx, *_CXX_FLAGS, *(["-shared"] if shared else []), *pic, *cxx_args,
                     str(srcs[0]), "-o", tmp]]
        else:
            jobs = [[cxx, *_CXX_FLAGS, *pic, *cxx_args, "-c", str(src), "-o", str(obj)]
                    for src, obj in zip(srcs, objs)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for cmd in jobs]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"g++ failed:\n{err[-5000:]}")
        if len(sources) > 1:
            link = [cxx, "-pthread", *(["-shared"] if shared else []), *pic,
                    *map(str, objs), "-o", tmp]
            done = subprocess.run(link, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"linking failed:\n{done.stderr[-5000:]}")
    finally:
        for f in (*srcs, *objs):
            f.unlink(missing_ok=True)
    os.replace(tmp, out)


BUILD_UNITS = 2  # translation units per library: g++ on both cores of a 2-core machine


def build(folder: Path, mode: str = "device") -> ctypes.CDLL:
    """Compile the emulator library once per source text and mode (cached under `folder`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    sources = emulator_sources(mode, parts=BUILD_UNITS if mode == "device" else 1)
    emulator = (HERE / "cuda_emulator.h").read_text()
    # -O2: GCC contracts a * b + c into an FMA only from -O2 on
    flags = ["-O2", *_CONTRACT[mode], *(_fma_flags() if mode == "device" else [])]
    digest = hashlib.sha256(("".join(sources) + emulator + " ".join(flags)).encode()
                            ).hexdigest()[:16]
    lib_path = Path(folder) / f"gpuloss_host_{mode}_{digest}.so"
    with build_lock(lib_path):  # test workers (pytest -n) wait for one build, not race it
        if not lib_path.exists():
            _compile_units(flags, sources, lib_path, shared=True)
    return ctypes.CDLL(str(lib_path))


# One launch at a time in a process: the emulator's launch state (the block, the fibers, the
# grid) is global to the library. Processes (pytest -n workers) launch at once: each launch runs
# on its caller's thread alone, as fibers (tests/cuda_emulator.h), so two need no more cores.
_LAUNCH_LOCK = threading.Lock()


@contextlib.contextmanager
def build_lock(path: Path):
    """An exclusive lock on `path`.lock across processes (POSIX), so that one process builds
    what the others then load."""
    import fcntl

    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CTYPE = {
    np.dtype(np.int64): ctypes.c_longlong,
    np.dtype(np.int32): ctypes.c_int,
    np.dtype(np.float64): ctypes.c_double,
    np.dtype(np.float32): ctypes.c_float,
    np.dtype(np.uint64): ctypes.c_uint64,
}


def flush_float32(x: np.ndarray) -> np.ndarray:
    """float32 subnormals replaced by zeros of the same sign, as -ftz=true computes."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        return x
    with np.errstate(invalid="ignore"):
        tiny = np.abs(x) < FLT_TINY
    return np.where(tiny, np.copysign(np.float32(0), x), x)


class ArgumentMismatch(RuntimeError):
    """A kernel argument whose width or kind differs from the kernel's C parameter."""


# CuPy functions that make no kernel launch: allocations, memsets (cupy.zeros) and views;
# ascontiguousarray and asarray only when they neither copy nor convert
_NO_KERNEL = frozenset({"empty", "empty_like", "zeros", "zeros_like", "moveaxis", "reshape",
                        "broadcast_to", "expand_dims", "squeeze", "swapaxes", "transpose",
                        "ascontiguousarray", "asarray"})


# cudaMalloc aligns to 256 bytes (CuPy's pool hands out 512-byte multiples of it); NumPy
# to 16. The emulator's arrays are aligned as a device's, so that the sectors a warp touches
# (EmulatorRuntime.traffic) are the device's.
DEVICE_ALIGNMENT = 256


def device_array(x) -> np.ndarray:
    """A copy of `x` at an address aligned as a device allocation is (DEVICE_ALIGNMENT)."""
    x = np.asarray(x)
    raw = np.empty(x.nbytes + DEVICE_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % DEVICE_ALIGNMENT
    out = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def _device_aligned(out, args):
    """A fresh array (one the call allocated, not a view) moved to an aligned address."""
    if (isinstance(out, np.ndarray) and out.flags.owndata and out.ctypes.data % DEVICE_ALIGNMENT
            and not any(out is a for a in args)):
        return device_array(out)
    return out


class CountingNumpy:
    """NumPy as the emulator's array module, noting each function call that would launch a
    CuPy kernel on a device (reductions, fills, element-wise functions, copies) in `ops`.
    Arithmetic and methods on the arrays themselves (x * y, x.astype) are not seen here.
    Arrays the calls allocate are aligned as a device's (DEVICE_ALIGNMENT)."""

    def __init__(self, ops: list[str]):
        self._ops = ops

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, ndarray (isinstance checks), constants

        def call(*args, **kwargs):
            if _launches_kernel(name, args, kwargs):
                self._ops.append(name)
            return _device_aligned(attr(*args, **kwargs), args)

        return call


def _launches_kernel(name, args, kwargs) -> bool:
    if name not in _NO_KERNEL:
        return True
    if name in ("ascontiguousarray", "asarray") and args:
        x, dtype = args[0], kwargs.get("dtype", args[1] if len(args) > 1 else None)
        if not isinstance(x, np.ndarray):
            return False  # a host value: a transfer, not a kernel
        converts = dtype is not None and np.dtype(dtype) != x.dtype
        return converts or (name == "ascontiguousarray" and not x.flags.c_contiguous)
    return False


@dataclasses.dataclass(frozen=True)
class Flow:
    """One array's reads, or its writes, in one launch (tests/cuda_emulator.h).

    A warp-wide access ("group") is the n-th access of each lane of a warp to the array; the
    device serves it in 32-byte sectors, and `sectors` counts the distinct ones of each group,
    summed over the groups. `efficiency` is the share of the sectors' bytes the lanes wanted:
    `group_bytes` (distinct bytes within each group, so that lanes reading one address, as a
    row's lanes read its label, count it once, as the device's broadcast delivers it) over
    32 * sectors. `bytes` counts every lane's access; `distinct` the bytes touched at all, so
    bytes == distinct means no byte was read (or written) twice."""

    accesses: int = 0
    bytes: int = 0
    groups: int = 0
    sectors: int = 0
    group_bytes: int = 0
    distinct: int = 0

    @property
    def efficiency(self) -> float:
        return self.group_bytes / (32 * self.sectors) if self.sectors else 1.0


@dataclasses.dataclass(frozen=True)
class ArrayTraffic:
    read: Flow
    written: Flow


@dataclasses.dataclass(frozen=True)
class LaunchTraffic:
    """What one launch moved, per array: `arrays` maps the kernel's parameter names (or, for
    an address that is no argument's start, its hex address) to their traffic; arrays the
    launch never touched are absent (indexing gives them as zeros). `scalars` holds the
    launch's other arguments by name (n, K, ...), to read the layout it ran with."""

    kernel: str
    grid: int
    block: int
    arrays: dict[str, ArrayTraffic]
    scalars: dict[str, int | float]

    def __getitem__(self, name: str) -> ArrayTraffic:
        return self.arrays.get(name, ArrayTraffic(Flow(), Flow()))


class EmulatorRuntime:
    """Runs _cuda_backend on the CPU: NumPy arrays as device arrays, kernels from g++.

    Each launch checks every argument against the kernel's C signature (count, kind, width)
    and its block size against the kernel's __launch_bounds__. In mode "device" float kernels
    flush subnormals (see cuda_emulator.h) and so do the runtime's own casts, as CuPy's.

    It counts what a call costs on a device: `launches` (our kernels, by name), `device_ops`
    (CuPy operations that would launch kernels of their own: casts, and calls through `xp`
    that CountingNumpy sees) and `host_reads` (what each device-to-host transfer returned);
    `reset_counts` clears them. Inside `with rt.traffic() as seen:` it also counts each
    launch's global-memory traffic (see `traffic`)."""

    def __init__(self, lib: ctypes.CDLL, grid_cap: int = 3, mode: str = "device"):
        self.lib = lib
        self.cap = grid_cap
        self.ftz = mode == "device"
        self.index = {n: i for i, n in enumerate(_cuda_backend.all_kernel_names())}
        self.launches: list[str] = []
        self.device_ops: list[str] = []
        self.host_reads: list[np.ndarray] = []
        self.xp = CountingNumpy(self.device_ops)
        self._traffic: list[LaunchTraffic] | None = None
        self._params: dict[str, list[str]] | None = None  # kernel_parameters(), when tracing

    @contextlib.contextmanager
    def traffic(self):
        """Count the global-memory traffic of each launch inside the block: yields a list that
        gets one LaunchTraffic per launch, in order. Off otherwise (the kernels' accesses then
        cost one relaxed atomic load each)."""
        if self._traffic is not None:
            raise RuntimeError("traffic() does not nest")
        self._traffic = seen = []
        self.lib.gl_emu_set_tracing(1)
        try:
            yield seen
        finally:
            self.lib.gl_emu_set_tracing(0)
            self._traffic = None

    def _read_traffic(self, name: str, grid: int, block: int, args, signature
                      ) -> LaunchTraffic:
        """The last launch's counts, each array named by its kernel parameter."""
        if self._params is None:
            self._params = kernel_parameters()
        params = self._params[name.split("<", 1)[0]]
        if len(params) != len(args):
            raise ArgumentMismatch(f"{name}: {len(args)} arguments, parameters {params}")
        names = {a.ctypes.data: params[j] for j, a in enumerate(args)
                 if isinstance(a, np.ndarray) and a.size}
        flows: dict[str, dict[int, Flow]] = {}
        row = (ctypes.c_ulonglong * (2 + len(TRACE_FIELDS)))()
        for i in range(self.lib.gl_emu_trace_count()):
            self.lib.gl_emu_trace_row(i, row)
            base, write, *counts = list(row)
            key = names.get(base, hex(base))
            flows.setdefault(key, {})[write] = Flow(*counts)
        arrays = {k: ArrayTraffic(v.get(0, Flow()), v.get(1, Flow())) for k, v in flows.items()}
        scalars = {params[j]: a.item() for j, (a, (kind, _)) in enumerate(zip(args, signature))
                   if kind != "p"}
        return LaunchTraffic(name, grid, block, arrays, scalars)

    @contextlib.contextmanager
    def blocks_reversed(self):
        """Run the blocks last to first (another block finishes the grid's sum)."""
        self.lib.gl_emu_set_reverse_blocks(1)
        try:
            yield
        finally:
            self.lib.gl_emu_set_reverse_blocks(0)

    def reset_counts(self):
        self.launches.clear()
        self.device_ops.clear()
        self.host_reads.clear()

    def device(self, x):
        return contextlib.nullcontext()

    def grid_cap(self, x) -> int:
        return self.cap

    def to_host(self, x):
        out = np.array(x)  # a copy, as a transfer gives
        self.host_reads.append(out)
        return out

    def astype(self, x, dtype):
        self.device_ops.append("astype")
        if self.ftz:  # a float32 operand or result of a device cast is flushed
            out = flush_float32(flush_float32(x).astype(dtype))
        else:
            out = np.asarray(x).astype(dtype)
        return device_array(out)

    def _symbol(self, prefix: str, name: str):
        try:
            return getattr(self.lib, f"{prefix}{self.index[name]}")
        except AttributeError:  # the IEEE build holds a few kernels (see _ieee_kernels)
            msg = f"{name} is not in this emulator build (its mode's kernels: build())"
            raise RuntimeError(msg) from None

    def signature(self, name: str) -> list[tuple[str, int]]:
        sizes, kinds = (ctypes.c_int * 64)(), ctypes.create_string_buffer(64)
        count = self._symbol("gl_emu_sig", name)(sizes, kinds)
        return [(kinds.raw[j : j + 1].decode(), sizes[j]) for j in range(count)]

    def kernel(self, name: str, x):
        fn = self._symbol("gl_emu_k", name)
        fn.restype = ctypes.c_int
        signature = self.signature(name)

        def launch(grid, block, args):
            self.launches.append(name)
            if len(args) != len(signature):
                raise ArgumentMismatch(
                    f"{name}: {len(args)} arguments for {len(signature)} parameters")
            holders = []
            for j, (a, (kind, size)) in enumerate(zip(args, signature)):
                if isinstance(a, np.ndarray):
                    if kind != "p":
                        raise ArgumentMismatch(f"{name}: argument {j} is an array, parameter "
                                               f"{j} a {size}-byte {kind!r} value")
                    if not (a.flags.c_contiguous or a.ndim == 0):
                        msg = f"kernel argument must be contiguous, got strides {a.strides}"
                        raise ValueError(msg)
                    holders.append(ctypes.c_void_p(a.ctypes.data))
                    continue
                if not isinstance(a, np.generic):
                    raise ArgumentMismatch(f"{name}: argument {j} is a Python "
                                           f"{type(a).__name__}; pass a NumPy scalar of the C "
                                           f"parameter's width ({size} bytes)")
                got = "p" if a.dtype == np.uint64 and kind == "p" else a.dtype.kind
                got = {"u": "i", "b": "i"}.get(got, got)
                if got != kind or a.dtype.itemsize != size:
                    what = {"p": "pointer", "f": "float", "i": "integer"}[kind]
                    raise ArgumentMismatch(
                        f"{name}: argument {j} is {a.dtype} ({a.dtype.itemsize} bytes), the "
                        f"C parameter is a {size}-byte {what}")
                holders.append(_CTYPE[a.dtype](a.item()))
            argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
            with _LAUNCH_LOCK:
                fault = fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), argv)
            if self._traffic is not None and not fault:
                self._traffic.append(self._read_traffic(name, grid[0], block[0], args,
                                                         signature))
            if fault == 2:
                msg = f"{name}: block of {block[0]} threads exceeds its __launch_bounds__"
                raise RuntimeError(msg)
            if fault:
                msg = f"{name}: the emulator saw an operation a GPU leaves undefined"
                raise RuntimeError(msg)

        return launch


# ---------------------------------------------------------------------------------------------
# one stable entry point: the CUDA launch code on the emulated device, NumPy in, NumPy out


def cache_dir() -> Path:
    folder = os.environ.get("GPULOSS_EMULATOR_CACHE")
    path = Path(folder) if folder else Path(tempfile.gettempdir()) / f"gpuloss-emu-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def _runtime(mode: str) -> EmulatorRuntime:
    return EmulatorRuntime(build(cache_dir(), mode), mode=mode)


def emulated_compute(loss, entry, pred, target, *, mode="device", **options):
    """Run gpuloss.<loss> through the CUDA backend's own launch code on the emulated device.

    `entry` is "call", "grad" or "value_and_grad"; options are the loss's keyword options.
    Returns what that entry point returns, as NumPy arrays; errors are the ones the CUDA
    backend raises. The first call compiles the emulator (about 10 s, then cached)."""
    if entry not in ("call", "grad", "value_and_grad"):
        raise ValueError(f"entry must be 'call', 'grad' or 'value_and_grad', got {entry!r}")
    call = gpuloss.LOSSES[loss].prepare(pred, target, options, want_value=entry != "grad",
                                        want_grad=entry != "call")
    value, grad = _cuda_backend.compute(call, _runtime(mode))
    if entry == "call":
        return value
    if entry == "grad":
        return grad
    return value, grad


# ---------------------------------------------------------------------------------------------
# sanitizer builds: a standalone program (sanitizers need their runtime from the start) that
# launches one kernel of each family on the emulator and checks the sums

SANITIZE = {  # with the emulated threads as OS threads: the sanitizers must see them
    "thread": ["-fsanitize=thread", "-DGL_EMU_OS_THREADS"],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                "-DGL_EMU_OS_THREADS"],
}

SANITIZER_MAIN = r"""
#include <cstdio>
#include <cmath>
#include <cstring>
#include <vector>
template <typename... A>
static int run(void (*k)(A...), unsigned g, unsigned t, A... a) {
    void* args[] = {(void*)&a...};
    return gl_emu_launch(k, g, t, args, 1, GL_BLOCK_THREADS);
}
static int close_to(double got, double want, const char* what) {
    if (std::fabs(got - want) <= 1e-4 * std::fabs(want) + 1e-6) return 0;
    std::printf("%s: got %.9g, want %.9g\n", what, got, want);
    return 1;
}
int main() {
    int bad = 0;
    const long long n = 1500;  // 3 blocks of 256 threads, several grid-stride steps
    std::vector<float> p(n), y(n), g(n);
    std::vector<double> parts(3);
    int state[6] __attribute__((aligned(16))) = {0, 0, 0, 0, 0, 0};  // value, flags, blocks done
    double want = 0;
    for (long long i = 0; i < n; ++i) {
        p[i] = 0.001f * (float)(i % 97);
        y[i] = 0.002f * (float)(i % 13);
        want += ((double)p[i] - y[i]) * ((double)p[i] - y[i]);
    }
    bad |= run(&gpuloss_elementwise<GlMse, float, float>, 3, 256, (const float*)p.data(),
               (const float*)y.data(), (const double*)nullptr, 1ll, 1ll, (const double*)nullptr,
               1ll, 1ll, n, 0, 1.0, (const double*)nullptr, 0.0, 0.0, 0.0, 0.0, 0, 0, g.data(),
               (float*)nullptr, parts.data(), state);
    float total;  // the last block's sum of the partials, at the start of state
    std::memcpy(&total, state, sizeof total);
    bad |= close_to(total, want, "mse sum");
    bad |= close_to(state[5], 3, "blocks done");
    // rows: a whole block per row (barriers between warps), and 4 lanes per row; then both
    // with softcap (GlCceLogits<4>: the cap's derivatives in shared memory) and the gradient
    // written over the logits (in place: a read of a value another thread has overwritten, or
    // a write beside its array, is a report)
    const long long Ks[2] = {300, 10};
    for (int v = 0; v < 4; ++v) {
        long long K = Ks[v % 2], rows = 24;
        double cap = v < 2 ? 0.0 : 0.5;
        std::vector<float> z(rows * K), gz(rows * K);
        std::vector<long long> t(rows);
        double want_rows = 0;
        for (long long r = 0; r < rows; ++r) {
            t[r] = (r * 7) % K;
            double m = -1e300, s = 0;
            for (long long k = 0; k < K; ++k)
                z[r * K + k] = 0.01f * (float)((r * 31 + k * 17) % 101);
            auto at = [&](long long k) {
                double x = z[r * K + k];
                return cap ? cap * std::tanh(x / cap) : x;
            };
            for (long long k = 0; k < K; ++k) m = std::fmax(m, at(k));
            for (long long k = 0; k < K; ++k) s += std::exp(at(k) - m);
            want_rows += m + std::log(s) - at(t[r]);
        }
        std::vector<double> rparts(3);
        int rstate[6] __attribute__((aligned(16))) = {0, 0, 0, 0, 0, 0};
        float* g = v < 2 ? gz.data() : z.data();
        auto kernel = v == 0 ? &gpuloss_rows<GlCceLogits<0>, 1, 256, 32, float, long long>
                    : v == 1 ? &gpuloss_rows<GlCceLogits<0>, 1, 0, 4, float, long long>
                    : v == 2 ? &gpuloss_rows<GlCceLogits<4>, 1, 256, 32, float, long long>
                             : &gpuloss_rows<GlCceLogits<4>, 1, 0, 4, float, long long>;
        bad |= run(kernel, 3, 256, (const float*)z.data(), (const long long*)t.data(), rows, K,
                   v % 2 ? 4 : 256, 0, (const double*)nullptr, 1ll, 1ll,
                   (const double*)nullptr, (const double*)nullptr, (const double*)nullptr, 0ll,
                   0, 0.0, 0, 1.0, (const double*)nullptr, 0.0, 0.0, cap, 0, g,
                   (float*)nullptr, rparts.data(), rstate);
        float rtotal;
        std::memcpy(&rtotal, rstate, sizeof rtotal);
        bad |= close_to(rtotal, want_rows, "cce_with_logits sum");
    }
    std::printf(bad ? "FAILED\n" : "ok\n");
    return bad ? 3 : 0;
}
"""


def sanitizer_program(folder: Path, kind: str, source: str | None = None) -> Path:
    """Build the sanitizer check program (`kind` "thread" or "address"), cached by source."""
    text = '#include "cuda_emulator.h"\n' + (source or _cuda_backend.kernel_source()) + \
        SANITIZER_MAIN
    emulator = (HERE / "cuda_emulator.h").read_text()
    flags = ["-O1", "-g", *SANITIZE[kind]]
    digest = hashlib.sha256((text + emulator + " ".join(flags)).encode()).hexdigest()[:16]
    exe = Path(folder) / f"gpuloss_{kind}san_{digest}"
    if not exe.exists():
        _compile(flags, text, exe, shared=False)
    return exe


def run_sanitized(exe: Path, kind: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["TSAN_OPTIONS" if kind == "thread" else "ASAN_OPTIONS"] = "halt_on_error=1:exitcode=66"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    return subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
