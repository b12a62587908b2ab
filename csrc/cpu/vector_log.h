// The natural logarithm on GCC vectors of floats, for the entropy of attention rows (stats_cpu.cpp). Written on
// vector types and always inlined for the reason exp_nonpositive in mad_qk_cpu.cpp gives: GCC leaves scalar math
// unvectorised inside the per-CPU clones. Free of ATen so that tests/cpp/log_check.cpp checks it against std::log.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace vitmad {

// x = 2^exponent * m with m in [sqrt(1/2), sqrt(2)), lane by lane, for normal x > 0, by integer arithmetic on the
// bits (no compare or blend); other lanes give some finite m and exponent.
template <typename V, typename VI>
__attribute__((always_inline)) inline void exponent_and_mantissa(const V& x, VI& exponent, V& m) {
  typedef uint32_t VU __attribute__((vector_size(sizeof(V))));
  constexpr uint32_t kSqrtHalfBits = 0x3f3504f3;  // the bits of sqrt(1/2)
  VU bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  // Unsigned, so that the negative lanes (garbage anyway) wrap instead of overflowing; the shift is arithmetic.
  const VU shifted = bits - kSqrtHalfBits;
  VI shifted_signed;
  __builtin_memcpy(&shifted_signed, &shifted, sizeof(shifted_signed));
  exponent = shifted_signed >> 23;
  const VU mantissa_bits = (shifted & 0x007fffffu) + kSqrtHalfBits;
  __builtin_memcpy(&m, &mantissa_bits, sizeof(m));
}

// ln x lane by lane for finite x > 0, normal or denormal; any other lane gives some finite value, never NaN, so
// that callers mask the special cases they care about with one select. Cephes' logf, about 1 ulp: x = 2^e * m
// (exponent_and_mantissa), then ln(1 + f) = f + f^2 (f P(f) - 1/2) for f = m - 1 (exact) and P Cephes' degree-8
// polynomial, plus e ln 2 (ln 2 rounded to float is within 3e-9 relative, far below an ulp of the result for any
// e != 0, so it is not split).
template <typename V>
__attribute__((always_inline)) inline void log_finite_positive(const V& x, V& result) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  constexpr float kTwoTo25 = 33554432.0f;
  // A denormal is scaled into the normal range first: its exponent field says nothing of its size.
  const VI denormal = x < std::numeric_limits<float>::min();
  VI exponent;
  V m;
  exponent_and_mantissa(denormal ? x * kTwoTo25 : x, exponent, m);
  exponent += denormal & -25;
  const V f = m - 1.0f;
  const V z = f * f;
  // P by Estrin's scheme, not Horner's: four independent pairs, then powers of z, 4 multiply-adds deep instead of
  // 8. The logarithms' dependency chains limit an entropy loop (the out-of-order window holds about two iterations
  // of four logarithms each): 6% less time for one over [768, 197, 197] float32 on an AMD EPYC (Zen 3).
  const V z2 = z * z;
  const V p01 = 7.0376836292e-2f * f - 1.1514610310e-1f;
  const V p23 = 1.1676998740e-1f * f - 1.2420140846e-1f;
  const V p45 = 1.4249322787e-1f * f - 1.6668057665e-1f;
  const V p67 = 2.0000714765e-1f * f - 2.4999993993e-1f;
  const V p = ((p01 * z + p23) * z2 + (p45 * z + p67)) * f + 3.3333331174e-1f;
  const V log_m = (p * f - 0.5f) * z + f;
  result = __builtin_convertvector(exponent, V) * 0.693147180559945309f + log_m;
}

// ln x with the special cases of std::log: -inf at 0, +inf at +inf, NaN below 0 and at NaN.
template <typename V>
__attribute__((always_inline)) inline void log_lanes(const V& x, V& result) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  V finite;
  log_finite_positive(x, finite);
  finite = x == kInf ? x : finite;
  finite = x == 0.0f ? V{} - kInf : finite;
  result = x >= 0.0f ? finite : V{} + std::numeric_limits<float>::quiet_NaN();
}

// x ln x lane by lane, 0 at x = 0 (the limit, as entropy takes it; exactly 0, possibly -0), +inf at +inf, NaN at
// NaN; a negative lane gives a finite value: callers that care check the sign once per row, not per element. (An
// out-parameter, as load_lanes in mad_cpu_common.h: a 32-byte vector returned from a function of the baseline clone
// draws GCC's ABI warning, though every call is inlined.)
template <typename V>
__attribute__((always_inline)) inline void x_log_x_unsigned(const V& x, V& result) {
  V log_x;
  log_finite_positive(x, log_x);  // finite everywhere: 0 * it is 0, inf * it is inf, NaN * it is NaN
  result = x * log_x;
}

// sum += x ln x lane by lane the fast way, for the entropy loops (mad_cpu_common.h's XLogXLanes); top_bits keeps
// the largest bit pattern seen, read as unsigned. Such a loop is bound by the logarithms' arithmetic, not by
// memory; against x_log_x_unsigned and an add it takes a quarter off the time of an entropy with MAD over
// [64, 12, 197, 197] float32 (AMD EPYC, Zen 3, one core), each term staying within 2 ulp of x ln x (log_check
// sweeps the floats):
// - ln(1 + f) = f + f^2 (f P(f) - 1/2) with a degree-6 P (a minimax fit of the relative error over Cephes' range
//   of f, 3e-8 in exact arithmetic, 1e-7 evaluated in float) instead of Cephes' degree 8;
// - x ln x is added to the sum by one multiply-add;
// - no special case is checked per element. Denormal x (below 2^-126) are not scaled: their exponent field reads
//   as 2^-127 or 2^-126, so the term is off by at most 16 x < 2e-37 in absolute value, far below a float ulp of
//   any entropy above 1e-30. What needs care is at or above kXLogXFastLimitBits in top_bits (+inf, NaN, any value
//   with the sign bit, -0 included), and the caller then sums that row again with x_log_x_unsigned and its checks.
// Measured and left out (Xeon, Sapphire Rapids, 2026-12-03; the entropy's cost beyond `mad` over [1, 12, 197, 197]
// float32, alternating processes, 0.34-0.49 ns per value for this loop as it is):
// - a table logarithm on AVX-512 (vgetexpps / vgetmantps, 32 intervals of m from two vpermt2ps, Tang's table, a
//   degree-4 polynomial; 15 instructions per 16 values against about 20 here, 2.1 ulp per term): a third quicker
//   in a standalone loop, 0.31-0.63 ns per value in `stats`;
// - this loop software-pipelined (the next vector's split and f-only terms before this vector's P, sum and max):
//   0.34-0.45 ns per value.
// Neither is clearly quicker in place, so the bound there is not the instruction count alone. Tried again on
// 2026-12-05 (same machine): an accurate-table version (m in [0.75, 1.5) from vgetmantps, Gal's table so that the
// table adds no rounding, a degree-5 polynomial, 15 instructions per 16 values, every term within 1.83 ulp over all
// floats) took 0.146 against this loop's 0.207 ns per value in L1, yet in `stats` over [64, 12, 197, 197] the
// entropy's share stayed 3.5-3.8 ms against 3.7-4.5 ms (of 8.3-8.8 ms for `mad`), also with a second prefetch 12 KB
// ahead into L2: left out again. The table loop with
// x * x in place of the logarithm made `stats` 1.12-1.13x `mad` over [64, 12, 197, 197] (1.64-1.79x with it): the
// logarithm is the cost, and the loop around it is already at the edge of stats' 1.1x target.
constexpr uint32_t kXLogXFastLimitBits = 0x7f800000;  // the bits of +inf

template <typename V, typename VU>
__attribute__((always_inline)) inline void add_x_log_x_fast(const V& x, V& sum, VU& top_bits) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  VI exponent;
  V m;
  exponent_and_mantissa(x, exponent, m);
  const V f = m - 1.0f;
  const V z = f * f;
  const V z2 = z * z;
  // P(f) = (c0 + c1 f) + (c2 + c3 f) z + ((c4 + c5 f) + c6 z) z^2, Estrin's scheme as in log_finite_positive.
  const V c01 = -2.5001335144e-1f * f + 3.3333909512e-1f;
  const V c23 = -1.6577619314e-1f * f + 1.9963072240e-1f;
  const V c45 = -1.4267168939e-1f * f + 1.4914701879e-1f;
  const V p = (c23 * z + c01) + (8.7002195418e-2f * z + c45) * z2;
  // ln m first, then e ln 2 added to it in one rounding, as log_finite_positive (adding ln m's small part to a
  // rounded e ln 2 + f instead costs a second rounding at the full size: 2.4 ulp).
  const V log_m = (p * f - 0.5f) * z + f;
  sum += x * (__builtin_convertvector(exponent, V) * 0.693147180559945309f + log_m);
  VU bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  top_bits = top_bits > bits ? top_bits : bits;
}

}  // namespace vitmad
