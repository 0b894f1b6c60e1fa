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
from gpuloss._examples import example_inputs

N_ELEM = 1 << 24  # mse, bce, bce_with_logits
N_ROWS, N_CLASSES = 262144, 64  # cce, cce_with_logits


def torch_fns():
    """torch and a function running a loss's PyTorch peer forward and backward."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None, None

    def run(fn, p, y):
        x = p.detach().requires_grad_()
        loss = fn.torch_peer(F, x, y)
        loss.backward()
        return loss, x.grad

    return torch, run


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


def inputs(fn, rng):
    """The benchmark's inputs (from the loss's declaration) and the bytes the floor moves."""
    p, y = example_inputs(fn, rng, n=N_ELEM, rows=N_ROWS, classes=N_CLASSES)
    if fn.family == "categorical" and not fn.class_indices:  # read both rows, write one
        return p, y, 12 * N_ROWS * N_CLASSES
    if fn.family == "categorical":
        # validate=True reads every probability once; the gradient is written once
        return p, y, 8 * N_ROWS * N_CLASSES + 8 * N_ROWS
    return p, y, 12 * N_ELEM


def main(argv=None):
    ap = _bench_io.Parser(prog="gpuloss bench", description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--quick", action="store_true", help="5 rounds instead of --repeat")
    _bench_io.add_common_args(ap, "cpu", gl.LOSSES)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 5

    torch, torch_run = torch_fns()
    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth(args.repeat)
    rows = []
    for loss in args.losses:
        fn = gl.LOSSES[loss]
        p, y, floor_bytes = inputs(fn, rng)
        contenders = {
            "ours": lambda: fn.value_and_grad(p, y),
            "naive": lambda: fn.naive(np, p, y),
        }
        with_torch = torch is not None and fn.torch_peer is not None
        if with_torch:
            tp, ty = torch.from_numpy(p), torch.from_numpy(y)
            contenders["torch"] = lambda: torch_run(fn, tp, ty)
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
        if with_torch:
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
