// Index and distance math shared by every kernel (CPU and CUDA), so the CPU tests exercise the same
// formulas the GPU runs. See docs/definition.md, "Definition": patch token t sits at row t / gw, column t % gw,
// and the distance between two patches is patch * sqrt(drow^2 + dcol^2) pixels.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VITMAD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VITMAD_HOST_DEVICE inline
#endif

namespace vitmad {

// Index math is templated on the integer type so device code can stay in 32 bits (a 64-bit division is a
// long software routine on a GPU) while host code keeps int64_t.
template <typename index_t>
VITMAD_HOST_DEVICE index_t patch_row(index_t token, index_t grid_w) { return token / grid_w; }

template <typename index_t>
VITMAD_HOST_DEVICE index_t patch_col(index_t token, index_t grid_w) { return token % grid_w; }

// Distance in patches of a grid offset given as floating-point values holding exact integers: the one place
// the distance formula is written. Pixels are this times the patch size; a kernel that sums
// attention-weighted distances multiplies the sum, not each term.
template <typename acc_t>
VITMAD_HOST_DEVICE acc_t grid_distance(acc_t dr, acc_t dc) {
  return sqrt(dr * dr + dc * dc);
}

// Euclidean distance between two positions whose coordinates differ by (dx, dy, dz); fewer than three
// coordinates are padded with zeros, which add exactly nothing (docs/definition.md, "Beyond one grid").
template <typename acc_t>
VITMAD_HOST_DEVICE acc_t position_distance(acc_t dx, acc_t dy, acc_t dz) {
  return sqrt(dx * dx + dy * dy + dz * dz);
}

// Distance in pixels between two patches that are `drow` grid rows and `dcol` grid columns apart.
template <typename acc_t, typename index_t>
VITMAD_HOST_DEVICE acc_t patch_distance(index_t drow, index_t dcol, acc_t patch) {
  return patch * grid_distance<acc_t>(static_cast<acc_t>(drow), static_cast<acc_t>(dcol));
}

// Distance in patches between patch tokens `query` and `key` (0-based among the patches) on a grid `grid_w`
// wide.
template <typename acc_t, typename index_t>
VITMAD_HOST_DEVICE acc_t token_distance(index_t query, index_t key, index_t grid_w) {
  return grid_distance<acc_t>(static_cast<acc_t>(patch_row(query, grid_w) - patch_row(key, grid_w)),
                              static_cast<acc_t>(patch_col(query, grid_w) - patch_col(key, grid_w)));
}

// Walks the patch keys key, key + 1, ... of one query in row-major order. The row and column offsets to the
// query are kept as exact floating-point values, so a step costs an add and a compare instead of a division
// and two integer-to-float conversions per key.
template <typename acc_t, typename index_t>
struct KeyWalk {
  index_t grid_w;
  index_t col;      // grid column of the current key
  acc_t query_col;  // dcol of the first key of a grid row
  acc_t dr;         // query row - key row
  acc_t dc;         // query column - key column

  VITMAD_HOST_DEVICE KeyWalk(index_t query, index_t key, index_t grid_w_)
      : grid_w(grid_w_),
        col(patch_col(key, grid_w_)),
        query_col(static_cast<acc_t>(patch_col(query, grid_w_))),
        dr(static_cast<acc_t>(patch_row(query, grid_w_) - patch_row(key, grid_w_))),
        dc(static_cast<acc_t>(patch_col(query, grid_w_) - patch_col(key, grid_w_))) {}

  // Distance in patches to the current key.
  VITMAD_HOST_DEVICE acc_t distance() const { return grid_distance<acc_t>(dr, dc); }

  VITMAD_HOST_DEVICE void next() {
    ++col;
    dc -= acc_t(1);
    if (col == grid_w) {
      col = 0;
      dr -= acc_t(1);
      dc = query_col;
    }
  }
};

// How a run of `count` elements of `elem_size` bytes starting at byte address `address` splits for 16-byte
// vector access: `head` single elements up to the first 16-byte boundary, then `vectors` aligned 16-byte
// vectors, then the remaining `count - head - vectors * (16 / elem_size)` single elements. An address that
// is not a multiple of the element size gets no vectors at all.
template <typename index_t>
struct VectorSplit {
  index_t head;
  index_t vectors;
};

constexpr int64_t kVectorBytes = 16;

template <typename index_t>
VITMAD_HOST_DEVICE VectorSplit<index_t> split_for_vectors(uint64_t address, index_t count, index_t elem_size) {
  if (address % elem_size != 0) return {count, 0};
  const index_t per_vector = static_cast<index_t>(kVectorBytes) / elem_size;
  const index_t misaligned = static_cast<index_t>(address % kVectorBytes) / elem_size;
  index_t head = (per_vector - misaligned) % per_vector;
  if (head > count) head = count;
  return {head, (count - head) / per_vector};
}

// Element offset of matrix `index` (row-major over the leading dims [...] of an [..., N, N] tensor) for any
// strides. Leading dims that are contiguous with respect to each other are merged and size-1 dims dropped
// by make_matrix_offsets, so the usual case is one multiplication and no division.
constexpr int kMaxLeadingDims = 25;  // the dimension limit of torch's own CUDA kernels

struct MatrixOffsets {
  int ndim;
  int64_t sizes[kMaxLeadingDims];
  int64_t strides[kMaxLeadingDims];

  VITMAD_HOST_DEVICE int64_t operator()(int64_t index) const {
    int64_t offset = 0;
    for (int d = ndim - 1; d > 0; --d) {
      const int64_t outer = index / sizes[d];
      offset += (index - outer * sizes[d]) * strides[d];
      index = outer;
    }
    return ndim > 0 ? offset + index * strides[0] : offset;
  }
};

// One side's positions (queries or keys) of the position form: matrix b of the attention finds its [N, K]
// positions at data + offsets(b), row t at + t * row_stride, coordinate c at + c * coord_stride. A token
// without a position has a row of NaN (docs/definition.md, "Beyond one grid: where each token is").
template <typename acc_t>
struct PositionRows {
  const acc_t* data;
  MatrixOffsets offsets;
  int64_t row_stride;
  int64_t coord_stride;
  int64_t dims;  // K, 1 to 3

  VITMAD_HOST_DEVICE const acc_t* matrix(int64_t b) const { return data + offsets(b); }
  // A coordinate that is not NaN, the one value unequal to itself (kernels are built without fast-math).
  static VITMAD_HOST_DEVICE bool present(acc_t x) { return x == x; }
  VITMAD_HOST_DEVICE bool has_position(const acc_t* matrix, int64_t t) const { return present(matrix[t * row_stride]); }
  VITMAD_HOST_DEVICE bool has_position(int64_t b, int64_t t) const { return has_position(matrix(b), t); }
  // Coordinate c of row t, 0 past the K given (the padding position_distance expects).
  VITMAD_HOST_DEVICE acc_t coord(const acc_t* matrix, int64_t t, int64_t c) const {
    return c < dims ? matrix[t * row_stride + c * coord_stride] : acc_t(0);
  }
  VITMAD_HOST_DEVICE void position(const acc_t* matrix, int64_t t, acc_t* out) const {
    for (int64_t c = 0; c < 3; ++c) out[c] = coord(matrix, t, c);
  }
};

// Which queries the mean over queries of matrix b counts: of_matrix(b)(t) says whether query t does (found once
// per matrix, since a matrix's offset costs divisions). Every query in the grid form, whose per-query rows hold
// the patch queries only.
struct AllQueries {
  struct OfMatrix {
    VITMAD_HOST_DEVICE bool operator()(int64_t /*t*/) const { return true; }
  };
  VITMAD_HOST_DEVICE OfMatrix of_matrix(int64_t /*b*/) const { return {}; }
};

// The position form: the queries with a position.
template <typename acc_t>
struct PositionedQueries {
  PositionRows<acc_t> queries;

  struct OfMatrix {
    const acc_t* rows;
    int64_t row_stride;
    VITMAD_HOST_DEVICE bool operator()(int64_t t) const { return PositionRows<acc_t>::present(rows[t * row_stride]); }
  };
  VITMAD_HOST_DEVICE OfMatrix of_matrix(int64_t b) const { return {queries.matrix(b), queries.row_stride}; }
};

// Fills `out` from the sizes and strides of the `ndim` leading dims; false when more than kMaxLeadingDims
// remain after merging.
inline bool make_matrix_offsets(const int64_t* sizes, const int64_t* strides, int64_t ndim, MatrixOffsets& out) {
  // Built innermost first, then reversed: a dim merges into the one inside it when stepping it once moves
  // as far as stepping through the whole inner one.
  int merged = 0;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    if (sizes[d] == 1) continue;
    if (merged > 0 && strides[d] == out.strides[merged - 1] * out.sizes[merged - 1]) {
      out.sizes[merged - 1] *= sizes[d];
      continue;
    }
    if (merged == kMaxLeadingDims) return false;
    out.sizes[merged] = sizes[d];
    out.strides[merged] = strides[d];
    ++merged;
  }
  for (int i = 0; i < merged / 2; ++i) {
    const int j = merged - 1 - i;
    const int64_t size = out.sizes[i];
    const int64_t stride = out.strides[i];
    out.sizes[i] = out.sizes[j];
    out.strides[i] = out.strides[j];
    out.sizes[j] = size;
    out.strides[j] = stride;
  }
  out.ndim = merged;
  return true;
}

}  // namespace vitmad
