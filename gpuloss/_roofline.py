"""A roofline prediction of the GPU benchmark's rows (issue 26): the bytes each kernel launch
moves, the grid it runs on and the time those bytes take on a named card, so that the first
GPU run shows measured against predicted at once. Pure Python and NumPy (no CuPy): it runs
where no GPU is (`python benchmarks/gpu.py --predict-only` writes every row's prediction).

The model, and what it assumes (each assumption is a parameter):

- Memory-bound: a launch takes bytes / bandwidth, at the nominal HBM bandwidth times
  ACHIEVABLE = 0.9, what a large device-to-device copy reaches on H100 and H200 (about 3.0
  of 3.35 TB/s and 4.3 of 4.8). A card with no entry in CARDS takes the benchmark's
  measured copy bandwidth as it is (fraction 1).
- Bytes are DRAM traffic, array by array, once per pass over it: pred, target (or one label
  per row), the gradient (and the per-sample output with reduction="none"), one float64
  partial per block (written by each block, read by the last one), the state word (a ticket
  per block and the value). A row longer than the register cache (cache 0) reads pred, and
  probability targets, twice: the second read is counted, though part of it may come from L2.
  A value read again for its domain check is the same sector, counted once.
- Waves: the grid is min(ceil(work / per block), 8 x SMs) blocks of 256 threads, as the
  backend launches it (cuda._blocks_for, cuda._grid_cap); `blocks_per_sm` are resident at
  once, so the grid runs in waves = ceil(blocks / (SMs x blocks_per_sm)). Every resident
  block is given the same share of the bandwidth (latency-bound below a full wave), so a
  partial last wave takes as long as a full one: wave time = waves x resident slots x bytes
  of the busiest block / bandwidth. A launch takes max(bytes / bandwidth, wave time).
- blocks_per_sm, by default what the kernel's registers allow (the occupancy calculator's
  rules on ptxas's report, when a kernel-resources table is given, see load_resources), else
  the occupancy bars tests/test_kernels.py holds the kernels to (FLOOR_BLOCKS_PER_SM).
- Overhead per call, added to the launches' time (Overheads): the host's work in a gpuloss
  call before its launch, each device operation (a kernel launch, the memset of the state
  word), and validate=True's read of flags and value. The benchmark's CUDA events are
  recorded around each call on an idle stream, so all of it is on the clock.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ACHIEVABLE = 0.9  # of the nominal bandwidth: what a large device-to-device copy reaches
GRID_BLOCKS_PER_SM = 8  # = cuda._grid_cap: the grid is at most 8 blocks per SM
PARTIAL_BYTES = 8  # one float64 partial per block
TICKET_BYTES = 4  # each block's atomic ticket in the state word
# resident blocks per SM when no register count is given: the occupancy bars of
# tests/test_kernels.py (elementwise half the SM's 64 warps, rows on 4- and 2-byte data a
# quarter, float64 rows no bar: one block)
FLOOR_BLOCKS_PER_SM = {"elementwise": 4, "rows": 2, "rows_f64": 1}


@dataclass(frozen=True)
class Card:
    """A GPU as the model sees it: SMs, nominal bandwidth (bytes/s) and the fraction of it a
    kernel reaches, and the per-SM limits the occupancy follows from."""

    name: str
    sms: int
    bandwidth: float
    fraction: float = ACHIEVABLE
    threads_per_sm: int = 2048
    registers_per_sm: int = 65536
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 233472  # bytes a kernel's blocks can use (sm_90)
    arch: str = "sm_90"  # whose register counts apply (a kernel-resources table has several)
    tensor_flops: float = 989.4e12  # dense 16-bit tensor-core peak (FLOP/s; H100 SXM, H200)

    @property
    def achievable(self) -> float:
        return self.bandwidth * self.fraction


CARDS = {
    "H100 SXM": Card("H100 SXM", sms=132, bandwidth=3.35e12),
    "H200": Card("H200", sms=132, bandwidth=4.8e12),
}


@dataclass(frozen=True)
class Overheads:
    """Fixed costs per call, in µs: assumptions, to be checked against the first GPU run."""

    call_us: float = 20.0  # host: argument checks, dispatch, outputs from CuPy's pool
    # (gpuloss._api.prepare alone takes ~17 µs on the 2-core development VM)
    launch_us: float = 4.0  # per device operation: a kernel launch through CuPy, a memset
    read_us: float = 10.0  # validate=True: the 24-byte read of flags and value, a sync
    autograd_us: float = 40.0  # torch autograd: DLPack views, the Function, backward engine


OVERHEADS = Overheads()


@dataclass(frozen=True)
class Launch:
    """One kernel launch: its instantiation, bytes by array and direction, its grid, and
    what its busiest block moves (grid-stride work rounds up per block)."""

    kernel: str
    traffic: dict
    blocks: int
    busiest_block_bytes: int
    kind: str  # "elementwise", "rows", "rows_f64", or "torch" (PyTorch's own kernel)

    @property
    def bytes(self) -> int:
        return sum(self.traffic.values())


def card_for(device_name: str, *, sms: int | None = None, copy_bandwidth: float | None = None,
             threads_per_sm: int = 2048, registers_per_sm: int = 65536,
             arch: str = "sm_90") -> Card | None:
    """The card model for a device name: H100 SXM or H200 by name (and SM count, when given:
    an H100 PCIe has 114), else one made of the measured copy bandwidth and the device's
    attributes; None where neither is known."""
    upper = device_name.upper()
    named = None
    if "H200" in upper and "GH200" not in upper:  # a GH200 is an H100 with its own memory
        named = CARDS["H200"]
    elif "H100" in upper and "PCIE" not in upper and "NVL" not in upper:
        named = CARDS["H100 SXM"]
    if named is not None and (sms is None or sms == named.sms):
        return named
    if sms is None or not copy_bandwidth:
        return None
    return Card(f"{device_name} (measured copy)", sms, copy_bandwidth, fraction=1.0,
                threads_per_sm=threads_per_sm, registers_per_sm=registers_per_sm, arch=arch)


# ---------------------------------------------------------------------------------------------
# the backend's choices, read through one helper each (its signatures change with the kernels)


def _cuda():
    from .backends import cuda  # imports no CuPy (only when a CuPy array arrives)

    return cuda


def row_layout(K: int, dtype, labels: bool, functor: str) -> tuple[tuple[int, int], int]:
    """((template threads, cache), threads per row at launch) the backend picks for rows of
    K classes of `dtype` with class indices or probability targets, for the loss's functor."""
    cuda = _cuda()
    return (cuda.row_config(K, dtype, labels, functor),
            cuda.row_threads(K, dtype, labels, functor))


def _call_for(loss: str):
    """The checked call of `loss` on tiny inputs made as the benchmark makes them
    (gpuloss._examples.example_inputs): its functor variant, labels or probabilities, rules."""
    import gpuloss as gl
    from gpuloss import _api
    from gpuloss._examples import example_inputs

    fn = gl.LOSSES[loss]
    p, y = example_inputs(fn, np.random.default_rng(0), n=8, rows=2, classes=3)
    return fn, _api.prepare(loss, p, y, {}, want_value=True, want_grad=True)


def _grid(count: int, per_block: int, card: Card, cap: int | None = None) -> int:
    """= cuda._blocks_for with cuda._grid_cap on `card` (or another cap: the emulator's)."""
    return max(1, min(-(-count // per_block), cap or GRID_BLOCKS_PER_SM * card.sms))


def _finish(traffic: dict, blocks: int, value_bytes: int, wants_sum: bool) -> None:
    """The grid's sum: each block writes its partial and takes a ticket (an atomic on the
    state word), the last one reads every partial back (through a volatile pointer: the
    emulator's trace does not see it, nor the atomics) and writes the value."""
    if wants_sum:
        traffic["partials write"] = PARTIAL_BYTES * blocks
        traffic["partials read"] = PARTIAL_BYTES * blocks
        traffic["state atomics"] = TICKET_BYTES * blocks
        traffic["state write"] = value_bytes


def gpuloss_launch(loss: str, shape, dtype, card: Card, *, reduction: str = "mean",
                   want_grad: bool = True, label_dtype=np.int64,
                   grid_cap: int | None = None) -> Launch:
    """The one kernel launch of `loss`'s value and gradient on `shape` pred of `dtype`, with
    targets as the benchmark makes them (float targets in pred's dtype, int64 labels);
    `grid_cap` replaces the card's 8 blocks per SM (the CPU emulator runs 3). Traffic keys
    name the kernel's arrays as the emulator does (`EmulatorRuntime.traffic`), labels being
    its `target`: "labels read" is one label per row (the distinct bytes; the row's lanes
    share each read)."""
    cuda = _cuda()
    dtype = np.dtype(cuda.BF16 if str(dtype) == "bfloat16" else dtype)
    size = dtype.itemsize
    fn, call = _call_for(loss)
    wants_sum = reduction != "none"
    value_bytes = size if wants_sum else 0
    threads = cuda.BLOCK_THREADS
    if fn.family != "categorical":
        n = math.prod(shape)
        blocks = _grid(n, threads, card, grid_cap)
        per_element = size + size + (size if want_grad else 0) + (0 if wants_sum else size)
        traffic = {"pred read": n * size, "target read": n * size}
        if want_grad:
            traffic["grad write"] = n * size
        if not wants_sum:
            traffic["per-element write"] = n * size
        _finish(traffic, blocks, value_bytes, wants_sum)
        steps = -(-n // (blocks * threads))  # grid-stride iterations of the busiest block
        busiest = steps * threads * per_element
        name = cuda.elementwise_name(call.kernel, dtype, dtype)
        return Launch(name, traffic, blocks, busiest, "elementwise")
    *sample, K = shape
    rows = math.prod(sample)
    labels = bool(call.labels)
    config, row_threads = row_layout(K, dtype, labels, call.kernel)
    passes = 1 if config[1] else 2  # cache 0: the row is read again for the gradient
    per_block = threads // row_threads
    blocks = _grid(rows, per_block, card, grid_cap)
    target_dtype = np.dtype(label_dtype) if labels else dtype
    traffic = {"pred read": passes * rows * K * size}
    if labels:
        traffic["labels read"] = rows * target_dtype.itemsize
    else:
        traffic["target read"] = passes * rows * K * size
    if want_grad:
        traffic["grad write"] = rows * K * size
    if not wants_sum:
        traffic["per-sample write"] = rows * size
    _finish(traffic, blocks, value_bytes, wants_sum)
    per_row = (passes * K * size + (target_dtype.itemsize if labels else passes * K * size)
               + (K * size if want_grad else 0) + (0 if wants_sum else size))
    steps = -(-rows // (blocks * per_block))  # row steps every block runs
    name = cuda.rows_name(call.kernel, labels, config, dtype, target_dtype)
    kind = "rows_f64" if dtype == np.float64 else "rows"
    return Launch(name, traffic, blocks, steps * per_block * per_row, kind)


def torch_backward_launch(shape, dtype) -> Launch:
    """gpuloss through torch autograd on CUDA: backward returns grad_output x the saved
    gradient (gpuloss._torch._backward; only a CPU grad_output of 1 skips it), one PyTorch
    elementwise kernel reading the gradient and writing a new one."""
    size = np.dtype(_cuda().BF16 if str(dtype) == "bfloat16" else dtype).itemsize
    n = math.prod(shape)
    return Launch("torch mul (grad x grad_output)", {"grad read": n * size,
                                                     "grad write": n * size}, 0, 0, "torch")


# ---------------------------------------------------------------------------------------------
# occupancy


def load_resources(path) -> dict:
    """{(kernel, arch): ptxas's report} from a kernel-resources JSON (tests/kernel_resources.py
    writes benchmarks/results/kernel-resources-*.json): registers and static shared memory."""
    doc = json.loads(Path(path).read_text())
    return {(r["kernel"], r["arch"]): {"registers": r["registers"], "shared": r["shared"]}
            for r in doc["kernels"]}


def newest_resources(folder) -> tuple[dict, str | None]:
    """load_resources of the last kernel-resources-*.json by name (the NVRTC version) in
    `folder`, and its name; ({}, None) if there is none."""
    files = sorted(Path(folder).glob("kernel-resources-*.json"))
    return (load_resources(files[-1]), files[-1].name) if files else ({}, None)


def resident_blocks(registers: int, shared: int, *, block_threads: int, registers_per_sm: int,
                    threads_per_sm: int, max_blocks_per_sm: int, shared_per_sm: int,
                    reserved_shared: int = 1024) -> int:
    """Resident blocks per SM of a kernel with `registers` per thread and `shared` bytes of
    static shared memory per block, by the occupancy calculator's rules: the smallest of the
    register limit (registers allocated per warp in units of 256), the thread and block
    limits and the shared-memory limit (`reserved_shared` more per block). 0: it cannot run.
    The one place the rule lives (tests/kernel_resources.py checks the bars with it)."""
    warps = -(-block_threads // 32)
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (registers_per_sm // per_warp) // warps if per_warp else max_blocks_per_sm
    by_shared = shared_per_sm // (shared + reserved_shared)
    return min(by_registers, threads_per_sm // block_threads, max_blocks_per_sm, by_shared)


def blocks_per_sm_from(registers: int, card: Card, shared: int = 0,
                       block_threads: int = 256) -> int:
    """Resident blocks per SM on `card` (resident_blocks with the card's limits; at least
    one, for the model)."""
    return max(1, resident_blocks(registers, shared, block_threads=block_threads,
                                  registers_per_sm=card.registers_per_sm,
                                  threads_per_sm=card.threads_per_sm,
                                  max_blocks_per_sm=card.max_blocks_per_sm,
                                  shared_per_sm=card.shared_per_sm))


def default_blocks_per_sm(launch: Launch, card: Card,
                          resources: dict | None = None) -> tuple[int, str]:
    """(blocks per SM, where the number comes from) for `launch` on `card`: from the kernel's
    registers on the card's architecture where `resources` has them, else the occupancy bar
    of its kind."""
    found = (resources or {}).get((launch.kernel, card.arch))
    if found:
        return blocks_per_sm_from(found["registers"], card, found.get("shared", 0)), "registers"
    return FLOOR_BLOCKS_PER_SM[launch.kind], "occupancy bar"


def launch_seconds(launch: Launch, card: Card, blocks_per_sm: int) -> dict:
    """Memory time, wave-quantised time and waves of one launch (seconds)."""
    bw = card.achievable
    memory = launch.bytes / bw
    if launch.kind == "torch":  # PyTorch's vectorised elementwise kernel: bandwidth alone
        return {"memory_s": memory, "wave_s": memory, "waves": None}
    slots = card.sms * blocks_per_sm
    waves = -(-launch.blocks // slots)
    wave = waves * slots * launch.busiest_block_bytes / bw
    return {"memory_s": memory, "wave_s": wave, "waves": waves}


# ---------------------------------------------------------------------------------------------
# a benchmark row


def predict(loss: str, shape, dtype, card: Card, *, op: str = "value_and_grad",
            blocks_per_sm: int | None = None, resources: dict | None = None,
            overheads: Overheads = OVERHEADS, validate: bool = True) -> dict:
    """The prediction of one benchmark row: `op` "value_and_grad" (gpuloss on CuPy arrays, the
    rows' `ms`) or "autograd" (gpuloss(x, y).backward() on CUDA tensors, the large-vocabulary
    rows' `torch_autograd_ms`), mean reduction, validate as given. predicted_ms = the launches'
    max(bytes / bandwidth, wave time) + the overheads."""
    launches = [gpuloss_launch(loss, tuple(shape), dtype, card)]
    device_ops = 2  # the state word's memset, the kernel
    host_us = overheads.call_us + (overheads.read_us if validate else 0.0)
    if op == "autograd":
        launches.append(torch_backward_launch(tuple(shape), dtype))
        device_ops += 2  # torch's fill of grad_output (ones), the multiply
        host_us += overheads.autograd_us
    elif op != "value_and_grad":
        raise ValueError(f"op is 'value_and_grad' or 'autograd', not {op!r}")
    main = launches[0]
    if blocks_per_sm is None:
        bps, source = default_blocks_per_sm(main, card, resources)
    else:
        bps, source = blocks_per_sm, "given"
    times = [launch_seconds(x, card, bps) for x in launches]
    kernel_s = sum(max(t["memory_s"], t["wave_s"]) for t in times)
    overhead_us = host_us + device_ops * overheads.launch_us
    traffic: dict = {}
    for x in launches:
        for key, b in x.traffic.items():
            traffic[key] = traffic.get(key, 0) + b
    return {
        "card": card.name, "op": op,
        "bandwidth_nominal_GBps": round(card.bandwidth / 1e9, 1),
        "achievable_fraction": card.fraction,
        "bandwidth_GBps": round(card.achievable / 1e9, 1),
        "kernel": main.kernel, "bytes": sum(x.bytes for x in launches), "traffic": traffic,
        "launches": sum(x.kind != "torch" for x in launches), "device_ops": device_ops,
        "blocks": main.blocks, "blocks_per_sm": bps, "blocks_per_sm_from": source,
        "waves": times[0]["waves"],
        "memory_ms": 1e3 * sum(t["memory_s"] for t in times),
        "wave_ms": 1e3 * sum(t["wave_s"] for t in times),
        "overhead_ms": 1e-3 * overhead_us,
        "predicted_ms": 1e3 * kernel_s + 1e-3 * overhead_us,
    }


def assumptions(overheads: Overheads = OVERHEADS) -> dict:
    """The model's assumptions, for the JSON beside the predictions."""
    return {"achievable_fraction": ACHIEVABLE, "overheads_us": asdict(overheads),
            "grid_blocks_per_sm": GRID_BLOCKS_PER_SM,
            "floor_blocks_per_sm": dict(FLOOR_BLOCKS_PER_SM),
            "cards": {name: {"sms": c.sms, "bandwidth_nominal_GBps": c.bandwidth / 1e9,
                             "bandwidth_GBps": round(c.achievable / 1e9, 1)}
                      for name, c in CARDS.items()}}



# ---------------------------------------------------------------------------------------------
# linear cross-entropy (issue 27): three GEMMs and a row pass


GEMM_FRACTION = 0.7  # assumption: of the 16-bit tensor-core peak, what cuBLAS reaches on
# GEMMs of this size (thousands in every dimension); to check against the first GPU run


def linear_cross_entropy(tokens: int, hidden: int, vocab: int, itemsize: int, card: Card, *,
                         chunk_rows: int, backward: bool = True,
                         overheads: Overheads = OVERHEADS) -> dict:
    """The prediction of one forward (+ backward) of `gpuloss.linear_cross_entropy` on 16-bit
    inputs: the GEMMs at GEMM_FRACTION of the tensor-core peak, plus the memory-bound work
    between them at the achievable bandwidth (the row pass reads each chunk's logits and
    writes their gradient in place; with a backward, each chunk's d_weight product is added
    into a float32 accumulator by the GEMM itself, beta = 1: 8 bytes per weight per chunk
    read and written; the accumulator is rounded to the weight's dtype once), plus per-chunk
    launch overheads. `floor_ms` is the three GEMMs alone (one without a backward)."""
    gemms = 3 if backward else 1
    flops = 2.0 * tokens * hidden * vocab * gemms
    gemm_s = flops / (card.tensor_flops * GEMM_FRACTION)
    chunks = -(-tokens // max(chunk_rows, 1))
    logits = tokens * vocab * itemsize
    memory = logits * (2 if backward else 1)  # read the logits; write the gradient over them
    if backward:
        memory += chunks * vocab * hidden * 8 + vocab * hidden * (4 + itemsize)
    memory_s = memory / card.achievable
    device_ops = chunks * (gemms + 2) + (2 if backward else 0)
    overhead_us = overheads.call_us + device_ops * overheads.launch_us
    return {
        "card": card.name, "tokens": tokens, "hidden": hidden, "vocab": vocab,
        "itemsize": itemsize, "chunk_rows": chunk_rows, "chunks": chunks,
        "backward": backward, "gemm_fraction": GEMM_FRACTION,
        "tensor_tflops": card.tensor_flops / 1e12,
        "floor_ms": 1e3 * gemm_s, "memory_ms": 1e3 * memory_s,
        "overhead_ms": 1e-3 * overhead_us,
        "predicted_ms": 1e3 * (gemm_s + memory_s) + 1e-3 * overhead_us,
    }
