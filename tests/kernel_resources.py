"""What each CUDA kernel instantiation costs an SM, read from ptxas's own report, without a GPU.

NVRTC compiles every instantiation (gpuloss.backends.cuda.all_kernel_names) for an
architecture with CuPy's options (-ftz=true appended, as cupy.RawModule does) and `-Xptxas -v`;
its log gives, per kernel, the registers per thread, the spill stores and loads, the stack
frame (local memory) and the static shared memory. From those and the architecture's limits
the theoretical occupancy follows (the CUDA occupancy calculator's rules). tests/test_kernels.py
fails on any spill and on occupancy below the bars; `python tests/kernel_resources.py` writes
the table to benchmarks/results/kernel-resources-<nvrtc version>.json.

One compile of every instantiation per architecture takes minutes on two cores (ptxas
optimising 787 kernels). So the test run compiles a sample (`sample`: one instantiation of
every kernel, functor variant and data type; about a seventh) and checks the committed table
(benchmarks/results/kernel-resources-nvrtc<version>.json, written by the full compile): it must
be of the current kernel source (`source_digest`), hold every instantiation at the bars, and
agree with the sample's fresh report. GPULOSS_FULL_SWEEPS=1 (the nightly run) compiles every
instantiation instead. `compiled(arch, names)` keeps each compile on disk
(GPULOSS_EMULATOR_CACHE, as the emulator's build) keyed by the source, the names, the options
and NVRTC's version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = ("sm_80", "sm_90")
# per SM: registers, warps, blocks, shared memory (bytes), and what each block reserves of it
LIMITS = {
    "sm_80": dict(registers=65536, warps=64, blocks=32, shared=167936, reserved=1024),
    "sm_90": dict(registers=65536, warps=64, blocks=32, shared=233472, reserved=1024),
}
# the bars (issue 26): elementwise kernels (and the weight checks) at least half the SM's
# warps; row kernels on 4- and 2-byte data a quarter (16 warps); float64 rows no bar
OCCUPANCY_BAR = {"elementwise": 0.5, "rows": 0.25, "rows_f64": 0.0}


@dataclass(frozen=True)
class Resources:
    """One instantiation for one architecture, as ptxas reports it."""

    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes of local memory per thread
    shared: int  # bytes of static shared memory per block

    def blocks_per_sm(self, arch: str, block_threads: int) -> int:
        """Resident blocks per SM: the smallest of the register, warp, block and shared memory
        limits (the occupancy calculator's rules)."""
        from gpuloss._roofline import resident_blocks

        lim = LIMITS[arch]
        return resident_blocks(self.registers, self.shared, block_threads=block_threads,
                               registers_per_sm=lim["registers"],
                               threads_per_sm=32 * lim["warps"],
                               max_blocks_per_sm=lim["blocks"], shared_per_sm=lim["shared"],
                               reserved_shared=lim["reserved"])

    def occupancy(self, arch: str, block_threads: int) -> float:
        """Resident warps over the SM's maximum."""
        warps = math.ceil(block_threads / 32)
        return self.blocks_per_sm(arch, block_threads) * warps / LIMITS[arch]["warps"]


def kind(name: str) -> str:
    """Which occupancy bar an instantiation answers to (see OCCUPANCY_BAR)."""
    from gpuloss.backends import cuda as _cuda_backend

    if not name.startswith("gpuloss_rows"):
        return "elementwise"
    return "rows" if _cuda_backend.compute_is_float32(name) else "rows_f64"


_ENTRY = re.compile(
    r"Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\d+)'\n"
    r"ptxas info\s+: Function properties for [^\n]+\n"
    r"ptxas\s+\.\s+(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
    r"(?P<ld>\d+) bytes spill loads\n"
    r"ptxas info\s+: Used (?P<regs>\d+) registers(?:[^\n]*?, (?P<smem>\d+) bytes smem)?[^\n]*\n")


def parse_log(log: str) -> dict[str, Resources]:
    """ptxas's verbose report, by mangled kernel name."""
    found = {}
    for m in _ENTRY.finditer(log):
        found[m["name"]] = Resources(int(m["regs"]), int(m["st"]), int(m["ld"]),
                                     int(m["stack"]), int(m["smem"] or 0))
    return found


def compile_options(arch: str) -> list[str]:
    """CuPy's RawModule options for our source (it appends -ftz=true), and ptxas's report."""
    from gpuloss.backends import cuda as _cuda_backend

    return [f"-arch={arch}", *_cuda_backend.OPTIONS, "-ftz=true", "-Xptxas", "-v"]


def _nvrtc():
    from cupy.cuda import nvrtc

    return nvrtc


def compile_all(arch: str, names: list[str] | None = None, source: str | None = None) -> dict:
    """Compile every instantiation for `arch` in one NVRTC program: {"ok", "log", "resources"
    by instantiation name (not mangled), "missing": names with no report}."""
    from gpuloss.backends import cuda as _cuda_backend

    nvrtc = _nvrtc()
    source = source or _cuda_backend.kernel_source()
    names = list(names or _cuda_backend.all_kernel_names())
    prog = nvrtc.createProgram(source, "gpuloss_kernels.cu", [], [])
    for name in names:
        nvrtc.addNameExpression(prog, name)
    try:
        nvrtc.compileProgram(prog, compile_options(arch))
    except Exception as exc:  # noqa: BLE001 - the log says why; the test reports it
        return {"ok": False, "log": f"{exc}\n{nvrtc.getProgramLog(prog)}", "resources": {},
                "missing": names}
    log = nvrtc.getProgramLog(prog)
    mangled = parse_log(log)
    resources, missing = {}, []
    for name in names:
        entry = mangled.get(nvrtc.getLoweredName(prog, name))
        if entry is None:
            missing.append(name)
        else:
            resources[name] = asdict(entry)
    return {"ok": True, "log": log, "resources": resources, "missing": missing}


def nvrtc_version() -> str:
    return ".".join(map(str, _nvrtc().getVersion()))


def full_sweeps() -> bool:
    """GPULOSS_FULL_SWEEPS=1: the nightly run, every instantiation compiled."""
    return os.environ.get("GPULOSS_FULL_SWEEPS") == "1"


def source_digest() -> str:
    """What the committed table must have been compiled from: the kernel source and the
    instantiations' names."""
    from gpuloss.backends import cuda as _cuda_backend

    key = "\n".join([_cuda_backend.kernel_source(), *_cuda_backend.all_kernel_names()])
    return hashlib.sha256(key.encode()).hexdigest()


def _stratum(name: str) -> tuple[str, str, str]:
    """(kernel, functor with its switches, the data's dtype): what decides the registers; the
    target's dtype and the row layouts vary inside a stratum."""
    head, args = name.split("<", 1)
    depth, parts, cur = 0, [], ""
    for ch in args[:-1]:  # the template arguments, split at top-level commas
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    dtype = parts[-2] if head == "gpuloss_rows" else parts[1] if len(parts) > 1 else ""
    return head, parts[0], dtype


def sample(names: list[str]) -> list[str]:
    """One instantiation per stratum, the same every run (the smallest hash of its name)."""
    chosen: dict = {}
    for name in names:
        key = _stratum(name)
        h = hashlib.sha256(name.encode()).hexdigest()
        if key not in chosen or h < chosen[key][0]:
            chosen[key] = (h, name)
    return sorted(name for _, name in chosen.values())


def table_path() -> Path:
    return (Path(__file__).resolve().parents[1] / "benchmarks" / "results"
            / f"kernel-resources-nvrtc{nvrtc_version()}.json")


def compiled(arch: str, folder: Path | None = None, names: list[str] | None = None) -> dict:
    """compile_all(arch, names) for the current source (every instantiation by default),
    cached on disk by content (see above)."""
    import kernel_host

    from gpuloss.backends import cuda as _cuda_backend

    names = list(names or _cuda_backend.all_kernel_names())
    key = "\n".join([_cuda_backend.kernel_source(), *names, *compile_options(arch),
                     nvrtc_version()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(folder or kernel_host.cache_dir()) / f"ptxas_{arch}_{digest}.json"
    with kernel_host.build_lock(path):  # one compile per architecture across test workers
        if path.exists():
            return json.loads(path.read_text())
        result = _compile_at_low_priority(arch, names)
        if result["ok"]:
            tmp = path.with_name(f"{path.name}.tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(path)
    return result


def _compile_at_low_priority(arch: str, names: list[str]) -> dict:
    """compile_all(arch) in a child process at the lowest CPU priority: minutes of NVRTC then
    run in the gaps of the other test worker, whose emulated launches (256 threads meeting at
    barriers) slow down many times when a busy process holds one of two cores."""
    import subprocess

    # the child lowers its own priority: a preexec_fn would run the parent's at-fork hooks
    # (JAX's, once a test has loaded it, warns that fork may deadlock: an error in the suite)
    code = ("import json, os, sys; os.nice(19); sys.path.insert(0, sys.argv[1]); "
            "import kernel_resources as k; "
            "print(json.dumps(k.compile_all(sys.argv[2], json.loads(sys.stdin.read()))))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), arch],
                          input=json.dumps(names), capture_output=True, text=True)
    if done.returncode:
        return {"ok": False, "log": done.stderr[-5000:], "resources": {}, "missing": []}
    return json.loads(done.stdout)


def table(results: dict[str, dict], block_threads: int) -> list[dict]:
    """One row per instantiation and architecture: what ptxas reported and the occupancy."""
    rows = []
    for arch, result in results.items():
        for name, fields in result["resources"].items():
            res = Resources(**fields)
            rows.append({"kernel": name, "arch": arch, **fields,
                         "blocks_per_sm": res.blocks_per_sm(arch, block_threads),
                         "occupancy": res.occupancy(arch, block_threads),
                         "bar": OCCUPANCY_BAR[kind(name)]})
    return rows


def summary(rows: list[dict]) -> dict:
    """Per architecture and kind: instantiations, spills, register range, lowest occupancy."""
    out: dict = {}
    for r in rows:
        s = out.setdefault(r["arch"], {}).setdefault(kind(r["kernel"]), {
            "instantiations": 0, "spilling": 0, "registers_min": 999, "registers_max": 0,
            "occupancy_min": 1.0})
        s["instantiations"] += 1
        s["spilling"] += bool(r["spill_stores"] or r["spill_loads"])
        s["registers_min"] = min(s["registers_min"], r["registers"])
        s["registers_max"] = max(s["registers_max"], r["registers"])
        s["occupancy_min"] = min(s["occupancy_min"], r["occupancy"])
    return out


def main(argv=None) -> int:
    """Compile for every architecture and write the table (and its summary) as JSON."""
    import argparse
    import datetime as dt

    from gpuloss.backends import cuda as _cuda_backend

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    results = {arch: compiled(arch) for arch in ARCHS}
    for arch, result in results.items():
        if not result["ok"]:
            print(result["log"][-3000:], file=sys.stderr)
            return 1
    rows = table(results, _cuda_backend.BLOCK_THREADS)
    doc = {"what": "ptxas -v resource report of every kernel instantiation (NVRTC, CuPy's "
                   "options) and the theoretical occupancy at 256 threads per block",
           "nvrtc": nvrtc_version(), "date": dt.date.today().isoformat(),
           "source_sha256": source_digest(),
           "options": compile_options("<arch>"), "summary": summary(rows), "kernels": rows}
    out = Path(args.out) / table_path().name
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["summary"], indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
