"""The `gpuloss` command line (also `python -m gpuloss`).

    gpuloss demo    every loss with its gradient on generated data, on the best device
                    here, each cross-checked against a second implementation, as a table
    gpuloss score   a loss over files (.npy, file.npz:key, file.parquet:column), streamed
                    in chunks through the chosen device, so files larger than memory work
    gpuloss info    versions, backends, GPU and driver, kernel folders
    gpuloss bench   the benchmarks for this device

Exit status: 0 on success, 2 with a one-line message (no traceback) for a missing file, an
unknown loss, a shape mismatch, a bad option or a domain error; 2 after listing the commands
when none is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np


def _second_opinion(loss, pred, target):
    """The same numbers from an independent implementation: the NumPy backend when the
    demo ran on a GPU, the generic array-API backend when it ran on NumPy."""
    import array_api_compat.numpy as xp_np

    from . import _api
    from .backends import generic as _generic_backend

    if isinstance(pred, np.ndarray):
        call = _api.prepare(
            loss, xp_np.asarray(pred), xp_np.asarray(target), {}, want_value=True, want_grad=True
        )
        value, grad = _generic_backend.compute(call)
        return float(value), np.asarray(grad)
    from .losses import LOSSES

    value, grad = LOSSES[loss].value_and_grad(_to_numpy(pred), _to_numpy(target))
    return float(value), grad


def _to_numpy(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def demo(args) -> int:
    from ._examples import example_inputs
    from .losses import LOSSES

    xp, device = _device(args.device)
    if xp is np:
        device = "cpu (NumPy)"
    dtype = _demo_dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    print(f"gpuloss demo on {device}, {dtype.name}; cross-check: "
          f"{'NumPy backend' if xp is not np else 'generic array-API backend'}")
    width = max(map(len, LOSSES))  # the longest name
    header = f"{'loss':{width}s} {'shape':>12s} {'loss value':>14s} {'|grad|max':>10s} " \
             f"{'rel. diff':>10s} {'ms':>8s}  check"
    print(header)
    print("-" * len(header))
    failures = 0
    # two units in the last place of the 16-bit types (both sides round their result)
    tol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-5, "float64": 1e-12}[dtype.name]
    for name, fn in LOSSES.items():
        pred, target = example_inputs(fn, rng, dtype=dtype)
        p, t = xp.asarray(pred), xp.asarray(target)
        fn.value_and_grad(p, t)  # warm-up (kernel compilation on a GPU)
        t0 = time.perf_counter()
        value, grad = fn.value_and_grad(p, t)
        value = float(value)  # waits for the device
        ms = 1e3 * (time.perf_counter() - t0)
        ref_value, ref_grad = _second_opinion(name, pred, target)
        grad_np = _to_numpy(grad).astype(np.float64)
        scale = max(np.abs(ref_grad).max(), np.finfo(np.float64).tiny)
        diff = max(
            abs(value - ref_value) / max(abs(ref_value), 1e-300),
            float(np.abs(grad_np - ref_grad).max() / scale),
        )
        ok = diff <= tol
        failures += not ok
        shape = "x".join(map(str, pred.shape))
        print(f"{name:{width}s} {shape:>12s} {value:14.8g} {np.abs(grad_np).max():10.3g} "
              f"{diff:10.2e} {ms:8.2f}  {'ok' if ok else 'MISMATCH'}")
    print(f"all {len(LOSSES)} losses agree" if not failures else
          f"{failures} loss(es) disagree")
    return 1 if failures else 0


DEMO_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _demo_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a --dtype name; bfloat16 is ml_dtypes' (NumPy has none)."""
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ---------------------------------------------------------------------------------------------
# score


_SHARED = ("reduction", "sample_weight", "validate")  # flags of their own, for every loss


def _option_flag_names(losses) -> list[str]:
    return list(dict.fromkeys(o.name for fn in losses.values() for o in fn.declared
                              if o.name not in _SHARED))


# not in LOSSES (it takes the output layer): cce_with_logits' options, --weight and --bias
_LINEAR = "linear_cross_entropy"


def _linear_options() -> list[str]:
    from ._linear import _OPTIONS

    return [o for o in _OPTIONS if o not in _SHARED]


def _add_option_flags(parser, losses):
    """One flag per option the losses declare (--class-weight FILE, --delta X, --full /
    --no-full, ...), its help naming the losses that take it and what it means for each."""
    for name in _option_flag_names(losses):
        meanings: dict[str, list[str]] = {}  # the same name may mean different things
        kinds = set()
        for fn in losses.values():
            for opt in fn.declared:
                if opt.name == name:
                    meanings.setdefault(opt.doc, []).append(fn.name)
                    kinds.add(opt.kind)
                    if fn.name == "cce_with_logits" and name in _linear_options():
                        meanings[opt.doc].append(_LINEAR)
        text = "; ".join(f"{', '.join(users)}: {doc}" for doc, users in meanings.items())
        flag = "--" + name.replace("_", "-")
        (kind,) = kinds
        if kind == "array":
            parser.add_argument(flag, metavar="FILE", help=text)
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=text)
        else:
            parser.add_argument(flag, type=int if kind == "int" else float,
                                metavar="N" if kind == "int" else "X", help=text)


class UsageError(ValueError):
    """A mistake in the command line: reported in one line, exit status 2."""


def _device(choice: str):
    from ._score import device_namespace

    try:
        return device_namespace(choice)
    except ValueError:
        raise UsageError("--device cuda: no usable CUDA GPU here (CuPy missing, no driver or "
                         "no device); use --device cpu") from None


def _loss_name(name: str) -> str:
    """An argparse type: a loss name, refused with `gpuloss.LOSSES`' own message (the names,
    and the closest one or the loss another library's name means: l1_loss -> mae)."""
    from .losses import LOSSES

    if name == _LINEAR:
        return name
    try:
        LOSSES[name]
    except KeyError as exc:
        raise argparse.ArgumentTypeError(exc.args[0]) from None
    return name


def score(args) -> int:
    """`gpuloss score`: the flags checked as flags, then gpuloss.score_files."""
    from ._score import rows_text, score_files
    from .losses import LOSSES

    linear = args.loss == _LINEAR
    fn = _LINEAR if linear else LOSSES[args.loss]
    opts = {key: getattr(args, key) for key in _option_flag_names(LOSSES)
            if getattr(args, key) is not None}
    if not args.validate:
        opts["validate"] = False
    allowed = [*_linear_options(), "validate"] if linear else fn.options
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise UsageError(f"--{unknown[0].replace('_', '-')} does not apply to {args.loss}")
    for flag in ("weight", "bias"):
        if getattr(args, flag) is not None and not linear:
            hint = "; per-class weights are --class-weight" if flag == "weight" else ""
            raise UsageError(f"--{flag} applies only to {_LINEAR} (its output layer's {flag}), "
                             f"not to {args.loss}{hint}")
    if args.reduction == "none" and args.per_sample is None:
        raise UsageError("--reduction none needs --per-sample OUT.npy to write to")
    if args.per_sample is not None and not Path(args.per_sample).parent.is_dir():
        raise UsageError(f"--per-sample {args.per_sample}: the folder "
                         f"{Path(args.per_sample).parent} does not exist")
    _device(args.device)  # a missing GPU is the user's flag
    layer = _layer(args) if linear else {}
    result = score_files(fn, args.pred, args.target, reduction=args.reduction,
                         sample_weight=args.sample_weight, per_sample=args.per_sample,
                         device=args.device, chunk_mb=args.chunk_mb, chunk_size=args.chunk_size,
                         progress=True, **layer, **opts)
    value = result.loss
    if args.json:
        out = {"loss": value if math.isfinite(value) else None, "n": result.n,
               "nan_rows": result.nan_rows, "device": result.device,
               "seconds": round(result.seconds, 6)}
        if result.nan_first_rows:
            out["nan_first_rows"] = list(result.nan_first_rows)
        if result.per_sample:
            out["per_sample"] = result.per_sample
        print(json.dumps(out))
    else:
        label = f"{args.loss} ({'sum' if args.reduction == 'none' else args.reduction})"
        nan_rows = str(result.nan_rows)
        if result.nan_first_rows:
            # all of them, or the first few
            first = "" if len(result.nan_first_rows) == result.nan_rows else "first "
            nan_rows += f" ({first}at {rows_text(result.nan_first_rows)}, counting from 0)"
        print(f"{'loss':10s} {label}\n{'value':10s} {value:.10g}\n{'n':10s} {result.n}\n"
              f"{'nan rows':10s} {nan_rows}\n{'device':10s} {result.device}\n"
              f"{'seconds':10s} {result.seconds:.3f}")
        if result.per_sample:
            print(f"{'per-sample':10s} {result.per_sample}")
    return 0


def _layer(args) -> dict:
    """linear_cross_entropy's --weight and --bias, loaded once (a .npy weight memory-mapped)
    and checked against PRED's hidden states, the messages naming the flags."""
    from . import _io
    from ._score import check_layer, load_layer

    if args.weight is None:
        raise UsageError(f"{_LINEAR} needs --weight W.npy, the output layer's weight of shape "
                         "(V, H) (classes × hidden features)")
    weight, bias = load_layer(args.weight, args.bias, weight_name="--weight",
                              bias_name="--bias")
    src = _io.open_input(str(args.pred), "pred")
    try:
        check_layer(weight, src, args.pred, weight_name=f"--weight {args.weight}",
                    pred_name="PRED")
    finally:
        src.close()
    return {"weight": weight, "bias": bias}


def _positive(kind):
    """An argparse type: a positive int or float."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------
# info and bench


def _cupy_and_gpu() -> tuple[str, str]:
    """(CuPy's version, the GPUs and driver in words, or why none is usable)."""
    from ._gpu_probe import nvidia_driver_present

    if not nvidia_driver_present():  # say so without importing CuPy (a second or two)
        return _installed_version("cupy"), "none usable (no NVIDIA driver)"
    try:
        import cupy
    except ImportError:
        return "not installed", "none"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        names = [cupy.cuda.runtime.getDeviceProperties(i)["name"].decode()
                 for i in range(count)]
        driver = cupy.cuda.runtime.driverGetVersion()
        gpu = f"{', '.join(names)} (driver {driver // 1000}.{driver % 1000 // 10})"
    except Exception as exc:  # no driver, no device: say why
        gpu = f"none usable ({_gpu_reason(exc)})"
    return cupy.__version__, gpu


def _installed_version(module: str) -> str:
    """A package's version from its metadata, without importing it ("not installed" if
    absent); CuPy's distribution is named after its CUDA version (cupy-cuda12x, ...)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(module) is None:
        return "not installed"
    for dist in importlib.metadata.packages_distributions().get(module, []):
        return importlib.metadata.version(dist)
    return "installed"


def info(args) -> int:
    import array_api_compat

    from ._version import __version__
    from .backends import cuda as _cuda_backend

    lines = [("gpuloss", __version__), ("python", sys.version.split()[0]),
             ("numpy", np.__version__), ("array-api-compat", array_api_compat.__version__)]
    cupy_version, gpu = _cupy_and_gpu()
    lines.append(("cupy", cupy_version))
    for mod in ("torch", "dask", "pyarrow"):
        try:
            lines.append((mod, __import__(mod).__version__))
        except ImportError:
            lines.append((mod, "not installed"))
    backends = ["numpy (CPU)", "generic array API"]
    if not gpu.startswith("none"):
        backends.append("cuda (CuPy kernels)")
    from . import _host_build, _torch_build

    lines += [("backends", ", ".join(backends)), ("gpu", gpu),
              ("cpu kernels", _host_build.status())]
    if "torch" in sys.modules:  # (built on first use, 15-25 s: waited for here)
        _torch_build.wait()
        lines.append(("torch operator", _torch_build.status()))
    lines += [("kernel sources", str(_cuda_backend.kernel_dir())),
              ("kernel cache", os.environ.get("CUPY_CACHE_DIR",
                                              str(Path.home() / ".cupy" / "kernel_cache")))]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:{width}s}  {value}")
    return 0


def _gpu_reason(exc: BaseException) -> str:
    """Why CuPy sees no GPU, in words, cut at a word boundary."""
    import textwrap

    text = str(exc).strip() or type(exc).__name__
    if "InsufficientDriver" in text or "NoDriver" in text or "libcuda" in text:
        return "no NVIDIA driver"
    if "NoDevice" in text:
        return "no CUDA device"
    return textwrap.shorten(f"{type(exc).__name__}: {text}", width=100, placeholder=" ...")


def bench(args) -> int:
    from ._dispatch import preferred_namespace
    from ._gpu_probe import nvidia_driver_present

    if not nvidia_driver_present() or preferred_namespace() is np:  # CuPy only with a driver
        from ._bench_cpu import main as run
    else:
        from ._bench_gpu import main as run
    return run(args.bench_args)


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"gpuloss: error: {message}\n")


_SCORE_EXAMPLES = """examples:
  gpuloss score mse pred.npy target.npy --json
  gpuloss score cce_with_logits d.parquet:logits d.parquet:label --class-weight cw.npy
  gpuloss score bce p.npy y.npy --reduction none --per-sample losses.npy
  gpuloss score linear_cross_entropy hidden.npy tokens.npy --weight W.npy --per-sample nll.npy
"""


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        print("gpuloss: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpuloss demo | head -1`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141


def _main(argv=None) -> int:
    from ._version import __version__
    from .losses import LOSSES

    parser = _Parser(prog="gpuloss", description="Fused losses and gradients.")
    parser.add_argument("--version", action="version", version=f"gpuloss {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND",
                                help="gpuloss COMMAND --help lists its options",
                                parser_class=_Parser)
    p_demo = sub.add_parser("demo", help="every loss with its gradient, cross-checked")
    p_demo.add_argument("--dtype", default="float32", choices=DEMO_DTYPES,
                        help="data type of the generated data: %(choices)s (default float32)")
    p_demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p_demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to compute: auto (a GPU if usable), cpu or cuda")
    p_demo.set_defaults(func=demo)

    p_score = sub.add_parser("score", help="a loss over files, streamed in chunks",
                             epilog=_SCORE_EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    p_score.add_argument("loss", type=_loss_name,
                         help=f"the loss: {', '.join([*LOSSES, _LINEAR])}")
    p_score.add_argument("pred", help="predictions: FILE.npy, FILE.npz:KEY or FILE.parquet:COLUMN "
                                      f"(for {_LINEAR}: hidden states, (N, H))")
    p_score.add_argument("target", help="targets, same forms")
    p_score.add_argument("--reduction", default="mean", choices=["mean", "sum", "none"],
                         help="all losses: mean (default), sum, or none (needs --per-sample)")
    p_score.add_argument("--sample-weight", metavar="FILE",
                         help="all losses: one weight per row, or one array for every chunk")
    _add_option_flags(p_score, LOSSES)
    p_score.add_argument("--weight", metavar="FILE",
                         help=f"{_LINEAR} (needed there): the output layer's weight, (V, H); "
                              "loaded once, a .npy file memory-mapped")
    p_score.add_argument("--bias", metavar="FILE",
                         help=f"{_LINEAR}: the output layer's bias, (V,)")
    p_score.add_argument("--no-validate", dest="validate", action="store_false",
                         help="all losses: skip the domain checks (bad values give NaN)")
    p_score.add_argument("--chunk-mb", type=_positive(float), default=64, metavar="MIB",
                         help="memory for one chunk of all inputs together (default 64); "
                              "the rows per chunk follow from the rows' width; for "
                              f"{_LINEAR} also the most logits made at a time")
    p_score.add_argument("--chunk-size", type=_positive(int), default=None, metavar="ROWS",
                         help="rows per chunk, instead of --chunk-mb")
    p_score.add_argument("--per-sample", metavar="OUT.npy",
                         help="write the per-sample losses (reduction 'none') here")
    p_score.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                         help="where to compute: auto (a GPU if usable), cpu or cuda")
    p_score.add_argument("--json", action="store_true",
                         help='print {"loss", "n", "nan_rows", "device", "seconds"} '
                              '(and "per_sample", the file written)')
    p_score.set_defaults(func=score)

    p_info = sub.add_parser("info", help="versions, backends, GPU, kernel folders")
    p_info.set_defaults(func=info)
    p_bench = sub.add_parser("bench", help="the benchmarks for this device (options: "
                             "gpuloss bench --help)", add_help=False)
    p_bench.set_defaults(func=bench)

    args, extra = parser.parse_known_args(argv)
    if args.command is None:  # bare `gpuloss`: what there is to run, and argparse's status 2
        parser.print_help(sys.stderr)
        return 2
    if args.command == "bench":
        args.bench_args = extra  # the benchmark's own options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except BrokenPipeError:
        raise  # not the user's mistake: main() ends quietly
    except (OSError, ValueError, TypeError, KeyError) as exc:
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        message = str(text).splitlines()[0] if str(text) else type(exc).__name__
        print(f"gpuloss: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
