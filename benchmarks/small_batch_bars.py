"""Issue 25's bars on this machine, gpuloss interleaved with PyTorch in one process (medians
of per-call times after warm-up): NumPy value_and_grad at 256 x 10 and mse at 256, the loss
alone (forward + backward on torch CPU tensors) at 256 x 10 and 256 x 1000, a training step of
an MLP 64-256-C (SGD, batch 256) with each loss (and the loss alone at 256 x 4000 and
4096 x 1000: "and beyond"), and the compiled kernels against the NumPy
backend on elementwise losses of 2^16 to 2^22 elements (where ELEMENTWISE_MAX comes from).

    python benchmarks/small_batch_bars.py [--out benchmarks/results/small-batch-bars-....json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

import gpuloss as gl
from gpuloss import _api, _host_build, _torch_build
from gpuloss.backends import host
from gpuloss.backends import numpy as numpy_backend


def interleaved(fns: dict, rounds: int, warm: int = 50) -> dict:
    """Median µs of each function, timed one call of each per round."""
    times = {k: [] for k in fns}
    for i in range(warm + rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            if i >= warm:
                times[k].append(time.perf_counter() - t)
    return {k: round(float(np.median(v)) * 1e6, 1) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    _torch_build.wait()  # (the torch operator is built in the background on first use)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
           "numpy": np.__version__, "cpu_kernels": _host_build.status(),
           "torch_operator": _torch_build.status(),
           "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}

    z = rng.standard_normal((256, 10)).astype(np.float32)
    y = rng.integers(0, 10, 256)
    p = rng.standard_normal(256).astype(np.float32)
    q = rng.standard_normal(256).astype(np.float32)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    pt, qt = torch.from_numpy(p), torch.from_numpy(q)

    def torch_ce():
        a = zt.detach().requires_grad_()
        F.cross_entropy(a, yt).backward()

    def torch_mse():
        a = pt.detach().requires_grad_()
        F.mse_loss(a, qt).backward()

    out["numpy_value_and_grad_us"] = interleaved({
        "cce_with_logits_256x10": lambda: gl.cce_with_logits.value_and_grad(z, y),
        "mse_256": lambda: gl.mse.value_and_grad(p, q),
        "torch_cross_entropy_256x10": torch_ce,
        "torch_mse_256": torch_mse,
    }, args.rounds)

    loss_alone = {}
    for R, C in ((256, 10), (256, 1000), (256, 4000), (4096, 1000)):
        zc = torch.from_numpy(rng.standard_normal((R, C)).astype(np.float32))
        yc = torch.from_numpy(rng.integers(0, C, R))

        def ours(zc=zc, yc=yc):
            a = zc.detach().requires_grad_()
            gl.cce_with_logits(a, yc).backward()

        def theirs(zc=zc, yc=yc):
            a = zc.detach().requires_grad_()
            F.cross_entropy(a, yc).backward()

        rounds = max(100, min(args.rounds, args.rounds * 256_000 // (R * C)))
        r = interleaved({"gpuloss": ours, "torch": theirs}, rounds)
        r["ratio"] = round(r["gpuloss"] / r["torch"], 3)
        loss_alone[f"{R}x{C}"] = r
    out["loss_alone_forward_backward_us"] = loss_alone

    steps = {}
    for C in (10, 1000):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, C))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xb = torch.randn(256, 64)
        yb = torch.randint(0, C, (256,))

        def step(loss_fn, model=model, opt=opt, xb=xb, yb=yb):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()

        r = interleaved({"gpuloss": lambda: step(gl.cce_with_logits),
                         "torch": lambda: step(F.cross_entropy)}, max(args.rounds // 4, 100))
        r["ratio"] = round(r["gpuloss"] / r["torch"], 3)
        steps[f"C={C}"] = r
    out["mlp_training_step_us"] = steps

    sizes = {}  # the compiled loop at every size (its size limits lifted for the comparison)
    limits = host.ELEMENTWISE_MAX, host.LIBM_ELEMENTWISE_MAX
    host.ELEMENTWISE_MAX = host.LIBM_ELEMENTWISE_MAX = 1 << 30
    for e in (10, 12, 14, 16, 18, 20, 22):
        n = 1 << e
        a = rng.standard_normal(n).astype(np.float32)
        b = rng.random(n).astype(np.float32)
        row = {}
        for name in ("mse", "bce_with_logits"):
            call = _api.prepare(name, a, b, {}, want_value=True, want_grad=True)
            r = interleaved({"compiled": lambda c=call: host.compute(c),
                             "numpy": lambda c=call: numpy_backend.compute(c)},
                            max(20, min(500, (1 << 24) // n)), warm=5)
            r["ratio"] = round(r["compiled"] / r["numpy"], 3)
            row[name] = r
        sizes[f"2^{e}"] = row
    host.ELEMENTWISE_MAX, host.LIBM_ELEMENTWISE_MAX = limits
    out["elementwise_compiled_vs_numpy_us"] = sizes
    out["elementwise_limits"] = {"ELEMENTWISE_MAX": limits[0], "LIBM_ELEMENTWISE_MAX": limits[1]}

    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
