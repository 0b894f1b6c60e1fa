"""Shared fixtures: the array namespaces present here, and input generators."""

from __future__ import annotations

import importlib
import os

import numpy as np
import pytest


def _fixed_hypothesis_examples():
    """Hypothesis (6.13x on) also draws "local constants" from whichever of our modules are
    loaded when a test runs, scanning them in random order for at most 100 ms: a derandomized
    test's examples then depended on the test order, the number of workers and the machine's
    load (the same test met different cases in two runs). Fixed examples must be fixed, so
    no local constants are drawn here. (An internal of Hypothesis: if it moves, nothing is
    patched and only the reproducibility is lost.)"""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:
        return
    empty = getattr(providers, "_local_constants", None)
    if empty is not None and hasattr(providers, "_get_local_constants"):
        providers._get_local_constants = lambda: empty  # (never filled: the scan is gone)


_fixed_hypothesis_examples()


# GPULOSS_FULL_SWEEPS=1 (a nightly run): every combination of the slowest sweeps; the default
# run takes a sample in which every value of every axis still appears (README, "Tests")
FULL_SWEEPS = os.environ.get("GPULOSS_FULL_SWEEPS") == "1"


def each_at_least_once(first: list, second: list, offset: int = 0) -> list[tuple]:
    """Pairs from `first` × `second`: all of them with FULL_SWEEPS; otherwise each item of
    `first` with one of `second` in turn (starting at `offset`, so that two sweeps of the
    same lists pair them differently), and each of `second` at least once."""
    if FULL_SWEEPS:
        return [(a, b) for a in first for b in second]
    n = len(second)
    pairs = [(a, second[(i + offset) % n]) for i, a in enumerate(first)]
    seen = {(i + offset) % n for i in range(len(first))}
    pairs += [(first[0], second[j]) for j in range(n) if j not in seen] if first else []
    return pairs


def run_python(env_extra: dict, code: str, timeout: float = 120) -> str:
    """The standard output of `code` run by this Python in a process of its own, with
    `env_extra` added to the environment; its exit status must be 0 (a hang fails on the
    timeout)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, env={**os.environ, **env_extra}, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def require(module: str):
    """Import a peer library for comparison tests.

    In CI (CI=true) the peers are installed by .ci/run, so a missing one is a failure,
    never a silent skip; elsewhere the tests that need it are skipped.
    """
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


GPU = _gpu_available()


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    if os.environ.get("GPULOSS_REQUIRE_GPU") == "1":
        msg = "GPULOSS_REQUIRE_GPU=1 but no CUDA GPU is usable (CuPy missing or no device)."
        raise pytest.UsageError(msg)
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _namespaces():
    names = ["numpy", "array_api_strict"]
    try:
        importlib.import_module("torch")
        names.append("torch")
    except ImportError:
        pass
    return names


@pytest.fixture(params=_namespaces())
def xp(request):
    """An array namespace present on this machine (numpy, array_api_strict, torch)."""
    name = request.param
    if name == "numpy":
        return np
    if name == "torch":
        import array_api_compat.torch as xp_torch

        return xp_torch
    return importlib.import_module(name)


def to_xp(xp, x):
    """A NumPy array (or None) as an array of namespace xp."""
    if x is None or xp is np:
        return x
    if xp.__name__.startswith("array_api_compat.torch"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x))
    return xp.asarray(np.ascontiguousarray(x))


def to_numpy(x):
    if x is None:
        return None
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    return np.from_dlpack(x)


def make_inputs(loss, rng, shape, dtype=np.float64, labels=True, axis=-1):
    """Valid (pred, target) for `loss`: probabilities away from the clipping bounds, logits
    of moderate size, soft or integer targets."""
    if loss == "mse":
        return rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape)
    if loss == "bce":
        return rng.uniform(0.02, 0.98, shape).astype(dtype), rng.uniform(0, 1, shape)
    if loss == "bce_with_logits":
        return (3 * rng.standard_normal(shape)).astype(dtype), rng.uniform(0, 1, shape)
    if loss == "poisson_nll":  # rates > 0 (valid with log_input either way), counts
        return rng.uniform(0.05, 2.5, shape).astype(dtype), rng.poisson(2.0, shape) * 1.0
    if loss in ("hinge", "squared_hinge"):  # scores, labels -1/+1
        return ((1.5 * rng.standard_normal(shape)).astype(dtype),
                np.where(rng.random(shape) < 0.5, -1.0, 1.0))
    if loss in ("mae", "huber", "smooth_l1", "log_cosh", "pinball"):
        return (2 * rng.standard_normal(shape)).astype(dtype), rng.standard_normal(shape)
    K = shape[axis]
    sample_shape = shape[:axis % len(shape)] + shape[axis % len(shape) + 1 :]
    z = 2 * rng.standard_normal(shape)
    if labels:
        target = rng.integers(0, K, sample_shape)
    else:
        t = rng.uniform(0, 1, shape)
        target = t / t.sum(axis=axis, keepdims=True)
    if loss == "cce":
        e = np.exp(z - z.max(axis=axis, keepdims=True))
        p = e / e.sum(axis=axis, keepdims=True)
        return np.clip(p, 0.01, 0.99).astype(dtype), target
    if loss in ("nll", "kl_div"):  # log-probabilities (a log-softmax)
        m = z.max(axis=axis, keepdims=True)
        a = z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))
        if loss == "kl_div" and labels:  # probability targets only: a softmax of other logits
            t = np.exp(2 * rng.standard_normal(shape))
            target = t / t.sum(axis=axis, keepdims=True)
        return a.astype(dtype), target
    if loss == "kl_div_with_logits" and labels:  # probability targets only (a teacher's)
        t = np.exp(2 * rng.standard_normal(shape))
        target = t / t.sum(axis=axis, keepdims=True)
    if loss == "multiclass_hinge":  # class indices only
        target = rng.integers(0, K, sample_shape)
    return z.astype(dtype), target


def torch_value_and_grad(torch, fn, pred, target):
    """(value, gradient of the value's sum) of a torch loss at float64 `pred`, by autograd;
    the target goes in as it is (float64 or class indices)."""
    x = torch.tensor(pred, dtype=torch.float64, requires_grad=True)
    out = fn(x, torch.tensor(target))
    out.sum().backward()
    return out.detach().numpy(), x.grad.numpy()


@pytest.fixture(scope="session", autouse=True)
def _torch_operator_built():
    """gpuloss's PyTorch operator (kernels/gpuloss_torch.cpp) is built in a background thread
    on first use, and calls take the Python autograd node until it is loaded: the suite waits
    for it once, so that every test meets the same node (tests of the Python node turn the
    operator off for themselves: `python_node` in test_torch_cpu)."""
    try:
        importlib.import_module("torch")
    except ImportError:
        return
    from gpuloss import _torch_build

    _torch_build.wait()
