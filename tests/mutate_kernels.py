"""Mutation check of kernels/ (a developer tool, not part of the test run).

Changes one operator or constant at a time in kernels/*.cu and *.cuh, runs the CPU kernel
tests, and reports every mutation that no test noticed. Usage:

    python tests/mutate_kernels.py [--sample N] [--seed S] [--grep TEXT] [--lines A-B]

--grep keeps only the sites on lines containing TEXT, --lines those on lines A to B of
gpuloss_math.cuh (to aim at a change).
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "kernels" / "gpuloss_math.cuh", ROOT / "kernels" / "gpuloss_kernels.cu"]
SWAPS = [
    (r"(?<=[\w)\]]) \+ (?=[\w(])", " - "),
    (r"(?<=[\w)\]]) - (?=[\w(])", " + "),
    (r"(?<=[\w)\]]) \* (?=[\w(])", " / "),
    (r"(?<=[\w)\]]) / (?=[\w(])", " * "),
    (r" < ", " <= "),
    (r" > ", " >= "),
    (r" <= ", " < "),
    (r" >= ", " > "),
    (r" == ", " != "),
    (r" != ", " == "),
    (r" && ", " || "),
    (r" \|\| ", " && "),
    (r"\bT\(1\)", "T(2)"),
    (r"\bC\(1\)", "C(2)"),
    (r"\bT\(0\)", "T(1)"),
    (r"\bC\(0\)", "C(1)"),
    (r"\b0\.5\b", "0.25"),
    (r"\b1\.0\b", "2.0"),
    (r"\b0x[0-9a-f]+(?:ull|u)?\b", None),  # hex constants: flip the lowest bit
    (r"\b(1[0-9]|2[0-9]|3[0-9]|[2-9])\b", None),  # small integers: add one
]


def sites(text):
    code_lines = []
    offset = 0
    for line in text.splitlines(keepends=True):
        code = line.split("//")[0]
        if not code.lstrip().startswith(("#include", "#pragma")):
            code_lines.append((offset, code))
        offset += len(line)
    found = []
    for pattern, repl in SWAPS:
        for start, code in code_lines:
            for m in re.finditer(pattern, code):
                found.append((start + m.start(), start + m.end(), m.group(0), repl))
    return found


def mutate(original, site):
    a, b, old, repl = site
    if repl is None:
        if old.startswith("0x"):
            digits = old.rstrip("ul")
            new = hex(int(digits, 16) ^ 1) + old[len(digits):]
        else:
            new = str(int(old) + 1)
    else:
        new = repl
    return original[:a] + new + original[b:], f"{old!r} -> {new!r}"


def run_tests():
    # the kernel tests and the emulated defect/twin tests (the fuzz and sanitizer runs are
    # left out: too slow to repeat per mutation)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_kernels.py"), str(ROOT / "tests" / "test_emulated.py"),
           "-k", "not nvrtc and not wheel and not fuzz and not sanitize and not device_script"]
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=240).returncode
    except subprocess.TimeoutExpired:  # a mutation that hangs the emulator is caught too
        return -1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sample", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grep", default=None)
    ap.add_argument("--lines", default=None)
    args = ap.parse_args()
    all_sites = [(f, s) for f in FILES for s in sites(f.read_text())]
    if args.lines:
        lo, hi = (int(x) for x in args.lines.split("-"))
        header = FILES[0]
        text = header.read_text()
        all_sites = [(f, s) for f, s in all_sites
                     if f == header and lo <= text[: s[0]].count("\n") + 1 <= hi]
    if args.grep:
        def line_of(f, s):
            text = f.read_text()
            return text[text.rfind("\n", 0, s[0]) + 1 : text.find("\n", s[0])]

        all_sites = [(f, s) for f, s in all_sites if args.grep in line_of(f, s)]
    random.Random(args.seed).shuffle(all_sites)
    survivors, tried = [], 0
    for path, site in all_sites[: args.sample]:
        original = path.read_text()
        mutated, what = mutate(original, site)
        line = original[: site[0]].count("\n") + 1
        try:
            path.write_text(mutated)
            rc = run_tests()
        finally:
            path.write_text(original)
        tried += 1
        status = "caught" if rc != 0 else "SURVIVED"
        print(f"{status:8s} {path.name}:{line} {what}", flush=True)
        if rc == 0:
            survivors.append((path.name, line, what))
    print(f"\n{tried - len(survivors)}/{tried} mutations caught from {len(all_sites)} sites")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
