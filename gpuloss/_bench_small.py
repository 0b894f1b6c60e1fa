"""The small-batch part of the CPU and GPU benchmarks (issue 25): time per call from 2^8 to
2^24 elements, where a fixed cost per call (argument checks, dispatch, allocation, the torch
autograd hop) weighs more than the bytes moved, and one training step of a small MLP.

Each benchmark brings its own clock, `timer(fns, rounds) -> {name: median µs}`, which times
the functions in interleaved rounds (one call of each per round) on the same inputs; the CPU
one reads time.perf_counter, the GPU one CUDA events. Results are plain dicts for the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import gpuloss as gl
from gpuloss._examples import example_inputs

SIZES = tuple(1 << e for e in range(8, 25, 2))  # elements: 2^8, 2^10, ..., 2^24
CLASSES = (10, 1000)
MLP = {"inputs": 64, "hidden": 256, "batch": 256, "lr": 0.1}


@dataclass
class Plan:
    """How long each point is timed: enough rounds to fill `budget_s`, within the bounds, so
    that a 2^8 call is timed thousands of times and a 2^24 one a few; below `small_n`
    elements at least `small_rounds`, even where a busy machine makes each call slow."""

    budget_s: float = 1.5
    min_rounds: int = 5
    max_rounds: int = 3000
    small_n: int = 1 << 18
    small_rounds: int = 200
    probe_rounds: int = 3  # warm-up rounds, whose medians say what one round costs


QUICK_PLAN = Plan(budget_s=0.05, min_rounds=3, max_rounds=50, small_rounds=3, probe_rounds=2)


def add_args(ap) -> None:
    """The benchmarks' options for this part."""
    ap.add_argument("--small-batch-only", action="store_true",
                    help="only the small-batch sweep and the training step")
    ap.add_argument("--no-small-batch", dest="small_batch", action="store_false",
                    help="skip the small-batch sweep and the training step")
    ap.add_argument("--sweep-max", type=int, default=24, metavar="EXP",
                    help="the sweep's largest size, 2^EXP elements (default 24)")


def run(args, timer, clock, xp, torch, to_torch, device, progress=None) -> dict:
    """The JSON sections this part adds, as the parsed options ask: "small_batch" (the sweep)
    and "training_step" (with cce_with_logits among --losses); empty without PyTorch."""
    if torch is None or not (args.small_batch or args.small_batch_only):
        return {}
    plan = QUICK_PLAN if args.quick else Plan()
    sizes = tuple(n for n in SIZES if n <= 1 << args.sweep_max)
    out = {"small_batch": sweep(timer, clock, xp, torch, to_torch, sizes=sizes, plan=plan,
                                losses=args.losses, progress=progress)}
    if "cce_with_logits" in args.losses:
        out["training_step"] = training_step(timer, torch, device, plan=plan,
                                             progress=progress)
        if device == "cpu" and not args.quick:
            out["training_step"]["thread_contention"] = thread_contention(timer, torch,
                                                                          plan=plan)
            if progress:
                progress({"thread_contention": True,
                          **out["training_step"]["thread_contention"]})
    return out


def measure(timer, fns: dict, plan: Plan, n: int) -> tuple[dict, int]:
    """(median µs of each function, rounds timed) at n elements, after warm-up rounds that
    also say how many rounds fill the plan's budget."""
    probe = timer(fns, plan.probe_rounds)
    per_round = max(sum(probe.values()), 1e-3)
    least = plan.small_rounds if n < plan.small_n else plan.min_rounds
    rounds = int(min(plan.max_rounds, max(least, plan.budget_s * 1e6 / per_round)))
    return timer(fns, rounds), rounds


def crossover(points: list) -> int | None:
    """The smallest size from which gpuloss is faster at every larger size measured; None
    when it is slower at the largest (or there is nothing to compare)."""
    n = None
    for point in reversed(points):
        if point.get("ratio") is None or point["ratio"] >= 1:
            break
        n = point["n"]
    return n


def _backward(torch_loss, x, y):
    """forward + backward as a training loop runs it, on a fresh leaf each call."""
    x = x.detach().requires_grad_()
    loss = torch_loss(x, y)
    loss.backward()
    return loss, x.grad


def _ratio(ours, theirs):
    return float(f"{ours / theirs:.4g}")  # 4 digits, however far from 1


def _point(n, shape, rounds, us, ours, naive=None):
    point = {"n": n, "shape": list(shape), "rounds": rounds,
             "gpuloss_us": round(us[ours], 2), "torch_us": round(us["torch"], 2),
             "ratio": _ratio(us[ours], us["torch"])}  # < 1: gpuloss is faster
    if naive:
        point["naive_us"] = round(us[naive], 2)
    return point


def _mse_fns(xp, F, p, y, to_torch):
    tp, ty = to_torch(p), to_torch(y)
    return {"gpuloss": lambda: gl.mse.value_and_grad(p, y),
            "torch": lambda: _backward(F.mse_loss, tp, ty),
            "naive": lambda: gl.mse.naive(xp, p, y)}


def _cce_fns(F, z, t, to_torch):
    # one interleaved measurement: both gpuloss calls share the torch baseline
    tz, tt = to_torch(z), to_torch(t)
    return {"gpuloss": lambda: gl.cce_with_logits.value_and_grad(z, t),
            "gpuloss_torch": lambda: _backward(gl.cce_with_logits, tz, tt),
            "torch": lambda: _backward(F.cross_entropy, tz, tt)}


def sweep(timer, clock, xp, torch, to_torch, *, sizes=SIZES, plan=None, losses=gl.LOSSES,
          progress=None):
    """The size sweep: mse on n elements; cce_with_logits on (n / C, C) logits with int64
    labels, called on arrays and on torch tensors (autograd); PyTorch's own loss as the
    baseline. `xp` makes the arrays (NumPy or CuPy), `to_torch` shares them with torch;
    `clock` says in words how `timer` times. Only the cases of the `losses` named."""
    F, plan = torch.nn.functional, plan or Plan()
    rng = xp.random.default_rng(0)
    classes = CLASSES if "cce_with_logits" in losses else ()
    cases = {}
    if "mse" in losses:
        cases["mse"] = _case("gl.mse.value_and_grad(p, y) on float32 arrays",
                             "F.mse_loss forward + backward")
    for c in classes:
        cases[f"cce_with_logits C={c}"] = _case(
            "gl.cce_with_logits.value_and_grad(z, labels) on float32 arrays",
            "F.cross_entropy forward + backward", classes=c)
        cases[f"cce_with_logits C={c} torch tensors"] = _case(
            "gl.cce_with_logits(x, labels).backward() on torch tensors",
            "F.cross_entropy forward + backward", classes=c)
    for n in sizes:
        if "mse" in cases:
            p, y = example_inputs(gl.mse, rng, n=n, xp=xp)
            us, rounds = measure(timer, _mse_fns(xp, F, p, y, to_torch), plan, n)
            _add(cases["mse"], _point(n, p.shape, rounds, us, "gpuloss", naive="naive"),
                 progress)
        for c in classes:
            if n < c:  # not one row
                continue
            z, t = example_inputs(gl.cce_with_logits, rng, rows=n // c, classes=c, xp=xp)
            us, rounds = measure(timer, _cce_fns(F, z, t, to_torch), plan, n)
            _add(cases[f"cce_with_logits C={c}"], _point(n, z.shape, rounds, us, "gpuloss"),
                 progress)
            _add(cases[f"cce_with_logits C={c} torch tensors"],
                 _point(n, z.shape, rounds, us, "gpuloss_torch"), progress)
    for case in cases.values():
        case["crossover_n"] = crossover(case["points"])
    return {"sizes": list(sizes), "clock": clock, "torch_threads": torch.get_num_threads(),
            "cases": [{"case": name, **case} for name, case in cases.items()]}


def _case(gpuloss_call, torch_call, classes=None):
    return {"classes": classes, "gpuloss_call": gpuloss_call, "torch_call": torch_call,
            "points": []}


def _add(case, point, progress):
    case["points"].append(point)
    if progress:
        progress({"small_batch": case["gpuloss_call"], "classes": case["classes"], **point})


def _sgd_step(torch, model, loss_fn, x, y):
    """One training step of a copy of `model` with `loss_fn`, as a function to time."""
    import copy

    net = copy.deepcopy(model)
    opt = torch.optim.SGD(net.parameters(), lr=MLP["lr"])

    def step():
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def _training_fns(torch, c, device):
    F, nn = torch.nn.functional, torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(MLP["inputs"], MLP["hidden"]), nn.ReLU(),
                          nn.Linear(MLP["hidden"], c)).to(device)
    x = torch.randn(MLP["batch"], MLP["inputs"], device=device)
    y = torch.randint(0, c, (MLP["batch"],), device=device)
    logits = torch.randn(MLP["batch"], c, device=device)
    # two copies of one initial model, so that both steps train the same weights
    return {"step_torch": _sgd_step(torch, model, F.cross_entropy, x, y),
            "step_gpuloss": _sgd_step(torch, model, gl.cce_with_logits, x, y),
            "loss_torch": lambda: _backward(F.cross_entropy, logits, y),
            "loss_gpuloss": lambda: _backward(gl.cce_with_logits, logits, y)}


def _one_thread(fn):
    """`fn` with gpuloss's CPU backend held to the calling thread (GPULOSS_NUM_THREADS=1)."""
    import os

    def call():
        before = os.environ.get("GPULOSS_NUM_THREADS")
        os.environ["GPULOSS_NUM_THREADS"] = "1"
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["GPULOSS_NUM_THREADS"]
            else:
                os.environ["GPULOSS_NUM_THREADS"] = before

    return call


def thread_contention(timer, torch, *, batch=4096, classes=1000, plan=None):
    """The CPU step at a batch whose loss runs on several of gpuloss's threads, with them and
    held to one thread, beside PyTorch's step: whether gpuloss's threads and PyTorch's
    (OpenMP, spinning after each parallel region) slow each other down. (Once torch is
    imported, gpuloss's threads are PyTorch's own OpenMP team.)"""
    F, nn = torch.nn.functional, torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(MLP["inputs"], MLP["hidden"]), nn.ReLU(),
                          nn.Linear(MLP["hidden"], classes))
    x, y = torch.randn(batch, MLP["inputs"]), torch.randint(0, classes, (batch,))
    step = _sgd_step(torch, model, gl.cce_with_logits, x, y)
    fns = {"step_torch": _sgd_step(torch, model, F.cross_entropy, x, y),
           "step_gpuloss": step, "step_gpuloss_one_thread": _one_thread(step)}
    us, rounds = measure(timer, fns, plan or Plan(), batch * classes)
    return {"batch": batch, "classes": classes, "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            **{f"{name}_us": round(t, 2) for name, t in us.items()},
            "step_ratio": _ratio(us["step_gpuloss"], us["step_torch"]),
            "threads_vs_one": _ratio(us["step_gpuloss"], us["step_gpuloss_one_thread"])}


def training_step(timer, torch, device="cpu", *, plan=None, progress=None):
    """One SGD step of an MLP (inputs-hidden-C: Linear, ReLU, Linear) with PyTorch's
    cross-entropy and with gpuloss's, and the loss alone (forward + backward at batch x C),
    in interleaved rounds; torch's thread count is left as the caller has it."""
    rows = []
    for c in CLASSES:
        plan = plan or Plan()
        n = MLP["batch"] * c  # the logits' size
        us, rounds = measure(timer, _training_fns(torch, c, device), plan, n)
        row = {"classes": c, "rounds": rounds,
               **{f"{name}_us": round(t, 2) for name, t in us.items()},
               "step_ratio": _ratio(us["step_gpuloss"], us["step_torch"]),
               "loss_ratio": _ratio(us["loss_gpuloss"], us["loss_torch"])}
        rows.append(row)
        if progress:
            progress({"training_step": True, **row})
    return {"model": f"Linear({MLP['inputs']}, {MLP['hidden']}), ReLU, "
                     f"Linear({MLP['hidden']}, C)", "optimizer": f"SGD(lr={MLP['lr']})",
            "batch": MLP["batch"], "device": device, "torch_threads": torch.get_num_threads(),
            "rows": rows}


def summary_lines(small_batch: dict | None, steps: dict | None) -> list[str]:
    """The table's lines for the two sections (for the benchmarks' stdout)."""
    lines = []
    if small_batch:
        lines.append(f"small batches (torch threads {small_batch['torch_threads']}): µs per "
                     f"call, gpuloss / torch")
        for case in small_batch["cases"]:
            cells = " ".join(f"{p['gpuloss_us']:.0f}/{p['torch_us']:.0f}"
                             for p in case["points"])
            cross = case["crossover_n"] or "-"
            lines.append(f"  {case['case']:32s} crossover {cross:>8}: {cells}")
        lines.append("  sizes: " + " ".join(f"2^{int(np.log2(n))}"
                                            for n in small_batch["sizes"]))
    if steps:
        lines.append(f"training step, MLP batch {steps['batch']} (torch threads "
                     f"{steps['torch_threads']}): µs")
        for r in steps["rows"]:
            lines.append(f"  C={r['classes']:<5d} step torch {r['step_torch_us']:8.1f} "
                         f"gpuloss {r['step_gpuloss_us']:8.1f} ({r['step_ratio']:.2f}x)  "
                         f"loss torch {r['loss_torch_us']:7.1f} gpuloss "
                         f"{r['loss_gpuloss_us']:7.1f} ({r['loss_ratio']:.2f}x)")
        c = steps.get("thread_contention")
        if c:
            lines.append(f"  batch {c['batch']} C={c['classes']}: step torch "
                         f"{c['step_torch_us']:.0f}, gpuloss {c['step_gpuloss_us']:.0f} "
                         f"({c['step_ratio']:.2f}x), gpuloss on one thread "
                         f"{c['step_gpuloss_one_thread_us']:.0f} (its threads / one: "
                         f"{c['threads_vs_one']:.3f})")
    return lines
