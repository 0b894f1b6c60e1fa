"""The public surface: names, signatures, docstrings and their examples, dispatch."""

from __future__ import annotations

import doctest
import inspect
import pickle

import numpy as np
import pytest

import gpuloss as gl
from gpuloss import losses as _losses

PUBLIC = ("LOSSES", "ScoreResult", "StreamingLoss", "__version__", "bce", "bce_with_logits",
          "cce", "cce_with_logits", "hinge", "huber", "kl_div", "kl_div_with_logits",
          "linear_cross_entropy", "log_cosh", "mae", "mse", "multiclass_hinge", "nll",
          "pinball", "poisson_nll",
          "preferred_namespace", "score_files", "smooth_l1", "squared_hinge")


def test_all_is_sorted_and_lists_every_public_name():
    assert gl.__all__ == sorted(gl.__all__)
    public = {n for n in vars(gl) if not n.startswith("_")} - {
        # submodules are implementation detail
        n for n, v in vars(gl).items() if inspect.ismodule(v)
    }
    assert set(gl.__all__) == public | {"__version__"}
    assert set(gl.__all__) == set(PUBLIC)


def test_losses_maps_names_to_the_objects():
    assert list(gl.LOSSES) == ["mse", "mae", "huber", "smooth_l1", "log_cosh", "poisson_nll",
                               "pinball", "bce", "bce_with_logits", "hinge", "squared_hinge",
                               "cce", "cce_with_logits", "nll", "kl_div",
                               "kl_div_with_logits", "multiclass_hinge"]
    for name, fn in gl.LOSSES.items():
        assert getattr(gl, name) is fn and fn.name == name


@pytest.mark.parametrize("name", list(gl.LOSSES))
def test_entry_points_share_one_signature_with_keyword_only_options(name):
    fn = gl.LOSSES[name]
    sig = inspect.signature(fn)
    assert list(sig.parameters)[:2] == ["pred", "target"]
    assert all(
        p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(sig.parameters.values())[2:]
    )
    assert inspect.signature(fn.grad) == sig == inspect.signature(fn.value_and_grad)
    with pytest.raises(TypeError):
        fn(np.zeros(3), np.zeros(3), "sum")  # options are keyword-only


@pytest.mark.parametrize("name", list(gl.LOSSES))
def test_docstrings_carry_the_math_and_the_gradient_scale(name):
    doc = gl.LOSSES[name].__doc__
    for section in ("Parameters", "Returns", "Examples", "$$", "reduction", "1/n"):
        assert section in doc, section
    for rest in (":math:", ".. math::", ":func:"):  # Markdown: reads in help() and on the site
        assert rest not in doc, rest
    assert gl.LOSSES[name].grad.__doc__ and gl.LOSSES[name].value_and_grad.__doc__


def _doctests():
    finder = doctest.DocTestFinder()
    tests = finder.find(gl, "gpuloss") + finder.find(gl.StreamingLoss, "gpuloss.StreamingLoss")
    tests += finder.find(gl.score_files, "gpuloss.score_files")
    for fn in gl.LOSSES.values():
        tests += finder.find(fn.__doc__, f"gpuloss.{fn.name}", globs={})
    return [t for t in tests if t.examples]


@pytest.mark.parametrize("test", _doctests(), ids=lambda t: t.name)
def test_docstring_examples_run(test):
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0, f"{runner.failures} failing example(s) in {test.name}"


def test_every_loss_has_doctest_examples():
    names = {t.name for t in _doctests()}
    assert {f"gpuloss.{n}" for n in gl.LOSSES} <= names


def test_loss_objects_pickle_by_name():
    for fn in gl.LOSSES.values():
        assert pickle.loads(pickle.dumps(fn)) is fn


def test_preferred_namespace_without_a_gpu_is_numpy():
    from conftest import GPU

    xp = gl.preferred_namespace()
    if GPU:
        import cupy

        assert xp is cupy
    else:
        assert xp is np


def test_losses_module_is_the_one_place_for_definitions():
    assert set(_losses.LOSSES) == set(gl.LOSSES)


def test_import_and_compute_without_cupy():
    """`import gpuloss` works with no CuPy at all, and NumPy inputs never import it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['cupy'] = None\n"  # any import of cupy now fails
        "import numpy as np, gpuloss as gl\n"
        "assert gl.preferred_namespace() is np\n"
        "v, g = gl.cce_with_logits.value_and_grad(np.zeros((4, 3)), np.array([0, 1, 2, 0]))\n"
        "assert abs(float(v) - np.log(3)) < 1e-12\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_repeated_call_signature_is_checked_once_and_computed_on_its_own_arrays():
    """`prepare` remembers the checked call per signature (library, device, dtype, shape,
    scalar options) without its arrays; each call still computes on its own data, a new
    signature is checked again, and converted targets (the hinge losses' booleans) are
    converted on every call."""
    import gc
    import weakref

    from gpuloss import _api

    rng = np.random.default_rng(0)
    z1, z2 = (rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2))
    y = np.array([0, 1, 2, 3, 0, 1])
    first = _api.prepare("cce_with_logits", z1, y, {}, want_value=True, want_grad=True)
    second = _api.prepare("cce_with_logits", z2, y, {}, want_value=True, want_grad=True)
    assert first.pred is z1 and second.pred is z2 and second.target is y
    assert gl.cce_with_logits(z2, y) == gl.cce_with_logits(z2.copy(), y.copy())
    assert gl.cce_with_logits(z1, y) != gl.cce_with_logits(z2, y)
    with pytest.raises(ValueError, match="smoothing"):  # another option value: checked
        gl.cce_with_logits(z1, y, label_smoothing=2.0)
    with pytest.raises(ValueError, match="Shape mismatch"):
        gl.cce_with_logits(z1, y.astype(np.float32))  # another dtype (probabilities): checked
    p = rng.standard_normal(8)
    t1 = np.array([True, False] * 4)
    t2 = ~t1
    v1, v2 = gl.hinge(p, t1), gl.hinge(p, t2)
    assert v1 == gl.hinge(p, np.where(t1, 1.0, -1.0))
    assert v2 == gl.hinge(p, np.where(t2, 1.0, -1.0))
    # the remembered call keeps no array alive
    big = rng.standard_normal((5, 7)).astype(np.float32)
    alive = weakref.ref(big)
    _api.prepare("cce_with_logits", big, np.zeros(5, np.int64), {}, want_value=True,
                 want_grad=False)
    del big
    gc.collect()
    assert alive() is None
