// gpuloss's compiled CPU kernels: the common calls of the CPU backend in one pass over the
// data, as a CPython extension built on first use (gpuloss/_host_build.py) with this
// machine's compiler and instruction set. Everything else, and every call that fails a check,
// is the NumPy backend's (which then raises the error with its message).
//
// Elementwise losses run the functors of gpuloss_math.cuh, the CUDA kernels' own math, in the
// order of the CUDA elementwise kernel. cce_with_logits with class indices follows the NumPy
// backend's block formula (_cce_logits_block) operation for operation, with a vectorisable
// float32 exp (Cephes' polynomial in float lanes, within 0.99 ulp: closer than NumPy's own).
//
// Arrays arrive as objects with the buffer protocol (NumPy arrays, C-contiguous: the caller
// checks) or as Python ints holding an address (a torch tensor's data_ptr()).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include <dlfcn.h>
#if defined(__linux__)
#include <link.h>
#endif
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "gpuloss_math.cuh"

namespace {

// ---- arguments -------------------------------------------------------------------------------

// An array argument: an address (int), a buffer, or None (null).
struct Arg {
    void* ptr = nullptr;
    Py_buffer view;
    bool held = false;
    bool get(PyObject* o, bool writable) {
        if (o == Py_None) return true;
        if (PyLong_Check(o)) {
            ptr = PyLong_AsVoidPtr(o);
            return !PyErr_Occurred();
        }
        if (PyObject_GetBuffer(o, &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            return false;
        held = true;
        ptr = view.buf;
        return true;
    }
    ~Arg() {
        if (held) PyBuffer_Release(&view);
    }
};

bool get_ll(PyObject* o, long long* v) {
    *v = PyLong_AsLongLong(o);
    return !(*v == -1 && PyErr_Occurred());
}

// ---- exp for float32 data ----------------------------------------------------------------------
// exp(x) for float x as 2^k e^r, |r| <= ln2 / 2, with Cephes' degree-6 polynomial for e^r,
// every step rounded on its own (no fused multiply-add: the same bits on every CPU): at most
// 0.99 ulp from the exact value over every float in [-104, 0] (checked exhaustively; NumPy's
// float32 exp reaches 2.4 ulp there, CUDA's expf 2; with fused steps it was 1.01). No branch
// and no call, so that the loops using it are vectorised. Below -87.3 the result is subnormal
// and rounded once. x below -104 gives 0, NaN stays NaN, 0 gives 1 exactly. Only for x <= 0
// (beyond 88 the exponent bits overflow into NaN): the cce rows take logits minus the row
// maximum.
inline float pow2_f32(int32_t k) {  // 2^k for k in [-126, 127] (other k: garbage)
    uint32_t bits = (uint32_t)(k + 127) << 23;
    float s;
    memcpy(&s, &bits, sizeof s);
    return s;
}
inline float exp_f32(float x) {
    x = x < -104.0f ? -104.0f : x;  // NaN compares false and passes
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    float t = x * 1.44269504088896341f + magic;
    float k = t - magic;
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);  // t's bits: those of 1.5 * 2^23, plus k
    int32_t ki = (int32_t)(tb - 0x4B400000u);  // (a NaN's k is garbage: p is NaN)
    // Cody and Waite's two-part ln 2: k times the high part is exact
    float r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    // 2^k as 2^(k + 64) 2^-64: the first product is exact (2^(k + 64) is a normal number for
    // every k in [-150, 0]), the second rounds once (into the subnormals, below -87.3)
    return p * pow2_f32(ki + 64) * 0x1p-64f;
}

inline double exp_of(double x) { return exp(x); }
inline float exp_of(float x) { return exp_f32(x); }

// ---- elementwise losses ----------------------------------------------------------------------
// The CUDA elementwise kernel (gpuloss_elementwise) on one thread, without weights:
// grad[i] = dl/dp_i * (scale * GlGradFactor), per_elem[i] = l_i, *total = sum of l_i in double.
// Returns the GL_FLAG_* bits of the values that break the loss's domain rules (0: none).
template <typename F, typename T>
int elementwise(const T* pred, const T* target, long long n, double grad_scale, const double* a0,
                int pred_rule, int target_rule, T* grad, T* per_elem, double* total) {
    const T a[4] = {gl_param<T>(a0[0]), gl_param<T>(a0[1]), gl_param<T>(a0[2]),
                    gl_param<T>(a0[3])};
    T gscale = (T)(grad_scale * GlGradFactor<F>::value);
    if (pred_rule || target_rule) {
        for (long long i = 0; i < n; ++i) {
            if (pred_rule && gl_violates(pred_rule, pred[i])) return 1;
            if (target_rule && gl_violates(target_rule, target[i])) return 2;
        }
    }
    double acc = 0.0;
    for (long long i = 0; i < n; ++i) {
        T dl;
        T l = F::eval(pred[i], target[i], T(1), a, &dl);
        if (grad) grad[i] = dl * gscale;
        if (per_elem) per_elem[i] = l;
        acc += (double)l;
    }
    *total = acc;
    return 0;
}

typedef int (*ElementwiseF32)(const float*, const float*, long long, double, const double*, int,
                               int, float*, float*, double*);
typedef int (*ElementwiseF64)(const double*, const double*, long long, double, const double*,
                               int, int, double*, double*, double*);
struct ElementwiseEntry {
    const char* functor;  // as a loss's declaration names it (gpuloss._call.Call.kernel)
    ElementwiseF32 f32;
    ElementwiseF64 f64;
};
#define GL_HOST_ENTRY(name, ...) \
    {name, &elementwise<__VA_ARGS__, float>, &elementwise<__VA_ARGS__, double>}
const ElementwiseEntry ELEMENTWISE[] = {
    GL_HOST_ENTRY("GlMse", GlMse),
    GL_HOST_ENTRY("GlBce", GlBce),
    GL_HOST_ENTRY("GlBceLogits<0>", GlBceLogits<0>),
    GL_HOST_ENTRY("GlBceLogits<1>", GlBceLogits<1>),
    GL_HOST_ENTRY("GlMae", GlMae),
    GL_HOST_ENTRY("GlHuber", GlHuber),
    GL_HOST_ENTRY("GlSmoothL1", GlSmoothL1),
    GL_HOST_ENTRY("GlLogCosh", GlLogCosh),
    GL_HOST_ENTRY("GlPoissonNll", GlPoissonNll),
    GL_HOST_ENTRY("GlHinge", GlHinge),
    GL_HOST_ENTRY("GlSquaredHinge", GlSquaredHinge),
    GL_HOST_ENTRY("GlPinball", GlPinball),
};
const int N_ELEMENTWISE = sizeof(ELEMENTWISE) / sizeof(ELEMENTWISE[0]);

// Lanes of 16 floats or 8 doubles (GCC's and Clang's vector extensions: compiled to the
// widest registers the CPU has, or to scalar code): the row passes below are reductions,
// which the compiler may not reorder by itself.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
    typedef float v __attribute__((vector_size(64)));
    typedef int32_t index __attribute__((vector_size(64)));  // a position per lane
    typedef double wide __attribute__((vector_size(64)));  // 8 of the 16 lanes, widened
    enum { n = 16 };
};
template <>
struct Lanes<double> {
    typedef double v __attribute__((vector_size(64)));
    typedef int64_t index __attribute__((vector_size(64)));
    typedef double wide __attribute__((vector_size(64)));
    enum { n = 8 };
};

template <typename V, typename T>
inline V load_lanes(const T* p) {
    V v;
    memcpy(&v, p, sizeof v);
    return v;
}

// A row's maximum in *m and its first position; a NaN wins (NumPy's argmax stops at the
// first NaN). Taken in lanes, each with its maximum and that value's first position; a lane
// sum of v - v is NaN only where the row holds a NaN or an infinity (then the row is looked
// at again for a NaN). K < 2^31 (the caller's check).
template <typename T>
long long row_max(const T* row, long long K, T* m) {
    typedef typename Lanes<T>::v V;
    typedef typename Lanes<T>::index I;
    const int W = Lanes<T>::n;
    T mx = -(T)INFINITY, any_odd = T(0);
    long long top = 0, k = 0;
    if (K >= W) {
        V lane = load_lanes<V>(row), odd = lane - lane;
        I pos, at;
        for (int j = 0; j < W; ++j) pos[j] = j;
        at = pos;
        for (k = W; k + W <= K; k += W) {
            V v = load_lanes<V>(row + k);
            at += W;
            auto gt = v > lane;
            lane = gt ? v : lane;
            pos = gt ? at : pos;
            odd += v - v;
        }
        top = -1;
        for (int j = 0; j < W; ++j) {
            any_odd += odd[j] + (lane[j] - lane[j]);  // (a NaN in the first load stays)
            if (lane[j] > mx || (lane[j] == mx && pos[j] < top) || top < 0) {
                mx = lane[j];
                top = pos[j];
            }
        }
    } else {
        mx = row[0];
        any_odd = mx - mx;
        k = 1;
    }
    for (; k < K; ++k) {
        T v = row[k];
        if (v > mx) {
            mx = v;
            top = k;
        }
        any_odd += v - v;
    }
    if (any_odd != any_odd) {  // a NaN or an infinity: is there a NaN, and where first?
        long long nan_at = 0;
        while (nan_at < K && row[nan_at] == row[nan_at]) ++nan_at;
        if (nan_at < K) top = nan_at;
        else if (mx == -(T)INFINITY) top = 0;  // (a row of -inf: its first position)
    }
    *m = row[top];
    return top;
}

// Σ e_k over k != top in double: the row maximum's own 1 is left out (set to 0 for the sum,
// then put back), so that 1 + rest keeps the digits of a row dominated by it
template <typename T>
double sum_except(T* e, long long K, long long top) {
    typedef typename Lanes<T>::wide D;
    typedef T Part __attribute__((vector_size(8 * sizeof(T))));  // 8 values, widened to D
    const int W = 8;
    T e_top = e[top];
    e[top] = T(0);
    double rest = 0.0;
    long long k = 0;
    if (K >= 2 * W) {
        D lane = {};
        for (; k + W <= K; k += W) lane += __builtin_convertvector(load_lanes<Part>(e + k), D);
        for (int j = 0; j < W; ++j) rest += lane[j];
    }
    for (; k < K; ++k) rest += (double)e[k];
    e[top] = e_top;
    return rest;
}

// A flag of the module's functions: the C++ side could not allocate its scratch; the caller
// lets the NumPy backend compute (in blocks), or raise MemoryError.
#define GL_HOST_NO_MEMORY 64

// ---- threads ---------------------------------------------------------------------------------
// gl_parallel_for(n, threads, fn, openmp): fn(b) for every b in [0, n), on the calling thread
// and up to threads - 1 others: with `openmp`, PyTorch's own OpenMP team where it is loaded
// (below); otherwise helpers of a pool started on first use (they sleep on a condition
// variable between calls: nothing spins beside the caller's own threads, PyTorch's included),
// whose calls are taken one at a time. After a fork the child starts its own helpers.
struct GlPool {
    std::mutex call;  // one parallel call at a time
    std::mutex mu;
    std::condition_variable wake, idle;
    unsigned long long generation = 0;
    int started = 0, wanted = 0, running = 0;
    const std::function<void(long long)>* fn = nullptr;
    long long n = 0;
    std::atomic<long long> next{0};

    void drain(const std::function<void(long long)>* f, long long count) {
        for (long long b; (b = next.fetch_add(1)) < count;) (*f)(b);
    }
    void helper(unsigned long long seen) {
        std::unique_lock<std::mutex> lock(mu);
        for (;;) {
            wake.wait(lock, [&] { return generation != seen; });
            seen = generation;
            if (wanted <= 0) continue;  // this call has the helpers it asked for
            --wanted;
            ++running;
            const std::function<void(long long)>* f = fn;
            long long count = n;
            lock.unlock();
            drain(f, count);
            lock.lock();
            if (--running == 0) idle.notify_all();
        }
    }
};

// PyTorch's own threads: the OpenMP runtime loaded in this process (torch's: GNU's libgomp in
// its Linux wheels, under its own name or a hashed one; LLVM's and Intel's runtimes answer to
// GNU's GOMP_parallel too). Its workers spin for a while after each of torch's operators,
// waiting for more: handed our blocks of rows they start at once, where a helper of our pool
// would wait for the core one of them holds. Null where no such runtime is loaded, and in a
// forked child: a team the parent started may wait there for threads that do not exist
// (GNU's does). (The Python side asks once, and also knows of forks before this was loaded.)
typedef void (*GompParallel)(void (*)(void*), void*, unsigned, unsigned);
std::atomic<GompParallel> gl_openmp_found{nullptr};
std::atomic<bool> gl_forked_child{false};

bool is_openmp_runtime(const char* path) {
    const char* name = strrchr(path, '/');
    name = name ? name + 1 : path;
    return strncmp(name, "libgomp", 7) == 0 || strncmp(name, "libomp", 6) == 0 ||
           strncmp(name, "libiomp5", 8) == 0;
}

GompParallel openmp_parallel() {
    if (gl_forked_child.load()) return nullptr;
    GompParallel f = gl_openmp_found.load();
    if (f) return f;
    std::vector<std::string> loaded;  // the runtimes' paths, in load order
#if defined(__linux__)
    dl_iterate_phdr(
        [](struct dl_phdr_info* info, size_t, void* out) {
            if (info->dlpi_name && is_openmp_runtime(info->dlpi_name))
                ((std::vector<std::string>*)out)->push_back(info->dlpi_name);
            return 0;
        },
        &loaded);
#else
    loaded = {"libomp.dylib", "libgomp.so.1", "libomp.so", "libiomp5.so"};
#endif
    for (const std::string& path : loaded) {
        void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // only one already loaded
        if (!lib) continue;
        f = (GompParallel)dlsym(lib, "GOMP_parallel");  // (lib stays open: f is in it)
        if (f) break;
        dlclose(lib);
    }
    if (f) gl_openmp_found.store(f);
    return f;
}

struct TeamWork {  // the blocks, taken in turn by every thread of the OpenMP team
    const std::function<void(long long)>* fn;
    long long n;
    std::atomic<long long> next{0};
};
void team_member(void* data) {
    TeamWork* work = (TeamWork*)data;
    for (long long b; (b = work->next.fetch_add(1)) < work->n;) (*work->fn)(b);
}

// The pool, never destroyed (its helpers outlive the module), started by its first call.
GlPool* gl_pool_now = nullptr;
std::once_flag gl_pool_once;

inline GlPool& gl_pool() {
    std::call_once(gl_pool_once, [] { gl_pool_now = new GlPool(); });
    return *gl_pool_now;
}

// A forked child (registered at import; it runs before anything else in the child) gets a new
// pool: the parent's helpers do not exist there, and its locks and condition variables may
// have been copied mid-call. It leaves the OpenMP team alone (above).
void at_fork_child() {
    if (gl_pool_now) gl_pool_now = new GlPool();
    gl_forked_child.store(true);
}

inline void gl_parallel_for(long long n, int threads, const std::function<void(long long)>& fn,
                            bool openmp = false) {
    if (threads <= 1 || n <= 1) {
        for (long long b = 0; b < n; ++b) fn(b);
        return;
    }
    if (openmp) {
        if (GompParallel parallel = openmp_parallel()) {
            TeamWork work;
            work.fn = &fn;
            work.n = n;
            parallel(team_member, &work, (unsigned)(threads < n ? threads : n), 0);
            return;
        }
    }
    GlPool& pool = gl_pool();
    std::lock_guard<std::mutex> one_call(pool.call);
    int helpers = (int)(threads - 1 < n - 1 ? threads - 1 : n - 1);
    {
        std::lock_guard<std::mutex> lock(pool.mu);
        try {
            for (; pool.started < helpers; ++pool.started)
                std::thread(&GlPool::helper, &pool, pool.generation).detach();
        } catch (const std::system_error&) {  // no more threads: the ones there are
            helpers = pool.started;
        }
        pool.fn = &fn;
        pool.n = n;
        pool.next.store(0);
        pool.wanted = helpers;
        ++pool.generation;
    }
    pool.wake.notify_all();
    pool.drain(&fn, n);
    std::unique_lock<std::mutex> lock(pool.mu);
    pool.wanted = 0;  // a helper that wakes only now finds nothing to do
    pool.idle.wait(lock, [&] { return pool.running == 0; });
}

// ---- cce_with_logits with class indices --------------------------------------------------------
// Per row i with label y (NumPy backend, _cce_logits_block; no class weights, smoothing, z-loss,
// softcap or focal term):
//   m = the row's maximum (its first position `top`; the first NaN, if any), s = z - m,
//   e = exp(s), rest = sum of e over k != top in double, lse = log1p(rest), se = 1 + rest,
//   loss = lse - s_y (in double, rounded to T), times the row's weight w (0 for ignore_index;
//   a row of weight 0 adds 0 even where its loss is infinite),
//   grad = e * (T)(gw / se) with gw = w * gscale (T), and at the label
//          (expm1(s_y) - rest) * (gw / se) in double: no cancellation when p_y is near 1.
// Rows [row0, row1) of the pass below (cce_labels); returns their losses' sum (in row order).
template <typename T, typename L>
double cce_label_rows(const T* z, const L* labels, long long row0, long long row1, long long K,
                      bool has_ignore, long long ignore, bool weighted, T gscale, T* grad,
                      T* per_sample, bool want_sum) {
    // Rows go in chunks of about CHUNK values, each pass over a chunk a simple loop the
    // compiler vectorises: s = z - m (into the gradient, or scratch), e = exp(s) over the whole
    // chunk (short rows too), then each row's sums and scaling.
    const long long CHUNK = 4096;
    long long rows_per_chunk = K >= 256 ? 1 : CHUNK / K;
    std::vector<T> scratch;
    if (!grad) scratch.resize((size_t)(rows_per_chunk * K));
    std::vector<long long> top(rows_per_chunk);
    std::vector<T> m(rows_per_chunk), s_y(rows_per_chunk);
    double acc = 0.0;
    for (long long i0 = row0; i0 < row1; i0 += rows_per_chunk) {
        long long rows = row1 - i0 < rows_per_chunk ? row1 - i0 : rows_per_chunk;
        T* e = grad ? grad + i0 * K : scratch.data();
        for (long long r = 0; r < rows; ++r) {
            const T* row = z + (i0 + r) * K;
            long long y = (long long)labels[i0 + r];
            long long yi = y >= 0 && y < K ? y : 0;  // (0: never an out-of-bounds read)
            T mr;
            top[r] = row_max(row, K, &mr);
            m[r] = mr;
            s_y[r] = row[yi] - mr;  // read before the gradient may overwrite the row
            T* er = e + r * K;
            if (rows == 1) {  // a long row: in one loop
                for (long long k = 0; k < K; ++k) er[k] = exp_of((T)(row[k] - mr));
            } else {  // short rows: the exp over all of them at once, below
                for (long long k = 0; k < K; ++k) er[k] = row[k] - mr;
            }
        }
        if (rows > 1) {
            long long n = rows * K;
            for (long long j = 0; j < n; ++j) e[j] = exp_of(e[j]);
        }
        for (long long r = 0; r < rows; ++r) {
            long long i = i0 + r;
            long long y = (long long)labels[i];
            bool in_range = y >= 0 && y < K;
            long long yi = in_range ? y : 0;
            T w = T(1);
            if (has_ignore && y == ignore) {
                w = T(0);
            } else if (!in_range) {
                w = (T)NAN;  // only with validate=False: the row's loss and gradient are NaN
            }
            T* er = e + r * K;
            double rest = sum_except(er, K, top[r]);
            // exp(m - m) is NaN for a maximum of +-inf or NaN: the row's loss and gradient too
            if (!(m[r] - m[r] == T(0))) rest = NAN;
            double se = 1.0 + rest;
            if (want_sum || per_sample) {
                // log1p keeps the digits of a small rest; from rest = 1 on, log(1 + rest)
                // is as exact and (glibc) several times faster
                double lse = rest >= 1.0 ? log(se) : log1p(rest);
                T l = (T)(lse - (double)s_y[r]);
                if (weighted) {
                    bool zero_inf = w == T(0) && l - l != T(0) && l == l;  // inf * 0 adds 0
                    l = zero_inf ? T(0) : l * w;
                }
                if (per_sample) per_sample[i] = l;
                acc += (double)l;
            }
            if (grad) {
                T gw = weighted ? w * gscale : gscale;
                double scale = (double)gw / se;
                T scale_t = (T)scale;
                for (long long k = 0; k < K; ++k) er[k] = er[k] * scale_t;
                er[yi] = (T)((expm1((double)s_y[r]) - rest) * scale);
            }
        }
    }
    return acc;
}

// The whole pass. Returns 8 when a label is out of range (not ignore_index) and `validate`;
// the caller then lets the NumPy backend raise its error.
template <typename T, typename L>
int cce_labels(const T* z, const L* labels, long long R, long long K, bool has_ignore,
               long long ignore, bool validate, int mean, T* grad, T* per_sample,
               bool want_sum, int threads, bool openmp, double* total, double* denom) {
    long long counted = R;
    bool weighted = has_ignore || !validate;  // rows of weight other than 1 may exist
    for (long long i = 0; i < R; ++i) {  // the labels' pass: range and the mean's count
        long long y = (long long)labels[i];
        if (has_ignore && y == ignore) {
            --counted;
        } else if (y < 0 || y >= K) {
            if (validate) return 8;
        }
    }
    *denom = (double)counted;
    double scale_mean = mean ? (counted > 0 ? 1.0 / (double)counted : 0.0) : 1.0;
    const T gscale = (T)scale_mean;
    // Blocks of about BLOCK values (whole rows), on up to `threads` threads; each block's sum
    // is kept apart and the sums are added in block order, so the result does not depend on
    // the number of threads.
    const long long BLOCK = 1 << 15;
    long long block_rows = K >= BLOCK ? 1 : BLOCK / K;
    long long blocks = (R + block_rows - 1) / block_rows;
    std::vector<double> sums((size_t)blocks);
    std::atomic<bool> no_memory{false};
    gl_parallel_for(blocks, threads, [&](long long b) {
        long long row0 = b * block_rows, row1 = row0 + block_rows < R ? row0 + block_rows : R;
        try {  // (a block's scratch; an exception must not leave a helper thread)
            sums[(size_t)b] = cce_label_rows(z, labels, row0, row1, K, has_ignore, ignore,
                                             weighted, gscale, grad, per_sample, want_sum);
        } catch (const std::bad_alloc&) {
            no_memory = true;
        }
    }, openmp);
    if (no_memory) return GL_HOST_NO_MEMORY;
    double acc = 0.0;
    for (double v : sums) acc += v;
    *total = acc;
    return 0;
}

// cce_labels for float32 or float64 data (`f64`) and int64 or int32 labels (`l32`), as both
// callers hold them (untyped addresses); no memory for the scratch is GL_HOST_NO_MEMORY
int cce_labels_any(bool f64, bool l32, const void* z, const void* labels, long long R,
                   long long K, bool has_ignore, long long ignore, bool validate, bool mean,
                   void* grad, void* per_sample, bool want_sum, int threads, bool openmp,
                   double* total, double* denom) {
#define GL_CCE(T, L)                                                                       \
    cce_labels<T, L>((const T*)z, (const L*)labels, R, K, has_ignore, ignore, validate,   \
                     mean ? 1 : 0, (T*)grad, (T*)per_sample, want_sum, threads, openmp,   \
                     total, denom)
    try {
        if (f64) return l32 ? GL_CCE(double, int32_t) : GL_CCE(double, int64_t);
        return l32 ? GL_CCE(float, int32_t) : GL_CCE(float, int64_t);
    } catch (const std::bad_alloc&) {
        return GL_HOST_NO_MEMORY;
    }
#undef GL_CCE
}

// ---- the module's functions ---------------------------------------------------------------------

// elementwise(index, float64, pred, target, grad, per_elem, n, grad_scale, params (4 floats as
// a bytes-like of 4 doubles), pred_rule, target_rule, want_sum) -> total (float) or flags (int)
PyObject* py_elementwise(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "elementwise takes 12 arguments");
        return nullptr;
    }
    long long index, f64, n, pred_rule, target_rule, want_sum;
    if (!get_ll(args[0], &index) || !get_ll(args[1], &f64) || !get_ll(args[6], &n) ||
        !get_ll(args[9], &pred_rule) || !get_ll(args[10], &target_rule) ||
        !get_ll(args[11], &want_sum))
        return nullptr;
    double grad_scale = PyFloat_AsDouble(args[7]);
    if (grad_scale == -1.0 && PyErr_Occurred()) return nullptr;
    if (index < 0 || index >= N_ELEMENTWISE) {
        PyErr_SetString(PyExc_ValueError, "no such elementwise kernel");
        return nullptr;
    }
    Arg pred, target, grad, per_elem, params;
    if (!pred.get(args[2], false) || !target.get(args[3], false) || !grad.get(args[4], true) ||
        !per_elem.get(args[5], true) || !params.get(args[8], false))
        return nullptr;
    double total = 0.0;
    int flags;
    const ElementwiseEntry& e = ELEMENTWISE[index];
    Py_BEGIN_ALLOW_THREADS;
    if (f64)  // (no allocation here: nothing to catch)
        flags = e.f64((const double*)pred.ptr, (const double*)target.ptr, n, grad_scale,
                      (const double*)params.ptr, (int)pred_rule, (int)target_rule,
                      (double*)grad.ptr, (double*)per_elem.ptr, &total);
    else
        flags = e.f32((const float*)pred.ptr, (const float*)target.ptr, n, grad_scale,
                      (const double*)params.ptr, (int)pred_rule, (int)target_rule,
                      (float*)grad.ptr, (float*)per_elem.ptr, &total);
    Py_END_ALLOW_THREADS;
    if (flags) return PyLong_FromLong(flags);
    return PyFloat_FromDouble(want_sum ? total : 0.0);
}

// cce_labels(float64, labels_int32, pred, labels, grad, per_sample, R, K, ignore_index or None,
// validate, mean, want_sum, threads, openmp) -> (total, denominator) or flags (int); openmp:
// the threads are PyTorch's OpenMP team where it is loaded
PyObject* py_cce_labels(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "cce_labels takes 14 arguments");
        return nullptr;
    }
    long long f64, l32, R, K, ignore = 0, validate, mean, want_sum, threads, openmp;
    bool has_ignore = args[8] != Py_None;
    if (!get_ll(args[0], &f64) || !get_ll(args[1], &l32) || !get_ll(args[6], &R) ||
        !get_ll(args[7], &K) || (has_ignore && !get_ll(args[8], &ignore)) ||
        !get_ll(args[9], &validate) || !get_ll(args[10], &mean) || !get_ll(args[11], &want_sum) ||
        !get_ll(args[12], &threads) || !get_ll(args[13], &openmp))
        return nullptr;
    if (K < 1) {
        PyErr_SetString(PyExc_ValueError, "cce_labels needs K >= 1");
        return nullptr;
    }
    Arg pred, labels, grad, per_sample;
    // grad may be pred's own buffer: each row is read before its gradient is written
    if (!pred.get(args[2], false) || !labels.get(args[3], false) || !grad.get(args[4], true) ||
        !per_sample.get(args[5], true))
        return nullptr;
    double total = 0.0, denom = 0.0;
    int flags;
    Py_BEGIN_ALLOW_THREADS;
    flags = cce_labels_any(f64 != 0, l32 != 0, pred.ptr, labels.ptr, R, K, has_ignore, ignore,
                           validate != 0, mean != 0, grad.ptr, per_sample.ptr, want_sum != 0,
                           (int)threads, openmp != 0, &total, &denom);
    Py_END_ALLOW_THREADS;
    if (flags) return PyLong_FromLong(flags);
    return Py_BuildValue("(dd)", total, denom);
}

// exp_f32(x: float32 buffer, out: float32 buffer, n): the float32 exp above over an array (for
// the tests that hold it to a float64 reference)
PyObject* py_exp_f32(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
    long long n;
    if (nargs != 3 || !get_ll(args[2], &n)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "exp_f32 takes 3 arguments");
        return nullptr;
    }
    Arg x, out;
    if (!x.get(args[0], false) || !out.get(args[1], true)) return nullptr;
    if (!x.held || !out.held || n < 0 || x.view.len < n * 4 || out.view.len < n * 4) {
        PyErr_SetString(PyExc_ValueError, "exp_f32 takes two float32 buffers of n values");
        return nullptr;
    }
    const float* xs = (const float*)x.ptr;
    float* os = (float*)out.ptr;
    for (long long i = 0; i < n; ++i) os[i] = exp_f32(xs[i]);
    Py_RETURN_NONE;
}

// openmp_team() -> bool: whether cce_labels(..., openmp=1) runs on an OpenMP team (a runtime
// is loaded, and this is not a forked child)
PyObject* py_openmp_team(PyObject*, PyObject*) {
    bool found = false;
    try {
        found = openmp_parallel() != nullptr;
    } catch (const std::bad_alloc&) {  // (the list of loaded runtimes: then none is used)
    }
    return PyBool_FromLong(found);
}

PyMethodDef METHODS[] = {
    {"elementwise", (PyCFunction)(void (*)(void))py_elementwise, METH_FASTCALL, nullptr},
    {"cce_labels", (PyCFunction)(void (*)(void))py_cce_labels, METH_FASTCALL, nullptr},
    {"exp_f32", (PyCFunction)(void (*)(void))py_exp_f32, METH_FASTCALL, nullptr},
    {"openmp_team", py_openmp_team, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_gpuloss_host", nullptr, -1, METHODS};

}  // namespace

PyMODINIT_FUNC PyInit__gpuloss_host(void) {
    PyObject* m = PyModule_Create(&MODULE);
    if (!m) return nullptr;
    pthread_atfork(nullptr, nullptr, at_fork_child);
    PyObject* names = PyTuple_New(N_ELEMENTWISE);  // the functors, in the table's order
    if (!names) return nullptr;
    for (int i = 0; i < N_ELEMENTWISE; ++i)
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(ELEMENTWISE[i].functor));
    if (PyModule_AddObject(m, "ELEMENTWISE", names) < 0) return nullptr;
    return m;
}
