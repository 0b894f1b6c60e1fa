"""gpuloss.distributed on real gloo process groups (2 and 4 ranks; 1, 2, 4 and 8 for the
split-invariant mode): each rank holds a shard of the classes; the loss must equal the
single-device loss of the joined logits to rounding, each rank's gradient its shard of the
single-device gradient, and a bad call must raise the same way on every rank (never hang).

The ranks are processes running tests/distributed_worker.py, launched once per world size
for all the cases (importing torch dominates their cost)."""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require

import gpuloss as gl

torch = require("torch")

WORKER = Path(__file__).with_name("distributed_worker.py")
N, K = 12, 40
RNG = np.random.default_rng(2026)


def _even(world, k=K):
    """Shards in rank order, as even as possible (the first ones one larger)."""
    widths = [k // world + (r < k % world) for r in range(world)]
    return [sum(widths[:r]) for r in range(world)], widths


def _layout(worlds, k=K):
    starts, widths = {}, {}
    for world in worlds:
        starts[world], widths[world] = _even(world, k)
    return starts, widths


def _case(*, labels=True, options=None, dtype="float32", worlds=(1, 2, 4), call=None, n=N,
          k=K, lead=None, scale=3.0, upstream=None):
    shape = (n, k) if lead is None else (*lead, k)
    z = (RNG.standard_normal(shape) * scale).astype(np.float64)
    t = (RNG.integers(0, k, shape[:-1]) if labels
         else RNG.dirichlet(np.ones(k), shape[:-1]).astype(np.float64))
    opts = dict(options or {})
    if opts.get("class_weight") is True:
        opts["class_weight"] = RNG.uniform(0.3, 2.0, k)
    if opts.get("sample_weight") is True:
        opts["sample_weight"] = RNG.uniform(0.3, 2.0, shape[:-1])
    starts, widths = _layout(worlds, k)
    return {"logits": z, "target": t, "options": opts, "dtype": dtype, "starts": starts,
            "widths": widths, "call": dict(call or {}), "upstream": upstream}


OPTION_SETS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-3},
    "softcap": {"softcap": 2.5},
    "class_weight": {"class_weight": True},
    "sample_weight": {"sample_weight": True},
    "sum": {"reduction": "sum"},
    "all": {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 4.0, "class_weight": True,
            "sample_weight": True},
}


def _cases():
    cases = {}
    for labels in (True, False):
        kind = "labels" if labels else "probs"
        for name, opts in OPTION_SETS.items():
            for dtype in ("float32", "float64"):
                cases[f"{kind}-{name}-{dtype}"] = _case(labels=labels, options=opts,
                                                        dtype=dtype)
        cases[f"{kind}-none"] = _case(labels=labels, options={"reduction": "none",
                                                              "sample_weight": True},
                                      upstream=RNG.standard_normal(N))
        cases[f"{kind}-lead-axes"] = _case(labels=labels, lead=(3, 4),
                                           options={"label_smoothing": 0.1})
        cases[f"{kind}-bfloat16"] = _case(labels=labels, dtype="bfloat16",
                                          options={"z_loss": 1e-3})
        cases[f"{kind}-given-start"] = _case(labels=labels, call={"vocab_start": "given"})
        cases[f"{kind}-fast-path"] = _case(labels=labels, options={"validate": False},
                                           call={"vocab_start": "given"})
    ignore = _case(options={"ignore_index": 3, "class_weight": True})
    ignore["target"][::3] = 3
    cases["labels-ignore_index"] = ignore
    # every label on rank 0: the other ranks hold none of the batch's labels
    lonely = _case(options={"label_smoothing": 0.1, "class_weight": True})
    lonely["target"][:] = RNG.integers(0, 5, N)
    cases["labels-on-one-rank"] = lonely
    # confident rows, huge and masked logits: the numerics of the merge
    edge = _case(options={"z_loss": 1e-4})
    edge["logits"][0] = -np.inf
    edge["logits"][0, 7] = 0.0
    edge["target"][0] = 7
    edge["logits"][1, 30] = 60.0
    edge["target"][1] = 30
    edge["logits"][2] += 1e4
    edge["logits"][3, :20] = -np.inf
    edge["target"][3] = 25
    cases["labels-edges"] = edge
    # nothing counted: the mean is NaN and the gradient zeros, as on one device
    nothing = _case(options={"ignore_index": 5})
    nothing["target"][:] = 5
    cases["labels-all-ignored"] = nothing
    cases["probs-zero-weights"] = _case(labels=False, options={"sample_weight": np.zeros(N)})
    # a whole shard of −inf logits in a row that does not count
    masked = _case(options={"label_smoothing": 0.1, "class_weight": True, "ignore_index": 9})
    masked["logits"][0, K // 2:] = -np.inf
    masked["target"][0] = 9
    cases["labels-masked-shard"] = masked
    masked_p = _case(labels=False, options={"label_smoothing": 0.1,
                                            "sample_weight": np.r_[0.0, np.ones(N - 1)]})
    masked_p["logits"][0, K // 2:] = -np.inf
    cases["probs-masked-shard"] = masked_p
    # NaN stays NaN, per row: a NaN logit, a +inf logit, an ignored row with a NaN, a row of
    # −inf logits with label smoothing
    nan = _case(options={"reduction": "none", "ignore_index": 2, "label_smoothing": 0.1},
                upstream=np.ones(N))
    nan["logits"][0, 3] = np.nan
    nan["logits"][1, 30] = np.inf
    nan["target"][1] = 4
    nan["logits"][2, 11] = np.nan
    nan["target"][2] = 2
    nan["logits"][3] = -np.inf
    cases["labels-nan-policy"] = nan
    # the options as each rank writes them: 2 and 2.0, np.int64 and int
    spelled = _case(options={"softcap": 2.0, "ignore_index": 7})
    spelled["options_override"] = {1: {"softcap": 2, "ignore_index": np.int64(7)}}
    cases["labels-options-spelled-differently"] = spelled
    return cases


H = 6


def _linear_case(*, labels=True, options=None, dtype="float32", bias=True, chunk_mb=4e-4,
                 upstream=None, lead=None):
    case = _case(labels=labels, options=options, dtype=dtype, lead=lead, upstream=upstream,
                 call={"chunk_mb": chunk_mb})  # about 5 tokens per chunk: several chunks
    lead_shape = case["logits"].shape[:-1]
    case["kind"] = "linear"
    case["hidden"] = RNG.standard_normal((*lead_shape, H))
    case["weight"] = RNG.standard_normal((K, H)) * 0.8
    case["bias"] = RNG.standard_normal(K) * 0.5 if bias else None
    del case["logits"]
    return case


def _linear_cases():
    cases = {}
    for labels in (True, False):
        kind = "labels" if labels else "probs"
        for name in ("plain", "smoothing", "all"):
            cases[f"linear-{kind}-{name}"] = _linear_case(labels=labels,
                                                          options=OPTION_SETS[name])
        cases[f"linear-{kind}-none"] = _linear_case(
            labels=labels, options={"reduction": "none", "z_loss": 1e-3},
            upstream=RNG.standard_normal(N))
    cases["linear-no-bias-float64"] = _linear_case(bias=False, dtype="float64",
                                                   options={"sample_weight": True,
                                                            "reduction": "sum"})
    cases["linear-lead-axes"] = _linear_case(lead=(3, 4), options={"ignore_index": 2})
    cases["linear-one-chunk"] = _linear_case(chunk_mb=256, options={"softcap": 3.0})
    return cases


def _error_cases():
    cases = {}
    overlap = _case(call={"vocab_start": "given"})
    overlap["vocab_start_override"] = {1: 5}
    cases["overlap"] = overlap
    rows = _case()
    rows["rows_override"] = {1: N - 2}
    cases["rows"] = rows
    outside = _case()
    outside["target"][4] = K + 3
    cases["label-outside"] = outside
    bad_local = _case()
    bad_local["target_override"] = {1: np.zeros((N, 2), np.float32)}
    cases["bad-local-target"] = bad_local
    focal = _case(options={"focal_gamma": 2.0})
    cases["focal"] = focal
    gap = _case(call={"vocab_start": "given"})
    gap["vocab_start_override"] = {0: 1}
    cases["gap"] = gap
    swapped = _case()  # the same labels on every rank but two, swapped on rank 1
    swapped["target"][:2] = [1, 2]
    swapped["target_override"] = {1: np.r_[2, 1, swapped["target"][2:]]}
    cases["labels-differ"] = swapped
    fast = _case(options={"validate": False}, call={"vocab_start": "given"})
    fast["target_override"] = {1: np.zeros((N, 2), np.float32)}
    cases["fast-path-local-error"] = fast
    cases["inf-weights"] = _case(options={"sample_weight": np.r_[np.inf, np.ones(N - 1)]})
    return cases


def _launch(world, cases, tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    cases_file = tmp / "cases.pkl"
    with open(cases_file, "wb") as f:
        pickle.dump(cases, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world),
                               str(tmp / "store"), str(cases_file), str(tmp)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    results = []
    for r in range(world):
        with open(tmp / f"rank{r}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _single_device(case):
    """The single-device loss and gradient of the joined logits, in float64."""
    z, t = case["logits"], case["target"]
    opts = dict(case["options"])
    for key in ("class_weight", "sample_weight"):
        if key in opts:
            opts[key] = np.asarray(opts[key], np.float64)
    if case["dtype"] == "bfloat16":  # the ranks see the logits rounded to bfloat16
        z = torch.from_numpy(z).to(torch.bfloat16).double().numpy()
        if t.dtype.kind == "f":
            t = torch.from_numpy(t).to(torch.bfloat16).double().numpy()
    elif case["dtype"] == "float32":
        z = z.astype(np.float32).astype(np.float64)
        if t.dtype.kind == "f":
            t = t.astype(np.float32).astype(np.float64)
    value, grad = gl.cce_with_logits.value_and_grad(z, t, **opts)
    up = case.get("upstream")
    if up is not None:  # the gradient of Σ g_i l_i
        sw = opts.get("sample_weight", 1.0) * up  # (negative weights: no range check)
        grad = gl.cce_with_logits.grad(z, t, **dict(opts, reduction="sum", sample_weight=sw,
                                                     validate=False))
    return np.asarray(value), np.asarray(grad)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cases = _cases()
    errors = _error_cases()
    linear = _linear_cases()
    # one launch per world size for all the cases (the split-invariant mode's too: det_runs);
    # the bad layouts need two ranks or more
    out = _once(tmp_path_factory, "runs", lambda tmp: {
        world: _launch(world, {**cases, **linear, **_det_cases(),
                               **(errors if world > 1 else {})}, tmp / f"w{world}")
        for world in (1, 2, 4)})
    return cases, errors, out, linear


def _once(tmp_path_factory, name, launch):
    """The groups' results, launched by one test worker (pytest -n) and read by the others
    from a folder they share: the launches are the module's cost."""
    import fcntl

    base = tmp_path_factory.getbasetemp()  # under xdist, each worker's: their parent is the run's
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "distributed"
    root.mkdir(exist_ok=True)
    done = root / f"{name}.pkl"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            results = launch(root / name)
            with open(done, "wb") as f:
                pickle.dump(results, f)
    with open(done, "rb") as f:
        return pickle.load(f)


TOL = {"float32": 2e-6, "float64": 1e-12, "bfloat16": 2e-2}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_option_equals_the_single_device_loss(runs, world):
    cases, _, out, _ = runs
    checked = 0
    for name, case in cases.items():
        ref_v, ref_g = _single_device(case)
        tol = TOL[case["dtype"]]
        joined = None
        for r in range(world):
            res = out[world][r][name]
            assert "error" not in res, (name, r, res.get("trace"))
            np.testing.assert_allclose(res["value"], ref_v, rtol=tol, atol=tol,
                                       err_msg=f"{name} rank {r}")
            g = res["grads"][0]
            joined = g if joined is None else np.concatenate([joined, g], axis=-1)
        # every rank holds the same loss, bit for bit
        for r in range(1, world):
            assert np.array_equal(out[world][r][name]["value"], out[world][0][name]["value"],
                                  equal_nan=True)
        scale = max(np.max(np.abs(ref_g[np.isfinite(ref_g)]), initial=0), 1e-30)
        np.testing.assert_allclose(joined, ref_g, rtol=tol, atol=tol * scale,
                                   err_msg=name)
        checked += 1
    assert checked == len(cases)


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_with_none_of_the_labels_gets_its_gradient(runs, world):
    cases, _, out, _ = runs
    _, ref_g = _single_device(cases["labels-on-one-rank"])
    last = out[world][world - 1]["labels-on-one-rank"]["grads"][0]
    start = cases["labels-on-one-rank"]["starts"][world][world - 1]
    assert np.all(cases["labels-on-one-rank"]["target"] < start)
    assert np.any(last != 0)
    np.testing.assert_allclose(last, ref_g[:, start:], rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize(("case", "error", "words"), [
    ("overlap", "ValueError", "overlap"),
    ("gap", "ValueError", "No rank holds classes [0, 1)"),
    ("rows", "ValueError", "number of tokens"),
    ("label-outside", "ValueError", "class indices"),
    ("focal", "TypeError", "focal_gamma"),
])
def test_a_bad_layout_raises_the_same_error_on_every_rank(runs, world, case, error, words):
    _, _, out, _ = runs
    for r in range(world):
        res = out[world][r][case]
        assert res.get("error") == error, (r, res)
        assert words in res["message"], (r, res["message"])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", ["bad-local-target", "fast-path-local-error"])
def test_a_rank_that_refuses_its_input_stops_every_rank(runs, world, case):
    """With the layout check, and on the fast path (validate=False, vocab_start given), whose
    maxima's exchange carries the refusal."""
    _, _, out, _ = runs
    own = out[world][1][case]
    assert own["error"] == "ValueError" and "Shape mismatch" in own["message"]
    for r in set(range(world)) - {1}:
        res = out[world][r][case]
        assert res["error"] == "RuntimeError" and "refused its inputs" in res["message"], res


@pytest.mark.parametrize("world", [2, 4])
def test_labels_that_differ_between_ranks_are_refused_everywhere(runs, world):
    _, _, out, _ = runs
    for r in range(world):
        res = out[world][r]["labels-differ"]
        assert res["error"] == "ValueError" and "labels or sample weights" in res["message"]


@pytest.mark.parametrize("world", [2, 4])
def test_infinite_weights_are_refused_as_on_one_device(runs, world):
    _, _, out, _ = runs
    for r in range(world):
        res = out[world][r]["inf-weights"]
        assert res["error"] == "ValueError", res
        assert "sample_weight must be non-negative and not NaN or infinite" in res["message"]


def _linear_single_device(case):
    """gpuloss.linear_cross_entropy with the joined weight, in float64: (value, grads)."""
    opts = dict(case["options"])
    for key in ("class_weight", "sample_weight"):
        if key in opts:
            opts[key] = np.asarray(opts[key], np.float64)
    rnd = np.float32 if case["dtype"] == "float32" else np.float64
    h = case["hidden"].astype(rnd).astype(np.float64)
    W = case["weight"].astype(rnd).astype(np.float64)
    b = None if case["bias"] is None else case["bias"].astype(rnd).astype(np.float64)
    t = case["target"]
    if t.dtype.kind == "f":
        t = t.astype(rnd).astype(np.float64)
    value, grads = gl.linear_cross_entropy.value_and_grad(h, W, t, bias=b, **opts)
    up = case.get("upstream")
    if up is not None:
        sw = opts.get("sample_weight", 1.0) * up
        grads = gl.linear_cross_entropy.grad(h, W, t, bias=b, **dict(
            opts, reduction="sum", sample_weight=sw, validate=False))
    return np.asarray(value), [np.asarray(g) for g in grads]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_linear_cross_entropy_over_split_weights_equals_the_single_device_loss(runs, world):
    _, _, out, cases = runs
    for name, case in cases.items():
        ref_v, ref_g = _linear_single_device(case)
        tol = 5e-6 if case["dtype"] == "float32" else 1e-11
        shards = []
        for r in range(world):
            res = out[world][r][name]
            assert "error" not in res, (name, r, res.get("trace"))
            np.testing.assert_allclose(res["value"], ref_v, rtol=tol, atol=tol,
                                       err_msg=f"{name} rank {r}")
            # hidden's gradient is summed over the ranks: complete on every rank
            np.testing.assert_allclose(res["grads"][0], ref_g[0], rtol=tol,
                                       atol=tol * np.abs(ref_g[0]).max(), err_msg=name)
            shards.append(res["grads"][1:])
        for i, ref in enumerate(ref_g[1:]):  # d_weight, d_bias: each rank its rows
            joined = np.concatenate([sh[i] for sh in shards], axis=0)
            np.testing.assert_allclose(joined, ref, rtol=tol, atol=tol * np.abs(ref).max(),
                                       err_msg=f"{name} grad {i + 1}")


# ---------------------------------------------------------------------------------------------
# the split-invariant mode: bit-identical for 1, 2, 4 and 8 ranks

DET_K, DET_BLOCK = 61, 8  # the last block is partial: 61 = 7 × 8 + 5
DET_LAYOUT = {  # shards of whole blocks, uneven on purpose
    1: [0, 61],
    2: [0, 32, 61],
    4: [0, 16, 24, 48, 61],
    8: [0, 8, 16, 24, 32, 40, 48, 56, 61],
}


def _det(case):
    case["starts"] = {w: cuts[:-1] for w, cuts in DET_LAYOUT.items()}
    case["widths"] = {w: [b - a for a, b in itertools.pairwise(cuts)]
                      for w, cuts in DET_LAYOUT.items()}
    case["call"] = dict(case["call"], deterministic=True, block=DET_BLOCK)
    return case


@functools.cache  # one draw: the runs of every world size get the same data
def _det_cases():
    opts = OPTION_SETS["all"]
    cases = {
        "det-labels": _det(_case(options=opts, k=DET_K)),
        "det-probs": _det(_case(labels=False, options=opts, k=DET_K)),
        "det-labels-none": _det(_case(options={"reduction": "none"}, k=DET_K,
                                      upstream=RNG.standard_normal(N))),
    }
    lin = _linear_case(options={"label_smoothing": 0.1, "z_loss": 1e-3}, chunk_mb=1e-3)
    lin["weight"] = RNG.standard_normal((DET_K, H))
    lin["bias"] = RNG.standard_normal(DET_K)
    lin["target"] = RNG.integers(0, DET_K, N)
    cases["det-linear"] = _det(lin)
    empty = _det(_case(options={"label_smoothing": 0.1}, k=DET_K))  # a rank of no classes
    empty["starts"][4], empty["widths"][4] = [0, 16, 16, 40], [16, 0, 24, 21]
    cases["det-empty-shard"] = empty
    misaligned = _det(_case(k=DET_K))
    misaligned["starts"] = {2: [0, 30]}
    misaligned["widths"] = {2: [30, 31]}
    cases["det-misaligned"] = misaligned
    return cases


@pytest.fixture(scope="module")
def det_runs(runs, tmp_path_factory):
    """The 1-, 2- and 4-rank results come from `runs`; 8 ranks are launched here."""
    cases = _det_cases()
    out = _once(tmp_path_factory, "det_runs", lambda tmp: {8: _launch(8, cases, tmp / "det8")})
    out.update({w: runs[2][w] for w in (1, 2, 4)})
    return cases, out


def _joined(results, name, world, i, axis):
    return np.concatenate([results[world][r][name]["grads"][i] for r in range(world)],
                          axis=axis)


@pytest.mark.parametrize("name", ["det-labels", "det-probs", "det-labels-none",
                                  "det-empty-shard"])
def test_deterministic_mode_is_bit_identical_for_1_2_4_and_8_ranks(det_runs, name):
    cases, out = det_runs
    one_value = out[1][0][name]["value"]
    one_grad = out[1][0][name]["grads"][0]
    for world in (2, 4, 8):
        for r in range(world):
            assert "error" not in out[world][r][name], out[world][r][name].get("trace")
            assert np.array_equal(out[world][r][name]["value"], one_value), (world, r)
        assert np.array_equal(_joined(out, name, world, 0, -1), one_grad), world
    ref_v, ref_g = _single_device(cases[name])  # and right, to rounding
    np.testing.assert_allclose(one_value, ref_v, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(one_grad, ref_g, rtol=2e-6, atol=2e-6 * np.abs(ref_g).max())


def test_deterministic_linear_cross_entropy_is_bit_identical_except_d_hidden(det_runs):
    cases, out = det_runs
    name = "det-linear"
    first = out[1][0][name]
    for world in (2, 4, 8):
        for r in range(world):
            assert np.array_equal(out[world][r][name]["value"], first["value"]), (world, r)
        for i in (1, 2):  # d_weight, d_bias: each rank its rows
            assert np.array_equal(_joined(out, name, world, i, 0), first["grads"][i]), world
        # d_hidden is summed over the ranks: equal to rounding
        np.testing.assert_allclose(out[world][0][name]["grads"][0], first["grads"][0],
                                   rtol=1e-5, atol=1e-6)
    ref_v, ref_g = _linear_single_device(cases[name])
    np.testing.assert_allclose(first["value"], ref_v, rtol=5e-6)
    for got, ref in zip(first["grads"], ref_g):
        np.testing.assert_allclose(got, ref, rtol=5e-6, atol=5e-6 * np.abs(ref).max())


def test_deterministic_mode_refuses_shards_that_cut_a_block(det_runs):
    _, out = det_runs
    for r in range(2):
        res = out[2][r]["det-misaligned"]
        assert res["error"] == "ValueError" and "whole blocks of 8" in res["message"], res
