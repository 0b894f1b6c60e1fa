"""JAX benchmark (CPU); the code lives in gpuloss/_bench_jax.py."""

import sys

from gpuloss._bench_jax import main

if __name__ == "__main__":
    sys.exit(main())
