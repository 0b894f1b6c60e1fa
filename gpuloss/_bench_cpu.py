"""CPU benchmark: gpuloss value_and_grad vs naive NumPy vs PyTorch CPU vs the bandwidth floor.

All in one process, on the same inputs, medians after warm-up, in interleaved rounds. Writes
<out>/cpu-<machine>-<date>.json and prints a table. Run as `gpuloss bench` on a machine
without a GPU, or `python benchmarks/cpu.py`.

Then the small batches (gpuloss/_bench_small.py): time per call from 2^8 to 2^24 elements
against PyTorch, and an MLP's training step, under PyTorch's default thread count
(`--small-batch-only` runs only these and writes cpu-small-batch-<machine>-<date>.json).
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
from gpuloss import _bench_io, _bench_small
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
    from . import _torch_build

    _torch_build.wait()  # (gpuloss's torch operator, built in the background on first use)

    def run(peer, p, y):  # peer(F, x, y): the loss in PyTorch
        x = p.detach().requires_grad_()
        loss = peer(F, x, y)
        loss.backward()
        return loss, x.grad

    return torch, run


# ---------------------------------------------------------------------------------------------
# option variants: (loss, options, naive NumPy loss+gradient from the formula, the PyTorch
# formula a user would run through autograd), each at the loss's benchmark size


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _naive_focal_bce(np_, z, y, gamma=2.0, alpha=0.25):  # torchvision's formula, by hand
    p = 1 / (1 + np.exp(-z))
    ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    pt = p * y + (1 - p) * (1 - y)
    at = alpha * y + (1 - alpha) * (1 - y)
    loss = np.mean(at * (1 - pt) ** gamma * ce)
    d = at * ((1 - pt) ** gamma * (p - y)
              + gamma * (1 - pt) ** (gamma - 1) * (1 - 2 * y) * p * (1 - p) * ce)
    return loss, d / z.size


def _naive_focal_cce(np_, z, t, gamma=2.0):  # CATALOGUE.md's gradient, written as it reads
    q = _softmax(z)
    c = np.zeros_like(z)
    c[np.arange(z.shape[0]), t] = 1
    loss = -np.sum(c * (1 - q) ** gamma * np.log(q)) / z.shape[0]
    g = c * (gamma * (1 - q) ** (gamma - 1) * np.log(q) - (1 - q) ** gamma / q)
    grad = g * q - q * np.sum(g * q, axis=1, keepdims=True)
    return loss, grad / z.shape[0]


def _naive_z_loss(np_, z, t, zl=1e-4):
    q = _softmax(z)
    rows = np.arange(z.shape[0])
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    loss = np.mean(-np.log(q[rows, t]) + zl * lse**2)
    grad = q.copy()
    grad[rows, t] -= 1
    return loss, (grad + 2 * zl * lse[:, None] * q) / z.shape[0]


def _naive_distill(np_, z, v, T=2.0):  # teacher logits
    q, t = _softmax(z / T), _softmax(v / T)
    loss = T * T * np.sum(t * (np.log(t) - np.log(q))) / z.shape[0]
    return loss, T * (q - t) / z.shape[0]


def _torch_focal_bce(F, x, y):
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    pt = p * y + (1 - p) * (1 - y)
    return ((0.25 * y + 0.75 * (1 - y)) * (1 - pt) ** 2 * ce).mean()


def _torch_focal_cce(F, x, t):
    log_q = F.log_softmax(x, dim=1)
    return F.nll_loss((1 - log_q.exp()) ** 2 * log_q, t)


def _torch_z_loss(F, x, t):
    return F.cross_entropy(x, t) + 1e-4 * (x.logsumexp(dim=1) ** 2).mean()


def _torch_distill(F, x, v):
    return 4 * F.kl_div(F.log_softmax(x / 2, dim=1), F.softmax(v / 2, dim=1),
                        reduction="batchmean")


VARIANTS = {  # name: (loss, options, naive, torch formula, target logits)
    "bce_with_logits+focal": ("bce_with_logits", {"focal_gamma": 2.0, "focal_alpha": 0.25},
                              _naive_focal_bce, _torch_focal_bce, False),
    "cce_with_logits+focal": ("cce_with_logits", {"focal_gamma": 2.0}, _naive_focal_cce,
                              _torch_focal_cce, False),
    "cce_with_logits+z_loss": ("cce_with_logits", {"z_loss": 1e-4}, _naive_z_loss,
                               _torch_z_loss, False),
    "kl_div_with_logits+T2": ("kl_div_with_logits", {"temperature": 2.0, "target_logits": True},
                              _naive_distill, _torch_distill, True),
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


def interleaved_us(fns: dict, rounds: int) -> dict:
    """interleaved_ms in microseconds, without its own warm-up: the small-batch timer."""
    return {name: 1e3 * ms for name, ms in interleaved_ms(fns, rounds, warmup=0).items()}


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
    ap.add_argument("--quick", action="store_true",
                    help="5 rounds instead of --repeat, and a short small-batch sweep")
    ap.add_argument("--no-variants", dest="variants", action="store_false",
                    help="skip the option variants (focal, z-loss, distillation at T = 2)")
    _bench_small.add_args(ap)
    _bench_io.add_common_args(ap, "cpu", gl.LOSSES)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 5

    torch, torch_run = torch_fns()
    # first, while torch has its default threads: what a training script gets
    small = _bench_small.run(args, interleaved_us, "time.perf_counter per call", np, torch,
                             None if torch is None else torch.from_numpy, "cpu",
                             _bench_io.progress)
    result = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores)",
        "cpu": _cpu_name(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "gpuloss": gl.__version__,
        "date": dt.date.today().isoformat(),
    }
    stem = f"{_slug(_cpu_name())}-{os.cpu_count()}core-{result['date']}.json"
    if args.small_batch_only:
        result.update(rows=[], **small)

        def table():
            print("\n".join(_bench_small.summary_lines(small.get("small_batch"),
                                                       small.get("training_step"))))

        path = _bench_io.output_path(args.out, f"cpu-small-batch-{stem}")
        _bench_io.finish(result, path, args.json, table)
        return 0

    if torch is not None:
        torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth(args.repeat)
    rows = []
    cases = [(loss, loss, {}, None, None, False) for loss in args.losses]
    cases += [(name, loss, opts, naive, peer, logits)
              for name, (loss, opts, naive, peer, logits) in VARIANTS.items()
              if loss in args.losses and args.variants]
    for name, loss, opts, naive_fn, peer, target_logits in cases:
        fn = gl.LOSSES[loss]
        p, y, floor_bytes = inputs(fn, rng)
        if target_logits:  # the teacher's logits instead of its probabilities
            y = (2 * rng.standard_normal(p.shape)).astype(p.dtype)
        naive_fn = naive_fn or fn.naive
        contenders = {
            "ours": lambda: fn.value_and_grad(p, y, **opts),
            "naive": lambda: naive_fn(np, p, y),
        }
        peer = peer or fn.torch_peer
        with_torch = torch is not None and peer is not None
        if with_torch:
            tp, ty = torch.from_numpy(p), torch.from_numpy(y)
            contenders["torch"] = lambda: torch_run(peer, tp, ty)
            # the same loss through gpuloss on the tensors: forward + loss.backward()
            contenders["ours_autograd"] = lambda: torch_run(
                lambda F, x, t: fn(x, t, **opts), tp, ty)
        ms = interleaved_ms(contenders, args.repeat)
        ours, naive = ms["ours"], ms["naive"]
        row = {
            "loss": name,
            "options": opts,
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
            row["autograd_ms"] = round(ms["ours_autograd"], 3)  # gl.<loss>(x, t).backward()
            row["autograd_speedup_vs_torch"] = round(row["torch_ms"] / ms["ours_autograd"], 2)
        rows.append(row)
        _bench_io.progress(row)

    # accuracy bar: float32 mse at n = 10^7 against float64
    a = rng.standard_normal(10_000_000, dtype=np.float32)
    b = rng.standard_normal(10_000_000, dtype=np.float32)
    exact = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    mse_rel_err = abs(float(gl.mse(a, b)) - exact) / exact

    result.update({
        "copy_GBps": round(bandwidth / 1e9, 2),
        "mse_float32_1e7_rel_err": mse_rel_err,
        "torch_threads": None if torch is None else torch.get_num_threads(),
        "rows": rows,
        **small,
    })

    def table():
        print(f"copy bandwidth {result['copy_GBps']} GB/s; mse float32 n=1e7 rel. error "
              f"{mse_rel_err:.2e}")
        print(f"{'loss':24s} {'ms':>8s} {'floor':>7s} {'frac':>5s} {'naive':>8s} {'x':>5s} "
              f"{'torch':>8s} {'x':>5s} {'autograd':>8s} {'x':>5s}")
        for r in rows:
            print(f"{r['loss']:24s} {r['ms']:8.2f} {r['floor_ms']:7.2f} "
                  f"{r['fraction_of_floor']:5.2f} {r['naive_numpy_ms']:8.2f} "
                  f"{r['speedup_vs_naive']:5.1f} {r.get('torch_ms', float('nan')):8.2f} "
                  f"{r.get('speedup_vs_torch', float('nan')):5.1f} "
                  f"{r.get('autograd_ms', float('nan')):8.2f} "
                  f"{r.get('autograd_speedup_vs_torch', float('nan')):5.1f}")
        for line in _bench_small.summary_lines(small.get("small_batch"),
                                               small.get("training_step")):
            print(line)

    _bench_io.finish(result, _bench_io.output_path(args.out, f"cpu-{stem}"), args.json, table)
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
