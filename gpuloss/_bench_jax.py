"""JAX benchmark: gpuloss on JAX arrays, eager and under `jax.jit`, against the naive formula
under `jax.jit(jax.value_and_grad(...))`, all in one process on the same data, medians of
interleaved rounds after warm-up. Writes <out>/jax-<machine>-<date>.json and prints a table.
Run as `python benchmarks/jax_cpu.py` (JAX on the CPU, float32, without x64).

Per loss:
- `eager_numpy_ms`: `.value_and_grad` on NumPy arrays (the NumPy backend);
- `eager_jax_ms`: the same call on JAX arrays of the same data (NumPy views, results handed
  to JAX without a copy); the bar is <= 1.2x eager_numpy_ms;
- `jit_grad_ms`: `jax.jit(jax.value_and_grad(lambda p: gl.<loss>(p, y)))` (the custom_jvp);
- `jit_method_ms`: `jax.jit(gl.<loss>.value_and_grad)`;
- `jit_naive_ms`: `jax.jit(jax.value_and_grad(<the naive formula>))`, the formula a user
  writes (the loss's `naive`, on jax.numpy; XLA drops its hand-written gradient), the bar:
  jit_grad_ms no slower.
"""

from __future__ import annotations

import datetime as dt
import os

import numpy as np

import gpuloss as gl
from gpuloss import _bench_io
from gpuloss._bench_cpu import _cpu_name, _slug, inputs, interleaved_ms

BAR_CASE = ("cce_with_logits", (1 << 20, 64))  # the case: (2^20, 64) float32


def main(argv=None):
    ap = _bench_io.Parser(prog="benchmarks/jax_cpu.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=7, help="rounds per loss (default 7)")
    _bench_io.add_common_args(ap, "jax", gl.LOSSES)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    cases = [(loss, None) for loss in args.losses]
    if BAR_CASE[0] in args.losses:
        cases.append(BAR_CASE)
    rows = []
    for loss, shape in cases:
        fn = gl.LOSSES[loss]
        if shape is None:
            p, y, _ = inputs(fn, rng)
        else:
            p = rng.standard_normal(shape, dtype=np.float32)
            y = rng.integers(0, shape[1], shape[0])
        P, Y = jnp.asarray(p), jnp.asarray(y)

        def naive_value(a, b, fn=fn):
            return fn.naive(jnp, a, b)[0]

        jit_grad = jax.jit(jax.value_and_grad(lambda a, b, fn=fn: fn(a, b, validate=False)))
        jit_method = jax.jit(lambda a, b, fn=fn: fn.value_and_grad(a, b, validate=False))
        jit_naive = jax.jit(jax.value_and_grad(naive_value))
        contenders = {
            "eager_numpy": lambda fn=fn, p=p, y=y: fn.value_and_grad(p, y),
            "eager_jax": lambda fn=fn, P=P, Y=Y: jax.block_until_ready(fn.value_and_grad(P, Y)),
            "jit_grad": lambda f=jit_grad, P=P, Y=Y: jax.block_until_ready(f(P, Y)),
            "jit_method": lambda f=jit_method, P=P, Y=Y: jax.block_until_ready(f(P, Y)),
            "jit_naive": lambda f=jit_naive, P=P, Y=Y: jax.block_until_ready(f(P, Y)),
        }
        ms = interleaved_ms(contenders, args.repeat)
        # the contenders must agree before their times mean anything
        v, g = jit_grad(P, Y)
        v0, g0 = fn.value_and_grad(p, y)
        scale = float(np.max(np.abs(g0)))
        if not (np.isclose(float(v), float(v0), rtol=1e-4)
                and np.allclose(np.asarray(g), g0, rtol=1e-3, atol=1e-4 * scale)):
            msg = f"{loss}: jitted gpuloss and the NumPy backend disagree"
            raise AssertionError(msg)
        row = {"loss": loss, "dtype": "float32", "shape": list(p.shape),
               **{f"{k}_ms": round(t, 3) for k, t in ms.items()}}
        row["eager_jax_vs_numpy"] = round(ms["eager_jax"] / ms["eager_numpy"], 3)
        row["jit_naive_vs_jit_grad"] = round(ms["jit_naive"] / ms["jit_grad"], 3)
        rows.append(row)
        _bench_io.progress(row)

    result = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
        "cpu": _cpu_name(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "gpuloss": gl.__version__,
        "x64": bool(jax.config.jax_enable_x64),
        "date": dt.date.today().isoformat(),
        "rows": rows,
    }
    name = f"jax-{_slug(_cpu_name())}-{os.cpu_count()}core-{result['date']}.json"

    def table():
        print(f"{'loss':18s} {'shape':>14s} {'numpy':>8s} {'jax':>8s} {'ratio':>6s} "
              f"{'jit grad':>9s} {'jit .vag':>9s} {'naive':>8s} {'naive/ours':>10s}")
        for r in rows:
            print(f"{r['loss']:18s} {tuple(r['shape'])!s:>14s} {r['eager_numpy_ms']:8.1f} "
                  f"{r['eager_jax_ms']:8.1f} {r['eager_jax_vs_numpy']:6.2f} "
                  f"{r['jit_grad_ms']:9.1f} {r['jit_method_ms']:9.1f} "
                  f"{r['jit_naive_ms']:8.1f} {r['jit_naive_vs_jit_grad']:10.2f}")

    _bench_io.finish(result, _bench_io.output_path(args.out, name), args.json, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

