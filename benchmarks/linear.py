"""Linear cross-entropy on the CPU: forward + backward against the floor (the three GEMMs
alone) and PyTorch's F.linear_cross_entropy, and the peak memory of each.

    python benchmarks/linear.py                      # 4,096 tokens × H 1,024 × V 32,768
    python benchmarks/linear.py --tokens 512 --rounds 2   # a quick look
    python benchmarks/linear.py --device cuda        # 8,192 × 4,096 × 128,256 bf16 on a GPU
    python benchmarks/linear.py --predict-only       # the GPU prediction, no GPU needed

Times: the contenders run interleaved, one call each per round, medians over the rounds after
one warm-up round (the machine is shared: ratios measured side by side are what counts).
Memory: each contender runs twice in a fresh process; the second call's peak resident memory
(VmHWM, reset with /proc/self/clear_refs just before it) minus the resident memory just
before it, minus the gradients it returns, is the memory it needed above inputs and
gradients (the first call's results are kept, so the second allocates its own; the floor
with preallocated outputs allocates nothing, its logits are made beforehand).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

CONTENDERS = ("floor_gemms_out", "floor_gemms", "gpuloss_numpy", "gpuloss_torch",
              "torch_reference", "torch_chunked")
DESCRIPTION = {
    "floor_gemms_out": "np.matmul × 3 into preallocated outputs (logits, d_hidden, d_weight)",
    "floor_gemms": "np.matmul × 3, fresh outputs (z = h @ W.T; z @ W; z.T @ h)",
    "gpuloss_numpy": "gl.linear_cross_entropy.value_and_grad on NumPy arrays",
    "gpuloss_torch": "gl.linear_cross_entropy on torch tensors, loss.backward()",
    "torch_reference": "F.linear_cross_entropy(options=None) (holds the logits), backward",
    "torch_chunked": "F.linear_cross_entropy(options=LinearCrossEntropyOptions()), backward",
}


def inputs(tokens, hidden, vocab):
    rng = np.random.default_rng(0)
    h = rng.standard_normal((tokens, hidden), dtype=np.float32)
    W = rng.standard_normal((vocab, hidden), dtype=np.float32) * np.float32(hidden ** -0.5)
    t = rng.integers(0, vocab, tokens)
    return h, W, t


def make(name, h, W, t, chunk_mb):
    """A function that runs one forward + backward of `name`, returning the gradients."""
    if name.startswith("floor"):
        out = name == "floor_gemms_out"
        Z = np.empty((h.shape[0], W.shape[0]), np.float32) if out else None
        DH = np.empty_like(h) if out else None
        DW = np.empty_like(W) if out else None

        def floor():
            if out:
                np.matmul(h, W.T, out=Z)
                np.matmul(Z, W, out=DH)
                np.matmul(Z.T, h, out=DW)
                return [DH, DW]
            z = h @ W.T
            return [z @ W, z.T @ h]

        return floor
    if name == "gpuloss_numpy":
        import gpuloss as gl

        def ours():
            _, grads = gl.linear_cross_entropy.value_and_grad(h, W, t, chunk_mb=chunk_mb)
            return list(grads)

        return ours
    import torch

    F = torch.nn.functional
    tt = torch.from_numpy(t)

    def torch_fn(call):
        def run():
            ht = torch.from_numpy(h).requires_grad_()
            Wt = torch.from_numpy(W).requires_grad_()
            call(ht, Wt).backward()
            return [ht.grad, Wt.grad]

        return run

    if name == "gpuloss_torch":
        import gpuloss as gl

        return torch_fn(lambda ht, Wt: gl.linear_cross_entropy(ht, Wt, tt, chunk_mb=chunk_mb))
    if name == "torch_reference":
        return torch_fn(lambda ht, Wt: F.linear_cross_entropy(ht, Wt, tt))
    options = torch.nn.LinearCrossEntropyOptions()
    return torch_fn(lambda ht, Wt: F.linear_cross_entropy(ht, Wt, tt, options=options))


def _write(result: dict, folder: str, name: str) -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(name, tokens, hidden, vocab, chunk_mb) -> dict:
    """(in a fresh process) one call's peak memory above inputs and gradients."""
    h, W, t = inputs(tokens, hidden, vocab)
    fn = make(name, h, W, t, chunk_mb)
    # a first call warms libraries, thread pools and scratch; its results are kept, so that
    # the measured second call allocates its gradients afresh (not from a pool)
    first = fn()  # noqa: F841
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts here
    before = _status_bytes("VmRSS")
    tracemalloc.start()  # what Python and NumPy allocate (not BLAS's or PyTorch's own memory)
    grads = sum(g.nbytes for g in fn())
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = _status_bytes("VmHWM")
    return {"extra_mb": (peak - before - grads) / 2**20,
            "tracemalloc_extra_mb": (traced_peak - grads) / 2**20 if name in (
                "floor_gemms", "gpuloss_numpy") else None,  # (the others' memory is not NumPy's)
            "gradients_mb": grads / 2**20}


LIGER_PUBLISHED_MS = 82.0  # Liger-Kernel's Triton version, H100 bf16, 8,192 × 4,096 × 128,256


def gpu_main(args, chunk_mb) -> int:
    """The same contenders on a CUDA device, in the inputs' 16-bit dtype: the floor is
    cuBLAS's three GEMMs (torch.matmul into preallocated outputs). CUDA events around each
    call; memory from PyTorch's allocator (peak above inputs and gradients; the row kernel's
    few bytes of CuPy partials are not in it)."""
    import torch

    import gpuloss as gl
    from gpuloss import _roofline
    from gpuloss._bench_cpu import _slug

    F = torch.nn.functional
    dtype = getattr(torch, args.dtype)
    N, H, V = args.tokens, args.hidden, args.vocab
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=dtype, generator=gen)
    W = torch.randn(V, H, device="cuda", dtype=dtype, generator=gen) * H ** -0.5
    t = torch.randint(0, V, (N,), device="cuda", generator=gen)
    Z = torch.empty(N, V, device="cuda", dtype=dtype)
    DH, DW = torch.empty_like(h), torch.empty_like(W)

    def floor():
        torch.matmul(h, W.T, out=Z)
        torch.matmul(Z, W, out=DH)
        torch.matmul(Z.T, h, out=DW)
        return 0

    def autograd(call):
        def run():
            ht, Wt = h.detach().requires_grad_(), W.detach().requires_grad_()
            call(ht, Wt).backward()
            return ht.grad.nbytes + Wt.grad.nbytes
        return run

    options = torch.nn.LinearCrossEntropyOptions()
    fns = {
        "floor_gemms_out": floor,
        "gpuloss_torch": autograd(lambda a, b: gl.linear_cross_entropy(a, b, t,
                                                                        chunk_mb=chunk_mb)),
        "torch_eager": autograd(lambda a, b: F.cross_entropy(a @ b.T, t)),
        "torch_reference": autograd(lambda a, b: F.linear_cross_entropy(a, b, t)),
        "torch_chunked": autograd(lambda a, b: F.linear_cross_entropy(a, b, t,
                                                                      options=options)),
    }
    times = {name: [] for name in fns}
    memory = {}
    for round_ in range(args.rounds + 1):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            grads = fn()
            stop.record()
            torch.cuda.synchronize()
            if round_:
                times[name].append(start.elapsed_time(stop))
            else:  # the warm-up round measures the memory
                memory[name] = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
        print(f"round {round_}: " + ", ".join(f"{n} {times[n][-1]:.1f} ms" for n in fns
                                              if times[n]), file=sys.stderr, flush=True)
    device = torch.cuda.get_device_name()
    card = _roofline.card_for(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows = max(1, int(chunk_mb * 2**20 // (V * itemsize)))
    prediction = _roofline.linear_cross_entropy(N, H, V, itemsize, card, chunk_rows=rows)
    median = {name: statistics.median(v) for name, v in times.items()}
    rows_out = [{"contender": name, "median_ms": round(median[name], 3),
                 "times_ms": [round(x, 3) for x in times[name]],
                 "vs_floor": round(median[name] / median["floor_gemms_out"], 3),
                 "extra_memory_mb": round(memory[name], 1)} for name in fns]
    rows_out[1]["predicted_ms"] = round(prediction["predicted_ms"], 2)
    rows_out[0]["predicted_ms"] = round(prediction["floor_ms"], 2)
    result = {
        "benchmark": f"linear cross-entropy, {args.dtype}, forward + backward, GPU",
        "device": device, "shape": {"tokens": N, "hidden": H, "vocab": V},
        "chunk_mb": chunk_mb, "torch": torch.__version__, "gpuloss": gl.__version__,
        "date": dt.date.today().isoformat(), "prediction": prediction,
        "liger_published_ms": LIGER_PUBLISHED_MS,
        "method": "interleaved rounds, CUDA events, medians after one warm-up round (which "
                  "measures the peak allocated memory above inputs and gradients)",
        "rows": rows_out,
    }
    path = _write(result, args.out, f"linear-gpu-{_slug(device)}-{result['date']}.json")
    for r in rows_out:
        print(f"{r['contender']:<18}{r['median_ms']:>10.2f} ms{r['vs_floor']:>8.3f}×"
              f"{r['extra_memory_mb']:>10.1f} MB  predicted {r.get('predicted_ms', '')}")
    print(f"wrote {path}")
    return 0


def predict_only(args, chunk_mb) -> int:
    """The GPU prediction alone (no GPU needed), for H100 SXM and H200."""
    from gpuloss import _roofline

    itemsize = 2 if args.dtype in ("bfloat16", "float16") else 4
    rows = max(1, int(chunk_mb * 2**20 // (args.vocab * itemsize)))
    out = {name: _roofline.linear_cross_entropy(args.tokens, args.hidden, args.vocab,
                                                 itemsize, card, chunk_rows=rows)
           for name, card in _roofline.CARDS.items()}
    print(json.dumps({"dtype": args.dtype, "chunk_mb": chunk_mb, "predictions": out,
                      "liger_published_ms": LIGER_PUBLISHED_MS}, indent=1))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunk-mb", type=float, default=None,
                    help="gpuloss's chunk budget (default: its default)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the GPU benchmark (defaults 8,192 × 4,096 × 128,256, bfloat16)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="GPU inputs' dtype (default bfloat16; the CPU benchmark is float32)")
    ap.add_argument("--predict-only", action="store_true",
                    help="print the GPU prediction for H100 SXM and H200 (no GPU needed)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import gpuloss as gl
    from gpuloss._linear import DEFAULT_CHUNK_MB

    chunk_mb = args.chunk_mb or DEFAULT_CHUNK_MB
    if args.device == "cuda" or args.predict_only:
        explicit = argv if argv is not None else sys.argv[1:]
        for flag, name, value in (("--tokens", "tokens", 8192), ("--hidden", "hidden", 4096),
                                  ("--vocab", "vocab", 128256)):
            if flag not in explicit:
                setattr(args, name, value)
        args.dtype = args.dtype or "bfloat16"
        return predict_only(args, chunk_mb) if args.predict_only else gpu_main(args, chunk_mb)
    shape = (args.tokens, args.hidden, args.vocab)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, *shape, chunk_mb)))
        return 0

    h, W, t = inputs(*shape)
    fns = {name: make(name, h, W, t, chunk_mb) for name in CONTENDERS}
    times = {name: [] for name in CONTENDERS}
    for round_ in range(args.rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
        print(f"round {round_}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in CONTENDERS
                                              if times[n]), file=sys.stderr, flush=True)
    del fns
    memory = {}
    for name in CONTENDERS:
        out = subprocess.run([sys.executable, __file__, "--memory-child", name,
                              "--tokens", str(args.tokens), "--hidden", str(args.hidden),
                              "--vocab", str(args.vocab), "--chunk-mb", str(chunk_mb)],
                             capture_output=True, text=True, check=True)
        memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"memory {name}: {memory[name]}", file=sys.stderr, flush=True)

    import torch

    from gpuloss._bench_cpu import _cpu_name, _slug

    median = {name: statistics.median(v) for name, v in times.items()}
    floor = median["floor_gemms_out"]
    rows = [{"contender": name, "what": DESCRIPTION[name], "median_s": round(median[name], 4),
             "times_s": [round(x, 4) for x in times[name]],
             "vs_floor": round(median[name] / floor, 3),
             "extra_memory_mb": None if name == "floor_gemms_out"  # (its outputs are made
             else round(memory[name]["extra_mb"], 1),  # beforehand: nothing to measure)
             "extra_memory_tracemalloc_mb": None if memory[name]["tracemalloc_extra_mb"] is None
             else round(memory[name]["tracemalloc_extra_mb"], 1)} for name in CONTENDERS]
    result = {
        "benchmark": "linear cross-entropy, float32, forward + backward, CPU",
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab},
        "chunk_mb": chunk_mb,
        "logits_mb": args.tokens * args.vocab * 4 / 2**20,
        "cpu": _cpu_name(), "cores": os.cpu_count(), "numpy": np.__version__,
        "torch": torch.__version__, "gpuloss": gl.__version__,
        "date": dt.date.today().isoformat(),
        "method": "interleaved rounds, medians after one warm-up round; memory: the second "
                  "call in a fresh process, its peak RSS above inputs and gradients and, for "
                  "NumPy contenders, tracemalloc's peak above the gradients",
        "rows": rows,
    }
    path = _write(result, args.out,
                  f"linear-cpu-{_slug(_cpu_name())}-{os.cpu_count()}core-{result['date']}.json")
    print(f"{'contender':<18}{'median s':>10}{'× floor':>9}{'extra MB':>10}{'traced MB':>11}")
    for r in rows:
        traced = r["extra_memory_tracemalloc_mb"]
        extra = r["extra_memory_mb"]
        print(f"{r['contender']:<18}{r['median_s']:>10.3f}{r['vs_floor']:>9.3f}"
              f"{'' if extra is None else f'{extra:.1f}':>10}"
              f"{'' if traced is None else f'{traced:.1f}':>11}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
