"""Memory traffic of the kernels on the emulated device (issue 26, item 3).

The emulator counts, per launch and per array, the bytes each kernel reads and writes in
global memory and the 32-byte sectors each warp-wide access touches
(`EmulatorRuntime.traffic`, tests/cuda_emulator.h). A device moves memory in sectors, so
these two numbers are what a kernel's speed on a memory-bound loss comes down to:

- bytes: the minimum. Each input element is read once and the gradient written once; the
  design reads twice where it says so (a row longer than the register cache);
- sector efficiency (the share of each touched sector's bytes the lanes asked for) at least
  90% for contiguous inputs: a warp's lanes read neighbouring elements.

Inputs are contiguous, validated (the defaults) and aligned as device allocations are
(kernel_host.device_array); the grid is the emulator's (at most 3 blocks).
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest

import gpuloss as gl
from gpuloss.backends import cuda as _cuda_backend

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
          "float16": np.dtype(np.float16), "bfloat16": BF16}
BAR = 0.90  # sector efficiency every contiguous access must reach
LABEL = np.dtype(np.int64)

ELEMENTWISE = ["mse", "huber", "bce_with_logits", "bce"]
N = 3 * 256 * 2 + 100  # two grid-stride steps of the 3 blocks, and a partial warp
ROW_LOSSES = [("cce_with_logits", "labels"), ("cce_with_logits", "probabilities"),
              ("cce", "labels"), ("multiclass_hinge", "labels")]
KS = [2, 10, 64, 1000, 32768, 131072]


@pytest.fixture(scope="module")
def rt():
    import kernel_host

    return kernel_host._runtime("device")  # the shared build (cached on disk by content)


def _rows(K: int) -> int:
    """A batch that fills every row slot of the grid, whichever layout the backend picks
    (4 to 256 threads per row; checked by _layout): a dead slot would read row 0 again (see
    test_rows_ragged_batch_reads_each_row_once)."""
    return 192 if K <= 128 else 24 if K <= 8192 else 2


def _layout(t) -> tuple[int, int]:
    """(threads per row, values cached per thread) a row launch ran with: the template's
    ROW_THREADS and CACHE (gpuloss_rows<F, LABELS, ROW_THREADS, CACHE, TP, TT>), the threads
    from the row_threads argument where the template leaves them to the launch (0)."""
    args = t.kernel.rstrip(">").split(",")
    threads, cache = int(args[-4]), int(args[-3])
    return threads or int(t.scalars["row_threads"]), cache


def _check_full(t):
    threads, _ = _layout(t)
    slots = t.grid * (t.block // threads)
    assert t.scalars["rows"] % slots == 0, f"test setup: {t.scalars['rows']} rows, {slots} slots"


def _inputs(loss: str, targets: str, shape, dtype):
    import kernel_host

    rng = np.random.default_rng(26)
    if loss in ("bce", "cce"):  # probabilities
        pred = rng.uniform(0.05, 0.95, shape)
        if loss == "cce":
            pred /= pred.sum(-1, keepdims=True)
    else:
        pred = rng.standard_normal(shape)
    if targets == "labels":
        target = rng.integers(0, shape[-1], shape[:-1]).astype(LABEL)
    else:
        target = rng.uniform(0, 1, shape)
        if targets == "probabilities":
            target /= target.sum(-1, keepdims=True)
        target = target.astype(np.float32).astype(dtype)
    pred = pred.astype(np.float32).astype(dtype)  # bfloat16 casts from float32 only
    return kernel_host.device_array(pred), kernel_host.device_array(target)


@functools.cache
def _measure(loss: str, targets: str, shape: tuple, dtype_name: str):
    """The traffic of value_and_grad (mean) on these inputs: the loss's one kernel launch."""
    import kernel_host

    rt = kernel_host._runtime("device")
    pred, target = _inputs(loss, targets, shape, DTYPES[dtype_name])
    call = gl.LOSSES[loss].prepare(pred, target, {}, want_value=True, want_grad=True)
    with rt.traffic() as seen:
        _cuda_backend.compute(call, rt)
    assert len(seen) == 1, [t.kernel for t in seen]  # no check kernel, no cast: one launch
    return seen[0]


def _flows(traffic, names):
    """'name read/written: bytes, distinct bytes, efficiency' lines, for failure messages."""
    out = [traffic.kernel]
    for name in names:
        for way, f in (("read", traffic[name].read), ("written", traffic[name].written)):
            if f.accesses:
                out.append(f"  {name} {way}: {f.bytes} bytes, {f.distinct} distinct, "
                           f"{f.sectors} sectors, efficiency {f.efficiency:.3f}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# elementwise losses


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("loss", ELEMENTWISE)
def test_elementwise_moves_each_element_once(loss, dtype):
    """pred and target read once each, the gradient written once, nothing else but the
    block partials and the state word."""
    t = _measure(loss, "values", (N,), dtype)
    size = N * DTYPES[dtype].itemsize
    got = {"pred read": t["pred"].read.bytes, "pred distinct": t["pred"].read.distinct,
           "target read": t["target"].read.bytes,
           "target distinct": t["target"].read.distinct,
           "grad written": t["grad"].written.bytes, "grad distinct": t["grad"].written.distinct,
           "grad read": t["grad"].read.bytes}
    want = {k: 0 if k == "grad read" else size for k in got}
    assert got == want, _flows(t, ["pred", "target", "grad"])
    assert set(t.arrays) <= {"pred", "target", "grad", "partials", "state"}, t.arrays


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("loss", ELEMENTWISE)
def test_elementwise_sector_efficiency(loss, dtype):
    t = _measure(loss, "values", (N,), dtype)
    got = {"pred": t["pred"].read.efficiency, "target": t["target"].read.efficiency,
           "grad": t["grad"].written.efficiency}
    assert min(got.values()) >= BAR, (got, _flows(t, ["pred", "target", "grad"]))


# ---------------------------------------------------------------------------------------------
# row losses


def _row_cases():
    cases = []
    for loss, targets in ROW_LOSSES:
        for K in KS:
            # every dtype for the common loss; float32 for the others (the layout is the same)
            for dtype in DTYPES if loss == "cce_with_logits" else ["float32"]:
                cases.append(pytest.param(loss, targets, K, dtype,
                                          id=f"{loss}-{targets}-K{K}-{dtype}"))
    return cases


def _row_bytes(t, targets: str, K: int, itemsize: int):
    """(measured, wanted) bytes of a row launch, by what they count."""
    rows = t.scalars["rows"]
    threads, cache = _layout(t)
    size = rows * K * itemsize
    reads = 1 if cache else 2
    got = {"pred read": t["pred"].read.bytes, "pred distinct": t["pred"].read.distinct,
           "grad written": t["grad"].written.bytes, "grad distinct": t["grad"].written.distinct,
           "grad read": t["grad"].read.bytes}
    want = {"pred read": reads * size, "pred distinct": size, "grad written": size,
            "grad distinct": size, "grad read": 0}
    if targets == "labels":
        got["labels distinct"] = t["target"].read.distinct
        got["labels delivered"] = t["target"].read.group_bytes
        want["labels distinct"] = rows * LABEL.itemsize
        want["labels delivered"] = rows * LABEL.itemsize * max(1, threads // 32)
    else:
        got["target read"] = t["target"].read.bytes
        got["target distinct"] = t["target"].read.distinct
        want["target read"], want["target distinct"] = reads * size, size
    return got, want


@pytest.mark.parametrize(("loss", "targets", "K", "dtype"), _row_cases())
def test_rows_move_each_element_once(loss, targets, K, dtype):
    """pred read once when its row fits the register cache, twice otherwise (the design: a
    layout with cache 0, see row_config, reads the row again in its second pass, mostly from
    L2); probability targets the same as pred; each label once per row (every lane of the row
    asks for it: a broadcast, one delivery per warp of the row); the gradient written once."""
    t = _measure(loss, targets, (_rows(K), K), dtype)
    _check_full(t)
    got, want = _row_bytes(t, targets, K, DTYPES[dtype].itemsize)
    assert got == want, _flows(t, ["pred", "target", "grad"])
    assert set(t.arrays) <= {"pred", "target", "grad", "partials", "state"}, t.arrays


@pytest.mark.parametrize(("loss", "targets", "K", "dtype"), _row_cases())
def test_rows_sector_efficiency(loss, targets, K, dtype):
    """pred, probability targets and the gradient; a row's label is one value per row (its
    sectors are a rounding error of the row's) and is left out."""
    t = _measure(loss, targets, (_rows(K), K), dtype)
    _check_full(t)
    got = {"pred": t["pred"].read.efficiency, "grad": t["grad"].written.efficiency}
    if targets != "labels":
        got["target"] = t["target"].read.efficiency
    assert min(got.values()) >= BAR, (got, _flows(t, ["pred", "target", "grad"]))


@pytest.mark.parametrize("K", [10, 1000])
def test_rows_ragged_batch_reads_each_row_once(K):
    """A batch that leaves row slots of the last step empty (100 rows) reads no more than a
    full one: a slot without a row reads nothing."""
    t = _measure("cce_with_logits", "labels", (100, K), "float32")
    got, want = _row_bytes(t, "labels", K, 4)
    assert got == want, _flows(t, ["pred", "target", "grad"])


# ---------------------------------------------------------------------------------------------
# the counter itself


def _check_traffic(rt, a):
    """The traffic of gpuloss_check over float64 `a` (each thread reads its elements once,
    grid-stride: a warp reads 32 neighbours at a time)."""
    name = _cuda_backend.check_name(True, np.float64)
    args = (a, np.int64(a.size), np.int32(0), np.int32(4), np.zeros(1, np.int32))
    with rt.traffic() as seen:
        rt.kernel(name, None)((3,), (256,), args)
    assert len(seen) == 1 and seen[0].grid == 3 and seen[0].block == 256
    return seen[0]


def test_counter_on_a_known_access_pattern(rt):
    """3 blocks of 256 threads over 1536 float64: 48 warp-wide reads of 256 bytes, 8 sectors
    each when aligned, 9 when the array starts 8 bytes past a sector."""
    import kernel_host

    a = kernel_host.device_array(np.ones(1537))
    flow = _check_traffic(rt, a[:1536])["a"].read
    assert (flow.accesses, flow.bytes, flow.distinct, flow.groups, flow.sectors,
            flow.group_bytes) == (1536, 1536 * 8, 1536 * 8, 48, 48 * 8, 1536 * 8)
    assert flow.efficiency == 1.0
    shifted = _check_traffic(rt, a[1:])["a"].read
    assert (shifted.bytes, shifted.sectors) == (1536 * 8, 48 * 9)
    assert shifted.efficiency == pytest.approx(8 / 9)


def test_counter_is_off_outside_traffic(rt):
    """No counts outside the context, and launches inside it are each reported."""
    import kernel_host

    a = kernel_host.device_array(np.ones(100))
    name = _cuda_backend.check_name(True, np.float64)
    args = (a, np.int64(a.size), np.int32(0), np.int32(4), np.zeros(1, np.int32))
    rt.kernel(name, None)((1,), (256,), args)
    assert rt.lib.gl_emu_trace_count() == 0
    with rt.traffic() as seen:
        rt.kernel(name, None)((1,), (256,), args)
        rt.kernel(name, None)((1,), (256,), args)
    assert [t["a"].read.bytes for t in seen] == [800, 800]
    rt.kernel(name, None)((1,), (256,), args)
    assert rt.lib.gl_emu_trace_count() == 0 and len(seen) == 2
