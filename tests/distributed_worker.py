"""One rank of a gloo process group for tests/test_distributed.py.

Usage: python distributed_worker.py RANK WORLD STORE_FILE CASES.pkl OUT_DIR

Loads the cases the test wrote (full arrays: each rank takes its shard), runs each through
`gpuloss.distributed` and writes what it saw (the loss, its shard's gradients, or the error
it raised) to OUT_DIR/rank{RANK}.pkl. A case that raises on one rank must raise on every rank
(the next exchange would hang otherwise): the process group's timeout turns a hang into an
error that the test sees.
"""

from __future__ import annotations

import datetime
import pickle
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist

import gpuloss.distributed as gld


def _tensor(x, dtype=None):
    if x is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if dtype is None else t.to(dtype)


def run_case(case, rank, world):
    kind = case.get("kind", "cce")
    starts, widths = case["starts"][world], case["widths"][world]
    a, w = starts[rank], widths[rank]
    dtype = getattr(torch, case.get("dtype", "float32"))
    opts = dict(case.get("options", {}))
    opts.update(case.get("options_override", {}).get(rank, {}))
    cw = opts.pop("class_weight", None)
    if cw is not None:
        opts["class_weight"] = _tensor(cw[a:a + w])
    sw = opts.pop("sample_weight", None)
    if sw is not None:
        opts["sample_weight"] = _tensor(sw)
    target = case["target"]
    labels = target.dtype.kind in "iu"
    t = _tensor(target) if labels else _tensor(target[..., a:a + w], dtype)
    if case.get("target_override", {}).get(rank) is not None:
        t = _tensor(case["target_override"][rank])
    kw = dict(case.get("call", {}))
    if kw.pop("vocab_start", None) == "given":
        kw["vocab_start"] = case.get("vocab_start_override", {}).get(rank, a)
    if kind == "cce":
        z = _tensor(case["logits"][..., a:a + w], dtype)
        rows = case.get("rows_override", {}).get(rank)
        if rows is not None:
            z, t = z[:rows], t[:rows]
        z.requires_grad_(True)
        loss = gld.cce_with_logits(z, t, **kw, **opts)
        up = case.get("upstream")
        if up is not None:
            loss.backward(_tensor(up, loss.dtype))
        else:
            loss.backward()
        return {"value": loss.detach().double().numpy(), "grads": [z.grad.double().numpy()]}
    # linear: hidden replicated, weight (and bias) split by rows (classes)
    h = _tensor(case["hidden"], dtype).requires_grad_(True)
    W = _tensor(case["weight"][a:a + w], dtype).requires_grad_(True)
    b = case.get("bias")
    b = None if b is None else _tensor(b[a:a + w], dtype).requires_grad_(True)
    loss = gld.linear_cross_entropy(h, W, t, bias=b, **kw, **opts)
    up = case.get("upstream")
    loss.backward(None if up is None else _tensor(up, loss.dtype))
    grads = [h.grad.double().numpy(), W.grad.double().numpy()]
    if b is not None:
        grads.append(b.grad.double().numpy())
    return {"value": loss.detach().double().numpy(), "grads": grads}


def main():
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    store, cases_file, out_dir = sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    with open(cases_file, "rb") as f:
        cases = pickle.load(f)
    results = {}
    for name, case in cases.items():
        if world not in case["starts"]:
            continue
        try:
            results[name] = run_case(case, rank, world)
        except Exception as e:  # noqa: BLE001 - recorded: the test checks which error every rank raised
            results[name] = {"error": type(e).__name__, "message": str(e),
                             "trace": traceback.format_exc(limit=4)}
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
        pickle.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
