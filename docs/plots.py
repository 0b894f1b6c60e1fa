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


def _latest(pattern):
    # the newest date; on the same date, the file written last
    files = sorted(RESULTS.glob(pattern),
                   key=lambda p: (json.loads(p.read_text())["date"], p.stat().st_mtime))
    return (files[-1], json.loads(files[-1].read_text())) if files else (None, None)


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
    page = PAGE.format(cpu=cpu.relative_to(ROOT) if cpu else "none yet", gpu=gpu_text)
    (ROOT / "docs" / "performance.md").write_text(page)
    print(f"wrote {IMG} and docs/performance.md")


if __name__ == "__main__":
    main()
