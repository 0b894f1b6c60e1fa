"""The documentation: the site builds strictly, every public name has a reference entry, and
every Python example in the docs and the README runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

import gpuloss as gl

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _examples():
    for path in DOC_FILES:
        text = path.read_text()
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", text, flags=re.S)):
            yield pytest.param(block, id=f"{path.name}-{i}")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("code", list(_examples()))
def test_every_python_example_runs(code):
    for module in ("torch", "dask", "jax"):
        if f"import {module}" in code:
            require(module)
    exec(compile(code, "<docs example>", "exec"), {"__name__": "__docs__"})


def test_site_builds_strictly_with_every_public_name(tmp_path):
    require("mkdocs")
    require("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    missing = [name for name in gl.__all__ if f'id="gpuloss.{name}"' not in api]
    assert not missing, f"no rendered reference entry for {missing}"
    for name in gl.LOSSES:  # the docstring itself is rendered, math included
        first_line = gl.LOSSES[name].__doc__.strip().splitlines()[0]
        assert first_line.split(",")[0] in api
    _check_rendered_api(api)
    _check_offline(tmp_path / "site")


def _check_offline(site: Path):
    """Every page loads its scripts, styles and fonts from the site itself (MathJax is
    vendored, Google Fonts off), and the plotting script is not published."""
    assert not (site / "plots.py").exists()
    assert (site / "js" / "mathjax" / "tex-mml-chtml.js").is_file()
    fonts = list((site / "js" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*"))
    assert len(fonts) > 10
    for page in site.rglob("*.html"):
        html = page.read_text()
        remote = re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?:[^"]+)"', html)
        assert not remote, f"{page.relative_to(site)} loads {remote}"


def _check_rendered_api(api: str):
    """What a reader of the API page sees: Markdown rendered, formulas typeset, no reST
    left over, no builtin docstrings, one row per returned value."""
    for raw in (":math:", ".. math::", ":func:", ":class:", ":meth:", "``"):
        assert raw not in api, f"raw reST {raw!r} on the API page"
    for builtin in ("__weakref__", "__module__", "__dict__", "dict() -&gt;",
                    "Return repr(self)", "Initialize self."):
        assert builtin not in api, f"a builtin member or docstring on the API page: {builtin}"
    starts = sorted((api.find(f'id="gpuloss.{n}"'), n) for n in gl.__all__)
    sections = {n: api[a:b] for (a, n), (b, _) in zip(starts, starts[1:] + [(len(api), "")])}
    for name in gl.LOSSES:
        section = sections[name]
        assert 'class="arithmatex"' in section, f"{name}: no typeset formula"
        returns = section.split("Returns:", 1)[1].split("</table>", 1)[0]
        assert returns.count('class="doc-section-item"') == 1, f"{name}: Returns rows"
    for name, section in sections.items():  # a **kwargs is never a required parameter
        assert "**options" not in section or "required" not in section.split("**options")[1][:300]


def test_plots_regenerate(tmp_path, monkeypatch):
    require("matplotlib")
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import plots
    finally:
        sys.path.remove(str(ROOT / "docs"))
    monkeypatch.setattr(plots, "IMG", tmp_path)
    plots.curves()
    assert plots.cpu_plots() is not None, "a CPU benchmark result is recorded"
    made = {p.name for p in tmp_path.glob("*.png")}
    assert {"curves-mse.png", "curves-bce.png", "cpu-speedup.png", "cpu-floor.png"} <= made


def test_small_batch_plot_from_a_quick_run(tmp_path, monkeypatch):
    """The small-batch figure, from a quick benchmark run (the recorded results may predate
    the section): found as the newest result with a small_batch section, which a CPU plot
    of the large sizes skips (it has no rows)."""
    require("matplotlib")
    pytest.importorskip("torch")
    from gpuloss import _bench_cpu

    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import plots
    finally:
        sys.path.remove(str(ROOT / "docs"))
    monkeypatch.setattr(plots, "IMG", tmp_path)
    monkeypatch.setattr(plots, "RESULTS", tmp_path)
    assert _bench_cpu.main(["--small-batch-only", "--quick", "--sweep-max", "10",
                            "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.glob("cpu-small-batch-*.json")
    assert plots.small_batch_plots("cpu") == run and plots.small_batch_plots("gpu") is None
    assert (tmp_path / "cpu-small-batch.png").stat().st_size > 0
    assert plots.cpu_plots() is None


def test_the_option_matrix_matches_the_losses():
    """docs/options.md: a ✓ exactly where the loss takes the option."""
    text = (ROOT / "docs" / "options.md").read_text()
    table = text.split("## Which option applies to which loss", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")][1:]
    assert header == list(gl.LOSSES)
    seen = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        option = cells[0].split("`")[1]
        seen.add(option)
        for loss, cell in zip(header, cells[1:]):
            assert ("✓" in cell) == (option in gl.LOSSES[loss].options), (option, loss)
    assert seen == {o for fn in gl.LOSSES.values() for o in fn.options}


def test_the_cli_reference_lists_every_score_flag():
    import contextlib
    import io

    from gpuloss import _cli

    text = (ROOT / "docs" / "cli.md").read_text()
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit):
        _cli.main(["score", "--help"])
    flags = set(re.findall(r"(--[a-z][a-z-]+)", buffer.getvalue())) - {"--help"}
    assert flags and all(f"`{flag}" in text for flag in flags), flags
