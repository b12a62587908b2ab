// CPU helpers shared by the kernels of vitmad::mad and vitmad::mad_qk: the distance table that replaces the
// (N-P) x (N-P) distance matrix, the deterministic mean over queries, and the per-CPU code clones of hot
// loops. (Where each matrix of a batched strided tensor starts is MatrixOffsets, in mad_geometry.h.)
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/ArrayRef.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "../mad_args.h"
#include "../mad_geometry.h"
#include "../position_args.h"
#include "vector_log.h"

// Each hot loop is compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time by the CPU, so
// one wheel is fast on modern CPUs and still runs on old ones.
#if defined(__x86_64__) && defined(__GNUC__)
#define VITMAD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VITMAD_CPU_CLONES
#endif

namespace vitmad {

// table[dr * (2 * gw - 1) + (gw - 1) + dc] is the distance of a (dr, dc) grid offset, dr >= 0. The distances
// from a query in column c to the gw keys of a grid row dr rows away are the contiguous slice of table row
// dr that starts at (gw - 1) - c.
template <typename acc_t>
std::vector<acc_t> distance_table(const MadLayout& l, acc_t patch) {
  const int64_t width = 2 * l.grid_w - 1;
  std::vector<acc_t> table(l.grid_h * width);
  for (int64_t dr = 0; dr < l.grid_h; ++dr)
    for (int64_t j = 0; j < width; ++j) table[dr * width + j] = patch_distance<acc_t>(dr, j - (l.grid_w - 1), patch);
  return table;
}

// out[i] = d(t, first + i) for the patch keys [first, last): one table slice per grid row touched.
template <typename acc_t>
void fill_distances(const acc_t* table, const MadLayout& l, int64_t t, int64_t first, int64_t last, acc_t* out) {
  const int64_t width = 2 * l.grid_w - 1;
  const int64_t row = patch_row(t, l.grid_w);
  const int64_t col = patch_col(t, l.grid_w);
  for (int64_t s = first; s < last;) {
    const int64_t key_row = patch_row(s, l.grid_w);
    const int64_t run_end = std::min(last, (key_row + 1) * l.grid_w);
    const acc_t* slice = table + std::abs(row - key_row) * width + (l.grid_w - 1 - col) + (s - key_row * l.grid_w);
    std::copy(slice, slice + (run_end - s), out + (s - first));
    s = run_end;
  }
}

// out[b] = mean of per_query[b, t] over the queries t that counts.of_matrix(b) admits (AllQueries,
// PositionedQueries), in double and in a fixed
// order, so the result does not depend on the number of threads. No admitted query gives 0 / 0 = NaN.
template <typename acc_t, typename QueryFilter>
void mean_over_queries(const acc_t* per_query, int64_t num_matrices, int64_t num_queries, QueryFilter counts,
                       acc_t* out) {
  // Threads only pay off for large outputs: starting a parallel region costs more than a small mean.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(num_queries, 1));
  at::parallel_for(0, num_matrices, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double total = 0;
      int64_t admitted = 0;
      const acc_t* row = per_query + b * num_queries;
      const auto counted = counts.of_matrix(b);
      for (int64_t t = 0; t < num_queries; ++t) {
        if (counted(t)) {
          total += static_cast<double>(row[t]);
          ++admitted;
        }
      }
      out[b] = static_cast<acc_t>(total / static_cast<double>(admitted));
    }
  });
}

// Distance rows cached per task: at most this many bytes, so they stay in L2 while they are reused for every
// matrix (batch x head) of the tensor.
constexpr int64_t kDistanceCacheBytes = 64 * 1024;
// Queries per block whose distance rows (num_keys values of acc_size bytes each) fit in kDistanceCacheBytes,
// evened out over the blocks: a short last block would leave the thread that gets the other blocks with more
// rows to read than the rest (1.7 times as many on [64, 12, 197, 197] with two threads).
inline int64_t rows_per_distance_block(int64_t num_queries, int64_t num_keys, int64_t acc_size) {
  const int64_t queries = std::max<int64_t>(num_queries, 1);
  const int64_t fitting =
      std::clamp<int64_t>(kDistanceCacheBytes / (std::max<int64_t>(num_keys, 1) * acc_size), 1, queries);
  const int64_t blocks = (queries + fitting - 1) / fitting;
  return (queries + blocks - 1) / blocks;
}

// Attention elements per thread below which a parallel loop stays on fewer threads: starting a parallel region
// costs more than it saves on a small share of work.
constexpr int64_t kSerialElements = int64_t{1} << 17;

// Software prefetch distance along an attention row, and whether to prefetch at all: on Intel Xeons the hardware
// prefetcher alone left a single core well short of the bandwidth that attn.sum() reaches, because the distance
// rows compete for the same L1; on AMD Zen the software prefetches cost a fifth of the streaming speed instead
// (1.34x against 1.11x the time of one read, single core, 2026-11-30), so they are issued on Intel CPUs only.
constexpr int64_t kPrefetchAheadBytes = 4096;
template <typename acc_t>
constexpr int64_t kPrefetchAheadValues = kPrefetchAheadBytes / sizeof(acc_t);
#if defined(__x86_64__) && defined(__GNUC__)
inline const bool kSoftwarePrefetch = __builtin_cpu_is("intel");
#else
inline const bool kSoftwarePrefetch = false;
#endif

// sum_s a[s * stride] * dist[s] and, with kMass, sum_s a[s * stride], over kLanes lanes. Explicit lanes instead
// of a reduction pragma: the compiler turns them into vector registers without spilling, and the summation order
// (hence the result) is the same for every instruction set.
template <int64_t kLanes, typename scalar_t, typename acc_t, bool kMass>
__attribute__((always_inline)) inline void lane_sums(const scalar_t* a, int64_t stride, const acc_t* dist, int64_t n,
                                                     acc_t& weighted, acc_t& mass) {
  acc_t w[kLanes] = {};
  acc_t m[kLanes] = {};
  int64_t s = 0;
  if (stride == 1) {
    for (; s + kLanes <= n; s += kLanes) {
      if (kLanes * sizeof(acc_t) >= 128 && kSoftwarePrefetch) {
        for (int64_t i = 0; i < kLanes; i += 64 / sizeof(scalar_t))
          __builtin_prefetch(a + s + i + kPrefetchAheadBytes / sizeof(scalar_t));
      }
      for (int64_t i = 0; i < kLanes; ++i) {
        const acc_t v = static_cast<acc_t>(a[s + i]);
        w[i] += v * dist[s + i];
        if constexpr (kMass) m[i] += v;
      }
    }
  }
  acc_t w_total = 0;
  acc_t m_total = 0;
  for (; s < n; ++s) {
    const acc_t v = static_cast<acc_t>(a[s * stride]);
    w_total += v * dist[s];
    if constexpr (kMass) m_total += v;
  }
  // Pairwise, not sequential: a chain of kLanes dependent adds would cost more than a short row itself.
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t i = 0; i < width; ++i) {
      w[i] += w[i + width];
      if constexpr (kMass) m[i] += m[i + width];
    }
  }
  weighted = w_total + w[0];
  mass = m_total + m[0];
}

// 32 bytes of lanes as one GCC vector: unlike a lane array, it stays in a register from the zeroing to the final
// tree (the arrays were zeroed with `rep stos` and summed through the stack: a third of a 196-key row's time).
template <typename acc_t>
struct LaneVector;
template <>
struct LaneVector<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct LaneVector<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <typename acc_t>
using Lanes = typename LaneVector<acc_t>::type;
// Half of Lanes (16 bytes), for the last few keys of a row.
template <typename acc_t>
struct HalfLaneVector {
  typedef acc_t type __attribute__((vector_size(16)));
};
template <typename acc_t>
using HalfLanes = typename HalfLaneVector<acc_t>::type;

// v = p[0, lanes), unaligned. (An out-parameter, not a return value: a 32-byte vector returned from a function
// of the baseline clone draws GCC's ABI warning, though every call is inlined.)
template <typename V, typename acc_t>
__attribute__((always_inline)) inline void load_lanes(const acc_t* p, V& v) {
  __builtin_memcpy(&v, p, sizeof(v));
}

// Keeps a scalar running sum in a register of its own. Without it GCC may pack the two scalar tail sums of a row
// (A d and A) into one vector (SLP vectorisation), and then adds A * d unfused where elsewhere it fuses it into a
// multiply-add: whether it does depends on the code around the loop, so the same row could give other bits in
// another kernel, where stats' "mad" row must equal mad's (it did, for a 30-key run, once the entropy loop grew).
template <typename T>
__attribute__((always_inline)) inline void keep_scalar(T& value) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm("" : "+x"(value));
#else
  (void)value;
#endif
}

// Pairwise sum of a vector's lanes, in a fixed order.
template <typename acc_t, typename V = Lanes<acc_t>>
__attribute__((always_inline)) inline acc_t lane_total(const V& lanes) {
  constexpr int kVec = sizeof(V) / sizeof(acc_t);
  V v = lanes;
  for (int width = kVec / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) v[i] += v[i + width];
  return v[0];
}

// lane_sums for a contiguous row already in the accumulation type (float32, float64): four vector accumulators,
// then one, then half a vector, then scalars for the last few keys (a 196-key row ends in 4 keys, a 49-key one in
// 1: the half vector keeps the scalar tail, a chain of dependent adds, at 3 keys at most).
template <typename acc_t, bool kMass>
__attribute__((always_inline)) inline void contiguous_sums(const acc_t* a, const acc_t* dist, int64_t n,
                                                           acc_t& weighted, acc_t& mass) {
  using V = Lanes<acc_t>;
  using H = HalfLanes<acc_t>;
  constexpr int64_t kVec = sizeof(V) / sizeof(acc_t);
  constexpr int64_t kHalf = sizeof(H) / sizeof(acc_t);
  V w0{}, w1{}, w2{}, w3{}, m0{}, m1{}, m2{}, m3{};
  int64_t s = 0;
  for (; s + 4 * kVec <= n; s += 4 * kVec) {
    if (kSoftwarePrefetch) {
      __builtin_prefetch(a + s + kPrefetchAheadBytes / sizeof(acc_t));
      __builtin_prefetch(a + s + (kPrefetchAheadBytes + 64) / sizeof(acc_t));
    }
    V a0, a1, a2, a3, d0, d1, d2, d3;
    load_lanes(a + s, a0);
    load_lanes(a + s + kVec, a1);
    load_lanes(a + s + 2 * kVec, a2);
    load_lanes(a + s + 3 * kVec, a3);
    load_lanes(dist + s, d0);
    load_lanes(dist + s + kVec, d1);
    load_lanes(dist + s + 2 * kVec, d2);
    load_lanes(dist + s + 3 * kVec, d3);
    w0 += a0 * d0;
    w1 += a1 * d1;
    w2 += a2 * d2;
    w3 += a3 * d3;
    if constexpr (kMass) {
      m0 += a0;
      m1 += a1;
      m2 += a2;
      m3 += a3;
    }
  }
  for (; s + kVec <= n; s += kVec) {
    V v, d;
    load_lanes(a + s, v);
    load_lanes(dist + s, d);
    w1 += v * d;
    if constexpr (kMass) m1 += v;
  }
  H w_half{}, m_half{};
  if (s + kHalf <= n) {
    H v, d;
    load_lanes(a + s, v);
    load_lanes(dist + s, d);
    w_half = v * d;
    if constexpr (kMass) m_half = v;
    s += kHalf;
  }
  acc_t w_tail = 0;
  acc_t m_tail = 0;
  for (; s < n; ++s) {
    w_tail += a[s] * dist[s];
    keep_scalar(w_tail);
    if constexpr (kMass) m_tail += a[s];
  }
  weighted = (w_tail + lane_total<acc_t, H>(w_half)) + lane_total<acc_t>((w0 + w1) + (w2 + w3));
  mass = kMass ? (m_tail + lane_total<acc_t, H>(m_half)) + lane_total<acc_t>((m0 + m1) + (m2 + m3)) : acc_t(0);
}

// sum += x ln x lane by lane (0 ln 0 = 0) and lowest = min(lowest, x): a negative probability, which has no
// logarithm, is found once per row from `lowest` (x_log_x_total) instead of by a select per element. Float lanes
// use the vectorised log of vector_log.h; double lanes std::log, whose NaN below 0 makes `lowest` unneeded.
template <typename acc_t, typename V>
__attribute__((always_inline)) inline void add_x_log_x(const V& x, V& sum, V& lowest) {
  if constexpr (std::is_same_v<acc_t, float>) {
    V terms;
    x_log_x_unsigned(x, terms);
    sum += terms;
    lowest = lowest < x ? lowest : x;
  } else {
    for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(acc_t)); ++i)
      sum[i] += x[i] == acc_t(0) ? acc_t(0) : x[i] * std::log(x[i]);
  }
}

// The row's sum of x ln x from add_x_log_x's lanes: NaN when some x was below 0.
template <typename acc_t, typename V>
__attribute__((always_inline)) inline acc_t x_log_x_total(const V& sum, const V& lowest) {
  bool negative = false;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(acc_t)); ++i) negative |= lowest[i] < acc_t(0);
  return negative ? std::numeric_limits<acc_t>::quiet_NaN() : lane_total<acc_t, V>(sum);
}

// The lanes of one row's sum of x ln x in contiguous_x_log_x and range_sums: for float, vector_log.h's
// add_x_log_x_fast; a row for which exact_needed() holds (inf, NaN, a value with the sign bit) is summed again by
// exact_x_log_x_sum, with add_x_log_x's special values. For double, add_x_log_x itself.
template <typename acc_t>
struct XLogXLanes;

template <>
struct XLogXLanes<float> {
  using V = Lanes<float>;
  typedef uint32_t VU __attribute__((vector_size(sizeof(V))));
  // Two vectors' lanes, for the body of a row: one logarithm's instructions on 64-byte registers (AVX-512), two on
  // 32-byte ones (GCC splits the vector), the same lanes and so the same bits on every instruction set.
  typedef float VPair __attribute__((vector_size(2 * sizeof(V))));
  typedef uint32_t VUPair __attribute__((vector_size(2 * sizeof(V))));
  VPair pair_sum{};
  VUPair pair_top_bits{};
  V sum{};
  VU top_bits{};

  // The 2 * 8 values at p, or in x.
  __attribute__((always_inline)) void add_pair(const float* p) {
    VPair x;
    load_lanes(p, x);
    add_pair(x);
  }
  __attribute__((always_inline)) void add_pair(const VPair& x) { add_x_log_x_fast(x, pair_sum, pair_top_bits); }
  __attribute__((always_inline)) void add(const V& x) { add_x_log_x_fast(x, sum, top_bits); }
  // One comparison of the largest bit pattern, from a tree of vector maxima (a test per lane compiles to a chain
  // of branches that cost a 197-key row a tenth of its time).
  __attribute__((always_inline)) bool exact_needed() const {
    const VU low = __builtin_shufflevector(pair_top_bits, pair_top_bits, 0, 1, 2, 3, 4, 5, 6, 7);
    const VU high = __builtin_shufflevector(pair_top_bits, pair_top_bits, 8, 9, 10, 11, 12, 13, 14, 15);
    VU top = low > high ? low : high;
    top = top > top_bits ? top : top_bits;
    VU swapped = __builtin_shufflevector(top, top, 4, 5, 6, 7, 0, 1, 2, 3);
    top = top > swapped ? top : swapped;
    swapped = __builtin_shufflevector(top, top, 2, 3, 0, 1, 6, 7, 4, 5);
    top = top > swapped ? top : swapped;
    swapped = __builtin_shufflevector(top, top, 1, 0, 3, 2, 5, 4, 7, 6);
    top = top > swapped ? top : swapped;
    return top[0] >= kXLogXFastLimitBits;
  }
  __attribute__((always_inline)) float total() const {
    const V low = __builtin_shufflevector(pair_sum, pair_sum, 0, 1, 2, 3, 4, 5, 6, 7);
    const V high = __builtin_shufflevector(pair_sum, pair_sum, 8, 9, 10, 11, 12, 13, 14, 15);
    return lane_total<float>((low + high) + sum);
  }
};

template <>
struct XLogXLanes<double> {
  using V = Lanes<double>;
  V sum{}, lowest{};

  typedef double VPair __attribute__((vector_size(2 * sizeof(V))));
  __attribute__((always_inline)) void add_pair(const double* p) {
    VPair x;
    load_lanes(p, x);
    add_pair(x);
  }
  __attribute__((always_inline)) void add_pair(const VPair& x) {
    add(__builtin_shufflevector(x, x, 0, 1, 2, 3));
    add(__builtin_shufflevector(x, x, 4, 5, 6, 7));
  }
  __attribute__((always_inline)) void add(const V& x) { add_x_log_x<double>(x, sum, lowest); }
  __attribute__((always_inline)) bool exact_needed() const { return false; }
  __attribute__((always_inline)) double total() const { return x_log_x_total<double>(sum, lowest); }
};

// The sum of x ln x over a[s * stride], s < n, in any dtype, by add_x_log_x with its special values: the sum of
// a row (or a part of one) that XLogXLanes flagged.
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) acc_t exact_x_log_x_sum(const scalar_t* a, int64_t stride, int64_t n) {
  using V = Lanes<acc_t>;
  constexpr int64_t kVec = sizeof(V) / sizeof(acc_t);
  V sum{}, lowest{};
  for (int64_t s = 0; s < n; s += kVec) {
    V x{};
    for (int64_t i = 0; i < std::min(kVec, n - s); ++i) x[i] = static_cast<acc_t>(a[(s + i) * stride]);
    add_x_log_x<acc_t>(x, sum, lowest);
  }
  return x_log_x_total<acc_t>(sum, lowest);
}

// The sum of x ln x over a contiguous a[0, n) in the accumulation type: the entropy of a whole attention row (or
// of a whole matrix read as one stream), every key with or without a position. A pass of its own after the
// distance-weighted sums, which have just brought the data into cache: the logarithm's arithmetic, not the read,
// bounds it, so it prefetches (on Intel, as contiguous_sums) what the next reads will need and memory streams while
// it computes: ahead[s] for each a[s], into L1 with kLocality 3, L2 with 2. Fused into the distance loop instead,
// with rows of a group interleaved and no prefetch, it took twice as long as this over [64, 12, 197, 197] float32
// (Xeon, Sapphire Rapids, one core). The last values, fewer than two vectors, are one load of the last two vectors
// with the lanes already counted zeroed (0 ln 0 adds exactly nothing): one more logarithm of the pair's width, not
// a second set of lanes with its own final tree.
template <typename acc_t, int kLocality = 3>
__attribute__((always_inline)) inline acc_t contiguous_x_log_x(const acc_t* a, int64_t n, const acc_t* ahead) {
  using V = Lanes<acc_t>;
  constexpr int64_t kVec = sizeof(V) / sizeof(acc_t);
  XLogXLanes<acc_t> lanes;
  int64_t s = 0;
  const bool prefetch = kSoftwarePrefetch && ahead != nullptr;
  for (; s + 2 * kVec <= n; s += 2 * kVec) {
    if (prefetch) __builtin_prefetch(ahead + s, 0, kLocality);
    lanes.add_pair(a + s);
  }
  typedef std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t> lane_int;
  if (s < n && n >= 2 * kVec) {
    // The last values: the row's last two vectors, the lanes already counted zeroed.
    typedef acc_t VPair __attribute__((vector_size(2 * sizeof(V))));
    typedef lane_int VIPair __attribute__((vector_size(2 * sizeof(V))));
    VIPair index;
    for (int i = 0; i < static_cast<int>(2 * kVec); ++i) index[i] = i;
    VPair x;
    load_lanes(a + n - 2 * kVec, x);
    lanes.add_pair(index >= static_cast<lane_int>(2 * kVec - (n - s)) ? x : VPair{});
  } else if (s < n) {
    // A row shorter than two vectors: a vector, then the rest padded with zeros.
    if (s + kVec <= n) {
      V x;
      load_lanes(a + s, x);
      lanes.add(x);
      s += kVec;
    }
    V x{};
    for (int64_t j = s; j < n; ++j) x[j - s] = a[j];
    lanes.add(x);
  }
  return lanes.exact_needed() ? exact_x_log_x_sum<acc_t, acc_t>(a, 1, n) : lanes.total();
}

// Matrices whose rows of one query are read together through shared_distance_sums, sharing the query's distances
// (the grid form's mad_rows and stats rows; the position form's consecutive matrices that share their positions):
// registers for four rows' accumulators, two with renormalisation, whose mass accumulators take as many more.
constexpr int64_t kMatricesPerGroup = 4;
constexpr int64_t kMatricesPerGroupWithMass = 2;

// contiguous_sums for kRows attention rows that share one distance row (query t of kRows matrices): each
// distance vector is loaded once for all of them, so the distances cost 1 / kRows of the loads and of the L2 to L1
// traffic that the attention itself takes. Per row, two vector accumulators, then one vector, half a vector and
// scalars, in an order that does not depend on kRows (a row gives the same bits alone or in a group).
template <int kRows, typename acc_t, bool kMass>
__attribute__((always_inline)) inline void shared_distance_sums(const acc_t* const* a, const acc_t* dist, int64_t n,
                                                                acc_t* weighted, acc_t* mass) {
  using V = Lanes<acc_t>;
  using H = HalfLanes<acc_t>;
  constexpr int64_t kVec = sizeof(V) / sizeof(acc_t);
  constexpr int64_t kHalf = sizeof(H) / sizeof(acc_t);
  V w0[kRows], w1[kRows], m0[kRows], m1[kRows];
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g) w0[g] = w1[g] = m0[g] = m1[g] = V{};
  int64_t s = 0;
  for (; s + 2 * kVec <= n; s += 2 * kVec) {
    V d0, d1;
    load_lanes(dist + s, d0);
    load_lanes(dist + s + kVec, d1);
#pragma GCC unroll 8
    for (int g = 0; g < kRows; ++g) {
      V x0, x1;
      load_lanes(a[g] + s, x0);
      load_lanes(a[g] + s + kVec, x1);
      w0[g] += x0 * d0;
      w1[g] += x1 * d1;
      if constexpr (kMass) {
        m0[g] += x0;
        m1[g] += x1;
      }
    }
  }
  if (s + kVec <= n) {
    V d;
    load_lanes(dist + s, d);
#pragma GCC unroll 8
    for (int g = 0; g < kRows; ++g) {
      V x;
      load_lanes(a[g] + s, x);
      w0[g] += x * d;
      if constexpr (kMass) m0[g] += x;
    }
    s += kVec;
  }
  H hd{};
  const bool half = s + kHalf <= n;
  if (half) load_lanes(dist + s, hd);
  // Four rows' lane totals at once, in lane_total's order (a 49-key window row spends a fifth of its time there).
  acc_t totals[kRows];
  if constexpr (kRows == 4 && kVec == 8) {
    const V s0 = w0[0] + w1[0], s1 = w0[1] + w1[1], s2 = w0[2] + w1[2], s3 = w0[3] + w1[3];
    const V a = __builtin_shufflevector(s0, s1, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(s0, s1, 4, 5, 6, 7, 12, 13, 14, 15);
    const V b = __builtin_shufflevector(s2, s3, 0, 1, 2, 3, 8, 9, 10, 11) +
                __builtin_shufflevector(s2, s3, 4, 5, 6, 7, 12, 13, 14, 15);
    const V c = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13) +
                __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
    const H d = __builtin_shufflevector(c, c, 0, 2, 4, 6) + __builtin_shufflevector(c, c, 1, 3, 5, 7);
    for (int g = 0; g < kRows; ++g) totals[g] = d[g];
  } else {
    for (int g = 0; g < kRows; ++g) totals[g] = lane_total<acc_t>(w0[g] + w1[g]);
  }
#pragma GCC unroll 8
  for (int g = 0; g < kRows; ++g) {
    H hw{}, hm{};
    if (half) {
      load_lanes(a[g] + s, hm);
      hw = hm * hd;
    }
    acc_t w_tail = 0;
    acc_t m_tail = 0;
    for (int64_t j = s + (half ? kHalf : 0); j < n; ++j) {
      w_tail += a[g][j] * dist[j];
      keep_scalar(w_tail);
      if constexpr (kMass) m_tail += a[g][j];
    }
    weighted[g] = (w_tail + lane_total<acc_t, H>(hw)) + totals[g];
    if constexpr (kMass) mass[g] = (m_tail + lane_total<acc_t, H>(hm)) + lane_total<acc_t>(m0[g] + m1[g]);
  }
}

// A whole matrix read as one stream is summed in chunks of this many values, the chunks' totals added in double.
// One float accumulator lane per 16 values over a 1100-token matrix (1.2 M values) took 75 k additions and lost up
// to 3.8e-5 of the mean (found by QA against float64), where the row-by-row route, a query's row of 1100 values at a
// time, keeps float's precision; a chunk holds a few rows' worth, and its final tree costs under 1 % of its reads.
constexpr int64_t kWholeMatrixChunk = 4096;

// shared_distance_sums of `count` (at most four) whole matrices read as streams of n values each, without the
// mass, in chunks of kWholeMatrixChunk: the "mean" of mad_pos and stats_pos where every query and key has a
// position (mad_pos_whole_matrices and position_stats_whole_matrices, whose MAD rows are equal bit for bit through
// it).
template <typename acc_t>
VITMAD_CPU_CLONES void whole_matrix_sums(const acc_t* const* matrices, int64_t count, const acc_t* dist, int64_t n,
                                         acc_t* weighted) {
  double totals[kMatricesPerGroup] = {};
  for (int64_t start = 0; start < n; start += kWholeMatrixChunk) {
    const int64_t length = std::min(kWholeMatrixChunk, n - start);
    const acc_t* chunk[kMatricesPerGroup];
    for (int64_t i = 0; i < count; ++i) chunk[i] = matrices[i] + start;
    acc_t sums[kMatricesPerGroup], mass[kMatricesPerGroup];
    switch (count) {
      case 4: shared_distance_sums<4, acc_t, false>(chunk, dist + start, length, sums, mass); break;
      case 3: shared_distance_sums<3, acc_t, false>(chunk, dist + start, length, sums, mass); break;
      case 2: shared_distance_sums<2, acc_t, false>(chunk, dist + start, length, sums, mass); break;
      default: shared_distance_sums<1, acc_t, false>(chunk, dist + start, length, sums, mass); break;
    }
    for (int64_t i = 0; i < count; ++i) totals[i] += static_cast<double>(sums[i]);
  }
  for (int64_t i = 0; i < count; ++i) weighted[i] = static_cast<acc_t>(totals[i]);
}

// lane_sums with four vector registers of lanes for rows of a hundred keys and more, one for short rows (a 7 x 7
// window is 49 keys), whose cost is otherwise the lanes' setup and final tree; contiguous_sums where the row is
// contiguous and already in the accumulation type.
template <typename scalar_t, typename acc_t, bool kMass>
__attribute__((always_inline)) inline void weighted_sums(const scalar_t* a, int64_t stride, const acc_t* dist,
                                                         int64_t n, acc_t& weighted, acc_t& mass) {
  constexpr int64_t kLongLanes = 128 / sizeof(acc_t);
  constexpr int64_t kShortLanes = 64 / sizeof(acc_t);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) {
      contiguous_sums<acc_t, kMass>(a, dist, n, weighted, mass);
      return;
    }
  }
  if (n >= 4 * kLongLanes)
    lane_sums<kLongLanes, scalar_t, acc_t, kMass>(a, stride, dist, n, weighted, mass);
  else
    lane_sums<kShortLanes, scalar_t, acc_t, kMass>(a, stride, dist, n, weighted, mass);
}

// out[j] = the distance from `query` to the key at (kx[j], ky[j], kz[j]), NaN (or 0 with zero_missing) where kx[j]
// is NaN. A per-CPU clone: the square roots are a good part of the work.
template <typename acc_t>
VITMAD_CPU_CLONES void position_distances(const acc_t* query, const acc_t* kx, const acc_t* ky, const acc_t* kz,
                                          int64_t count, bool zero_missing, acc_t* out) {
  const acc_t qx = query[0], qy = query[1], qz = query[2];
  if (zero_missing) {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) {
      const acc_t d = position_distance<acc_t>(qx - kx[j], qy - ky[j], qz - kz[j]);
      out[j] = d == d ? d : acc_t(0);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < count; ++j) out[j] = position_distance<acc_t>(qx - kx[j], qy - ky[j], qz - kz[j]);
  }
}

// One matrix's key positions packed for vectorised distance rows: three contiguous coordinate arrays (NaN for
// keys without a position, 0 past K), and the maximal runs [begin, end) of keys with a position, so attention
// rows are still read as contiguous dot products. Repacked only when the matrix's positions change (broadcast
// positions are packed once per thread).
template <typename acc_t>
struct PackedKeys {
  const acc_t* source = nullptr;
  std::vector<acc_t> x, y, z;
  std::vector<std::pair<int64_t, int64_t>> runs;

  void set(const PositionRows<acc_t>& keys, int64_t b, int64_t num_keys) {
    const acc_t* matrix = keys.matrix(b);
    if (matrix == source) return;
    source = matrix;
    x.resize(num_keys);
    y.resize(num_keys);
    z.resize(num_keys);
    runs.clear();
    for (int64_t s = 0; s < num_keys; ++s) {
      x[s] = keys.coord(matrix, s, 0);
      y[s] = keys.coord(matrix, s, 1);
      z[s] = keys.coord(matrix, s, 2);
      if (std::isnan(x[s])) continue;
      if (!runs.empty() && runs.back().second == s)
        ++runs.back().second;
      else
        runs.emplace_back(s, s + 1);
    }
  }

  // out[j] = d(query, key first + j) for j < count; for a key without a position NaN, or 0 (it adds nothing)
  // with zero_missing.
  void distances(const acc_t* query, int64_t first, int64_t count, bool zero_missing, acc_t* out) const {
    position_distances(query, x.data() + first, y.data() + first, z.data() + first, count, zero_missing, out);
  }
};

}  // namespace vitmad
