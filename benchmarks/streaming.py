"""Streaming benchmark: `gpuloss score` on a pair of large float32 .npy files, streamed in
chunks vs. in one piece (the in-memory path). Reports each run's peak RSS (VmHWM) and
throughput, and writes benchmarks/results/streaming-<machine>-<date>.json.

    python benchmarks/streaming.py [--gb 4] [--chunk-rows 16777216] [--keep DIR]

The bar (issue 4): peak RSS under 1 GB for a 4 GB pair, at >= 50% of the in-memory
throughput.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

WRAPPER = (
    "import sys, time\n"
    "from gpuloss._cli import main\n"
    "assert main(sys.argv[1:]) == 0\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
    "print('PEAK_KIB', hwm.split()[1])\n"
)


def write_pair(folder: Path, elements: int):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("pred", "target"):
        path = folder / f"{name}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(elements,))
        step = 1 << 24
        for start in range(0, elements, step):
            stop = min(elements, start + step)
            out[start:stop] = rng.random(stop - start, dtype=np.float32)
        out.flush()
        del out
        paths.append(path)
    return paths


def run(pred, target, chunk_rows, loss="mse"):
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, "score", loss, str(pred), str(target), "--chunk-size",
         str(chunk_rows), "--device", "cpu", "--json"],
        capture_output=True, text=True, check=True,
    )
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[0])
    result["peak_rss_MiB"] = round(int(lines[1].split()[1]) / 1024, 1)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0, help="size of the pair, in GB")
    ap.add_argument("--chunk-rows", type=int, default=1 << 24)
    ap.add_argument("--keep", help="folder for the files (default: a temporary one)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    elements = int(args.gb * 1e9 / 2 / 4)
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        folder = Path(tmp)
        pred, target = write_pair(folder, elements)
        pair_bytes = os.path.getsize(pred) + os.path.getsize(target)
        run(pred, target, args.chunk_rows)  # warm the page cache alike for both runs
        streamed = run(pred, target, args.chunk_rows)
        whole = run(pred, target, elements)
    chunk_bytes = 2 * args.chunk_rows * 4
    for r in (streamed, whole):
        r["throughput_GBps"] = round(pair_bytes / r["seconds"] / 1e9, 3)
    result = {
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "date": dt.date.today().isoformat(),
        "pair_bytes": pair_bytes,
        "chunk_rows": args.chunk_rows,
        "chunk_bytes": chunk_bytes,
        "streamed": streamed,
        "in_memory": whole,
        "throughput_ratio": round(streamed["throughput_GBps"] / whole["throughput_GBps"], 3),
        "same_loss": abs(streamed["loss"] - whole["loss"]) <= 1e-12 * abs(whole["loss"]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"streaming-{platform.node()}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
