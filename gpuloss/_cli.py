"""The `gpuloss` command line (also `python -m gpuloss`).

    gpuloss demo    all five losses with gradients on generated data, on the best device
                    here, each cross-checked against a second implementation, as a table
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def _demo_inputs(loss, rng, dtype):
    if loss in ("mse", "bce", "bce_with_logits"):
        shape = (1 << 20,)
        if loss == "mse":
            pred = rng.standard_normal(shape)
            target = rng.standard_normal(shape)
        elif loss == "bce":
            pred = rng.uniform(0.01, 0.99, shape)
            target = (rng.random(shape) < pred).astype(dtype)
        else:
            pred = 3 * rng.standard_normal(shape)
            target = (rng.random(shape) < 0.5).astype(dtype)
        return pred.astype(dtype), target
    n, k = 16384, 64
    z = 2 * rng.standard_normal((n, k))
    target = rng.integers(0, k, n)
    if loss == "cce":
        e = np.exp(z - z.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(dtype), target
    return z.astype(dtype), target


def _second_opinion(loss, pred, target):
    """The same numbers from an independent implementation: the NumPy backend when the
    demo ran on a GPU, the generic array-API backend when it ran on NumPy."""
    import array_api_compat.numpy as xp_np

    from . import _api, _generic_backend

    if isinstance(pred, np.ndarray):
        call = _api.prepare(
            loss, xp_np.asarray(pred), xp_np.asarray(target), {}, want_value=True, want_grad=True
        )
        value, grad = _generic_backend.compute(call)
        return float(value), np.asarray(grad)
    from . import LOSSES

    value, grad = LOSSES[loss].value_and_grad(_to_numpy(pred), _to_numpy(target))
    return float(value), grad


def _to_numpy(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def demo(args) -> int:
    from . import LOSSES, preferred_namespace

    xp = preferred_namespace()
    device = "cpu (NumPy)"
    if xp is not np:
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        device = f"cuda ({props['name'].decode()})"
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    print(f"gpuloss demo on {device}, {dtype.name}; cross-check: "
          f"{'NumPy backend' if xp is not np else 'generic array-API backend'}")
    header = f"{'loss':16s} {'shape':>12s} {'loss value':>14s} {'|grad|max':>10s} " \
             f"{'rel. diff':>10s} {'ms':>8s}  check"
    print(header)
    print("-" * len(header))
    failures = 0
    tol = {"float16": 2e-3, "float32": 1e-5, "float64": 1e-12}[dtype.name]
    for name, fn in LOSSES.items():
        pred, target = _demo_inputs(name, rng, dtype)
        p, t = xp.asarray(pred), xp.asarray(target)
        fn.value_and_grad(p, t)  # warm-up (kernel compilation on a GPU)
        t0 = time.perf_counter()
        value, grad = fn.value_and_grad(p, t)
        value = float(value)  # waits for the device
        ms = 1e3 * (time.perf_counter() - t0)
        ref_value, ref_grad = _second_opinion(name, pred, target)
        grad_np = _to_numpy(grad).astype(np.float64)
        scale = max(np.abs(ref_grad).max(), np.finfo(np.float64).tiny)
        diff = max(
            abs(value - ref_value) / max(abs(ref_value), 1e-300),
            float(np.abs(grad_np - ref_grad).max() / scale),
        )
        ok = diff <= tol
        failures += not ok
        shape = "x".join(map(str, pred.shape))
        print(f"{name:16s} {shape:>12s} {value:14.8g} {np.abs(grad_np).max():10.3g} "
              f"{diff:10.2e} {ms:8.2f}  {'ok' if ok else 'MISMATCH'}")
    print("all five losses agree" if not failures else f"{failures} loss(es) disagree")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gpuloss", description="Fused losses and gradients.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="all five losses with gradients, cross-checked")
    p_demo.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
