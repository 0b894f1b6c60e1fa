"""The README's main job: `gpuloss demo` runs, cross-checks all five losses and says so."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpuloss import _cli


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_demo_cross_checks_all_five_losses(capsys, dtype):
    assert _cli.main(["demo", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    for name in ("mse", "bce", "bce_with_logits", "cce", "cce_with_logits"):
        assert f"\n{name} " in out
    assert out.count("  ok") == 5 and "all five losses agree" in out


def test_python_dash_m_gpuloss_demo():
    done = subprocess.run(
        [sys.executable, "-m", "gpuloss", "demo"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "all five losses agree" in done.stdout


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        _cli.main(["frobnicate"])
    assert exc.value.code == 2
