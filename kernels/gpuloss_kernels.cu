// gpuloss CUDA kernels. Built by gpuloss/_cuda_backend.py as cupy.RawModules from
// gpuloss_math.cuh followed by this file (the #include below is replaced by the header's text,
// so CuPy's kernel cache sees every change).
//
// Every kernel reads its inputs once and writes the gradient once. Loss sums are kept in
// double, one partial per block written to `partials`; the last block to finish adds them in
// a fixed order (gl_grid_finish): no float atomics, bit-identical results run to run, one
// launch. Domain checks set bits in one int flag with atomicOr (order-free). The flag and the
// reduced value share one small zeroed buffer, `state` (GL_STATE_*), so that the host reads
// both in one transfer when validate=True. Values are checked as stored, before any
// conversion (see gpuloss_math.cuh on flush-to-zero); weights are checked whole by
// gpuloss_check, so an empty batch still validates its weights.
#include "gpuloss_math.cuh"

#define GL_BLOCK_THREADS 256  // every launch uses this block size (the backend's BLOCK_THREADS)
// Blocks each SM must be able to hold (the second __launch_bounds__ value): ptxas keeps the
// registers per thread within 65536 / (256 * it) and, told so, spills nothing it does not have
// to (left to itself it trades spills for occupancy). Elementwise kernels: 4 blocks (64
// registers, 50% occupancy); row kernels on 4-byte and 2-byte data: 2 (128 registers, 25%);
// on float64: 1 (their register cache is what makes rows read once).
#define GL_ELEMENTWISE_MIN_BLOCKS 4
template <typename TP>
struct GlRowMinBlocks {
    enum { value = 2 };
};
template <>
struct GlRowMinBlocks<double> {
    enum { value = 1 };
};

#define GL_FLAG_PRED 1            // a probability outside [0, 1]
#define GL_FLAG_TARGET 2          // a target outside [0, 1]
#define GL_FLAG_SAMPLE_WEIGHT 4   // a negative, NaN or infinite sample_weight
#define GL_FLAG_LABEL 8           // a class index outside [0, K) that is not ignore_index
#define GL_FLAG_POS_WEIGHT 16     // the same for pos_weight
#define GL_FLAG_CLASS_WEIGHT 32   // the same for class_weight

// the int32 words of `state` (the backend's STATE_*): the reduced value first (16 bytes,
// aligned: the value the caller gets is a view of them), then the flags, then the count of
// blocks done
#define GL_STATE_FLAGS 4
#define GL_STATE_DONE 5
#define GL_MEAN_PARTS 2  // `mean` for [sum, denominator] in float64 (streaming states)
#define GL_SUM_PARTS 3   // the same value, with the sum's gradient (not divided by D): a chunk
                         // of a larger mean, divided by the whole denominator later

template <typename T>
struct GlCompute {
    typedef float type;  // float16, bfloat16 and float32 data compute in float
};
template <>
struct GlCompute<double> {
    typedef double type;
};

// Every global-memory access of the kernels' data goes through gl_load / gl_store (and
// gl_read / gl_write, which convert): the emulator defines GL_TRACE_ACCESS to count the bytes
// each kernel moves and the 32-byte sectors each warp-wide access touches (tests/
// cuda_emulator.h); on the device it is empty. `base` is the array, `i` the element.
#ifndef GL_TRACE_ACCESS
#define GL_TRACE_ACCESS(base, i, bytes, is_write)
#endif
// (and GL_TRACE_IDLE: a lane predicated off for one warp-wide access to `base`)
#ifndef GL_TRACE_IDLE
#define GL_TRACE_IDLE(base, is_write)
#endif
template <typename S>
__device__ __forceinline__ S gl_load(const S* a, long long i) {
    GL_TRACE_ACCESS(a, i, sizeof(S), 0);
    return a[i];
}
template <typename S>
__device__ __forceinline__ void gl_store(S* a, long long i, S v) {
    GL_TRACE_ACCESS(a, i, sizeof(S), 1);
    a[i] = v;
}

// loads and stores; float16 travels as its 16-bit pattern (unsigned short), bfloat16 as
// its own (gl_bf16: another type, so that the two cannot be mixed up)
template <typename C, typename S>
__device__ __forceinline__ C gl_read(const S* a, long long i) {
    return (C)gl_load(a, i);
}
template <>
__device__ __forceinline__ float gl_read<float, unsigned short>(const unsigned short* a,
                                                                long long i) {
    return gl_half_to_float(gl_load(a, i));
}
template <>
__device__ __forceinline__ double gl_read<double, unsigned short>(const unsigned short* a,
                                                                  long long i) {
    return (double)gl_half_to_float(gl_load(a, i));
}
template <>
__device__ __forceinline__ float gl_read<float, gl_bf16>(const gl_bf16* a, long long i) {
    return gl_bf16_to_float(gl_load(a, i).bits);
}
template <typename S, typename C>
__device__ __forceinline__ void gl_write(S* a, long long i, C v) {
    gl_store(a, i, (S)v);
}
template <>
__device__ __forceinline__ void gl_write<unsigned short, float>(unsigned short* a, long long i,
                                                                float v) {
    gl_store(a, i, gl_float_to_half(v));
}
template <>
__device__ __forceinline__ void gl_write<gl_bf16, float>(gl_bf16* a, long long i, float v) {
    gl_bf16 b;
    b.bits = gl_float_to_bf16(v);
    gl_store(a, i, b);
}

// The type that holds a stored value exactly, for domain checks before any conversion:
// float16 widens to float exactly (its subnormals are float normals), bfloat16 too (its bits
// are a float's), integers to double.
template <typename S>
struct GlExact {
    typedef double type;
};
template <>
struct GlExact<float> {
    typedef float type;
};
template <>
struct GlExact<unsigned short> {
    typedef float type;
};
template <>
struct GlExact<gl_bf16> {
    typedef float type;
};
template <>
struct GlExact<unsigned char> {
    typedef float type;
};

// int64 -> double -> float rounds twice (int64 beyond 2^53): such a value is read as C itself
template <typename S, typename C>
struct GlTwoRoundings {
    enum { value = 0 };
};
template <>
struct GlTwoRoundings<long long, float> {
    enum { value = 1 };
};

// a weight broadcast to the data: element i uses weight[(i / div) % mod]. Weights are float64
// on the device, so that no weight over- or underflows on its way in.
__device__ __forceinline__ double gl_weight(const double* w, long long i, long long div,
                                            long long mod) {
    return w == 0 ? 1.0 : gl_load(w, (i / div) % mod);
}

// g times its row's weight w / D. A row of weight 0 gets 0 even where g overflowed to +-inf
// (inf * 0 would make it NaN: a row that counts for nothing adds nothing); NaN stays NaN.
// gw is w / D rounded to C, gwd the same in double: where gw over- or underflows C (extreme
// weights, e.g. the class weights' scale) the product is formed in double, so that a 0 stays
// 0 and a tiny weight keeps a large g's product.
template <typename C>
__device__ __forceinline__ C gl_weigh_grad(C g, C gw, double gwd) {
    if (gwd == 0.0) return (g == g && g - g != C(0)) ? C(0) : g * C(0);  // NaN stays NaN
    if (gw - gw != C(0) || gw == C(0)) return (C)((double)g * gwd);
    return g * gw;
}

// A row kernel's gradient of class k: g weighed as above, times dz[j], the derivative of
// F::load at the value, where the functor transforms its values (F::loads; the identity's 1 is
// never multiplied in)
template <bool LOADS, typename C>
__device__ __forceinline__ C gl_row_grad(C g, C gw, double gwd, const C* dz, int j) {
    C v = gl_weigh_grad(g, gw, gwd);
    if constexpr (LOADS) v = v * dz[j];
    return v;
}

// The mean's 1/D (0 when nothing was counted) or 1 (a sum, GL_SUM_PARTS); D = denom, times
// *denom_dev when a weights' sum was computed on the device (so the host never waits for it).
__device__ __forceinline__ double gl_grad_scale(int mean, double denom,
                                                const double* denom_dev) {
    double d = (denom_dev ? gl_load(denom_dev, 0) : 1.0) * denom;
    return mean == 1 || mean == GL_MEAN_PARTS ? (d > 0.0 ? 1.0 / d : 0.0) : 1.0;
}

// ---------------------------------------------------------------------------------------------
// Domain check of a whole array as stored, before any conversion: weights (negative, NaN or
// infinite: WEIGHTS 1) or values against the GL_RULE_* `rule` (WEIGHTS 0). Sets `bit` in
// *flags.
template <int WEIGHTS, typename S>
__global__ void __launch_bounds__(GL_BLOCK_THREADS, GL_ELEMENTWISE_MIN_BLOCKS)
gpuloss_check(const S* __restrict__ a, long long n, int rule, int bit,
              int* __restrict__ flags) {
    typedef typename GlExact<S>::type E;
    bool bad = false;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        E v = gl_read<E>(a, i);
        bad |= WEIGHTS ? gl_bad_weight(v) : gl_violates(rule, v);
    }
    if (bad) atomicOr(flags, bit);
}

// Sum of `v` over the block, in a fixed order (warp shuffles, then the warps' sums in
// shared memory); the result is valid in thread 0. blockDim.x is a multiple of 32, <= 1024.
__device__ __forceinline__ double gl_block_sum(double v) {
    __shared__ double warp_sums[32];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // warp_sums may still be read by a previous call
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? warp_sums[threadIdx.x] : 0.0;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1)
            v += __shfl_down_sync(0xffffffffu, v, offset);
    }
    return v;
}

// The grid's reduced value, in the launch that computed the partials: each block writes its
// partial, and the last block to take a ticket adds all of them in a fixed order (the same
// whichever block is last: bit-identical results) and writes sum, sum / D for the mean (NaN
// when D == 0, as NumPy), or [sum, D] in float64 (GL_MEAN_PARTS, GL_SUM_PARTS) at the start
// of `state`.
// Every thread of every block calls it (barriers inside).
template <typename TP>
__device__ __forceinline__ void gl_grid_finish(double acc, double* partials, int mean,
                                               double denom, const double* denom_dev,
                                               int* state) {
    __shared__ int last;
    acc = gl_block_sum(acc);
    if (threadIdx.x == 0) {
        gl_store(partials, blockIdx.x, acc);
        __threadfence();  // the partial is visible to every block before the ticket is taken
        unsigned done = atomicAdd((unsigned*)(state + GL_STATE_DONE), 1u);
        last = done == gridDim.x - 1;
        if (last) __threadfence();  // and every other block's partial before the reads below
    }
    __syncthreads();
    if (!last) return;
    const volatile double* all = partials;  // written by other blocks: not from a stale cache
    double v = 0.0;
    for (int i = threadIdx.x; i < (int)gridDim.x; i += blockDim.x) v += all[i];
    v = gl_block_sum(v);
    if (threadIdx.x == 0) {
        double d = (denom_dev ? gl_load(denom_dev, 0) : 1.0) * denom;
        if (mean == GL_MEAN_PARTS || mean == GL_SUM_PARTS) {
            double* out = (double*)state;
            out[0] = v;
            out[1] = d;
        } else {
            gl_write((TP*)state, 0, (typename GlCompute<TP>::type)(mean ? v / d : v));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Every elementwise loss: one loss per element, computed by the functor F (gpuloss_math.cuh).
//
// grad[i] = dl/dp_i * (w_i / D), per_elem[i] = w_i * l_i, partials[block] = sum of w_i l_i.
// w_i / D and w_i l_i are formed in double: weights of 1e30 or 1e-40 neither overflow nor
// vanish (the CPU backend rescales such weights to the same effect). a0..a3 are the loss's
// scalar parameters; pred_rule and target_rule the GL_RULE_* to check (0: none), on the values
// as stored. `grad` may be `pred` itself: element i is read, then written, by one thread.
template <typename F, typename TP, typename TY>
__global__ void __launch_bounds__(GL_BLOCK_THREADS, GL_ELEMENTWISE_MIN_BLOCKS)
gpuloss_elementwise(const TP* __restrict__ pred, const TY* __restrict__ target,
                    const double* __restrict__ weight, long long w_div, long long w_mod,
                    const double* __restrict__ pos_weight, long long pw_div, long long pw_mod,
                    long long n, int mean, double denom, const double* __restrict__ denom_dev,
                    double a0, double a1, double a2, double a3, int pred_rule, int target_rule,
                    TP* __restrict__ grad, TP* __restrict__ per_elem,
                    double* __restrict__ partials, int* __restrict__ state) {
    typedef typename GlCompute<TP>::type C;
    double gscale = gl_grad_scale(mean, denom, denom_dev) * GlGradFactor<F>::value;
    C gscale_c = (C)gscale;  // unweighted: dl/dp times this, as the CPU backend does
    const C a[4] = {gl_param<C>(a0), gl_param<C>(a1), gl_param<C>(a2), gl_param<C>(a3)};
    double acc = 0.0;
    int bad = 0;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        C p = gl_read<C>(pred, i);  // exact: float16 widens exactly, so p is p as stored
        // the target as stored (read once), checked, then in the compute type; only an int64
        // target beside float data is read again, since int64 -> double -> float may round
        // twice where int64 -> float rounds once
        typename GlExact<TY>::type y_stored = gl_read<typename GlExact<TY>::type>(target, i);
        C y = GlTwoRoundings<TY, C>::value ? gl_read<C>(target, i) : (C)y_stored;
        if (pred_rule && gl_violates(pred_rule, p)) bad |= GL_FLAG_PRED;
        if (target_rule && gl_violates(target_rule, y_stored)) bad |= GL_FLAG_TARGET;
        C c = pos_weight ? (C)gl_weight(pos_weight, i, pw_div, pw_mod) : C(1);
        C dl;
        C l = F::eval(p, y, c, a, &dl);
        double lw = (double)l;
        C wscale = gscale_c;
        if (weight) {
            double w = gl_weight(weight, i, w_div, w_mod);
            lw *= w;
            wscale = (C)(w * gscale);
        }
        if (grad) gl_write(grad, i, dl * wscale);
        if (per_elem) gl_write(per_elem, i, (C)lw);
        acc += lw;
    }
    if (bad && state) atomicOr(state + GL_STATE_FLAGS, bad);
    if (partials) gl_grid_finish<TP>(acc, partials, mean, denom, denom_dev, state);
}

// ---------------------------------------------------------------------------------------------
// Every categorical loss over rows of K classes, classes contiguous, computed by the row
// functor F (GlCceLogits: softmax fused, F::logits; GlCce: on probabilities).
//
// ROW_THREADS threads (a warp, or a whole block; 0: `row_threads` lanes, a power of two up to
// 32 chosen at launch, so that one instantiation serves every small K) share one row; each
// keeps up to CACHE values of the row in registers, so rows of K <= threads * CACHE are read
// once. With CACHE == 0 the row is read twice (the second read mostly hits L2). Class-index
// targets keep only the row's values in registers (their coefficients are recomputed from the
// label: fewer registers); probability targets keep the coefficients too.
//
// Targets: labels (LABELS 1, class indices: int64, or int32 with `labels32`) or
// probabilities (LABELS 0, type TT).
// Per sample i and class k the coefficient c_k is (see gpuloss_math.cuh):
//   labels:        (1 - s) cw[y] [k == y] + s / K cw_k
//   probabilities: cw_k (t_k (1 - s) + s / K)
// loss_i = w_i sum_k c_k (-log p_k),   grad_ik = w_i / D * d/dz_k (...)

// Rows of fewer than 32 threads (rt, ROW_THREADS == 0) are aligned groups of lanes inside a
// warp: a butterfly with offsets below rt stays inside the group. Rows of a whole block
// (ROW_THREADS > 32) combine their warps' results through shared memory.
template <int ROW_THREADS>
__device__ __forceinline__ int gl_first_offset(int rt) {
    return ROW_THREADS == 0 ? rt / 2 : 16;
}

template <int ROW_THREADS>
__device__ __forceinline__ double gl_row_sum(double v, double* scratch, int rt) {
    for (int offset = gl_first_offset<ROW_THREADS>(rt); offset > 0; offset >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (ROW_THREADS <= 32) return v;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int j = 0; j < ROW_THREADS / 32; ++j) t += scratch[j];
    return t;
}

template <int ROW_THREADS, typename C>
__device__ __forceinline__ GlLse<C> gl_row_lse(GlLse<C> a, C* scratch_m, C* scratch_s, int rt) {
    for (int offset = gl_first_offset<ROW_THREADS>(rt); offset > 0; offset >>= 1) {
        GlLse<C> b;
        b.m = __shfl_xor_sync(0xffffffffu, a.m, offset);
        b.rest = __shfl_xor_sync(0xffffffffu, a.rest, offset);
        a = gl_lse_merge(a, b);
    }
    if (ROW_THREADS <= 32) return a;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch_m[warp] = a.m;
        scratch_s[warp] = a.rest;
    }
    __syncthreads();
    GlLse<C> t = gl_lse_empty<C>();
    for (int j = 0; j < ROW_THREADS / 32; ++j) {
        GlLse<C> b;
        b.m = scratch_m[j];
        b.rest = scratch_s[j];
        t = gl_lse_merge(t, b);
    }
    return t;
}

// one value of a row into the statistics F asks for (see GlRowDefaults)
template <typename F, int LABELS, typename C>
__device__ __forceinline__ void gl_row_push(C z, C c, long long k, long long label, const C* a,
                                            bool target_lse, GlLse<C>* part, GlLse<C>* tpart,
                                            C* runner, long long* runner_k, double* z_label) {
    if (F::logits) *part = gl_lse_push(*part, F::logit(z, a));
    if (target_lse) *tpart = gl_lse_push(*tpart, F::logit(c, a));
    if (F::runner_up && LABELS) {
        if (k == label) {
            *z_label = (double)z;
        } else if (z > *runner || *runner_k < 0) {  // a lane meets its classes in order
            *runner = z;
            *runner_k = k;
        }
    }
}

// the largest value of a row and its first class, over the row's lanes (-1: no class)
template <int ROW_THREADS, typename C>
__device__ __forceinline__ void gl_row_argmax(C* v, long long* k, C* scratch_v,
                                              long long* scratch_k, int rt) {
    for (int offset = gl_first_offset<ROW_THREADS>(rt); offset > 0; offset >>= 1) {
        C ov = __shfl_xor_sync(0xffffffffu, *v, offset);
        long long ok = __shfl_xor_sync(0xffffffffu, *k, offset);
        gl_argmax_merge(v, k, ov, ok);
    }
    if (ROW_THREADS <= 32) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        scratch_v[warp] = *v;
        scratch_k[warp] = *k;
    }
    __syncthreads();
    *v = -GL_INF;
    *k = -1;
    for (int j = 0; j < ROW_THREADS / 32; ++j) gl_argmax_merge(v, k, scratch_v[j], scratch_k[j]);
}

// c_k of class k for one row (see above); checks probability targets (as stored) when asked.
// `staged`: the row's target values in shared memory (small rows), else null (read here).
template <int LABELS, typename C, typename TT>
__device__ __forceinline__ C gl_row_coef(const TT* target, const C* staged, long long base,
                                         long long k, long long label, C cw_label,
                                         const double* class_weight, C s, C inv_k, int check,
                                         int* bad) {
    if (LABELS) {  // cw_k only counts with smoothing: not read without
        C cwk = (class_weight && s != C(0)) ? (C)gl_load(class_weight, k) : C(1);
        return gl_label_coef(k == label, cw_label, cwk, s, inv_k);
    }
    C cwk = class_weight ? (C)gl_load(class_weight, k) : C(1);
    C t;
    if (staged) {  // exact: the stored value in the compute type (probability_target_dtypes)
        t = staged[k];
        if ((check & GL_FLAG_TARGET) && gl_outside_unit(t)) *bad |= GL_FLAG_TARGET;
    } else {  // read once: TT is exact in C (probability_target_dtypes), so t is as stored
        t = gl_read<C>(target, base + k);
        if ((check & GL_FLAG_TARGET) && gl_outside_unit(t)) *bad |= GL_FLAG_TARGET;
    }
    return cwk * (t * (C(1) - s) + s * inv_k);
}

// A lane before its row's first class (see `shift`) skips one access to each array the loop
// reads (and `grad`, where it writes): nothing on the device; the emulator keeps its count of
// the warp's accesses in step with the other lanes.
template <int LABELS, typename TP, typename TT>
__device__ __forceinline__ void gl_row_idle(const TP* pred, const TT* target, const TP* grad) {
    GL_TRACE_IDLE(pred, 0);
    if (!LABELS) GL_TRACE_IDLE(target, 0);
    if (grad) GL_TRACE_IDLE(grad, 1);
}

// a class index: int64, or int32 where `labels32` (one instantiation reads both)
template <typename TT>
__device__ __forceinline__ long long gl_label(const TT* target, long long row, int labels32) {
    if (labels32) return (long long)gl_load((const int*)(const void*)target, row);
    return (long long)gl_load(target, row);
}

// Weights (sample_weight per row, class_weight per class) are float64 on the device; class
// weights arrive divided by *cw_scale (their maximum where it lies outside [1e-30, 1e30]),
// which the row's weight takes back in double, so that neither huge nor tiny class weights
// over- or underflow in the compute type. A row
// whose label is out of range (validate=False) or, for cce with labels, whose probabilities
// hold a NaN, gets a NaN weight: its loss and its whole gradient row are NaN, as on the CPU.
//
// `grad` may be `pred` itself (the backend's grad_out: the gradient written over the logits).
// Every layout allows it, since no value is read after its gradient is written: class k of a
// row is read and written by one thread only (lane k + shift mod rt; the same mapping in every
// pass), its gradient written in pass 2 after the last read of k (pass 1, the extra passes and,
// for a row read twice, pass 2's own read just before the write); a staged block reads its
// whole tile before a barrier and writes it after another; the blocks' rows (and staged
// spans) never overlap, step after step. So neither a compiler that trusts __restrict__ to
// reorder a read past an unrelated write, nor the read-only cache, can hand back a gradient
// where a value was meant.
template <typename F, int LABELS, int ROW_THREADS, int CACHE, typename TP, typename TT>
__global__ void __launch_bounds__(GL_BLOCK_THREADS, GlRowMinBlocks<TP>::value)
gpuloss_rows(const TP* __restrict__ pred, const TT* __restrict__ target, long long rows,
             long long K, int row_threads, int labels32,
             const double* __restrict__ sample_weight, long long sw_div,
             long long sw_mod, const double* __restrict__ class_weight,
             const double* __restrict__ cw_scale, const double* __restrict__ cw_sum_dev,
             long long ignore_index, int has_ignore,
             double smoothing, int mean, double denom, const double* __restrict__ denom_dev,
             double a0, double a1, double a2, int check, TP* __restrict__ grad,
             TP* __restrict__ per_sample, double* __restrict__ partials,
             int* __restrict__ state) {
    typedef typename GlCompute<TP>::type C;
    const bool LOGITS = F::logits;
    constexpr bool LOADS = F::loads;  // the values enter as F::load (softcap)
    __shared__ double scratch_d[32];
    __shared__ C scratch_m[32];
    __shared__ C scratch_s[32];
    __shared__ long long scratch_k[32];
    // small rows (ROW_THREADS 0) are staged through shared memory (see below)
    constexpr bool STAGED = ROW_THREADS == 0 && CACHE > 0;
    constexpr int TILE = STAGED ? GL_BLOCK_THREADS * CACHE : 1;
    __shared__ C tile_z[TILE];
    __shared__ C tile_t[STAGED && !LABELS ? TILE : 1];
    __shared__ long long tile_label[STAGED && LABELS ? GL_BLOCK_THREADS : 1];
    // F::loads: d load / dz of each cached value, for the gradient, kept in shared memory (the
    // registers hold the loaded values; a second register array would spill): thread t's j-th
    // at dc[j * GL_BLOCK_THREADS], its own column, so no barrier guards it
    __shared__ C tile_dz[CACHE > 0 && LOADS ? GL_BLOCK_THREADS * CACHE : 1];
    C* const dc = tile_dz + (LOADS ? threadIdx.x : 0);
    const int rt = ROW_THREADS ? ROW_THREADS : row_threads;  // threads per row
    const int rows_per_block = blockDim.x / rt;
    const int lane = threadIdx.x & (rt - 1);  // rt is a power of two
    const int slot = threadIdx.x / rt;
    double gscale = gl_grad_scale(mean, denom, denom_dev);
    C s = (C)smoothing, inv_k = K > 0 ? C(1) / (C)K : C(0);
    const C a[3] = {gl_param<C>(a0), gl_param<C>(a1), gl_param<C>(a2)};
    double acc = 0.0;
    int bad = 0;
    // every thread of a block runs the same number of iterations (block-wide barriers inside)
    long long row_steps = (rows + (long long)gridDim.x * rows_per_block - 1) /
                          ((long long)gridDim.x * rows_per_block);
    for (long long step = 0; step < row_steps; ++step) {
        long long row0 = (step * gridDim.x + blockIdx.x) * rows_per_block;  // the block's rows
        long long row = row0 + slot;
        bool live = row < rows;
        long long base = (live ? row : 0) * K;
        long long Kr = live ? K : 0;  // the classes this thread's row has: none past the end
        // a warp's accesses start on a 32-byte sector (rows of a warp or a block): lane l takes
        // class l - shift first, where the row starts `shift` values into its sector, so that
        // no access straddles a sector the one before it began (the array starts on one)
        const long long shift = STAGED ? 0 : base % (32 / (long long)sizeof(TP));
        // small rows: the block's rows are one span of at most GL_BLOCK_THREADS * CACHE values,
        // which the whole block reads (and writes the gradient of) with consecutive threads on
        // consecutive values: every 32-byte sector a warp touches is used whole. The row's
        // lanes then take their values from shared memory.
        long long live_rows = rows - row0 < rows_per_block ? rows - row0 : rows_per_block;
        long long first = row0 * K, span = STAGED && live_rows > 0 ? live_rows * K : 0;
        C* row_z = tile_z + (long long)slot * K;
        const C* row_t = (STAGED && !LABELS) ? tile_t + (long long)slot * K : (const C*)0;
        if constexpr (STAGED) {
            __syncthreads();  // the previous step's tile is written out
            for (long long e = threadIdx.x; e < span; e += blockDim.x) {
                tile_z[e] = gl_read<C>(pred, first + e);
                if constexpr (!LABELS) tile_t[e] = gl_read<C>(target, first + e);
            }
            if constexpr (LABELS) {
                if (threadIdx.x < rows_per_block && row0 + threadIdx.x < rows)
                    tile_label[threadIdx.x] = gl_label(target, row0 + threadIdx.x, labels32);
            }
            __syncthreads();
        }
        double w = live ? gl_weight(sample_weight, row, sw_div, sw_mod) : 0.0;
        if (cw_scale) w *= gl_load(cw_scale, 0);  // class weights arrive divided by it (see above)
        long long label = 0;
        C cw_label = C(1);
        // probability targets: the z-loss weighs a row 1, and the row's weight carries the
        // class weights' scale, which is not the z-term's (see above)
        if constexpr (!LABELS) {
            if (cw_scale) cw_label = (C)(1.0 / gl_load(cw_scale, 0));
        }
        // constexpr: a probability target (LABELS 0, maybe bfloat16) is never an index
        if constexpr (LABELS) {
            if (live) {
                label = STAGED ? tile_label[slot] : gl_label(target, row, labels32);
                bool ignored = has_ignore && label == ignore_index;
                bool in_range = label >= 0 && label < K;
                if (ignored) {
                    w = 0.0;
                } else if (!in_range) {
                    if (check & GL_FLAG_LABEL) bad |= GL_FLAG_LABEL;
                    w = (double)GL_NAN;  // a bad label gives NaN, never an out-of-bounds read
                }
                if (in_range && class_weight) cw_label = (C)gl_load(class_weight, label);
            }
        }
        // pass 1: row statistics (log-sum-exp for logits; sum of c for probability targets;
        // what F's hooks ask for); the first CACHE values each thread reads stay in registers
        C zc[CACHE > 0 ? CACHE : 1];  // F::load of the values as stored (see GlRowDefaults)
        C cc[CACHE > 0 && !LABELS ? CACHE : 1];  // labels: recomputed, not kept
        GlLse<C> part = gl_lse_empty<C>();
        GlLse<C> tpart = gl_lse_empty<C>();
        const bool TARGET_LSE = !LABELS && F::target_lse(a);
        C c_sum = C(0);
        bool has_nan = false;
        C runner = -GL_INF;  // F::runner_up: the largest value off the label, its first class
        long long runner_k = -1;
        double z_label = 0.0;  // and the label's value (one lane holds it, the others add 0)
#pragma unroll
        for (int j = 0; j < CACHE; ++j) {
            long long k = lane + (long long)j * rt - shift;
            if (k >= 0 && k < Kr) {
                C zs = STAGED ? row_z[k] : gl_read<C>(pred, base + k);  // as stored
                if constexpr (LOADS) zc[j] = F::load_grad(zs, a, &dc[j * GL_BLOCK_THREADS]);
                else zc[j] = zs;
                C c = gl_row_coef<LABELS, C>(target, row_t, base, k, label, cw_label,
                                             class_weight, s, inv_k, check, &bad);
                if (!LABELS) cc[j] = c;
                gl_row_push<F, LABELS>(zc[j], c, k, label, a, TARGET_LSE, &part, &tpart,
                                       &runner, &runner_k, &z_label);
                if ((check & GL_FLAG_PRED) && gl_outside_unit(LOADS ? zs : zc[j]))
                    bad |= GL_FLAG_PRED;
                has_nan |= LOADS ? zs != zs : zc[j] != zc[j];
                c_sum += c;
            } else if (k < 0 && !STAGED) {
                gl_row_idle<LABELS>(pred, target, (TP*)0);
            }
        }
        for (long long k = lane + (long long)CACHE * rt - shift; k < Kr; k += rt) {
            if (k < 0) {  // before the row (CACHE 0): this lane sits the access out
                gl_row_idle<LABELS>(pred, target, (TP*)0);
                continue;
            }
            C zs = gl_read<C>(pred, base + k);
            C z = F::load(zs, a);
            C c = gl_row_coef<LABELS, C>(target, (const C*)0, base, k, label, cw_label,
                                         class_weight, s, inv_k, check, &bad);
            gl_row_push<F, LABELS>(z, c, k, label, a, TARGET_LSE, &part, &tpart, &runner,
                                   &runner_k, &z_label);
            if ((check & GL_FLAG_PRED) && gl_outside_unit(zs)) bad |= GL_FLAG_PRED;
            has_nan |= zs != zs;
            c_sum += c;
        }
        GlRow<C> r;
        r.lse = part;
        r.log_s = C(0);
        r.cw_label = cw_label;
        r.label = LABELS ? label : -1;
        if (LOGITS) {  // a NaN logit makes the log-sum-exp, and with it the whole row, NaN
            r.lse = gl_lse_finish(gl_row_lse<ROW_THREADS>(part, scratch_m, scratch_s, rt));
            r.log_s = gl_lse_log_sum(r.lse);
        }
        r.tlse = tpart;
        r.tlog_s = C(0);
        if (TARGET_LSE) {
            r.tlse = gl_lse_finish(gl_row_lse<ROW_THREADS>(tpart, scratch_m, scratch_s, rt));
            r.tlog_s = gl_lse_log_sum(r.tlse);
        }
        r.z_label = C(0);
        r.runner = runner;
        r.runner_k = runner_k;
        if (F::runner_up) {
            gl_row_argmax<ROW_THREADS>(&r.runner, &r.runner_k, scratch_m, scratch_k, rt);
            r.z_label = (C)gl_row_sum<ROW_THREADS>(z_label, scratch_d, rt);
        }
        if (LABELS) {
            C cw_sum = cw_sum_dev ? (C)gl_load(cw_sum_dev, 0) : (C)K;
            c_sum = (C(1) - s) * cw_label + s * inv_k * cw_sum;
            if (!LOGITS && gl_row_sum<ROW_THREADS>(has_nan ? 1.0 : 0.0, scratch_d, rt) > 0.0)
                w = (double)GL_NAN;  // a NaN prediction off the label's column counts too
        } else {
            c_sum = (C)gl_row_sum<ROW_THREADS>((double)c_sum, scratch_d, rt);
        }
        r.c_sum = c_sum;
        r.extra[0] = r.extra[1] = C(0);
        // c_k of a cached class: kept in registers (probabilities), or from the label
        auto cached_coef = [&](long long k, int j) -> C {
            int ignored_bad = 0;
            return LABELS ? gl_row_coef<LABELS, C>(target, row_t, base, k, label, cw_label,
                                                   class_weight, s, inv_k, 0, &ignored_bad)
                          : cc[j];
        };
        const int passes = F::extra_passes(a);
        for (int pass = 0; pass < passes; ++pass) {  // row sums the terms need, from registers
            double extra = 0.0;                        // where cached
#pragma unroll
            for (int j = 0; j < CACHE; ++j) {
                long long k = lane + (long long)j * rt - shift;
                if (k >= 0 && k < Kr)
                    extra += (double)F::extra_term(zc[j], cached_coef(k, j), r, a, pass);
            }
            for (long long k = lane + (long long)CACHE * rt - shift; k < Kr; k += rt) {
                if (k < 0) {
                    gl_row_idle<LABELS>(pred, target, (TP*)0);
                    continue;
                }
                int ignored_bad = 0;
                C c = gl_row_coef<LABELS, C>(target, (const C*)0, base, k, label, cw_label,
                                             class_weight, s, inv_k, 0, &ignored_bad);
                extra += (double)F::extra_term(F::load(gl_read<C>(pred, base + k), a), c, r,
                                               a, pass);
            }
            C sum = (C)gl_row_sum<ROW_THREADS>(extra, scratch_d, rt);
            if (pass == 0) r.extra[0] = sum; else r.extra[1] = sum;  // no dynamic index
        }
        // pass 2: loss terms and gradient, from registers where cached
        double row_loss = 0.0;
        double gwd = w * gscale;
        C gw = (C)gwd;
#pragma unroll
        for (int j = 0; j < CACHE; ++j) {
            long long k = lane + (long long)j * rt - shift;
            if (k >= 0 && k < Kr) {
                C g;
                row_loss += (double)F::term(zc[j], cached_coef(k, j), k, r, a, &g);
                const int dj = j * GL_BLOCK_THREADS;  // (F::loads: d load / dz at dc[dj])
                if (STAGED) {  // the block writes the tile out below
                    if (grad) row_z[k] = gl_row_grad<LOADS>(g, gw, gwd, dc, dj);
                } else if (grad && live) {
                    gl_write(grad, base + k, gl_row_grad<LOADS>(g, gw, gwd, dc, dj));
                }
            } else if (k < 0 && grad && live) {
                GL_TRACE_IDLE(grad, 1);
            }
        }
        for (long long k = lane + (long long)CACHE * rt - shift; k < Kr; k += rt) {
            if (k < 0) {
                gl_row_idle<LABELS>(pred, target, grad && live ? grad : (TP*)0);
                continue;
            }
            C dz;  // read, then written: in place (grad == pred), k is read before g_k is written
            C z = F::load_grad(gl_read<C>(pred, base + k), a, &dz);
            int ignored_bad = 0;
            C c = gl_row_coef<LABELS, C>(target, (const C*)0, base, k, label, cw_label,
                                         class_weight, s, inv_k, 0, &ignored_bad);
            C g;
            row_loss += (double)F::term(z, c, k, r, a, &g);
            if (grad && live) gl_write(grad, base + k, gl_row_grad<LOADS>(g, gw, gwd, &dz, 0));
        }
        if (STAGED && grad) {  // the block's gradient rows, as they were read
            __syncthreads();
            for (long long e = threadIdx.x; e < span; e += blockDim.x)
                gl_write(grad, first + e, tile_z[e]);
        }
        row_loss = gl_row_sum<ROW_THREADS>(row_loss, scratch_d, rt);
        // a row with no classes is an empty sum: 0 (its z-loss too), as on the CPU
        if (lane == 0 && K > 0) row_loss += (double)F::row_term(r, a);
        // a row of weight 0 adds 0 even where its loss is infinite (NaN stays NaN)
        row_loss = (w == 0.0 && row_loss - row_loss != 0.0 && row_loss == row_loss)
                       ? 0.0 : row_loss * w;
        if (live && lane == 0) {
            if (per_sample) gl_write(per_sample, row, (C)row_loss);
            acc += row_loss;
        }
    }
    if (bad && state) atomicOr(state + GL_STATE_FLAGS, bad);
    if (partials) gl_grid_finish<TP>(acc, partials, mean, denom, denom_dev, state);
}
