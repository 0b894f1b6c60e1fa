// A tiny CUDA execution model for the host, so that the test suite can run the real kernels of
// kernels/gpuloss_kernels.cu with g++ on a machine without a GPU.
//
// Blocks run one after another, in order or (gl_emu_reverse_blocks) in reverse, so that a test
// can change which block finishes last; the threads of a block are real std::threads, so
// __syncthreads is a real barrier and warp shuffles exchange values through a per-warp slot
// array between two warp barriers. __shared__ becomes `static`: one instance, reused by the
// blocks in turn, as a GPU's shared memory is (uninitialised at each block's start).
//
// The device's floating-point rules (see tests/kernel_host.py for the build modes): a launch
// with `ftz` set runs each emulated thread with flush-to-zero and denormals-are-zero, as CuPy's
// -ftz=true compiles float arithmetic; fused multiply-add contraction is a compiler flag.
// Each launch also checks its block size against the kernel's __launch_bounds__.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
inline void gl_emu_flush_to_zero() { _mm_setcsr(_mm_getcsr() | 0x8040u); }  // FTZ | DAZ
#elif defined(__aarch64__)
inline void gl_emu_flush_to_zero() {
    unsigned long fpcr;
    __asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
    __asm__ volatile("msr fpcr, %0" : : "r"(fpcr | (1ul << 24)));  // FZ
}
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
#define __launch_bounds__(n)  // checked at launch against the bound the source declares

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct GlEmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
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
    if (threads > max_threads || threads == 0 || grid == 0) return 2;
    gridDim.x = grid;
    blockDim.x = threads;
    GlEmuBlock blk;
    blk.block = std::make_unique<std::barrier<>>(threads);
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
        blk.warps.push_back(std::make_unique<std::barrier<>>(32));
    blk.slots.assign(threads, 0);
    gl_emu_block = &blk;
    // one std::thread per thread of a block; they run the blocks one after another, all of a
    // block's threads done (a barrier) before the next block starts with the same shared memory
    std::vector<std::thread> pool;
    pool.reserve(threads);
    const bool reverse = gl_emu_reverse_blocks.load();
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([=, &blk] {
            if (ftz) gl_emu_flush_to_zero();
            threadIdx.x = t;
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx.x = reverse ? grid - 1 - b : b;
                gl_emu_call(kernel, args, std::index_sequence_for<A...>{});
                blk.block->arrive_and_wait();
            }
        });
    }
    for (auto& th : pool) th.join();
    gl_emu_block = nullptr;
    return gl_emu_fault.load();
}
