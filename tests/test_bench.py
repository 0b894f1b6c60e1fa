"""The benchmarks' small-batch part (gpuloss/_bench_small.py), in quick mode: the JSON sections
it adds, from the CPU benchmark and through the GPU benchmark's CUDA-event timer (a stand-in
clock on the host; the test marked gpu runs the real one)."""

from __future__ import annotations

import functools
import json
import os
import time
import types

import numpy as np
import pytest

from gpuloss import _bench_cpu, _bench_gpu, _bench_small

CASES = ["mse", "cce_with_logits C=10", "cce_with_logits C=10 torch tensors",
         "cce_with_logits C=1000", "cce_with_logits C=1000 torch tensors"]


def check_sections(result, sizes):
    """The small-batch and training-step sections: every case and size, positive times."""
    sweep = result["small_batch"]
    assert sweep["sizes"] == sizes and sweep["torch_threads"] >= 1 and sweep["clock"]
    assert [c["case"] for c in sweep["cases"]] == CASES
    for case in sweep["cases"]:
        want = [n for n in sizes if n >= (case["classes"] or 1)]  # at least one row
        assert [p["n"] for p in case["points"]] == want
        for p in case["points"]:
            assert p["gpuloss_us"] > 0 and p["torch_us"] > 0 and p["rounds"] >= 3
            assert p["ratio"] == pytest.approx(p["gpuloss_us"] / p["torch_us"], rel=0.01)
            assert np.prod(p["shape"]) <= p["n"]
        assert case["crossover_n"] == _bench_small.crossover(case["points"])
    assert all(p["naive_us"] > 0 for p in sweep["cases"][0]["points"])
    steps = result["training_step"]
    assert [r["classes"] for r in steps["rows"]] == [10, 1000] and steps["torch_threads"] >= 1
    for r in steps["rows"]:
        for key in ("step_torch_us", "step_gpuloss_us", "loss_torch_us", "loss_gpuloss_us"):
            assert r[key] > 0, key
        assert r["step_ratio"] == pytest.approx(r["step_gpuloss_us"] / r["step_torch_us"],
                                                rel=0.01)
        assert r["loss_ratio"] > 0


def test_cpu_small_batch_only(tmp_path, capsys):
    """`gpuloss bench --small-batch-only` on a CPU: only the small-batch sections, their own
    file name (a full run's file of the same day is not overwritten), the table."""
    pytest.importorskip("torch")
    assert _bench_cpu.main(["--small-batch-only", "--quick", "--sweep-max", "10",
                            "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "small batches" in out and "training step" in out
    (path,) = tmp_path.glob("cpu-small-batch-*.json")
    result = json.loads(path.read_text())
    assert result["rows"] == [] and "copy_GBps" not in result
    check_sections(result, [256, 1024])


def test_cpu_full_run_keeps_both_parts(tmp_path, capsys):
    pytest.importorskip("torch")
    assert _bench_cpu.main(["--losses", "mse", "--no-variants", "--quick", "--sweep-max", "8",
                            "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (path,) = tmp_path.glob("*")
    assert path.name == f"cpu-{_bench_cpu._slug(result['cpu'])}-{os.cpu_count()}core-" \
                        f"{result['date']}.json"
    assert [r["loss"] for r in result["rows"]] == ["mse"] and result["copy_GBps"] > 0
    # --losses mse: the mse case only, and no training step (it needs cce_with_logits)
    assert [c["case"] for c in result["small_batch"]["cases"]] == ["mse"]
    assert "training_step" not in result
    args = types.SimpleNamespace(small_batch=False, small_batch_only=False)  # --no-small-batch
    assert _bench_small.run(args, None, "", np, object(), None, "cpu") == {}


class _HostCupy:
    """CuPy as far as the GPU benchmark's small-batch timer and sweep use it: NumPy arrays,
    and events that read the host clock."""

    class cuda:  # CuPy's name
        class Event:
            def record(self):
                self.t = time.perf_counter()

            def synchronize(self):
                pass

        @staticmethod
        def get_elapsed_time(start, stop):
            return 1e3 * (stop.t - start.t)

    def __getattr__(self, name):
        return getattr(np, name)


def test_gpu_benchmarks_timer_drives_the_sweep():
    """The GPU benchmark's interleaved CUDA-event timer and its arrays -> torch hand-over
    (DLPack), run on the host: the same sections come out."""
    torch = pytest.importorskip("torch")
    from gpuloss.backends import cuda as _cuda_backend

    args = types.SimpleNamespace(small_batch=True, small_batch_only=False, quick=True,
                                 sweep_max=10, losses=["mse", "cce_with_logits"])
    cp = _HostCupy()
    result = _bench_small.run(args, functools.partial(_bench_gpu.interleaved_us, cp),
                              "host clock", cp, torch, _cuda_backend.to_torch, "cpu")
    check_sections(result, [256, 1024])


@pytest.mark.gpu
def test_gpu_small_batch_only(tmp_path):
    """The GPU benchmark's --small-batch-only on a device: CuPy arrays and CUDA tensors,
    timed with CUDA events."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    assert _bench_gpu.main(["--small-batch-only", "--quick", "--sweep-max", "10",
                            "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-small-batch-*.json")
    result = json.loads(path.read_text())
    assert "small_batch_error" not in result, result.get("small_batch_error")
    assert result["training_step"]["device"] == "cuda"
    check_sections(result, [256, 1024])


def test_crossover_is_where_gpuloss_stays_faster():
    def pts(*ratios):
        return [{"n": 4**i, "ratio": r} for i, r in enumerate(ratios)]

    assert _bench_small.crossover(pts(2.0, 0.9, 1.1, 0.8, 0.5)) == 64
    assert _bench_small.crossover(pts(0.5, 0.9)) == 1
    assert _bench_small.crossover(pts(0.5, 1.0)) is None  # a tie is not faster
    assert _bench_small.crossover([]) is None


def test_thread_contention_holds_gpuloss_to_one_thread_and_back(monkeypatch):
    """The contention row: three steps timed, and GPULOSS_NUM_THREADS restored after the
    one-thread step (set or unset before)."""
    torch = pytest.importorskip("torch")
    seen = []
    real = _bench_small._sgd_step

    def spy_step(torch_, model, loss_fn, x, y):
        step = real(torch_, model, loss_fn, x, y)
        return lambda: seen.append(os.environ.get("GPULOSS_NUM_THREADS")) or step()

    monkeypatch.setattr(_bench_small, "_sgd_step", spy_step)
    monkeypatch.setenv("GPULOSS_NUM_THREADS", "2")
    row = _bench_small.thread_contention(_bench_cpu.interleaved_us, torch, batch=64,
                                         classes=10, plan=_bench_small.QUICK_PLAN)
    assert {"1", "2"} <= set(seen) and os.environ["GPULOSS_NUM_THREADS"] == "2"
    for key in ("step_torch_us", "step_gpuloss_us", "step_gpuloss_one_thread_us"):
        assert row[key] > 0, key
    assert row["threads_vs_one"] == pytest.approx(
        row["step_gpuloss_us"] / row["step_gpuloss_one_thread_us"], rel=0.01)
