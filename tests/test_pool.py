"""The CPU output-buffer pool: memory is reused only when nothing can still see it."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import _pool

SHAPE = (512, 1024)  # 2 MiB of float32, above the pool's threshold


@pytest.fixture(autouse=True)
def fresh_pool():
    _pool.clear()
    yield
    _pool.clear()


def test_dropped_gradients_are_reused():
    first = _pool.empty(SHAPE, np.float32)
    address = first.ctypes.data
    del first
    gc.collect()
    assert _pool.empty(SHAPE, np.float32).ctypes.data == address


@pytest.mark.parametrize("keep", [
    lambda a: a[::2],                      # a view
    lambda a: a.reshape(-1)[10:],          # a view of a view
    lambda a: memoryview(a),               # the buffer protocol
    lambda a: np.frombuffer(a, np.uint8),  # an array over its buffer
    lambda a: a.T,
])
def test_memory_still_visible_is_never_handed_out(keep):
    first = _pool.empty(SHAPE, np.float32)
    first[...] = 7
    kept = keep(first)
    before = np.asarray(kept).copy()
    del first
    gc.collect()
    second = _pool.empty(SHAPE, np.float32)
    second[...] = 0
    assert np.array_equal(np.asarray(kept), before), "a live view saw its memory reused"


def test_gradients_returned_to_the_caller_stay_intact_across_calls():
    rng = np.random.default_rng(0)
    p, y = rng.standard_normal(SHAPE, dtype=np.float32), rng.standard_normal(SHAPE, dtype=np.float32)
    g1 = gl.mse.grad(p, y)
    keep = g1.copy()
    g2 = gl.mse.grad(p + 1, y)
    assert not np.shares_memory(g1, g2)
    np.testing.assert_array_equal(g1, keep)


def test_pool_can_be_disabled(monkeypatch):
    monkeypatch.setenv("GPULOSS_POOL_BYTES", "0")
    a = _pool.empty(SHAPE, np.float32)
    assert not _pool._owners  # nothing kept: the memory goes with the array
    assert a.ctypes.data % _pool.ALIGN == 0 and a.shape == SHAPE and a.flags.c_contiguous


def test_large_buffers_are_aligned_for_jax():
    """Large buffers are 64-byte aligned (JAX takes them without a copy), pooled or not."""
    for dtype in (np.float32, np.float64, np.int8):
        for shape in ((1024, 1024), (1 << 20) + 3, (513, 2049)):  # all >= MIN_BYTES
            a = _pool.empty(shape, dtype)
            assert a.ctypes.data % _pool.ALIGN == 0, (dtype, shape)
            a[...] = 1  # the whole array is writable memory of its own
            assert a.nbytes == np.prod(shape) * np.dtype(dtype).itemsize


def test_pool_holds_at_most_its_limit(monkeypatch):
    monkeypatch.setenv("GPULOSS_POOL_BYTES", str(5 << 20))
    for _ in range(10):
        _pool.empty(SHAPE, np.float32)  # each dropped at once
        _pool.empty((1024, 1024), np.float32)  # another size
    assert sum(o.nbytes for o in _pool._owners) <= 5 << 20


def test_fortran_order_and_small_arrays():
    f = _pool.empty((256, 2048), np.float64, order="F")
    assert f.flags.f_contiguous and f.shape == (256, 2048)
    small = _pool.empty((10,), np.float32)
    assert small.base is None  # small arrays come straight from NumPy


def test_a_huge_rows_scratch_is_not_kept_after_the_call():
    """Each thread keeps its block-sized scratch from call to call; a row longer than a
    block gets buffers of its own size, which go with the call (a review found 192 MiB kept
    after one 2^24-class row)."""
    from gpuloss.backends import numpy as nb

    K = nb.ROW_BLOCK * 4
    z = np.random.default_rng(0).standard_normal((1, K)).astype(np.float32)
    t = np.full_like(z, 1.0 / K)
    gl.cce_with_logits.value_and_grad(z, t, label_smoothing=0.1)
    kept = nb._thread_scratch()._bufs.values()
    assert kept and max(b.size for b in kept) <= nb.ROW_BLOCK
