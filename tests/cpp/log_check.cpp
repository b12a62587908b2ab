// Checks csrc/cpu/vector_log.h against std::log on the host. Driven by tests/ops/test_stats_attn.py:
//   log_check    sweeps every 257th positive float and every edge case through log_lanes, x_log_x_unsigned and
//                add_x_log_x_fast, one lane position after another, prints "max_ulp <u> max_xlogx_ulp <v>
//                max_fast_ulp <w> fused <0|1>" and then "ok", or FAIL lines for results that are not allowed (a
//                wrong special value or flag, more than kAllowedUlp off).
// The sweep runs in the per-CPU clones the op library uses, so on this machine it checks the code the kernels run.
// Those clones of x86-64-v3 and up fuse the polynomials' multiply-adds (fused 1): at most 2 ulp. The baseline
// clone, for CPUs without FMA, rounds each product too: 2.3 ulp at most over this sweep, 2.5 allowed.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/vector_log.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define CHECK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CHECK_CPU_CLONES
#endif

namespace {

typedef float Lanes8 __attribute__((vector_size(32)));
typedef float Lanes4 __attribute__((vector_size(16)));

int failures = 0;

// Whether the clone that runs is one with fused multiply-adds (target_clones picks v4, then v3, then default).
const bool kFused = [] {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("x86-64-v3") != 0;
#else
  return true;
#endif
}();
const double kAllowedUlp = kFused ? 2.0 : 2.5;

// Distance of `got` from the float64 value `want` in ulps of float at want (0 when both are the same special).
double ulps(float got, double want) {
  if (std::isnan(want)) return std::isnan(got) ? 0.0 : INFINITY;
  // Beyond float's range (x ln x of the largest floats) the float result is the infinity.
  if (std::fabs(want) > std::numeric_limits<float>::max())
    return static_cast<double>(got) == std::copysign(INFINITY, want) ? 0.0 : INFINITY;
  if (want == 0.0) return got == 0.0f ? 0.0 : INFINITY;
  const float rounded = static_cast<float>(want);
  const double ulp = std::nextafter(std::fabs(rounded), INFINITY) - std::fabs(rounded);
  return std::fabs(static_cast<double>(got) - want) / ulp;
}

void expect(bool ok, const char* what, float x, float got) {
  if (!ok && failures++ < 20) std::printf("FAIL %s at x = %.9g (bits %08x): got %.9g\n", what, x,
                                          [&] { uint32_t b; std::memcpy(&b, &x, 4); return b; }(), got);
}

typedef uint32_t Bits8 __attribute__((vector_size(32)));

// add_x_log_x_fast's term for lane j against x ln x (`want`): its flag (top_bits at or above kXLogXFastLimitBits)
// exactly for inf, NaN and the sign bit; otherwise within `max_fast` ulp (returned) for normal x, within 2e-37
// absolutely for denormal x (their exponent is not corrected), exactly 0 at 0 and 1.
void check_fast(float v, double want, float term, uint32_t bits, double& max_fast) {
  const bool special = bits >= vitmad::kXLogXFastLimitBits;
  expect(special == (!(v >= 0.0f) || std::signbit(v) || std::isinf(v)), "fast flag", v, static_cast<float>(bits));
  if (special) return;
  if (v == 0.0f || v == 1.0f) {
    expect(term == 0.0f, "fast at 0 or 1", v, term);
  } else if (v < std::numeric_limits<float>::min()) {
    expect(std::fabs(static_cast<double>(term) - want) <= 2e-37, "fast denormal", v, term);
  } else {
    const double e = ulps(term, want);
    expect(e <= kAllowedUlp, "fast", v, term);
    if (std::isfinite(want) && e > max_fast) max_fast = e;
  }
}

// Evaluates log_lanes, x_log_x_unsigned and add_x_log_x_fast on `xs`, eight (and four) lanes at a time, lane by
// lane the same as a lone value; returns the largest ulp errors of the finite positive inputs.
CHECK_CPU_CLONES void check(const std::vector<float>& xs, double& max_log, double& max_xlogx, double& max_fast) {
  for (size_t i = 0; i < xs.size(); i += 8) {
    Lanes8 x{};
    for (size_t j = 0; j < 8 && i + j < xs.size(); ++j) x[j] = xs[i + j];
    Lanes8 fast{};
    Bits8 top_bits{};
    vitmad::add_x_log_x_fast(x, fast, top_bits);
    Lanes8 log_x;
    vitmad::log_lanes(x, log_x);
    Lanes8 xlogx;
    vitmad::x_log_x_unsigned(x, xlogx);
    Lanes4 half, half_log;
    for (int j = 0; j < 4; ++j) half[j] = x[(j + static_cast<int>(i / 8)) % 8];
    vitmad::log_lanes(half, half_log);
    for (size_t j = 0; j < 8 && i + j < xs.size(); ++j) {
      const float v = x[j];
      const double want = std::log(static_cast<double>(v));
      const double e = ulps(log_x[j], want);
      expect(e <= kAllowedUlp, "log", v, log_x[j]);
      if (std::isfinite(want) && e > max_log) max_log = e;
      if (v >= 0.0f || std::isnan(v)) {  // x_log_x_unsigned promises nothing below 0
        const double want_xlogx = v == 0.0f ? 0.0 : static_cast<double>(v) * want;
        const double ex = ulps(xlogx[j], want_xlogx);
        expect(ex <= kAllowedUlp, "x_log_x", v, xlogx[j]);
        if (std::isfinite(want_xlogx) && want_xlogx != 0.0 && ex > max_xlogx) max_xlogx = ex;
        check_fast(v, want_xlogx, fast[j], top_bits[j], max_fast);
      } else {
        check_fast(v, want, fast[j], top_bits[j], max_fast);
      }
    }
    for (int j = 0; j < 4; ++j) {
      const float v = half[j];
      const float lane = log_x[(j + static_cast<int>(i / 8)) % 8];
      expect(std::memcmp(&half_log[j], &lane, 4) == 0 || (std::isnan(half_log[j]) && std::isnan(lane)),
             "4 lanes differ from 8", v, half_log[j]);
    }
  }
}

}  // namespace

int main() {
  std::vector<float> xs;
  const float inf = std::numeric_limits<float>::infinity();
  for (float v : {0.0f, -0.0f, 1.0f, -1.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), std::nextafter(std::numeric_limits<float>::min(), 0.0f),
                  std::numeric_limits<float>::max(), std::nextafter(1.0f, 0.0f), std::nextafter(1.0f, 2.0f),
                  0.70710677f, 0.70710683f, 1.4142135f, 1.4142137f, 0.5f, 2.0f, 1e-30f, 1e-45f, -1e-30f, 1e-7f})
    xs.push_back(v);
  for (uint64_t bits = 1; bits < 0x7f800000u; bits += 257) {
    float v;
    const uint32_t b = static_cast<uint32_t>(bits);
    std::memcpy(&v, &b, 4);
    xs.push_back(v);
  }
  for (uint32_t b = 0x3f700000u; b < 0x3f880000u; ++b) {  // every float near 1, where ln x is near 0
    float v;
    std::memcpy(&v, &b, 4);
    xs.push_back(v);
  }
  double max_log = 0, max_xlogx = 0, max_fast = 0;
  check(xs, max_log, max_xlogx, max_fast);
  std::printf("max_ulp %.3f max_xlogx_ulp %.3f max_fast_ulp %.3f fused %d\n", max_log, max_xlogx, max_fast,
              kFused ? 1 : 0);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
