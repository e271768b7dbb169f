// simd.h: eight floats as one value (GCC/Clang vector extensions).
//
// The compiler maps vec8 onto AVX when the target has it and onto two SSE registers otherwise;
// either way every lane rounds exactly like scalar code, so results do not depend on the ISA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__FMA__)
#include <immintrin.h>
#endif

namespace dynseg {

typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));

inline vec8 splat8(float x) { return vec8{x, x, x, x, x, x, x, x}; }
// For loads and stores at any float address. GCC and Clang let a float vector access float data,
// and (unlike memcpy) such an access cannot alias the int arrays and pointers around it, so the
// compiler keeps those in registers.
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4)));
inline vec8 load8(const float* p) { return *reinterpret_cast<const vec8_unaligned*>(p); }
inline void store8(float* p, vec8 v) { *reinterpret_cast<vec8_unaligned*>(p) = v; }

// out[k][i] = rows[i][k]: eight rows of eight lanes to eight columns.
inline void transpose8(const vec8* r, vec8* out) {
    vec8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int h = 0; h < 8; h += 4) {  // rows 0-3, then rows 4-7
        u[h] = __builtin_shufflevector(t[h], t[h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[h + 1] = __builtin_shufflevector(t[h], t[h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[h + 2] = __builtin_shufflevector(t[h + 1], t[h + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[h + 3] = __builtin_shufflevector(t[h + 1], t[h + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int k = 0; k < 4; ++k) {
        out[k] = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        out[k + 4] = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

// a·b + c rounded once: one instruction where the CPU has FMA, the exact libm fma per lane where it
// has not (slower, same bits). Only the exp polynomial uses it; the filters keep densecrf's separate
// multiply and add, because near-ties between labels amplify any change of rounding over the
// iterations (measured: FMA in the filters moved Q on a photo by 1e-5 instead of 3e-6).
inline vec8 fmadd(vec8 a, vec8 b, vec8 c) {
#if defined(__FMA__)
    return (vec8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    vec8 r;
    for (int i = 0; i < 8; ++i) r[i] = std::fma(a[i], b[i], c[i]);
    return r;
#endif
}

// exp for x <= 0 (softmax after subtracting the max), within about one ulp where it matters.
// x = n·ln2 + r with r in [-ln2/2, ln2/2], a degree-6 Taylor polynomial for e^r (truncation 1e-7),
// then 2^n through the exponent bits. The one-constant reduction loses accuracy only for
// e^x < 2^-24, which a probability never notices. Below -87, where 2^n would leave the normal floats,
// the result is 0: float32's exp is denormal or 0 there, and a floor of e^-87 = 1.6e-38 would hand a
// caller taking log(Q) -87 for a label far below the others.
inline vec8 exp_nonpositive(vec8 x) {
    const vec8 given = x;
    x = x < splat8(-87.0f) ? splat8(-87.0f) : x;  // keeps 2^n a normal float
    const vec8 shifter = splat8(12582912.0f);      // 1.5 · 2^23: adding it rounds to an integer
    // A NaN x (the logits of an overflowed problem, which the call then reports) takes n from -87: converting
    // NaN to int is undefined; r keeps the NaN, so the result is NaN all the same.
    const vec8 finite_x = x >= splat8(-87.0f) ? x : splat8(-87.0f);
    const vec8 n = (finite_x * splat8(1.44269504088896341f) + shifter) - shifter;
    const vec8 r = fmadd(n, splat8(-0.693147180559945f), x);
    vec8 p = splat8(1.0f / 720.0f);
    p = fmadd(p, r, splat8(1.0f / 120.0f));
    p = fmadd(p, r, splat8(1.0f / 24.0f));
    p = fmadd(p, r, splat8(1.0f / 6.0f));
    p = fmadd(p, r, splat8(0.5f));
    p = fmadd(p, r, splat8(1.0f));
    p = fmadd(p, r, splat8(1.0f));
    const ivec8 bits = (__builtin_convertvector(n, ivec8) + 127) << 23;
    vec8 scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return given < splat8(-87.0f) ? splat8(0.0f) : p * scale;  // NaN compares false: it stays NaN
}

// Horizontal sum and max by halving, in a fixed order: the same bits on every ISA.
inline float sum8(vec8 v) {
    v = v + __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v = v + __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v = v + __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
}
inline vec8 max8(vec8 a, vec8 b) { return a > b ? a : b; }
inline float max8(vec8 v) {
    v = max8(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3));
    v = max8(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5));
    v = max8(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6));
    return v[0];
}

}  // namespace dynseg
