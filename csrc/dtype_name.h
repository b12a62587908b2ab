// A dtype as Python spells it ("torch.int32", not c10's "Int"), for argument errors: the compiled ops and the
// pure-PyTorch fallback (python/vitmad/ops/arguments.py) then give the same message for the same bad call.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

namespace vitmad {

inline std::string dtype_name(c10::ScalarType type) {
  return "torch." + std::string(c10::getDtypeNames(type).first);
}

}  // namespace vitmad
