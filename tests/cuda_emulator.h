// A tiny CUDA execution model for the host, so that the test suite can run the real kernels of
// kernels/gpuloss_kernels.cu with g++ on a machine without a GPU.
//
// Blocks run one after another; the threads of a block are real std::threads, so
// __syncthreads is a real barrier and warp shuffles exchange values through a per-warp slot
// array between two warp barriers. __shared__ becomes `static`: one instance, reused by the
// blocks in turn, as a GPU's shared memory is (uninitialised at each block's start).
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

struct GlEmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> slots;  // one 8-byte slot per thread
};
inline GlEmuBlock* gl_emu_block = nullptr;
// set when a kernel does something a GPU would not define (e.g. a partial shuffle mask)
inline std::atomic<int> gl_emu_fault{0};

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

inline int atomicOr(int* address, int value) {
    static std::mutex m;
    std::lock_guard<std::mutex> lock(m);
    int old = *address;
    *address = old | value;
    return old;
}

// Launch `kernel` on a grid of `grid` blocks of `threads` threads; args[i] points at the i-th
// argument's value (as CUDA's kernel-parameter array does).
template <typename... A, std::size_t... I>
void gl_emu_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <typename... A>
int gl_emu_launch(void (*kernel)(A...), unsigned grid, unsigned threads, void** args) {
    gl_emu_fault = 0;
    gridDim.x = grid;
    blockDim.x = threads;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        GlEmuBlock blk;
        blk.block = std::make_unique<std::barrier<>>(threads);
        for (unsigned w = 0; w < (threads + 31) / 32; ++w)
            blk.warps.push_back(std::make_unique<std::barrier<>>(32));
        blk.slots.assign(threads, 0);
        gl_emu_block = &blk;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([=] {
                threadIdx.x = t;
                gl_emu_call(kernel, args, std::index_sequence_for<A...>{});
            });
        }
        for (auto& th : pool) th.join();
        gl_emu_block = nullptr;
    }
    return gl_emu_fault.load();
}
