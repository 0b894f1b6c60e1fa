"""CPU benchmark; the code lives in gpuloss/_bench_cpu.py (also `gpuloss bench`)."""

import sys

from gpuloss._bench_cpu import main

if __name__ == "__main__":
    sys.exit(main())
