"""Find the inputs' array library and device, and pick the backend that computes.

NumPy arrays, Python lists and scalars go to the NumPy backend. CuPy arrays go to the CUDA
backend (`gpuloss.backends.cuda`) when it can run here, and so do PyTorch and JAX arrays on a
CUDA device (through DLPack); PyTorch CPU tensors and JAX CPU arrays take the NumPy backend
through zero-copy views. JAX arrays being traced (jit, grad, vmap) compute with `jax.numpy`
inside the trace (`gpuloss._jax`). Every other array-API array (array-api-strict, ...) goes
to the generic array-API backend. Results come back in the caller's library. Backends are
imported only when an input needs them, so `import gpuloss` works with no CuPy, no CUDA and
no GPU.
"""

from __future__ import annotations

import functools
import importlib
import sys
from types import ModuleType

import array_api_compat
import numpy as np

from . import _jax

__all__ = ["array_namespace", "backend_for", "route", "preferred_namespace"]


def _is_array(x) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and type(x) is torch.Tensor:  # (before array_api_compat's long look)
        return True
    return isinstance(x, (np.ndarray, np.generic)) or array_api_compat.is_array_api_obj(x)


def as_array(x, name: str, like=None, xp=None):
    """Return `x` as an array; lists and scalars become arrays of `like`'s library."""
    if type(x) is np.ndarray:  # the common case, first (a MaskedArray is a subclass)
        return x
    if isinstance(x, np.ma.MaskedArray):
        # A mask would be dropped silently by np.asarray: refuse instead.
        msg = f"{name} is a masked array; pass the data and a sample_weight of 0 for masked entries."
        raise TypeError(msg)
    if _is_array(x):
        return np.asarray(x) if isinstance(x, np.generic) else x
    if x is None or isinstance(x, (str, bytes)):
        msg = f"Expected {name} to be an array or a number, got {type(x).__name__} {x!r}."
        raise TypeError(msg)
    if xp is None or xp is _NUMPY_NS:
        try:
            return np.asarray(x)
        except (TypeError, ValueError) as exc:
            msg = f"Could not turn {name} ({type(x).__name__}) into an array: {exc}"
            raise TypeError(msg) from None
    return xp.asarray(x, device=array_api_compat.device(like))


_NUMPY_NS = array_api_compat.array_namespace(np.empty(0))


def library_name(x) -> str:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return "torch"  # subclasses too (nn.Parameter, a user's own)
    mod = type(x).__module__.split(".")[0]
    return {"jaxlib": "jax"}.get(mod, mod)


def array_namespace(pred, others: dict):
    """The namespace of `pred`; every other array must come from the same library and device."""
    if type(pred) is np.ndarray and all(type(a) is np.ndarray for a in others.values()):
        return _NUMPY_NS  # the common call: one library, one device
    torch = sys.modules.get("torch")
    if torch is not None and type(pred) is torch.Tensor:  # a training loop's call, checked
        # without array_api_compat's general (slower) look
        dev = pred.device
        if all(type(a) is torch.Tensor and a.device == dev for a in others.values()):
            return _torch_namespace()
    xp = array_api_compat.array_namespace(pred)
    lib = library_name(pred)
    dev = array_api_compat.device(pred)
    for name, arr in others.items():
        if arr is None:
            continue
        if lib == "dask" and name != "target" and library_name(arr) == "numpy":
            continue  # small NumPy weights go along with every chunk
        if library_name(arr) != lib:
            msg = (
                f"Arrays from different libraries in one call: pred is a {lib} array, "
                f"{name} is a {library_name(arr)} array. Convert {name} to {lib} first."
            )
            raise TypeError(msg)
        other_dev = array_api_compat.device(arr)
        if other_dev != dev and None not in (dev, other_dev):  # a JAX tracer has no device
            msg = (
                f"Arrays on different devices in one call: pred is on {dev}, "
                f"{name} is on {other_dev}."
            )
            raise ValueError(msg)
    return xp


def route(call, rerun=None):
    """The function that computes the checked `call`: `backend_for` its pred, unless one of
    its arrays is a JAX tracer (jit, grad, vmap, ...); then the computation stays in the
    trace."""
    if type(call.pred) is np.ndarray and type(call.target) is np.ndarray:
        return compute_cpu  # NumPy arrays throughout (others are refused)
    torch = sys.modules.get("torch")
    if torch is not None and type(call.pred) is torch.Tensor and _torch_cpu(call.pred):
        return _compute_torch_cpu  # a training loop's call (its arrays are all torch's)
    arrays = (call.pred, call.target, call.sample_weight, call.pos_weight, call.class_weight)
    if any(_jax.is_traced(a) for a in arrays):
        return _jax.compute
    return backend_for(call.pred, rerun)


def backend_for(pred, rerun=None):
    """The function that computes a checked call for `pred`'s library.

    This is the one seam where CuPy arrays, and other arrays that live on a CUDA device
    (PyTorch, JAX: through DLPack, without a copy), route to the fused CUDA kernels; other
    arrays take the generic array-API implementation. Dask arrays go to the Dask layer, which
    runs `rerun` (`gpuloss._api.run`: check and dispatch) on each chunk: handed in, so that
    nothing here imports the layers above.
    """
    if isinstance(pred, np.ndarray):
        return compute_cpu
    if array_api_compat.is_dask_array(pred):
        compute = importlib.import_module("gpuloss._dask").compute
        return functools.partial(compute, rerun=rerun)
    if array_api_compat.is_cupy_array(pred):
        return importlib.import_module("gpuloss.backends.cuda").compute
    plain = None  # how to compute on this array without an autograd graph
    if _torch_cpu(pred):  # (first: asking a tensor for its DLPack device costs microseconds)
        plain = _compute_torch_cpu
    elif _on_cuda(pred):
        plain = importlib.import_module("gpuloss.backends.cuda").compute_foreign
    elif _jax_cpu(pred):
        return _compute_jax_cpu
    if plain is None:
        return importlib.import_module("gpuloss.backends.generic").compute
    return plain  # (a torch tensor's autograd graph is gpuloss._torch's)


@functools.cache
def _torch_namespace():
    import torch

    return array_api_compat.array_namespace(torch.empty(0))


@functools.cache
def _numpy_backend():
    return importlib.import_module("gpuloss.backends.numpy")


@functools.cache
def _host_backend():
    return importlib.import_module("gpuloss.backends.host")


def compute_cpu(call):
    """NumPy data: the compiled CPU kernels where they take the call (the common ones), the
    NumPy backend for the rest and for every call whose data break a check (it raises)."""
    out = _host_backend().compute(call)
    return _numpy_backend().compute(call) if out is None else out


_NUMPY_DTYPES = ("torch.float16", "torch.bfloat16", "torch.float32", "torch.float64")


def _torch_cpu(x) -> bool:
    """A torch CPU tensor of a NumPy dtype (bfloat16: ml_dtypes'): the NumPy backend computes
    on views of it."""
    return (array_api_compat.is_torch_array(x) and x.device.type == "cpu"
            and str(x.dtype) in _NUMPY_DTYPES)


def graph_on_torch_cpu(call):
    """The value of a checked call on torch CPU tensors with its autograd node in C++: gpuloss's
    PyTorch operator, where it is built and takes the call (the common cross-entropy of a
    training step). None where gpuloss._torch's Python node carries the gradient."""
    torch = sys.modules.get("torch")
    if torch is None or type(call.pred) is not torch.Tensor:  # (the rest: the host backend's)
        return None
    return _host_backend().compute_torch_graph(call)


def _numpy_view(x):
    """A torch CPU tensor as a NumPy array on the same memory (bfloat16 through ml_dtypes)."""
    if x.requires_grad:
        x = x.detach()
    if x.is_neg():  # a negative view (its memory holds -x): a copy with its values
        x = x.resolve_neg()
    if str(x.dtype) == "torch.bfloat16":
        import ml_dtypes
        import torch

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _torch_view(a):
    """A NumPy result as a torch tensor on the same memory."""
    import torch

    a = np.asarray(a)
    if a.dtype.kind == "V" and a.dtype.name == "bfloat16":  # (.name alone costs microseconds)
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _compute_torch_cpu(call):
    """The NumPy backend on zero-copy NumPy views of torch CPU tensors; results come back as
    tensors (views of the NumPy results, no copy). Targets and weights get no gradient."""
    done = _host_backend().compute_torch(call)  # the common call: straight on the tensors
    if done is not None:
        return done
    inner = call.with_arrays(_numpy_view)
    value, grad = compute_cpu(inner)

    def back(x):
        return None if x is None else _torch_view(x)

    return back(value), back(grad)


def _jax_cpu(x) -> bool:
    """A concrete JAX array on the CPU: the NumPy backend computes on a view of it."""
    return (array_api_compat.is_jax_array(x) and x.__dlpack_device__()[0] == _DLPACK_CPU
            and x.dtype.name in ("float16", "bfloat16", "float32", "float64"))


def _compute_jax_cpu(call):
    """The NumPy backend on zero-copy (read-only) NumPy views of JAX CPU arrays; results come
    back as JAX arrays on the same memory where it is 64-byte aligned (large results are:
    `gpuloss._pool`), copied otherwise."""
    inner = call.with_arrays(np.asarray)
    value, grad = compute_cpu(inner)
    return _to_jax(value), _to_jax(grad)


def _to_jax(x):
    if x is None:
        return None
    import jax

    x = np.asarray(x)
    if x.ctypes.data % 64 == 0 and x.flags.c_contiguous and x.flags.writeable:
        try:
            return jax.dlpack.from_dlpack(x)
        except (BufferError, TypeError):  # a dtype DLPack lacks (bfloat16 in some versions)
            pass
    return jax.device_put(x)


_DLPACK_CPU = 1  # kDLCPU in the DLPack device enum
_DLPACK_CUDA = 2  # kDLCUDA


def _on_cuda(x) -> bool:
    try:
        device_type, _ = x.__dlpack_device__()
    except (AttributeError, TypeError, RuntimeError):
        return False
    return device_type == _DLPACK_CUDA and _cupy_if_usable() is not None


@functools.cache
def _cupy_if_usable():
    from ._gpu_probe import nvidia_driver_present

    if not nvidia_driver_present():  # importing CuPy to learn that costs a second or two
        return None
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        cupy.zeros(1).sum().item()  # a kernel actually runs
    except Exception:  # no CuPy, no driver, no device, broken toolkit: all mean "use NumPy"
        return None
    return cupy


def preferred_namespace() -> ModuleType:
    """CuPy when a CUDA GPU is usable here, NumPy otherwise.

    Lets the same user code run on a GPU where one exists and on the CPU in CI::

        xp = gpuloss.preferred_namespace()
        z = xp.asarray(logits)
    """
    return _cupy_if_usable() or np
