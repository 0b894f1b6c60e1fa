"""The README's main job: `gpuloss demo` runs, cross-checks every loss and says so."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import gpuloss as gl
from gpuloss import _cli


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_demo_cross_checks_every_loss(capsys, dtype):
    assert _cli.main(["demo", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("gpuloss demo on ") and f", {dtype};" in out
    for name in ("mse", "bce", "bce_with_logits", "cce", "cce_with_logits"):
        assert f"\n{name} " in out
    assert out.count("  ok") == len(gl.LOSSES) and f"all {len(gl.LOSSES)} losses agree" in out


def test_python_dash_m_gpuloss_demo():
    done = subprocess.run(
        [sys.executable, "-m", "gpuloss", "demo"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert f"all {len(gl.LOSSES)} losses agree" in done.stdout


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        _cli.main(["frobnicate"])
    assert exc.value.code == 2


def test_no_command_lists_the_commands_and_exits_2(capsys):
    assert _cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    with pytest.raises(SystemExit):
        _cli.main(["--help"])
    assert err == capsys.readouterr().out  # the same listing as --help, on stderr
    for command in ("demo", "score", "info", "bench"):  # each with its one-line help
        assert re.search(rf"^ +{command} +\w", err, flags=re.MULTILINE), command


# ---------------------------------------------------------------------------------------------
# gpuloss score / info / bench

import json  # noqa: E402

import numpy as np  # noqa: E402
from conftest import make_inputs, require  # noqa: E402
from reference import ALL, CATEGORICAL  # noqa: E402


def _score(capsys, *argv):
    code = _cli.main(["score", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _files(tmp_path, loss, rows=1000, labels=True):
    rng = np.random.default_rng(0)
    pred, target = make_inputs(loss, rng, (rows, 5), dtype=np.float32, labels=labels)
    if target.dtype.kind == "f":
        target = target.astype(np.float32)
    np.save(tmp_path / "pred.npy", pred)
    np.save(tmp_path / "target.npy", target)
    return pred, target, tmp_path / "pred.npy", tmp_path / "target.npy"


@pytest.mark.parametrize("loss", ALL)
def test_score_streams_to_the_in_memory_result(tmp_path, capsys, loss):
    pred, target, p, t = _files(tmp_path, loss)
    code, out, err = _score(capsys, loss, p, t, "--chunk-size", 77, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"loss", "n", "nan_rows", "device", "seconds"}
    assert result["nan_rows"] == 0
    assert result["device"] == "cpu" or result["device"].startswith("cuda")
    assert result["n"] == (1000 if loss in CATEGORICAL else 5000)
    np.testing.assert_allclose(result["loss"], gl.LOSSES[loss](pred.astype(np.float64),
                                                              target), rtol=1e-6)


def test_score_options_weights_and_per_sample_file(tmp_path, capsys):
    pred, target, p, t = _files(tmp_path, "cce_with_logits")
    cw = np.linspace(0.5, 1.5, 5)
    sw = np.random.default_rng(1).uniform(0, 2, 1000)
    np.save(tmp_path / "cw.npy", cw)
    np.save(tmp_path / "sw.npy", sw)
    out_file = tmp_path / "per.npy"
    code, out, err = _score(capsys, "cce_with_logits", p, t, "--class-weight", tmp_path / "cw.npy",
                            "--sample-weight", tmp_path / "sw.npy", "--label-smoothing", 0.1,
                            "--ignore-index", 3, "--chunk-size", 128, "--per-sample", out_file,
                            "--json")
    assert code == 0, err
    opts = dict(class_weight=cw, sample_weight=sw, label_smoothing=0.1, ignore_index=3)
    want = gl.cce_with_logits(pred.astype(np.float64), target, **opts)
    np.testing.assert_allclose(json.loads(out)["loss"], want, rtol=1e-6)
    per = np.load(out_file)
    np.testing.assert_allclose(per, gl.cce_with_logits(pred, target, reduction="none", **opts),
                               rtol=1e-6)
    assert not list(tmp_path.glob("*.tmp-*"))
    # reduction sum, table output
    code, out, _ = _score(capsys, "cce_with_logits", p, t, "--reduction", "sum")
    assert code == 0 and "value" in out and "cce_with_logits (sum)" in out


def test_score_npz_and_parquet_inputs(tmp_path, capsys):
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    pred, target, _, _ = _files(tmp_path, "bce_with_logits")
    np.savez(tmp_path / "data.npz", z=pred, y=target)
    table = pa.table({"z": pa.array(list(pred), type=pa.list_(pa.float32())),
                      "y": pa.array(list(target), type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=300)
    want = gl.bce_with_logits(pred.astype(np.float64), target)
    for spec in ("npz", "parquet"):
        f = tmp_path / f"data.{spec}"
        code, out, err = _score(capsys, "bce_with_logits", f"{f}:z", f"{f}:y", "--chunk-size",
                                128, "--json")
        assert code == 0, err
        np.testing.assert_allclose(json.loads(out)["loss"], want, rtol=1e-6)
    pq.write_table(pa.table({"p": pred[:, 0]}), tmp_path / "flat.parquet")
    code, out, err = _score(capsys, "mse", f"{tmp_path / 'flat.parquet'}:p",
                            f"{tmp_path / 'flat.parquet'}:p", "--json")
    assert code == 0 and json.loads(out)["loss"] == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["mse", "{d}/missing.npy", "{t}"], "pred: no such file"),
    (["l3_loss", "{p}", "{t}"], "argument loss: No loss named 'l3_loss'"),
    (["mse", "{p}", "{short}"], "Shape mismatch: pred has 1000 rows"),
    (["bce_with_logits", "{p}", "{t}", "--label-smoothing", "2"], "label_smoothing must lie in"),
    (["bce", "{p}", "{t}"], "pred must hold probabilities"),
    (["mse", "{p}", "{t}", "--pos-weight", "{t}"], "--pos-weight does not apply to mse"),
    (["mse", "{d}/data.npz:nokey", "{t}"], "has no array 'nokey'; it has: a"),
    (["mse", "{d}/data.parquet:nocol", "{t}"], "has no column 'nocol'; it has: a"),
    (["mse", "{d}/data.txt", "{t}"], "is not a .npy, .npz or .parquet file"),
    (["mse", "{p}", "{t}", "--reduction", "none"], "--reduction none needs --per-sample"),
    (["mse", "{d}/broken.npy", "{t}"], "cannot read"),
])
def test_score_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    _, _, p, t = _files(tmp_path, "mse")
    np.save(tmp_path / "short.npy", np.zeros((10, 5), np.float32))
    np.savez(tmp_path / "data.npz", a=np.zeros(3))
    pq.write_table(pa.table({"a": [1.0]}), tmp_path / "data.parquet")
    (tmp_path / "data.txt").write_text("1 2 3")
    (tmp_path / "broken.npy").write_bytes(b"not an npy file")
    values = {"d": tmp_path, "p": p, "t": t, "short": tmp_path / "short.npy"}
    argv = [a.format(**values) for a in argv]
    with pytest.raises(SystemExit) if argv[0] == "l3_loss" else _nothing():
        code, out, err = _score(capsys, *argv)
        assert code == 2
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
    if argv[0] == "l3_loss":
        assert message in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_failed_run_leaves_no_per_sample_file(tmp_path, capsys):
    rng = np.random.default_rng(2)
    p = rng.uniform(0.1, 0.9, (1000,)).astype(np.float32)
    y = rng.uniform(0, 1, 1000).astype(np.float32)
    y[900] = 1.5  # a domain error in a late chunk
    np.save(tmp_path / "p.npy", p)
    np.save(tmp_path / "y.npy", y)
    code, _, err = _score(capsys, "bce", tmp_path / "p.npy", tmp_path / "y.npy", "--chunk-size",
                          100, "--per-sample", tmp_path / "out.npy")
    assert code == 2 and "target must hold targets" in err
    assert not (tmp_path / "out.npy").exists() and not list(tmp_path.glob("out.npy*"))


def test_streaming_memory_is_bounded_by_the_chunk_not_the_file(tmp_path):
    """Scoring files 16x larger than a chunk's memory: peak RSS grows with the chunk only."""
    import subprocess
    import sys

    rows = 1 << 22  # 16 MiB per float32 file
    rng = np.random.default_rng(3)
    for name in ("a", "b"):
        np.save(tmp_path / f"{name}.npy", rng.standard_normal(rows, dtype=np.float32))
    # the baseline: one chunk's file, scored the same way (the same backend and buffers: a
    # tiny file would take the compiled kernels and leave the NumPy backend unloaded)
    np.save(tmp_path / "one_a.npy", np.zeros(rows // 16, np.float32))
    np.save(tmp_path / "one_b.npy", np.zeros(rows // 16, np.float32))
    # VmHWM (peak RSS of this process image; ru_maxrss would carry the forked parent's)
    code = (
        "import sys\n"
        "from gpuloss._cli import main\n"
        "assert main(sys.argv[1:]) == 0\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "print('PEAK', hwm.split()[1])\n"
    )

    def peak_kib(a, b, chunk):
        done = subprocess.run([sys.executable, "-c", code, "score", "mse", str(a), str(b),
                               "--chunk-size", str(chunk), "--device", "cpu"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split("PEAK")[1])

    base = peak_kib(tmp_path / "one_a.npy", tmp_path / "one_b.npy", rows // 16)
    streamed = peak_kib(tmp_path / "a.npy", tmp_path / "b.npy", rows // 16)
    whole = peak_kib(tmp_path / "a.npy", tmp_path / "b.npy", rows)
    files_kib = 2 * rows * 4 // 1024
    assert streamed - base < files_kib / 4, (base, streamed, whole)
    assert whole - base > files_kib / 2  # the measurement can tell the two apart


def test_info_and_bench(capsys, tmp_path):
    assert _cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "gpuloss" in out and "backends" in out and "kernel sources" in out
    assert _cli.main(["bench", "--losses", "mse", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mse" in out and list(tmp_path.glob("*.json"))


def test_no_progress_bar_for_short_runs(tmp_path, capsys):
    _, _, p, t = _files(tmp_path, "mse")
    code, _, err = _score(capsys, "mse", p, t)
    assert code == 0 and err == ""


# ---------------------------------------------------------------------------------------------
# the command line's edges


def test_version(capsys):
    from gpuloss import __version__

    with pytest.raises(SystemExit) as exc:
        _cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpuloss {__version__}"


def test_demo_takes_a_device(capsys, monkeypatch):
    assert _cli.main(["demo", "--device", "cpu", "--dtype", "float64"]) == 0
    assert "gpuloss demo on cpu (NumPy)" in capsys.readouterr().out
    # as on a machine sans GPU (the module the command line asks, not the package's name)
    monkeypatch.setattr("gpuloss._dispatch.preferred_namespace", lambda: np)
    assert _cli.main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda: no usable CUDA GPU" in err


def test_ctrl_c_ends_with_one_line_and_130(capsys, monkeypatch, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(_cli, "score", interrupted)
    _, _, p, t = _files(tmp_path, "mse")
    assert _cli.main(["score", "mse", str(p), str(t)]) == 130
    assert capsys.readouterr().err == "gpuloss: interrupted\n"


def test_ctrl_c_in_a_real_run_leaves_no_temporary_file(tmp_path):
    import signal
    import time

    rows = 1 << 22
    np.save(tmp_path / "p.npy", np.zeros(rows, np.float32))
    np.save(tmp_path / "t.npy", np.zeros(rows, np.float32))
    proc = subprocess.Popen(  # 262,144 chunks of 16 rows: about 25 s, long enough
        [sys.executable, "-m", "gpuloss", "score", "mse", str(tmp_path / "p.npy"),
         str(tmp_path / "t.npy"), "--reduction", "none", "--per-sample",
         str(tmp_path / "out.npy"), "--chunk-size", "16", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "gpuloss: interrupted" and "Traceback" not in err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p.npy", "t.npy"]


def test_a_closed_pipe_ends_quietly():
    done = subprocess.run(f"{sys.executable} -m gpuloss demo --device cpu | head -1",
                          shell=True, capture_output=True, text=True, timeout=300)
    assert done.stdout.startswith("gpuloss demo on cpu")
    assert done.stderr == ""


def test_every_score_option_says_what_it_does_and_for_which_losses(capsys):
    with pytest.raises(SystemExit):
        _cli.main(["score", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out
    for flag, losses in (("--class-weight", "cce, cce_with_logits"),
                         ("--pos-weight", "bce_with_logits"), ("--eps", "bce, cce"),
                         ("--label-smoothing", "bce_with_logits, cce_with_logits"),
                         ("--ignore-index", "cce, cce_with_logits"),
                         ("--sample-weight", "all losses")):
        assert losses in out.split(flag, 2)[2][:200], flag
    parser_help = [a for a in _score_parser()._actions if not a.help and a.dest != "help"]
    assert parser_help == []


def _score_parser():
    import argparse

    captured = {}
    real = argparse.ArgumentParser.parse_known_args

    def grab(self, *a, **k):
        captured.setdefault("root", self)
        raise SystemExit(0)

    argparse.ArgumentParser.parse_known_args = grab
    try:
        with pytest.raises(SystemExit):
            _cli.main(["score"])
    finally:
        argparse.ArgumentParser.parse_known_args = real
    sub = next(a for a in captured["root"]._actions if a.dest == "command")
    return sub.choices["score"]


def test_the_progress_bar_shows_only_on_a_terminal(monkeypatch):
    class Tty:
        def isatty(self):
            return True

        def write(self, text):
            pass

        def flush(self):
            pass

    from gpuloss import _score

    assert _score.progress_bar(10) is None  # pytest's captured stderr is no terminal
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = _score.progress_bar(10)
    assert bar is not None
    bar.close()


def test_info_says_why_there_is_no_gpu():
    class CUDARuntimeError(Exception):
        pass

    no_driver = CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is "
                                 "insufficient for CUDA runtime version")
    assert _cli._gpu_reason(no_driver) == "no NVIDIA driver"
    assert _cli._gpu_reason(CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device")) == \
        "no CUDA device"
    long = _cli._gpu_reason(RuntimeError("word " * 60))
    assert long.endswith(" ...") and len(long) <= 100 and "wor ..." not in long


@pytest.mark.parametrize("loss", ["mse", "cce_with_logits"])
def test_score_counts_the_rows_whose_loss_is_nan(tmp_path, capsys, loss):
    pred, target, p, t = _files(tmp_path, loss)
    pred[[3, 500, 501, 999]] = np.nan  # rows in three different chunks
    np.save(p, pred)
    code, out, err = _score(capsys, loss, p, t, "--chunk-size", 100, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["nan_rows"] == 4 and result["loss"] is None
    assert result["nan_first_rows"] == [3, 500, 501]  # the first three, across chunks
    code, out, _ = _score(capsys, loss, p, t, "--chunk-size", 100)
    assert "nan rows   4 (first at rows 3, 500, 501, counting from 0)\n" in out
    pred[[500, 501, 999]] = 0  # one NaN row left: all of them are named
    np.save(p, pred)
    code, out, _ = _score(capsys, loss, p, t, "--chunk-size", 100)
    assert "nan rows   1 (at row 3, counting from 0)\n" in out
    assert gl.score_files(loss, p, t, chunk_size=100).nan_first_rows == (3,)


@pytest.mark.parametrize("name", ["l1_loss", "msee", "crossentropy", "nothing_like_it"])
def test_score_suggests_a_loss_as_gpuloss_losses_does(tmp_path, capsys, name):
    _, _, p, t = _files(tmp_path, "mse")
    with pytest.raises(KeyError) as lookup:
        gl.LOSSES[name]
    with pytest.raises(SystemExit) as exc:
        _score(capsys, name, p, t)
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"gpuloss: error: argument loss: {lookup.value.args[0]}\n"
    if name == "l1_loss":  # another library's name for one of ours
        assert lookup.value.args[0].endswith("Did you mean 'mae'?")


def _save(tmp_path, **arrays):
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array)
    return [tmp_path / f"{name}.npy" for name in arrays]


def test_score_domain_errors_name_the_first_offending_rows(tmp_path, capsys):
    rng = np.random.default_rng(4)
    prob = rng.uniform(0.1, 0.9, 1000)
    prob[[17, 203, 999, 600]] = [1.5, -0.5, 2.0, 3.0]
    p, y = _save(tmp_path, p=prob, y=np.zeros(1000))
    code, _, err = _score(capsys, "bce", p, y)  # one chunk: its first three
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("gpuloss: error: pred must hold probabilities in [0, 1]")
    assert err.endswith(" First at rows 17, 203, 600 (counting from 0).\n")
    code, _, err = _score(capsys, "bce", y, p, "--chunk-size", 100)  # stops in rows 0..99
    assert code == 2 and "target must hold targets" in err
    assert err.endswith(" First at row 17 (counting from 0).\n")
    # class indices out of range, in a later chunk
    labels = rng.integers(0, 5, 1000)
    labels[[250, 260]] = [7, -1]
    z, lab = _save(tmp_path, z=rng.standard_normal((1000, 5)), lab=labels)
    code, _, err = _score(capsys, "cce_with_logits", z, lab, "--chunk-size", 100)
    assert code == 2 and "outside [0, 4]" in err
    assert err.endswith(" First at rows 250, 260 (counting from 0).\n")
    # a negative weight of one row is found; one shared by every row has no row to name
    sw = np.ones(1000)
    sw[42] = -1
    w_rows, w_shared = _save(tmp_path, w_rows=sw, w_shared=np.array([1.0, -1, 1, 1, 1]))
    code, _, err = _score(capsys, "mse", y, y, "--sample-weight", w_rows)
    assert code == 2 and err.endswith(" First at row 42 (counting from 0).\n")
    code, _, err = _score(capsys, "mse", z, z, "--sample-weight", w_shared)
    assert code == 2 and "sample_weight must be non-negative" in err and "row" not in err
    # the same message from Python
    with pytest.raises(ValueError, match=r"First at rows 17, 203, 600 \(counting from 0\)"):
        gl.score_files("bce", p, y)


def test_score_chunks_by_a_memory_budget_and_refuses_empty_chunks(tmp_path, capsys):
    class Source:
        def __init__(self, shape, dtype):
            self.shape, self.dtype = shape, np.dtype(dtype)

    wide = [Source((10**6, 64), np.float32), Source((10**6,), np.int64)]
    from gpuloss._score import rows_per_chunk

    assert rows_per_chunk(64, wide) == (64 << 20) // (64 * 4 + 8)
    assert rows_per_chunk(1, [Source((10, 10**7), np.float64)]) == 1  # never 0 rows
    _, _, p, t = _files(tmp_path, "mse")
    for flag, value in (("--chunk-size", 0), ("--chunk-size", -5), ("--chunk-mb", 0)):
        with pytest.raises(SystemExit) as exc:
            _score(capsys, "mse", p, t, flag, value)
        assert exc.value.code == 2
        assert "must be positive" in capsys.readouterr().err


def test_score_says_where_the_per_sample_file_went(tmp_path, capsys, monkeypatch):
    _, _, p, t = _files(tmp_path, "bce")
    monkeypatch.chdir(tmp_path)
    code, out, err = _score(capsys, "bce", p, t, "--reduction", "none", "--per-sample",
                            "losses.npy", "--json")
    assert code == 0, err
    assert json.loads(out)["per_sample"] == str(tmp_path / "losses.npy")
    assert np.load(tmp_path / "losses.npy").shape == (1000, 5)
    code, out, err = _score(capsys, "bce", p, t, "--reduction", "none", "--per-sample",
                            "missing/losses.npy")
    assert code == 2
    assert err == ("gpuloss: error: --per-sample missing/losses.npy: the folder missing does "
                   "not exist\n")


def test_bench_out_is_a_file_or_a_folder_and_json_goes_to_stdout(capsys, tmp_path):
    target = tmp_path / "deep" / "mine.json"
    assert _cli.main(["bench", "--losses", "mse", "--quick", "--out", str(target),
                      "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout is exactly the JSON result
    assert [r["loss"] for r in result["rows"]] == ["mse"]
    assert json.loads(target.read_text()) == result and '"loss": "mse"' in err
    with pytest.raises(SystemExit) as exc:
        _cli.main(["bench", "--losses", "crossentropy"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'crossentropy'" in err


def test_score_files_is_the_python_side_of_gpuloss_score(tmp_path, capsys):
    pred, target, p, t = _files(tmp_path, "cce_with_logits")
    w = np.random.default_rng(3).uniform(0.5, 2, 1000)
    np.save(tmp_path / "w.npy", w)
    cw = np.array([1.0, 2.0, 0.5, 1.0, 1.5])
    result = gl.score_files("cce_with_logits", p, t, sample_weight=tmp_path / "w.npy",
                            class_weight=cw, label_smoothing=0.1, chunk_size=128,
                            device="cpu")
    assert isinstance(result, gl.ScoreResult)
    want = gl.cce_with_logits(pred.astype(np.float64), target, sample_weight=w,
                              class_weight=cw, label_smoothing=0.1)
    np.testing.assert_allclose(result.loss, want, rtol=1e-6)
    assert (result.n, result.nan_rows, result.device, result.per_sample) == (1000, 0, "cpu",
                                                                              None)
    out = tmp_path / "per.npy"
    result = gl.score_files("cce_with_logits", p, t, reduction="none", per_sample=out)
    np.testing.assert_allclose(np.load(out), gl.cce_with_logits(pred, target, reduction="none"),
                               rtol=1e-6)
    assert result.per_sample == str(out.resolve())
    for bad, message in (({"chunk_size": 0}, "chunk_size must be positive"),
                         ({"pos_weight": cw}, "pos_weight does not apply to cce_with_logits"),
                         ({"reduction": "none"}, "needs per_sample"),
                         ({"device": "tpu"}, "device must be")):
        with pytest.raises(ValueError, match=message):
            gl.score_files("cce_with_logits", p, t, **bad)
    assert capsys.readouterr().err == ""  # no progress bar unless asked (and on a terminal)


# ---------------------------------------------------------------------------------------------
# --device auto without a driver: no CuPy import (it costs a second or two)


def test_no_driver_no_cupy_import(tmp_path):
    import importlib.util

    from gpuloss._gpu_probe import nvidia_driver_present

    if nvidia_driver_present():
        pytest.skip("an NVIDIA driver is here: CuPy is meant to be asked")
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed: nothing could import it")
    a, b = _save(tmp_path, a=np.zeros(10), b=np.ones(10))
    code = (
        "import sys\n"
        "from gpuloss._cli import main\n"
        "from gpuloss._score import device_namespace\n"
        "assert device_namespace('auto')[1] == 'cpu'\n"
        "assert main(['score', 'mse', sys.argv[1], sys.argv[2], '--json']) == 0\n"
        "assert main(['info']) == 0\n"
        "assert main(['bench', '--losses', 'mse', '--quick', '--out', sys.argv[3]]) == 0\n"
        "print('CUPY', 'cupy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(a), str(b), str(tmp_path / "bench")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert '"device": "cpu"' in done.stdout
    assert "none usable (no NVIDIA driver)" in done.stdout  # gpuloss info says why
    assert "CUPY False" in done.stdout


def test_the_driver_probe_looks_for_driver_files_then_the_library(monkeypatch):
    import ctypes.util

    from gpuloss import _gpu_probe

    if not sys.platform.startswith("linux"):
        pytest.skip("the probe's Linux branch")
    seen = []

    def probe(files, library):
        _gpu_probe.nvidia_driver_present.cache_clear()
        monkeypatch.setattr(_gpu_probe.os.path, "exists", lambda path: path in files)
        monkeypatch.setattr(ctypes.util, "find_library",
                            lambda name: seen.append(name) or library)
        return _gpu_probe.nvidia_driver_present()

    try:
        assert probe((), None) is False and seen == ["cuda"]
        assert probe(("/dev/nvidia0",), None) is True
        assert probe(("/proc/driver/nvidia",), None) is True
        assert probe(("/dev/dxg",), None) is True  # WSL2
        assert probe((), "libcuda.so.1") is True  # the library alone: CuPy decides
    finally:
        monkeypatch.undo()
        _gpu_probe.nvidia_driver_present.cache_clear()
