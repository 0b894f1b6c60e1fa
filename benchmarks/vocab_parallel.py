"""gpuloss.distributed on CPU: a vocabulary split over 4 gloo processes on this machine.

    python benchmarks/vocab_parallel.py [--world 4] [--tokens 2048] [--vocab 32768] [--out F]

Each rank holds (tokens × vocab / world) float32 logits. Timed, interleaved in rounds on
every rank at once (a barrier before each call; the slowest rank's time counts):
- `cce_with_logits` forward + backward, the default mode (a layout check, a MAX and a SUM
  all-reduce);
- the same with ``deterministic=True`` (one all-reduce of every block's state);
- the same with ``validate=False`` and ``vocab_start`` (the two exchanges alone);
- `linear_cross_entropy` forward + backward, default and deterministic, hidden 256;
and, in rank 0 alone for scale, the single-process `gpuloss.cce_with_logits.value_and_grad`
of the whole (tokens × vocab) logits. Medians after a warm-up; the issue's bar: the
deterministic mode ≤ 1.3× the default's time at 4 processes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rank_main(rank, world, store, args, out):
    import numpy as np
    import torch
    import torch.distributed as dist

    import gpuloss as gl
    import gpuloss.distributed as gld

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    N, V, Hd = args.tokens, args.vocab, args.hidden
    width = V // world
    start = rank * width
    g = torch.Generator().manual_seed(0)
    z_full = torch.randn(N, V, generator=g) * 3
    y = torch.randint(0, V, (N,), generator=g)
    h = torch.randn(N, Hd, generator=g)
    W_full = torch.randn(V, Hd, generator=g) / Hd**0.5
    z = z_full[:, start:start + width].contiguous()
    W = W_full[start:start + width].contiguous()
    del z_full, W_full

    z.requires_grad_(True)
    h.requires_grad_(True)
    W.requires_grad_(True)

    def cce(**kw):
        z.grad = None
        loss = gld.cce_with_logits(z, y, **kw)
        loss.backward()
        return loss

    def linear(**kw):
        h.grad = W.grad = None
        loss = gld.linear_cross_entropy(h, W, y, **kw)
        loss.backward()
        return loss

    contenders = {
        "cce default": lambda: cce(),
        "cce deterministic": lambda: cce(deterministic=True),
        "cce validate=False, vocab_start given": lambda: cce(validate=False,
                                                             vocab_start=start),
        "linear default": lambda: linear(),
        "linear deterministic": lambda: linear(deterministic=True),
    }
    times = {k: [] for k in contenders}
    for rnd in range(args.rounds + 1):
        for name, fn in contenders.items():
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the slowest rank's time
            if rnd:
                times[name].append(float(dt))
    single = None
    if rank == 0:  # the whole logits in one process, for scale (not interleaved)
        zz = np.random.default_rng(0).standard_normal((N, V)).astype(np.float32) * 3
        yy = y.numpy()
        ts = []
        for _ in range(args.rounds + 1):
            t0 = time.perf_counter()
            gl.cce_with_logits.value_and_grad(zz, yy)
            ts.append(time.perf_counter() - t0)
        single = statistics.median(ts[1:])
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times, "single": single}, f)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--raw", default=None)
    args = p.parse_args()
    if args.rank is not None:
        _rank_main(args.rank, args.world, args.store, args, args.raw)
        return
    tmp = Path(tempfile.mkdtemp())
    raw = tmp / "raw.json"
    cmd = [sys.executable, __file__, "--world", str(args.world), "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--rounds",
           str(args.rounds), "--store", str(tmp / "store"), "--raw", str(raw)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], env=env) for r in range(args.world)]
    for q in procs:
        if q.wait() != 0:
            raise SystemExit("a rank failed")
    data = json.loads(raw.read_text())
    med = {k: statistics.median(v) for k, v in data["times"].items()}
    rows = []
    for name, t in med.items():
        base = med["cce default"] if name.startswith("cce") else med["linear default"]
        rows.append({"contender": name, "median_s": t, "x_default": t / base,
                     "samples_s": data["times"][name]})
        print(f"{name:42s} {t * 1e3:9.1f} ms   {t / base:5.2f}× default")
    print(f"{'one process, whole logits (NumPy)':42s} {data['single'] * 1e3:9.1f} ms")
    cpu = platform.processor() or platform.machine()
    result = {
        "benchmark": "gpuloss.distributed on gloo, forward + backward, float32",
        "machine": f"{os.cpu_count()}-core VM ({cpu}), CPU only",
        "date": datetime.date.today().isoformat(),
        "world": args.world, "tokens": args.tokens, "vocab": args.vocab,
        "hidden": args.hidden, "rounds": args.rounds,
        "note": ("each rank one thread; times are the slowest rank's per call, medians over "
                 "rounds after a warm-up, contenders interleaved in every round; the ranks "
                 "share the machine's cores"),
        "rows": rows,
        "single_process_numpy_value_and_grad_s": data["single"],
        "bytes_per_token": {
            "default": 8 + 7 * 8,
            "deterministic": 8 * 8 * -(-args.vocab // 1024),
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
