"""Dask benchmark: cce_with_logits.value_and_grad on logits whose class axis is split into
chunks, on a two-process LocalCluster, with the class chunks never joined (gpuloss._dask's
split-class path) and, for comparison, joined first (the old path: a rechunk to one class
chunk). Measures each worker's peak memory above its baseline and the wall time, and writes
benchmarks/results/dask-vocab-localcluster-<machine>-<date>.json.

    python benchmarks/dask_vocab.py [--rows 4096] [--classes 131072] [--class-chunk 8192]
                                    [--repeat 3] [--no-old] [--out PATH] [--note TEXT]

The logits (float32, random; chunk (i, j) on worker j mod 2) and the class indices are made
and persisted on the workers first: they are the data a model would hand over. Two clusters
run in turn, with distributed's default work stealing and without it. A worker's baseline
is its RSS then, idle (gpuloss imported, after a garbage collection and malloc_trim); its
peak is its VmHWM (the kernel's high-water mark of the RSS, reset through
/proc/self/clear_refs just before the computation), so no short spike is missed. The
gradient is consumed where each chunk lies: the result asked for is [Σ g, Σ g²] of each
chunk (float64), computed in the chunk's own task; the old path's numbers must agree.

The bar (issue 28): each worker's peak ≤ its baseline + 2 blocks, a block being one
(row chunk × class chunk) chunk of logits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

MiB = 1 << 20


def _reset():
    """On a worker: collect, give freed memory back, reset the high-water mark; its RSS."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status()["VmRSS"]


def _status():
    """On a worker: VmRSS and VmHWM in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value, _ = line.split()
                out[key.rstrip(":")] = int(value) * 1024
    return out


def _warm():
    """On a worker: import what the tasks run (its memory belongs to the baseline)."""
    import array_api_compat.numpy  # noqa: F401

    import gpuloss  # noqa: F401
    from gpuloss import _dask, _shards  # noqa: F401


def _held(dask_worker):
    """On a worker: the bytes of the results it holds (its chunks of the logits, and any
    copy of another worker's chunk it was sent to run a task)."""
    return sum(getattr(v, "nbytes", 0) for v in dask_worker.data.values())


def measure(client, make, label):
    """Run `make()` (the lazy results) on the cluster; per-worker baseline and peak."""
    baseline = client.run(_reset)
    start = time.perf_counter()
    results = client.compute(make(), sync=True)
    wall = time.perf_counter() - start
    status = client.run(_status)
    held = client.run(_held)
    workers = {
        addr: {"data_held_after_MiB": round(held[addr] / MiB, 1),
               "baseline_MiB": round(baseline[addr] / MiB, 1),
               "peak_MiB": round(status[addr]["VmHWM"] / MiB, 1),
               "peak_above_baseline_MiB": round((status[addr]["VmHWM"] - baseline[addr]) / MiB,
                                                1)}
        for addr in baseline
    }
    print(f"{label}: {wall:.1f} s, " + ", ".join(
        f"+{w['peak_above_baseline_MiB']:.0f} MiB" for w in workers.values()))
    return results, wall, workers


def _stats(block):
    """One gradient chunk's float64 [Σ g, Σ g²], where it lies (in slices: no float64 copy
    of the chunk)."""
    flat = block.reshape(-1)
    total = squares = 0.0
    for i in range(0, flat.size, 1 << 20):
        x = flat[i:i + (1 << 20)].astype(np.float64)
        total += float(np.sum(x))
        squares += float(np.dot(x, x))
    return np.array([[total, squares]])


def _checksums(g):
    """[Σ g, Σ g²] of each chunk of the gradient (one task per chunk, fused with the chunk's
    own gradient task: the gradient is never gathered)."""
    return g.map_blocks(_stats, dtype=np.float64,
                        chunks=((1,) * g.numblocks[0], (2,) * g.numblocks[1]))


def _chunk(seed, rows, cols):
    return np.random.default_rng(seed).standard_normal((rows, cols), dtype=np.float32)


def _logits(client, N, K, rc, kc):
    """Random float32 logits persisted on the workers, chunk (i, j) on worker j mod 2 (as
    even as can be: an uneven split makes the scheduler move chunks to balance the load)."""
    import dask
    import dask.array as da
    import distributed

    addrs = sorted(client.scheduler_info()["workers"])
    rows = [min(rc, N - i) for i in range(0, N, rc)]
    cols = [min(kc, K - j) for j in range(0, K, kc)]
    futures = [[client.submit(_chunk, i * len(cols) + j, r, c, workers=[addrs[j % len(addrs)]],
                              allow_other_workers=False, pure=False)
                for j, c in enumerate(cols)] for i, r in enumerate(rows)]
    distributed.wait([f for row in futures for f in row])
    Z = da.block([[da.from_delayed(dask.delayed(f), (r, c), np.float32)
                   for f, c in zip(row, cols)] for row, r in zip(futures, rows)])
    Z = client.persist(Z)
    distributed.wait(Z)
    del futures
    return Z


def run_config(args, stealing, old):
    """One cluster: persist the data, run the split path `args.repeat` times, and the old
    path once if `old`."""
    import dask
    import dask.array as da
    import distributed

    import gpuloss as gl

    N, K = args.rows, args.classes
    rc, kc = args.row_chunk or N, args.class_chunk
    with dask.config.set({"distributed.worker.memory.target": False,
                          "distributed.worker.memory.spill": False,
                          "distributed.worker.memory.pause": False,
                          "distributed.worker.memory.terminate": False,
                          "distributed.scheduler.work-stealing": stealing}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        client.run(_warm)
        bare = client.run(_reset)  # the workers before any data
        Z = _logits(client, N, K, rc, kc)
        T = client.persist(da.random.default_rng(1).integers(0, K, N, chunks=rc))
        distributed.wait(T)
        held = client.run(_held)

        def new():
            v, g = gl.cce_with_logits.value_and_grad(Z, T)
            return [v, _checksums(g)]

        runs = [measure(client, new, f"split classes (work stealing {stealing})")
                for _ in range(args.repeat)]
        v_new, sums_new = runs[0][0]
        sums_new = sums_new.reshape(-1, 2).sum(axis=0)
        out = {
            "work_stealing": stealing,
            "bare_worker_MiB": {a: round(b / MiB, 1) for a, b in bare.items()},
            "data_held_per_worker_MiB": {a: round(b / MiB, 1) for a, b in held.items()},
            "split": {
                "runs": [{"wall_s": round(wall, 2), "workers": mem} for _, wall, mem in runs],
                "value": float(v_new), "grad_sum": float(sums_new[0]),
                "grad_sum_of_squares": float(sums_new[1])},
        }
        if old:
            def joined():
                v, g = gl.cce_with_logits.value_and_grad(Z.rechunk({1: -1}), T)
                return [v, _checksums(g)]

            (v_old, sums_old), wall_old, mem_old = measure(client, joined, "joined (old)")
            sums_old = sums_old.reshape(-1, 2).sum(axis=0)
            out["old_joined"] = {"wall_s": round(wall_old, 2), "workers": mem_old,
                                 "value": float(v_old), "grad_sum": float(sums_old[0]),
                                 "grad_sum_of_squares": float(sums_old[1])}
            # the two paths agree (to float32 rounding)
            assert abs(float(v_old) - float(v_new)) <= 1e-5 * abs(float(v_old))
            assert abs(sums_old[1] - sums_new[1]) <= 1e-4 * sums_old[1]
        return out
    finally:
        client.close()
        cluster.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=131072)
    ap.add_argument("--row-chunk", type=int, default=None, help="default: every row")
    ap.add_argument("--class-chunk", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the split path")
    ap.add_argument("--no-old", action="store_true", help="skip the old (joined) path")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--note", default="", help="a remark stored with the results")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()  # the VM is shared: how busy it was

    import dask
    import distributed

    import gpuloss as gl
    from gpuloss import _dask

    N, K = args.rows, args.classes
    rc, kc = args.row_chunk or N, args.class_chunk
    block_bytes = rc * kc * 4
    start = time.perf_counter()
    # distributed's default (work stealing on), then without it: the scheduler then moves a
    # chunk only when it places a task, never to balance the load afterwards
    configs = [run_config(args, True, not args.no_old), run_config(args, False, False)]
    bar = 2 * block_bytes / MiB
    for c in configs:
        peaks = [w["peak_above_baseline_MiB"] for run in c["split"]["runs"]
                 for w in run["workers"].values()]
        c["split"]["max_peak_above_baseline_MiB"] = max(peaks)
        c["split"]["peak_above_baseline_blocks"] = [round(p * MiB / block_bytes, 2)
                                                   for p in peaks]
        c["split"]["bar_met"] = all(p <= bar for p in peaks)
        if "old_joined" in c:
            c["old_joined"]["peak_above_baseline_blocks"] = [
                round(w["peak_above_baseline_MiB"] * MiB / block_bytes, 2)
                for w in c["old_joined"]["workers"].values()]
    result = {
        "benchmark": "dask cce_with_logits.value_and_grad, class axis split over chunks",
        "command": "python benchmarks/dask_vocab.py " + " ".join(sys.argv[1:] if argv is None
                                                                  else argv),
        "machine": f"{_cpu()}, {os.cpu_count()} cores (a shared VM)",
        "date": dt.date.today().isoformat(),
        "versions": {"numpy": np.__version__, "dask": dask.__version__,
                     "distributed": distributed.__version__, "gpuloss": gl.__version__},
        "cluster": "LocalCluster(n_workers=2, threads_per_worker=1, processes=True), "
                   "spilling and pausing off",
        "load_average_at_start": [round(x, 2) for x in load0],
        "total_s": round(time.perf_counter() - start, 1),
        "shape": [N, K], "dtype": "float32", "targets": "class indices (int64)",
        "chunks": [rc, kc], "class_chunks": -(-K // kc), "row_chunks": -(-N // rc),
        "placement": "chunk (i, j) persisted on worker j mod 2",
        "class_block": _dask.CLASS_BLOCK, "class_blocks": -(-K // _dask.CLASS_BLOCK),
        "block_bytes": block_bytes, "block_MiB": block_bytes / MiB,
        "states_MiB_per_chunk": rc * -(-kc // _dask.CLASS_BLOCK) * 64 / MiB,
        "bar": "peak per worker <= baseline + 2 blocks",
        "bar_MiB": bar,
        "configs": configs,
        "note": args.note,
    }
    out = args.out or (Path(__file__).parent / "results" /
                       f"dask-vocab-localcluster-{_machine()}-{result['date']}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _cpu():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")), platform.processor() or "cpu")


def _machine():
    return "-".join(_cpu().lower().split()) + f"-{os.cpu_count()}core"


if __name__ == "__main__":
    main()
