"""The roofline prediction of the GPU benchmark's rows (gpuloss/_roofline.py, issue 26): the
bytes each launch moves, the grid, the time on a named card, and the benchmark attaching it
to its rows; all without a GPU. Expectations come from the model's formula written out here
(bytes / (nominal x fraction), waves of resident blocks, fixed overheads), with the grid and
row layout taken from the backend itself."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gpuloss import _bench_gpu, _roofline
from gpuloss.backends import cuda as _cuda_backend

H100, H200 = _roofline.CARDS["H100 SXM"], _roofline.CARDS["H200"]
O = _roofline.OVERHEADS
F32 = np.dtype(np.float32)


def _blocks(count, per_block, card):
    """The backend's grid: one block per `per_block` units, at most 8 per SM."""
    return max(1, min(math.ceil(count / per_block), 8 * card.sms))


def _tail(blocks, value_bytes=4):
    """What a reduced call adds to the data: a float64 partial per block, written and read
    back by the last block, a 4-byte ticket per block, the value."""
    return 8 * blocks + 8 * blocks + 4 * blocks + value_bytes


def _overhead_ms(validate=True):
    """A value_and_grad call: host work, the memset and the kernel, validate's read."""
    return 1e-3 * (O.call_us + 2 * O.launch_us + (O.read_us if validate else 0.0))


def test_cards_and_achievable_bandwidth():
    assert (H100.sms, H100.bandwidth, H200.sms, H200.bandwidth) == (132, 3.35e12, 132, 4.8e12)
    assert H100.achievable == pytest.approx(0.9 * 3.35e12)
    assert H200.achievable == pytest.approx(0.9 * 4.8e12)


@pytest.mark.parametrize("n", [1 << 20, 1000003])
def test_elementwise_float32_moves_12n_plus_partials(n):
    """value_and_grad, mean: read pred, read target, write grad (12 n), then the partials."""
    launch = _roofline.gpuloss_launch("mse", (n,), "float32", H100)
    blocks = _blocks(n, 256, H100)
    assert launch.blocks == blocks
    t = launch.traffic
    assert t["pred read"] + t["target read"] + t["grad write"] == 12 * n
    assert launch.bytes == 12 * n + _tail(blocks)
    assert launch.kernel == _cuda_backend.elementwise_name("GlMse", F32, F32)


def test_elementwise_16_bit_halves_the_data():
    n = 1 << 22
    launch = _roofline.gpuloss_launch("bce", (n,), "bfloat16", H100)
    blocks = _blocks(n, 256, H100)
    assert launch.bytes == 6 * n + _tail(blocks, value_bytes=2)


def _row_case(K, loss, labels=True):
    """The backend's (threads, cache) for float32 rows of K of `loss` at its defaults, and
    rows per block."""
    import gpuloss as gl
    from gpuloss._examples import example_inputs

    p, y = example_inputs(gl.LOSSES[loss], np.random.default_rng(0), rows=2, classes=3)
    functor = gl.LOSSES[loss].prepare(p, y, {}, want_value=True, want_grad=True).kernel
    config = _cuda_backend.row_config(K, F32, labels, functor)
    threads = _cuda_backend.row_threads(K, F32, labels, functor)
    return config, 256 // threads


def test_cce_with_logits_row_within_the_register_cache_reads_once():
    N, K = 4096, 1000
    config, per_block = _row_case(K, "cce_with_logits")
    assert config[1] > 0, "test setup: K should fit the register cache"
    launch = _roofline.gpuloss_launch("cce_with_logits", (N, K), "float32", H100)
    blocks = _blocks(N, per_block, H100)
    assert launch.blocks == blocks
    assert launch.bytes == 8 * N * K + 8 * N + _tail(blocks)  # int64 labels: 8 bytes a row
    assert launch.traffic["labels read"] == 8 * N


def test_cce_with_logits_row_beyond_the_register_cache_reads_twice():
    N, K = 512, 65536
    config, per_block = _row_case(K, "cce_with_logits")
    assert config[1] == 0, "test setup: K should exceed the register cache"
    launch = _roofline.gpuloss_launch("cce_with_logits", (N, K), "float32", H100)
    blocks = _blocks(N, per_block, H100)
    assert launch.bytes == 12 * N * K + 8 * N + _tail(blocks)


def test_probability_targets_beyond_the_cache_are_read_twice_too():
    N, K = 512, 65536
    config, per_block = _row_case(K, "kl_div", labels=False)
    assert config[1] == 0
    launch = _roofline.gpuloss_launch("kl_div", (N, K), "float32", H100)
    # pred and target twice, the gradient once
    assert launch.bytes == 20 * N * K + _tail(_blocks(N, per_block, H100))


def test_predicted_ms_grows_linearly_at_large_n():
    """At large n each added element costs its 12 bytes at the achievable bandwidth."""
    ns = [1 << 26, 1 << 27, 1 << 28]
    ms = [_roofline.predict("mse", (n,), "float32", H100)["predicted_ms"] for n in ns]
    slope = 1e3 * 12 / (0.9 * 3.35e12)  # ms per element
    for (n0, m0), (n1, m1) in zip(zip(ns, ms), zip(ns[1:], ms[1:])):
        assert (m1 - m0) / (n1 - n0) == pytest.approx(slope, rel=0.01)


def test_predicted_ms_is_bounded_below_by_the_overhead_at_small_n():
    for n in (1, 256, 4096):
        p = _roofline.predict("mse", (n,), "float32", H100)
        assert p["predicted_ms"] >= _overhead_ms()
        assert p["predicted_ms"] - _overhead_ms() < 0.002  # the data's share: microseconds
        assert p["overhead_ms"] == pytest.approx(_overhead_ms())
    without = _roofline.predict("mse", (256,), "float32", H100, validate=False)
    assert without["overhead_ms"] == pytest.approx(_overhead_ms(validate=False))


def test_h200_predicts_below_h100_for_a_large_row():
    shape = (8192, 32768)
    a = _roofline.predict("cce_with_logits", shape, "float32", H100)
    b = _roofline.predict("cce_with_logits", shape, "float32", H200)
    assert b["predicted_ms"] < a["predicted_ms"]
    # same bytes and grid on both (132 SMs each): the data's time scales with the bandwidth
    assert a["bytes"] == b["bytes"]
    kernel = (a["predicted_ms"] - a["overhead_ms"], b["predicted_ms"] - b["overhead_ms"])
    assert kernel[1] / kernel[0] == pytest.approx(3.35 / 4.8, rel=1e-6)


def test_a_partial_last_wave_takes_a_full_waves_time():
    """6 blocks per SM: the 8 x 132 blocks run in 2 waves of 792 slots, each as long as a full
    wave; 4 blocks per SM: 2 full waves, the bandwidth time."""
    n = 1 << 26
    blocks = 8 * 132
    per_block = math.ceil(n / (blocks * 256)) * 256 * 12  # the busiest block's bytes
    six = _roofline.predict("mse", (n,), "float32", H100, blocks_per_sm=6)
    assert (six["blocks"], six["waves"]) == (blocks, 2)
    assert six["wave_ms"] == pytest.approx(1e3 * 2 * 132 * 6 * per_block / H100.achievable)
    assert six["predicted_ms"] == pytest.approx(six["wave_ms"] + six["overhead_ms"])
    four = _roofline.predict("mse", (n,), "float32", H100, blocks_per_sm=4)
    assert four["waves"] == 2
    assert four["predicted_ms"] < six["predicted_ms"]
    assert four["wave_ms"] == pytest.approx(four["memory_ms"], rel=0.01)


@pytest.mark.parametrize("registers", [32, 40, 64, 128, 255])
def test_blocks_per_sm_from_registers(registers):
    """Registers are allocated per warp in units of 256; 8 warps a block; at most 2048
    threads (8 blocks of 256) an SM."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    want = min(8, 65536 // per_warp // 8)
    assert _roofline.blocks_per_sm_from(registers, H100) == want


def test_blocks_per_sm_come_from_a_resources_table_when_given(tmp_path):
    launch = _roofline.gpuloss_launch("mse", (1 << 20,), "float32", H100)
    doc = {"kernels": [{"kernel": launch.kernel, "arch": "sm_90", "registers": 64,
                        "shared": 256}]}
    path = tmp_path / "kernel-resources-test.json"
    path.write_text(json.dumps(doc))
    resources = _roofline.load_resources(path)
    assert _roofline.default_blocks_per_sm(launch, H100, resources) == (4, "registers")
    bar = _roofline.FLOOR_BLOCKS_PER_SM["elementwise"]
    assert _roofline.default_blocks_per_sm(launch, H100) == (bar, "occupancy bar")
    assert _roofline.newest_resources(tmp_path)[1] == path.name


def test_card_for_device_names():
    assert _roofline.card_for("NVIDIA H100 80GB HBM3") is H100
    assert _roofline.card_for("NVIDIA H100 80GB HBM3", sms=132) is H100
    assert _roofline.card_for("NVIDIA H200") is H200
    other = _roofline.card_for("NVIDIA H100 PCIe", sms=114, copy_bandwidth=1.8e12)
    assert (other.sms, other.achievable) == (114, 1.8e12)  # the measured copy, as it is
    assert _roofline.card_for("NVIDIA A100-SXM4-80GB") is None  # nothing measured


# ---------------------------------------------------------------------------------------------
# the benchmark's rows


def test_benchmark_row_gets_its_prediction():
    row = {"loss": "mse", "op": "value_and_grad", "dtype": "float32", "shape": [1 << 24],
           "ms": 0.3}
    got = _bench_gpu.row_prediction(row, H100)
    want = _roofline.predict("mse", (1 << 24,), "float32", H100)
    assert got == {"predicted_ms": round(want["predicted_ms"], 4), "predicted_card": "H100 SXM",
                   "predicted_bytes": want["bytes"]}
    assert got["predicted_ms"] > 1e3 * 12 * (1 << 24) / H100.achievable
    assert _bench_gpu.row_prediction(row, None) == {}  # no card model: nothing added


def test_large_vocabulary_row_adds_torch_backward_multiply():
    """Through autograd on CUDA tensors backward multiplies the saved gradient by
    grad_output: one more read and write of N x K, two more device operations."""
    N, K = _bench_gpu.LARGE_VOCAB
    row = {"loss": "cce_with_logits", "op": "autograd", "dtype": "bfloat16", "shape": [N, K]}
    got = _bench_gpu.row_prediction(row, H200)
    kernel = _roofline.gpuloss_launch("cce_with_logits", (N, K), "bfloat16", H200)
    assert got["predicted_bytes"] == kernel.bytes + 2 * 2 * N * K
    p = _roofline.predict("cce_with_logits", (N, K), "bfloat16", H200, op="autograd")
    assert p["overhead_ms"] == pytest.approx(
        1e-3 * (O.call_us + O.read_us + O.autograd_us + 4 * O.launch_us))


def test_small_batch_points_on_arrays_get_predictions():
    small = {"small_batch": {"cases": [
        {"case": "mse", "points": [{"n": 256, "shape": [256]}]},
        {"case": "cce_with_logits C=10", "points": [{"n": 1280, "shape": [128, 10]}]},
        {"case": "cce_with_logits C=10 torch tensors",
         "points": [{"n": 1280, "shape": [128, 10]}]}]}}
    _bench_gpu.add_small_batch_predictions(small, H100)
    cases = small["small_batch"]["cases"]
    for case, loss in zip(cases[:2], ("mse", "cce_with_logits")):
        point = case["points"][0]
        p = _roofline.predict(loss, tuple(point["shape"]), "float32", H100)
        assert point["predicted_us"] == round(1e3 * p["predicted_ms"], 2)
        assert case["predicted_card"] == "H100 SXM"
    assert "predicted_us" not in cases[2]["points"][0]


def test_predict_only_writes_every_row_for_both_cards(tmp_path, capsys):
    out = tmp_path / "prediction.json"
    losses = ["mse", "cce_with_logits"]
    assert _bench_gpu.main(["--predict-only", "--losses", *losses, "--sweep-max", "10",
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prediction"] is True and set(result["cards"]) == {"H100 SXM", "H200"}
    cases = [c for c in _bench_gpu.benchmark_cases() if c[0] in losses]
    rows = result["rows"]
    assert len(rows) == 2 * (len(cases) + 2)  # and the two large-vocabulary rows, per card
    for r in rows:
        assert r["predicted_ms"] > 0 and r["predicted_card"] in result["cards"]
        assert 0 < r["predicted_fraction_of_floor"] <= 1
    by_card = {c: [r for r in rows if r["predicted_card"] == c] for c in result["cards"]}
    assert [(r["loss"], r["shape"], r["dtype"]) for r in by_card["H100 SXM"]] == \
        [(r["loss"], r["shape"], r["dtype"]) for r in by_card["H200"]]
    sweep = result["small_batch_predicted"]
    assert {p["case"] for p in sweep} == {"mse", "cce_with_logits C=10",
                                          "cce_with_logits C=1000"}
    table = capsys.readouterr().out
    assert table.startswith("| losses | dtype | shape |") and "H200 ms" in table


# ---------------------------------------------------------------------------------------------
# the model's bytes against the emulator's count (tests/kernel_host.py, the kernels' own
# accesses traced on the CPU), on the emulator's grid


EMULATED = [("mse", (1636,), "float32"), ("bce", (1636,), "bfloat16"),
            ("cce_with_logits", (192, 10), "float32"), ("cce_with_logits", (24, 1000), "float32"),
            ("cce_with_logits", (2, 32768), "float16"), ("kl_div", (2, 32768), "float32")]


def _emulated_inputs(loss, shape, dtype):
    """pred and target of `loss` as the benchmark makes them, in the emulator's memory."""
    import kernel_host

    import gpuloss as gl
    from gpuloss._examples import example_inputs

    rows, classes = shape if len(shape) == 2 else (0, 0)
    p, y = example_inputs(gl.LOSSES[loss], np.random.default_rng(0), n=shape[0], rows=rows,
                          classes=classes)
    if dtype != "float32":
        p = p.astype(_cuda_backend.BF16 if dtype == "bfloat16" else dtype)
        y = y.astype(p.dtype) if y.dtype.kind == "f" else y
    return kernel_host.device_array(p), kernel_host.device_array(y)


@pytest.mark.parametrize(("loss", "shape", "dtype"), EMULATED)
def test_bytes_agree_with_the_emulators_count(loss, shape, dtype):
    """Every array the emulator sees the kernel touch, in the model's bytes: pred, target or
    labels (one per row: the distinct bytes), the gradient, the partials written and the
    value; the partials the last block reads back and the tickets go through a volatile
    pointer and atomics, which the emulator does not trace."""
    import kernel_host

    import gpuloss as gl

    rt = kernel_host._runtime("device")
    if not hasattr(rt, "traffic"):
        pytest.skip("this emulator does not count traffic")
    pred, target = _emulated_inputs(loss, shape, dtype)
    call = gl.LOSSES[loss].prepare(pred, target, {}, want_value=True, want_grad=True)
    with rt.traffic() as seen:
        _cuda_backend.compute(call, rt)
    (t,) = seen
    model = _roofline.gpuloss_launch(loss, shape, dtype, H100, grid_cap=rt.cap)
    assert (model.kernel, model.blocks) == (t.kernel, t.grid)
    m = model.traffic
    got = {"pred read": t["pred"].read.bytes, "grad write": t["grad"].written.bytes,
           "partials write": t["partials"].written.bytes,
           "state write": t["state"].written.bytes}
    if "labels read" in m:
        got["labels read"] = t["target"].read.distinct
    else:
        got["target read"] = t["target"].read.bytes
    assert got == {k: m[k] for k in got}
    assert set(m) - set(got) == {"partials read", "state atomics"}
