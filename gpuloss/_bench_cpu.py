"""CPU benchmark: gpuloss value_and_grad vs naive NumPy vs PyTorch CPU vs the bandwidth floor.

All in one process, on the same inputs, medians after warm-up, in interleaved rounds. Writes
<out>/cpu-<machine>-<date>.json and prints a table. Run as `gpuloss bench` on a machine
without a GPU, or `python benchmarks/cpu.py`.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import gpuloss as gl
from gpuloss import _bench_io

N_ELEM = 1 << 24  # mse, bce, bce_with_logits
N_ROWS, N_CLASSES = 262144, 64  # cce, cce_with_logits


# naive NumPy, written straight from the seed page's formulas (with the clipping a user adds)
def naive_mse(p, y):
    d = p - y
    return np.mean(d**2), 2 * d / p.size


def naive_bce(p, y):
    eps = np.finfo(p.dtype).eps
    p = np.clip(p, eps, 1 - eps)
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return loss, (-y / p + (1 - y) / (1 - p)) / p.size


def naive_bce_with_logits(z, y):
    s = 1 / (1 + np.exp(-z))
    loss = -np.mean(y * np.log(s) + (1 - y) * np.log(1 - s))
    return loss, (s - y) / z.size


def naive_cce(p, t):
    eps = np.finfo(p.dtype).eps
    onehot = np.eye(p.shape[1], dtype=p.dtype)[t]
    p = np.clip(p, eps, 1 - eps)
    loss = -np.mean(np.sum(onehot * np.log(p), axis=1))
    return loss, -onehot / p / p.shape[0]


def naive_cce_with_logits(z, t):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    s = e / e.sum(axis=1, keepdims=True)
    onehot = np.eye(z.shape[1], dtype=z.dtype)[t]
    loss = -np.mean(np.log(s[np.arange(z.shape[0]), t]))
    return loss, (s - onehot) / z.shape[0]


NAIVE = {
    "mse": naive_mse,
    "bce": naive_bce,
    "bce_with_logits": naive_bce_with_logits,
    "cce": naive_cce,
    "cce_with_logits": naive_cce_with_logits,
}


def torch_fns():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, {}

    def run(loss_fn):
        def f(p, y):
            x = p.detach().requires_grad_()
            loss = loss_fn(x, y)
            loss.backward()
            return loss, x.grad

        return f

    return torch, {
        "mse": run(F.mse_loss),
        "bce": run(F.binary_cross_entropy),
        "bce_with_logits": run(F.binary_cross_entropy_with_logits),
        "cce": run(lambda x, t: F.nll_loss(torch.log(x), t)),
        "cce_with_logits": run(F.cross_entropy),
    }


def median_ms(fn, repeat, warmup=2):
    return interleaved_ms({"f": fn}, repeat, warmup)["f"]


def interleaved_ms(fns: dict, repeat: int, warmup: int = 2) -> dict:
    """Median milliseconds of each function, timed in rounds (one call of each per round) so
    that a noisy, shared machine's slow spells hit every contender alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def copy_bandwidth(repeat):
    """Bytes per second of a large memory copy (read + write counted), as the floor's rate."""
    src = np.random.default_rng(0).standard_normal(N_ELEM, dtype=np.float32)
    dst = np.empty_like(src)
    ms = median_ms(lambda: np.copyto(dst, src), repeat)
    return 2 * src.nbytes / (ms / 1e3)


def inputs(loss, rng):
    if loss in ("mse", "bce", "bce_with_logits"):
        shape = (N_ELEM,)
        if loss == "mse":
            p = rng.standard_normal(shape, dtype=np.float32)
            y = rng.standard_normal(shape, dtype=np.float32)
        elif loss == "bce":
            p = rng.uniform(0.01, 0.99, shape).astype(np.float32)
            y = (rng.random(shape) < 0.5).astype(np.float32)
        else:
            p = (3 * rng.standard_normal(shape)).astype(np.float32)
            y = (rng.random(shape) < 0.5).astype(np.float32)
        return p, y, 12 * N_ELEM
    z = (2 * rng.standard_normal((N_ROWS, N_CLASSES))).astype(np.float32)
    t = rng.integers(0, N_CLASSES, N_ROWS)
    if loss == "cce":
        e = np.exp(z - z.max(1, keepdims=True))
        z = (e / e.sum(1, keepdims=True)).astype(np.float32)
        # validate=True reads every probability once; the gradient is written once
        return z, t, 8 * N_ROWS * N_CLASSES + 8 * N_ROWS
    return z, t, 8 * N_ROWS * N_CLASSES + 8 * N_ROWS


def main(argv=None):
    ap = _bench_io.Parser(prog="gpuloss bench", description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of --repeat")
    _bench_io.add_common_args(ap, "cpu", gl.LOSSES)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 5

    torch, torch_impl = torch_fns()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth(args.repeat)
    rows = []
    for loss in args.losses:
        p, y, floor_bytes = inputs(loss, rng)
        fn = gl.LOSSES[loss]
        contenders = {
            "ours": lambda: fn.value_and_grad(p, y),
            "naive": lambda: NAIVE[loss](p, y),
        }
        if torch is not None:
            tp, ty = torch.from_numpy(p), torch.from_numpy(y)
            contenders["torch"] = lambda: torch_impl[loss](tp, ty)
        ms = interleaved_ms(contenders, args.repeat)
        ours, naive = ms["ours"], ms["naive"]
        row = {
            "loss": loss,
            "op": "value_and_grad",
            "dtype": "float32",
            "shape": list(p.shape),
            "ms": round(ours, 3),
            "floor_ms": round(1e3 * floor_bytes / bandwidth, 3),
            "naive_numpy_ms": round(naive, 3),
        }
        row["fraction_of_floor"] = round(row["floor_ms"] / ours, 3)
        row["speedup_vs_naive"] = round(naive / ours, 2)
        if torch is not None:
            row["torch_ms"] = round(ms["torch"], 3)
            row["speedup_vs_torch"] = round(row["torch_ms"] / ours, 2)
        rows.append(row)
        _bench_io.progress(row)

    # accuracy bar: float32 mse at n = 10^7 against float64
    a = rng.standard_normal(10_000_000, dtype=np.float32)
    b = rng.standard_normal(10_000_000, dtype=np.float32)
    exact = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    mse_rel_err = abs(float(gl.mse(a, b)) - exact) / exact

    result = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores)",
        "cpu": _cpu_name(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "gpuloss": gl.__version__,
        "date": dt.date.today().isoformat(),
        "copy_GBps": round(bandwidth / 1e9, 2),
        "mse_float32_1e7_rel_err": mse_rel_err,
        "rows": rows,
    }
    name = f"cpu-{_slug(_cpu_name())}-{os.cpu_count()}core-{result['date']}.json"

    def table():
        print(f"copy bandwidth {result['copy_GBps']} GB/s; mse float32 n=1e7 rel. error "
              f"{mse_rel_err:.2e}")
        print(f"{'loss':16s} {'ms':>8s} {'floor':>7s} {'frac':>5s} {'naive':>8s} {'x':>5s} "
              f"{'torch':>8s} {'x':>5s}")
        for r in rows:
            print(f"{r['loss']:16s} {r['ms']:8.2f} {r['floor_ms']:7.2f} "
                  f"{r['fraction_of_floor']:5.2f} {r['naive_numpy_ms']:8.2f} "
                  f"{r['speedup_vs_naive']:5.1f} {r.get('torch_ms', float('nan')):8.2f} "
                  f"{r.get('speedup_vs_torch', float('nan')):5.1f}")

    _bench_io.finish(result, _bench_io.output_path(args.out, name), args.json, table)
    return 0


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(s):
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()


if __name__ == "__main__":
    main()
