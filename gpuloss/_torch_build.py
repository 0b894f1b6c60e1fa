"""Build and load gpuloss's PyTorch operator (kernels/gpuloss_torch.cpp): cross-entropy with
class indices on torch CPU tensors whose autograd node is C++, without the Python of a
torch.autograd.Function (about 30 µs a call, forward and backward).

It is compiled against the installed torch with the C++ compiler of the compiled CPU kernels
(gpuloss._host_build: same flags, same cache folder; the file's name carries a digest of the
sources, the flags, the compiler, torch's version and ABI, Python's and the CPU). Including
torch's headers, a build takes 15-25 s: it runs in a background thread, started by the first
call that could use the operator, and calls take gpuloss's Python autograd node until it is
loaded (within the same process). `wait()` waits for it (benchmarks, tests).
`GPULOSS_TORCH_KERNELS=0` (or `GPULOSS_HOST_KERNELS=0`) turns it off; `gpuloss info` says
whether it is in use and why not.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import signal
import sys
import sysconfig
import threading
from pathlib import Path

from . import _host_build

SOURCES = ("gpuloss_torch.cpp", "gpuloss_host.cpp", "gpuloss_math.cuh")

_lock = threading.Lock()
_operator = None  # torch.ops.gpuloss_host.cce_labels, once loaded
_path = None  # its file
_builder = None  # the thread that builds and loads it
_reason = "not built yet"
_compiling = []  # the compiler's process while one runs (stopped at exit)


def operator():
    """The loaded operator; None while it is being built (the first call starts the build)
    or where it cannot be (`status()` says why)."""
    if _operator is None and _builder is None:
        _start()
    return _operator


def wait(timeout: float | None = None):
    """The operator, once its build has ended (None where it failed or is turned off)."""
    operator()
    builder = _builder
    if builder is not None:
        builder.join(timeout)
    return _operator


def status() -> str:
    """One line for `gpuloss info`."""
    if _operator is not None:
        return f"compiled ({_path})"
    return f"not in use: {_reason}; torch CPU tensors take gpuloss's Python autograd node"


def _start():
    global _builder
    with _lock:
        if _builder is None:
            _builder = threading.Thread(target=_build_and_load, name="gpuloss-torch-build",
                                        daemon=True)
            _builder.start()


def _build_and_load():
    global _operator, _reason, _path
    try:
        _operator, _path = _load()
    except Exception as exc:  # noqa: BLE001 - whatever goes wrong, the Python node computes
        text = str(exc).strip()
        _reason = text.splitlines()[-1] if text else repr(exc)


def _load():
    for switch in ("GPULOSS_TORCH_KERNELS", "GPULOSS_HOST_KERNELS"):
        if os.environ.get(switch, "1") == "0":
            raise RuntimeError(f"{switch}=0")
    if _host_build.module() is None:  # (its compiler and checks; the row pass is the same)
        raise RuntimeError(f"the compiled CPU kernels are {_host_build.status()}")
    import torch

    compiler = _host_build._compiler()
    from .backends.cuda import kernel_dir  # (no CuPy: only the sources' folder)

    folder = kernel_dir()
    root = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = [*_host_build.FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]
    libs = [f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", *_host_build.LIBS,
            f"-Wl,-rpath,{root / 'lib'}"]
    includes = [sysconfig.get_paths()["include"], str(folder), str(root / "include"),
                str(root / "include" / "torch" / "csrc" / "api" / "include")]
    digest = hashlib.sha256()
    for part in (*((folder / name).read_bytes() for name in SOURCES),
                 " ".join(flags + libs).encode(), compiler.encode(), torch.__version__.encode(),
                 str(sysconfig.get_config_var("SOABI")).encode(),
                 _host_build._cpu_id().encode()):
        digest.update(part)
        digest.update(b"\0")
    path = _host_build.cache_dir() / f"_gpuloss_torch-{digest.hexdigest()[:20]}.so"
    command = [compiler, *flags, *(f"-I{i}" for i in includes), str(folder / SOURCES[0]),
               *libs]
    if not path.exists():
        _host_build.build(command, path, started=_compiling.append)
        _compiling.clear()
    try:
        torch.ops.load_library(str(path))
    except OSError:  # a broken file in the cache (a build cut short): build it again
        path.unlink(missing_ok=True)
        _host_build.build(command, path, started=_compiling.append)
        _compiling.clear()
        torch.ops.load_library(str(path))
    return torch.ops.gpuloss_host.cce_labels, path


@atexit.register
def _stop_compiling():
    """A build still running at exit is stopped, with the compiler driver's children (its
    thread would not finish it)."""
    for process in _compiling.copy():
        try:
            os.killpg(process.pid, signal.SIGKILL)  # (its own session: _host_build.build)
        except (OSError, AttributeError):  # (gone already; no process groups here)
            process.kill()
