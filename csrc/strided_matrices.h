// Element offset of one [N, X] matrix inside a batched tensor of arbitrary strides, shared by the CPU and
// CUDA kernels: matrices are numbered row-major over the leading dimensions.
#pragma once

#include <cstdint>

#include "mad_geometry.h"

namespace vitmad {

VITMAD_HOST_DEVICE int64_t leading_offset(int64_t index, const int64_t* sizes, const int64_t* strides,
                                          int64_t num_leading) {
  int64_t offset = 0;
  for (int64_t d = num_leading - 1; d >= 0; --d) {
    offset += (index % sizes[d]) * strides[d];
    index /= sizes[d];
  }
  return offset;
}

}  // namespace vitmad
