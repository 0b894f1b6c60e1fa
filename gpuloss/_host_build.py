"""Build and load the compiled CPU kernels (kernels/gpuloss_host.cpp), a CPython extension.

It is compiled on first use with this machine's C++ compiler, for this machine's instruction
set (`-march=native`: the float32 exp of the cce rows is vectorised with whatever the CPU
has), and kept in a cache folder for the next process: `GPULOSS_CACHE_DIR`, else
`$XDG_CACHE_HOME/gpuloss`, else `~/.cache/gpuloss`. The file's name carries a digest of the
sources, the flags, the compiler, the Python ABI and the CPU, so that a changed source, another
Python or another machine never loads a stale build. A build takes a few seconds, once.

Where no compiler is found, or the build fails, every call takes the NumPy backend, which
computes the same numbers (to rounding) more slowly; `gpuloss info` says which is in use and
why. `GPULOSS_HOST_KERNELS=0` turns the compiled kernels off.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

NAME = "_gpuloss_host"
SOURCES = ("gpuloss_host.cpp", "gpuloss_math.cuh")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-pthread",
         # no fused multiply-adds the source does not write: the sums round as NumPy's do
         "-ffp-contract=off",
         # no errno and no FP exception flags to keep: selects and libm calls in the loops
         # vectorise (the kernels report bad values through their own flags)
         "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden")
# dlopen, to find PyTorch's OpenMP runtime (in glibc itself from 2.34; after the source, which
# needs it)
LIBS = ("-ldl",) if sys.platform.startswith("linux") else ()

_lock = threading.Lock()
_module = None  # the loaded extension, once built
_tried = False  # whether a load was attempted (then _module or _reason says how it went)
_reason = "not built yet"


def module():
    """The extension module, built and loaded on the first call; None where it cannot be
    (turned off, no compiler, a failed build: `status()` says why)."""
    if _tried:
        return _module
    return _load_once()


def status() -> str:
    """One line for `gpuloss info`: whether the compiled CPU kernels are in use."""
    if module() is not None:
        return f"compiled ({_module.__file__})"
    return f"not in use: {_reason}; the NumPy backend computes"


def _load_once():
    global _module, _tried, _reason
    with _lock:
        if not _tried:
            try:
                _module = _load()
            except Exception as exc:  # noqa: BLE001 - whatever goes wrong, NumPy computes
                text = str(exc).strip()
                _reason = text.splitlines()[-1] if text else repr(exc)
            _tried = True
    return _module


def _load():
    global _reason
    if os.environ.get("GPULOSS_HOST_KERNELS", "1") == "0":
        _reason = "GPULOSS_HOST_KERNELS=0"
        return None
    if sys.implementation.name != "cpython":
        _reason = f"{sys.implementation.name} (the kernels are a CPython extension)"
        return None
    compiler = _compiler()
    if compiler is None:
        _reason = "no C++ compiler found (set CXX, or install g++ or clang++)"
        return None
    from .backends.cuda import kernel_dir  # (no CuPy: only the sources' folder)

    folder = kernel_dir()
    sources = [folder / name for name in SOURCES]
    include = sysconfig.get_paths()["include"]
    flags = list(FLAGS)
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]
    command = [compiler, *flags, f"-I{include}", f"-I{folder}", str(sources[0]), *LIBS]
    return cached(NAME, importlib.machinery.EXTENSION_SUFFIXES[0], sources, command, (),
                  _import, build)


def cached(stem, suffix, sources, command, key, load, make):
    """`load(path)` of the library that `command` (a compiler call without its output) makes
    from `sources`, kept in the cache folder under a name with a digest of the sources, the
    command, Python's ABI, the CPU and the `key` strings; `make(command, path)` builds it
    where it is missing, or once more where the cached file does not load (a build cut
    short)."""
    digest = hashlib.sha256()
    for part in (*(p.read_bytes() for p in sources), " ".join(command).encode(),
                 str(sysconfig.get_config_var("SOABI")).encode(), _cpu_id().encode(),
                 *(k.encode() for k in key)):
        digest.update(part)
        digest.update(b"\0")
    path = cache_dir() / f"{stem}-{digest.hexdigest()[:20]}{suffix}"
    if not path.exists():
        make(command, path)
    try:
        return load(path)
    except (ImportError, OSError):  # a broken file in the cache: build it again
        path.unlink(missing_ok=True)
        make(command, path)
        return load(path)


def build(command, path, *, detached=False, lock=None, started=None):
    """Run the compiler `command` (without its output) to make `path`, in a session of its
    own; atomically, so that a concurrent build of the same file is harmless. Interrupted
    (Ctrl-C, five minutes), the compiler and its children are stopped. `detached`: no time
    limit, and the compiler outlives this process if it exits first: it puts the file in
    place itself (a short run still leaves the build for the next), then removes the file
    `lock`; its output goes to `path`.log (read here, or left for the next look where it
    failed after this process had gone). `started()` is called once it runs."""
    path = path.absolute()  # (the shell and this thread may not share a working folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    log = path.with_name(path.name + ".log") if detached else tmp.with_suffix(".log")
    argv = [*command, "-o", str(tmp)]
    if detached:  # (the rename in the compiler's session: done after this process has gone)
        script = ('tmp=$1 out=$2 lock=$3 log=$4; shift 4; "$@" && mv -f -- "$tmp" "$out"; '
                  'status=$?; rm -f -- "$tmp"; [ $status = 0 ] && rm -f -- "$log"; '
                  'rm -f -- "$lock"; exit $status')
        argv = ["/bin/sh", "-c", script, "sh", str(tmp), str(path), str(lock or ""), str(log),
                *argv]
    with open(log, "wb") as said:  # (a file, not a pipe: the compiler may outlive us)
        try:
            process = subprocess.Popen(argv, stdout=said, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            log.unlink(missing_ok=True)
            raise
        if started is not None:
            started()
        try:
            process.wait(timeout=None if detached else 300)
        except BaseException:
            if not detached:
                _stop(process)
                tmp.unlink(missing_ok=True)
                log.unlink(missing_ok=True)
            raise
    text = log.read_bytes().decode(errors="replace").strip() if log.exists() else ""
    log.unlink(missing_ok=True)  # ((any locale) above)
    if process.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the C++ build failed: {text}")
    if not detached:
        os.replace(tmp, path)


def _stop(process):
    """Stop a compiler and its children (its session's process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (OSError, AttributeError):  # (gone already; no process groups here)
        process.kill()
    process.wait()


def _import(path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cache_dir() -> Path:
    if os.environ.get("GPULOSS_CACHE_DIR"):
        return Path(os.environ["GPULOSS_CACHE_DIR"]).absolute()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpuloss"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's flags (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"
