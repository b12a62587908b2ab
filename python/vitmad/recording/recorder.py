"""``vitmad.record``: every attention layer's MAD, recorded while a real ViT runs its own fused attention.

Each recorded layer's queries and keys are captured where the attention receives them (transformers'
``AttentionInterface``, or the module's ``F.scaled_dot_product_attention`` call for timm) and reduced to MAD at
once by ``vitmad::mad_qk`` (flash-MAD: the attention probabilities are never materialised), so no attention
map is stored. The model's own attention runs unchanged.

Repeated forwards: every forward call inside one ``record`` block is kept as a :class:`RecordedCall` in
``rec.calls`` (a call starts when the patch embedding runs); ``rec.mad``, ``rec.layers`` and ``rec.layout``
describe the latest call.

One layer, one entry: a module that computes its attention in several calls (differential attention, two
softmax maps) is recorded once, with the MAD of the attention it applies (:mod:`.differential`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import mad_qk
from .differential import CallSums, combine, differential_lambda, is_differential
from .sdpa_capture import SdpaAttentionHooks, sdpa_attention_modules
from .token_grid import ModelLayout, find_patch_embedding
from .transformers_capture import HFAttentionHooks, hf_attention_modules, is_hf_model

__all__ = ["record", "Recording", "RecordedCall"]


@dataclass
class RecordedCall:
    """The MAD of every recorded attention layer in one forward call.

    Attributes:
        layers: the attention modules' qualified names, in execution order.
        layout: patch size, grid and prefix tokens of this call.
        per_layer: one tensor per entry of ``layers``: ``[B, H]`` (``reduction="mean"``) or ``[B, H, N - P]``.
        components: for layers whose attention combines several softmax maps (differential attention), by
            layer name: ``{"mad": [MAD of A1, MAD of A2], "lambda": lambda}``, each MAD shaped like
            ``per_layer``'s entry; the layer's own entry is the MAD of ``A1 - lambda * A2``.
    """

    layers: list[str] = field(default_factory=list)
    layout: ModelLayout | None = None
    per_layer: list[torch.Tensor] = field(default_factory=list)
    components: dict[str, dict] = field(default_factory=dict)

    @property
    def mad(self) -> torch.Tensor:
        """``[L, B, H]`` float32 (``reduction="mean"``) or ``[L, B, H, N - P]`` (``"none"``)."""
        return torch.stack(self.per_layer)


def _encoder_prefix(patch_embedding: str) -> str:
    """The qualified-name prefix of the tower that owns the patch embedding ("vision_model." in CLIPModel)."""
    parts = patch_embedding.split(".")
    for i, part in enumerate(parts):
        if "embed" in part:
            return "".join(p + "." for p in parts[:i])
    return ""


def _select(candidates: dict[str, nn.Module], patterns: Sequence[str], model: nn.Module) -> dict[str, nn.Module]:
    selected = {}
    for pattern in patterns:
        matches = {name: m for name, m in candidates.items() if fnmatch.fnmatchcase(name, pattern)}
        if not matches:
            shown = ", ".join(list(candidates)[:4]) + (", ..." if len(candidates) > 4 else "")
            raise ValueError(
                f"vitmad.record: layers pattern '{pattern}' matches no attention module of "
                f"{type(model).__name__}; expected qualified names (wildcards allowed) such as: {shown or 'none'}"
            )
        selected.update(matches)
    return {name: m for name, m in candidates.items() if name in selected}


def _detect_patch(
    model: nn.Module, embedding: tuple[str, nn.Conv2d] | None, patch: int | None, grid: tuple[int, int] | None
) -> int:
    """The given patch size, or the patch-embedding kernel's; errors say what to pass by hand."""
    name = type(model).__name__
    if embedding is None:
        if patch is None or grid is None:
            raise ValueError(
                f"vitmad.record: found no patch-embedding Conv2d (kernel == stride) in {name}; pass "
                "patch=<pixels per patch> and grid=[grid_h, grid_w]"
            )
        return patch
    if patch is not None:
        return patch
    kernel = tuple(embedding[1].kernel_size)
    if kernel[0] != kernel[1]:
        raise ValueError(f"vitmad.record: {name} has non-square patches {list(kernel)}; pass patch=")
    return int(kernel[0])


def _attention_layers(
    model: nn.Module, embedding: tuple[str, nn.Conv2d] | None, layers: Sequence[str] | None
) -> tuple[str, dict[str, nn.Module]]:
    """How to capture the model's attention, and the attention modules to record by qualified name, in module
    order. The capture is ``"transformers"`` for a transformers model whose attention goes through
    ``AttentionInterface``, else ``"sdpa"``: timm models, transformers models wrapping timm ones
    (``TimmWrapperModel``), and any module given by name that calls ``F.scaled_dot_product_attention``."""
    candidates = hf_attention_modules(model) if is_hf_model(model) else {}
    capture = "transformers" if candidates else "sdpa"
    if not candidates:
        # Any module may be named: the capture sees whatever F.scaled_dot_product_attention calls it makes.
        candidates = sdpa_attention_modules(model) if layers is None else dict(model.named_modules())
    if layers is not None:
        return capture, _select(candidates, layers, model)
    prefix = "" if embedding is None else _encoder_prefix(embedding[0])
    modules = {n: m for n, m in candidates.items() if n.startswith(prefix)}
    if modules:
        return capture, modules
    if is_hf_model(model):
        # Such transformers models compute their softmax themselves: naming their modules would not help.
        raise ValueError(
            f"vitmad.record: found no attention layer in {type(model).__name__}: its attention does not go "
            "through transformers' AttentionInterface (no module with q_proj/k_proj or query/key projections) and "
            "it has no timm attention; vitmad.record does not support this transformers family yet"
        )
    raise ValueError(
        f"vitmad.record: found no attention layer in {type(model).__name__}: none of its modules uses "
        "transformers' AttentionInterface or timm's fused attention (a fused_attn switch). If some of its "
        "modules call F.scaled_dot_product_attention, pass layers=[their qualified names]"
    )


class Recording:
    """The context manager :func:`record` returns; see there. Readable during and after the ``with`` block."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[str] | None = None,
        patch: int | None = None,
        grid: Sequence[int] | None = None,
        num_prefix_tokens: int | None = None,
        renormalize: bool = False,
        reduction: str = "mean",
    ):
        if reduction not in ("mean", "none"):
            raise ValueError(f"vitmad.record: reduction must be 'mean' or 'none', got '{reduction}'")
        if patch is not None and (not isinstance(patch, int) or patch <= 0):
            raise ValueError(f"vitmad.record: patch must be a positive int (pixels), got {patch!r}")
        if grid is not None and (len(grid) != 2 or any(int(g) <= 0 for g in grid)):
            raise ValueError(f"vitmad.record: grid must be [grid_h, grid_w] of positive ints, got {list(grid)}")
        if num_prefix_tokens is not None and num_prefix_tokens < 0:
            raise ValueError(f"vitmad.record: num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        if isinstance(layers, str):
            raise TypeError(f"vitmad.record: layers must be a list of names or patterns, got the string '{layers}'")
        self.model = model
        self.renormalize = bool(renormalize)
        self.reduction = reduction
        self._grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self._num_prefix_tokens = num_prefix_tokens
        self.calls: list[RecordedCall] = []
        self._call_grid: tuple[int, int] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

        embedding = find_patch_embedding(model)
        self._patch_embedding = None if embedding is None else embedding[1]
        self.patch = _detect_patch(model, embedding, patch, self._grid)
        self._capture, self._modules = _attention_layers(model, embedding, layers)
        # Per module, the calls of its current forward not yet recorded (several for differential attention).
        self._pending: dict[str, list] = {}
        self._hooks = (
            HFAttentionHooks(model, self._modules, self._on_attention) if self._capture == "transformers"
            else SdpaAttentionHooks(self._modules, self._on_attention, self._on_module_done)
        )

    # What was recorded -------------------------------------------------------------------------------------

    @property
    def mad(self) -> torch.Tensor:
        """``[L, B, H]`` float32 (``reduction="mean"``) or ``[L, B, H, N - P]`` of the latest forward call."""
        name = type(self.model).__name__
        if not self.calls:
            raise RuntimeError(
                f"vitmad.record: {name} has not run in this recording; call the model inside the "
                "`with vitmad.record(model) as rec:` block"
            )
        if not self.calls[-1].per_layer:
            shown = ", ".join(list(self._modules)[:4]) + (", ..." if len(self._modules) > 4 else "")
            how = ("transformers' AttentionInterface" if self._capture == "transformers"
                   else "F.scaled_dot_product_attention")
            raise RuntimeError(
                f"vitmad.record: {name} ran, but none of the {len(self._modules)} modules being recorded ({shown}) "
                f"reached {how} in that forward call; pass layers=[the modules that compute its attention]"
            )
        return self.calls[-1].mad

    @property
    def layers(self) -> list[str]:
        """The recorded attention modules' qualified names in execution order (latest call)."""
        return list(self.calls[-1].layers) if self.calls else []

    @property
    def layout(self) -> ModelLayout:
        """Patch size, grid and prefix tokens of the latest call (the given or detected values before one)."""
        if self.calls and self.calls[-1].layout is not None:
            return self.calls[-1].layout
        return ModelLayout(self.patch, self._grid, self._num_prefix_tokens)

    # Hooks ---------------------------------------------------------------------------------------------------

    def _start_call(self, module: nn.Module, args, output=None) -> None:
        if output is not None:
            if output.dim() != 4:
                raise RuntimeError(
                    f"vitmad.record: the patch embedding of {type(self.model).__name__} returned shape "
                    f"{list(output.shape)}, expected [B, C, grid_h, grid_w]; pass grid=[grid_h, grid_w]"
                )
            self._call_grid = (int(output.shape[-2]), int(output.shape[-1]))
        self.calls.append(RecordedCall())

    def _call_layout(self, name: str, num_tokens: int) -> ModelLayout:
        grid = self._grid or self._call_grid
        if grid is None:
            raise RuntimeError(
                f"vitmad.record: {name} of {type(self.model).__name__} ran before the patch embedding; pass "
                "grid=[grid_h, grid_w]"
            )
        patches = grid[0] * grid[1]
        prefix = self._num_prefix_tokens
        if prefix is None and num_tokens < patches:
            raise ValueError(
                f"vitmad.record: {name} ({type(self._modules[name]).__name__}) of {type(self.model).__name__} "
                f"attends over {num_tokens} tokens, fewer than the {grid[0]}x{grid[1]} = {patches} patches of "
                f"the {'given grid' if self._grid else 'patch embedding'} (windows, pooled tokens or dropped "
                "patches?), so its tokens cannot be placed; pass grid=[grid_h, grid_w] if its tokens are a full "
                "grid of that size"
            )
        if prefix is None:
            prefix = num_tokens - patches
        if prefix + patches != num_tokens:
            raise ValueError(
                f"vitmad.record: {name} ({type(self._modules[name]).__name__}) of {type(self.model).__name__} "
                f"attends over {num_tokens} tokens, not the {grid[0]}x{grid[1]} = {patches} patches plus the "
                f"num_prefix_tokens={prefix} given; pass the num_prefix_tokens and grid of its tokens"
            )
        return ModelLayout(self.patch, grid, prefix)

    def _on_attention(self, name, query, key, scale, mask) -> None:
        """One attention call of module ``name``: reduced at once, recorded when the module's forward ends."""
        if not self.calls:
            self.calls.append(RecordedCall())
        layout = self._call_layout(name, query.shape[-2])
        # SDPA broadcasts the leading dims of q and k and adds a float mask of any float dtype; mad_qk takes
        # equal leading dims (a stride-0 view costs nothing) and a bias in q's dtype, or a bool mask as is.
        lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
        query = query.detach().expand(*lead, *query.shape[-2:])
        key = key.detach().expand(*lead, *key.shape[-2:])
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.detach().to(query.dtype)
        grid_form = {"num_prefix_tokens": layout.num_prefix_tokens, "grid": list(layout.grid), "scale": scale,
                     "attn_bias": mask}
        with torch.no_grad():
            if is_differential(self._modules[name]):
                value = self._call_sums(query, key, layout, grid_form)
            else:
                value = mad_qk(query, key, self.patch, renormalize=self.renormalize, reduction=self.reduction,
                               **grid_form)
        self._pending.setdefault(name, []).append((layout, value))
        if self._capture == "transformers":  # AttentionInterface: one call per module forward
            self._on_module_done(name, self._modules[name], True)

    def _call_sums(self, query, key, layout: ModelLayout, grid_form: dict) -> CallSums:
        """Per-query sums of one of several softmax maps of a layer, to be combined when the layer ends."""
        weighted = mad_qk(query, key, self.patch, renormalize=False, reduction="none", **grid_form)
        if not self.renormalize:
            return CallSums(weighted)
        # The mass on patch keys as a MAD: every patch query at 0, every patch key at 1, prefix tokens nowhere.
        p, n = layout.num_prefix_tokens, query.shape[-2]
        at = torch.full((n, 1), float("nan"), dtype=torch.float64, device=query.device)
        queries_at, keys_at = at.clone(), at.clone()
        queries_at[p:], keys_at[p:] = 0.0, 1.0
        mass = mad_qk(query, key, positions=queries_at, key_positions=keys_at, scale=grid_form["scale"],
                      attn_bias=grid_form["attn_bias"], reduction="none")[..., p:]
        return CallSums(weighted, mass)

    def _on_module_done(self, name: str, module: nn.Module, completed: bool) -> None:
        """Record what module ``name`` computed in the forward that just ended: one entry per layer."""
        pending = self._pending.pop(name, [])
        if not completed or not pending:
            return
        layout = pending[0][0]
        if is_differential(module) and len(pending) == 2:
            lam = differential_lambda(module)
            value, parts = combine(pending[0][1], pending[1][1], lam, renormalize=self.renormalize,
                                   reduce_mean=self.reduction == "mean")
            components = {"mad": list(parts), "lambda": lam}
        elif len(pending) == 1 and not is_differential(module):
            value, components = pending[0][1], None
        else:
            raise ValueError(
                f"vitmad.record: {name} ({type(module).__name__}) of {type(self.model).__name__} made "
                f"{len(pending)} attention calls in one forward; vitmad knows how several calls combine only for "
                "differential attention (two calls, A1 - lambda * A2); leave this module out with layers=[the "
                "other attention modules]"
            )
        call = self.calls[-1]
        if call.layout is None:
            call.layout = layout
        call.layers.append(name)
        call.per_layer.append(value)
        if components is not None:
            call.components[name] = components

    def __enter__(self) -> Recording:
        try:
            if self._patch_embedding is not None:
                self._handles.append(self._patch_embedding.register_forward_hook(self._start_call))
            else:
                self._handles.append(self.model.register_forward_pre_hook(self._start_call))
            self._hooks.install()
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooks.remove()
        self._pending.clear()

    def __exit__(self, *exc_info) -> None:
        self._remove()


def record(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    patch: int | None = None,
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
) -> Recording:
    """Records the mean attention distance of every attention layer while ``model`` runs unchanged.

    Example::

        with vitmad.record(model) as rec:
            model(pixel_values)
        rec.mad     # [L, B, H] float32, pixels
        rec.layers  # ["encoder.layer.0.attention", ...]

    Works with transformers ``PreTrainedModel``s that use ``AttentionInterface`` (ViT, DeiT, BEiT, DINOv2 with
    and without registers, ViTMAE with ``mask_ratio=0``, CLIP and SigLIP vision towers, ...) in any attention
    implementation, and with timm ViTs on the fused path (``vit_*`` with registers or ``dynamic_img_size``,
    ``deit_*``, EVA with RoPE). The model keeps its attention implementation, so its outputs are the same as
    without recording; it is restored on exit, also when the forward raises.

    Args:
        model: the model, called inside the ``with`` block as usual (any entry point).
        layers: qualified names or wildcard patterns of the attention modules to record; by default every
            self-attention layer of the tower that owns the patch embedding. For models neither transformers
            nor timm, the names of the modules that call ``F.scaled_dot_product_attention``.
        patch: pixel size of a patch; by default the patch-embedding convolution's kernel size.
        grid: ``[grid_h, grid_w]``; by default the patch embedding's output size in each call.
        num_prefix_tokens: tokens before the patches; by default ``N - grid_h * grid_w`` in each call.
        renormalize: see :func:`vitmad.mad`.
        reduction: ``"mean"`` gives ``rec.mad`` ``[L, B, H]``, ``"none"`` ``[L, B, H, N - P]``.

    Returns:
        A :class:`Recording`: ``rec.mad`` / ``rec.layers`` / ``rec.layout`` of the latest forward call and
        ``rec.calls``, a :class:`RecordedCall` per forward call made in the block.

    Raises:
        ValueError: an option is invalid, or the layout cannot be detected: the message names the model class
            and what to pass by hand.
    """
    return Recording(
        model, layers=layers, patch=patch, grid=grid, num_prefix_tokens=num_prefix_tokens,
        renormalize=renormalize, reduction=reduction,
    )
