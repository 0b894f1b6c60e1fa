"""GPU benchmark; the code lives in gpuloss/_bench_gpu.py (also `gpuloss bench`)."""

import sys

from gpuloss._bench_gpu import main

if __name__ == "__main__":
    sys.exit(main())
