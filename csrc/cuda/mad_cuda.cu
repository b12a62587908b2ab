// CUDA kernels of vitmad::mad and vitmad::mad_backward.
//
// Rows of contiguous keys whose distance table fits in shared memory (about 32 (N - P) bytes, at most
// kMaxTableBytes, so N - P up to about 3000) go to mad_rows_kernel: a block serves the queries of one grid
// column qc, and for those the distance to a key depends on key - query alone (the row and column offsets
// follow from qc + key - query), so the block builds that table once (2 (N - P) - 1 values, plus shifted
// copies that make every 16-byte key vector meet a 16-byte-aligned run of distances) and the steady-state
// loop is a 16-byte load, a shared-memory read and a multiply-add per element: no index math, no division,
// no square root. A group of kLanes adjacent lanes (8 or 16 for short rows, a whole warp otherwise) serves
// one row, reading its keys in place with 16-byte vector loads (single-element loads for the unaligned head
// and the tail), and joins its partial sums with a shuffle butterfly. Other rows (strided keys, or rows too
// long for the table) go to mad_rows_direct_kernel, one warp per row, which computes each distance from the
// key index. Every sum has a fixed order, so results are bit-identical from run to run: the per-query values
// are written to a [matrices, N - P] buffer and a second small kernel (one warp per matrix) averages them for
// reduction="mean". A view whose query axis is the contiguous one (a transpose) is read by columns instead,
// so loads stay coalesced.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../mad_args.h"
#include "../mad_geometry.h"
#include "cuda_common.cuh"

namespace vitmad {
namespace {

// Vectors each lane loads before using any, so enough bytes are in flight to saturate HBM.
constexpr int kUnroll = 4;
// Key groups (warps) that split the keys of 32 queries in the column kernel.
constexpr int kKeyGroups = kWarpsPerBlock;
// The distance table of mad_rows_kernel takes about 32 (N - P) bytes. Past 48 KiB a kernel must opt in to
// more shared memory; 96 KiB still leaves two blocks per SM (enough loads in flight to keep HBM busy), and
// covers N - P up to about 3000 (a 48 x 48 grid). Longer rows use the direct kernel.
constexpr int kMaxTableBytes = 96 * 1024;
// Rows with fewer patch keys than this are served by at most 16 lanes: per-row setup (split, pointers, the
// butterfly) is then paid by fewer lanes, and a 16-byte load still covers 256 contiguous bytes.
constexpr int64_t kKeysFor16Lanes = 400;

// What every kernel needs to know about one attention tensor. Indices within a matrix fit in 32 bits
// (checked on the host); offsets between matrices and rows are 64-bit.
struct Geometry {
  MatrixOffsets matrix_offset;
  int64_t query_stride;
  int64_t key_stride;
  int32_t num_tokens;
  int32_t num_prefix;
  int32_t num_patches;
  int32_t grid_w;
};

template <typename scalar_t, int kSize>
struct alignas(sizeof(scalar_t) * kSize) AlignedVector {
  scalar_t val[kSize];
};

template <typename acc_t>
struct Sums {
  acc_t weighted;  // sum_s a[s] * d(t, s), d in patches (the caller multiplies by the patch size once)
  acc_t mass;      // sum_s a[s], with kMass only
};

// Element i of a 16-byte vector held as four raw 32-bit words, widened to acc_t with plain bit operations
// (one instruction per element for the 16-bit types; the compiler's own bfloat16 path moves the upper half
// into a register of its own first, which costs an instruction and a register per pair).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t widen(const AlignedVector<uint32_t, 4>& w, int i) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return __uint_as_float(w.val[i]);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    double d;  // a copy rather than __hiloint2double: the backward kernel then needs fewer registers
    memcpy(&d, &w.val[2 * i], sizeof(d));
    return d;
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return __uint_as_float(i % 2 == 0 ? w.val[i / 2] << 16 : w.val[i / 2] & 0xffff0000u);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "float, double, Half or BFloat16");
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w.val[i / 2] >> (16 * (i % 2)))));
  }
}

// Square root of a squared grid distance, an exact integer >= 0: sqrt.approx.ftz is within about 2^-23 of
// the exact root and is one instruction (the plain sqrtf of a -prec-sqrt=false build adds a subnormal
// fix-up), and flushing subnormals never matters for 0 or values >= 1. (float64 takes the KeyWalk path, with
// the exact root.)
__device__ __forceinline__ float grid_sqrt(float d2) {
  float d;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(d) : "f"(d2));
  return d;
}

// Hands this lane's 16-byte vectors v, v + kStride, ... (below num_vectors) to add(x, index) in order, kUnroll at
// a time with every load of a step issued before any is used, so short rows (a 577-token bfloat16 row is 72
// vectors) keep as many bytes in flight as long ones. kWholeSteps: whole steps without masks, then at most one
// masked step; otherwise one masked loop throughout (fewer registers).
template <int kStride, bool kWholeSteps, typename Vec, typename AddFn>
__device__ __forceinline__ void for_each_vector(const Vec* __restrict__ vectors, int32_t num_vectors, int32_t v,
                                                AddFn add) {
  auto masked_step = [&](int32_t first) {
    Vec x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (first + u * kStride < num_vectors) x[u] = vectors[first + u * kStride];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (first + u * kStride < num_vectors) add(x[u], first + u * kStride);
    }
  };
  if constexpr (kWholeSteps) {
    for (; v + (kUnroll - 1) * kStride < num_vectors; v += kUnroll * kStride) {
      Vec x[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) x[u] = vectors[v + u * kStride];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) add(x[u], v + u * kStride);
    }
    if (v < num_vectors) masked_step(v);
  } else {
    for (; v < num_vectors; v += kUnroll * kStride) masked_step(v);
  }
}

// This lane's share of the sums over the `count` patch keys of one query row whose keys are contiguous.
// Lanes take 16-byte vectors round-robin, so a warp reads 512 contiguous bytes per step. Each lane keeps
// the grid (row, column) of its next vector's first key and advances it by the fixed step between its
// vectors (kWarp * kVec keys), so a row costs three divisions (query, first key, step) instead of two per
// vector. With grid_w >= kVec a vector wraps onto the next grid row at most once, so each key picks one of
// two precomputed (dcol, drow^2) bases. Without kStepped (narrower grids, and callers that cannot spare the
// registers) every vector starts a KeyWalk instead: two divisions per vector, any grid.
template <typename scalar_t, typename acc_t, bool kMass, bool kStepped>
__device__ __forceinline__ Sums<acc_t> lane_sums_walk(const scalar_t* __restrict__ keys, int32_t count,
                                                      int32_t query, int32_t grid_w, int lane) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  constexpr int32_t kStride = kWarp * kVec;  // keys from one of this lane's vectors to its next
  using Vec = AlignedVector<uint32_t, 4>;    // raw words, widened by widen()
  const auto split = split_for_vectors<int32_t>(reinterpret_cast<uint64_t>(keys), count, sizeof(scalar_t));
  Sums<acc_t> sums{0, 0};
  auto add = [&](acc_t a, acc_t distance) {
    sums.weighted += a * distance;
    if constexpr (kMass) sums.mass += a;
  };
  // Used with kStepped only (the compiler drops them otherwise).
  const int32_t query_row = query / grid_w;
  const int32_t query_col = query - query_row * grid_w;
  const int32_t first_key = split.head + lane * kVec;
  int32_t key_row = first_key / grid_w;  // of this lane's next vector's first key
  int32_t key_col = first_key - key_row * grid_w;
  const int32_t step_rows = kStride / grid_w;
  const int32_t step_cols = kStride - step_rows * grid_w;
  auto add_vector = [&](const Vec& x, int32_t first) {
    if constexpr (!kStepped) {
      KeyWalk<acc_t, int32_t> walk(query, first, grid_w);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        add(widen<scalar_t, acc_t>(x, i), walk.distance());
        walk.next();
      }
    } else {
      const auto dr = static_cast<acc_t>(query_row - key_row);
      const acc_t dr2 = dr * dr;
      const acc_t dr2_next = (dr - acc_t(1)) * (dr - acc_t(1));  // keys past the wrap are one grid row down
      const auto dc = static_cast<acc_t>(query_col - key_col);
      const acc_t dc_next = dc + static_cast<acc_t>(grid_w);
      const int32_t wrap = grid_w - key_col;  // keys i >= wrap of the vector sit on the next grid row
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const bool next_row = i >= wrap;
        const acc_t dcol = (next_row ? dc_next : dc) - static_cast<acc_t>(i);
        add(widen<scalar_t, acc_t>(x, i), grid_sqrt(dcol * dcol + (next_row ? dr2_next : dr2)));
      }
    }
    if constexpr (kStepped) {
      key_row += step_rows;
      key_col += step_cols;
      if (key_col >= grid_w) {
        key_col -= grid_w;
        ++key_row;
      }
    }
  };
  auto add_single = [&](int32_t key) {
    add(static_cast<acc_t>(keys[key]), token_distance<acc_t>(query, key, grid_w));
  };

  // The head is shorter than a vector unless the row is not even element-aligned; the tail always is.
  for (int32_t key = lane; key < split.head; key += kWarp) add_single(key);
  const Vec* vectors = reinterpret_cast<const Vec*>(keys + split.head);
  // add_vector must see this lane's vectors in order, as it advances the grid position. Without kStepped, one
  // masked loop: the split into whole steps costs registers that KeyWalk's callers do not have to spare.
  for_each_vector<kWarp, kStepped>(vectors, split.vectors, lane, [&](const Vec& x, int32_t index) {
    add_vector(x, split.head + index * kVec);
  });
  const int32_t tail_key = split.head + split.vectors * kVec + lane;
  if (tail_key < count) add_single(tail_key);
  return sums;
}

// The stepped walk where kStep allows it and the grid is at least a vector wide; grids narrower than a
// vector get their own loop, so the common one carries no division. The stepped walk holds more registers:
// the backward kernel (whose row pass is not its main cost) and float64 (whose exact square root needs many)
// keep KeyWalk and stay within 64 registers without spills.
template <typename scalar_t, typename acc_t, bool kMass, bool kStep>
__device__ __forceinline__ Sums<acc_t> lane_sums_contiguous(const scalar_t* __restrict__ keys, int32_t count,
                                                            int32_t query, int32_t grid_w, int lane) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  if constexpr (kStep) {
    if (grid_w >= kVec) return lane_sums_walk<scalar_t, acc_t, kMass, true>(keys, count, query, grid_w, lane);
  }
  return lane_sums_walk<scalar_t, acc_t, kMass, false>(keys, count, query, grid_w, lane);
}

// The same for keys `key_stride` elements apart (a strided view): one element per lane per step.
template <typename scalar_t, typename acc_t, bool kMass>
__device__ __forceinline__ Sums<acc_t> lane_sums_strided(const scalar_t* __restrict__ keys, int64_t key_stride,
                                                         int32_t count, int32_t query, int32_t grid_w, int lane) {
  Sums<acc_t> sums{0, 0};
  for (int32_t key = lane; key < count; key += kWarp) {
    const acc_t a = static_cast<acc_t>(keys[key * key_stride]);
    sums.weighted += a * token_distance<acc_t>(query, key, grid_w);
    if constexpr (kMass) sums.mass += a;
  }
  return sums;
}

// The whole warp's sums for one query row; every lane gets them. kStep: see lane_sums_contiguous.
template <typename scalar_t, typename acc_t, bool kContiguousKeys, bool kMass, bool kStep = false>
__device__ __forceinline__ Sums<acc_t> row_sums(const scalar_t* __restrict__ attn, const Geometry& g, int64_t matrix,
                                                int32_t query, int lane) {
  const scalar_t* keys = attn + g.matrix_offset(matrix) + (g.num_prefix + query) * g.query_stride +
                         g.num_prefix * g.key_stride;
  Sums<acc_t> sums;
  if constexpr (kContiguousKeys) {
    sums = lane_sums_contiguous<scalar_t, acc_t, kMass, kStep>(keys, g.num_patches, query, g.grid_w, lane);
  } else {
    sums = lane_sums_strided<scalar_t, acc_t, kMass>(keys, g.key_stride, g.num_patches, query, g.grid_w, lane);
  }
  return {warp_sum(sums.weighted), kMass ? warp_sum(sums.mass) : acc_t(0)};
}

// per_query[matrix * (N - P) + t] = m_t, one warp per (matrix, query t); kMass is renormalisation. For
// strided keys and rows too long for mad_rows_kernel's table. At least 4 blocks per SM caps registers at 64.
template <typename scalar_t, typename acc_t, bool kContiguousKeys, bool kMass>
__global__ void __launch_bounds__(kBlockThreads, 4)
    mad_rows_direct_kernel(const scalar_t* __restrict__ attn, const Geometry g, int64_t num_rows, acc_t patch,
                    acc_t* __restrict__ per_query) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < num_rows;
       row += warps) {
    const int64_t matrix = row / g.num_patches;
    const auto query = static_cast<int32_t>(row - matrix * g.num_patches);
    constexpr bool kStep = !std::is_same_v<acc_t, double>;
    const Sums<acc_t> sums = row_sums<scalar_t, acc_t, kContiguousKeys, kMass, kStep>(attn, g, matrix, query, lane);
    if (lane == 0) per_query[row] = kMass ? patch * sums.weighted / sums.mass : patch * sums.weighted;
  }
}

// The distance table of mad_rows_kernel. For queries in grid column qc, the distance in patches to a key
// `j = key - query` tokens away depends on j alone: with t = qc + j + (N - P) > 0 the key sits at column
// t % gw, grid_h - t / gw rows above the query. Entry x = j + (N - P) - 1 (0 <= x < 2 (N - P) - 1) holds it.
// kTabVec copies of length table_len, copy s shifted by s entries, so that for any query the distances of an
// aligned key vector start 16-byte aligned in one of them.
template <typename acc_t>
constexpr int kTabVec = kVectorBytes / sizeof(acc_t);

template <typename acc_t>
__host__ __device__ __forceinline__ int32_t table_len(int32_t num_patches) {
  return (2 * num_patches - 1 + kTabVec<acc_t> - 1 + kTabVec<acc_t> - 1) / kTabVec<acc_t> * kTabVec<acc_t>;
}

template <typename acc_t>
int64_t table_bytes(int64_t num_patches) {
  constexpr int64_t kTab = kTabVec<acc_t>;
  return kTab * ((2 * num_patches - 1 + 2 * (kTab - 1)) / kTab * kTab) * static_cast<int64_t>(sizeof(acc_t));
}

// Correctly rounded square roots: the table is built once per block, so it may as well be exact (the file
// is built with -prec-sqrt=false, which makes a plain float sqrt approximate).
__device__ __forceinline__ float exact_sqrt(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double exact_sqrt(double x) { return __dsqrt_rn(x); }

template <typename acc_t>
__device__ void build_table(acc_t* __restrict__ table, const Geometry& g, int32_t grid_h, int32_t qc) {
  constexpr int kTab = kTabVec<acc_t>;
  const int32_t len = table_len<acc_t>(g.num_patches);
  const int32_t entries = 2 * g.num_patches - 1;
  for (int32_t x = threadIdx.x; x < len; x += kBlockThreads) {
    acc_t d = 0;  // past the last entry: never read for a key, but defined
    if (x < entries) {
      const auto t = static_cast<uint32_t>(qc + x + 1);
      const auto gw = static_cast<uint32_t>(g.grid_w);
      const acc_t dr = static_cast<acc_t>(grid_h - static_cast<int32_t>(t / gw));
      const acc_t dc = static_cast<acc_t>(qc - static_cast<int32_t>(t % gw));
      d = exact_sqrt(dr * dr + dc * dc);
    }
    table[x] = d;
  }
  __syncthreads();
  // Copy s (1 <= s < kTab) holds entry y - s at y.
#pragma unroll
  for (int s = 1; s < kTab; ++s) {
    for (int32_t y = threadIdx.x; y < len; y += kBlockThreads) table[s * len + y] = y >= s ? table[y - s] : acc_t(0);
  }
  __syncthreads();
}

// This lane's share of the sums over the `count` contiguous patch keys of one row; dist[k] is the distance
// to key k, 16-byte aligned wherever keys + k is. Lanes of the group take 16-byte vectors round-robin.
template <typename scalar_t, typename acc_t, int kLanes, bool kMass>
__device__ __forceinline__ Sums<acc_t> lane_sums_table(const scalar_t* __restrict__ keys, int32_t count,
                                                       const acc_t* __restrict__ dist, int lane) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  constexpr int kTab = kTabVec<acc_t>;
  static_assert(kVec % kTab == 0, "a key vector must meet whole 16-byte runs of distances");
  using Words = AlignedVector<uint32_t, 4>;
  using TabVec = AlignedVector<acc_t, kTab>;
  const auto split = split_for_vectors<int32_t>(reinterpret_cast<uint64_t>(keys), count, sizeof(scalar_t));
  Sums<acc_t> sums{0, 0};
  auto add = [&](acc_t a, acc_t distance) {
    sums.weighted += a * distance;
    if constexpr (kMass) sums.mass += a;
  };
  auto add_vector = [&](const Words& x, int32_t v) {
    const TabVec* d = reinterpret_cast<const TabVec*>(dist + split.head) + v * (kVec / kTab);
#pragma unroll
    for (int p = 0; p < kVec / kTab; ++p) {
      const TabVec t = d[p];
#pragma unroll
      for (int i = 0; i < kTab; ++i) add(widen<scalar_t, acc_t>(x, p * kTab + i), t.val[i]);
    }
  };
  for (int32_t key = lane; key < split.head; key += kLanes) add(static_cast<acc_t>(keys[key]), dist[key]);
  const Words* vectors = reinterpret_cast<const Words*>(keys + split.head);
  for_each_vector<kLanes, true>(vectors, split.vectors, lane, add_vector);
  const int32_t tail_key = split.head + split.vectors * kVec + lane;
  if (tail_key < count) add(static_cast<acc_t>(keys[tail_key]), dist[tail_key]);
  return sums;
}

// per_query[matrix * (N - P) + t] = m_t for rows of contiguous keys; kMass is renormalisation. Block
// (qc, y) serves the queries t = rho * gw + qc of grid column qc: item i = matrix * grid_h + rho, items
// y * groups + group, then every gridDim.y * groups further. The item is stepped with a carry (no division
// per row), and a warp runs until none of its groups has an item left, since the butterfly needs all lanes.
template <typename scalar_t, typename acc_t, int kLanes, bool kMass>
__global__ void __launch_bounds__(kBlockThreads, 4)
    mad_rows_kernel(const scalar_t* __restrict__ attn, const Geometry g, int32_t grid_h, int64_t num_matrices,
                    acc_t patch, acc_t* __restrict__ per_query) {
  static_assert(kWarp % kLanes == 0, "lane groups tile a warp");
  constexpr int kGroups = kBlockThreads / kLanes;
  constexpr int kTab = kTabVec<acc_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* table = reinterpret_cast<acc_t*>(shared_bytes);
  const auto qc = static_cast<int32_t>(blockIdx.x);
  build_table(table, g, grid_h, qc);

  const int lane = threadIdx.x % kLanes;
  const auto first = static_cast<uint32_t>(blockIdx.y * kGroups + threadIdx.x / kLanes);  // < 2^16 * 2^5
  const auto step = static_cast<uint32_t>(gridDim.y * kGroups);
  const auto rows = static_cast<uint32_t>(grid_h);
  int64_t matrix = first / rows;
  auto rho = static_cast<int32_t>(first % rows);
  const int64_t matrix_step = step / rows;
  const auto rho_step = static_cast<int32_t>(step % rows);
  const int32_t len = table_len<acc_t>(g.num_patches);
  while (true) {
    const bool active = matrix < num_matrices;
    if (!__any_sync(0xffffffffu, active)) break;
    Sums<acc_t> sums{0, 0};
    const int32_t query = rho * g.grid_w + qc;
    if (active) {
      const scalar_t* keys = attn + g.matrix_offset(matrix) + (g.num_prefix + query) * g.query_stride + g.num_prefix;
      // Copy s of the table, s chosen so that the distance of the first aligned key starts 16-byte aligned.
      const int32_t head = split_for_vectors<int32_t>(reinterpret_cast<uint64_t>(keys), g.num_patches,
                                                      sizeof(scalar_t)).head;
      const int32_t x = head + g.num_patches - 1 - query;  // entry of key `head`
      const int32_t s = (kTab - x % kTab) % kTab;
      const acc_t* dist = table + s * len + s + (g.num_patches - 1 - query);
      sums = lane_sums_table<scalar_t, acc_t, kLanes, kMass>(keys, g.num_patches, dist, lane);
    }
    sums.weighted = warp_sum<kLanes>(sums.weighted);
    if constexpr (kMass) sums.mass = warp_sum<kLanes>(sums.mass);
    if (active && lane == 0) {
      per_query[matrix * g.num_patches + query] = kMass ? patch * sums.weighted / sums.mass : patch * sums.weighted;
    }
    matrix += matrix_step;
    rho += rho_step;
    if (rho >= grid_h) {
      rho -= grid_h;
      ++matrix;
    }
  }
}

// The same for attention whose query axis is contiguous (a transposed view): a warp holds 32 consecutive
// queries and reads one key's column at a time (coalesced); the kKeyGroups warps of a block take one
// contiguous run of keys each (walked without divisions) and their partial sums are joined in shared memory
// in a fixed order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    mad_columns_kernel(const scalar_t* __restrict__ attn, const Geometry g, int64_t num_tiles,
                       int32_t tiles_per_matrix, bool renormalize, acc_t patch, acc_t* __restrict__ per_query) {
  __shared__ acc_t weighted[kKeyGroups][kWarp];
  __shared__ acc_t mass[kKeyGroups][kWarp];
  const int lane = threadIdx.x % kWarp;
  const int group = threadIdx.x / kWarp;
  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t matrix = tile / tiles_per_matrix;
    const auto query = static_cast<int32_t>((tile - matrix * tiles_per_matrix) * kWarp + lane);
    const int32_t keys_per_group = (g.num_patches + kKeyGroups - 1) / kKeyGroups;
    const int32_t first_key = group * keys_per_group;
    const int32_t end_key = min(g.num_patches, first_key + keys_per_group);
    Sums<acc_t> sums{0, 0};
    if (query < g.num_patches && first_key < end_key) {
      const scalar_t* column = attn + g.matrix_offset(matrix) + (g.num_prefix + query) * g.query_stride +
                               g.num_prefix * g.key_stride;
      KeyWalk<acc_t, int32_t> walk(query, first_key, g.grid_w);
#pragma unroll 4
      for (int32_t key = first_key; key < end_key; ++key) {
        const acc_t a = static_cast<acc_t>(column[key * g.key_stride]);
        sums.weighted += a * walk.distance();
        sums.mass += a;
        walk.next();
      }
    }
    weighted[group][lane] = sums.weighted;
    mass[group][lane] = sums.mass;
    __syncthreads();
    if (group == 0 && query < g.num_patches) {
      acc_t w = 0;
      acc_t m = 0;
      for (int k = 0; k < kKeyGroups; ++k) {
        w += weighted[k][lane];
        m += mass[k][lane];
      }
      per_query[matrix * g.num_patches + query] = renormalize ? patch * w / m : patch * w;
    }
    __syncthreads();
  }
}

// Writes one contiguous output row of `count` elements, value(k) for element k, with 16-byte stores where
// the row is aligned. value_vector(first, x) fills the kVec elements starting at `first`.
template <typename scalar_t, typename ValueFn, typename VectorFn>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ out, int32_t count, int lane, ValueFn value,
                                          VectorFn value_vector) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  using Vec = AlignedVector<scalar_t, kVec>;
  const auto split = split_for_vectors<int32_t>(reinterpret_cast<uint64_t>(out), count, sizeof(scalar_t));
  for (int32_t k = lane; k < split.head; k += kWarp) out[k] = value(k);
  Vec* vectors = reinterpret_cast<Vec*>(out + split.head);
  for (int32_t v = lane; v < split.vectors; v += kWarp) {
    Vec x;
    value_vector(split.head + v * kVec, x.val);
    vectors[v] = x;
  }
  const int32_t tail = split.head + split.vectors * kVec + lane;
  if (tail < count) out[tail] = value(tail);
}

// grad_attn[b, P+t, P+s] = g_t * d(t, s), or g_t * (d(t, s) - m_t) / Z_t with renormalisation, where g_t
// is the gradient reaching query t (grad[b] / (N-P) for "mean") and Z_t its mass on patch keys; zero on
// prefix rows and columns. One warp per row of the contiguous [..., N, N] output, which it writes whole
// (zeros included), so the output needs no separate zero fill.
// At least 4 blocks per SM caps registers at 64 (the bfloat16 renormalised form took 80); not for float64,
// whose renormalised form needs 76 and would spill under the cap.
template <typename scalar_t, typename acc_t, bool kContiguousKeys>
__global__ void __launch_bounds__(kBlockThreads, std::is_same_v<acc_t, double> ? 1 : 4)
    mad_backward_kernel(const scalar_t* __restrict__ attn, const Geometry g, int64_t num_rows, bool renormalize,
                        bool reduce_mean, acc_t patch, const acc_t* __restrict__ grad,
                        scalar_t* __restrict__ grad_attn) {
  constexpr int kVec = kVectorBytes / sizeof(scalar_t);
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const scalar_t zero = static_cast<scalar_t>(acc_t(0));
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp; row < num_rows;
       row += warps) {
    const int64_t matrix = row / g.num_tokens;
    const auto token = static_cast<int32_t>(row - matrix * g.num_tokens);
    scalar_t* out = grad_attn + row * g.num_tokens;
    if (token < g.num_prefix) {
      store_row(out, g.num_tokens, lane, [&](int32_t) { return zero; },
                [&](int32_t, scalar_t* x) {
#pragma unroll
                  for (int i = 0; i < kVec; ++i) x[i] = zero;
                });
      continue;
    }
    const int32_t query = token - g.num_prefix;
    acc_t scale = reduce_mean ? grad[matrix] / static_cast<acc_t>(g.num_patches)
                              : grad[matrix * g.num_patches + query];
    acc_t shift = 0;
    if (renormalize) {
      const Sums<acc_t> sums = row_sums<scalar_t, acc_t, kContiguousKeys, true>(attn, g, matrix, query, lane);
      scale /= sums.mass;
      shift = patch * sums.weighted / sums.mass;
    }
    auto value = [&](int32_t k) {
      return k < g.num_prefix ? zero
                              : static_cast<scalar_t>(
                                    scale * (patch * token_distance<acc_t>(query, k - g.num_prefix, g.grid_w) - shift));
    };
    store_row(out, g.num_tokens, lane, value, [&](int32_t first, scalar_t* x) {
      if (first < g.num_prefix) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) x[i] = value(first + i);
        return;
      }
      KeyWalk<acc_t, int32_t> walk(query, first - g.num_prefix, g.grid_w);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        x[i] = static_cast<scalar_t>(scale * (patch * walk.distance() - shift));
        walk.next();
      }
    });
  }
}

Geometry make_geometry(const at::Tensor& attn, const MadLayout& l, const char* op_name) {
  TORCH_CHECK_VALUE(l.num_tokens <= std::numeric_limits<int32_t>::max(), op_name,
                    ": attn must have at most 2^31 - 1 tokens per row on CUDA, got N = ", l.num_tokens);
  return Geometry{matrix_offsets(attn, op_name),
                  attn.stride(-2),
                  attn.stride(-1),
                  static_cast<int32_t>(l.num_tokens),
                  static_cast<int32_t>(l.num_prefix),
                  static_cast<int32_t>(l.num_patches),
                  static_cast<int32_t>(l.grid_w)};
}

template <typename scalar_t, typename acc_t>
void launch_mad(const at::Tensor& attn, const MadLayout& l, acc_t patch, acc_t* per_query, cudaStream_t stream) {
  const Geometry g = make_geometry(attn, l, "vitmad.mad");
  const scalar_t* data = attn.const_data_ptr<scalar_t>();
  if (g.key_stride != 1 && g.query_stride == 1) {
    const auto tiles_per_matrix = static_cast<int32_t>((l.num_patches + kWarp - 1) / kWarp);
    const int64_t num_tiles = l.num_matrices * tiles_per_matrix;
    mad_columns_kernel<scalar_t, acc_t><<<blocks_for(num_tiles, 1), kBlockThreads, 0, stream>>>(
        data, g, num_tiles, tiles_per_matrix, l.renormalize, patch, per_query);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (g.key_stride == 1 && l.num_patches > 0 && table_bytes<acc_t>(l.num_patches) <= kMaxTableBytes) {
    const auto shared = static_cast<int>(table_bytes<acc_t>(l.num_patches));
    const int64_t items_per_column = l.num_matrices * l.grid_h;
    const int device = attn.get_device();
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    bool launched = false;
    auto launch = [&](auto lanes, auto mass) {
      constexpr int kLanes = decltype(lanes)::value;
      constexpr int kGroups = kBlockThreads / kLanes;
      constexpr auto kernel = &mad_rows_kernel<scalar_t, acc_t, kLanes, decltype(mass)::value>;
      // Every table fits a device with 96 KiB per block (sm_80 and newer); an older one serves long rows directly.
      if (shared > dynamic_shared_memory_limit<kernel>(device, kMaxTableBytes)) return;
      int resident = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kBlockThreads, shared));
      // One wave of blocks (each builds its table once, so fewer, fuller blocks amortise it better; a few
      // blocks past one wave would double the time), and no more than one item per group.
      const int64_t wave = std::max<int64_t>(int64_t{std::max(resident, 1)} * sms / l.grid_w, 1);
      const int64_t work = (items_per_column + kGroups - 1) / kGroups;
      const dim3 blocks(static_cast<unsigned>(l.grid_w), static_cast<unsigned>(std::min<int64_t>({wave, work, 65535})));
      kernel<<<blocks, kBlockThreads, shared, stream>>>(data, g, static_cast<int32_t>(l.grid_h), l.num_matrices,
                                                        patch, per_query);
      launched = true;
    };
    // The fewest lanes that still read the whole row in one step of kUnroll vectors per lane, so a row costs
    // one memory round trip; 16 lanes for rows under kKeysFor16Lanes keys even when that takes two steps.
    const int64_t vectors = l.num_patches * static_cast<int64_t>(sizeof(scalar_t)) / kVectorBytes;
    bool_switch(l.renormalize, [&](auto mass) {
      if (vectors <= 8 * kUnroll) {
        launch(std::integral_constant<int, 8>{}, mass);
      } else if (vectors <= 16 * kUnroll || l.num_patches < kKeysFor16Lanes) {
        launch(std::integral_constant<int, 16>{}, mass);
      } else {
        launch(std::integral_constant<int, kWarp>{}, mass);
      }
    });
    if (launched) {
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  const int64_t num_rows = l.num_matrices * l.num_patches;
  const int blocks = blocks_for(num_rows, kWarpsPerBlock);
  bool_switch(g.key_stride == 1, [&](auto contiguous_keys) {
    bool_switch(l.renormalize, [&](auto mass) {
      mad_rows_direct_kernel<scalar_t, acc_t, decltype(contiguous_keys)::value, decltype(mass)::value>
          <<<blocks, kBlockThreads, 0, stream>>>(data, g, num_rows, patch, per_query);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mad_cuda(const at::Tensor& attn, int64_t patch, int64_t num_prefix_tokens, at::OptionalIntArrayRef grid,
                    bool renormalize, c10::string_view reduction) {
  const MadLayout l = check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad");
  const c10::cuda::CUDAGuard device_guard(attn.device());
  const auto [per_query, out] = empty_mad_outputs(attn, l.num_matrices, l.num_patches, l.reduce_mean);
  if (l.num_matrices == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* rows = per_query.mutable_data_ptr<acc_t>();
    launch_mad<scalar_t, acc_t>(attn, l, static_cast<acc_t>(patch), rows, stream);
    if (l.reduce_mean) {
      launch_mean_over_queries(rows, l.num_matrices, l.num_patches, AllQueries{}, out.mutable_data_ptr<acc_t>(),
                               stream);
    }
  });
  return out;
}

at::Tensor mad_backward_cuda(const at::Tensor& grad, const at::Tensor& attn, int64_t patch,
                             int64_t num_prefix_tokens, at::OptionalIntArrayRef grid, bool renormalize,
                             c10::string_view reduction) {
  const MadLayout l =
      check_mad_args(attn, patch, num_prefix_tokens, grid, renormalize, reduction, "vitmad.mad_backward");
  const at::Tensor g = check_mad_grad(grad, attn, l.reduce_mean, l.num_patches);
  const c10::cuda::CUDAGuard device_guard(attn.device());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options().memory_format(at::MemoryFormat::Contiguous));
  if (l.num_matrices == 0) return grad_attn;
  const Geometry geometry = make_geometry(attn, l, "vitmad.mad_backward");
  const int64_t num_rows = l.num_matrices * l.num_tokens;
  const int blocks = blocks_for(num_rows, kWarpsPerBlock);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, attn.scalar_type(), "vitmad_mad_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = attn.const_data_ptr<scalar_t>();
    const acc_t* grad_data = g.const_data_ptr<acc_t>();
    scalar_t* out = grad_attn.mutable_data_ptr<scalar_t>();
    const auto patch_acc = static_cast<acc_t>(patch);
    bool_switch(geometry.key_stride == 1, [&](auto contiguous_keys) {
      mad_backward_kernel<scalar_t, acc_t, decltype(contiguous_keys)::value><<<blocks, kBlockThreads, 0, stream>>>(
          data, geometry, num_rows, l.renormalize, l.reduce_mean, patch_acc, grad_data, out);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_attn;
}

}  // namespace

TORCH_LIBRARY_IMPL(vitmad, CUDA, m) {
  m.impl("mad", &mad_cuda);
  m.impl("mad_backward", &mad_backward_cuda);
}

}  // namespace vitmad
