"""GPU benchmark: gpuloss value_and_grad vs naive CuPy vs PyTorch eager (and torch.compile)
vs the memory-bandwidth floor, timed with CUDA events, medians after warm-up, inputs rotated
so that caches don't flatter. Run as `gpuloss bench` on a GPU machine, or
`python benchmarks/gpu.py [--out benchmarks/results] [--torch-compile] [--quick]`; writes
<out>/gpu-<card>-<date>.json and prints a table.

Per case: gpuloss on CuPy arrays (`ms`), the floor, naive CuPy, torch's own loss forward +
backward (`torch_ms`) and gpuloss through autograd on the same torch tensors,
`gl.<loss>(x, y).backward()` (`torch_autograd_ms`); float32, float16 and bfloat16 (bfloat16
where CuPy has it: CuPy 14 with ml_dtypes). Then the large-vocabulary cross-entropy,
(N, K) = (16384, 131072) in bfloat16 and float32 (where memory allows), through autograd
against torch eager and torch.compile, with peak memory next to time.

Then the small batches (gpuloss/_bench_small.py): time per call from 2^8 to 2^24 elements
against PyTorch on CUDA tensors, and an MLP's training step (`--small-batch-only` runs only
these and writes gpu-small-batch-<card>-<date>.json).

Every row carries the roofline's prediction for this card (gpuloss/_roofline.py):
`predicted_ms` beside the measured time, `predicted_card`, `predicted_bytes`; the sweep's
points on arrays `predicted_us`. `--predict-only` needs no GPU: it writes the predictions of
every row for H100 SXM and H200 to gpu-prediction-h100-h200-<date>.json and prints them as a
Markdown table.
"""

from __future__ import annotations

import datetime as dt
import functools
import statistics
from pathlib import Path

import numpy as np

import gpuloss as gl
from gpuloss import _bench_io, _bench_small, _roofline
from gpuloss._examples import default_rules, example_inputs
from gpuloss.backends import cuda as _cuda_backend

ELEMENTWISE_SIZES = (1 << 26, 1 << 12)
ROW_SHAPES = ((1 << 22, 10), (65536, 1024), (8192, 32768), (4096, 131072))
LARGE_VOCAB = (16384, 131072)  # a language model's output layer: rows x vocabulary
# kernel-resources-*.json (registers per kernel) beside the source tree, for the occupancy
RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _dtype(name):
    """NumPy dtype from its name; "bfloat16" is ml_dtypes' (the one CuPy 14 knows)."""
    return _cuda_backend.BF16 if name == "bfloat16" else np.dtype(name)


def time_ms(cp, fn, inputs, warmup=3, repeat=15):
    """Median of CUDA-event timings, cycling through several input sets."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(repeat):
        args = inputs[i % len(inputs)]
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def interleaved_us(cp, fns: dict, rounds: int) -> dict:
    """Median microseconds of each function by CUDA events, in interleaved rounds on the same
    inputs (the small-batch timer). The stream is idle at each start event, so the time
    between the events includes the host's work before and between the launches: at small
    sizes that fixed cost per call is what is measured."""
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times[name].append(cp.cuda.get_elapsed_time(start, stop))
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def small_batch(cp, torch, args):
    """The small-batch sections (sweep and training step) on this GPU, as dicts for the JSON;
    a failure is recorded, not raised, so that the rest of the run is kept."""
    if torch is not None and not torch.cuda.is_available():
        torch = None  # PyTorch without CUDA: nothing to compare with
    try:
        return _bench_small.run(args, functools.partial(interleaved_us, cp),
                                "CUDA events around each call", cp, torch,
                                _cuda_backend.to_torch, "cuda", _bench_io.progress)
    except Exception as exc:  # noqa: BLE001 - one failing part must not lose the rest
        return {"small_batch_error": f"{type(exc).__name__}: {exc}"[:300]}


def copy_bandwidth(cp):
    n = 1 << 28  # 1 GiB of float32
    src = cp.ones(n, cp.float32)
    dst = cp.empty_like(src)
    ms = time_ms(cp, lambda a, b: b.__setitem__(slice(None), a), [(src, dst)], repeat=20)
    del src, dst
    return 2 * 4 * n / (ms / 1e3)


# ---------------------------------------------------------------------------------------------
# The design card's kernels: the best single pass that cupy.ReductionKernel allows, for the
# elementwise losses. A ReductionKernel over an (R, C) view of the data reduces over axis 0
# into C float64 partials; its map expression computes loss and gradient from the shared
# math header and writes the gradient through a raw output (each _j is mapped exactly once);
# a second launch adds the C partials. Compared with the fused RawModule kernels in the GPU
# benchmark and tests (CARD_PREAMBLE itself compiles with NVRTC in the CPU tests).

CARD_HELPERS = r"""
template <typename T, typename G>
__device__ double gl_card_mse(T pred_v, T target_v, double gscale_v, G& grad_out,
                              ptrdiff_t j) {
    T dl;
    T l = gl_mse(pred_v, target_v, &dl);
    grad_out[j] = dl * (T)gscale_v;
    return (double)l;
}
template <typename T, typename G>
__device__ double gl_card_bce(T pred_v, T target_v, double gscale_v, G& grad_out,
                              ptrdiff_t j) {
    const T eps_v = sizeof(T) == 4 ? (T)1.1920928955078125e-07 : (T)2.220446049250313e-16;
    T dl;
    T l = gl_bce(pred_v, target_v, eps_v, (T)1 - eps_v, &dl);
    grad_out[j] = dl * (T)gscale_v;
    return (double)l;
}
template <typename T, typename G>
__device__ double gl_card_bce_with_logits(T pred_v, T target_v, double gscale_v, G& grad_out,
                                          ptrdiff_t j) {
    T dl;
    T l = gl_bce_logits(pred_v, target_v, (T)1, &dl);
    grad_out[j] = dl * (T)gscale_v;
    return (double)l;
}
"""


CARD_LOSSES = ("mse", "bce", "bce_with_logits")  # the losses the design card wrote out


def card_preamble() -> str:
    header = (_cuda_backend.kernel_dir() / "gpuloss_math.cuh").read_text()
    return header.replace("#pragma once", "") + CARD_HELPERS


@functools.cache
def _card_kernel(loss):
    import cupy as cp

    return cp.ReductionKernel(
        "T pred_v, T target_v, float64 gscale_v",
        "raw T grad_out, float64 partial_out",
        f"gl_card_{loss}(pred_v, target_v, gscale_v, grad_out, _j)",
        "a + b",
        "partial_out = a",
        "0",
        f"gpuloss_card_{loss}",
        reduce_type="float64",
        preamble=card_preamble(),
    )


def card_value_and_grad(cp, loss):
    """(mean loss, gradient) of an elementwise loss from cupy.ReductionKernel alone."""

    def run(p, y):
        n = p.size
        cols = next(c for c in (4096, 1024, 256, 64, 16, 4, 1) if n % c == 0)
        grad = cp.empty_like(p)
        partial = cp.empty(cols, cp.float64)
        _card_kernel(loss)(p.reshape(-1, cols), y.reshape(-1, cols), 1.0 / n,
                           grad.reshape(-1, cols), partial, axis=0)
        return (partial.sum() / n).astype(p.dtype), grad

    return run


def torch_fn(torch, fn):
    """PyTorch's peer of loss `fn` (its declaration's torch_peer), forward and backward."""
    F = torch.nn.functional

    def run(x, y):
        x = x.detach().requires_grad_()
        out = fn.torch_peer(F, x, y)
        out.backward()
        return out, x.grad

    return run


def gpuloss_autograd_fn(fn):
    """gpuloss through torch autograd: the fused pass in forward, backward from its gradient."""

    def run(x, y):
        x = x.detach().requires_grad_()
        out = fn(x, y)
        out.backward()
        return out, x.grad

    return run


def make_inputs(cp, fn, shape, dtype, sets):
    """`sets` input pairs of loss `fn` (from its declaration), made on the device."""
    rng = cp.random.default_rng(0)
    rows, classes = shape if len(shape) == 2 else (0, 0)
    made = []
    for _ in range(sets):
        # bfloat16: made in float32, then rounded (CuPy's generators have no bfloat16)
        p, y = example_inputs(fn, rng, n=shape[0], rows=rows, classes=classes,
                              dtype=np.float32 if dtype == "bfloat16" else dtype, xp=cp)
        if dtype == "bfloat16":
            p = p.astype(_cuda_backend.BF16)
            y = y.astype(_cuda_backend.BF16) if y.dtype.kind == "f" else y
        made.append((p, y))
    return made


def floor_bytes(fn, shape, dtype):
    size = _dtype(dtype).itemsize
    if fn.family != "categorical":
        return 3 * size * shape[0]  # read pred, read target, write grad
    N, K = shape
    if not fn.class_indices:  # probability targets: read both rows, write one
        return 3 * size * N * K
    if default_rules(fn)[0] is None:  # logits or log-probabilities
        return 2 * size * N * K + 8 * N  # read logits once, write grad, read labels
    return size * N * K + 2 * size * N + 8 * N  # write grad, gather p_y, read labels


class CountingRuntime(_cuda_backend.CupyRuntime):
    def __init__(self):
        super().__init__()
        self.count = 0

    def kernel(self, name, x):
        k = super().kernel(name, x)

        def launch(*a):
            self.count += 1
            return k(*a)

        return launch


def launches_per_call(loss, p, y):
    from gpuloss import _api

    rt = CountingRuntime()
    call = _api.prepare(loss, p, y, {}, want_value=True, want_grad=True)
    _cuda_backend.compute(call, rt)
    return rt.count


def _peak(cp, torch, run, args):
    """Peak device memory of one run of `run(*args)` beyond what is allocated before it, in
    bytes: torch's allocator peak plus what CuPy's pool grew by (gpuloss's
    gradient and partials come from CuPy's pool when called on torch tensors)."""
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base_torch, base_pool = torch.cuda.memory_allocated(), pool.total_bytes()
    torch.cuda.reset_peak_memory_stats()
    out = run(*args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base_torch + pool.total_bytes() - base_pool
    del out
    return peak


def large_vocabulary_row(cp, torch, dtype, bandwidth, repeat):
    """cce_with_logits at LARGE_VOCAB through autograd: gpuloss, torch eager, torch.compile;
    time, fraction of the floor, and peak memory beyond the inputs."""
    N, K = LARGE_VOCAB
    size = _dtype(dtype).itemsize
    row = {"loss": "cce_with_logits", "op": "autograd", "dtype": dtype, "shape": [N, K]}
    need = 4 * N * K * size  # logits, a gradient, and room for torch's saved softmax + grad
    free = cp.cuda.runtime.memGetInfo()[0]
    if free < need:
        row["skipped"] = f"needs about {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
        return row
    try:
        tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        gen = torch.Generator(device="cuda").manual_seed(0)
        z = torch.randn((N, K), device="cuda", dtype=tdtype, generator=gen)
        t = torch.randint(0, K, (N,), device="cuda", generator=gen)
        ours = gpuloss_autograd_fn(gl.cce_with_logits)

        def eager(x, y):
            x = x.detach().requires_grad_()
            out = torch.nn.functional.cross_entropy(x, y)
            out.backward()
            return out, x.grad

        floor_ms = 1e3 * (2 * size * N * K + 8 * N) / bandwidth
        row["torch_autograd_ms"] = round(time_ms(cp, ours, [(z, t)], repeat=repeat), 4)
        row["floor_ms"] = round(floor_ms, 4)
        row["fraction_of_floor"] = round(floor_ms / row["torch_autograd_ms"], 3)
        row["peak_GiB"] = round(_peak(cp, torch, ours, (z, t)) / 2**30, 3)
        row["torch_ms"] = round(time_ms(cp, eager, [(z, t)], repeat=repeat), 4)
        row["torch_peak_GiB"] = round(_peak(cp, torch, eager, (z, t)) / 2**30, 3)
        row["speedup_vs_torch"] = round(row["torch_ms"] / row["torch_autograd_ms"], 2)
        try:
            compiled = torch.compile(eager)
            row["torch_compile_ms"] = round(time_ms(cp, compiled, [(z, t)], repeat=repeat), 4)
            row["torch_compile_peak_GiB"] = round(_peak(cp, torch, compiled, (z, t)) / 2**30, 3)
        except Exception as exc:  # noqa: BLE001 - record why it did not compile
            row["torch_compile_error"] = str(exc)[:200]
        # agreement: the value against torch's, in float32 arithmetic
        v = float(gl.cce_with_logits(z, t))
        ref = float(torch.nn.functional.cross_entropy(z.float(), t))
        row["rel_diff_vs_torch_float32"] = abs(v - ref) / abs(ref)
        del z, t
    except Exception as exc:  # noqa: BLE001 - one failing case must not lose the rest
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    cp.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()
    return row


def benchmark_cases(bfloat16: bool = True) -> list[tuple[str, tuple, str]]:
    """(loss, shape, dtype) of every value_and_grad row, in the order they run; bfloat16 where
    CuPy has it."""
    elementwise = [n for n, fn in gl.LOSSES.items() if fn.family != "categorical"]
    categorical = [n for n, fn in gl.LOSSES.items() if fn.family == "categorical"]
    cases = [(loss, (n,), "float32") for loss in elementwise for n in ELEMENTWISE_SIZES]
    cases += [(loss, shape, "float32") for loss in categorical for shape in ROW_SHAPES]
    cases += [(loss, (1 << 26,), "float16") for loss in elementwise]
    cases += [(loss, (65536, 1024), "float16") for loss in categorical]
    if bfloat16:
        cases += [(loss, (1 << 26,), "bfloat16") for loss in elementwise]
        cases += [(loss, (65536, 1024), "bfloat16") for loss in categorical]
    return cases


def row_prediction(row: dict, card, resources=None) -> dict:
    """The roofline's fields for one row (gpuloss/_roofline.py): predicted_ms of its `ms`
    (value_and_grad rows) or of its `torch_autograd_ms` (the large-vocabulary rows),
    predicted_card and predicted_bytes. Empty without a card model; a failing model is
    recorded, never raised (the measurement matters more)."""
    if card is None:
        return {}
    op = "autograd" if row["op"] == "autograd" else "value_and_grad"
    try:
        p = _roofline.predict(row["loss"], tuple(row["shape"]), row["dtype"], card, op=op,
                              resources=resources)
    except Exception as exc:  # noqa: BLE001 - a prediction must not lose a measured row
        return {"predicted_error": f"{type(exc).__name__}: {exc}"[:200]}
    return {"predicted_ms": round(p["predicted_ms"], 4), "predicted_card": p["card"],
            "predicted_bytes": p["bytes"]}


def add_small_batch_predictions(small: dict, card, resources=None) -> None:
    """predicted_us beside gpuloss_us at each point of the sweep's cases on arrays (those
    through torch tensors add autograd, which the model leaves out)."""
    if card is None:
        return
    for case in (small.get("small_batch") or {}).get("cases", []):
        if case["case"].endswith("torch tensors"):
            continue
        case["predicted_card"] = card.name
        for point in case["points"]:
            try:
                p = _roofline.predict(case["case"].split()[0], tuple(point["shape"]),
                                      "float32", card, resources=resources)
                point["predicted_us"] = round(1e3 * p["predicted_ms"], 2)
            except Exception:  # noqa: BLE001, S112 - the measurement stays
                continue


def prediction_rows(card, losses=None, resources=None) -> list[dict]:
    """Every row of a GPU run (the value_and_grad cases, then the large-vocabulary autograd
    rows) with the roofline's prediction on `card` and what it rests on, no GPU needed."""
    losses = gl.LOSSES if losses is None else losses
    cases = [(loss, shape, dtype, "value_and_grad") for loss, shape, dtype in benchmark_cases()
             if loss in losses]
    if "cce_with_logits" in losses:
        cases += [("cce_with_logits", LARGE_VOCAB, d, "autograd") for d in ("bfloat16", "float32")]
    rows = []
    for loss, shape, dtype, op in cases:
        p = _roofline.predict(loss, shape, dtype, card, op=op, resources=resources)
        size = _dtype(dtype).itemsize
        floor = (2 * size * np.prod(shape) + 8 * shape[0] if op == "autograd"
                 else floor_bytes(gl.LOSSES[loss], shape, dtype))
        floor_ms = 1e3 * float(floor) / card.achievable
        rows.append({"loss": loss, "op": op, "dtype": dtype, "shape": list(shape),
                     "predicted_card": card.name, "predicted_ms": round(p["predicted_ms"], 4),
                     "predicted_bytes": p["bytes"], "floor_bytes": int(floor),
                     "floor_ms": round(floor_ms, 4),
                     "predicted_fraction_of_floor": float(f"{floor_ms / p['predicted_ms']:.3g}"),
                     **{k: p[k] for k in ("kernel", "launches", "device_ops", "blocks",
                                          "blocks_per_sm", "blocks_per_sm_from", "waves",
                                          "traffic")},
                     **{k: round(p[k], 4) for k in ("memory_ms", "wave_ms", "overhead_ms")}})
    return rows


def _dim(d: int) -> str:
    """A dimension as the benchmark's code writes it: 2^k from 2^20 up."""
    return f"2^{d.bit_length() - 1}" if d >= 1 << 20 and d & (d - 1) == 0 else str(d)


def _mb(b: int) -> str:
    return f"{b / 1e6:.3f}" if b < 1e6 else f"{b / 1e6:,.1f}"


def prediction_table(result: dict) -> list[str]:
    """The predictions as a Markdown table, one line per group of losses whose rows predict
    the same (same bytes, same grid) on every card."""
    cards = list(result["cards"])
    elementwise = {n for n, fn in gl.LOSSES.items() if fn.family != "categorical"}
    groups: dict = {}
    for r in result["rows"]:
        key = (r["op"], r["dtype"], tuple(r["shape"]))
        groups.setdefault(key, {}).setdefault(r["loss"], {})[r["predicted_card"]] = r
    lines = ["| losses | dtype | shape | MB moved | floor MB | "
             + " | ".join(f"{c} ms" for c in cards) + f" | floor / predicted ({cards[0]}) |",
             "|---|---|---|---:|---:|" + "---:|" * len(cards) + "---:|"]
    for (op, dtype, shape), by_loss in groups.items():
        same: dict = {}
        for loss, per_card in by_loss.items():
            sig = tuple((per_card[c]["predicted_ms"], per_card[c]["predicted_bytes"],
                         per_card[c]["floor_bytes"]) for c in cards)
            same.setdefault(sig, []).append(loss)
        for sig, losses in same.items():
            first = by_loss[losses[0]][cards[0]]
            names = ", ".join(losses) + (" (autograd)" if op == "autograd" else "")
            if set(losses) == elementwise:
                names = f"every elementwise loss ({len(losses)})"
            lines.append(f"| {names} | {dtype} | {' x '.join(map(_dim, shape))} | "
                         f"{_mb(first['predicted_bytes'])} | {_mb(first['floor_bytes'])} | "
                         + " | ".join(f"{ms:.4g}" for ms, _, _ in sig)
                         + f" | {first['predicted_fraction_of_floor']:.2g} |")
    return lines


def predict_only(args) -> int:
    """`--predict-only`: the roofline's prediction of every row for H100 SXM and H200, no GPU
    (and no CuPy) needed; the sweep's points on arrays too."""
    resources, source = _roofline.newest_resources(RESULTS)
    rows, sweep = [], []
    for card in _roofline.CARDS.values():
        rows += prediction_rows(card, args.losses, resources)
        sizes = [n for n in _bench_small.SIZES if n <= 1 << args.sweep_max]
        shapes = [("mse", (n,)) for n in sizes if "mse" in args.losses]
        if "cce_with_logits" in args.losses:
            shapes += [(f"cce_with_logits C={c}", (n // c, c)) for c in _bench_small.CLASSES
                       for n in sizes if n >= c]
        for case, shape in shapes:
            p = _roofline.predict(case.split()[0], shape, "float32", card, resources=resources)
            sweep.append({"case": case, "n": int(np.prod(shape)), "shape": list(shape),
                          "predicted_card": card.name,
                          "predicted_us": round(1e3 * p["predicted_ms"], 2)})
    result = {
        "what": "predicted, not measured: the roofline model of gpuloss/_roofline.py for "
                "every GPU benchmark row; no GPU has run these kernels",
        "prediction": True, "date": dt.date.today().isoformat(),
        "cards": {name: {"sms": c.sms, "bandwidth_nominal_GBps": c.bandwidth / 1e9,
                         "achievable_fraction": c.fraction}
                  for name, c in _roofline.CARDS.items()},
        "assumptions": _roofline.assumptions(),
        "blocks_per_sm_source": (
            f"blocks per SM from the registers in {source}" if source else
            "blocks per SM: the occupancy bars the kernels are held to, elementwise "
            f"{_roofline.FLOOR_BLOCKS_PER_SM['elementwise']}, rows "
            f"{_roofline.FLOOR_BLOCKS_PER_SM['rows']}; no kernel-resources table"),
        "rows": rows, "small_batch_predicted": sweep,
    }
    path = _bench_io.output_path(args.out, f"gpu-prediction-h100-h200-{result['date']}.json")
    _bench_io.finish(result, path, args.json,
                     lambda: print("\n".join(prediction_table(result))))
    return 0


def main(argv=None):
    ap = _bench_io.Parser(prog="gpuloss bench", description=__doc__.splitlines()[0])
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time torch.compile of PyTorch's loss")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller sets")
    ap.add_argument("--predict-only", action="store_true",
                    help="no GPU: write the roofline's prediction of every row for H100 SXM "
                         "and H200 (gpu-prediction-h100-h200-<date>.json)")
    _bench_small.add_args(ap)
    _bench_io.add_common_args(ap, "gpu", gl.LOSSES)
    args = ap.parse_args(argv)
    if args.predict_only:
        return predict_only(args)
    import cupy as cp

    try:
        import torch
    except ImportError:
        torch = None
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    card = props["name"].decode()
    slug = "".join(c if c.isalnum() else "-" for c in card).strip("-").lower()
    small = small_batch(cp, torch, args)
    if args.small_batch_only:
        add_small_batch_predictions(small, _roofline.card_for(card),
                                    _roofline.newest_resources(RESULTS)[0])
        result = {"device": card, "cupy": cp.__version__,
                  "cuda": cp.cuda.runtime.runtimeGetVersion(),
                  "torch": None if torch is None else torch.__version__,
                  "date": dt.date.today().isoformat(), "rows": [], **small}

        def small_table():
            print(f"{card}")
            print("\n".join(_bench_small.summary_lines(small.get("small_batch"),
                                                       small.get("training_step"))))
            if "small_batch_error" in small:
                print(small["small_batch_error"])

        path = _bench_io.output_path(args.out, f"gpu-small-batch-{slug}-{result['date']}.json")
        _bench_io.finish(result, path, args.json, small_table)
        return 0
    bandwidth = copy_bandwidth(cp)
    model = _roofline.card_for(card, sms=props.get("multiProcessorCount"), copy_bandwidth=bandwidth,
                               threads_per_sm=props.get("maxThreadsPerMultiProcessor", 2048),
                               registers_per_sm=props.get("regsPerMultiprocessor", 65536),
                               arch=f"sm_{props.get('major', 9)}{props.get('minor', 0)}")
    resources, _ = _roofline.newest_resources(RESULTS)
    add_small_batch_predictions(small, model, resources)
    cases = benchmark_cases(_cuda_backend.cupy_has_bfloat16())
    repeat = 7 if args.quick else 15
    rows = []
    for loss, shape, dtype in cases:
        if loss not in args.losses:
            continue
        row = {"loss": loss, "op": "value_and_grad", "dtype": dtype, "shape": list(shape)}
        try:
            sets = 2 if np.prod(shape) * 4 > (1 << 28) else 4
            loss_fn = gl.LOSSES[loss]
            inputs = make_inputs(cp, loss_fn, shape, dtype, sets)
            fn = loss_fn.value_and_grad
            row["ms"] = round(time_ms(cp, fn, inputs, repeat=repeat), 4)
            row["floor_ms"] = round(1e3 * floor_bytes(loss_fn, shape, dtype) / bandwidth, 4)
            row["fraction_of_floor"] = round(row["floor_ms"] / row["ms"], 3)
            row["launches"] = launches_per_call(loss, *inputs[0])
            naive = functools.partial(loss_fn.naive, cp)
            try:
                row["naive_cupy_ms"] = round(time_ms(cp, naive, inputs, repeat=repeat), 4)
            except Exception as exc:  # noqa: BLE001 - CuPy may lack a bfloat16 routine
                row["naive_error"] = f"{type(exc).__name__}: {exc}"[:200]
            if loss in CARD_LOSSES and dtype == "float32":
                card_fn = card_value_and_grad(cp, loss)
                row["reduction_kernel_ms"] = round(time_ms(cp, card_fn, inputs, repeat=repeat), 4)
                row["speedup_vs_reduction_kernel"] = round(row["reduction_kernel_ms"] /
                                                           row["ms"], 2)
            if torch is not None and torch.cuda.is_available():
                tin = [tuple(_cuda_backend.to_torch(a) for a in pair) for pair in inputs]
                ours = gpuloss_autograd_fn(loss_fn)
                row["torch_autograd_ms"] = round(time_ms(cp, ours, tin, repeat=repeat), 4)
            if torch is not None and torch.cuda.is_available() and loss_fn.torch_peer:
                tf = torch_fn(torch, loss_fn)
                row["torch_ms"] = round(time_ms(cp, tf, tin, repeat=repeat), 4)
                row["speedup_vs_torch"] = round(row["torch_ms"] / row["torch_autograd_ms"], 2)
                if args.torch_compile:
                    try:
                        cf = torch.compile(tf)
                        row["torch_compile_ms"] = round(time_ms(cp, cf, tin, repeat=repeat), 4)
                    except Exception as exc:  # noqa: BLE001 - record why it did not compile
                        row["torch_compile_error"] = str(exc)[:200]
            # agreement with the NumPy backend on the first input set
            p, y = (a.get() for a in inputs[0])
            if np.prod(shape) <= (1 << 22) and dtype != "bfloat16":
                want = gl.LOSSES[loss](p, y)
                got = float(fn(*inputs[0])[0])
                row["rel_diff_vs_numpy"] = abs(got - float(want)) / abs(float(want))
            del inputs
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the rest
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        row.update(row_prediction(row, model, resources))
        rows.append(row)
        _bench_io.progress(row)
        cp.get_default_memory_pool().free_all_blocks()
    if torch is not None and torch.cuda.is_available() and "cce_with_logits" in args.losses:
        for dtype in ("bfloat16", "float32"):
            row = large_vocabulary_row(cp, torch, dtype, bandwidth, repeat)
            row.update(row_prediction(row, model, resources))
            rows.append(row)
            _bench_io.progress(row)
    result = {
        "device": card,
        "cupy": cp.__version__,
        "cuda": cp.cuda.runtime.runtimeGetVersion(),
        "torch": None if torch is None else torch.__version__,
        "date": dt.date.today().isoformat(),
        "copy_GBps": round(bandwidth / 1e9, 1),
        "rows": rows,
        **small,
    }

    nan = float("nan")

    def table():
        print(f"{card}: copy {result['copy_GBps']} GB/s; pred: predicted ms on "
              f"{model.name if model else '-'} (gpuloss/_roofline.py)")
        print(f"{'loss':16s} {'dtype':8s} {'shape':>14s} {'ms':>9s} {'pred':>8s} {'floor':>8s} "
              f"{'frac':>5s} {'naive':>9s} {'torch':>9s} {'launch':>6s}")
        for r in rows:
            if "error" in r or "skipped" in r:
                print(f"{r['loss']:16s} {r['dtype']:8s} {r.get('error') or r['skipped']}")
                continue
            if "ms" not in r:  # the large-vocabulary rows: autograd, peak memory
                print(f"{r['loss']:16s} {r['dtype']:8s} {'x'.join(map(str, r['shape'])):>14s} "
                      f"{r['torch_autograd_ms']:9.4f} {r.get('predicted_ms', nan):8.4f} "
                      f"{r['floor_ms']:8.4f} "
                      f"{r['fraction_of_floor']:5.2f} torch {r['torch_ms']:9.4f} "
                      f"peak {r['peak_GiB']} vs torch {r['torch_peak_GiB']} GiB")
                continue
            print(f"{r['loss']:16s} {r['dtype']:8s} {'x'.join(map(str, r['shape'])):>14s} "
                  f"{r['ms']:9.4f} {r.get('predicted_ms', nan):8.4f} {r['floor_ms']:8.4f} "
                  f"{r['fraction_of_floor']:5.2f} "
                  f"{r.get('naive_cupy_ms', float('nan')):9.4f} "
                  f"{r.get('torch_ms', float('nan')):9.4f} "
                  f"{r['launches']:6d}")
        for line in _bench_small.summary_lines(small.get("small_batch"),
                                               small.get("training_step")):
            print(line)
        if "small_batch_error" in small:
            print(small["small_batch_error"])

    path = _bench_io.output_path(args.out, f"gpu-{slug}-{result['date']}.json")
    _bench_io.finish(result, path, args.json, table)
    return 0


if __name__ == "__main__":
    main()
