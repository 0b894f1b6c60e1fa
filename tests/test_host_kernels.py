"""The compiled CPU kernels (kernels/gpuloss_host.cpp, gpuloss.backends.host) against the
NumPy backend, which computes every call they take as well: the same numbers within the
agreement tolerances of the CUDA path (tests/agreement.py), NaN and infinities in the same
places, the same errors (raised by the NumPy backend, to which a call that fails a check
falls back), and a float32 exp within 0.99 ulp."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from agreement import RTOL
from conftest import FULL_SWEEPS
from conftest import run_python as _run

import gpuloss as gl
from gpuloss import _api, _call, _host_build, _pool
from gpuloss.backends import host
from gpuloss.backends import numpy as numpy_backend

ELEMENTWISE = [name for name, loss in gl.LOSSES.items()
               if loss.family == _call.ELEMENTWISE and name in (
                   "mse", "mae", "huber", "smooth_l1", "log_cosh", "poisson_nll", "pinball",
                   "bce", "bce_with_logits", "hinge", "squared_hinge")]


@pytest.fixture(scope="module")
def mod():
    m = _host_build.module()
    assert m is not None, _host_build.status()  # the test machines have a C++ compiler
    return m


def _both(name, pred, target, **options):
    """(host, numpy) results of one checked call; host must take it."""
    call = _api.prepare(name, pred, target, options, want_value=True, want_grad=True)
    got = host.compute(call)
    assert got is not None, f"the compiled kernels did not take {name} {options}"
    return got, numpy_backend.compute(call)


def _agree(got, want, dtype):
    rtol = RTOL[np.dtype(dtype).name]
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape
        assert np.array_equal(np.isnan(g), np.isnan(w))
        assert np.array_equal(np.isposinf(g), np.isposinf(w))
        assert np.array_equal(np.isneginf(g), np.isneginf(w))
        finite = np.isfinite(w)
        scale = float(np.abs(w[finite]).max()) if finite.any() else 0.0
        np.testing.assert_allclose(g[finite], w[finite], rtol=rtol, atol=rtol * scale)


def test_every_elementwise_functor_is_compiled(mod):
    """A functor added to gpuloss_math.cuh and declared by a loss must join the host table
    (gpuloss_host.cpp, ELEMENTWISE), or its calls silently lose the compiled path."""
    declared = set(_call.declared_kernels(_call.ELEMENTWISE))
    variants = {f"{f}<0>" if f == "GlBceLogits" else f for f in declared}
    assert variants <= set(mod.ELEMENTWISE)
    assert "GlBceLogits<1>" in mod.ELEMENTWISE  # the focal variant


def test_exp_f32_within_0_99_ulp(mod):
    rng = np.random.default_rng(0)
    bits = rng.integers(0x80000000, 0xC2D00000, 2_000_000, dtype=np.uint32)  # [-104, -0]
    x = np.concatenate([np.linspace(-110, 0, 1_000_001, dtype=np.float32),
                        bits.view(np.float32), np.float32([-5.8778844]),  # (the worst found)
                        -np.abs(rng.standard_normal(200_000)).astype(np.float32) * 40,
                        -rng.random(100_000).astype(np.float32) * 1e-6])
    out = np.empty_like(x)
    mod.exp_f32(x, out, x.size)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert float(np.max(np.abs(out - exact) / ulp)) <= 0.99
    special = np.array([0.0, -0.0, np.nan, -np.inf, -1e-45, -103.9, -104.0, -800.0, -87.5,
                        -3.4e38], np.float32)
    out = np.empty_like(special)
    mod.exp_f32(special, out, special.size)
    np.testing.assert_array_equal(out, np.exp(special))


@pytest.mark.skipif(not FULL_SWEEPS, reason="every float in [-104, 0]: GPULOSS_FULL_SWEEPS=1")
def test_exp_f32_within_0_99_ulp_on_every_float(mod):
    worst = 0.0
    for start in range(0x80000000, 0xC2D00001, 1 << 24):
        bits = np.arange(start, min(start + (1 << 24), 0xC2D00001), dtype=np.uint64)
        x = bits.astype(np.uint32).view(np.float32)
        out = np.empty_like(x)
        mod.exp_f32(x, out, x.size)
        exact = np.exp(x.astype(np.float64))
        ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
        worst = max(worst, float(np.max(np.abs(out - exact) / ulp)))
    assert worst <= 0.99


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_agrees_with_numpy(name, dtype):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    n = 1000
    p = rng.standard_normal(n).astype(dtype) * 3
    y = rng.standard_normal(n).astype(dtype)
    if name in ("bce", "bce_with_logits"):
        y = rng.random(n).astype(dtype)
        if name == "bce":
            p = rng.random(n).astype(dtype)
            p[:3] = [0, 1, 1e-30]
    if name in ("hinge", "squared_hinge"):
        y = np.where(rng.random(n) < 0.5, -1, 1).astype(dtype)
    if name == "poisson_nll":
        y = np.abs(y)
    p[-1], y[-1] = np.nan, y[0]  # NaN propagates
    for reduction in ("mean", "sum", "none"):
        _agree(*_both(name, p, y, reduction=reduction), dtype)
    if name == "bce_with_logits":
        _agree(*_both(name, p, y, focal_gamma=2.0, label_smoothing=0.1), dtype)
    if name == "huber":
        _agree(*_both(name, p, y, delta=0.5), dtype)


def _rows(K, dtype, rng):
    R = 64
    z = (rng.standard_normal((R, K)) * 4).astype(dtype)
    y = rng.integers(0, K, R)
    # the edges: NaN, +-inf, ties at huge values, a row of -inf, a confident row
    z[1, -1] = np.nan
    z[2, :] = -np.inf
    z[3, K // 2] = np.inf
    z[4, :] = np.finfo(dtype).max
    z[5, 0] = np.inf
    z[5, -1] = -np.inf
    z[6, y[6]] = 200.0
    z[7, :] = -np.finfo(dtype).max
    if K > 1:
        z[8, 1] = np.nan
        z[8, 0] = np.inf
    return z, y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("K", [1, 2, 7, 15, 16, 17, 33, 255, 256, 1000])
def test_cce_labels_agrees_with_numpy(K, dtype):
    rng = np.random.default_rng(K)
    z, y = _rows(K, dtype, rng)
    for reduction in ("mean", "sum", "none"):
        _agree(*_both("cce_with_logits", z, y, reduction=reduction), dtype)
        _agree(*_both("cce_with_logits", z, y.astype(np.int32), reduction=reduction), dtype)
    ignored = y.copy()
    ignored[::3] = -100
    _agree(*_both("cce_with_logits", z, ignored, ignore_index=-100), dtype)
    ignored[::3] = K - 1  # an ignore_index that is also a class
    _agree(*_both("cce_with_logits", z, ignored, ignore_index=K - 1, reduction="none"), dtype)
    bad = y.copy()
    bad[::5] = K + 3  # out of range, unchecked: those rows are NaN
    _agree(*_both("cce_with_logits", z, bad, validate=False, reduction="none"), dtype)


def test_cce_labels_3d_and_in_place():
    """Rows of a (B, T, K) batch, and the gradient written over the logits themselves (linear
    cross-entropy's chunks)."""
    rng = np.random.default_rng(5)
    z = rng.standard_normal((3, 5, 300)).astype(np.float32)
    y = rng.integers(0, 300, (3, 5))
    _agree(*_both("cce_with_logits", z, y), np.float32)
    want = numpy_backend.compute(_api.prepare("cce_with_logits", z, y, {}, want_value=True,
                                              want_grad=True))
    buf = z.copy()
    call = _api.prepare("cce_with_logits", buf, y, {}, want_value=True, want_grad=True,
                        grad_out=buf)
    value, grad = host.compute(call)
    assert grad is buf
    _agree((value, grad), want, np.float32)


def test_losses_route_to_the_compiled_kernels(mod, monkeypatch):
    """A plain call on NumPy arrays and on torch CPU tensors computes on the compiled kernels;
    a call they do not take, or whose data fail a check, gets the NumPy backend's result or
    error."""
    calls = []
    real = host.compute
    monkeypatch.setattr(host, "compute", lambda c: calls.append(real(c)) or calls[-1])
    z = np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)
    y = np.arange(8) % 5
    gl.cce_with_logits.value_and_grad(z, y)
    assert calls[-1] is not None
    gl.mse(z, z + 1)
    assert calls[-1] is not None
    gl.cce_with_logits(z, y, label_smoothing=0.1)  # not taken: the NumPy backend's
    assert calls[-1] is None
    with pytest.raises(ValueError, match=r"class indices in \[1, 5\]"):
        gl.cce_with_logits(z, y + 1)  # 5 is out of range: the NumPy backend raises
    with pytest.raises(ValueError, match="pred"):
        gl.bce(z, np.zeros_like(z))  # outside [0, 1]
    torch = pytest.importorskip("torch")
    real_torch = host.compute_torch
    monkeypatch.setattr(host, "compute_torch",
                        lambda c: calls.append(("torch", real_torch(c))) or calls[-1][1])
    gl.cce_with_logits(torch.from_numpy(z), torch.from_numpy(y))  # straight on the tensors
    assert calls[-1][0] == "torch" and calls[-1][1] is not None
    gl.cce_with_logits(torch.from_numpy(z).t().contiguous().t(), torch.from_numpy(y))
    assert calls[-1] is not None and calls[-1][0] != "torch"  # a transposed pred: the views'
    calls.clear()
    gl.mse(torch.from_numpy(z), torch.from_numpy(z + 1))
    assert calls and calls[-1][0] == "torch" and calls[-1][1] is not None


CHECK = """
import numpy as np, gpuloss as gl
from gpuloss import _host_build
z = np.random.default_rng(0).standard_normal((16, 10)).astype(np.float32)
y = np.arange(16) % 10
v, g = gl.cce_with_logits.value_and_grad(z, y)
ref = -np.log(np.exp(z[np.arange(16), y]) / np.exp(z).sum(1)).mean()
assert abs(float(v) - ref) < 1e-5 * abs(ref), (v, ref)
print(_host_build.status())
"""


def test_turned_off_and_failed_builds_fall_back_to_numpy(tmp_path):
    out = _run({"GPULOSS_HOST_KERNELS": "0"}, CHECK)
    assert "not in use: GPULOSS_HOST_KERNELS=0" in out
    out = _run({"CXX": "false", "GPULOSS_CACHE_DIR": str(tmp_path)}, CHECK)
    assert "not in use: the C++ build failed" in out
    out = _run({"GPULOSS_CACHE_DIR": str(tmp_path)}, CHECK)  # a fresh build, then cached
    assert out.startswith("compiled") and str(tmp_path) in out
    assert len(list(tmp_path.glob("_gpuloss_host-*"))) == 1


@pytest.mark.parametrize("team", [False, True], ids=["our pool", "PyTorch's team"])
def test_rows_split_over_threads_give_the_same_bits(mod, monkeypatch, team):
    """Large row passes run in blocks of rows on several threads (our pool's, or PyTorch's
    OpenMP team); each block's sum is kept apart and added in block order: 1, 2 and 5
    threads give bit-identical results, and calls from several Python threads at once too."""
    import threading

    if team:
        pytest.importorskip("torch")  # (which loads its OpenMP runtime)
        if not mod.openmp_team():
            pytest.skip("no OpenMP runtime loaded beside torch here")
    policy = host._threads  # its thread count, on the threads this case is about
    monkeypatch.setattr(host, "_threads",
                        lambda n, torch_pool=False: (policy(n, torch_pool)[0], int(team)))
    rng = np.random.default_rng(3)
    cases = [(4096, 100), (7, 20000), (70000, 3)]
    results = {}
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("GPULOSS_NUM_THREADS", threads)
        for R, K in cases:
            z = rng.standard_normal((R, K)).astype(np.float32) if threads == "1" else None
            if z is not None:
                results[(R, K, "data")] = (z, rng.integers(0, K, R))
            z, y = results[(R, K, "data")]
            call = _api.prepare("cce_with_logits", z, y, {}, want_value=True, want_grad=True)
            results[(R, K, threads)] = host.compute(call)
    for R, K in cases:
        v1, g1 = results[(R, K, "1")]
        for threads in ("2", "5"):
            v, g = results[(R, K, threads)]
            assert v == v1 and np.array_equal(g, g1)
        z, y = results[(R, K, "data")]
        want = numpy_backend.compute(_api.prepare("cce_with_logits", z, y, {},
                                                  want_value=True, want_grad=True))
        _agree((v1, g1), want, np.float32)
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "2")
    z, y = results[(4096, 100, "data")]
    errors, outs = [], []

    def caller():
        try:
            outs.append(gl.cce_with_logits.value_and_grad(z, y))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(v == outs[0][0] and np.array_equal(g, outs[0][1]) for v, g in outs)


def test_a_broken_build_or_cache_never_breaks_a_call(tmp_path):
    """A compiler that writes bytes of no encoding, and a cached file cut short, still give
    the NumPy backend's result (first case) or a fresh build (second)."""
    cc = tmp_path / "cc.sh"
    cc.write_text('#!/bin/sh\nprintf "error: \\377\\376\\n" >&2\nexit 1\n')
    cc.chmod(0o755)
    out = _run({"CXX": str(cc), "GPULOSS_CACHE_DIR": str(tmp_path / "a")}, CHECK)
    assert "not in use: the C++ build failed" in out
    cache = tmp_path / "b"
    _run({"GPULOSS_CACHE_DIR": str(cache)}, CHECK)
    (built,) = cache.glob("_gpuloss_host-*")
    built.write_bytes(b"not a shared object")
    out = _run({"GPULOSS_CACHE_DIR": str(cache)}, CHECK)
    assert out.startswith("compiled")
    assert built.stat().st_size > 1000


def test_no_memory_for_the_scratch_falls_back_instead_of_aborting():
    """The C++ scratch of a value-only call (one row of 2e8 classes here) cannot be allocated
    under a 1.5 GB address-space limit: the call falls back to the NumPy backend, which
    computes it in blocks or raises MemoryError; the process never aborts."""
    code = """
import resource, numpy as np, gpuloss as gl
from gpuloss import _host_build
assert _host_build.module() is not None  # built and loaded before the limit
z = np.zeros((1, 200_000_000), np.float32)
resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))
try:
    v = gl.cce_with_logits(z, np.zeros(1, np.int64))
    assert abs(float(v) - np.log(2e8)) < 1e-3 * np.log(2e8), v
    print("computed")
except MemoryError:
    print("MemoryError")
"""
    out = _run({"GPULOSS_NUM_THREADS": "1"}, code)
    assert out.strip() in ("computed", "MemoryError")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_torch_tensors_straight_give_the_bits_of_their_numpy_views(dtype):
    """compute_torch (the tensors' addresses, results allocated by torch) and compute (NumPy
    views) run the same kernels: the same bits, every reduction, edge rows included."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    cases = []
    z, y = _rows(33, dtype, rng)
    for reduction in ("mean", "sum", "none"):
        cases.append(("cce_with_logits", z, y, {"reduction": reduction}))
        cases.append(("cce_with_logits", z, y.astype(np.int32),
                      {"reduction": reduction, "ignore_index": 3}))
    p = rng.standard_normal(500).astype(dtype)
    q = rng.random(500).astype(dtype)
    for name in ("mse", "huber", "bce_with_logits"):
        for reduction in ("mean", "sum", "none"):
            cases.append((name, p, q, {"reduction": reduction}))
    for name, a, b, opts in cases:
        want = host.compute(_api.prepare(name, a, b, opts, want_value=True, want_grad=True))
        call = _api.prepare(name, torch.from_numpy(a), torch.from_numpy(b), opts,
                            want_value=True, want_grad=True)
        got = host.compute_torch(call)
        assert got is not None, (name, opts)
        for g, w in zip(got, want):
            assert isinstance(g, torch.Tensor) and g.dtype == torch.from_numpy(w).dtype
            np.testing.assert_array_equal(g.numpy(), w)


def test_threads_beside_pytorch_are_its_own_team(mod, monkeypatch):
    """One thread below THREADS_FROM values. Where torch is loaded and its OpenMP runtime was
    found, its team: torch.get_num_threads() threads (GPULOSS_NUM_THREADS may ask for fewer),
    on NumPy data and torch tensors alike. Without the team (or in a forked child) our pool,
    but on torch tensors one thread below TORCH_THREADS_FROM (PyTorch's workers spin after
    its operators)."""
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("GPULOSS_NUM_THREADS", raising=False)
    cpus, team = _pool.cpu_threads(), torch.get_num_threads()
    assert host._threads(host.THREADS_FROM - 1) == (1, 0)
    assert host._threads(host.THREADS_FROM - 1, torch_pool=True) == (1, 0)
    if sys.platform.startswith("linux"):  # (PyTorch's Linux wheels load GNU's libgomp)
        assert mod.openmp_team() and host._team_ready()
    if host._team_ready():
        assert host._threads(host.THREADS_FROM) == (team, 1)
        assert host._threads(host.THREADS_FROM, torch_pool=True) == (team, 1)
        monkeypatch.setenv("GPULOSS_NUM_THREADS", "1")
        assert host._threads(host.THREADS_FROM, torch_pool=True) == (1, 1)
        monkeypatch.setenv("GPULOSS_NUM_THREADS", str(team + 5))  # (never more than torch's)
        assert host._threads(host.THREADS_FROM) == (team, 1)
        monkeypatch.delenv("GPULOSS_NUM_THREADS")
    for no_team in ({"_team_found": False}, {"_forked": True}):
        with monkeypatch.context() as m:
            m.setattr(host, "_team_found", no_team.get("_team_found", host._team_found))
            m.setattr(_pool, "_forked", no_team.get("_forked", False))
            assert host._threads(host.THREADS_FROM) == (cpus, 0)
            assert host._threads(host.THREADS_FROM, torch_pool=True) == (1, 0)
            assert host._threads(host.TORCH_THREADS_FROM - 1, torch_pool=True) == (1, 0)
            assert host._threads(host.TORCH_THREADS_FROM, torch_pool=True) == (cpus, 0)
            m.setenv("GPULOSS_NUM_THREADS", "3")
            assert host._threads(host.THREADS_FROM, torch_pool=True) == (3, 0)
            assert host._threads(host.THREADS_FROM) == (3, 0)


def test_numpy_alone_never_looks_for_an_openmp_runtime():
    """Without torch the row passes keep to our pool and never search the loaded libraries
    for a runtime (a search that finds none costs tens of microseconds a call)."""
    code = """
import sys, numpy as np, gpuloss as gl
from gpuloss.backends import host
z = np.random.default_rng(0).standard_normal((512, 1000)).astype(np.float32)
gl.cce_with_logits.value_and_grad(z, np.arange(512) % 1000)
assert "torch" not in sys.modules and host._team_found is None, host._team_found
print("ok")
"""
    assert "ok" in _run({"GPULOSS_NUM_THREADS": "2"}, code)


def test_pytorchs_team_gives_the_bits_of_one_thread(mod):
    """Blocks of rows on PyTorch's OpenMP team, any number of its threads (more than the
    CPUs too), give the bits of one thread of ours; so does a loss on torch tensors."""
    torch = pytest.importorskip("torch")
    if not mod.openmp_team():
        pytest.skip("no OpenMP runtime loaded beside torch here")
    rng = np.random.default_rng(5)
    for R, K in [(4096, 100), (7, 20000), (70000, 3)]:
        z = torch.from_numpy(rng.standard_normal((R, K)).astype(np.float32))
        y = torch.from_numpy(rng.integers(0, K, R))
        results = []
        for threads, team in [(1, 0), (1, 1), (2, 1), (3, 1), (16, 1)]:
            grad = torch.empty_like(z)
            out = mod.cce_labels(0, 0, z.data_ptr(), y.data_ptr(), grad.data_ptr(), None, R, K,
                                 None, True, True, True, threads, team)
            results.append((out, grad))
        for out, grad in results[1:]:
            assert out == results[0][0]
            assert torch.equal(grad, results[0][1])
        v, g = gl.cce_with_logits.value_and_grad(z, y)
        assert float(v) == float(np.float32(results[0][0][0] / R))  # (the mean, in float32)
        assert torch.equal(g, results[0][1])


def test_forked_children_compute_after_the_parent_used_threads():
    """A child forked after a threaded call (multiprocessing's fork, data loader workers)
    starts its own helpers: the parent's do not exist there."""
    code = """
import os, sys, numpy as np, gpuloss as gl
z = np.random.default_rng(0).standard_normal((512, 1000)).astype(np.float32)
y = np.arange(512) % 1000
want = gl.cce_with_logits(z, y)
children = []
for _ in range(12):
    pid = os.fork()
    if pid == 0:
        ok = gl.cce_with_logits(z, y) == want
        os._exit(0 if ok else 3)
    children.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
print(codes)
assert codes == [0] * 12
"""
    out = _run({"GPULOSS_NUM_THREADS": "4"}, code)  # (a hang fails on _run's timeout)
    assert "[0, 0" in out


def test_forked_children_leave_pytorchs_team_alone():
    """A child forked after the parent ran blocks on PyTorch's OpenMP team does not use the
    team (GNU's runtime may wait there for the parent's threads), and computes the same."""
    pytest.importorskip("torch")
    code = """
import os, numpy as np, torch, gpuloss as gl
from gpuloss import _host_build
z = torch.from_numpy(np.random.default_rng(0).standard_normal((512, 1000)).astype(np.float32))
y = torch.arange(512) % 1000
want = gl.cce_with_logits(z, y)
team = _host_build.module().openmp_team()
children = []
for _ in range(6):
    pid = os.fork()
    if pid == 0:
        ok = not _host_build.module().openmp_team() and torch.equal(gl.cce_with_logits(z, y), want)
        os._exit(0 if ok else 3)
    children.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
print(team, codes)
assert codes == [0] * 6
"""
    out = _run({}, code)  # (a hang fails on _run's timeout)
    assert "[0, 0" in out


def test_a_child_forked_before_the_first_call_leaves_the_team_alone(tmp_path):
    """PyTorch's team started in the parent, then a fork before gpuloss computed anything
    (the extension is first loaded in the child): the child keeps to our own threads, on
    NumPy data and torch tensors, and computes the same as the parent."""
    pytest.importorskip("torch")
    code = """
import os, numpy as np, torch, gpuloss as gl
from gpuloss.backends import host
a = torch.randn(600, 600)
for _ in range(3):
    (a @ a).exp_()  # PyTorch's OpenMP team at work in the parent
z = np.random.default_rng(0).standard_normal((512, 1000)).astype(np.float32)
y = np.arange(512) % 1000
pid = os.fork()
if pid == 0:
    ok = host._threads(z.size) == (host._pool.cpu_threads(), 0)
    v = gl.cce_with_logits(z, y)
    t = gl.cce_with_logits(torch.from_numpy(z), torch.from_numpy(y))
    np.save(os.environ["CHILD_OUT"], np.array([float(v), float(t)]))
    os._exit(0 if ok else 3)
code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
want = gl.cce_with_logits(z, y)
got = np.load(os.environ["CHILD_OUT"])
print(code, float(want), got)
assert code == 0 and got[0] == float(want) and got[1] == float(want)
"""
    out = _run({"CHILD_OUT": str(tmp_path / "child.npy")}, code)  # (a hang: _run's timeout)
    assert out.startswith("0 ")

