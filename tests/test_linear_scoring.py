"""Scoring with linear_cross_entropy: StreamingLoss takes the output layer once and batches of
hidden states; `gpuloss score --weight` and `score_files(weight=)` stream hidden-state files.
Every result is checked against one `gl.linear_cross_entropy` call on all the data."""

from __future__ import annotations

import itertools
import json
import pickle

import numpy as np
import pytest
from conftest import to_xp

import gpuloss as gl
from gpuloss import _cli

N, H, V = 90, 12, 23
EDGES = (0, 7, 8, 8, 41, 90)  # uneven batches, one of them empty


def _layer(seed=0, dtype=np.float64, bias=True):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, H)).astype(dtype)
    W = (rng.normal(size=(V, H)) / 3).astype(dtype)
    b = rng.normal(size=V).astype(dtype) if bias else None
    t = rng.integers(0, V, N)
    t[::6] = -1  # ignored tokens
    return h, W, b, t


def _options(seed=1):
    rng = np.random.default_rng(seed)
    return {"ignore_index": -1, "class_weight": rng.uniform(0.5, 2, V),
            "label_smoothing": 0.1, "z_loss": 1e-3}


def _batches():
    return list(itertools.pairwise(EDGES))


# ---------------------------------------------------------------------------------------------
# StreamingLoss


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("with_options", [False, True])
def test_stream_of_batches_equals_one_call(reduction, with_options):
    h, W, b, t = _layer()
    opts = _options() if with_options else {"ignore_index": -1}
    sw = np.random.default_rng(2).uniform(0, 2, N)
    want = gl.linear_cross_entropy(h, W, t, bias=b, reduction=reduction, sample_weight=sw,
                                   **opts)
    kept = [x.copy() for x in (h, W, b, t, sw)]
    one, two = (gl.StreamingLoss("linear_cross_entropy", weight=W, bias=b, chunk_mb=0.001,
                                 reduction=reduction, **opts) for _ in range(2))
    for i, (lo, hi) in enumerate(_batches()):
        (one if i % 2 == 0 else two).update(h[lo:hi], t[lo:hi], sample_weight=sw[lo:hi])
    two = pickle.loads(pickle.dumps(two))  # a partial state travels between processes
    assert len(pickle.dumps(two)) < 2000  # ... without the weight
    merged = one.merge(two)
    assert merged.batches == len(EDGES) - 1
    np.testing.assert_allclose(merged.compute(), want, rtol=1e-12)
    for before, after in zip(kept, (h, W, b, t, sw)):  # inputs are never modified
        np.testing.assert_array_equal(before, after)


def test_stream_takes_the_loss_object_lead_axes_and_no_bias():
    rng = np.random.default_rng(3)
    h = rng.normal(size=(4, 10, H))  # batch × sequence × features
    W = rng.normal(size=(V, H)) / 3
    t = rng.integers(0, V, (4, 10))
    sw = rng.uniform(0, 1, (4, 1))  # one weight per sequence, broadcast along it
    s = gl.StreamingLoss(gl.linear_cross_entropy, weight=W, reduction="sum")
    s.update(h[:3], t[:3], sample_weight=sw[:3]).update(h[3:], t[3:], sample_weight=sw[3:])
    np.testing.assert_allclose(s.compute(), gl.linear_cross_entropy(
        h, W, t, sample_weight=sw, reduction="sum"), rtol=1e-12)


def test_per_token_update_gives_the_losses_and_the_same_state():
    from gpuloss._streaming import StreamingLoss

    h, W, b, t = _layer(4)
    opts = _options(5)
    sw = np.random.default_rng(6).uniform(0, 2, N)
    full = StreamingLoss("linear_cross_entropy", weight=W, bias=b, chunk_mb=0.002, **opts)
    per_token = StreamingLoss("linear_cross_entropy", weight=W, bias=b, chunk_mb=0.002, **opts)
    losses = []
    for lo, hi in _batches():
        full.update(h[lo:hi], t[lo:hi], sample_weight=sw[lo:hi])
        losses.append(per_token._update_per_token(h[lo:hi], t[lo:hi], sample_weight=sw[lo:hi]))
    np.testing.assert_allclose(np.concatenate(losses), gl.linear_cross_entropy(
        h, W, t, bias=b, sample_weight=sw, reduction="none", **opts), rtol=1e-12)
    np.testing.assert_allclose(per_token.state, full.state, rtol=1e-12)
    np.testing.assert_allclose(per_token.compute(), gl.linear_cross_entropy(
        h, W, t, bias=b, sample_weight=sw, **opts), rtol=1e-12)


def test_stream_of_16_bit_layer_on_the_cpu():
    h, W, b, t = _layer(7, dtype=np.float16)
    w16 = W.copy()
    s = gl.StreamingLoss("linear_cross_entropy", weight=W, bias=b, ignore_index=-1)
    for lo, hi in _batches():
        s.update(h[lo:hi], t[lo:hi])
    want = gl.linear_cross_entropy(h.astype(np.float32), W.astype(np.float32), t,
                                   bias=b.astype(np.float32), ignore_index=-1)
    np.testing.assert_allclose(s.compute(), want, rtol=1e-6)
    np.testing.assert_array_equal(W, w16)
    assert W.dtype == np.float16


def test_stream_works_on_other_namespaces(xp):
    h, W, b, t = _layer(8, bias=True)
    s = gl.StreamingLoss("linear_cross_entropy", weight=to_xp(xp, W), bias=to_xp(xp, b),
                         ignore_index=-1)
    for lo, hi in ((0, 50), (50, N)):
        s.update(to_xp(xp, h[lo:hi]), to_xp(xp, t[lo:hi]))
    np.testing.assert_allclose(s.compute(), gl.linear_cross_entropy(h, W, t, bias=b,
                                                                    ignore_index=-1),
                               rtol=1e-12)


def test_stream_of_torch_tensors_that_require_grad():
    torch = pytest.importorskip("torch")
    h, W, _, t = _layer(9, bias=False)
    weight = torch.tensor(W, requires_grad=True)
    s = gl.StreamingLoss("linear_cross_entropy", weight=weight, ignore_index=-1)
    s.update(torch.tensor(h, requires_grad=True), torch.tensor(t))
    np.testing.assert_allclose(s.compute(), gl.linear_cross_entropy(h, W, t, ignore_index=-1),
                               rtol=1e-12)
    assert weight.grad is None


def test_merge_compares_the_layers():
    h, W, b, t = _layer(10)
    a = gl.StreamingLoss("linear_cross_entropy", weight=W, bias=b)
    same = gl.StreamingLoss("linear_cross_entropy", weight=W.copy(), bias=b.copy(),
                            chunk_mb=1)  # another copy of the layer, another chunk size
    a.update(h[:40], t[:40] % V)
    same.update(h[40:], t[40:] % V)
    a.merge(pickle.loads(pickle.dumps(same)))
    np.testing.assert_allclose(a.compute(), gl.linear_cross_entropy(h, W, t % V, bias=b),
                               rtol=1e-12)
    other = W.copy()
    other[3, 4] += 1e-9
    for different in (gl.StreamingLoss("linear_cross_entropy", weight=other, bias=b),
                      gl.StreamingLoss("linear_cross_entropy", weight=W),
                      pickle.loads(pickle.dumps(gl.StreamingLoss(
                          "linear_cross_entropy", weight=W, bias=b + 1)))):
        with pytest.raises(ValueError, match="different output layers"):
            a.merge(different)
    with pytest.raises(ValueError, match="loss and options differ"):
        a.merge(gl.StreamingLoss("linear_cross_entropy", weight=W, bias=b, ignore_index=-1))
    assert "weight=(23, 12) float64, bias" in repr(a) and "2 batches" in repr(a)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({}, TypeError, r"needs weight=, the output layer's weight of shape \(V, H\)"),
    ({"weight": np.ones(5)}, ValueError, r"weight must have shape \(V, H\).*got shape \(5,\)"),
    ({"weight": np.ones((4, 3), int)}, TypeError, "weight must have a real floating dtype"),
    ({"weight": np.ones((4, 3)), "bias": np.ones(3)}, ValueError,
     r"bias must have shape \(4,\)"),
    ({"weight": np.ones((4, 3)), "bias": np.ones(4, np.float32)}, TypeError,
     "bias has dtype float32 and weight float64"),
    ({"weight": np.ones((4, 3)), "chunk_mb": 0}, ValueError, "chunk_mb must be a positive"),
    ({"weight": np.ones((4, 3)), "axis": 0}, TypeError, "unexpected option 'axis'.*class axis"),
    ({"weight": np.ones((4, 3)), "sample_weight": np.ones(3)}, TypeError,
     "sample_weight.*pass it to update"),
    ({"weight": np.ones((4, 3)), "label_smoothing": 2.0}, ValueError, "label_smoothing"),
    ({"weight": np.ones((4, 3)), "reduction": "none"}, ValueError,
     "reduction must be 'mean' or 'sum' for a stream"),
])
def test_stream_construction_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        gl.StreamingLoss("linear_cross_entropy", **kwargs)


def test_stream_errors_for_other_losses_and_batches():
    for key in ("weight", "bias", "chunk_mb"):
        with pytest.raises(TypeError, match=f"got {key}=, which only linear_cross_entropy"):
            gl.StreamingLoss("cce_with_logits", **{key: np.ones((3, 2)) if key != "chunk_mb"
                                                   else 4})
    with pytest.raises(TypeError, match="per-class weights are class_weight="):
        gl.StreamingLoss("cce_with_logits", weight=np.ones(3))
    with pytest.raises(ValueError, match="loss must be one of .*linear_cross_entropy"):
        gl.StreamingLoss("linear_crossentropy")
    s = gl.StreamingLoss("linear_cross_entropy", weight=np.ones((4, 3)))
    with pytest.raises(ValueError, match="H = 5 as hidden's last axis"):
        s.update(np.ones((2, 5)), np.array([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        s.update(np.ones((2, 3)), np.array([0, 4]))
    assert s.batches == 0 and np.isnan(s.compute())  # refused batches add nothing
    detached = pickle.loads(pickle.dumps(s))
    with pytest.raises(RuntimeError, match="was unpickled.*takes no more batches"):
        detached.update(np.ones((2, 3)), np.array([0, 1]))


# ---------------------------------------------------------------------------------------------
# gpuloss score / score_files


def _save(folder, **arrays):
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return [str(folder / f"{name}.npy") for name in arrays]


def _score(capsys, *argv):
    code = _cli.main(["score", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_score_hidden_state_files_equals_one_call(tmp_path, capsys, reduction):
    h, W, b, t = _layer(11, dtype=np.float32)
    opts = _options(12)
    sw = np.random.default_rng(13).uniform(0, 2, N)
    hf, tf, wf, bf, swf, cwf = _save(tmp_path, h=h, t=t, W=W, b=b, sw=sw,
                                     cw=opts["class_weight"])
    code, out, err = _score(capsys, "linear_cross_entropy", hf, tf, "--weight", wf, "--bias", bf,
                            "--sample-weight", swf, "--class-weight", cwf, "--ignore-index", -1,
                            "--label-smoothing", 0.1, "--z-loss", 1e-3, "--chunk-size", 17,
                            "--chunk-mb", 0.001, "--reduction", reduction, "--json")
    assert code == 0, err
    result = json.loads(out)
    want = gl.linear_cross_entropy(h.astype(np.float64), W.astype(np.float64), t,
                                   bias=b.astype(np.float64), sample_weight=sw,
                                   reduction=reduction, **opts)
    np.testing.assert_allclose(result["loss"], want, rtol=1e-6)
    assert (result["n"], result["nan_rows"]) == (N, 0)
    code, out, err = _score(capsys, "linear_cross_entropy", hf, tf, "--weight", wf,
                            "--ignore-index", -1, "--reduction", reduction)  # the table
    assert code == 0, err
    assert f"linear_cross_entropy ({reduction})" in out and f"\nn          {N}\n" in out
    value = float(out.split("value", 1)[1].split()[0])
    np.testing.assert_allclose(value, gl.linear_cross_entropy(h, W, t, ignore_index=-1,
                                                              reduction=reduction), rtol=1e-6)


def test_score_per_sample_file_of_token_losses(tmp_path, capsys):
    rng = np.random.default_rng(14)
    h = rng.normal(size=(N, 3, H)).astype(np.float32)  # rows of 3 tokens each
    W = (rng.normal(size=(V, H)) / 3).astype(np.float32)
    t = rng.integers(0, V, (N, 3))
    t[5, 1] = -100
    hf, tf, wf = _save(tmp_path, h=h, t=t, W=W)
    out_file = tmp_path / "nll.npy"
    for reduction in ("mean", "none"):
        code, out, err = _score(capsys, "linear_cross_entropy", hf, tf, "--weight", wf,
                                "--ignore-index", -100, "--chunk-size", 16, "--chunk-mb",
                                0.001, "--reduction", reduction, "--per-sample", out_file,
                                "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["per_sample"] == str(out_file.resolve()) and result["n"] == 3 * N
        per = np.load(out_file)
        np.testing.assert_allclose(per, gl.linear_cross_entropy(
            h, W, t, ignore_index=-100, reduction="none"), rtol=1e-6)
        assert per.shape == (N, 3) and per[5, 1] == 0
        want = gl.linear_cross_entropy(h.astype(np.float64), W.astype(np.float64), t,
                                       ignore_index=-100,
                                       reduction="sum" if reduction == "none" else "mean")
        np.testing.assert_allclose(result["loss"], want, rtol=1e-6)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_score_files_takes_arrays_files_and_mixed_dtypes(tmp_path):
    h, W, b, t = _layer(15, dtype=np.float32)
    t = t % V
    hf, tf, wf = _save(tmp_path, h=h.astype(np.float16), t=t, W=W)
    np.savez(tmp_path / "layer.npz", W=W, b=b)
    want = gl.linear_cross_entropy(h.astype(np.float16).astype(np.float64),
                                   W.astype(np.float64), t, bias=b.astype(np.float64))
    for weight, bias in ((wf, b), (W, f"{tmp_path / 'layer.npz'}:b"),
                         (f"{tmp_path / 'layer.npz'}:W", b.astype(np.float64))):
        result = gl.score_files("linear_cross_entropy", hf, tf, weight=weight, bias=bias,
                                chunk_size=20, device="cpu")
        np.testing.assert_allclose(result.loss, want, rtol=1e-6)
        assert (result.n, result.nan_rows, result.device) == (N, 0, "cpu")
    result = gl.score_files(gl.linear_cross_entropy, hf, tf, weight=W.astype(np.float64),
                            reduction="sum")  # float64 weight: float16 states in float64
    np.testing.assert_allclose(result.loss, gl.linear_cross_entropy(
        h.astype(np.float16).astype(np.float64), W.astype(np.float64), t, reduction="sum"),
        rtol=1e-12)


def test_the_weight_file_is_memory_mapped_not_read(tmp_path):
    from gpuloss._score import load_layer

    (wf,) = _save(tmp_path, W=np.ones((7, 3), np.float32))
    weight, bias = load_layer(wf, None)
    assert isinstance(weight, np.memmap) and bias is None


def test_score_names_the_first_rows_with_a_bad_token_or_a_nan(tmp_path, capsys):
    h, W, _, t = _layer(16, dtype=np.float32)
    t = t % V
    t[[50, 61]] = [V, -3]
    h[[7, 70]] = np.nan
    hf, tf, wf = _save(tmp_path, h=h, t=t, W=W)
    code, _, err = _score(capsys, "linear_cross_entropy", hf, tf, "--weight", wf,
                          "--chunk-size", 40)
    assert code == 2 and err.count("\n") == 1
    assert f"outside [0, {V - 1}]" in err and err.endswith(" First at rows 50, 61 "
                                                           "(counting from 0).\n")
    t[[50, 61]] = 0
    _save(tmp_path, t=t)
    code, out, err = _score(capsys, "linear_cross_entropy", hf, tf, "--weight", wf,
                            "--chunk-size", 40, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["loss"] is None and result["nan_rows"] == 2
    assert result["nan_first_rows"] == [7, 70]


@pytest.mark.parametrize(("argv", "message"), [
    (["linear_cross_entropy", "{h}", "{t}"], "linear_cross_entropy needs --weight W.npy"),
    (["cce_with_logits", "{h}", "{t}", "--weight", "{W}"],
     ("--weight applies only to linear_cross_entropy (its output layer's weight), not to "
      "cce_with_logits; per-class weights are --class-weight")),
    (["mse", "{h}", "{h}", "--bias", "{b}"], "--bias applies only to linear_cross_entropy"),
    (["linear_cross_entropy", "{h}", "{t}", "--weight", "{W_T}"],
     ("Shape mismatch: --weight {W_T} has shape ({H}, {V}), but PRED {h} holds hidden states "
      "of {H} features (its last axis): the weight must be (V, {H}).")),
    (["linear_cross_entropy", "{h}", "{t}", "--weight", "{b}"],
     "--weight {b} must have shape (V, H)"),
    (["linear_cross_entropy", "{h}", "{t}", "--weight", "{W}", "--bias", "{h}"],
     "--bias {h} must have shape ({V},)"),
    (["linear_cross_entropy", "{h}", "{t}", "--weight", "{d}/missing.npy"],
     "--weight: no such file"),
    (["linear_cross_entropy", "{t}", "{t}", "--weight", "{W}"],
     "PRED {t} must hold hidden states, shape (N, H)"),
    (["linear_cross_entropy", "{h}", "{t}", "--weight", "{W}", "--axis", "0"],
     "--axis does not apply to linear_cross_entropy"),
    (["linear_cross_entropy", "{h}", "{t}", "--weight", "{W}", "--pos-weight", "{b}"],
     "--pos-weight does not apply to linear_cross_entropy"),
    (["linear_cross_entropy", "{h}", "{t}", "--weight", "{W}", "--reduction", "none"],
     "--reduction none needs --per-sample"),
    (["linear_cross_entropy", "{h}", "{short}", "--weight", "{W}"],
     "Shape mismatch: pred has {N} rows"),
])
def test_score_errors_name_the_flag(tmp_path, capsys, argv, message):
    h, W, b, t = _layer(17, dtype=np.float32)
    hf, tf, wf, wtf, bf, sf = _save(tmp_path, h=h, t=t % V, W=W, W_T=np.ascontiguousarray(W.T),
                                    b=b, short=t[:10] % V)
    values = {"d": tmp_path, "h": hf, "t": tf, "W": wf, "W_T": wtf, "b": bf, "short": sf,
              "H": H, "V": V, "N": N}
    code, out, err = _score(capsys, *[a.format(**values) for a in argv])
    assert code == 2 and out == ""
    assert message.format(**values) in err, err
    assert err.startswith("gpuloss: error: ") and err.count("\n") == 1


def test_score_files_errors_name_the_argument(tmp_path):
    h, W, b, t = _layer(18, dtype=np.float32)
    hf, tf = _save(tmp_path, h=h, t=t % V)
    for kwargs, message in (
            ({}, "linear_cross_entropy needs weight"),
            ({"weight": W[:, :5]}, r"Shape mismatch: weight has shape \(23, 5\), but pred"),
            ({"weight": W, "bias": b[:4]}, r"bias must have shape \(23,\)"),
            ({"weight": W, "axis": 0}, "axis does not apply to linear_cross_entropy")):
        with pytest.raises(ValueError, match=message):
            gl.score_files("linear_cross_entropy", hf, tf, **kwargs)
    with pytest.raises(ValueError, match="weight applies only to linear_cross_entropy"):
        gl.score_files("cce_with_logits", hf, tf, weight=W)


def test_score_help_lists_the_flags_for_linear_cross_entropy(capsys):
    with pytest.raises(SystemExit):
        _cli.main(["score", "--help"])
    out = capsys.readouterr().out
    for flag in ("--weight", "--bias", "--ignore-index", "--z-loss", "--softcap"):
        assert "linear_cross_entropy" in out.split(flag, 2)[2][:250], flag
    axis_help = out.split("--axis", 2)[2].split("\n  --", 1)[0]
    assert "cce_with_logits" in axis_help and "linear_cross_entropy" not in axis_help


@pytest.mark.gpu
def test_score_and_stream_on_the_gpu(tmp_path):
    import cupy

    h, W, b, t = _layer(19, dtype=np.float32)
    hf, tf, wf, bf = _save(tmp_path, h=h, t=t, W=W, b=b)
    want = gl.linear_cross_entropy(h, W, t, bias=b, ignore_index=-1, reduction="none")
    result = gl.score_files("linear_cross_entropy", hf, tf, weight=wf, bias=bf, ignore_index=-1,
                            chunk_size=25, chunk_mb=0.001, device="cuda",
                            per_sample=tmp_path / "per.npy")
    assert result.device.startswith("cuda")
    np.testing.assert_allclose(np.load(tmp_path / "per.npy"), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.loss, gl.linear_cross_entropy(
        h.astype(np.float64), W.astype(np.float64), t, bias=b.astype(np.float64),
        ignore_index=-1), rtol=1e-5)
    s = gl.StreamingLoss("linear_cross_entropy", weight=cupy.asarray(W), bias=cupy.asarray(b),
                         ignore_index=-1)
    s.update(cupy.asarray(h[:40]), cupy.asarray(t[:40])).update(cupy.asarray(h[40:]),
                                                               cupy.asarray(t[40:]))
    np.testing.assert_allclose(s.compute(), result.loss, rtol=1e-5)
