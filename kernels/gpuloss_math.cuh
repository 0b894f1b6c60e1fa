// gpuloss: the per-element math of every loss and gradient, for the device and the host.
//
// This header is the single source of truth for the CUDA kernels (gpuloss_kernels.cu) and is
// also compiled with g++ by the test suite and checked against float64 references, so a
// changed operator or constant here fails the CPU tests. The formulas are the ones documented
// in gpuloss/losses/. T is float (for float16/bfloat16/float32 data) or double.
//
// Each loss is a functor the generic kernels are templated on (its name is the `kernel` of the
// loss's declaration):
//   elementwise: static T eval(T p, T y, T c, const T* a, T* dl_dp) returns l(p, y) and writes
//                dl/dp; a[0..3] are the loss's scalar parameters, c the per-element positive
//                weight (bce_with_logits' pos_weight; 1 where a loss has none).
//   rows:        derived from GlRowDefaults; static T term(z, c, k, row, a, g): class k's
//                share of the sample's loss and its derivative, given the row's statistics
//                (GlRow); the defaults' hooks say which statistics the kernel gathers.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GL_FN __host__ __device__ __forceinline__
#define GL_INF __int_as_float(0x7f800000)
#define GL_NAN __int_as_float(0x7fc00000)
GL_FN unsigned int gl_float_bits(float x) { return __float_as_uint(x); }
GL_FN float gl_bits_float(unsigned int u) { return __uint_as_float(u); }
GL_FN unsigned long long gl_double_bits(double x) {
    return (unsigned long long)__double_as_longlong(x);
}
#else
#include <math.h>
#include <string.h>
#define GL_FN inline
#define GL_INF INFINITY
#define GL_NAN NAN
GL_FN unsigned int gl_float_bits(float x) {
    unsigned int u;
    memcpy(&u, &x, sizeof u);
    return u;
}
GL_FN float gl_bits_float(unsigned int u) {
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}
GL_FN unsigned long long gl_double_bits(double x) {
    unsigned long long u;
    memcpy(&u, &x, sizeof u);
    return u;
}
#endif

// ---- the math library, picked by type (no reliance on C++ overloads under NVRTC) ----------
GL_FN float gl_exp(float x) { return expf(x); }
GL_FN double gl_exp(double x) { return exp(x); }
GL_FN float gl_log(float x) { return logf(x); }
GL_FN double gl_log(double x) { return log(x); }
GL_FN float gl_log1p(float x) { return log1pf(x); }
GL_FN double gl_log1p(double x) { return log1p(x); }
GL_FN float gl_expm1(float x) { return expm1f(x); }
GL_FN double gl_expm1(double x) { return expm1(x); }
GL_FN float gl_abs(float x) { return fabsf(x); }
GL_FN double gl_abs(double x) { return fabs(x); }
GL_FN float gl_tanh(float x) { return tanhf(x); }
GL_FN double gl_tanh(double x) { return tanh(x); }
GL_FN float gl_copysign(float x, float s) { return copysignf(x, s); }
GL_FN double gl_copysign(double x, double s) { return copysign(x, s); }
GL_FN float gl_max_tiny(float x) { return x > 1.17549435e-38f ? x : 1.17549435e-38f; }
GL_FN double gl_max_tiny(double x) {  // max(x, the smallest normal number)
    return x > 2.2250738585072014e-308 ? x : 2.2250738585072014e-308;
}

// a * b rounded on its own, never fused with a neighbouring add or subtract: where the sum
// cancels (exp(p) - y p), a fused multiply-add would round differently from the CPU backends
// (and a + b the same way: a sum that may not absorb the product before it into an FMA)
#if defined(__CUDA_ARCH__)
GL_FN float gl_mul_rn(float a, float b) { return __fmul_rn(a, b); }
GL_FN double gl_mul_rn(double a, double b) { return __dmul_rn(a, b); }
GL_FN float gl_add_rn(float a, float b) { return __fadd_rn(a, b); }
GL_FN double gl_add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
GL_FN float gl_mul_rn(float a, float b) {
    volatile float r = a * b;  // a store the compiler may not contract across
    return r;
}
GL_FN double gl_mul_rn(double a, double b) {
    volatile double r = a * b;
    return r;
}
GL_FN float gl_add_rn(float a, float b) {
    volatile float r = a + b;
    return r;
}
GL_FN double gl_add_rn(double a, double b) {
    volatile double r = a + b;
    return r;
}
#endif

// A loss's scalar parameter (a double) in the compute type: a value beyond the type's range
// becomes its largest finite value (an overflow to inf would turn inf - inf or inf * 0 into NaN
// in the formulas); NaN stays NaN. The CPU backend clamps the same way (_Consts).
GL_FN float gl_param_float(double v) {
    return v > 3.4028234663852886e38 ? 3.4028234663852886e38f
                                     : (v < -3.4028234663852886e38 ? -3.4028234663852886e38f
                                                                   : (float)v);
}
GL_FN double gl_param_double(double v) {
    return v > 1.7976931348623157e308 ? 1.7976931348623157e308
                                      : (v < -1.7976931348623157e308 ? -1.7976931348623157e308 : v);
}
template <typename T>
GL_FN T gl_param(double v);
template <>
GL_FN float gl_param<float>(double v) { return gl_param_float(v); }
template <>
GL_FN double gl_param<double>(double v) { return gl_param_double(v); }

// sign(p - y) decided on the inputs, not on their difference: under flush-to-zero a subnormal
// difference of two normal numbers is 0 (+1, -1, 0 for p == y, NaN for NaN)
template <typename T>
GL_FN T gl_sign_diff(T p, T y) {
    return p > y ? T(1) : (p < y ? T(-1) : (p == y ? p - y : p + y));  // inf - inf: NaN
}

// sign(x) as NumPy's: +1, -1, 0 at +-0, NaN for NaN
template <typename T>
GL_FN T gl_sign(T x) {
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : (x == x ? T(0) : x));
}

// max(x, 0) that keeps a NaN (x > 0 alone would turn it into 0)
template <typename T>
GL_FN T gl_relu(T x) {
    return x > T(0) || x != x ? x : T(0);
}

// clip to [lo, hi]; NaN passes through (both comparisons are false)
template <typename T>
GL_FN T gl_clip(T x, T lo, T hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

// ---- domain checks, independent of flush-to-zero ---------------------------------------------
// CuPy compiles every kernel with -ftz=true: a float32 comparison sees a subnormal as zero, so
// -1e-40 < 0 is false there. Values are therefore judged on their bits (a reinterpreting move
// never flushes) -- doubles too, which the device never flushes but a host emulating
// flush-to-zero (x86's DAZ) would.

// true when x lies outside [0, 1]; NaN counts as inside, so it propagates instead of raising
GL_FN bool gl_outside_unit(float x) {
    unsigned int u = gl_float_bits(x), mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return false;                 // NaN
    return (u >> 31) ? mag != 0u : u > 0x3f800000u;      // below -0, or above 1.0f
}
GL_FN bool gl_outside_unit(double x) {
    unsigned long long u = gl_double_bits(x), mag = u & 0x7fffffffffffffffull;
    if (mag > 0x7ff0000000000000ull) return false;                  // NaN
    return (u >> 63) ? mag != 0ull : u > 0x3ff0000000000000ull;     // below -0, or above 1.0
}

// true for a weight that is negative, NaN or infinite (scikit-learn's rule); -0 is a zero
GL_FN bool gl_bad_weight(float w) {
    unsigned int u = gl_float_bits(w), mag = u & 0x7fffffffu;
    return mag >= 0x7f800000u || ((u >> 31) && mag != 0u);
}
GL_FN bool gl_bad_weight(double w) {
    unsigned long long u = gl_double_bits(w), mag = u & 0x7fffffffffffffffull;
    return mag >= 0x7ff0000000000000ull || ((u >> 63) && mag != 0ull);
}

// the domain rules of gpuloss/_call.py (0: no rule), judged on the bits; NaN always passes
#define GL_RULE_UNIT 1    // in [0, 1]
#define GL_RULE_NONNEG 2  // >= 0, -0 included
#define GL_RULE_SIGN 3    // exactly -1 or +1
GL_FN bool gl_violates(int rule, float x) {
    unsigned int u = gl_float_bits(x), mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return false;  // NaN
    if (rule == GL_RULE_UNIT) return gl_outside_unit(x);
    if (rule == GL_RULE_NONNEG) return (u >> 31) && mag != 0u;
    if (rule == GL_RULE_SIGN) return mag != 0x3f800000u;
    return false;
}
GL_FN bool gl_violates(int rule, double x) {
    unsigned long long u = gl_double_bits(x), mag = u & 0x7fffffffffffffffull;
    if (mag > 0x7ff0000000000000ull) return false;  // NaN
    if (rule == GL_RULE_UNIT) return gl_outside_unit(x);
    if (rule == GL_RULE_NONNEG) return (u >> 63) && mag != 0ull;
    if (rule == GL_RULE_SIGN) return mag != 0x3ff0000000000000ull;
    return false;
}

// ---- mse: l = (p - y)^2, dl/dp = 2 (p - y) ---------------------------------------------------
template <typename T>
GL_FN T gl_mse(T p, T y, T* dl_dp) {
    T d = p - y;
    *dl_dp = T(2) * d;
    return d * d;
}

// ---- bce on probabilities, evaluated at p' = clip(p, lo, hi) ---------------------------------
// l = -[y log p' + (1 - y) log(1 - p')],  dl/dp = (p' - y) / (p' (1 - p'))
template <typename T>
GL_FN T gl_bce(T p, T y, T lo, T hi, T* dl_dp) {
    T pc = gl_clip(p, lo, hi);
    *dl_dp = (pc - y) / (pc * (T(1) - pc));
    // log1p keeps small p' exact; the products rounded on their own, as on the CPU (a target
    // outside [0, 1], with validate=False, makes the two terms cancel)
    return -(gl_mul_rn(y, gl_log(pc)) + gl_mul_rn(T(1) - y, gl_log1p(-pc)));
}

// ---- bce on logits with positive weight c ----------------------------------------------------
// l = (1 - y) softplus(z) + c y softplus(-z),  dl/dz = (1 - y) sigmoid(z) - c y sigmoid(-z)
// softplus(+-z) = max(+-z, 0) + log1p(exp(-|z|)): exp never overflows, both terms are >= 0
// so nothing cancels, and sigmoid(+-z) come from the same exp(-|z|).
template <typename T>
GL_FN T gl_bce_logits(T z, T y, T c, T* dl_dz) {
    T e = gl_exp(-gl_abs(z));
    T tail = gl_log1p(e);
    T pos = z > T(0) ? z : T(0);
    T r = T(1) / (T(1) + e);
    bool nonneg = z >= T(0);
    // sigmoid(z) = a r, sigmoid(-z) = b r: dl/dz = ((1 - y) a - c y b) r, the difference
    // formed as on the CPU (for a target outside [0, 1] it cancels)
    T a = nonneg ? T(1) : e, b = nonneg ? e : T(1);
    *dl_dz = (gl_mul_rn(a, T(1) - y) - gl_mul_rn(b, c * y)) * r;
    // the products rounded on their own, as on the CPU: for a target outside [0, 1]
    // (validate=False) the two terms cancel, and a fused multiply-add would round apart
    return gl_mul_rn(T(1) - y, pos + tail) + gl_mul_rn(c * y, (pos - z) + tail);
}

// label smoothing for bce: y' = y (1 - s) + s / 2
template <typename T>
GL_FN T gl_smooth_binary(T y, T s) {
    return y * (T(1) - s) + s * T(0.5);
}

// ---- the elementwise functors of the first three losses -------------------------------------
// The elementwise kernel multiplies a functor's dl/dp by GlGradFactor<F>::value together with
// the mean's 1/D, in double: mse's 2 (p - y) would overflow float for |p - y| > 1.7e38 where
// 2 (p - y) / n does not (the CPU backend multiplies by 2 / n in one product too)
template <typename F>
struct GlGradFactor {
    static constexpr double value = 1.0;
};
struct GlMse {  // dl/dp without its factor 2 (GlGradFactor)
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T d = p - y;
        *g = d;
        return d * d;
    }
};
template <>
struct GlGradFactor<GlMse> {
    static constexpr double value = 2.0;
};
struct GlBce {  // a = {lo, hi}, the clipping bounds eps, 1 - eps
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        return gl_bce(p, y, a[0], a[1], g);
    }
};
// the sigmoid focal loss from the cross-entropy ce and its derivative *g, in place:
// l = alpha_t M ce, g = alpha_t (M ce' + (gamma M) (1 - 2y) R ce) with M = (1 - p_t)^gamma,
// alpha_t = a_pos y + a_neg (1 - y) (1 without alpha), (1 + e)(1 - p_t) = den = a (1 - y) + b y
// ((a, b) = (1, e) for z >= 0, (e, 1) below) and R = p (1 - p) / (1 - p_t) = e / ((1 + e) den)
// in [0, 1]. M and gamma M R come from the log domain (gamma M = exp(gamma log(1 - p_t) +
// log gamma)), so that no huge gamma meets M = 0 or R = 0 as inf * 0: finite for every finite z
// and gamma >= 0; gamma = 0 gives M = 1.
template <typename T>
GL_FN T gl_focal_binary(T z, T y, T ce, T gamma, T a_pos, T a_neg, T* g) {
    T m = (a_pos == T(1) && a_neg == T(1)) ? T(1) : y * a_pos + (T(1) - y) * a_neg;
    if (gamma != T(0)) {
        T e = gl_exp(-gl_abs(z));
        bool nonneg = z >= T(0);
        T a = nonneg ? T(1) : e, b = nonneg ? e : T(1);
        T den = (T(1) - y) * a + b * y;
        T lm = (gl_log(den) - gl_log1p(e)) * gamma;  // log M
        T r = e / (gl_max_tiny(den) * (e + T(1)));  // den = 0 only where M = 0 too
        T gm = gl_exp(lm + gl_log(gamma));           // gamma M
        // gamma M R; where gamma M overflows (gamma near the dtype's largest value), from the
        // log domain, so that R = 0 gives 0, not inf * 0
        T gmr = gm - gm == T(0) ? gm * r : gl_exp((lm + gl_log(gamma)) + gl_log(r));
        T M = gl_exp(lm);
        *g = m * (*g * M + gmr * (ce * (T(1) - T(2) * y)));
        return ce * (m * M);
    }
    *g = *g * m;
    return ce * m;
}

// a = {label smoothing, focal gamma, alpha, 1 - alpha}; without alpha {.., .., 1, 1}.
// OPTS (compile-time switches, set by the loss's declaration): GL_FOCAL where gamma or alpha
// is given; without it the focal code is not compiled in.
#define GL_FOCAL 1
template <int OPTS>
struct GlBceLogits {
    template <typename T>
    GL_FN static T eval(T z, T y, T c, const T* a, T* g) {
        if (a[0] != T(0)) y = gl_smooth_binary(y, a[0]);
        T ce = gl_bce_logits(z, y, c, g);
        if (!(OPTS & GL_FOCAL)) return ce;
        return gl_focal_binary(z, y, ce, a[1], a[2], a[3], g);
    }
};

// ---- the elementwise catalogue (CATALOGUE.md); d = p - y -------------------------------------
struct GlMae {  // |d|, sign(d) (decided on p and y)
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        *g = gl_sign_diff(p, y);
        return gl_abs(p - y);
    }
};
struct GlHuber {  // a = {delta}: d^2 / 2 where |d| <= delta, else delta (|d| - delta / 2)
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T d = p - y, ad = gl_abs(d), delta = a[0];
        if (ad <= delta) {
            *g = d;
            return T(0.5) * d * d;
        }
        *g = delta * gl_sign(d);  // NaN falls here and stays NaN
        return delta * (ad - T(0.5) * delta);
    }
};
// a = {beta}: huber(delta = beta) / beta, i.e. d^2 / (2 beta) where |d| < beta, else
// |d| - beta / 2, written as (m / beta) (|d| - m / 2) with m = min(|d|, beta) as on the CPU
// (m / beta is exactly 1 outside: nothing is multiplied by a tiny beta and divided back);
// beta = 0 is |d|, sign(d)
struct GlSmoothL1 {
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T d = p - y, ad = gl_abs(d), beta = a[0];
        if (beta == T(0)) {
            *g = gl_sign_diff(p, y);
            return ad;
        }
        T m = ad < beta ? ad : beta;
        // the slope from the difference in double: a subnormal d of normal p, y (0 under
        // flush-to-zero) over a tiny beta is an O(1) slope; exact for float data
        double dd = (double)p - (double)y, bd = (double)beta;
        *g = (T)(gl_clip(dd, -bd, bd) / bd);  // NaN passes through
        return (m / beta) * (ad - T(0.5) * m);
    }
};
// log cosh d from t = tanh d (its derivative), without overflow and without cancellation
// near 0, as the CPU backend: -log1p(-t^2) / 2 for |d| <= 1 (cosh^2 = 1 / (1 - t^2)), and
// |d| - log1p(|t|) beyond (1 + tanh |d| = e^|d| / cosh d)
struct GlLogCosh {
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T d = p - y, ad = gl_abs(d), t = gl_tanh(d);
        *g = t;
        if (ad <= T(1)) return T(-0.5) * gl_log1p(-(t * t));  // NaN falls here
        return ad - gl_log1p(gl_abs(t));
    }
};

// a = {log_input, full, eps}. log_input: exp(p) - y p, grad exp(p) - y; else p - y log(p + eps),
// grad 1 - y / (p + eps). full adds Stirling's y log y - y + log(2 pi y) / 2 where y > 1.
struct GlPoissonNll {
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T l;
        if (a[0] != T(0)) {
            T e = gl_exp(p);
            *g = e - y;
            l = e - gl_mul_rn(y, p);  // the terms may cancel: rounded as on the CPU
        } else {
            T q = p + a[2];
            *g = T(1) - y / q;
            l = p - gl_mul_rn(y, gl_log(q));
        }
        if (a[1] != T(0) && y > T(1))
            l += (gl_mul_rn(y, gl_log(y)) - y) +
                 gl_mul_rn(T(0.5), gl_log(gl_mul_rn(T(6.283185307179586), y)));
        return l;
    }
};
struct GlHinge {  // y in {-1, +1}: max(0, 1 - y p), grad -y where y p < 1
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T m = T(1) - y * p;  // y p is exact for y = +-1: contraction changes nothing
        *g = m > T(0) ? -y : (m == m ? T(0) : m);
        return gl_relu(m);
    }
};
struct GlSquaredHinge {  // max(0, 1 - y p)^2, grad -2 y max(0, 1 - y p)
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T h = gl_relu(T(1) - y * p);
        *g = T(0) - T(2) * y * h;  // +0 where h = 0, as on the CPU
        return h * h;
    }
};
struct GlPinball {  // a = {q}, r = y - p: max(q r, (q - 1) r); grad -q where r > 0, 1 - q where r < 0
    template <typename T>
    GL_FN static T eval(T p, T y, T c, const T* a, T* g) {
        T q = a[0], r = y - p;
        T above = q * r, below = (q - T(1)) * r;
        // the side decided on y and p: a subnormal r flushes to 0 on the device
        *g = y > p ? -q : (y < p ? T(1) - q : r * T(0));  // 0, or NaN (NaN, inf - inf)
        return above > below ? above : below;  // NaN: below is NaN too
    }
};

// ---- softmax cross-entropy on logits --------------------------------------------------------
// A row's log-sum-exp is kept as (m, rest): the running maximum, and the sum of exp(z - m)
// minus the maximum's own 1. log(sum) = log1p(rest) then stays accurate when the row is
// dominated by its maximum (small losses keep their relative precision).
template <typename T>
struct GlLse {
    T m;
    T rest;
};

template <typename T>
GL_FN GlLse<T> gl_lse_empty() {
    GlLse<T> a;
    a.m = -GL_INF;
    a.rest = T(-1);  // an empty sum
    return a;
}

template <typename T>
GL_FN GlLse<T> gl_lse_push(GlLse<T> a, T z) {
    if (z > a.m) {  // new maximum: what was summed so far, rescaled, becomes the rest
        a.rest = (a.rest + T(1)) * gl_exp(a.m - z);
        a.m = z;
    } else if (!(z == -GL_INF && a.m == -GL_INF)) {  // NaN falls here and propagates
        a.rest = a.rest + gl_exp(z - a.m);
    }
    return a;
}

template <typename T>
GL_FN GlLse<T> gl_lse_merge(GlLse<T> a, GlLse<T> b) {
    if (b.m > a.m) {
        GlLse<T> t = a;
        a = b;
        b = t;
    }
    if (b.m == -GL_INF) {  // b summed nothing, or only NaN: keep the NaN
        if (b.rest != b.rest) a.rest = b.rest;
        return a;
    }
    a.rest = a.rest + (b.rest + T(1)) * gl_exp(b.m - a.m);
    return a;
}

// the row's statistics once every value is in: a +inf logit makes the row NaN (inf - inf),
// as the max-shifted formula does on the CPU
template <typename T>
GL_FN GlLse<T> gl_lse_finish(GlLse<T> a) {
    if (a.m == GL_INF) a.rest = GL_NAN;
    return a;
}

// log of the row's sum of exp(z - m); the loss keeps m apart so that, for rows of huge
// logits, lse - z = (m - z) + log_s loses nothing to rounding
template <typename T>
GL_FN T gl_lse_log_sum(GlLse<T> a) {
    return gl_log1p(a.rest);
}

// one class's share of the loss: c_k (-log p_k) = c_k ((m - z_k) + log_s)
template <typename T>
GL_FN T gl_xent_term(T z, T m, T log_s, T c) {
    // a class that carries no weight adds 0 -- or NaN when the row holds a NaN (log_s is NaN
    // then), so a NaN is never dropped; a -inf (masked) logit adds exactly 0
    return c == T(0) ? T(0) * log_s : c * ((m - z) + log_s);
}

// the gradient d/dz_k of sum_j c_j (-log p_j) = softmax_k sum_j c_j - c_k, written as
// p_k (c_sum - c_k) - c_k (1 - p_k) with 1 - p_k = (-expm1(z_k - m) + rest) / (1 + rest):
// no cancellation where p_k is close to 1 (a confident, correct prediction)
template <typename T>
GL_FN T gl_xent_grad(T z, T m, T rest, T c_sum, T c) {
    T d = z - m;
    T inv = T(1) / (T(1) + rest);
    T p = gl_exp(d) * inv;
    T one_minus_p = (rest - gl_expm1(d)) * inv;
    return p * (c_sum - c) - c * one_minus_p;
}

// coefficient of class k for integer labels, PyTorch's label smoothing with class weights:
// c_k = (1 - s) cw[y] [k == y] + s / K cw_k
template <typename T>
GL_FN T gl_label_coef(bool is_label, T cw_label, T cw_k, T s, T inv_k) {
    T own = is_label ? (T(1) - s) * cw_label : T(0);
    return s == T(0) ? own : own + s * inv_k * cw_k;  // unsmoothed: cw_k is not used at all
}

// ---- cce on probabilities, evaluated at p' = clip(p, lo, hi) ---------------------------------
// c_k (-log p'_k) and its derivative -c_k / p'_k
template <typename T>
GL_FN T gl_cce_term(T p, T c, T lo, T hi, T* dl_dp) {
    T pc = gl_clip(p, lo, hi);
    *dl_dp = -c / pc;
    T lp = gl_log(pc);  // finite for every clipped p'; NaN only for a NaN p
    return c == T(0) ? T(0) * lp : -c * lp;
}

// ---- the row functors: one class's term of a sample's loss, and its derivative --------------
// What the row kernel has gathered about a row before the terms (pass 1, and the extra pass):
template <typename T>
struct GlRow {
    GlLse<T> lse;        // log-sum-exp of F::logit(z) over the row (F::logits)
    T log_s;             // log of its sum of exp(. - m): lse = m + log_s
    GlLse<T> tlse;       // the same of F::logit(target) (when F::target_lse says so)
    T tlog_s;
    T c_sum;             // the row's sum of the coefficients c
    T cw_label;          // class indices: the label's class weight (1 without); else 1
    long long label;     // class indices: the label; else -1
    T z_label;           // F::runner_up: the label's value,
    T runner;            // the largest other value (-inf when there is none)
    long long runner_k;  // and its first class (-1 when there is none)
    T extra[2];          // F::extra_passes: the row's sums of F::extra_term, pass by pass
};

// (v, k) merged with (ov, ok): the larger value, the first class among equal ones; k = -1 is
// "no class" and gives way to any class
template <typename T>
GL_FN void gl_argmax_merge(T* v, long long* k, T ov, long long ok) {
    if (ok < 0) return;
    if (*k < 0 || ov > *v || (ov == *v && ok < *k)) {
        *v = ov;
        *k = ok;
    }
}

// The hooks a row functor may override (the kernel reads them; the defaults gather nothing):
struct GlRowDefaults {
    enum { logits = 0, runner_up = 0, loads = 0 };
    // F::loads: a class's prediction z enters the row as load(z), the value that every
    // statistic, extra pass and term sees (and the one the register cache keeps), and the
    // gradient, taken with respect to it, is multiplied by d load / dz; load_grad gives both,
    // its value bit for bit load's (a row read twice computes it once per pass). The kernel
    // calls neither where loads is 0: the other functors' code does not change.
    template <typename T>
    GL_FN static T load(T z, const T* a) { return z; }
    template <typename T>
    GL_FN static T load_grad(T z, const T* a, T* dz) {
        *dz = T(1);
        return z;
    }
    // the value the row's log-sum-exp is taken of (logits), and the target's
    template <typename T>
    GL_FN static T logit(T x, const T* a) { return x; }
    template <typename T>
    GL_FN static bool target_lse(const T* a) { return false; }
    // up to two extra passes over the row, after pass 1, each summing extra_term into
    // extra[pass]; a pass sees the sums of the passes before it (uniform over a launch)
    template <typename T>
    GL_FN static int extra_passes(const T* a) { return 0; }
    template <typename T>
    GL_FN static T extra_term(T z, T c, const GlRow<T>& r, const T* a, int pass) {
        return T(0);
    }
    // a share of the sample's loss that belongs to the row, not to a class
    template <typename T>
    GL_FN static T row_term(const GlRow<T>& r, const T* a) { return T(0); }
};

// z: the class's prediction, c: its coefficient, k: its class, r: the row's statistics,
// a: the loss's scalar parameters
struct GlCce : GlRowDefaults {  // on probabilities; a = {lo, hi}
    template <typename T>
    GL_FN static T term(T z, T c, long long k, const GlRow<T>& r, const T* a, T* g) {
        return gl_cce_term(z, c, a[0], a[1], g);
    }
};

// Gemma 2's soft-capping of a logit, z' = c tanh(z / c), and with GRAD its derivative
// sech^2(z / c) in *dz, both from s = exp(-2|x|), x = z / c: tanh|x| = -expm1(-2|x|) / (1 + s)
// keeps its digits near 0, and sech^2 x = 4 s / (1 + s)^2 keeps them where tanh is near 1
// (1 - tanh^2 would cancel to 0); the same steps as the CPU backend. NaN stays NaN; +-inf gives
// +-c and 0. Every rounding is explicit (nothing contracts into a fused multiply-add), so that z'
// has the same bits wherever it is computed: with or without GRAD, in every pass of a row.
template <typename T, bool GRAD>
GL_FN T gl_softcap(T z, T c, T* dz) {
    T x = z / c;
    T m2 = gl_mul_rn(gl_abs(x), T(-2));  // -2|x|, exact
    T s = gl_exp(m2);
    T d = gl_add_rn(T(1), s);
    if (GRAD) *dz = (s / gl_mul_rn(d, d)) * T(4);
    return gl_mul_rn(gl_copysign(-(gl_expm1(m2) / d), x), c);
}

// softmax cross-entropy; a = {focal gamma, z_loss, softcap}. OPTS (compile-time switches):
// GL_FOCAL where gamma > 0, GL_Z_LOSS where z_loss > 0, GL_SOFTCAP where a softcap c is given
// (every logit z is c tanh(z / c) before anything else, see load); GlCceLogits<0>, plain
// cross-entropy, is the terms of gl_xent_term / gl_xent_grad alone.
//  focal (Keras' CategoricalFocalCrossentropy): c_k M_k (-log q_k), M_k = (1 - q_k)^gamma from
//    the log domain; d/dz_j = h_j - q_j sum_k h_k with h_k = -c_k M_k (1 + gamma q_k (-log q_k)
//    / (1 - q_k)), where (-log q)/(1 - q) -> 1 as q -> 1 and q (-log q) -> 0 as q -> 0;
//    sum_k h_k comes from the extra pass.
//  z_loss (PaLM): the row gains z lse^2 cw_label, its derivative 2 z lse q_k cw_label.
template <typename T>
GL_FN T gl_focal_h(T c, T q, T one_minus_q, T nlq, T m_k, T gamma) {
    if (c == T(0)) return T(0);
    T ratio = one_minus_q > T(0) ? nlq / one_minus_q : T(1);
    T qr = q > T(0) ? q * ratio : T(0);
    return -c * m_k * (T(1) + gamma * qr);
}

#define GL_Z_LOSS 2
#define GL_SOFTCAP 4
template <int OPTS>
struct GlCceLogits : GlRowDefaults {
    enum { logits = 1, focal = (OPTS & GL_FOCAL) != 0, z_loss = (OPTS & GL_Z_LOSS) != 0,
           loads = (OPTS & GL_SOFTCAP) != 0 };
    // the capped logit, and with it the cap's derivative (softcap; the identity without)
    template <typename T>
    GL_FN static T load(T z, const T* a) {
        return loads ? gl_softcap<T, false>(z, a[2], (T*)0) : z;
    }
    template <typename T>
    GL_FN static T load_grad(T z, const T* a, T* dz) {
        if (loads) return gl_softcap<T, true>(z, a[2], dz);
        *dz = T(1);
        return z;
    }
    template <typename T>
    GL_FN static int extra_passes(const T* a) { return focal ? 1 : 0; }
    // h_k of the focal gradient
    template <typename T>
    GL_FN static T extra_term(T z, T c, const GlRow<T>& r, const T* a, int pass) {
        T d = z - r.lse.m;
        T inv = T(1) / (T(1) + r.lse.rest);
        T one_minus_q = (r.lse.rest - gl_expm1(d)) * inv;
        T nlq = -d + r.log_s;
        T m_k = gl_exp(gl_log(one_minus_q) * a[0]);
        return gl_focal_h(c, gl_exp(d) * inv, one_minus_q, nlq, m_k, a[0]);
    }
    template <typename T>
    GL_FN static T term(T z, T c, long long k, const GlRow<T>& r, const T* a, T* g) {
        T l;
        if (!focal) {
            *g = gl_xent_grad(z, r.lse.m, r.lse.rest, r.c_sum, c);
            l = gl_xent_term(z, r.lse.m, r.log_s, c);
        } else {
            T d = z - r.lse.m;
            T inv = T(1) / (T(1) + r.lse.rest);
            T q = gl_exp(d) * inv;
            T one_minus_q = (r.lse.rest - gl_expm1(d)) * inv;
            T nlq = -d + r.log_s;
            T m_k = gl_exp(gl_log(one_minus_q) * a[0]);
            *g = gl_focal_h(c, q, one_minus_q, nlq, m_k, a[0]) - q * r.extra[0];
            l = c == T(0) ? T(0) * r.log_s : c * m_k * nlq;
        }
        if (z_loss) {  // the small factors first: inf only where the term overflows
            T q = gl_exp(z - r.lse.m) / (T(1) + r.lse.rest);
            *g = *g + ((a[1] * r.cw_label * q) * (r.lse.m + r.log_s)) * T(2);
        }
        return l;
    }
    template <typename T>
    GL_FN static T row_term(const GlRow<T>& r, const T* a) {
        if (!z_loss) return T(0);
        T lse = r.lse.m + r.log_s;
        return ((a[1] * r.cw_label) * lse) * lse;  // a label of weight 0: 0, even where lse^2
                                                    // overflows
    }
};

// nll on log-probabilities: -c z, derivative -c; a class with no weight adds 0, even at -inf
struct GlNll : GlRowDefaults {
    template <typename T>
    GL_FN static T term(T z, T c, long long k, const GlRow<T>& r, const T* a, T* g) {
        *g = -c;
        return c == T(0) ? (z != z ? z : T(0)) : -c * z;
    }
};
// kl_div: c is the target, t = c or, with a = {log_target}, exp(c); t (log t - z), 0 log 0 = 0;
// derivative -t
struct GlKlDiv : GlRowDefaults {
    template <typename T>
    GL_FN static T term(T z, T c, long long k, const GlRow<T>& r, const T* a, T* g) {
        T t = a[0] != T(0) ? gl_exp(c) : c;
        T log_t = a[0] != T(0) ? c : gl_log(c);
        *g = -t;
        return t == T(0) ? (z != z ? z : T(0)) : t * (log_t - z);
    }
};
// t T^2 (expm1(x) - x) and t T expm1(x) for x = d / T and the teacher's probability t (log_t
// its log): where |x| < 1/2 as t d^2 times the series 1/2 + x/6 + x^2/24 + ... (no
// cancellation near 0) and t d expm1(x) / x; beyond it from t e^x = exp(log t + x) (no
// underflow of t hides a large e^x; at most a few ulps of cancellation); never T^2 alone
template <typename T>
GL_FN T gl_kl_series(T x) {  // (expm1(x) - x) / x^2 for |x| < 1/2
    const T c[15] = {T(4.7794773323873853e-14), T(7.6471637318198164e-13),
                     T(1.1470745597729725e-11), T(1.6059043836821613e-10),
                     T(2.08767569878681e-09),   T(2.505210838544172e-08),
                     T(2.7557319223985888e-07), T(2.7557319223985893e-06),
                     T(2.4801587301587302e-05), T(0.00019841269841269841),
                     T(0.0013888888888888889),  T(0.0083333333333333332),
                     T(0.041666666666666664),   T(0.16666666666666666), T(0.5)};  // 1/16!..1/2!
    T series = c[0];
    for (int i = 1; i < 15; ++i) series = series * x + c[i];
    return series;
}
template <typename T>
GL_FN T gl_kl_t2_em(T t, T log_t, T d, T temp) {
    T x = d / temp;
    if (gl_abs(x) < T(0.5)) return t == T(0) ? T(0) : t * ((d * d) * gl_kl_series(x));
    return temp * (temp * ((gl_exp(log_t + x) - t) - t * x));  // NaN falls here
}
template <typename T>
GL_FN T gl_kl_t_expm1(T t, T log_t, T d, T temp) {
    T x = d / temp;
    if (gl_abs(x) < T(0.5)) return t * (x == T(0) ? d : d * (gl_expm1(x) / x));
    return temp * (gl_exp(log_t + x) - t);
}

// kl_div_with_logits, a = {temperature T, target holds logits}: q = softmax(z / T), t the
// target or softmax(target / T); T^2 t (log t - log q), 0 log 0 = 0; derivative
// T (q sum_j t_j - t) (sum_j t_j = 1 for target logits). log q and log t come from the rows'
// log-sum-exps, never from a log of a rounded probability.
// With teacher logits the loss is computed so that its relative error does not grow with T:
// KL does not change when the logit difference u = z - target moves by a constant, so with
// s = sum_k t_k u_k (extra pass 0) and d = u - s, x = d / T,
//   T^2 KL = T^2 log1p(X),  X = sum_k t_k (expm1(x_k) - x_k) >= 0 term by term,
// Y = T^2 X from gl_kl_t2_em (extra pass 1), and T (q - t) = t (T expm1(x) - Y / T) / (1 + X). Where that overflows (a tiny T with far-apart logits, when the loss is large and the
// direct form is accurate) or a row holds NaN or infinities, the direct form is used.
// OPTS (compile-time switch): GL_TEACHER_LOGITS where the target holds logits (a[1] = 1).
#define GL_TEACHER_LOGITS 1
template <int OPTS>
struct GlKlDivLogits : GlRowDefaults {
    enum { logits = 1, teacher_logits = (OPTS & GL_TEACHER_LOGITS) != 0 };
    template <typename T>
    GL_FN static T logit(T x, const T* a) { return x / a[0]; }
    template <typename T>
    GL_FN static bool target_lse(const T* a) { return teacher_logits; }
    template <typename T>
    GL_FN static int extra_passes(const T* a) { return teacher_logits ? 2 : 0; }
    template <typename T>
    GL_FN static T teacher(T c, const GlRow<T>& r, const T* a) {
        return gl_exp(c / a[0] - r.tlse.m) / (T(1) + r.tlse.rest);
    }
    template <typename T>
    GL_FN static T log_teacher(T c, const GlRow<T>& r, const T* a) {
        return (c / a[0] - r.tlse.m) - r.tlog_s;
    }
    template <typename T>
    GL_FN static T extra_term(T z, T c, const GlRow<T>& r, const T* a, int pass) {
        T t = teacher(c, r, a);
        if (pass == 0) return t * (z - c);
        return gl_kl_t2_em(t, log_teacher(c, r, a), (z - c) - r.extra[0], a[0]);
    }
    // X of the shifted form, or -1 where the direct form is used
    template <typename T>
    GL_FN static T shifted_x(const GlRow<T>& r, const T* a) {
        if (!teacher_logits) return T(-1);
        T y = r.extra[1], x = y / a[0] / a[0];
        bool ok = y - y == T(0) && x - x == T(0) && r.lse.rest == r.lse.rest &&
                  r.tlse.rest == r.tlse.rest;  // finite, and no NaN or +inf logit
        return ok ? x : T(-1);
    }
    template <typename T>
    GL_FN static T term(T z, T c, long long k, const GlRow<T>& r, const T* a, T* g) {
        T X = shifted_x(r, a);
        if (X >= T(0)) {  // the loss is the row's (row_term)
            T t = teacher(c, r, a);
            T te = gl_kl_t_expm1(t, log_teacher(c, r, a), (z - c) - r.extra[0], a[0]);
            *g = (te - t * (r.extra[1] / a[0])) / (T(1) + X);
            return T(0);
        }
        T d = z / a[0] - r.lse.m;
        T q = gl_exp(d) / (T(1) + r.lse.rest);
        T log_q = d - r.log_s;
        T t, log_t, t_sum;
        if (teacher_logits) {
            log_t = (c / a[0] - r.tlse.m) - r.tlog_s;
            t = gl_exp(c / a[0] - r.tlse.m) / (T(1) + r.tlse.rest);
            t_sum = T(1);
        } else {
            t = c;
            log_t = gl_log(c);
            t_sum = r.c_sum;
        }
        *g = a[0] * (q * t_sum - t);
        return t == T(0) ? (log_q != log_q ? log_q : T(0)) : a[0] * a[0] * (t * (log_t - log_q));
    }
    template <typename T>
    GL_FN static T row_term(const GlRow<T>& r, const T* a) {
        T X = shifted_x(r, a), y = r.extra[1];
        if (X < T(0)) return T(0);
        return X > T(0) ? y * (gl_log1p(X) / X) : y;
    }
};
// multiclass_hinge (Crammer-Singer), class indices, a = {margin}: the row's loss is
// cw_label max(0, margin + runner - z_label); where it is > 0 the derivative is +cw_label at the
// runner-up's first class and -cw_label at the label. Whether it is > 0 is decided on
// margin + runner and z_label (their difference may be subnormal: 0 under flush-to-zero).
// A row of one class has nothing to beat: 0 (NaN for a NaN score).
struct GlMulticlassHinge : GlRowDefaults {
    enum { runner_up = 1 };
    template <typename T>
    GL_FN static T margin(const GlRow<T>& r, const T* a) {
        if (r.runner_k < 0) return r.z_label != r.z_label ? r.z_label : -GL_INF;
        return (a[0] + r.runner) - r.z_label;
    }
    template <typename T>
    GL_FN static bool active(const GlRow<T>& r, const T* a) {
        return r.runner_k >= 0 && a[0] + r.runner > r.z_label;
    }
    template <typename T>
    GL_FN static T term(T z, T c, long long k, const GlRow<T>& r, const T* a, T* g) {
        T s = active(r, a) ? r.cw_label : T(0);
        *g = k == r.label ? -s : (k == r.runner_k ? s : T(0));
        return T(0);
    }
    template <typename T>
    GL_FN static T row_term(const GlRow<T>& r, const T* a) {
        T m = margin(r, a);
        return r.cw_label * (active(r, a) ? m : (m != m ? m : T(0)));
    }
};

// ---- float16 storage, computed in float (IEEE binary16, round to nearest even) --------------
GL_FN float gl_half_to_float(unsigned short h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int exponent = (h >> 10) & 0x1fu;
    unsigned int mantissa = h & 0x3ffu;
    unsigned int bits;
    if (exponent == 0x1fu) {  // inf, NaN
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {  // normal
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {  // zero
        bits = sign;
    } else {  // subnormal: normalise
        exponent = 113u;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            exponent -= 1;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

GL_FN unsigned short gl_float_to_half(float f) {
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned int bits;
    memcpy(&bits, &f, sizeof bits);
    unsigned int sign = (bits >> 16) & 0x8000u;
    unsigned int abs_bits = bits & 0x7fffffffu;
    if (abs_bits >= 0x7f800000u) {  // inf, NaN (keep NaN a NaN)
        return (unsigned short)(sign | 0x7c00u | (abs_bits > 0x7f800000u ? 0x200u : 0u));
    }
    if (abs_bits >= 0x477ff000u) {  // rounds to >= 65520: overflow to inf
        return (unsigned short)(sign | 0x7c00u);
    }
    if (abs_bits < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        if (abs_bits < 0x33000000u) return (unsigned short)sign;  // < 2^-25 rounds to 0
        unsigned int e = abs_bits >> 23;
        unsigned int m = (abs_bits & 0x7fffffu) | 0x800000u;
        unsigned int shift = 126u - e;  // half subnormal = m * 2^(e - 126) in units of 2^-24
        unsigned int half_m = m >> shift;
        unsigned int rest = m & ((1u << shift) - 1u);
        unsigned int halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (half_m & 1u))) half_m += 1u;
        return (unsigned short)(sign | half_m);
    }
    unsigned int h = ((abs_bits - 0x38000000u) >> 13);  // rebias exponent 127 -> 15
    unsigned int rest = abs_bits & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h += 1u;
    return (unsigned short)(sign | h);
#endif
}

// ---- bfloat16 storage, computed in float (a bfloat16 is the top half of a float32) ---------
// The same integer code runs on the device and in the host tests, so that what the emulator
// checks is what the GPU does. A load is exact. A store rounds to nearest even (overflow
// rounds to infinity) and writes NaN as the quiet NaN of its sign, as ml_dtypes does. Being
// integer operations, neither flushes subnormals (the arithmetic in between does).
struct gl_bf16 {
    unsigned short bits;
};
GL_FN float gl_bf16_to_float(unsigned short b) { return gl_bits_float((unsigned int)b << 16); }
GL_FN unsigned short gl_float_to_bf16(float f) {
    unsigned int u = gl_float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN
        return (unsigned short)(((u >> 16) & 0x8000u) | 0x7fc0u);
    }
    unsigned int odd = (u >> 16) & 1u;  // ties go to the even neighbour
    return (unsigned short)((u + 0x7fffu + odd) >> 16);
}
