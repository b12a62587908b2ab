// The schema of every vitmad op, defined once. Backends register kernels in csrc/cpu and csrc/cuda; the
// fake (shape) kernels and autograd formulas are registered from python/vitmad/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(vitmad, m) {
  m.def(
      "mad(Tensor attn, int patch, *, int num_prefix_tokens=1, int[]? grid=None, bool renormalize=False, "
      "str reduction=\"mean\") -> Tensor");
  m.def(
      "mad_backward(Tensor grad, Tensor attn, int patch, *, int num_prefix_tokens=1, int[]? grid=None, "
      "bool renormalize=False, str reduction=\"mean\") -> Tensor");
  m.def(
      "mad_qk(Tensor q, Tensor k, int patch, *, int num_prefix_tokens=1, int[]? grid=None, float? scale=None, "
      "Tensor? attn_bias=None, bool renormalize=False, str reduction=\"mean\") -> Tensor");
}
