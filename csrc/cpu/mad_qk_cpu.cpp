// CPU kernels of vitmad::mad_qk and vitmad::mad_qk_pos: MAD of softmax(q @ k^T * scale + attn_bias) without
// the Nq x Nk attention; and of vitmad::stats_qk and vitmad::stats_qk_pos, which add entropy, prefix mass and self
// mass in the same pass.
//
// Flash-attention's recurrence with the value product replaced by distances: each task owns a block of queries
// of one matrix and walks the keys in blocks. A block of logits comes from one product q_block @ k_block^T with
// float32 (float64) accumulation (block_logits.h), then every query row updates its running max, its running
// normaliser over all keys (prefix tokens and keys without a position included) and its distance-weighted sum,
// both rescaled whenever the max grows. The grid form and the position form differ only in where the
// distances come from (GridDistances, PositionDistances). Memory beyond inputs and output: the per-query
// results, and per thread one matrix's packed keys (Nk x D, and their positions) and a few blocks.
//
// The statistics ops run the same loop with a compile-time switch (kStats, and kEntropy for the one statistic
// that costs an FMA per key), so mad_qk's instantiation is the code it was. Beside that state each row keeps the
// softmax terms of its keys without a position under their own max, the logit of its own token, and with
// kEntropy sum exp(s - max) * (s - max); the statistics come from these at the end (query_stats).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../mad_args.h"
#include "../stats_args.h"
#include "block_logits.h"
#include "grid_distances.h"
#include "mad_cpu_common.h"

namespace vitmad {
namespace {

// The argument below which exp_nonpositive gives exactly 0. An entropy term exp(x) * x takes x clamped there
// (clamp_exponent), so a masked key (x = -inf) adds 0 * finite = 0, not 0 * -inf = NaN. For double: std::exp is
// 0 below -746.
template <typename acc_t>
constexpr acc_t kExpLowest = acc_t(-87);
template <>
constexpr double kExpLowest<double> = -746.0;

// exp(x) for x <= 0, which is all the kernel needs: every argument is a logit minus a running max. Cephes'
// expf (range reduction to [-ln2/2, ln2/2], degree-6 polynomial, about 1 ulp), written branch-free so the
// loops calling it vectorise; arguments below float's normal range (and -inf, a masked key) give exactly 0.
// Always inlined: GCC does not inline a plain function into the per-CPU clones, which would leave the loops
// scalar.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  constexpr float kLowest = kExpLowest<float>;
  const float xc = std::max(x, kLowest);
  // Rounds x / ln2 to the nearest integer: adding 1.5 * 2^23 pushes the fraction out of the mantissa.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float two_to_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < kLowest ? 0.0f : y * two_to_n;
}

__attribute__((always_inline)) inline double exp_nonpositive(double x) { return std::exp(x); }

// exp_nonpositive on eight floats at once, the same operations lane by lane. Written on GCC vectors: GCC left the
// scalar one unvectorised inside the loop over a row's keys in the AVX2 clone (scalar FMAs, a third of mad_qk's
// time on an AMD EPYC), whatever the `omp simd`. (An out-parameter, as load_lanes: a 32-byte vector returned from
// a function of the baseline clone draws GCC's ABI warning, though every call is inlined.)
template <typename V>
__attribute__((always_inline)) inline void exp_nonpositive(const V& x, V& result) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  constexpr float kLowest = kExpLowest<float>;
  const V lowest = V{} + kLowest;
  const V xc = x < lowest ? lowest : x;  // NaN stays NaN, as with std::max(x, kLowest)
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const VI exponent = (__builtin_convertvector(n, VI) + 127) << 23;
  V two_to_n;
  __builtin_memcpy(&two_to_n, &exponent, sizeof(two_to_n));
  result = x < lowest ? V{} : y * two_to_n;
}

// exp(from - to) for the factor that moves sums taken under a max `from` to a larger max `to`: exactly what
// exp_nonpositive gives, without its polynomial in the two common cases, no keys yet (from = -inf: 0) and an
// unchanged max (1). Called once per row and key block, where a ViT-B row has only 197 keys to sum.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t rescale_factor(acc_t from, acc_t to) {
  if (from == -std::numeric_limits<acc_t>::infinity()) return 0;
  if (from == to) return 1;
  return exp_nonpositive(from - to);
}

// max(x, kExpLowest), NaN staying NaN: the logit difference an entropy term multiplies.
template <typename acc_t>
__attribute__((always_inline)) inline acc_t clamp_exponent(acc_t x) {
  return x < kExpLowest<acc_t> ? kExpLowest<acc_t> : x;
}

// The frames of a query and of a run of keys (NaN: a key without one), for the temporal distance |dt|. Computed
// in the key loop from the keys' packed frames (a few KB) rather than filled into a second block of distances
// like `dist`: with that block (another 128 KB per query block) the pass over VideoMAE-B's 1568 tokens took 1.4x
// the spatial one, computed here about 1.03x.
template <typename acc_t>
struct Frames {
  const acc_t* keys = nullptr;
  acc_t query = 0;
};

// |difference| of two frames, 0 where it is NaN (a key without a frame adds nothing): the sign bit cleared,
// then max(gap, 0), which x86's maxps turns into its second operand for a NaN first one (two instructions).
// (An out-parameter, as load_lanes: see exp_nonpositive.)
template <typename V>
__attribute__((always_inline)) inline void frame_gap(const V& difference, V& gap) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  VI bits;
  __builtin_memcpy(&bits, &difference, sizeof(bits));
  bits &= 0x7fffffff;
  __builtin_memcpy(&gap, &bits, sizeof(gap));
  gap = gap > 0 ? gap : V{};
}

// Sums of one vector of keys into the accumulators of exp_sums.
template <bool kEntropy, bool kTime, typename V>
__attribute__((always_inline)) inline void exp_sums_step(const V& l, const V& d, const V& f, const V& max,
                                                         const V& query_frame, V& m, V& w, V& h, V& t) {
  const V lowest = V{} + kExpLowest<float>;
  const V x = l - max;
  V p;
  exp_nonpositive(x, p);
  m += p;
  w += p * d;
  if constexpr (kEntropy) h += p * (x < lowest ? lowest : x);
  if constexpr (kTime) {
    V g;
    frame_gap(query_frame - f, g);
    t += p * g;
  }
}

// sum_j exp(logits[j] - max) and sum_j exp(logits[j] - max) * dist[j] over `count` keys; with kEntropy also
// sum_j exp(logits[j] - max) * (logits[j] - max), one more FMA per key, and with kTime
// sum_j exp(logits[j] - max) * |frames.query - frames.keys[j]| (0 for a key without a frame), the temporal
// distance's (each compiled in only where asked). V is the vector: 32 bytes on AVX2 CPUs, 64 on AVX-512 ones
// (online_softmax_update picks it). The last count % kVec keys go through one more vector whose other lanes hold
// -inf logits (weight 0), not a scalar loop: with 64-byte vectors the scalar tail was up to 31 keys a row, a fifth of
// the update's time over 8 x 16 x 577 x 64 (Xeon, AVX-512).
template <bool kEntropy, bool kTime, typename V>
__attribute__((always_inline)) inline void exp_sums(const float* logits, const float* dist, Frames<float> frames,
                                                    int64_t count, float max, float& mass, float& weighted,
                                                    float& entropy, float& time_weighted) {
  constexpr int64_t kVec = sizeof(V) / sizeof(float);
  // One entropy accumulator, not two: a sixth vector of sums spilled the mass sums to the stack (AVX2 has 16
  // registers), a store and reload in their dependency chain every iteration.
  V m0{}, m1{}, w0{}, w1{}, h{}, t{};
  const V query_frame = V{} + frames.query;
  const V max_lanes = V{} + max;
  V f0{}, f1{};
  int64_t j = 0;
  for (; j + 2 * kVec <= count; j += 2 * kVec) {
    V l0, l1, d0, d1;
    load_lanes(logits + j, l0);
    load_lanes(logits + j + kVec, l1);
    load_lanes(dist + j, d0);
    load_lanes(dist + j + kVec, d1);
    if constexpr (kTime) {
      load_lanes(frames.keys + j, f0);
      load_lanes(frames.keys + j + kVec, f1);
    }
    exp_sums_step<kEntropy, kTime>(l0, d0, f0, max_lanes, query_frame, m0, w0, h, t);
    exp_sums_step<kEntropy, kTime>(l1, d1, f1, max_lanes, query_frame, m1, w1, h, t);
  }
  for (; j < count; j += kVec) {
    V l, d;
    if (j + kVec <= count) {
      load_lanes(logits + j, l);
      load_lanes(dist + j, d);
      if constexpr (kTime) load_lanes(frames.keys + j, f0);
    } else if (count >= kVec) {
      // The last kVec keys, the lanes already summed (below j) masked to -inf: loads, not a copy (GCC made the
      // copy a memcpy call, after which every constant of the loop was reloaded: 5% of the update's time).
      const int64_t start = count - kVec;
      load_lanes(logits + start, l);
      load_lanes(dist + start, d);
      if constexpr (kTime) load_lanes(frames.keys + start, f0);
      V lane;
      for (int i = 0; i < static_cast<int>(kVec); ++i) lane[i] = static_cast<float>(i);
      l = lane < static_cast<float>(j - start) ? V{} - std::numeric_limits<float>::infinity() : l;
    } else {
      l = V{} - std::numeric_limits<float>::infinity();
      d = V{};
      f0 = query_frame;
      for (int64_t i = 0; i < count - j; ++i) {
        l[i] = logits[j + i];
        d[i] = dist[j + i];
        if constexpr (kTime) f0[i] = frames.keys[j + i];
      }
    }
    exp_sums_step<kEntropy, kTime>(l, d, f0, max_lanes, query_frame, m0, w0, h, t);
  }
  mass = lane_total<float, V>(m0 + m1);
  weighted = lane_total<float, V>(w0 + w1);
  entropy = kEntropy ? lane_total<float, V>(h) : 0.0f;
  time_weighted = kTime ? lane_total<float, V>(t) : 0.0f;
}

template <bool kEntropy, bool kTime>
__attribute__((always_inline)) inline void exp_sums(const double* logits, const double* dist, Frames<double> frames,
                                                    int64_t count, double max, double& mass, double& weighted,
                                                    double& entropy, double& time_weighted) {
  mass = 0;
  weighted = 0;
  entropy = 0;
  time_weighted = 0;
  for (int64_t j = 0; j < count; ++j) {
    const double x = logits[j] - max;
    const double p = exp_nonpositive(x);
    mass += p;
    weighted += p * dist[j];
    if constexpr (kEntropy) entropy += p * clamp_exponent(x);
    if constexpr (kTime) {
      const double gap = std::abs(frames.query - frames.keys[j]);
      time_weighted += p * (gap == gap ? gap : 0.0);
    }
  }
}

// max(a, b), NaN when either is NaN: softmax's max. (std::max returns its first argument whenever a comparison
// with NaN fails, so a NaN logit among masked keys was dropped and its row came out finite.)
template <typename acc_t>
__attribute__((always_inline)) inline acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// nan_max on lanes: m = m lane by lane where m > b or m is NaN, else b. (An out-parameter, as load_lanes: a
// 32-byte vector returned from a function of the baseline clone draws GCC's ABI warning, though every call is
// inlined.)
template <typename V>
__attribute__((always_inline)) inline void nan_max_lanes(V& m, const V& b) {
  m = ((m > b) | (m != m)) ? m : b;
}

// The max of logits[0, n) by nan_max (NaN when one is NaN), -inf for n = 0: four vector registers of lanes, so
// that consecutive maxes do not wait on each other, folded by shuffles at the end (GCC leaves a `reduction(max)`
// over floats scalar without -ffast-math, and a serial max would cost as much as the exponentials). The fold was
// a scalar tree over a 32-float array on the stack: about 6% of the update's time at 512 keys (perf, AMD EPYC).
template <typename acc_t>
__attribute__((always_inline)) inline acc_t nan_max_of(const acc_t* logits, int64_t n) {
  using V = Lanes<acc_t>;
  constexpr int64_t kVec = sizeof(V) / sizeof(acc_t);
  const V lowest = V{} - std::numeric_limits<acc_t>::infinity();
  V m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) {
    V x0, x1, x2, x3;
    load_lanes(logits + j, x0);
    load_lanes(logits + j + kVec, x1);
    load_lanes(logits + j + 2 * kVec, x2);
    load_lanes(logits + j + 3 * kVec, x3);
    nan_max_lanes(m0, x0);
    nan_max_lanes(m1, x1);
    nan_max_lanes(m2, x2);
    nan_max_lanes(m3, x3);
  }
  for (; j + kVec <= n; j += kVec) {
    V x;
    load_lanes(logits + j, x);
    nan_max_lanes(m0, x);
  }
  nan_max_lanes(m0, m1);
  nan_max_lanes(m2, m3);
  nan_max_lanes(m0, m2);
  if constexpr (kVec == 8) {
    V h = __builtin_shufflevector(m0, m0, 4, 5, 6, 7, 0, 1, 2, 3);
    nan_max_lanes(m0, h);
    h = __builtin_shufflevector(m0, m0, 2, 3, 0, 1, 6, 7, 4, 5);
    nan_max_lanes(m0, h);
    h = __builtin_shufflevector(m0, m0, 1, 0, 3, 2, 5, 4, 7, 6);
    nan_max_lanes(m0, h);
  } else {
    static_assert(kVec == 4, "float or double lanes of 32 bytes");
    V h = __builtin_shufflevector(m0, m0, 2, 3, 0, 1);
    nan_max_lanes(m0, h);
    h = __builtin_shufflevector(m0, m0, 1, 0, 3, 2);
    nan_max_lanes(m0, h);
  }
  acc_t result = m0[0];
  for (; j < n; ++j) result = nan_max(result, logits[j]);
  return result;
}

// A key that must not count becomes -inf, unless its logit is NaN or +inf: softmax over every key then gives
// NaN, so such a logit stays and makes the row NaN.
template <typename acc_t>
__attribute__((always_inline)) inline void mask_key(acc_t& logit) {
  if (logit < std::numeric_limits<acc_t>::infinity()) logit = -std::numeric_limits<acc_t>::infinity();
}

struct NoEntropy {};
struct NoTime {};

// The online-softmax state of one query row, relative to its running max.
template <typename acc_t, bool kEntropy = false, bool kTime = false>
struct RowState {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t total = 0;     // sum of exp(logit - max) over every key seen, prefix tokens included
  acc_t weighted = 0;  // the same over patch keys, each term times the key's distance to the query
  acc_t prefix = 0;    // the same over the prefix keys alone (the part of `total` the prefix tokens give)
  // With kEntropy, sum of exp(logit - max) * (logit - max) over the keys `total` counts; nothing without.
  [[no_unique_address]] std::conditional_t<kEntropy, acc_t, NoEntropy> entropy{};
  // With kTime, `weighted` with each key's temporal distance (frames) instead; nothing without.
  [[no_unique_address]] std::conditional_t<kTime, acc_t, NoTime> time_weighted{};
};

// Folds one key block into a row's state: `logits` holds `num_keys` logits whose first `num_prefix_keys`
// belong to prefix tokens; `dist` the distances to the remaining (patch) keys, `frames` (kTime) the frames of
// the query and of all `num_keys` keys.
template <bool kEntropy, bool kTime, typename acc_t>
VITMAD_CPU_CLONES void online_softmax_update(const acc_t* logits, int64_t num_keys, int64_t num_prefix_keys,
                                             const acc_t* dist, Frames<acc_t> frames,
                                             RowState<acc_t, kEntropy, kTime>& state) {
  const acc_t block_max = nan_max_of(logits, num_keys);
  // A NaN max makes every weight, hence the row, NaN from here on.
  const acc_t new_max = nan_max(state.max, block_max);
  // Every key so far is masked out: nothing to add, and -inf - -inf would be NaN.
  if (new_max == -std::numeric_limits<acc_t>::infinity()) return;

  acc_t prefix_total = 0;
#pragma omp simd reduction(+ : prefix_total)
  for (int64_t j = 0; j < num_prefix_keys; ++j) prefix_total += exp_nonpositive(logits[j] - new_max);
  acc_t mass, weighted, entropy, time_weighted;
  if constexpr (kTime) frames.keys += num_prefix_keys;
  if constexpr (std::is_same_v<acc_t, float>) {
    // 64-byte vectors where the CPU has AVX-512 (this clone is then the x86-64-v4 one); with the padded tail,
    // mad_qk took 0-19% less time than with 32-byte vectors and a scalar tail on a 2-core Xeon (Sapphire
    // Rapids, one thread, two alternations, 2026-12-03): bfloat16 8x16x577x64 111 against 122-140 ms,
    // 1x16x4097x64 453-463 against 464-539; float32 1x16x4097x64 826-983 against 1016-1019.
    typedef float Wide __attribute__((vector_size(64)));
    static const bool wide = cpu_has_avx512();
    if (wide)
      exp_sums<kEntropy, kTime, Wide>(logits + num_prefix_keys, dist, frames, num_keys - num_prefix_keys, new_max,
                                      mass, weighted, entropy, time_weighted);
    else
      exp_sums<kEntropy, kTime, Lanes<float>>(logits + num_prefix_keys, dist, frames, num_keys - num_prefix_keys,
                                              new_max, mass, weighted, entropy, time_weighted);
  } else {
    exp_sums<kEntropy, kTime>(logits + num_prefix_keys, dist, frames, num_keys - num_prefix_keys, new_max, mass,
                              weighted, entropy, time_weighted);
  }
  const acc_t rescale = rescale_factor(state.max, new_max);
  if constexpr (kEntropy) {
    // A loop of its own rather than a second reduction in prefix_total's: that one's summation order, hence
    // MAD's bits, stays mad_qk's. Prefix keys are few.
    acc_t prefix_entropy = 0;
    for (int64_t j = 0; j < num_prefix_keys; ++j) {
      const acc_t x = logits[j] - new_max;
      prefix_entropy += exp_nonpositive(x) * clamp_exponent(x);
    }
    // Moving the max from m to m': sum e^(s - m') (s - m') = e^(m - m') (sum e^(s - m) (s - m) + Z (m - m')).
    state.entropy = rescale * (state.entropy + state.total * clamp_exponent(state.max - new_max)) + prefix_entropy +
                    entropy;
  }
  state.max = new_max;
  state.total = state.total * rescale + prefix_total + mass;
  state.prefix = state.prefix * rescale + prefix_total;
  state.weighted = state.weighted * rescale + weighted;
  if constexpr (kTime) state.time_weighted = state.time_weighted * rescale + time_weighted;
}

// What the statistics ops track per query row beside its RowState: the softmax terms of the keys without a
// position (prefix tokens; keys whose position is NaN) under their own max, taken before the renormalising mask
// (which hides them from RowState, yet entropy and prefix mass need them; their own max keeps a query that
// attends almost only to CLS from underflowing either side), and the logit of the query's own token (self mass).
template <typename acc_t>
struct StatsRowState {
  RowState<acc_t, /*kEntropy=*/true> positionless;  // distances all 0: `weighted` stays 0
  acc_t own_logit = -std::numeric_limits<acc_t>::infinity();
};

// exp_sums' distances for keys that have none.
template <typename acc_t>
constexpr std::array<acc_t, kKeyBlock> kNoDistances{};

// Folds the keys without a position of one key block into their state as keys at distance 0, gathered first
// (into `gathered`, kKeyBlock values) so that one vectorised update takes them whether they come as one run
// (prefix tokens, NaFlex padding) or scattered.
template <typename acc_t, typename Distances>
void positionless_update(const acc_t* logits, const Distances& keys, int64_t k_begin, int64_t cols, acc_t* gathered,
                         RowState<acc_t, true>& state) {
  int64_t count = 0;
  keys.for_each_positionless_run(k_begin, cols, [&](int64_t first, int64_t run) {
    std::copy(logits + first, logits + first + run, gathered + count);
    count += run;
  });
  if (count == 0) return;
  // Padded with -inf logits (weight 0, the same sums) to whole 64-byte vectors, so that one CLS key is a vector
  // load rather than exp_sums' copy into a vector (a memcpy call, after which the loop's constants are reloaded).
  constexpr int64_t kPad = 64 / sizeof(acc_t);
  static_assert(kKeyBlock % kPad == 0, "the padded keys fit the gathered block");
  const int64_t padded = (count + kPad - 1) / kPad * kPad;
  std::fill(gathered + count, gathered + padded, -std::numeric_limits<acc_t>::infinity());
  online_softmax_update<true, false, acc_t>(gathered, padded, /*num_prefix_keys=*/0, kNoDistances<acc_t>.data(),
                                            Frames<acc_t>{}, state);
}

// One query's statistics.
template <typename acc_t>
struct QueryStats {
  acc_t mad, entropy, prefix_mass, self_mass, temporal_mad;
};

// The statistics of a query from its states. Renormalised, RowState holds the keys with a position only and the
// positionless keys join it here, each side rescaled to the common max; otherwise RowState already holds every
// key (positionless ones included) and the prefix mass comes from RowState::prefix where the positionless keys
// are the prefix keys (prefix_in_keyed: the grid form; the positionless state is then never updated), else from
// the positionless state. MAD is mad_qk's weighted / total either way, bit for bit.
template <typename acc_t, bool kEntropy, bool kTime>
QueryStats<acc_t> query_stats(const RowState<acc_t, kEntropy, kTime>& keyed, const StatsRowState<acc_t>& extra,
                              bool renormalize, bool prefix_in_keyed, bool wants_self_mass) {
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  const RowState<acc_t, true>& positionless = extra.positionless;
  acc_t temporal = kNaN;
  if constexpr (kTime) temporal = keyed.time_weighted / keyed.total;  // as MAD, over the same normaliser
  QueryStats<acc_t> out{keyed.weighted / keyed.total, kNaN, kNaN, kNaN, temporal};
  const acc_t max = nan_max(keyed.max, positionless.max);
  // Every key masked (or none at all), or a NaN / +inf logit: softmax gives NaN.
  if (!(std::abs(max) < std::numeric_limits<acc_t>::infinity())) return out;
  const acc_t keyed_scale = rescale_factor(keyed.max, max);  // 0 for a side without keys (max -inf)
  const acc_t positionless_scale = rescale_factor(positionless.max, max);
  acc_t total = keyed.total * keyed_scale;
  if (renormalize) total += positionless.total * positionless_scale;
  if constexpr (kEntropy) {
    // H = ln Z - sum_s e^(s - M) (s - M) / Z, each side's sum moved to the common max M.
    acc_t sum = keyed_scale * (keyed.entropy + keyed.total * clamp_exponent(keyed.max - max));
    if (renormalize)
      sum += positionless_scale *
             (positionless.entropy + positionless.total * clamp_exponent(positionless.max - max));
    out.entropy = std::log(total) - sum / total;
  }
  out.prefix_mass = (prefix_in_keyed ? keyed.prefix * keyed_scale : positionless.total * positionless_scale) / total;
  if (wants_self_mass) out.self_mass = exp_nonpositive(extra.own_logit - max) / total;
  return out;
}

// logits[j] += bias[j * stride], or with a bool mask, logits[j] = -inf where the mask is false.
template <typename acc_t, typename bias_t>
VITMAD_CPU_CLONES void apply_bias(acc_t* logits, const bias_t* bias, int64_t stride, int64_t count) {
  if constexpr (std::is_same_v<bias_t, bool>) {
    for (int64_t j = 0; j < count; ++j)
      if (!bias[j * stride]) logits[j] = -std::numeric_limits<acc_t>::infinity();
  } else {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) logits[j] += static_cast<acc_t>(bias[j * stride]);
  }
}

// A tensor's data and the offsets of its [N, X] matrices.
template <typename T>
struct StridedView {
  const T* data = nullptr;
  MatrixOffsets offsets{};

  const T* matrix(int64_t index) const { return data + offsets(index); }
};

template <typename T>
StridedView<T> view_of(const at::Tensor& t, const char* op_name, const char* arg_name) {
  return {t.const_data_ptr<T>(), matrix_offsets(t, op_name, arg_name)};
}

// Where the queries and keys of the grid form are and how far apart: queries are the patch tokens P, P + 1, ...;
// the first P keys of each row are prefix tokens, the rest patches at grid distances. A query's distances are a
// row of the column tables mad uses (grid_distances.h), read in place: copying them from the distance table, a
// run per grid row, took a quarter of mad_qk's time over 32 x 12 x 197 x 64 on a Xeon (the copies, and a division
// per run). So a task takes one matrix.
template <typename acc_t>
struct GridDistances {
  static constexpr int64_t kMatricesPerTask = 1;
  // The keys without a position are the prefix keys, which the online update sums apart (RowState::prefix).
  static constexpr bool kPositionlessArePrefix = true;
  const ColumnDistances<acc_t>* columns;
  const MadLayout* l;

  int64_t matrices_per_task(int64_t /*key_bytes*/) const { return 1; }
  bool shares_distances(int64_t /*a*/, int64_t /*b*/) const { return true; }
  void set_matrix(int64_t /*b*/) {}
  bool has_query(int64_t /*t*/) const { return true; }
  // How many leading keys of key block [k_begin, k_begin + cols) are prefix tokens, which count only in the
  // normaliser. The same for every row.
  int64_t prefix_keys(int64_t k_begin, int64_t cols) const {
    return std::clamp<int64_t>(l->num_prefix - k_begin, 0, cols);
  }
  // The distances from query t to the patch keys of the key block: a row of the column tables, or that row
  // written into `buffer` (kKeyBlock values) where the tables were too large to build.
  const acc_t* distances(int64_t t, int64_t k_begin, int64_t cols, acc_t* buffer) const {
    const int64_t first_patch_key = k_begin + prefix_keys(k_begin, cols) - l->num_prefix;  // among the patches
    const int64_t last_patch_key = k_begin + cols - l->num_prefix;
    if (first_patch_key >= last_patch_key) return buffer;  // prefix keys only: no distance is read
    if (!columns->needs_buffer()) return columns->row(*l, QueryWalk(t, l->grid_w), nullptr) + first_patch_key;
    fill_distances(columns->table(), *l, t, first_patch_key, last_patch_key, buffer);
    return buffer;
  }
  // Renormalised MAD is the mean distance under the softmax over patch keys alone, so prefix keys are masked
  // out (counting them would only shrink the patch mass, down to 0 / 0 for a query that puts nearly all its
  // attention on CLS); a NaN or +inf among them still makes the row NaN, as the materialised route does.
  void mask(int64_t k_begin, int64_t cols, acc_t* logits) const {
    if (!l->renormalize) return;
    const int64_t count = prefix_keys(k_begin, cols);
    for (int64_t j = 0; j < count; ++j) mask_key(logits[j]);
  }
  bool renormalizes() const { return l->renormalize; }
  // fn(first, count) for the run of keys [first, first + count) of the block (counted from k_begin) without a
  // position: the prefix tokens.
  template <typename Fn>
  void for_each_positionless_run(int64_t k_begin, int64_t cols, Fn&& fn) const {
    const int64_t count = prefix_keys(k_begin, cols);
    if (count > 0) fn(0, count);
  }
};

// The position form: every token may have a position; a key without one has distance 0 (it counts in the
// normaliser only), or with renormalisation is masked out of the softmax (the mean distance under the softmax
// over keys with a position); a query without one gives NaN. The square roots cost about a fifth of the
// kernel's time, so a task takes up to four matrices that share positions and computes each block of distances
// once for all of them, as long as their packed keys (one GemmLogits per matrix) stay within
// kGroupKeyBytes: beyond, the GEMM's reads of four matrices' key blocks miss the cache, which cost more than the
// square roots saved (1x16x4097x64 on an AMD EPYC: four matrices 1.09-1.14x the grid form, one 1.02-1.03x;
// 2x12x1568x64 and 8x16x577x64: four 0.97x / 0.92x, one 1.03x / 0.98x).
template <typename acc_t>
struct PositionDistances {
  static constexpr int64_t kMatricesPerTask = 4;
  static constexpr bool kPositionlessArePrefix = false;  // anywhere in the sequence: summed apart when asked
  static constexpr int64_t kGroupKeyBytes = int64_t{2} << 20;
  // The matrices a task takes when each one's packed keys take `key_bytes`.
  static int64_t matrices_per_task(int64_t key_bytes) {
    return std::clamp<int64_t>(kGroupKeyBytes / std::max<int64_t>(key_bytes, 1), 1, kMatricesPerTask);
  }
  PositionRows<acc_t> queries;
  PositionRows<acc_t> keys;
  int64_t num_keys;
  bool renormalize;
  PackedKeys<acc_t> packed{};
  const acc_t* q_matrix = nullptr;

  bool shares_distances(int64_t a, int64_t b) const {
    return queries.matrix(a) == queries.matrix(b) && keys.matrix(a) == keys.matrix(b);
  }
  void set_matrix(int64_t b) {
    q_matrix = queries.matrix(b);
    packed.set(keys, b, num_keys);
  }
  bool has_query(int64_t t) const { return queries.has_position(q_matrix, t); }
  // The first coordinate of query t's position (its frame, when these are the frames).
  acc_t query_x(int64_t t) const {
    acc_t q[3];
    queries.position(q_matrix, t, q);
    return q[0];
  }
  int64_t prefix_keys(int64_t /*k_begin*/, int64_t /*cols*/) const { return 0; }
  // The distances from query t to the keys of the key block, written into `buffer` (kKeyBlock values).
  const acc_t* distances(int64_t t, int64_t k_begin, int64_t cols, acc_t* buffer) const {
    acc_t q[3];
    queries.position(q_matrix, t, q);
    packed.distances(q, k_begin, cols, /*zero_missing=*/true, buffer);
    return buffer;
  }
  void mask(int64_t k_begin, int64_t cols, acc_t* logits) const {
    if (!renormalize) return;
    const acc_t* x = packed.x.data() + k_begin;
    for (int64_t j = 0; j < cols; ++j)
      if (!(x[j] == x[j])) mask_key(logits[j]);
  }
  bool renormalizes() const { return renormalize; }
  // fn(first, count) for every run of keys [first, first + count) of the block (counted from k_begin) without a
  // position: the gaps between the packed runs of keys with one, from the first run that ends after k_begin.
  template <typename Fn>
  void for_each_positionless_run(int64_t k_begin, int64_t cols, Fn&& fn) const {
    const int64_t k_end = k_begin + cols;
    const auto& runs = packed.runs;
    auto run = std::partition_point(runs.begin(), runs.end(), [&](const auto& r) { return r.second <= k_begin; });
    int64_t gap_begin = run == runs.begin() ? 0 : std::prev(run)->second;
    while (gap_begin < k_end) {
      const int64_t gap_end = run == runs.end() ? num_keys : run->first;
      const int64_t first = std::max(gap_begin, k_begin);
      const int64_t last = std::min(gap_end, k_end);
      if (first < last) fn(first - k_begin, last - first);
      if (run == runs.end()) break;
      gap_begin = run->second;
      ++run;
    }
  }
};

// Where a kernel writes each statistic per query, [num_matrices, num_queries] (nullptr: not wanted).
template <typename acc_t>
using StatRows = std::array<acc_t*, kNumStats>;

// rows[stat][b, t] for the num_queries queries of every matrix, the first at token first_query of q; NaN for a
// query the distances say has no position. Without kStats (mad_qk), only MAD. A task is one query block of up to
// kMatricesPerTask consecutive matrices that share their distances; tasks are ordered matrices-major, so a
// thread's consecutive tasks reuse its packed keys. With kTime, `times` gives each key's temporal distance (the
// frames of a video's tokens, one coordinate) for a second weighted sum in the same pass: the temporal MAD.
template <bool kStats, bool kEntropy, bool kTime, typename scalar_t, typename acc_t, typename bias_t,
          typename Distances>
void online_mad_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
                    const QkShape& shape, int64_t first_query, int64_t num_queries, const Distances& distances,
                    const std::type_identity_t<Distances>* times, const StatRows<acc_t>& rows_out,
                    const char* op_name) {
  static_assert(kStats || !(kEntropy || kTime), "entropy and the temporal MAD are statistics");
  constexpr int64_t kGroup = Distances::kMatricesPerTask;
  const int64_t num_keys = shape.num_keys;
  const int64_t group_limit = distances.matrices_per_task(num_keys * shape.head_dim * int64_t{sizeof(acc_t)});
  acc_t* const mad_rows = rows_out[static_cast<int>(Stat::kMad)];
  // Without MAD the distance buffers stay zero: the weighted sums are computed but not used.
  const bool needs_distances = !kStats || mad_rows != nullptr;
  const auto qv = view_of<scalar_t>(q, op_name, "q");
  const auto kv = view_of<scalar_t>(k, op_name, "k");
  StridedView<bias_t> bv;
  if (bias.has_value()) bv = view_of<bias_t>(*bias, op_name, "attn_bias");
  const int64_t bias_query_stride = bias.has_value() ? bias->stride(-2) : 0;
  const int64_t bias_key_stride = bias.has_value() ? bias->stride(-1) : 0;
  const int64_t query_blocks = (num_queries + kQueryBlock - 1) / kQueryBlock;
  // Without renormalisation the grid form's positionless keys (the prefix tokens) stay in the row's own update,
  // which sums them apart (RowState::prefix): the prefix mass needs no second update of them per row and block,
  // 5-10% of the statistics' pass over 8x16x577x64 (Xeon, one thread).
  const bool prefix_in_keyed = Distances::kPositionlessArePrefix && !distances.renormalizes();
  const bool wants_self_mass = rows_out[static_cast<int>(Stat::kSelfMass)] != nullptr;
  std::vector<int64_t> group_starts{0};
  for (int64_t b = 1; b < shape.num_matrices; ++b)
    if (b - group_starts.back() == group_limit || !distances.shares_distances(b - 1, b) ||
        (kTime && !times->shares_distances(b - 1, b)))
      group_starts.push_back(b);
  group_starts.push_back(shape.num_matrices);
  const auto num_groups = static_cast<int64_t>(group_starts.size()) - 1;

  at::parallel_for(0, num_groups * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<GemmLogits<scalar_t, acc_t>> products(kGroup, GemmLogits<scalar_t, acc_t>(shape.head_dim));
    Distances keys = distances;
    std::optional<Distances> key_times;
    if constexpr (kTime) key_times.emplace(*times);
    // Each row's distances: in `dist` (zero where MAD is not wanted) or a row of the grid form's column tables.
    std::vector<acc_t> dist(kQueryBlock * kKeyBlock);
    std::vector<const acc_t*> row_distances(kQueryBlock);
    std::vector<RowState<acc_t, kEntropy, kTime>> states(kGroup * kQueryBlock);
    std::vector<StatsRowState<acc_t>> stats_states(kStats ? kGroup * kQueryBlock : 0);
    std::vector<acc_t> positionless_logits(kStats ? kKeyBlock : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t first_matrix = group_starts[task / query_blocks];
      const int64_t group_size = group_starts[task / query_blocks + 1] - first_matrix;
      const int64_t t_begin = (task % query_blocks) * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, num_queries - t_begin);
      const int64_t block_query = first_query + t_begin;  // token index of the block's first query

      keys.set_matrix(first_matrix);
      for (int64_t g = 0; g < group_size; ++g) {
        products[g].set_keys(kv.matrix(first_matrix + g), k.stride(-2), k.stride(-1), num_keys);
        products[g].set_queries(qv.matrix(first_matrix + g) + block_query * q.stride(-2), q.stride(-2), q.stride(-1),
                                rows, shape.scale);
      }
      if constexpr (kTime) key_times->set_matrix(first_matrix);
      std::fill(states.begin(), states.begin() + group_size * kQueryBlock, RowState<acc_t, kEntropy, kTime>{});
      if constexpr (kStats)
        std::fill(stats_states.begin(), stats_states.begin() + group_size * kQueryBlock, StatsRowState<acc_t>{});

      for (int64_t k_begin = 0; k_begin < num_keys; k_begin += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, num_keys - k_begin);
        const int64_t prefix_keys = keys.prefix_keys(k_begin, cols);
        for (int64_t i = 0; i < rows; ++i)
          row_distances[i] = needs_distances && keys.has_query(t_begin + i)
                                 ? keys.distances(t_begin + i, k_begin, cols, dist.data() + i * kKeyBlock)
                                 : dist.data() + i * kKeyBlock;
        for (int64_t g = 0; g < group_size; ++g) {
          acc_t* logits = products[g].logits(k_begin, cols);
          const bias_t* bias_matrix = bias.has_value() ? bv.matrix(first_matrix + g) : nullptr;
          for (int64_t i = 0; i < rows; ++i) {
            if (!keys.has_query(t_begin + i)) continue;
            acc_t* row = logits + i * products[g].row_stride();
            if (bias_matrix != nullptr)
              apply_bias(row, bias_matrix + (block_query + i) * bias_query_stride + k_begin * bias_key_stride,
                         bias_key_stride, cols);
            if constexpr (kStats) {
              // Before the renormalising mask, which hides positionless keys (and maybe the own token's).
              StatsRowState<acc_t>& extra = stats_states[g * kQueryBlock + i];
              const int64_t own_key = block_query + i - k_begin;
              if (own_key >= 0 && own_key < cols) extra.own_logit = row[own_key];
              if (!prefix_in_keyed)
                positionless_update(row, keys, k_begin, cols, positionless_logits.data(), extra.positionless);
            }
            keys.mask(k_begin, cols, row);
            Frames<acc_t> frames;
            if constexpr (kTime) frames = {key_times->packed.x.data() + k_begin, key_times->query_x(t_begin + i)};
            online_softmax_update<kEntropy, kTime>(row, cols, prefix_keys, row_distances[i], frames,
                                                   states[g * kQueryBlock + i]);
          }
        }
      }
      // Renormalised, the keys that do not count were masked, so the normaliser is their mass. A row
      // with every key masked out has total == 0 and gives NaN, as softmax does.
      for (int64_t g = 0; g < group_size; ++g) {
        const int64_t first_row = (first_matrix + g) * num_queries + t_begin;
        for (int64_t i = 0; i < rows; ++i) {
          const RowState<acc_t, kEntropy, kTime>& state = states[g * kQueryBlock + i];
          if constexpr (!kStats) {
            mad_rows[first_row + i] = keys.has_query(t_begin + i) ? state.weighted / state.total
                                                                  : std::numeric_limits<acc_t>::quiet_NaN();
          } else {
            constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
            const QueryStats<acc_t> stats =
                keys.has_query(t_begin + i)
                    ? query_stats(state, stats_states[g * kQueryBlock + i], keys.renormalizes(), prefix_in_keyed,
                                  wants_self_mass)
                    : QueryStats<acc_t>{kNaN, kNaN, kNaN, kNaN, kNaN};
            const acc_t values[kNumStats] = {stats.mad, stats.entropy, stats.prefix_mass, stats.self_mass,
                                             stats.temporal_mad};
            for (int s = 0; s < kNumStats; ++s)
              if (rows_out[s] != nullptr) rows_out[s][first_row + i] = values[s];
          }
        }
      }
    }
  });
}

// Runs fn(bias) with attn_bias as its [..., Nq, Nk] broadcast view and the bias type as a template argument
// (bool mask or q's dtype); without a bias, scalar_t and no view.
template <typename scalar_t, typename Fn>
void with_bias(const std::optional<at::Tensor>& attn_bias, const at::Tensor& q, const at::Tensor& k, Fn fn) {
  std::optional<at::Tensor> bias;
  if (attn_bias.has_value()) bias = broadcast_attn_bias(*attn_bias, q, k);
  if (bias.has_value() && bias->scalar_type() == at::kBool)
    fn(bias, static_cast<bool*>(nullptr));
  else
    fn(bias, static_cast<scalar_t*>(nullptr));
}

at::Tensor mad_qk_cpu(const at::Tensor& q, const at::Tensor& k, int64_t patch, int64_t num_prefix_tokens,
                      at::OptionalIntArrayRef grid, std::optional<double> scale,
                      const std::optional<at::Tensor>& attn_bias, bool renormalize, c10::string_view reduction) {
  const MadQkLayout ql = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize,
                                           reduction, "vitmad.mad_qk");
  const MadLayout& l = ql.mad;
  const auto [per_query, out] = empty_mad_outputs(q, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return out;
  const QkShape shape{l.num_tokens, l.num_tokens, ql.head_dim, l.num_matrices, ql.scale};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vitmad_mad_qk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rows = per_query.mutable_data_ptr<acc_t>();
    const auto columns = column_distances<acc_t>(l, static_cast<acc_t>(patch));
    const GridDistances<acc_t> distances{columns.get(), &l};
    with_bias<scalar_t>(attn_bias, q, k, [&](const std::optional<at::Tensor>& bias, auto* bias_type) {
      using bias_t = std::remove_pointer_t<decltype(bias_type)>;
      online_mad_cpu<false, false, false, scalar_t, acc_t, bias_t>(q, k, bias, shape, l.num_prefix, l.num_patches,
                                                                   distances, nullptr, StatRows<acc_t>{rows},
                                                                   "vitmad.mad_qk");
    });
    if (l.reduce_mean)
      mean_over_queries<acc_t>(rows, l.num_matrices, l.num_patches, AllQueries{}, out.mutable_data_ptr<acc_t>());
  });
  return out;
}

at::Tensor mad_qk_pos_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                          const std::optional<at::Tensor>& key_positions, std::optional<double> scale,
                          const std::optional<at::Tensor>& attn_bias, bool renormalize, c10::string_view reduction) {
  const QkShape shape = check_qk_tensors(q, k, scale, attn_bias, /*same_tokens=*/false, "vitmad.mad_qk");
  const auto out_dtype = mad_output_dtype(q.scalar_type());
  const PositionArgs args =
      check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions, renormalize, reduction,
                          out_dtype, /*check_values=*/true, "vitmad.mad_qk");
  const PositionLayout& l = args.layout;
  const auto [per_query, out] = empty_mad_outputs(q, l.num_matrices, l.num_queries, l.reduce_mean);
  if (l.num_matrices == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vitmad_mad_qk_pos_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rows = per_query.mutable_data_ptr<acc_t>();
    const auto queries = position_rows<acc_t>(args.queries, l.dims);
    const PositionDistances<acc_t> distances{queries, position_rows<acc_t>(args.keys, l.dims), l.num_keys,
                                             l.renormalize};
    with_bias<scalar_t>(attn_bias, q, k, [&](const std::optional<at::Tensor>& bias, auto* bias_type) {
      using bias_t = std::remove_pointer_t<decltype(bias_type)>;
      online_mad_cpu<false, false, false, scalar_t, acc_t, bias_t>(q, k, bias, shape, 0, l.num_queries, distances,
                                                                   nullptr, StatRows<acc_t>{rows}, "vitmad.mad_qk");
    });
    if (l.reduce_mean)
      mean_over_queries<acc_t>(rows, l.num_matrices, l.num_queries, PositionedQueries<acc_t>{queries},
                               out.mutable_data_ptr<acc_t>());
  });
  return out;
}

// The statistics ops share one error name, the Python entry point's (attention_stats_qk).
constexpr const char* kStatsQkOp = "vitmad.attention_stats_qk";

// Where each wanted statistic's [num_matrices, num_queries] rows start in per_query [S, num_matrices, num_queries].
template <typename acc_t>
StatRows<acc_t> stat_rows(const at::Tensor& per_query, const StatsRequest& request) {
  StatRows<acc_t> rows{};
  for (int s = 0; s < kNumStats; ++s)
    if (request.row[s] >= 0) rows[s] = per_query.mutable_data_ptr<acc_t>() + request.row[s] * per_query.stride(0);
  return rows;
}

// out[s] = the mean of per_query[s] over the queries that `counts` admits, for each of the S statistics.
template <typename acc_t, typename QueryFilter>
void mean_of_stats(const at::Tensor& per_query, int64_t num_matrices, int64_t num_queries, QueryFilter counts,
                   at::Tensor& out) {
  for (int64_t s = 0; s < per_query.size(0); ++s)
    mean_over_queries<acc_t>(per_query.const_data_ptr<acc_t>() + s * per_query.stride(0), num_matrices, num_queries,
                             counts, out.mutable_data_ptr<acc_t>() + s * num_matrices);
}

// fn(std::true_type{}) or fn(std::false_type{}): a runtime flag as a compile-time one.
template <typename Fn>
void with_flag(bool flag, Fn fn) {
  if (flag)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// Runs online_mad_cpu with the statistics on, the entropy compiled in only when the request names it, and the
// temporal distance only when `times` is given (the position form's frames; the request then names it).
template <typename scalar_t, typename acc_t, typename Distances>
void online_stats_cpu(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& attn_bias,
                      const QkShape& shape, int64_t first_query, int64_t num_queries, const Distances& distances,
                      const std::type_identity_t<Distances>* times, const StatsRequest& request,
                      const at::Tensor& per_query) {
  const StatRows<acc_t> rows = stat_rows<acc_t>(per_query, request);
  with_bias<scalar_t>(attn_bias, q, k, [&](const std::optional<at::Tensor>& bias, auto* bias_type) {
    using bias_t = std::remove_pointer_t<decltype(bias_type)>;
    with_flag(request.wants(Stat::kEntropy), [&](auto entropy) {
      if constexpr (std::is_same_v<Distances, PositionDistances<acc_t>>) {
        with_flag(times != nullptr, [&](auto time) {
          online_mad_cpu<true, decltype(entropy)::value, decltype(time)::value, scalar_t, acc_t, bias_t>(
              q, k, bias, shape, first_query, num_queries, distances, times, rows, kStatsQkOp);
        });
      } else {
        online_mad_cpu<true, decltype(entropy)::value, false, scalar_t, acc_t, bias_t>(
            q, k, bias, shape, first_query, num_queries, distances, nullptr, rows, kStatsQkOp);
      }
    });
  });
}

at::Tensor stats_qk_cpu(const at::Tensor& q, const at::Tensor& k, int64_t patch, c10::ArrayRef<std::string> stats,
                        int64_t num_prefix_tokens, at::OptionalIntArrayRef grid, std::optional<double> scale,
                        const std::optional<at::Tensor>& attn_bias, bool renormalize, c10::string_view reduction) {
  const MadQkLayout ql = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize,
                                           reduction, kStatsQkOp);
  const MadLayout& l = ql.mad;
  const StatsRequest request = check_stats(stats, l.num_tokens, l.num_tokens, /*has_times=*/false, kStatsQkOp);
  auto [per_query, out] = empty_stats_outputs(q, request, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return out;
  const QkShape shape{l.num_tokens, l.num_tokens, ql.head_dim, l.num_matrices, ql.scale};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vitmad_stats_qk_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto columns = column_distances<acc_t>(l, static_cast<acc_t>(patch));
    const GridDistances<acc_t> distances{columns.get(), &l};
    online_stats_cpu<scalar_t, acc_t>(q, k, attn_bias, shape, l.num_prefix, l.num_patches, distances, nullptr,
                                      request, per_query);
    if (l.reduce_mean) mean_of_stats<acc_t>(per_query, l.num_matrices, l.num_patches, AllQueries{}, out);
  });
  return out;
}

at::Tensor stats_qk_pos_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                            const std::optional<at::Tensor>& key_positions, c10::ArrayRef<std::string> stats,
                            std::optional<double> scale, const std::optional<at::Tensor>& attn_bias, bool renormalize,
                            c10::string_view reduction, const std::optional<at::Tensor>& times,
                            const std::optional<at::Tensor>& key_times) {
  const StatsQkPosArgs checked = check_stats_qk_pos_args(q, k, positions, key_positions, stats, scale, attn_bias,
                                                         renormalize, reduction, times, key_times,
                                                         /*check_values=*/true, kStatsQkOp);
  const QkShape& shape = checked.shape;
  const PositionArgs& args = checked.positions;
  const PositionLayout& l = args.layout;
  const StatsRequest& request = checked.request;
  const std::optional<PositionArgs>& time_args = checked.times;
  auto [per_query, out] = empty_stats_outputs(q, request, l.num_matrices, l.num_queries, l.reduce_mean);
  if (l.num_matrices == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vitmad_stats_qk_pos_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto queries = position_rows<acc_t>(args.queries, l.dims);
    const PositionDistances<acc_t> distances{queries, position_rows<acc_t>(args.keys, l.dims), l.num_keys,
                                             l.renormalize};
    // The frames as one-coordinate positions: |dt| is their distance. Tokens without a position have no time
    // (check_time_args), so the positions' mask serves both.
    std::optional<PositionDistances<acc_t>> frame_distances;
    if (time_args.has_value())
      frame_distances.emplace(PositionDistances<acc_t>{position_rows<acc_t>(time_args->queries, 1),
                                                       position_rows<acc_t>(time_args->keys, 1), l.num_keys,
                                                       l.renormalize});
    online_stats_cpu<scalar_t, acc_t>(q, k, attn_bias, shape, 0, l.num_queries, distances,
                                      frame_distances.has_value() ? &*frame_distances : nullptr, request, per_query);
    if (l.reduce_mean)
      mean_of_stats<acc_t>(per_query, l.num_matrices, l.num_queries, PositionedQueries<acc_t>{queries}, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CPU, m) {
  m.impl("mad_qk", &mad_qk_cpu);
  m.impl("mad_qk_pos", &mad_qk_pos_cpu);
  m.impl("stats_qk", &stats_qk_cpu);
  m.impl("stats_qk_pos", &stats_qk_pos_cpu);
}

}  // namespace vitmad
