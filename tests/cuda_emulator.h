// A tiny CUDA execution model for the host, so that the test suite can run the real kernels of
// kernels/gpuloss_kernels.cu with g++ on a machine without a GPU.
//
// Blocks run one after another, in order or (gl_emu_reverse_blocks) in reverse, so that a test
// can change which block finishes last. The threads of a block are fibers on the launching
// thread (ucontext): each runs until it meets a barrier, then hands over to the next, so
// __syncthreads is a real barrier and warp shuffles exchange values through a per-warp slot
// array between two warp barriers, without 256 OS threads contending for two cores at every
// barrier (that cost 35-145 ms per launch on the 2-core VM). With GL_EMU_OS_THREADS (the
// sanitizer builds: ThreadSanitizer must see real threads race) they are real std::threads.
// __shared__ becomes `static`: one instance, reused by the blocks in turn, as a GPU's shared
// memory is (uninitialised at each block's start).
//
// The device's floating-point rules (see tests/kernel_host.py for the build modes): a launch
// with `ftz` set runs each emulated thread with flush-to-zero and denormals-are-zero, as CuPy's
// -ftz=true compiles float arithmetic; fused multiply-add contraction is a compiler flag.
// Each launch also checks its block size against the kernel's __launch_bounds__.
//
// Memory traffic (off unless gl_emu_tracing is set): the kernels route every global access of
// their data through GL_TRACE_ACCESS (kernels/gpuloss_kernels.cu), defined here before the
// kernel source is included. Each emulated thread notes its accesses in a buffer of its own;
// at the end of each block thread 0 groups them per warp into warp-wide accesses (the n-th
// access of each lane to one array, reads and writes apart: the kernels' loops keep the lanes
// in step) and counts the 32-byte sectors each group touches. See gl_emu_trace_merge_block.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#ifndef GL_EMU_OS_THREADS
#include <ucontext.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
inline void gl_emu_flush_to_zero() { _mm_setcsr(_mm_getcsr() | 0x8040u); }  // FTZ | DAZ
inline unsigned long gl_emu_fp_mode() { return _mm_getcsr(); }
inline void gl_emu_set_fp_mode(unsigned long m) { _mm_setcsr((unsigned)m); }
#elif defined(__aarch64__)
inline unsigned long gl_emu_fp_mode() {
    unsigned long fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    return fpcr;
}
inline void gl_emu_set_fp_mode(unsigned long m) { __asm__ volatile("msr fpcr, %0" : : "r"(m)); }
inline void gl_emu_flush_to_zero() { gl_emu_set_fp_mode(gl_emu_fp_mode() | (1ul << 24)); }  // FZ
#else
#error "the emulator's flush-to-zero mode needs x86-64 or AArch64"
#endif

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)  // checked at launch against the bound the source declares

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#ifdef GL_EMU_OS_THREADS
using GlEmuBarrier = std::barrier<>;
#else
// The fibers of a launch: the launching thread's scheduler loop resumes them in turn; a fiber
// hands back (gl_emu_yield) while it waits at a barrier, and when it is done. On x86-64 the
// switch is the few instructions below (callee-saved registers and the stack pointer: the
// floating-point mode is the thread's, the same for every fiber); glibc's swapcontext also
// saves the signal mask, a system call per switch, which made it most of a launch's time.
#if defined(__x86_64__)
extern "C" void gl_emu_switch(void** save_sp, void* load_sp);
#ifndef GL_EMU_SECONDARY_TU  // (a library built from several translation units defines it once)
__asm__(R"(
    .text
    .p2align 4
    .globl gl_emu_switch
    .hidden gl_emu_switch
    .type gl_emu_switch, @function
gl_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gl_emu_switch, .-gl_emu_switch
)");
#endif
struct GlEmuContext {
    void* sp = nullptr;
};
#else
struct GlEmuContext {
    ucontext_t uc;
};
#endif
struct GlEmuFiber {
    GlEmuContext ctx;
    bool done = false;
};
struct GlEmuFibers {
    GlEmuContext loop;
    std::vector<GlEmuFiber> fibers;
    unsigned current = 0;
    std::function<void(unsigned)> body;
};
inline GlEmuFibers* gl_emu_fibers = nullptr;
inline void gl_emu_swap(GlEmuContext& from, GlEmuContext& to) {
#if defined(__x86_64__)
    gl_emu_switch(&from.sp, to.sp);
#else
    swapcontext(&from.uc, &to.uc);
#endif
}
inline void gl_emu_yield() {
    auto& f = *gl_emu_fibers;
    gl_emu_swap(f.fibers[f.current].ctx, f.loop);
}
// A barrier of fibers: the last to arrive opens it; the others hand over until it opens.
struct GlEmuBarrier {
    explicit GlEmuBarrier(unsigned n) : expected(n) {}
    void arrive_and_wait() {
        const uint64_t p = phase;
        if (++count == expected) {
            count = 0;
            ++phase;
            return;
        }
        while (phase == p) gl_emu_yield();
    }
    unsigned expected, count = 0;
    uint64_t phase = 0;
};
#endif

struct GlEmuBlock {
    std::unique_ptr<GlEmuBarrier> block;
    std::vector<std::unique_ptr<GlEmuBarrier>> warps;
    std::vector<uint64_t> slots;  // one 8-byte slot per thread
};
inline GlEmuBlock* gl_emu_block = nullptr;
// set when a kernel does something a GPU would not define (e.g. a partial shuffle mask)
inline std::atomic<int> gl_emu_fault{0};
inline std::atomic<int> gl_emu_reverse_blocks{0};  // run the blocks last to first

inline void __syncthreads() { gl_emu_block->block->arrive_and_wait(); }

template <typename T>
inline T gl_emu_exchange(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    unsigned t = threadIdx.x;
    unsigned warp = t / 32, base = warp * 32;
    auto& bar = *gl_emu_block->warps[warp];
    uint64_t raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    gl_emu_block->slots[t] = raw;
    bar.arrive_and_wait();
    uint64_t got = gl_emu_block->slots[base + src_lane];
    bar.arrive_and_wait();
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, int offset) {
    if (mask != 0xffffffffu) gl_emu_fault = 1;  // every lane of our warps takes part
    int lane = threadIdx.x % 32;
    int src = lane + offset < 32 ? lane + offset : lane;
    return gl_emu_exchange(v, src);
}

template <typename T>
inline T __shfl_xor_sync(unsigned members, T v, int mask) {
    if (members != 0xffffffffu) gl_emu_fault = 1;
    int lane = threadIdx.x % 32;
    return gl_emu_exchange(v, lane ^ mask);
}

// Atomics: one lock for all of them, so that two kinds on one address exclude each other too.
inline std::mutex& gl_emu_atomic_lock() {
    static std::mutex m;
    return m;
}
inline int atomicOr(int* address, int value) {
    std::lock_guard<std::mutex> lock(gl_emu_atomic_lock());
    int old = *address;
    *address = old | value;
    return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    std::lock_guard<std::mutex> lock(gl_emu_atomic_lock());
    unsigned old = *address;
    *address = old + value;
    return old;
}
// Orders this thread's earlier writes before its later ones for every other thread. Blocks run
// one after another here (a barrier between them), so a later block sees an earlier one's
// writes anyway; the fence keeps the device's rule in the code the emulator runs.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---------------------------------------------------------------------------------------------
// Memory traffic. Switched on by the host between launches (a relaxed load per access when off).
inline std::atomic<bool> gl_emu_tracing{false};

struct GlEmuAccess {
    const void* base;  // the array
    uintptr_t addr;    // first byte accessed
    uint32_t bytes;
    uint32_t seq;      // this lane's n-th access to (base, write) in this block
    int write;
};

struct GlEmuThreadTrace {
    std::vector<GlEmuAccess> accesses;
    std::vector<std::pair<std::pair<const void*, int>, uint32_t>> next_seq;  // a few arrays
};
inline thread_local GlEmuThreadTrace* gl_emu_my_trace = nullptr;

// This lane's count of its accesses to (base, write) so far, counting this one.
inline uint32_t gl_emu_next_seq(GlEmuThreadTrace* tt, const void* base, int write) {
    auto key = std::make_pair(base, write);
    auto it = std::find_if(tt->next_seq.begin(), tt->next_seq.end(),
                           [&](const auto& e) { return e.first == key; });
    if (it == tt->next_seq.end()) {
        tt->next_seq.push_back({key, 1});
        return 0;
    }
    return it->second++;
}

inline void gl_emu_trace(const void* base, const void* p, unsigned bytes, int write) {
    GlEmuThreadTrace* tt = gl_emu_my_trace;
    if (!tt) return;  // not inside a traced launch
    uint32_t seq = gl_emu_next_seq(tt, base, write);
    tt->accesses.push_back({base, (uintptr_t)p, bytes, seq, write});
}

// A lane that sits one warp-wide access out (predicated off on the device, e.g. a row's lane
// before the row's first class): its next access to the array lines up with the next one of
// the other lanes, as the device's instruction stream keeps them.
inline void gl_emu_trace_idle(const void* base, int write) {
    if (GlEmuThreadTrace* tt = gl_emu_my_trace) gl_emu_next_seq(tt, base, write);
}
#define GL_TRACE_IDLE(base, is_write) \
    (gl_emu_tracing.load(std::memory_order_relaxed) ? gl_emu_trace_idle((base), (is_write)) \
                                                    : (void)0)

#define GL_TRACE_ACCESS(base, i, bytes, is_write)                                               \
    (gl_emu_tracing.load(std::memory_order_relaxed)                                            \
         ? gl_emu_trace((const void*)(base), (const void*)((base) + (i)), (bytes), (is_write)) \
         : (void)0)

// One array's reads (or writes) in one launch.
struct GlEmuFlow {
    uint64_t accesses = 0;     // lane accesses
    uint64_t bytes = 0;        // bytes over the lanes' accesses
    uint64_t groups = 0;       // warp-wide accesses
    uint64_t sectors = 0;      // distinct 32-byte sectors within each group, summed
    uint64_t group_bytes = 0;  // distinct bytes within each group, summed
    uint64_t distinct = 0;     // distinct bytes over the launch (set by gl_emu_trace_finish)
    std::vector<std::pair<uintptr_t, uint32_t>> ranges;  // every access, for `distinct`
};

struct GlEmuLaunchTrace {
    std::vector<GlEmuThreadTrace> threads;
    std::map<std::pair<const void*, int>, GlEmuFlow> flows;
};

// One warp-wide access: lanes' ranges sorted by address; counts its sectors and bytes.
inline void gl_emu_trace_group(GlEmuFlow& f, const GlEmuAccess* a, const GlEmuAccess* end) {
    uintptr_t next_sector = 0, covered = 0;  // first sector / byte not yet counted
    bool first = true;
    f.groups += 1;
    for (; a != end; ++a) {
        uintptr_t lo = a->addr, hi = a->addr + a->bytes;  // [lo, hi)
        uintptr_t s0 = lo / 32, s1 = (hi - 1) / 32 + 1;   // sectors [s0, s1)
        if (first || s0 >= next_sector) next_sector = s0;
        if (s1 > next_sector) f.sectors += s1 - next_sector, next_sector = s1;
        if (first || lo >= covered) covered = lo;
        if (hi > covered) f.group_bytes += hi - covered, covered = hi;
        first = false;
        f.accesses += 1;
        f.bytes += a->bytes;
        f.ranges.push_back({a->addr, a->bytes});
    }
}

// After a block: its threads' accesses, warp by warp, grouped by (array, direction, seq).
inline void gl_emu_trace_merge_block(GlEmuLaunchTrace& lt) {
    std::vector<GlEmuAccess> warp;
    auto order = [](const GlEmuAccess& x, const GlEmuAccess& y) {
        if (x.base != y.base) return std::less<const void*>()(x.base, y.base);
        if (x.write != y.write) return x.write < y.write;
        if (x.seq != y.seq) return x.seq < y.seq;
        return x.addr < y.addr;
    };
    for (size_t w0 = 0; w0 < lt.threads.size(); w0 += 32) {
        warp.clear();
        for (size_t t = w0; t < std::min(w0 + 32, lt.threads.size()); ++t) {
            auto& tt = lt.threads[t];
            warp.insert(warp.end(), tt.accesses.begin(), tt.accesses.end());
            tt.accesses.clear();
            tt.next_seq.clear();
        }
        std::sort(warp.begin(), warp.end(), order);
        for (size_t i = 0, j; i < warp.size(); i = j) {
            for (j = i + 1; j < warp.size() && warp[j].base == warp[i].base &&
                            warp[j].write == warp[i].write && warp[j].seq == warp[i].seq;
                 ++j) {
            }
            gl_emu_trace_group(lt.flows[{warp[i].base, warp[i].write}], &warp[i],
                               warp.data() + j);
        }
    }
}

// The last traced launch, one row per (array, direction), for the host to read.
struct GlEmuTraceRow {
    const void* base;
    int write;
    GlEmuFlow flow;
};
inline std::vector<GlEmuTraceRow> gl_emu_trace_rows;

inline void gl_emu_trace_finish(GlEmuLaunchTrace& lt) {
    gl_emu_trace_rows.clear();
    for (auto& [key, f] : lt.flows) {
        std::sort(f.ranges.begin(), f.ranges.end());
        uintptr_t covered = 0;
        bool first = true;
        for (auto [lo, n] : f.ranges) {
            if (first || lo >= covered) covered = lo;
            if (lo + n > covered) f.distinct += lo + n - covered, covered = lo + n;
            first = false;
        }
        f.ranges = {};
        gl_emu_trace_rows.push_back({key.first, key.second, std::move(f)});
    }
}

#ifndef GL_EMU_OS_THREADS
// Run `body(t)` for t < threads as fibers of this thread, in turn, each until it waits at a
// barrier or ends; threadIdx and the trace buffer are the resumed fiber's. The floating-point
// mode (flush-to-zero for float32 kernels) is set around the whole launch: the fibers' contexts
// are made under it, and the caller's mode is restored after.
[[noreturn]] inline void gl_emu_fiber_entry() {
    auto& f = *gl_emu_fibers;
    const unsigned t = f.current;
    f.body(t);
    f.fibers[t].done = true;
    gl_emu_swap(f.fibers[t].ctx, f.loop);  // never resumed
    __builtin_unreachable();
}

inline void gl_emu_run_fibers(unsigned threads, int ftz, GlEmuLaunchTrace* lt,
                              std::function<void(unsigned)> body) {
    constexpr size_t kStack = 256 * 1024;  // the kernels' locals (register caches) and calls
    const unsigned long fp_mode = gl_emu_fp_mode();
    if (ftz) gl_emu_flush_to_zero();
    GlEmuFibers f;
    f.body = std::move(body);
    f.fibers.resize(threads);
    gl_emu_fibers = &f;
    // the stacks are kept for the next launch: allocating 256 of them (mmap, page faults) cost
    // more than running a small kernel
    static thread_local std::vector<std::unique_ptr<char[]>> stacks;
    while (stacks.size() < threads) stacks.emplace_back(new char[kStack]);
    for (unsigned t = 0; t < threads; ++t) {
        auto& ctx = f.fibers[t].ctx;
#if defined(__x86_64__)
        // a stack the switch can "return" into: six zeroed registers, then the entry's address
        // as the return address, at the alignment of a function just called
        auto top = reinterpret_cast<uintptr_t>(stacks[t].get() + kStack) & ~uintptr_t(15);
        auto* sp = reinterpret_cast<void**>(top);
        *--sp = nullptr;  // the entry's own return address: it never returns
        *--sp = reinterpret_cast<void*>(&gl_emu_fiber_entry);
        for (int r = 0; r < 6; ++r) *--sp = nullptr;
        ctx.sp = sp;
#else
        getcontext(&ctx.uc);
        ctx.uc.uc_stack.ss_sp = stacks[t].get();
        ctx.uc.uc_stack.ss_size = kStack;
        ctx.uc.uc_link = nullptr;
        makecontext(&ctx.uc, gl_emu_fiber_entry, 0);
#endif
    }
    for (unsigned live = threads; live > 0;) {
        live = 0;
        for (unsigned t = 0; t < threads; ++t) {
            if (f.fibers[t].done) continue;
            f.current = t;
            threadIdx.x = t;
            gl_emu_my_trace = lt ? &lt->threads[t] : nullptr;
            gl_emu_swap(f.loop, f.fibers[t].ctx);
            live += !f.fibers[t].done;
        }
    }
    gl_emu_my_trace = nullptr;
    gl_emu_fibers = nullptr;
    gl_emu_set_fp_mode(fp_mode);
}
#endif

// Launch `kernel` on a grid of `grid` blocks of `threads` threads; args[i] points at the i-th
// argument's value (as CUDA's kernel-parameter array does).
template <typename... A, std::size_t... I>
void gl_emu_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

// The kernel's C signature, for the launcher to check each argument's width against: per
// parameter its size in bytes and its kind ('p' pointer, 'f' floating, 'i' integer).
template <typename T>
constexpr char gl_emu_kind() {
    return std::is_pointer<T>::value ? 'p' : (std::is_floating_point<T>::value ? 'f' : 'i');
}
template <typename... A>
int gl_emu_signature(void (*)(A...), int* sizes, char* kinds) {
    int i = 0;
    ((sizes[i] = (int)sizeof(A), kinds[i] = gl_emu_kind<A>(), ++i), ...);
    return (int)sizeof...(A);
}

// Fault codes: 1 an operation a GPU leaves undefined (a partial shuffle mask), 2 a block
// larger than the kernel's __launch_bounds__ (the launch would fail on the device).
template <typename... A>
int gl_emu_launch(void (*kernel)(A...), unsigned grid, unsigned threads, void** args, int ftz,
                  unsigned max_threads) {
    gl_emu_fault = 0;
    gl_emu_trace_rows.clear();
    if (threads > max_threads || threads == 0 || grid == 0) return 2;
    gridDim.x = grid;
    blockDim.x = threads;
    // tracing: each thread's accesses in lt.threads[t], merged by thread 0 after each block
    const bool trace = gl_emu_tracing.load();
    GlEmuLaunchTrace lt;
    if (trace) lt.threads.resize(threads);
    GlEmuBlock blk;
    blk.block = std::make_unique<GlEmuBarrier>(threads);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
        blk.warps.push_back(std::make_unique<GlEmuBarrier>(32));
    blk.slots.assign(threads, 0);
    gl_emu_block = &blk;
    // every thread runs the blocks one after another, all of a block's threads done (a
    // barrier) before the next block starts with the same shared memory
    const bool reverse = gl_emu_reverse_blocks.load();
    auto body = [=, &blk, &lt](unsigned t) {
        for (unsigned b = 0; b < grid; ++b) {
            blockIdx.x = reverse ? grid - 1 - b : b;
            gl_emu_call(kernel, args, std::index_sequence_for<A...>{});
            blk.block->arrive_and_wait();
            if (trace) {  // the block's accesses are complete: merged before the next one
                if (t == 0) gl_emu_trace_merge_block(lt);
                blk.block->arrive_and_wait();
            }
        }
    };
#ifdef GL_EMU_OS_THREADS
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([=, &lt] {
            if (ftz) gl_emu_flush_to_zero();
            threadIdx.x = t;
            gl_emu_my_trace = trace ? &lt.threads[t] : nullptr;
            body(t);
            gl_emu_my_trace = nullptr;
        });
    }
    for (auto& th : pool) th.join();
#else
    gl_emu_run_fibers(threads, ftz, trace ? &lt : nullptr, body);
#endif
    gl_emu_block = nullptr;
    if (trace) gl_emu_trace_finish(lt);
    return gl_emu_fault.load();
}
