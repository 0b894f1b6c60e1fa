"""Build kernels/ for the host with g++ and run it: the math header's functions over arrays,
and every CUDA kernel instantiation through the CPU emulator in cuda_emulator.h.

`EmulatorRuntime` plugs into gpuloss._cuda_backend in place of CuPy, so the backend's own
launch code runs the real kernels on NumPy arrays."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from gpuloss import _cuda_backend

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
}
GL_EXPORT_MATH(float, f32)
GL_EXPORT_MATH(double, f64)
extern "C" void gl_half_to_float_n(const unsigned short* h, long long n, float* out) {
    for (long long i = 0; i < n; ++i) out[i] = gl_half_to_float(h[i]);
}
extern "C" void gl_float_to_half_n(const float* f, long long n, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = gl_float_to_half(f[i]);
}
"""


def emulator_source() -> str:
    parts = ['#include "cuda_emulator.h"', _cuda_backend.kernel_source(), MATH_WRAPPERS]
    for i, name in enumerate(_cuda_backend.all_kernel_names()):
        parts.append(
            f'extern "C" int gl_emu_k{i}(unsigned g, unsigned t, void** a) '
            f"{{ return gl_emu_launch(&{name}, g, t, a); }}"
        )
    return "\n".join(parts) + "\n"


def build(folder: Path) -> ctypes.CDLL:
    """Compile the emulator library once per source text (cached under `folder`)."""
    source = emulator_source()
    emulator = (HERE / "cuda_emulator.h").read_text()
    digest = hashlib.sha256((source + emulator).encode()).hexdigest()[:16]
    lib_path = folder / f"gpuloss_host_{digest}.so"
    if not lib_path.exists():
        cxx = os.environ.get("CXX") or shutil.which("g++")
        if cxx is None:
            msg = "g++ is needed to compile kernels/ for the host tests"
            raise RuntimeError(msg)
        src = folder / f"gpuloss_host_{digest}.cpp"
        src.write_text(source)
        cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-fast-math",
               "-ffp-contract=off", "-Wall", "-Wno-unused-function", f"-I{HERE}", str(src),
               "-o", str(lib_path) + ".tmp"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"g++ failed:\n{done.stderr[-5000:]}")
        os.replace(str(lib_path) + ".tmp", lib_path)
    return ctypes.CDLL(str(lib_path))


_CTYPE = {
    np.dtype(np.int64): ctypes.c_longlong,
    np.dtype(np.int32): ctypes.c_int,
    np.dtype(np.float64): ctypes.c_double,
    np.dtype(np.uint64): ctypes.c_uint64,
}


class EmulatorRuntime:
    """Runs _cuda_backend on the CPU: NumPy arrays as device arrays, kernels from g++."""

    xp = np

    def __init__(self, lib: ctypes.CDLL, grid_cap: int = 3):
        self.lib = lib
        self.cap = grid_cap
        self.index = {n: i for i, n in enumerate(_cuda_backend.all_kernel_names())}
        self.launches: list[str] = []

    def device(self, x):
        return contextlib.nullcontext()

    def grid_cap(self, x) -> int:
        return self.cap

    def to_host(self, x):
        return np.asarray(x)

    def kernel(self, name: str, x):
        fn = getattr(self.lib, f"gl_emu_k{self.index[name]}")
        fn.restype = ctypes.c_int

        def launch(grid, block, args):
            self.launches.append(name)
            holders = []
            for a in args:
                if isinstance(a, np.ndarray):
                    if not (a.flags.c_contiguous or a.ndim == 0):
                        msg = f"kernel argument must be contiguous, got strides {a.strides}"
                        raise ValueError(msg)
                    holders.append(ctypes.c_void_p(a.ctypes.data))
                else:
                    a = np.asarray(a)
                    holders.append(_CTYPE[a.dtype](a.item()))
            argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
            fault = fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), argv)
            if fault:
                msg = f"{name}: the emulator saw an operation a GPU leaves undefined"
                raise RuntimeError(msg)

        return launch
