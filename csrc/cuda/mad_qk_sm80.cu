// The sm_80+ kernel of vitmad::mad_qk and vitmad::mad_qk_pos for float16 and bfloat16 q and k: flash-attention's
// layout, with the logits never leaving registers.
//
// A block of 4 warps owns 64 queries of one matrix; warp w owns queries [16w, 16w + 16). Key tiles of 64 keys are
// staged in shared memory by asynchronous 16-byte copies (cp.async), double-buffered so the next tile's copy
// overlaps this tile's arithmetic, together with the keys' positions. Each warp's 16 x 64 logits come from tensor
// cores (mma.sync m16n8k16, float32 accumulation) straight into registers. The PTX fragment layout
// fixes which lane holds which (query, key): lane l holds queries l / 4 and l / 4 + 8 of the warp's 16 and keys
// 8n + 2 (l % 4) + {0, 1} for n = 0..7. The four lanes of a query (a quad) keep its online-softmax state (running
// max in log2 units; normaliser, mass over keys with a position, distance-weighted sum) and join it with two
// shuffles at the end, in a fixed order, so results are bit-identical from run to run.
//
// On an H200 it takes 0.7x to 1.45x the time of SDPA's flash kernel on the same q and k, against 2.7x to 6.4x at
// N >= 577 for the portable kernel in mad_qk_cuda.cu (WMMA through shared memory, element-wise tile loads that
// divide per element, no overlap of loads and arithmetic); benchmarks/RESULTS.md. Hardware approximations: exp2
// and sqrt are the MUFU instructions (ex2.approx, sqrt.approx, about 2 ulp); squared distances below 2^-126 flush
// to 0, i.e. positions closer than 1e-19 count as one place. The logits and every sum stay float32.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "cuda_common.cuh"
#include "mad_qk_params.cuh"

namespace vitmad {
namespace {

constexpr int kWarpsM = 4;
constexpr int kThreadsM = kWarpsM * kWarp;
constexpr int kTileM = 16 * kWarpsM;  // queries per block
constexpr int kTileN = 64;            // keys per tile
constexpr int kFragsN = kTileN / 8;   // m16n8 logit fragments per warp per tile
// Per element type: elements per 16-byte copy (and per 16 bytes of row padding, which makes the fragment reads
// conflict-free), and elements per mma k-step (32 bytes: m16n8k16).
template <typename scalar_t>
constexpr int kChunk = 16 / sizeof(scalar_t);
template <typename scalar_t>
constexpr int kStepK = 32 / sizeof(scalar_t);

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define VITMAD_SM80 1
#endif

__device__ __forceinline__ float ex2_approx(float x) {  // 2^x; -inf gives +0, NaN stays NaN
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float sqrt_approx(float x) {
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// max(a, b), NaN when either is NaN: softmax's max (max.NaN.f32 from sm_80 on).
__device__ __forceinline__ float max_nan(float a, float b) {
#ifdef VITMAD_SM80
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
  return y;
#else
  return nan_max(a, b);
#endif
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes from global to shared memory without passing through registers; zeros where !valid (src-size 0:
// nothing is read).
__device__ __forceinline__ void copy_16_async(void* shared, const void* global, bool valid) {
#ifdef VITMAD_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void commit_copies() {
#ifdef VITMAD_SM80
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_copies() {
#ifdef VITMAD_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

// d += a * b for one m16n8k16 fragment (32 bytes of k): a is 16 x 16 (4 registers of 2 elements), b is 16 x 8
// (2 registers).
template <typename scalar_t>
__device__ __forceinline__ void mma_k32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef VITMAD_SM80
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "float16 or bfloat16 input");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Which 16-byte chunks of a staged tile this thread copies: chunk `chunk` (elements 8 chunk ..) of rows row,
// row + rows_per_pass, ... Found once per kernel, so staging a tile divides nothing.
struct ChunkSlot {
  int row;
  int chunk;
  int rows_per_pass;  // kThreadsM / chunks per row; threads past rows_per_pass * chunks copy nothing

  __device__ explicit ChunkSlot(int chunks) {  // chunks per row, at most kThreadsM (checked on the host)
    rows_per_pass = kThreadsM / chunks;
    row = threadIdx.x / chunks;
    chunk = threadIdx.x - row * chunks;
    // A thread past the whole rows of one pass would copy the chunks of threads of the next pass again (the
    // same bytes, but a write-write race that racecheck reports on the H200): it copies nothing.
    if (row >= rows_per_pass) row = std::numeric_limits<int>::max() / 2;
  }
};

// Stages `rows` tokens from `first` of a [N, D] matrix into a shared tile of row length ld (elements), D padded
// with zeros to dp, tokens at or past `limit` as zero rows. kVector: the matrix's rows are 16-byte aligned and
// contiguous along D, with D a multiple of 8 (checked on the host), so whole 16-byte chunks are copied
// asynchronously; otherwise element by element (visible after the next __syncthreads).
template <bool kVector, typename scalar_t>
__device__ __forceinline__ void stage_rows(const scalar_t* matrix, int64_t stride_n, int64_t stride_d, int first,
                                           int limit, int rows, int head_dim, int dp, int ld, const ChunkSlot& slot,
                                           scalar_t* tile) {
  if constexpr (kVector) {
    const int d = slot.chunk * kChunk<scalar_t>;
    for (int r = slot.row; r < rows; r += slot.rows_per_pass) {
      const int token = first + r;
      const bool valid = token < limit && d < head_dim;
      copy_16_async(tile + r * ld + d, valid ? matrix + token * stride_n + d : matrix, valid);
    }
  } else {
    for (int i = threadIdx.x; i < rows * dp; i += kThreadsM) {
      const int r = i / dp;
      const int d = i - r * dp;
      const int token = first + r;
      tile[r * ld + d] = token < limit && d < head_dim ? matrix[token * stride_n + d * stride_d] : scalar_t(0);
    }
  }
}

// What the arithmetic needs of each key of a tile, staged beside its rows: where the key is (the grid form's row
// and column, or the position form's coordinates; zeros for a key without a position) and whether it has a
// position (1 or 0), and an additive mask: -inf for a key past Nk, and, when renormalising, for a key without a
// position (a NaN or +inf logit there still makes the row NaN, as softmax over every key would be).
struct KeyInfo {
  float4* where;  // [kTileN] {x, y, z, has_position}
  float* mask;    // [kTileN]
};

// The grid form's row and column of patch index `index` (key - P, negative for prefix keys), walked a tile at a
// time without dividing: thread j of the first kTileN stages key k_begin + j.
struct GridCursor {
  int row, col;        // of this thread's current patch index (floor division, so col is in [0, grid_w))
  int step_row, step_col;  // kTileN patches: whole grid rows and the remaining columns
  int grid_w;

  __device__ GridCursor(int index, int grid_w_) : grid_w(grid_w_) {
    row = index >= 0 ? index / grid_w : -((-index + grid_w - 1) / grid_w);
    col = index - row * grid_w;
    step_row = kTileN / grid_w;
    step_col = kTileN - step_row * grid_w;
  }
  __device__ void next_tile() {
    row += step_row;
    col += step_col;
    if (col >= grid_w) {
      col -= grid_w;
      ++row;
    }
  }
};

template <bool kPositions>
__device__ __forceinline__ void stage_key_info(const QkParams<float>& p, int64_t b, int k_begin,
                                               const GridCursor& cursor, KeyInfo info) {
  static_assert(kThreadsM >= kTileN, "one key per thread");
  const int j = threadIdx.x;
  if (j >= kTileN) return;
  const int key = k_begin + j;
  float4 where = make_float4(0, 0, 0, 0);
  if constexpr (kPositions) {
    const float* positions = p.key_positions.matrix(b);
    if (key < p.num_keys && p.key_positions.has_position(positions, key))
      where = make_float4(p.key_positions.coord(positions, key, 0), p.key_positions.coord(positions, key, 1),
                          p.key_positions.coord(positions, key, 2), 1);
  } else if (key >= p.first_query && key < p.num_keys) {
    where = make_float4(static_cast<float>(cursor.row), static_cast<float>(cursor.col), 0, 1);
  }
  info.where[j] = where;
  info.mask[j] = key >= p.num_keys || (p.renormalize && where.w == 0) ? -std::numeric_limits<float>::infinity()
                                                                       : 0.0f;
}

// Four 8 x 8 matrices of 16-bit elements from shared memory, one per register: lanes 8i..8i+7 give the row
// addresses of matrix i, and lane l receives row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1 of each, which is the
// mma fragment layout.
__device__ __forceinline__ void load_matrices_x4(uint32_t (&r)[4], const void* row_address) {
#ifdef VITMAD_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row_address)));
#endif
}

// Online-softmax state of one query row, this lane's share (a quarter of the row's keys).
struct RowState {
  float max = -std::numeric_limits<float>::infinity();  // common to the quad, log2 units
  float total = 0;                                      // sum of 2^(logit - max) over every key
  float mass = 0;                                       // the same over keys with a position
  float weighted = 0;                                   // the same times the distance
};

// bias_t: std::nullptr_t without attn_bias, else bool (a mask) or scalar_t (added to the logits).
template <typename scalar_t, typename bias_t, bool kPositions, bool kVector>
__global__ void __launch_bounds__(kThreadsM) mad_qk_sm80_kernel(const QkParams<float> p) {
#ifdef VITMAD_SM80
  constexpr bool kBias = !std::is_same_v<bias_t, std::nullptr_t>;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int ld = p.head_dim_padded + kChunk<scalar_t>;
  // Shared memory: the query tile, two key tiles, then two tiles' KeyInfo (where: 16-byte aligned, since every
  // tile's size in bytes is a multiple of 16 * kTileN).
  extern __shared__ __align__(128) unsigned char shared[];
  auto* q_tile = reinterpret_cast<scalar_t*>(shared);
  scalar_t* const k_tiles = q_tile + kTileM * ld;  // tile i at + i * kTileN * ld
  auto* key_where = reinterpret_cast<float4*>(k_tiles + 2 * kTileN * ld);  // [2][kTileN]
  auto* key_mask = reinterpret_cast<float*>(key_where + 2 * kTileN);       // [2][kTileN]
  auto key_info = [&](int buffer) { return KeyInfo{key_where + buffer * kTileN, key_mask + buffer * kTileN}; };

  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int group = lane / 4;  // the fragment row this lane holds (and that + 8)
  const int quad_lane = lane % 4;
  const int t_begin = blockIdx.x * kTileM;
  // This lane's two query rows: h = 0 for the warp's row `group`, 1 for row `group + 8`.
  int t[2];
  bool valid_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    t[h] = t_begin + warp * 16 + group + 8 * h;
    valid_row[h] = t[h] < p.num_queries;
  }
  const float logit_scale = static_cast<float>(p.logit_scale);
  const auto* q_all = static_cast<const scalar_t*>(p.q);
  const auto* k_all = static_cast<const scalar_t*>(p.k);
  const int num_tiles = (p.num_keys + kTileN - 1) / kTileN;
  // ldmatrix row addresses: lane l gives row l % 8 of matrix l / 8. Queries: matrices (rows +0 / +8) x (d +0 / +8)
  // in the order of the A fragment's registers; keys: (d +0 / +8) x (keys +0 / +8), two B fragments.
  const int matrix = lane / 8;
  // A matrix is 8 rows of 16 bytes: 8 x 8 16-bit elements.
  const int q_offset = (warp * 16 + (matrix & 1) * 8 + lane % 8) * ld + (matrix >> 1) * kChunk<scalar_t>;
  const int k_offset = ((matrix >> 1) * 8 + lane % 8) * ld + (matrix & 1) * kChunk<scalar_t>;

  const ChunkSlot slot(p.head_dim_padded / kChunk<scalar_t>);
  // Thread j's key of the first tile is patch k - P (the grid form only; the position form reads positions).
  const GridCursor first_cursor(kPositions ? 0 : static_cast<int>(threadIdx.x) - p.first_query,
                                kPositions ? 1 : p.grid_w);

  for (int64_t b = blockIdx.y; b < p.num_matrices; b += gridDim.y) {
    const scalar_t* q_matrix = q_all + p.q_lead(b);
    const scalar_t* k_matrix = k_all + p.k_lead(b);
    const bias_t* bias_row[2] = {nullptr, nullptr};
    float query[2][3] = {{0, 0, 0}, {0, 0, 0}};
    bool has_position[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // A row past the last query reads the last query's bias (and is never written): no bounds check per logit.
      if constexpr (kBias)
        bias_row[h] = static_cast<const bias_t*>(p.bias) + p.bias_lead(b) +
                      (p.first_query + min(t[h], p.num_queries - 1)) * p.bias_stride_q;
      has_position[h] = valid_row[h];
      if (!valid_row[h]) continue;
      if constexpr (kPositions) {
        const float* rows = p.query_positions.matrix(b);
        has_position[h] = p.query_positions.has_position(rows, t[h]);
        if (has_position[h]) p.query_positions.position(rows, t[h], query[h]);
      } else {
        query[h][0] = static_cast<float>(patch_row(t[h], p.grid_w));
        query[h][1] = static_cast<float>(patch_col(t[h], p.grid_w));
      }
    }

    __syncthreads();  // the previous matrix is done with every staged tile
    stage_rows<kVector>(q_matrix, p.q_stride_n, p.q_stride_d, p.first_query + t_begin, p.q_tokens, kTileM,
                        p.head_dim, p.head_dim_padded, ld, slot, q_tile);
    commit_copies();
    GridCursor cursor = first_cursor;
    stage_rows<kVector>(k_matrix, p.k_stride_n, p.k_stride_d, 0, p.num_keys, kTileN, p.head_dim, p.head_dim_padded,
                        ld, slot, k_tiles);
    stage_key_info<kPositions>(p, b, 0, cursor, key_info(0));
    commit_copies();

    RowState state[2];
    for (int tile = 0; tile < num_tiles; ++tile) {
      const int k_begin = tile * kTileN;
      const int buffer = tile & 1;
      if (tile + 1 < num_tiles) {  // the next tile's copy runs while this one is worked on
        stage_rows<kVector>(k_matrix, p.k_stride_n, p.k_stride_d, k_begin + kTileN, p.num_keys, kTileN, p.head_dim,
                            p.head_dim_padded, ld, slot, k_tiles + (buffer ^ 1) * kTileN * ld);
        cursor.next_tile();
        stage_key_info<kPositions>(p, b, k_begin + kTileN, cursor, key_info(buffer ^ 1));
        commit_copies();
        wait_copies<1>();
      } else {
        wait_copies<0>();
      }
      __syncthreads();  // this tile (and q) staged by every thread

      // Logits: s[n][0..1] for row `group`, keys 8n + 2 quad_lane + {0, 1}; s[n][2..3] for row `group + 8`.
      float s[kFragsN][4];
#pragma unroll
      for (int n = 0; n < kFragsN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
      const scalar_t* k_tile = k_tiles + buffer * kTileN * ld;
      for (int kk = 0; kk < p.head_dim_padded; kk += kStepK<scalar_t>) {
        uint32_t a[4];
        load_matrices_x4(a, q_tile + q_offset + kk);
#pragma unroll
        for (int n = 0; n < kFragsN; n += 2) {
          uint32_t b4[4];  // B fragments of key blocks n and n + 1
          load_matrices_x4(b4, k_tile + n * 8 * ld + k_offset + kk);
          const uint32_t b0[2] = {b4[0], b4[1]};
          const uint32_t b1[2] = {b4[2], b4[3]};
          mma_k32<scalar_t>(s[n], a, b0);
          mma_k32<scalar_t>(s[n + 1], a, b1);
        }
      }

      // Logits in log2 units, biased and masked, and the tile's max per row.
      const KeyInfo info = key_info(buffer);
      float tile_max[2] = {-kInf, -kInf};
#pragma unroll
      for (int n = 0; n < kFragsN; ++n) {
        const int j = 8 * n + 2 * quad_lane;
        const float2 mask = *reinterpret_cast<const float2*>(info.mask + j);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int h = i / 2;
          float x = fmaf(s[n][i], logit_scale, i % 2 == 0 ? mask.x : mask.y);
          if constexpr (kBias) {
            const int key = k_begin + j + i % 2;
            if (key < p.num_keys) {
              const bias_t bias = bias_row[h][key * p.bias_stride_k];
              if constexpr (std::is_same_v<bias_t, bool>) {
                x = bias ? x : -kInf;
              } else {
                x = fmaf(static_cast<float>(bias), static_cast<float>(kLog2e), x);
              }
            }
          }
          s[n][i] = x;
          tile_max[h] = max_nan(tile_max[h], x);
        }
      }

      float new_max[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = max_nan(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = max_nan(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        new_max[h] = max_nan(state[h].max, tile_max[h]);
        // While every key so far is masked there is nothing to add (and -inf - -inf would be NaN): the max
        // stays -inf, the weights below are exp2(-inf - 0) = 0, and the sums stay 0.
        const float rescale = new_max[h] == -kInf ? 1.0f : ex2_approx(state[h].max - new_max[h]);
        state[h].total *= rescale;
        state[h].mass *= rescale;
        state[h].weighted *= rescale;
        state[h].max = new_max[h];
        if (new_max[h] == -kInf) new_max[h] = 0;
      }
#pragma unroll
      for (int n = 0; n < kFragsN; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 where = info.where[8 * n + 2 * quad_lane + e];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float weight = ex2_approx(s[n][2 * h + e] - new_max[h]);  // 0 for masked keys
            const float dx = query[h][0] - where.x;
            const float dy = query[h][1] - where.y;
            float squared = fmaf(dx, dx, dy * dy);
            if constexpr (kPositions) {
              const float dz = query[h][2] - where.z;
              squared = fmaf(dz, dz, squared);
            }
            state[h].total += weight;
            state[h].mass = fmaf(weight, where.w, state[h].mass);  // keys with a position
            state[h].weighted = fmaf(weight, sqrt_approx(squared) * where.w, state[h].weighted);
          }
        }
      }
      __syncthreads();  // every warp is done with this tile's buffers before the next copy reuses them
    }
    wait_copies<0>();  // without keys the loop above never waited for the copies staged before it

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      RowState& r = state[h];
      r.total += __shfl_xor_sync(0xffffffffu, r.total, 1);
      r.mass += __shfl_xor_sync(0xffffffffu, r.mass, 1);
      r.weighted += __shfl_xor_sync(0xffffffffu, r.weighted, 1);
      r.total += __shfl_xor_sync(0xffffffffu, r.total, 2);
      r.mass += __shfl_xor_sync(0xffffffffu, r.mass, 2);
      r.weighted += __shfl_xor_sync(0xffffffffu, r.weighted, 2);
      // A row with every key masked has total == 0 and gives NaN, as softmax does; so does a query without a
      // position.
      if (valid_row[h] && quad_lane == 0)
        p.per_query[b * p.num_queries + t[h]] =
            has_position[h] ? static_cast<float>(p.patch) * r.weighted / (p.renormalize ? r.mass : r.total)
                            : std::numeric_limits<float>::quiet_NaN();
    }
  }
#endif
}

template <typename scalar_t>
size_t shared_bytes_sm80(int head_dim_padded) {
  const size_t ld = head_dim_padded + kChunk<scalar_t>;
  return (kTileM + 2 * kTileN) * ld * sizeof(scalar_t) + 2 * kTileN * (sizeof(float4) + sizeof(float));
}

// Whether every row of every [N, D] matrix of a tensor starts on a 16-byte boundary and is contiguous along D,
// with D a multiple of the chunk: then rows are copied in 16-byte chunks.
bool rows_are_16_byte_chunks(const void* data, const MatrixOffsets& lead, int64_t stride_n, int64_t stride_d,
                             int head_dim, int chunk) {
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0 || stride_d != 1 || head_dim % chunk != 0 || stride_n % chunk != 0)
    return false;
  for (int d = 0; d < lead.ndim; ++d)
    if (lead.strides[d] % chunk != 0) return false;
  return true;
}

// Per (kernel, device): whether this build carries sm_80+ code for the kernel that the device runs.
template <auto kKernel>
bool runs_sm80_code(int device) {
  static std::mutex mutex;
  static std::vector<int> known;  // per device: 0 unknown, 1 yes, -1 no
  const std::lock_guard<std::mutex> lock(mutex);
  if (known.size() <= static_cast<size_t>(device)) known.resize(device + 1, 0);
  if (known[device] == 0) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    cudaFuncAttributes attributes{};
    // binaryVersion is the architecture of the code the device would run (the build's own machine code, or PTX
    // compiled for it); below 80 the kernel body is empty.
    const bool yes = major >= 8 && cudaFuncGetAttributes(&attributes, kKernel) == cudaSuccess &&
                     attributes.ptxVersion >= 80 && attributes.binaryVersion >= 80;
    (void)cudaGetLastError();  // a failed query leaves no sticky error
    known[device] = yes ? 1 : -1;
  }
  return known[device] == 1;
}

}  // namespace

template <typename scalar_t, typename bias_t, bool kPositions>
bool launch_mad_qk_sm80(const QkParams<float>& params, int device) {
  QkParams<float> p = params;
  constexpr int kStep = kStepK<scalar_t>;
  constexpr int kChunkElements = kChunk<scalar_t>;
  p.head_dim_padded = (p.head_dim + kStep - 1) / kStep * kStep;
  const size_t smem = shared_bytes_sm80<scalar_t>(p.head_dim_padded);
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem > static_cast<size_t>(smem_limit)) return false;  // the portable kernel checks and reports D
  const bool vector = p.head_dim_padded / kChunkElements <= kThreadsM &&
                      rows_are_16_byte_chunks(p.q, p.q_lead, p.q_stride_n, p.q_stride_d, p.head_dim, kChunkElements) &&
                      rows_are_16_byte_chunks(p.k, p.k_lead, p.k_stride_n, p.k_stride_d, p.head_dim, kChunkElements);
  bool launched = false;
  auto launch = [&](auto bias_type, auto kVector) {
    constexpr auto kernel =
        &mad_qk_sm80_kernel<scalar_t, typename decltype(bias_type)::type, kPositions, decltype(kVector)::value>;
    if (!runs_sm80_code<kernel>(device) ||
        static_cast<size_t>(dynamic_shared_memory_limit<kernel>(device, smem_limit)) < smem)
      return;
    const dim3 blocks((p.num_queries + kTileM - 1) / kTileM,
                      static_cast<unsigned>(std::min<int64_t>(p.num_matrices, 65535)));
    kernel<<<blocks, kThreadsM, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched = true;
  };
  // Without attn_bias the kernel has no bias code at all (bias_t = std::nullptr_t).
  bool_switch(vector, [&](auto kVector) {
    if (p.bias == nullptr)
      launch(std::type_identity<std::nullptr_t>{}, kVector);
    else
      launch(std::type_identity<bias_t>{}, kVector);
  });
  return launched;
}

#define VITMAD_INSTANTIATE(scalar_t, bias_t)                                      \
  template bool launch_mad_qk_sm80<scalar_t, bias_t, false>(const QkParams<float>&, int); \
  template bool launch_mad_qk_sm80<scalar_t, bias_t, true>(const QkParams<float>&, int);
VITMAD_INSTANTIATE(c10::Half, c10::Half)
VITMAD_INSTANTIATE(c10::Half, bool)
VITMAD_INSTANTIATE(c10::BFloat16, c10::BFloat16)
VITMAD_INSTANTIATE(c10::BFloat16, bool)
#undef VITMAD_INSTANTIATE

}  // namespace vitmad
