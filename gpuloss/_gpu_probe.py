"""Is an NVIDIA driver here at all? A cheap look before importing CuPy.

Importing CuPy and asking it for devices takes about a second (two on a slow disk); on the
many machines without an NVIDIA driver that time buys nothing. This module imports nothing
of gpuloss and no GPU library, so that the dispatch and the command line can both ask it.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import sys

# Files the NVIDIA driver creates: its /proc entry and device nodes (Linux, containers with
# the GPU passed through), /dev/dxg on WSL2 (where the driver lives on the Windows side).
_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")


@functools.cache
def nvidia_driver_present() -> bool:
    """False only where no NVIDIA driver can be here, so that CuPy need not be imported.

    True means "maybe": a driver file or the driver library exists, and only CuPy can tell
    whether a usable device is there. On platforms this does not know it says True.
    """
    if sys.platform.startswith("linux"):
        if any(os.path.exists(path) for path in _DRIVER_FILES):
            return True
        # The driver library without device files: a container that was not given the GPU
        # has none, but leave the verdict to CuPy where the library is there.
        return ctypes.util.find_library("cuda") is not None
    if sys.platform == "win32":
        return ctypes.util.find_library("nvcuda") is not None
    if sys.platform == "darwin":
        return False  # no CUDA driver for macOS since 2019; CuPy has no macOS build
    return True
