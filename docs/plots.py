"""Regenerate the documentation's pictures and the performance page, in one command:

    python docs/plots.py

Reads benchmarks/results/*.json; writes docs/img/*.png and docs/performance.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import gpuloss as gl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
RESULTS = ROOT / "benchmarks" / "results"


def _latest(pattern, key="rows", prediction=False):
    # the newest date; on the same date, the file written last; only files with a `key`
    # section (a --small-batch-only run has no rows, an older run no small_batch); a
    # prediction (gpu-prediction-*.json) only where asked for, never as a measurement
    files = [(p, json.loads(p.read_text())) for p in RESULTS.glob(pattern)]
    files = sorted(((p, d) for p, d in files
                    if d.get(key) and bool(d.get("prediction")) == prediction),
                   key=lambda pd: (pd[1]["date"], pd[0].stat().st_mtime))
    return files[-1] if files else (None, None)


def cpu_plots():
    path, data = _latest("cpu-*.json")
    if data is None:
        return None
    rows = data["rows"]
    names = [r["loss"] for r in rows]
    x = np.arange(len(rows))
    label = f"{data['cpu']} ({data['machine'].split('(')[-1].rstrip(')')}), {data['date']}"
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.bar(x - 0.2, [r["speedup_vs_naive"] for r in rows], 0.4, label="vs naive NumPy")
    if all("speedup_vs_torch" in r for r in rows):
        ax.bar(x + 0.2, [r["speedup_vs_torch"] for r in rows], 0.4, label="vs PyTorch CPU")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("speed-up of value_and_grad (×)")
    ax.set_title(f"CPU speed-up, float32 — {label}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "cpu-speedup.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.bar(x, [r["fraction_of_floor"] for r in rows], 0.6)
    ax.axhline(1, color="k", lw=0.8, ls="--", label="bandwidth floor")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("floor time / measured time")
    ax.set_title(f"CPU fraction of the bandwidth floor (copy {data['copy_GBps']} GB/s) — {label}",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "cpu-floor.png", dpi=110)
    plt.close(fig)
    return path


def gpu_plots():
    path, data = _latest("gpu-*.json")
    if data is None:
        return None
    rows = [r for r in data["rows"] if "error" not in r and r["dtype"] == "float32"]
    label = f"{data['device']}, {data['date']}"
    fig, ax = plt.subplots(figsize=(8, 4))
    for loss in gl.LOSSES:
        mine = [r for r in rows if r["loss"] == loss]
        if mine:
            sizes = [np.prod(r["shape"]) for r in mine]
            ax.plot(sizes, [r["fraction_of_floor"] for r in mine], "o-", label=loss)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("elements")
    ax.set_ylabel("floor time / measured time")
    ax.set_title(f"GPU fraction of the bandwidth floor — {label}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / "gpu-floor.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["naive_cupy_ms"] / r["ms"] for r in rows], 0.4, label="vs naive CuPy")
    ax.bar(x + 0.2, [r.get("torch_ms", np.nan) / r["ms"] for r in rows], 0.4,
           label="vs PyTorch eager")
    ax.set_xticks(x, [f"{r['loss']}\n{'x'.join(map(str, r['shape']))}" for r in rows],
                  fontsize=6, rotation=90)
    ax.set_ylabel("speed-up (×)")
    ax.set_title(f"GPU speed-up of value_and_grad — {label}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(IMG / "gpu-speedup.png", dpi=110)
    plt.close(fig)
    return path


# plain cross-entropy's registers before the catalogue (commit 180b19d: one functor, no focal or
# z-loss code; float32, sm_90, the same options and ptxas report), for the comparison the
# resources section makes
PRE_CATALOGUE_CCE = {"labels": {"4-32 lanes, cache 4": 63, "warp or block, cached": 123,
                                "block, read twice": 64},
                     "probabilities": {"4-32 lanes, cache 4": 64, "warp or block, cached": 122,
                                       "block, read twice": 64}}


def resources_section():
    """The kernels' resource report as Markdown: per architecture and kind, instantiations,
    spills, registers and the lowest occupancy, from the newest kernel-resources-*.json
    (`python tests/kernel_resources.py` writes it); and plain cross-entropy's registers."""
    files = sorted(RESULTS.glob("kernel-resources-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return "No resource report is recorded: `python tests/kernel_resources.py` writes one.\n"
    path = files[-1]
    data = json.loads(path.read_text())
    bars = {"elementwise": "50%", "rows": "25%", "rows_f64": "none"}
    what = {"elementwise": "elementwise and weight checks", "rows": "rows, 4- and 2-byte data",
            "rows_f64": "rows, float64"}
    lines = ["| arch | kernels | instantiations | spilling | registers | lowest occupancy | bar |",
             "|---|---|---:|---:|---|---:|---|"]
    for arch, kinds in data["summary"].items():
        for kind, v in kinds.items():
            lines.append(f"| {arch} | {what[kind]} | {v['instantiations']} | {v['spilling']} | "
                         f"{v['registers_min']}-{v['registers_max']} | "
                         f"{v['occupancy_min']:.1%} | {bars[kind]} |")
    plain = {}
    for r in data["kernels"]:
        if r["arch"] == "sm_90" and r["kernel"].startswith("gpuloss_rows<GlCceLogits<0>") \
                and r["kernel"].endswith(("float, long long>", "float, float>")):
            args = r["kernel"].split(">, ", 1)[1].split(", ")
            labels, threads, cache = args[0] == "1", int(args[1]), int(args[2])
            layout = ("4-32 lanes, cache 4" if threads == 0 else
                      "block, read twice" if cache == 0 else "warp or block, cached")
            key = ("labels" if labels else "probabilities", layout)
            plain.setdefault(key, set()).add(r["registers"])
    rows = ["| targets | layout | before the catalogue | now |", "|---|---|---:|---:|"]
    for targets, layouts in PRE_CATALOGUE_CCE.items():
        for layout, before in layouts.items():
            now = plain.get((targets, layout))
            now_text = "-".join(map(str, sorted({min(now), max(now)}))) if now else "n/a"
            rows.append(f"| {targets} | {layout} | {before} | {now_text} |")
    return (
        "ptxas's own report for every kernel instantiation (NVRTC with CuPy's options and "
        "`-Xptxas -v`, no GPU needed), and the theoretical occupancy at 256 threads per block "
        "by the occupancy calculator's rules. The test suite fails on any spill and on "
        "occupancy below the bar (`tests/test_kernels.py`).\n\n"
        f"Source: `{path.relative_to(ROOT)}` (NVRTC {data['nvrtc']}, {data['date']}).\n\n"
        + "\n".join(lines) + "\n\n"
        "Plain `cce_with_logits` (float32, sm_90, registers per thread) compiles none of "
        "focal's, z-loss's or softcap's code (options are compile-time switches). Small rows "
        "are now one "
        "instantiation whose rows are staged through shared memory, with room for up to 128 "
        "registers (2 blocks per SM); the register cache of the larger layouts holds 32 values "
        "beside class indices and 16 + 16 beside probabilities:\n\n"
        + "\n".join(rows) + "\n")


LINEAR_NAMES = {
    "floor_gemms_out": "three GEMMs into preallocated outputs (the floor)",
    "floor_gemms": "three GEMMs, fresh outputs",
    "gpuloss_numpy": "gpuloss, NumPy arrays",
    "gpuloss_torch": "gpuloss, torch tensors, `backward()`",
    "torch_reference": "`F.linear_cross_entropy` (reference path)",
    "torch_chunked": "`F.linear_cross_entropy(options=LinearCrossEntropyOptions())`",
}


def linear_section():
    """linear_cross_entropy's CPU benchmark (the newest linear-cpu-*.json, which
    `python benchmarks/linear.py` writes) and its GPU prediction, as Markdown."""
    files = sorted(RESULTS.glob("linear-cpu-*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        return "No run is recorded yet: `python benchmarks/linear.py` writes one.\n"
    path = files[-1]
    d = json.loads(path.read_text())
    shape = d["shape"]
    rows = ["| contender | median | × floor | memory above inputs and gradients |",
            "|---|---:|---:|---:|"]
    by = {r["contender"]: r for r in d["rows"]}
    for r in d["rows"]:
        mem = r["extra_memory_mb"]
        traced = r.get("extra_memory_tracemalloc_mb")
        mem_text = "(made beforehand)" if mem is None else f"{mem:,.0f} MB"
        if traced is not None and r["contender"] == "gpuloss_numpy":
            mem_text += f" (tracemalloc {traced:,.0f} MB)"
        rows.append(f"| {LINEAR_NAMES.get(r['contender'], r['contender'])} | "
                    f"{r['median_s']:.2f} s | {r['vs_floor']:.2f} | {mem_text} |")
    above = by["gpuloss_numpy"]["median_s"] - by["floor_gemms_out"]["median_s"]
    text = (
        "`gpuloss.linear_cross_entropy` against the floor — the three GEMMs alone, `np.matmul` "
        "into preallocated outputs — and PyTorch's `F.linear_cross_entropy`, forward + "
        f"backward, float32, {shape['tokens']:,} tokens × H {shape['hidden']:,} × V "
        f"{shape['vocab']:,} (the logits: {d['logits_mb']:,.0f} MB), `chunk_mb` "
        f"{d['chunk_mb']:g}. {d['cpu']} ({d['cores']} cores), {d['date']}, medians of "
        f"{len(by['floor_gemms_out']['times_s'])} interleaved rounds after a warm-up "
        f"(`python benchmarks/linear.py`; `{path.relative_to(ROOT)}`). Memory: the second call "
        "in a fresh process, peak resident memory above inputs and gradients.\n\n"
        + "\n".join(rows) + "\n\n"
        f"gpuloss on NumPy arrays spends {above:.2f} s above the floor: the row pass over the "
        f"{shape['tokens'] * shape['vocab'] / 1e6:,.0f} M logits and d_weight's additions "
        "across chunks. On torch tensors the GEMMs are PyTorch's own.\n")
    preds = sorted(RESULTS.glob("linear-gpu-prediction-*.json"), key=lambda p: p.stat().st_mtime)
    if preds:
        g = json.loads(preds[-1].read_text())
        p = g["predictions"]
        h100 = p["H100 SXM"]
        text += (
            "\n**GPU: a prediction, not a measurement.** For "
            f"{h100['tokens']:,} tokens × {h100['hidden']:,} × {h100['vocab']:,} in "
            f"{g['dtype']} (published on H100: PyTorch eager 43 ms, Liger-Kernel "
            f"{g['liger_published_ms']:g} ms), the model in "
            "`gpuloss._roofline.linear_cross_entropy` (GEMMs at an assumed "
            f"{h100['gemm_fraction']:.0%} of the {h100['tensor_tflops']:g} TFLOP/s tensor-core "
            "peak, the rest at 90% of the HBM bandwidth) predicts the three GEMMs at "
            f"{h100['floor_ms']:.1f} ms and gpuloss at {h100['predicted_ms']:.1f} ms on H100 SXM "
            f"({p['H200']['predicted_ms']:.1f} ms on H200): "
            f"{h100['predicted_ms'] / h100['floor_ms']:.2f}× the floor. The gap is d_weight's "
            f"float32 accumulator, read and written once per chunk ({h100['chunks']} chunks of "
            f"{h100['chunk_rows']:,} tokens at {g['chunk_mb']:g} MB), which is also what puts the "
            "extra memory above 0.5 GiB. `python benchmarks/linear.py --device cuda` measures "
            f"it on a GPU (`benchmarks/run_on_device.sh`, stage h); "
            f"`{preds[-1].relative_to(ROOT)}` holds the prediction.\n")
    return text


def prediction_section():
    """The predicted GPU times as Markdown (from the newest gpu-prediction-*.json, which
    `python benchmarks/gpu.py --predict-only` writes), or a line saying there is none."""
    from gpuloss._bench_gpu import prediction_table

    path, data = _latest("gpu-prediction-*.json", prediction=True)
    if data is None:
        return ("No prediction is recorded: `python benchmarks/gpu.py --predict-only` writes "
                "one.\n")
    a = data["assumptions"]
    cards = ", ".join(f"{name} {c['bandwidth_nominal_GBps'] / 1e3:g} TB/s"
                      for name, c in a["cards"].items())
    sms = sorted({c["sms"] for c in a["cards"].values()})
    o = a["overheads_us"]
    return (
        "No GPU has run these kernels yet: these times are predicted by the roofline model of "
        "`gpuloss/_roofline.py`, not measured (`python benchmarks/gpu.py --predict-only` "
        "writes them, no GPU needed). A GPU run writes `predicted_ms` beside each measured "
        "row, so that the first one shows at once how far off the model is.\n\n"
        "- Bytes: each array the kernel touches, once per pass over it (a row longer than the "
        "register cache is read twice), and a partial per block.\n"
        f"- Time: the bytes over {a['achievable_fraction']:g} x the nominal bandwidth (what a "
        f"large copy reaches; {cards}; {', '.join(map(str, sms))} SMs), rounded up to whole "
        f"waves of resident blocks ({data['blocks_per_sm_source']}).\n"
        f"- A fixed cost per call, assumed: {o['call_us']:g} µs of host work, "
        f"{o['launch_us']:g} µs per device operation (the memset of the state word, the "
        f"kernel), {o['read_us']:g} µs for validate=True's read of the flags.\n"
        "- `value_and_grad` on CuPy arrays, mean reduction. The autograd rows are "
        "`gl.cce_with_logits(x, y).backward()` on CUDA tensors "
        f"({o['autograd_us']:g} µs more): backward multiplies the saved gradient by "
        "grad_output, one more read and write of it.\n"
        "- The floor: the least each loss must move (each input read once, the gradient "
        "written once); the last column is its time over the predicted time.\n\n"
        f"Source: `{path.relative_to(ROOT)}`.\n\n"
        + "\n".join(prediction_table(data)) + "\n"
    )


def small_batch_plots(kind="cpu", path=None):
    """Time per call against size, log-log, gpuloss and PyTorch, one panel per case with the
    crossover marked, and the MLP training step; from `path` or the newest result that has
    a small-batch sweep. Writes img/<kind>-small-batch.png; returns the source or None."""
    if path is None:
        path, data = _latest(f"{kind}-*.json", key="small_batch")
    else:
        data = json.loads(Path(path).read_text())
    if not data or not data.get("small_batch"):
        return None
    sweep, steps = data["small_batch"], data.get("training_step")
    where = data.get("cpu") or data.get("device")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = axes.ravel()
    for ax, case in zip(axes, sweep["cases"]):
        pts = case["points"]
        n = [p["n"] for p in pts]
        ax.loglog(n, [p["gpuloss_us"] for p in pts], "o-", label="gpuloss")
        ax.loglog(n, [p["torch_us"] for p in pts], "s-", label="PyTorch")
        if all("naive_us" in p for p in pts):
            ax.loglog(n, [p["naive_us"] for p in pts], ".:", color="gray", label="naive")
        if case["crossover_n"]:
            ax.axvline(case["crossover_n"], color="k", ls="--", lw=0.8,
                       label=f"crossover 2^{int(np.log2(case['crossover_n']))}")
        sizes = sweep["sizes"]
        ax.set_xticks(sizes, [f"2^{int(np.log2(x))}" for x in sizes], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
        ax.set(title=case["case"], xlabel="elements per call", ylabel="µs per call")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    for ax in axes[len(sweep["cases"]):]:
        ax.axis("off")
    if steps and len(sweep["cases"]) < len(axes):  # the training step, in the spare panel
        ax = axes[-1]
        ax.axis("on")
        x = np.arange(len(steps["rows"]))
        ax.bar(x - 0.2, [r["step_torch_us"] for r in steps["rows"]], 0.4, label="F.cross_entropy")
        ax.bar(x + 0.2, [r["step_gpuloss_us"] for r in steps["rows"]], 0.4,
               label="gl.cce_with_logits")
        ax.set_xticks(x, [f"C = {r['classes']}\ngpuloss / torch {r['step_ratio']:.2f}"
                          for r in steps["rows"]], fontsize=8)
        ax.set(ylabel="µs per step", title=f"MLP training step, batch {steps['batch']}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle(f"Small batches, {kind.upper()} — {where}, torch threads "
                 f"{sweep['torch_threads']}, {data['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(IMG / f"{kind}-small-batch.png", dpi=100)
    plt.close(fig)
    return path


def curves():
    cases = {
        "mse": (np.linspace(-2, 3, 401), {}),
        "bce": (np.linspace(0, 1, 401), {"eps": 1e-3}),
        "bce_with_logits": (np.linspace(-8, 8, 401), {}),
        "cce_with_logits": (np.linspace(-8, 8, 401), {}),
    }
    for loss, (x, opts) in cases.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for y in (0.0, 1.0):
            if loss == "cce_with_logits":  # two classes, the second logit at 0
                z = np.stack([x, np.zeros_like(x)], axis=1)
                t = np.full(len(x), 0 if y == 1 else 1)
                value = gl.cce_with_logits(z, t, reduction="none")
                grad = gl.cce_with_logits.grad(z, t, reduction="none")[:, 0]
            else:
                t = np.full_like(x, y)
                value = gl.LOSSES[loss](x, t, reduction="none", **opts)
                grad = gl.LOSSES[loss].grad(x, t, reduction="none", **opts)
            a1.plot(x, value, label=f"y = {y:g}")
            a2.plot(x, grad, label=f"y = {y:g}")
        if loss == "bce":
            for a in (a1, a2):
                for edge in (1e-3, 1 - 1e-3):
                    a.axvline(edge, color="gray", ls="--", lw=0.8)
            a2.set_yscale("symlog", linthresh=1)
        xlabel = "logit z (first class)" if "logits" in loss else "prediction"
        a1.set(title=f"{loss}: loss", xlabel=xlabel)
        a2.set(title=f"{loss}: gradient (per element)", xlabel=xlabel)
        a1.legend()
        fig.tight_layout()
        fig.savefig(IMG / f"curves-{loss}.png", dpi=100)
        plt.close(fig)


PAGE = """# Performance

Plots made from the JSON files in `benchmarks/results/` by `python docs/plots.py`. Each says
on which machine or card and on which date it ran.

## CPU

`value_and_grad` against the naive NumPy a user would write from the formulas, PyTorch CPU
forward+backward, and the memory-bandwidth floor (the bytes that must move, over a measured
copy's bandwidth), float32, 2^24 elements (mse, bce*) and (262144, 64) rows (cce*).
Source: `{cpu}`.

![CPU speed-ups](img/cpu-speedup.png)

![CPU fraction of the floor](img/cpu-floor.png)

## GPU

{gpu}
## Kernel resources (ptxas, without a GPU)

{resources}
## Predicted GPU times (a prediction, not a measurement)

{predicted}
## Linear cross-entropy (language models)

{linear}
## Small batches

A call has a fixed cost whatever its size (checking the arguments, choosing the backend,
allocating the outputs and, on torch tensors, the hop through autograd): at the batch sizes
people train with it can outweigh the work on the data, so the time per call stays flat on
the left of each panel and grows with the size only on the right. The crossover is the
smallest size from which gpuloss is faster than PyTorch at every larger size measured
(`gpuloss bench --small-batch-only`; float32, time per call in µs, log-log). The last panel
is one SGD step of an MLP 64-256-C at batch 256 with either loss.

{small}
"""


def main():
    IMG.mkdir(parents=True, exist_ok=True)
    curves()
    cpu = cpu_plots()
    gpu = gpu_plots()
    gpu_text = (
        f"Source: `{gpu.relative_to(ROOT)}`.\n\n![GPU fraction of the floor](img/gpu-floor.png)"
        "\n\n![GPU speed-ups](img/gpu-speedup.png)\n"
        if gpu else
        "No GPU run is recorded yet: the plots appear here once `python benchmarks/gpu.py` "
        "has written `benchmarks/results/gpu-*.json` and this script has run again.\n"
    )
    small_text = ""
    for kind in ("cpu", "gpu"):
        source = small_batch_plots(kind)
        if source:
            small_text += (f"{kind.upper()}, source: `{source.relative_to(ROOT)}`.\n\n"
                           f"![{kind.upper()} small batches](img/{kind}-small-batch.png)\n\n")
    small_text = small_text or (
        "No small-batch run is recorded yet: the plots appear here once `gpuloss bench` has "
        "written a result with a `small_batch` section and this script has run again.\n")
    page = PAGE.format(cpu=cpu.relative_to(ROOT) if cpu else "none yet", gpu=gpu_text,
                       predicted=prediction_section(), resources=resources_section(),
                       linear=linear_section(),
                       small=small_text.rstrip("\n") + "\n")
    (ROOT / "docs" / "performance.md").write_text(page)
    print(f"wrote {IMG} and docs/performance.md")


if __name__ == "__main__":
    main()
