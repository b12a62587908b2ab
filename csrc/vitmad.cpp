// The schema of every vitmad op, defined once. Backends register kernels in csrc/cpu and csrc/cuda; the
// fake (shape) kernels and autograd formulas are registered from python/vitmad/ops/mad_op.py and mad_qk_op.py.
//
// The position form (mad_pos, mad_pos_backward, mad_qk_pos; docs/definition.md, "Beyond one grid: where each
// token is"). The contract every implementation of it keeps (kernels, fake kernels, float64 reference, fallback):
// - attn: [..., Nq, Nk] probabilities (rows are queries), float16 / bfloat16 / float32 / float64, any strides
//   (read in place, never copied), any leading dims (zero-size too).
// - positions: floating [..., Nq, K], K in {1, 2, 3}. Its leading dims (positions.dim() - 2 of them, possibly
//   none, at most attn.dim() - 2) broadcast right-aligned against attn.shape[:-2], each 1 or equal, read through
//   its strides (a size-1 or stride-0 dim is a broadcast), never expanded: [Nq, K] for every matrix,
//   [B, 1, Nq, K] per image of [B, H, Nq, Nk], [nW, 1, Nq, K] per window of [B, nW, H, Nq, Nk].
// - key_positions: [..., Nk, K] under the same rules and with positions' K; None means positions (then Nq == Nk).
// - A row of NaN coordinates is a token without a position (CLS, registers, padding): neither a query nor a key.
//   A row with some but not all coordinates NaN is an error, and so is an infinite coordinate (checked on the
//   host: always on CPU, on CUDA unless the current stream is capturing a graph). Positions of another floating
//   dtype than the accumulation dtype are converted (a copy of the user's small tensor, not an expansion);
//   integer or bool positions are a TypeError.
// - d(t, s) = sqrt(sum_k (positions[t, k] - key_positions[s, k])^2), in the positions' unit.
// - m_t = sum over keys s with a position of A[t, s] * d(t, s); renormalize divides it by
//   sum over keys s with a position of A[t, s].
// - reduction="mean": output attn.shape[:-2], the mean of m_t over the queries with a position in that matrix
//   (the count may differ per matrix; none gives NaN). "none": output attn.shape[:-2] + [Nq], NaN at queries
//   without a position.
// - Output dtype and accumulation as the grid form: float32 for 16- and 32-bit input, float64 for float64.
// - mad_pos_backward: the gradient with respect to attn only, attn's shape, zero at rows and columns without a
//   position; grad must have the output's shape. g_t = grad[..., t] ("none") or grad[...] / (that matrix's
//   query count) ("mean"); d attn[t, s] = g_t * d(t, s), renormalised g_t / Z_t * (d(t, s) - m_t), Z_t the
//   query's mass on keys with a position.
// - mad_qk_pos: q [..., Nq, D], k [..., Nk, D] (same leading dims, dtype, device and D), attn_bias broadcastable
//   to [..., Nq, Nk] (q's dtype, added to the logits, or bool, True keeps a key), scale default D ** -0.5; the
//   softmax runs over all Nk keys (positionless ones included, as the model computes it), then MAD as above,
//   without materialising the attention. A query whose keys are all masked gives NaN, as softmax does.
// - Error messages name the op the user called: vitmad.mad, vitmad.mad_backward, vitmad.mad_qk.
//
// The statistics ops (stats, stats_pos, stats_qk, stats_qk_pos; docs/definition.md, "Beside the distance"):
// the arguments of mad, mad_pos, mad_qk and mad_qk_pos plus `stats`, the names of the statistics wanted, each
// at most once, in any order: "mad", "entropy", "prefix_mass", "self_mass" (csrc/stats_args.h). One pass over the
// attention (or one online-softmax pass over the keys) gives them all. Output: [S, ...] with S = len(stats), row
// i the statistic stats[i] shaped as the distance op's output ([...] for "mean", [..., Nq'] for "none" with Nq'
// the patch queries N - P of the grid form or the Nq queries of the position form), float32 (float64 for float64
// input). Per query t with a position (A its attention row over all Nk keys):
// - mad: m_t as the distance op computes it (renormalize applies to it alone);
// - entropy: -sum_s A[t, s] ln A[t, s] over every key (0 ln 0 = 0), in nats;
// - prefix_mass: sum of A[t, s] over the keys without a position (grid form: the P prefix tokens);
// - self_mass: A[t, t'] with t' the query's own token among the keys (grid form: token P + t; position form:
//   the key of the same index, which needs Nq == Nk).
// - temporal_mad (stats_qk_pos only, video): as mad with the distance |time_t - time_s| between the tokens' frames,
//   `times` [..., Nq, 1] and `key_times` [..., Nk, 1] (given exactly when key_positions is), NaN exactly at the
//   tokens without a position; the same pass as mad, a second weighted sum. The other ops refuse it (the Python
//   entry points compute it there with a second distance call).
// Queries without a position get NaN ("none") and are left out of the mean. Not differentiable.
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
  m.def(
      "mad_pos(Tensor attn, Tensor positions, Tensor? key_positions=None, *, bool renormalize=False, "
      "str reduction=\"mean\") -> Tensor");
  m.def(
      "mad_pos_backward(Tensor grad, Tensor attn, Tensor positions, Tensor? key_positions=None, *, "
      "bool renormalize=False, str reduction=\"mean\") -> Tensor");
  m.def(
      "mad_qk_pos(Tensor q, Tensor k, Tensor positions, Tensor? key_positions=None, *, float? scale=None, "
      "Tensor? attn_bias=None, bool renormalize=False, str reduction=\"mean\") -> Tensor");
  m.def(
      "stats(Tensor attn, int patch, str[] stats, *, int num_prefix_tokens=1, int[]? grid=None, "
      "bool renormalize=False, str reduction=\"mean\") -> Tensor");
  m.def(
      "stats_pos(Tensor attn, Tensor positions, Tensor? key_positions, str[] stats, *, bool renormalize=False, "
      "str reduction=\"mean\") -> Tensor");
  m.def(
      "stats_qk(Tensor q, Tensor k, int patch, str[] stats, *, int num_prefix_tokens=1, int[]? grid=None, "
      "float? scale=None, Tensor? attn_bias=None, bool renormalize=False, str reduction=\"mean\") -> Tensor");
  m.def(
      "stats_qk_pos(Tensor q, Tensor k, Tensor positions, Tensor? key_positions, str[] stats, *, "
      "float? scale=None, Tensor? attn_bias=None, bool renormalize=False, str reduction=\"mean\", "
      "Tensor? times=None, Tensor? key_times=None) -> Tensor");
}
