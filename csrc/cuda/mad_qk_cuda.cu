// CUDA kernel of vitmad::mad_qk and vitmad::mad_qk_pos: MAD of softmax(q @ k^T * scale + attn_bias) without the
// Nq x Nk attention. This portable kernel serves float32 and float64, and 16-bit input on GPUs before sm_80 (or
// builds without sm_80+ code); float16 and bfloat16 on sm_80+ go to mad_qk_sm80.cu.
//
// One thread block owns a tile of queries of one matrix and walks the keys in tiles, as flash attention does:
// the query tile stays in shared memory, each key tile is staged in shared memory with its keys' positions, the
// tile of logits comes from tensor cores (WMMA, float32 accumulation) for float16 / bfloat16 and from plain FMAs
// for float32 (no TF32, so float32 keeps float32 accuracy) and float64. Each query row is then owned by a few
// lanes of one warp that keep its online-softmax state in registers: the running max (in log2 units), and,
// relative to it, the running normaliser over all keys and the running mass and distance-weighted sum over keys
// with a position. The grid form (kPositions false) stages each key's grid row and column, computed from token
// indices through mad_geometry.h as on the CPU, with NaN marking the prefix keys; the position form stages the
// keys' positions, NaN marking keys without one. Both use the same distance formula (position_distance).
//
// vitmad::stats_qk and stats_qk_pos run the same kernel with kStats (the portable kernel for every dtype): beside
// MAD's state each row keeps the entropy sum of the same keys, the frame-weighted sum (temporal MAD, video), the
// keys without a position under their own max (prefix mass; entropy when renormalising, where MAD's state leaves
// them out) and its own token's logit (self mass), combined at the end as the CPU kernels' query_stats does. These
// kernels are registered only with VITMAD_CUDA_STATS_KERNELS=1 until a GPU has run them (see the end of the file).
//
// Only c10/cuda headers are used (ATen/cuda/CUDAContext.h needs cuBLAS/cuSPARSE headers the toolkit may lack).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "../mad_args.h"
#include "../mad_geometry.h"
#include "../position_args.h"
#include "../stats_args.h"
#include "cuda_common.cuh"
#include "mad_qk_params.cuh"
#include "stats_common.cuh"

namespace vitmad {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGridY = 65535;

// Tile sizes and product path per input dtype. mma_t is the type staged in shared memory for the products.
template <typename scalar_t>
struct TileConfig;
template <>
struct TileConfig<c10::Half> {
  using mma_t = __half;
  using acc_t = float;
  static constexpr bool kTensorCores = true;
  static constexpr int kBlockM = 64, kBlockN = 64, kPad = 8;  // +8 halves per row: WMMA's ldm rule, fewer conflicts
};
template <>
struct TileConfig<c10::BFloat16> {
  using mma_t = __nv_bfloat16;
  using acc_t = float;
  static constexpr bool kTensorCores = true;
  static constexpr int kBlockM = 64, kBlockN = 64, kPad = 8;
};
template <>
struct TileConfig<float> {
  using mma_t = float;
  using acc_t = float;
  static constexpr bool kTensorCores = false;
  static constexpr int kBlockM = 64, kBlockN = 64, kPad = 1;  // odd row length: conflict-free column reads
};
template <>
struct TileConfig<double> {
  using mma_t = double;
  using acc_t = double;
  static constexpr bool kTensorCores = false;
  static constexpr int kBlockM = 32, kBlockN = 32, kPad = 1;  // smaller tiles keep shared memory under 48 KiB
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

__device__ __forceinline__ float exp2_of(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_of(double x) { return exp2(x); }
__device__ __forceinline__ float log2_of(float x) { return log2f(x); }
__device__ __forceinline__ double log2_of(double x) { return log2(x); }
__device__ __forceinline__ float abs_of(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_of(double x) { return fabs(x); }

// c10::Half / c10::BFloat16 hold the same bits as __half / __nv_bfloat16.
template <typename mma_t, typename scalar_t>
__device__ __forceinline__ mma_t to_mma(scalar_t v) {
  static_assert(sizeof(mma_t) == sizeof(scalar_t), "staged type must have the input's width");
  if constexpr (std::is_same_v<mma_t, scalar_t>) {
    return v;
  } else {
    return *reinterpret_cast<const mma_t*>(&v);
  }
}

// A staged value in the accumulation type.
template <typename acc_t, typename mma_t>
__device__ __forceinline__ acc_t to_acc(mma_t v) {
  if constexpr (std::is_same_v<mma_t, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<mma_t, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return v;
  }
}

// WMMA for float16 from sm_70 and for bfloat16 from sm_80; older targets (only built when asked for) run the
// FMA path on the same tiles, so tile sizes and shared memory agree between host and device code.
template <typename mma_t>
__device__ constexpr bool use_wmma() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
  return false;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return std::is_same_v<mma_t, __half>;
#else
  return std::is_same_v<mma_t, __half> || std::is_same_v<mma_t, __nv_bfloat16>;
#endif
}

// A logit (log2 units) plus the bias, or -inf where a bool mask drops the key.
template <typename acc_t, typename bias_t>
__device__ __forceinline__ acc_t biased(acc_t logit, bias_t bias) {
  if constexpr (std::is_same_v<bias_t, bool>) {
    return bias ? logit : neg_inf<acc_t>();
  } else {
    return logit + static_cast<acc_t>(bias) * static_cast<acc_t>(kLog2e);
  }
}

// rows x head_dim_padded elements of a [.., N, D] matrix starting at token `first`, zero outside [0, limit)
// tokens and beyond D, into a shared tile of row length ld.
template <typename scalar_t, typename mma_t>
__device__ void load_tile(const scalar_t* matrix, int64_t stride_n, int64_t stride_d, int first, int limit,
                          int rows, int head_dim, int head_dim_padded, int ld, mma_t* tile) {
  const mma_t zero = to_mma<mma_t>(static_cast<scalar_t>(0));
  for (int i = threadIdx.x; i < rows * head_dim_padded; i += kThreads) {
    const int r = i / head_dim_padded;
    const int d = i - r * head_dim_padded;
    const int token = first + r;
    tile[r * ld + d] =
        token < limit && d < head_dim ? to_mma<mma_t>(matrix[token * stride_n + d * stride_d]) : zero;
  }
}

// s[r * lds + j] = q_tile[r] . k_tile[j] for the whole tile, in acc_t.
template <typename scalar_t>
__device__ void tile_logits(const typename TileConfig<scalar_t>::mma_t* q_tile,
                            const typename TileConfig<scalar_t>::mma_t* k_tile, int ld, int head_dim_padded,
                            typename TileConfig<scalar_t>::acc_t* s, int lds) {
  using Cfg = TileConfig<scalar_t>;
  using mma_t = typename Cfg::mma_t;
  using acc_t = typename Cfg::acc_t;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  if constexpr (use_wmma<mma_t>()) {
    // Warp w computes rows [16w, 16w + 16) against every key of the tile, 16 x 16 x 16 at a time.
    static_assert(kBlockM == 16 * kWarps, "one 16-row WMMA strip per warp");
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBlockN / 16];
#pragma unroll
    for (int n = 0; n < kBlockN / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
    for (int kk = 0; kk < head_dim_padded; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::row_major> a;
      wmma::load_matrix_sync(a, q_tile + warp * 16 * ld + kk, ld);
#pragma unroll
      for (int n = 0; n < kBlockN / 16; ++n) {
        // k_tile is [key][d] row-major, i.e. k^T in column-major order.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::col_major> b;
        wmma::load_matrix_sync(b, k_tile + n * 16 * ld + kk, ld);
        wmma::mma_sync(acc[n], a, b, acc[n]);
      }
    }
#pragma unroll
    for (int n = 0; n < kBlockN / 16; ++n)
      wmma::store_matrix_sync(s + warp * 16 * lds + n * 16, acc[n], lds, wmma::mem_row_major);
  } else {
    // Thread (ty, tx) computes rows ty * kRows + i and keys tx + 8 * c: kRows x kCols FMAs per pair of loads.
    constexpr int kRows = kBlockM / 16, kCols = kBlockN / 8;
    static_assert(kThreads == 128, "16 x 8 threads per tile");
    const int ty = threadIdx.x / 8;
    const int tx = threadIdx.x % 8;
    acc_t acc[kRows][kCols] = {};
    for (int d = 0; d < head_dim_padded; ++d) {
      acc_t a[kRows];
      acc_t b[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) a[i] = to_acc<acc_t>(q_tile[(ty * kRows + i) * ld + d]);
#pragma unroll
      for (int c = 0; c < kCols; ++c) b[c] = to_acc<acc_t>(k_tile[(tx + 8 * c) * ld + d]);
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int c = 0; c < kCols; ++c) acc[i][c] = fma(a[i], b[c], acc[i][c]);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < kCols; ++c) s[(ty * kRows + i) * lds + tx + 8 * c] = acc[i][c];
  }
}

// A key of the staged tile counts as a key with a position (a patch in the grid form) unless its x is NaN.
template <typename acc_t>
__device__ __forceinline__ bool is_positioned(acc_t x) {
  return x == x;
}

// exp2(x) * x, 0 where the weight exp2(x) is 0 (a masked key: x = -inf, or below the range): the entropy term of
// one key, x a logit minus the running max in log2 units. NaN stays NaN (the row is NaN then anyway).
template <typename acc_t>
__device__ __forceinline__ acc_t weighted_exponent(acc_t weight, acc_t x) {
  return weight == acc_t(0) ? acc_t(0) : weight * x;
}

// Moves an entropy sum E = sum w (x - m) of a state with normaliser Z from max m to max m' >= m:
// sum w' (x - m') = 2^(m - m') (E + Z (m - m')); a state that held nothing yet (m = -inf) stays 0.
template <typename acc_t>
__device__ __forceinline__ acc_t moved_entropy(acc_t entropy, acc_t total, acc_t old_max, acc_t new_max,
                                               acc_t rescale) {
  return old_max == neg_inf<acc_t>() ? acc_t(0) : rescale * (entropy + total * (old_max - new_max));
}

// One online-softmax state of a query row, relative to its running max (log2 units), split over the row's lanes:
// the max is common to them, the sums are partial. The statistics kernel keeps two: the keys that count in MAD's
// softmax, and the keys without a position under their own max (their share and entropy; renormalised, the first
// state does not hold them).
template <typename acc_t>
struct LaneState {
  acc_t max = neg_inf<acc_t>();
  acc_t total = 0;    // sum of exp2(logit - max)
  acc_t entropy = 0;  // sum of exp2(logit - max) * (logit - max)

  // Rescales the sums to new_max (> -inf), returning the factor.
  __device__ __forceinline__ acc_t move_to(acc_t new_max, bool with_entropy) {
    const acc_t rescale = exp2_of(max - new_max);
    if (with_entropy) entropy = moved_entropy(entropy, total, max, new_max, rescale);
    total *= rescale;
    max = new_max;
    return rescale;
  }
};

template <typename scalar_t, typename bias_t, bool kPositions, bool kStats = false>
__global__ void __launch_bounds__(kThreads) mad_qk_kernel(const QkParams<typename TileConfig<scalar_t>::acc_t> p) {
  using Cfg = TileConfig<scalar_t>;
  using mma_t = typename Cfg::mma_t;
  using acc_t = typename Cfg::acc_t;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  constexpr int kRowsPerWarp = kBlockM / kWarps;
  constexpr int kLanesPerRow = 32 / kRowsPerWarp;  // lanes sharing one query row, adjacent in the warp
  constexpr int lds = kBlockN + 4;                 // logits row length: a multiple of 4 for WMMA stores
  const int ld = p.head_dim_padded + Cfg::kPad;

  extern __shared__ __align__(128) unsigned char shared[];
  mma_t* q_tile = reinterpret_cast<mma_t*>(shared);
  mma_t* k_tile = q_tile + kBlockM * ld;
  acc_t* s = reinterpret_cast<acc_t*>(k_tile + kBlockN * ld);
  // The key tile's positions (grid form: row and column), x NaN for a key without one or past Nk; with kStats also
  // the keys' frames (key_time, video).
  acc_t* key_x = s + kBlockM * lds;
  acc_t* key_y = key_x + kBlockN;
  acc_t* key_z = key_y + kBlockN;
  acc_t* key_time = key_z + kBlockN;

  const int lane = threadIdx.x % 32;
  const int row = threadIdx.x / 32 * kRowsPerWarp + lane / kLanesPerRow;  // this lane's query row in the tile
  const int sub = lane % kLanesPerRow;
  const int t_begin = blockIdx.x * kBlockM;  // the tile's first query
  const int t = t_begin + row;
  const bool valid_row = t < p.num_queries;
  acc_t query[3] = {0, 0, 0};  // this row's position (grid form: row and column)
  if (!kPositions && valid_row) {
    query[0] = static_cast<acc_t>(patch_row(t, p.grid_w));
    query[1] = static_cast<acc_t>(patch_col(t, p.grid_w));
  }
  const acc_t logit_scale = static_cast<acc_t>(p.logit_scale);
  const acc_t patch = static_cast<acc_t>(p.patch);
  const auto* q_all = static_cast<const scalar_t*>(p.q);
  const auto* k_all = static_cast<const scalar_t*>(p.k);
  const auto* bias_all = static_cast<const bias_t*>(p.bias);
  // The statistics: the query's own token among the keys (self mass), whether entropy and frames are wanted.
  const int own_key = p.first_query + t;
  const bool with_entropy = kStats && p.wants_entropy;
  const bool with_times = kStats && kPositions && p.has_times;

  for (int64_t b = blockIdx.y; b < p.num_matrices; b += gridDim.y) {
    const scalar_t* q_matrix = q_all + p.q_lead(b);
    const scalar_t* k_matrix = k_all + p.k_lead(b);
    const bias_t* bias_row =
        bias_all != nullptr && valid_row ? bias_all + p.bias_lead(b) + (p.first_query + t) * p.bias_stride_q : nullptr;
    bool has_position = valid_row;
    if constexpr (kPositions) {
      const acc_t* positions = p.query_positions.matrix(b);
      has_position = valid_row && p.query_positions.has_position(positions, t);
      if (has_position) p.query_positions.position(positions, t, query);
    }
    acc_t query_time = 0;
    if (with_times && has_position) query_time = p.query_times.coord(p.query_times.matrix(b), t, 0);
    __syncthreads();  // the previous matrix is done with every tile
    load_tile(q_matrix, p.q_stride_n, p.q_stride_d, p.first_query + t_begin, p.q_tokens, kBlockM, p.head_dim,
              p.head_dim_padded, ld, q_tile);

    // This lane's share of its row's state: the max is common to the row's lanes, the sums are partial.
    acc_t running_max = neg_inf<acc_t>();
    acc_t total = 0;     // exp2(logit - max) over all keys (prefix tokens / keys without a position included)
    acc_t mass = 0;      // the same over keys with a position
    acc_t weighted = 0;  // the same over keys with a position, times the distance
    // kStats: the entropy sum and the frame-weighted sum of the same keys as `total` and `weighted`, the keys
    // without a position under their own max (taken before the renormalising mask), and the own token's logit.
    acc_t entropy = 0;
    acc_t time_weighted = 0;
    LaneState<acc_t> positionless;
    acc_t own_logit = neg_inf<acc_t>();
    for (int k_begin = 0; k_begin < p.num_keys; k_begin += kBlockN) {
      __syncthreads();  // the previous key tile's logits and coordinates are consumed
      load_tile(k_matrix, p.k_stride_n, p.k_stride_d, k_begin, p.num_keys, kBlockN, p.head_dim, p.head_dim_padded, ld,
                k_tile);
      for (int j = threadIdx.x; j < kBlockN; j += kThreads) {
        const int key = k_begin + j;
        acc_t x = std::numeric_limits<acc_t>::quiet_NaN();
        acc_t y = 0;
        acc_t z = 0;
        acc_t frame = 0;
        if constexpr (kPositions) {
          const acc_t* positions = p.key_positions.matrix(b);
          if (key < p.num_keys && p.key_positions.has_position(positions, key)) {
            x = p.key_positions.coord(positions, key, 0);
            y = p.key_positions.coord(positions, key, 1);
            z = p.key_positions.coord(positions, key, 2);
            if (with_times) frame = p.key_times.coord(p.key_times.matrix(b), key, 0);
          }
        } else if (key >= p.first_query && key < p.num_keys) {
          x = static_cast<acc_t>(patch_row(key - p.first_query, p.grid_w));
          y = static_cast<acc_t>(patch_col(key - p.first_query, p.grid_w));
        }
        key_x[j] = x;
        key_y[j] = y;
        key_z[j] = z;
        if constexpr (kStats) key_time[j] = frame;
      }
      __syncthreads();
      tile_logits<scalar_t>(q_tile, k_tile, ld, p.head_dim_padded, s, lds);
      __syncthreads();

      // Scale, bias and mask the row in place (keys past Nk, and keys without a position when renormalising:
      // renormalised MAD is the softmax over keys with a position alone, but a NaN or +inf logit there makes
      // softmax over every key NaN, so it stays), and find the tile's max: NaN once any logit is NaN, so the
      // row's weights, hence its value, become NaN. With kStats the row keeps its logits unmasked (the keys
      // without a position count in the statistics of the whole row) and the mask is applied in the sums below.
      acc_t* logits = s + row * lds;
      acc_t tile_max = neg_inf<acc_t>();
      acc_t positionless_tile_max = neg_inf<acc_t>();
      for (int j = sub; j < kBlockN; j += kLanesPerRow) {
        const int key = k_begin + j;
        acc_t x = neg_inf<acc_t>();
        acc_t unmasked = neg_inf<acc_t>();
        if (key < p.num_keys) {
          x = logits[j] * logit_scale;
          if (bias_row != nullptr) x = biased(x, bias_row[key * p.bias_stride_k]);
          unmasked = x;
          if constexpr (kStats) {
            if (key == own_key) own_logit = x;
            if (!is_positioned(key_x[j])) positionless_tile_max = nan_max(positionless_tile_max, x);
          }
          if (p.renormalize && !is_positioned(key_x[j]) && x < std::numeric_limits<acc_t>::infinity())
            x = neg_inf<acc_t>();
        }
        logits[j] = kStats ? unmasked : x;
        tile_max = nan_max(tile_max, x);
      }
      tile_max = warp_max<kLanesPerRow>(tile_max);
      const acc_t new_max = nan_max(running_max, tile_max);
      // While every key so far is masked there is nothing to add (and -inf - -inf would be NaN).
      if (new_max != neg_inf<acc_t>()) {
        const acc_t rescale = exp2_of(running_max - new_max);
        if constexpr (kStats) {
          if (with_entropy) entropy = moved_entropy(entropy, total, running_max, new_max, rescale);
          time_weighted *= rescale;
        }
        total *= rescale;
        mass *= rescale;
        weighted *= rescale;
        for (int j = sub; j < kBlockN; j += kLanesPerRow) {
          acc_t x = logits[j];
          if constexpr (kStats) {
            if (p.renormalize && !is_positioned(key_x[j]) && x < std::numeric_limits<acc_t>::infinity())
              x = neg_inf<acc_t>();
          }
          const acc_t weight = exp2_of(x - new_max);  // 0 for masked keys
          total += weight;
          if constexpr (kStats) {
            if (with_entropy) entropy += weighted_exponent(weight, x - new_max);
          }
          if (is_positioned(key_x[j])) {
            mass += weight;
            weighted += weight * (patch * position_distance<acc_t>(query[0] - key_x[j], query[1] - key_y[j],
                                                                   query[2] - key_z[j]));
            if constexpr (kStats) {
              if (with_times) time_weighted += weight * abs_of(query_time - key_time[j]);
            }
          }
        }
        running_max = new_max;
      }
      if constexpr (kStats) {
        // The keys without a position (prefix tokens, padding) under their own max, unmasked.
        positionless_tile_max = warp_max<kLanesPerRow>(positionless_tile_max);
        const acc_t positionless_max = nan_max(positionless.max, positionless_tile_max);
        if (positionless_max != neg_inf<acc_t>()) {
          positionless.move_to(positionless_max, with_entropy);
          for (int j = sub; j < kBlockN; j += kLanesPerRow) {
            if (k_begin + j >= p.num_keys || is_positioned(key_x[j])) continue;
            const acc_t x = logits[j] - positionless_max;
            const acc_t weight = exp2_of(x);
            positionless.total += weight;
            if (with_entropy) positionless.entropy += weighted_exponent(weight, x);
          }
        }
      }
    }
    total = warp_sum<kLanesPerRow>(total);
    mass = warp_sum<kLanesPerRow>(mass);
    weighted = warp_sum<kLanesPerRow>(weighted);
    if constexpr (!kStats) {
      // A row with every key masked has total == 0 and gives NaN, as softmax does; so does a query without a
      // position.
      if (valid_row && sub == 0)
        p.per_query[b * p.num_queries + t] =
            has_position ? weighted / (p.renormalize ? mass : total) : std::numeric_limits<acc_t>::quiet_NaN();
    } else {
      entropy = warp_sum<kLanesPerRow>(entropy);
      time_weighted = warp_sum<kLanesPerRow>(time_weighted);
      positionless.total = warp_sum<kLanesPerRow>(positionless.total);
      positionless.entropy = warp_sum<kLanesPerRow>(positionless.entropy);
      own_logit = warp_max<kLanesPerRow>(own_logit);  // one lane of the row saw it; -inf on the others
      if (valid_row && sub == 0) {
        constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
        // As the CPU kernels' query_stats (mad_qk_cpu.cpp): MAD and the temporal MAD over MAD's normaliser; the
        // whole row's statistics from both states moved to their common max M (log2 units here):
        // H = ln 2 * (log2 Z - sum 2^(x - M) (x - M) / Z).
        const acc_t normaliser = p.renormalize ? mass : total;
        acc_t values[5] = {weighted / normaliser, kNaN, kNaN, kNaN, with_times ? time_weighted / normaliser : kNaN};
        const acc_t max = nan_max(running_max, positionless.max);
        if (abs_of(max) < std::numeric_limits<acc_t>::infinity()) {
          const acc_t keyed_scale = exp2_of(running_max - max);  // 0 for a side without keys (max -inf)
          const acc_t positionless_scale = exp2_of(positionless.max - max);
          acc_t all = total * keyed_scale;
          if (p.renormalize) all += positionless.total * positionless_scale;
          if (with_entropy) {
            acc_t sum = moved_entropy(entropy, total, running_max, max, keyed_scale);
            if (p.renormalize)
              sum += moved_entropy(positionless.entropy, positionless.total, positionless.max, max, positionless_scale);
            values[1] = static_cast<acc_t>(0.6931471805599453) * (log2_of(all) - sum / all);
          }
          values[2] = positionless.total * positionless_scale / all;
          values[3] = exp2_of(own_logit - max) / all;
        }
        for (int stat = 0; stat < 5; ++stat) {
          acc_t* out = p.stat_rows[stat];
          if (out != nullptr) out[b * p.num_queries + t] = has_position ? values[stat] : kNaN;
        }
      }
    }
  }
}

// The tiles of q and k, the logits, and the key tile's three coordinates (and frames, for the statistics).
template <typename scalar_t>
size_t shared_bytes(int head_dim_padded, bool stats) {
  using Cfg = TileConfig<scalar_t>;
  const size_t ld = head_dim_padded + Cfg::kPad;
  return (Cfg::kBlockM + Cfg::kBlockN) * ld * sizeof(typename Cfg::mma_t) +
         (Cfg::kBlockM * (Cfg::kBlockN + 4) + (stats ? 4 : 3) * Cfg::kBlockN) * sizeof(typename Cfg::acc_t);
}

template <typename scalar_t, typename bias_t, bool kPositions, bool kStats = false>
void launch_mad_qk(QkParams<typename TileConfig<scalar_t>::acc_t> p, int device) {
  using Cfg = TileConfig<scalar_t>;
  p.head_dim_padded = Cfg::kTensorCores ? (p.head_dim + 15) / 16 * 16 : p.head_dim;
  const size_t smem = shared_bytes<scalar_t>(p.head_dim_padded, kStats);
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK_VALUE(smem <= static_cast<size_t>(smem_limit), "vitmad.mad_qk: head dimension D = ", p.head_dim,
                    " needs ", smem, " bytes of shared memory per block on CUDA, the device allows ", smem_limit);
  constexpr auto kernel = &mad_qk_kernel<scalar_t, bias_t, kPositions, kStats>;
  dynamic_shared_memory_limit<kernel>(device, smem_limit);  // the device's maximum, set once
  const dim3 blocks((p.num_queries + Cfg::kBlockM - 1) / Cfg::kBlockM,
                    static_cast<unsigned>(std::min<int64_t>(p.num_matrices, kMaxGridY)));
  kernel<<<blocks, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The parameters both forms share: q, k, the bias view and the output buffer.
template <typename acc_t>
QkParams<acc_t> common_params(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& bias,
                              const QkShape& shape, bool renormalize, const at::Tensor& per_query) {
  QkParams<acc_t> p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.per_query = per_query.mutable_data_ptr<acc_t>();
  p.q_lead = matrix_offsets(q, "vitmad.mad_qk", "q");
  p.k_lead = matrix_offsets(k, "vitmad.mad_qk", "k");
  p.q_stride_n = q.stride(-2);
  p.q_stride_d = q.stride(-1);
  p.k_stride_n = k.stride(-2);
  p.k_stride_d = k.stride(-1);
  if (bias.has_value()) {
    p.bias_lead = matrix_offsets(*bias, "vitmad.mad_qk", "attn_bias");
    p.bias_stride_q = bias->stride(-2);
    p.bias_stride_k = bias->stride(-1);
  }
  p.num_matrices = shape.num_matrices;
  p.q_tokens = static_cast<int>(shape.num_queries);
  p.num_keys = static_cast<int>(shape.num_keys);
  p.head_dim = static_cast<int>(shape.head_dim);
  p.logit_scale = shape.scale * kLog2e;
  p.renormalize = renormalize;
  return p;
}

// Launches the kernel for q's dtype, with the bias type (bool mask or q's dtype) as a template argument; fill
// sets the form's own parameters.
// The statistics (kStats) run the portable kernel for every dtype: the sm_80 kernel computes MAD alone.
template <bool kPositions, bool kStats = false, typename FillFn>
void dispatch_mad_qk(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& attn_bias,
                     const QkShape& shape, bool renormalize, const at::Tensor& per_query, FillFn fill,
                     const char* op_name = "vitmad.mad_qk") {
  TORCH_CHECK_VALUE(shape.num_queries < INT_MAX / 2 && shape.num_keys < INT_MAX / 2 && shape.head_dim < INT_MAX / 2,
                    op_name, ": N and D must be below 2^30 on CUDA, got q of shape ", q.sizes(), " and k of shape ",
                    k.sizes());
  std::optional<at::Tensor> bias;
  if (attn_bias.has_value()) bias = broadcast_attn_bias(*attn_bias, q, k);
  const bool bool_mask = bias.has_value() && bias->scalar_type() == at::kBool;
  const int device = q.get_device();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "vitmad_mad_qk_cuda", [&] {
    using acc_t = typename TileConfig<scalar_t>::acc_t;
    QkParams<acc_t> p = common_params<acc_t>(q, k, bias, shape, renormalize, per_query);
    fill(p);
    if constexpr (!kStats && (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>)) {
      // Tensor cores with the logits in registers from sm_80 on (mad_qk_sm80.cu); this file's kernel before, and
      // for float32 and float64, whose logits come from plain FMAs here. (A float32 variant of the sm_80 kernel
      // on TF32 splits ran at 0.8-0.9x SDPA's float32 time on an H200 but failed two tests there: an infinite
      // k made every logit NaN through inf - inf in the split, and logits near 1e4 missed float32's accuracy.)
      if (bool_mask ? launch_mad_qk_sm80<scalar_t, bool, kPositions>(p, device)
                    : launch_mad_qk_sm80<scalar_t, scalar_t, kPositions>(p, device))
        return;
    }
    if (bool_mask)
      launch_mad_qk<scalar_t, bool, kPositions, kStats>(p, device);
    else
      launch_mad_qk<scalar_t, scalar_t, kPositions, kStats>(p, device);
  });
}

// The position form's queries and keys (mad_qk_pos, stats_qk_pos).
template <typename acc_t>
void set_positions(QkParams<acc_t>& p, const PositionArgs& args) {
  const PositionLayout& l = args.layout;
  p.first_query = 0;
  p.num_queries = static_cast<int>(l.num_queries);
  p.patch = 1.0;
  p.query_positions = position_rows<acc_t>(args.queries, l.dims);
  p.key_positions = position_rows<acc_t>(args.keys, l.dims);
}

// The grid form's queries, the patches after the prefix tokens (mad_qk, stats_qk).
template <typename acc_t>
void set_grid(QkParams<acc_t>& p, const MadLayout& l, int64_t patch) {
  p.first_query = static_cast<int>(l.num_prefix);
  p.num_queries = static_cast<int>(l.num_patches);
  p.grid_w = static_cast<int>(l.grid_w);
  p.patch = static_cast<double>(patch);
}

at::Tensor mad_qk_cuda(const at::Tensor& q, const at::Tensor& k, int64_t patch, int64_t num_prefix_tokens,
                       at::OptionalIntArrayRef grid, std::optional<double> scale,
                       const std::optional<at::Tensor>& attn_bias, bool renormalize, c10::string_view reduction) {
  const MadQkLayout ql = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize,
                                           reduction, "vitmad.mad_qk");
  const MadLayout& l = ql.mad;
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto [per_query, out] = empty_mad_outputs(q, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return out;

  const QkShape shape{l.num_tokens, l.num_tokens, ql.head_dim, l.num_matrices, ql.scale};
  dispatch_mad_qk<false>(q, k, attn_bias, shape, l.renormalize, per_query,
                         [&](auto& p) { set_grid(p, l, patch); });
  if (!l.reduce_mean) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "vitmad_mad_qk_cuda_mean", [&] {
    launch_mean_over_queries(per_query.const_data_ptr<scalar_t>(), l.num_matrices, l.num_patches, AllQueries{},
                             out.mutable_data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
  });
  return out;
}

at::Tensor mad_qk_pos_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                           const std::optional<at::Tensor>& key_positions, std::optional<double> scale,
                           const std::optional<at::Tensor>& attn_bias, bool renormalize, c10::string_view reduction) {
  const QkShape shape = check_qk_tensors(q, k, scale, attn_bias, /*same_tokens=*/false, "vitmad.mad_qk");
  const c10::cuda::CUDAGuard device_guard(q.device());
  const auto out_dtype = mad_output_dtype(q.scalar_type());
  const PositionArgs args =
      check_position_args(q, shape.num_queries, shape.num_keys, positions, key_positions, renormalize, reduction,
                          out_dtype, can_check_position_values(), "vitmad.mad_qk");
  const PositionLayout& l = args.layout;
  const auto [per_query, out] = empty_mad_outputs(q, l.num_matrices, l.num_queries, l.reduce_mean);
  if (l.num_matrices == 0 || l.num_queries == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());

  dispatch_mad_qk<true>(q, k, attn_bias, shape, l.renormalize, per_query,
                        [&](auto& p) { set_positions(p, args); });
  if (!l.reduce_mean) return out;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "vitmad_mad_qk_pos_cuda_mean", [&] {
    launch_mean_over_queries(per_query.const_data_ptr<scalar_t>(), l.num_matrices, l.num_queries,
                             PositionedQueries<scalar_t>{position_rows<scalar_t>(args.queries, l.dims)},
                             out.mutable_data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream());
  });
  return out;
}

// The statistics ops (stats_qk, stats_qk_pos): the same kernel with kStats, every statistic of a query from one
// online-softmax pass over its keys, as the CPU kernels compute them (mad_qk_cpu.cpp).

constexpr const char* kStatsQkOp = "vitmad.attention_stats_qk";

// The statistics asked for: where each goes, and whether entropy's sums are kept.
template <typename acc_t>
void set_stat_rows(QkParams<acc_t>& p, const StatsRequest& request, const at::Tensor& per_query) {
  fill_stat_rows(p.stat_rows, request, per_query);
  p.wants_entropy = request.wants(Stat::kEntropy);
}

at::Tensor stats_qk_cuda(const at::Tensor& q, const at::Tensor& k, int64_t patch, c10::ArrayRef<std::string> stats,
                         int64_t num_prefix_tokens, at::OptionalIntArrayRef grid, std::optional<double> scale,
                         const std::optional<at::Tensor>& attn_bias, bool renormalize, c10::string_view reduction) {
  const MadQkLayout ql = check_mad_qk_args(q, k, patch, num_prefix_tokens, grid, scale, attn_bias, renormalize,
                                           reduction, kStatsQkOp);
  const MadLayout& l = ql.mad;
  const StatsRequest request = check_stats(stats, l.num_tokens, l.num_tokens, /*has_times=*/false, kStatsQkOp);
  const c10::cuda::CUDAGuard device_guard(q.device());
  StatsOutputs outputs = empty_stats_outputs(q, request, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return outputs.out;

  const QkShape shape{l.num_tokens, l.num_tokens, ql.head_dim, l.num_matrices, ql.scale};
  dispatch_mad_qk<false, true>(q, k, attn_bias, shape, l.renormalize, outputs.per_query, [&](auto& p) {
    set_grid(p, l, patch);
    set_stat_rows(p, request, outputs.per_query);
  }, kStatsQkOp);
  if (!l.reduce_mean) return outputs.out;
  AT_DISPATCH_FLOATING_TYPES(outputs.out.scalar_type(), "vitmad_stats_qk_cuda_mean", [&] {
    mean_of_stats<scalar_t>(outputs.per_query, l.num_matrices, l.num_patches, AllQueries{}, outputs.out);
  });
  return outputs.out;
}

at::Tensor stats_qk_pos_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                             const std::optional<at::Tensor>& key_positions, c10::ArrayRef<std::string> stats,
                             std::optional<double> scale, const std::optional<at::Tensor>& attn_bias,
                             bool renormalize, c10::string_view reduction, const std::optional<at::Tensor>& times,
                             const std::optional<at::Tensor>& key_times) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  const StatsQkPosArgs checked = check_stats_qk_pos_args(q, k, positions, key_positions, stats, scale, attn_bias,
                                                         renormalize, reduction, times, key_times,
                                                         can_check_position_values(), kStatsQkOp);
  const QkShape& shape = checked.shape;
  const PositionArgs& args = checked.positions;
  const PositionLayout& l = args.layout;
  const StatsRequest& request = checked.request;
  const std::optional<PositionArgs>& time_args = checked.times;
  StatsOutputs outputs = empty_stats_outputs(q, request, l.num_matrices, l.num_queries, l.reduce_mean);
  if (l.num_matrices == 0) return outputs.out;
  // No query: nothing to launch; the means are NaN, as over queries none of which has a position.
  if (l.num_queries == 0) return outputs.out.fill_(std::numeric_limits<double>::quiet_NaN());

  dispatch_mad_qk<true, true>(q, k, attn_bias, shape, l.renormalize, outputs.per_query, [&](auto& p) {
    using acc_t = std::remove_pointer_t<decltype(p.per_query)>;
    set_positions(p, args);
    set_stat_rows(p, request, outputs.per_query);
    if (time_args.has_value()) {
      // The frames as one-coordinate positions; NaN exactly at the tokens without a position (check_time_args).
      p.has_times = true;
      p.query_times = position_rows<acc_t>(time_args->queries, 1);
      p.key_times = position_rows<acc_t>(time_args->keys, 1);
    }
  }, kStatsQkOp);
  if (!l.reduce_mean) return outputs.out;
  AT_DISPATCH_FLOATING_TYPES(outputs.out.scalar_type(), "vitmad_stats_qk_pos_cuda_mean", [&] {
    mean_of_stats<scalar_t>(outputs.per_query, l.num_matrices, l.num_queries,
                            PositionedQueries<scalar_t>{position_rows<scalar_t>(args.queries, l.dims)}, outputs.out);
  });
  return outputs.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CUDA, m) {
  m.impl("mad_qk", &mad_qk_cuda);
  m.impl("mad_qk_pos", &mad_qk_pos_cuda);
  if (cuda_stats_kernels_enabled()) {  // stats_common.cuh: not yet run on a GPU
    m.impl("stats_qk", &stats_qk_cuda);
    m.impl("stats_qk_pos", &stats_qk_pos_cuda);
  }
}

}  // namespace vitmad
