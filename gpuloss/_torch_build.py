"""Build and load gpuloss's PyTorch operator (kernels/gpuloss_torch.cpp): cross-entropy with
class indices on torch CPU tensors whose autograd node is C++, without the Python of a
torch.autograd.Function (about 30 µs a call, forward and backward).

It is compiled against the installed torch with the C++ compiler of the compiled CPU kernels
(gpuloss._host_build: same flags, same cache folder; the file's name carries a digest of the
sources, the flags, the compiler, torch's version and ABI, Python's and the CPU). Including
torch's headers, a build takes 15-25 s. It runs in a background thread, started by the first
call the operator would take, and calls take gpuloss's Python autograd node until it is
loaded. The compiler outlives a process that exits first and puts the file in place (the next
run loads it); while one process builds (a lock file beside it), others wait for its file
instead of compiling too. `wait()` waits for the operator (benchmarks, tests).
`GPULOSS_TORCH_KERNELS=0` (or `GPULOSS_HOST_KERNELS=0`) turns it off; `gpuloss info` says
whether it is in use and why not.
"""

from __future__ import annotations

import atexit
import os
import sys
import sysconfig
import threading
import time
from pathlib import Path

from . import _host_build

SOURCES = ("gpuloss_torch.cpp", "gpuloss_host.cpp", "gpuloss_math.cuh")
LOCK_STALE_S = 600  # a lock file older than this: a build that died or hangs, built again

_lock = threading.Lock()
_operator = None  # torch.ops.gpuloss_host.cce_labels, once loaded
_path = None  # its file
_builder = None  # the thread that builds and loads it
_reason = "not built yet"
_launched = threading.Event()  # the build thread has started the compiler, or needs none


def operator():
    """The loaded operator; None while it is being built (the first call starts the build)
    or where it cannot be (`status()` says why)."""
    if _operator is None and _builder is None:
        _start()
    return _operator


def unavailable() -> bool:
    """Whether the build has started and no operator is loaded (yet: building; or failed,
    or turned off)."""
    return _builder is not None and _operator is None


def wait(timeout: float | None = None):
    """The operator, once its build has ended (None where it failed or is turned off)."""
    operator()
    builder = _builder
    if builder is not None and builder.ident is not None:
        builder.join(timeout)
    return _operator


def status() -> str:
    """One line for `gpuloss info`."""
    if _operator is not None:
        return f"compiled ({_path})"
    return f"not in use: {_reason}; torch CPU tensors take gpuloss's Python autograd node"


def _start():
    global _builder, _reason
    with _lock:
        if _builder is None:
            builder = threading.Thread(target=_build_and_load, name="gpuloss-torch-build",
                                       daemon=True)
            try:
                builder.start()
            except RuntimeError as exc:  # (no more threads, or the interpreter is exiting)
                _reason = f"no thread to build it in ({exc})"
            _builder = builder


def _build_and_load():
    global _operator, _reason, _path
    try:
        op, path = _load()
        _path = path
        _operator = op
    except Exception as exc:  # noqa: BLE001 - whatever goes wrong, the Python node computes
        text = str(exc).strip()
        _reason = text.splitlines()[-1] if text else repr(exc)
    finally:
        _launched.set()


@atexit.register
def _launch_before_exit():
    """A process ending right after its first call still starts the compiler (which then
    finishes on its own, for the next run): at most a few seconds of digests and checks."""
    if _builder is not None and _builder.is_alive():
        _launched.wait(timeout=15)


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
    command = [compiler, *flags, *(f"-I{i}" for i in includes), str(folder / SOURCES[0]),
               *libs]

    def load(path):
        torch.ops.load_library(str(path))
        return torch.ops.gpuloss_host.cce_labels, path

    return _host_build.cached("_gpuloss_torch", ".so", [folder / name for name in SOURCES],
                              command, (torch.__version__,), load, _build_once)


def _build_once(command, path):
    """Build `path`, or wait for the process that is building it (its lock file)."""
    lock = path.with_name(path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            try:
                age = time.time() - lock.lstat().st_mtime
            except FileNotFoundError:
                age = 0.0  # (just finished: the file is there, or the next try takes it)
            if age > LOCK_STALE_S:  # (a build that died, or hangs: built again)
                try:
                    lock.unlink(missing_ok=True)
                except OSError:  # (another user's: build without it)
                    lock = None
                    break
                continue
            _launched.set()  # (another process builds it: this one waits for the file)
            time.sleep(0.5)
            if path.exists():
                return
            continue
        if path.exists():  # (finished between the last look and the lock)
            lock.unlink(missing_ok=True)
            return
        break
    try:
        _host_build.build(command, path, detached=True, lock=lock, started=_launched.set)
    except OSError:  # (no compiler process started: nothing else will remove the lock; a
        if lock is not None:  # failed compile's shell has removed it)
            lock.unlink(missing_ok=True)
        raise
