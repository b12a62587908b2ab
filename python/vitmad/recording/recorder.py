"""``vitmad.record``: every attention layer's MAD, recorded while a real vision transformer runs.

Each recorded layer's attention is captured where it is computed and reduced to MAD at once:

- queries and keys where the attention receives them (transformers' ``AttentionInterface``, or the module's
  ``F.scaled_dot_product_attention`` call): flash-MAD, ``vitmad::mad_qk``, the probabilities never exist;
- the probabilities a module computes itself (explicit softmax: timm with ``fused_attn=False``, transformers
  families that bypass ``AttentionInterface``): read once by the fused ``vitmad::mad`` op, never copied.

Every call is measured in the position form of the ops: a placer per layer (:mod:`.families`) gives each token
its pixel position in the input image (windows, shifted and padded windows, pooled keys, hierarchies, tokens
without a position anywhere) and folds the per-query values back onto the layer's token grid
(:mod:`.placement`). The model's own attention runs unchanged.

Repeated forwards: every forward call inside one ``record`` block is kept as a :class:`RecordedCall` in
``rec.calls`` (a call starts when the model's first convolution runs on the image, or its NaFlex tower where
it has none, and holds the recorded layers that run until the next start, also those a predictor runs after the
method that ran the tower has returned); ``rec.mad``, ``rec.layers``, ``rec.geometry`` and ``rec.layout`` describe
the latest call.

One layer, one entry: a module that computes its attention in several calls (differential attention, two
softmax maps) is recorded once, with the MAD of the attention it applies (:mod:`.differential`).

Video layers (:mod:`.families.video`): the placement gives each tubelet a time position too, and a second op
call measures the temporal distance; ``rec.temporal_mad`` holds the temporal MAD in frames.

Statistics beside MAD (``record(model, stats=...)``): the same single op call per layer computes them
(``vitmad::stats_qk_pos`` / ``stats_pos``), folded like MAD; the prefix maps (CLS and registers over the
image) are the rows of the tokens without a position, computed beside it (:mod:`vitmad.ops.stats_op`).
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ops import attention_stats, attention_stats_qk, mad, mad_qk
from ..ops.arguments import (
    STAT_NAMES,
    TEMPORAL_MAD,
    check_reduction,
    check_renormalize,
    grid_ints,
    index_int,
    is_trusted_positions,
    is_trusted_same_tokens,
    same_tokens,
    trust_same_tokens,
)
from ..ops.stats_op import MAP_NAME, common_tokens, derived_once
from .compiled import EagerWhileRecording, check_compiled, compiled_forwards, graph_form_refusal, uncompiled
from .differential import CallSums, combine, differential_lambda, is_differential
from .families import ClassQueries, Skip, family_modules, family_placer, probabilities_source, probabilities_view
from .families.class_attention import ClassQueryPlacer
from .families.diffusers_autoencoders import attention_modules as autoencoder_attention
from .families.diffusers_autoencoders import beside_a_denoiser, text_encoders_beside_nets
from .families.diffusers_images import denoisers_beside
from .families.kornia import listed_dinov2
from .families.masked import GivenPositionsPlacer
from .families.plain import (
    MODEL_INPUT_SHAPE,
    RUN_GRIDS,
    PlainLayout,
    PlainPlacer,
    appended_tokens,
    find_patch_embedding,
    in_a_known_library,
    keeps_image_layout,
)
from .families.sam_map_encoder import is_second_encoder_of
from .flex_call import kept_by_every_query, unread_flex_refusal
from .forward_owner import (
    ForwardOwner,
    ModuleCall,
    current_module_call,
    forward_caller_frame,
    frame_live,
    module_call_live,
)
from .forward_owner import in_backward as _in_backward
from .mha_capture import MultiheadAttentionHooks, mha_modules, reads_own_arguments
from .module_capture import (
    ModuleAttentionHooks,
    attends_itself,
    calls_functional_multihead,
    may_compute_attention,
    multiplies_matrices,
    named_with_projections,
    names_softmax,
    reaches_fused_attention,
    source_attention_modules,
    timm_attention_modules,
)
from .module_index import is_known_library, is_users_class, module_list, named_module_list, shared_walks
from .placement import (
    CAUSAL_ADVICE,
    CallContext,
    LayerGeometry,
    LayerPlacer,
    ModelLayout,
    NotPlaceable,
    Placement,
    copy_by_content,
    is_read_only,
    on_device,
)
from .spacing import Spacing, check_spacing
from .towers import (
    encoder_prefix,
    first_convolution,
    other_image_towers,
    stems_beside_towers,
    tower_inputs,
    tower_starts,
)
from .transformers_capture import (
    HFAttentionHooks,
    hf_attention_modules,
    is_hf_model,
    reads_implementation_by_interface,
    uses_attention_interface,
)

__all__ = ["record", "Recording", "RecordedCall", "RECORD_STATS", "split_stat_names"]

# What record(stats=...) takes: the statistics of the ops and the prefix maps.
RECORD_STATS = (*STAT_NAMES, MAP_NAME)


@dataclass(eq=False)  # by identity: its tensors have no truth value (rec.calls.index(call), QA 359)
class RecordedCall:
    """The MAD of every recorded attention layer in one forward call.

    Attributes:
        layers: the attention modules' qualified names, in execution order.
        per_layer: one tensor per entry of ``layers``: ``[B, H_l]`` (``reduction="mean"``) or ``[B, H_l, T_l]``
            with ``T_l`` the layer's positioned tokens in row-major order of its grid.
        geometry: one :class:`~vitmad.recording.placement.LayerGeometry` per layer: its token grid, pixel
            stride, attention kind and head count.
        components: for layers whose attention combines several softmax maps (differential attention), by
            layer name: ``{"mad": [MAD of A1, MAD of A2], "lambda": lambda}``, each MAD shaped like
            ``per_layer``'s entry; the layer's own entry is the MAD of ``A1 - lambda * A2``.
        temporal: one entry per layer: the temporal MAD in frames of a video layer, shaped like ``per_layer``'s
            entry (``per_layer`` then holds its spatial MAD in pixels), None for an image layer.
        statistics: by statistic asked for besides MAD (``"entropy"``, ``"prefix_mass"``, ``"self_mass"``), one
            tensor per layer shaped like ``per_layer``'s entry; NaN where the statistic is not defined (every one of
            them in a differential-attention layer, see ``components``; ``"self_mass"`` where the keys are not the
            queries).
        prefix_maps: with ``"prefix_maps"`` asked for, one entry per layer: ``[B, H, Q, T]``, the attention of each
            of the layer's ``Q`` tokens without a position (CLS, registers, in token order) over its ``T``
            positioned tokens (row-major grid order, as ``per_layer``; with ``positions=`` given by hand, the
            sequence's tokens in order, NaN in the columns of those without a position); None for a layer whose keys
            are not its queries (pooled keys), that has no such token, or whose attention is differential. Where
            each window or frame holds its own copy of those tokens (vit-pytorch's MaxViT registers and SepViT's
            window token, RegionViT's regional tokens, TimeSformer's divided space attention), cell ``t`` of a row
            is the copy in ``t``'s window or frame: a row stitched from the copies, whose sum over the grid is no one
            token's mass.
        class_layers: with ``"prefix_maps"`` asked for, the class-attention and attention-pooling layers and the
            DETR decoders' cross-attention that ran (their queries have no position, so no MAD: they are in no other
            list), in execution order.
        class_maps: one entry per ``class_layers``: ``[B, H, Q, T]``, the attention of the layer's ``Q`` queries
            (the class token, a pooling head's learned queries, a DETR decoder's object queries) over the ``T``
            positioned keys, in row-major order of ``class_geometry``'s grid (NaN at a key without a position).
        class_geometry: one :class:`~vitmad.recording.placement.LayerGeometry` per ``class_layers``: the grid and
            stride of its keys.
    """

    layers: list[str] = field(default_factory=list)
    per_layer: list[torch.Tensor] = field(default_factory=list)
    geometry: list[LayerGeometry] = field(default_factory=list)
    components: dict[str, dict] = field(default_factory=dict)
    temporal: list[torch.Tensor | None] = field(default_factory=list)
    statistics: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    prefix_maps: list[torch.Tensor | None] = field(default_factory=list)
    class_layers: list[str] = field(default_factory=list)
    class_maps: list[torch.Tensor] = field(default_factory=list)
    class_geometry: list[LayerGeometry] = field(default_factory=list)
    # Whether a recorded module's forward ended in this call (a forward through another tower runs none).
    _modules_ran: bool = field(default=False, repr=False, compare=False)

    def _keep_layers(self, count: int, class_count: int) -> None:
        """Keep the first ``count`` layers and ``class_count`` class-attention layers (a forward that raised after
        them: the rest is taken back)."""
        for name in set(self.layers[count:]) - set(self.layers[:count]):
            self.components.pop(name, None)
        for values in (self.layers, self.per_layer, self.geometry, self.temporal, self.prefix_maps,
                       *self.statistics.values()):
            del values[count:]
        for values in (self.class_layers, self.class_maps, self.class_geometry):
            del values[class_count:]

    def _is_empty(self) -> bool:
        """No layer of this call has run yet (a MAD layer or, with the prefix maps, a class-attention layer)."""
        return not self.layers and not self.class_layers

    @property
    def class_attention_maps(self) -> dict[str, torch.Tensor]:
        """``{class-attention layer: [B, H, Q, T]}``, from ``class_layers`` and ``class_maps``.

        Raises:
            ValueError: a class-attention module ran more than once in this call (read the lists).
        """
        if len(set(self.class_layers)) != len(self.class_layers):
            again = sorted({n for n in self.class_layers if self.class_layers.count(n) > 1})
            raise ValueError(f"vitmad.record: the class-attention module(s) {', '.join(again)} ran more than once in "
                             "one forward call; read rec.calls[-1].class_layers and .class_maps, one entry per run")
        return dict(zip(self.class_layers, self.class_maps))

    @property
    def map_layers(self) -> list[tuple[str, torch.Tensor | None, LayerGeometry]]:
        """``(name, maps, geometry)`` of every layer that may have maps, in the order of a profile's map indices:
        the recorded layers (``prefix_maps``, None where a layer has none), then the class-attention and pooling
        layers (``class_maps``)."""
        return [*zip(self.layers, self.prefix_maps, self.geometry),
                *zip(self.class_layers, self.class_maps, self.class_geometry)]

    @property
    def heads(self) -> list[int]:
        """Each layer's head count."""
        return [g.heads for g in self.geometry]

    @property
    def mad(self) -> torch.Tensor:
        """``[L, B, H]`` float32 (float64 for a float64 model; ``reduction="mean"``) or ``[L, B, H, T]``
        (``"none"``); spatial, in pixels.

        Where the head count changes with depth (Swin: 3, 6, 12, 24), ``H`` is the largest and a layer's
        missing heads are NaN; per-token values of layers on different grids do not stack (use ``per_layer``).
        """
        return self._stack(self.per_layer, "rec.per_layer", "rec.mad")

    @property
    def temporal_mad(self) -> torch.Tensor:
        """Video models: ``[L, B, H]`` float32 (``"mean"``) or ``[L, B, H, T]`` (``"none"``), the temporal MAD
        in input frames beside :attr:`mad` (``docs/definition.md``, video).

        Raises:
            ValueError: a recorded layer has no frames (an image layer).
        """
        without = [(name, g) for name, t, g in zip(self.layers, self.temporal, self.geometry) if t is None]
        if without:
            # A volume's slice axis is space (docs/definition.md, volumes), not time: said so, not "images" (QA 392).
            kinds = []
            for kind, names in (("a volume's slices, an axis of space, not frames",
                                 [name for name, g in without if g.depth is not None]),
                                ("images without frames", [name for name, g in without if g.depth is None])):
                if names:
                    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                    kinds.append(f"{len(names)} {'attends' if len(names) == 1 else 'attend'} over {kind} ({shown})")
            raise ValueError(f"vitmad.record: temporal_mad is defined for video layers only; of the recorded layers, "
                             f"{' and '.join(kinds)}")
        return self._stack(self.temporal, "rec.calls[-1].temporal", "rec.temporal_mad")

    def stat(self, name: str) -> torch.Tensor:
        """A statistic stacked over the layers like :attr:`mad`: ``[L, B, H]`` (``"mean"``) or ``[L, B, H, T]``;
        ``"mad"`` is :attr:`mad`.

        Raises:
            KeyError: ``name`` was not asked for in ``record(stats=...)``.
        """
        if name == "mad":
            return self.mad
        if name not in self.statistics:
            raise _missing_statistic(name, ["mad", *self.statistics])
        return self._stack(self.statistics[name], f"rec.calls[-1].statistics['{name}']",
                           f"rec.calls[-1].stat('{name}')")

    def _stack(self, values: list[torch.Tensor], per_layer: str, stacked: str) -> torch.Tensor:
        if not values and not self.class_layers:
            # A cache skipped every recorded layer (diffusers' Pyramid Attention Broadcast reuses attention outputs
            # on some denoising steps), or the call's layers are outside those recorded.
            raise ValueError(
                f"vitmad.record: no recorded layer ran in this call, so it has no {stacked.split('.')[-1]} (a cache "
                "such as diffusers' Pyramid Attention Broadcast may have skipped them); read the calls that have "
                "layers: [call for call in rec.calls if call.layers]"
            )
        if not values:
            # Only class-attention or pooling layers ran (XCiT: every other layer attends over channels).
            raise ValueError(
                f"vitmad.record: no layer with a MAD ran in this call, only class attention or attention pooling "
                f"({', '.join(self.class_layers)}), whose queries (a class token, learned queries, a pooled token) "
                "have no position; their maps are in rec.class_attention_maps"
            )
        batches = {int(t.shape[0]) for t in values}
        if len(batches) > 1:
            # A layer run once per part of the batch (AnimateDiff's FreeNoise split inference) is one entry per part.
            raise ValueError(
                f"vitmad.record: the recorded entries of this call have different batch sizes ({sorted(batches)}): "
                "its layers ran on batches of different sizes (nets of one step run on different batches, such as a "
                "classifier-free guidance step's doubled latents between its encode and decode, or a layer run once "
                "per part of the batch: diffusers' FreeNoise split inference, a model that chunks its batch); read "
                f"{per_layer} (one [B, H] per entry, in the order they ran) and rec.layers instead "
                f"of {stacked}"
            )
        shapes = {tuple(t.shape[2:]) for t in values}
        # Per-token values of layers on different grids of as many tokens (6 x 4 and 4 x 6) stacked, and a reader
        # reshaping them by one grid put one layer's values on the wrong cells (QA 272).
        grids = {(g.grid, g.frames) for g in self.geometry} if values[0].dim() > 2 else set()
        if len(shapes) > 1 or len(grids) > 1:
            raise ValueError(
                "vitmad.record: the recorded layers have per-token values on different token grids "
                f"({sorted({g.grid if g.frames is None else (g.frames, *g.grid) for g in self.geometry}, key=str)}); "
                f"read {per_layer} (one [B, H, T] per layer) and "
                f"rec.geometry instead of {stacked}"
            )
        heads = max(t.shape[1] for t in values)
        padded = [t if t.shape[1] == heads else
                  torch.cat([t, t.new_full((t.shape[0], heads - t.shape[1], *t.shape[2:]), float("nan"))], 1)
                  for t in values]
        return torch.stack(padded)

    @property
    def layout(self) -> ModelLayout | None:
        """Patch size, grid and prefix tokens when every layer attends over the same plain ViT layout."""
        plain = {(g.grid, g.stride, g.num_prefix_tokens, g.depth) for g in self.geometry}
        if len(plain) != 1:
            return None
        grid, stride, prefix, depth = plain.pop()
        # A volume's grid has a third axis (LayerGeometry.depth), which a plain ViT layout cannot state.
        if prefix is None or depth is not None or stride[0] != stride[1] or stride[0] != int(stride[0]):
            return None
        return ModelLayout(int(stride[0]), grid, prefix)


def _as_autocast_casts(query: torch.Tensor, key: torch.Tensor, mask):
    """``(query, key, mask)`` as the attention kernel receives them: under autocast, SDPA runs on its float32 inputs
    cast to the autocast dtype, below where vitmad sees the call. Measured as given, a model whose q and k reach SDPA
    in float32 (DINOv3's rotary embedding in the pixels' dtype) was measured on other logits than the kernel's, 1e-4
    to 2e-3 relative under bfloat16 (found by QA)."""
    device = query.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return query, key, mask
    dtype = torch.get_autocast_dtype(device)

    def cast(tensor):
        return tensor.to(dtype) if tensor is not None and tensor.dtype == torch.float32 else tensor

    return cast(query), cast(key), cast(mask)


def _uses_plain_layout(placer: LayerPlacer) -> bool:
    """Whether ``placer`` places its tokens by the plain layout (the one ``patch=``, ``grid=`` and
    ``num_prefix_tokens=`` give by hand)."""
    return (isinstance(placer, PlainPlacer) or getattr(placer, "given_layout", None) is not None
            or (isinstance(placer, ClassQueryPlacer) and isinstance(placer.keys, PlainPlacer)))


class LayersError(ValueError):
    """``layers=`` names no module to record (a pattern matching none, the model itself). ``finding`` is the message
    after ``"vitmad.record: layers "``, which the profiler says of its own ``layers`` (engine._check_recordable)."""

    def __init__(self, finding: str):
        self.finding = finding
        super().__init__(f"vitmad.record: layers {finding}")

    def __reduce__(self):  # its argument, not its message, for a process pool
        return type(self), (self.finding,)


def _select(candidates: dict[str, nn.Module], patterns: Sequence[str], model: nn.Module,
            shown: dict[str, nn.Module]) -> dict[str, nn.Module]:
    selected = {}
    for pattern in patterns:
        matches = {name: m for name, m in candidates.items() if fnmatch.fnmatchcase(name, pattern)}
        if not matches:
            first = _first_names_of(model, pattern, candidates)
            if first:
                # A module held twice (weights shared across depth, or a second container of the same blocks) is
                # listed under its first name only (QA 420, QA 424).
                shown = ", ".join(f"'{name}'" for name in first[:4]) + (", ..." if len(first) > 4 else "")
                raise LayersError(
                    f"pattern '{pattern}' matches only names under which {type(model).__name__} holds modules it "
                    f"lists under other names, first held there: {shown} (weights shared across depth, or a second "
                    "container of the same modules); name those: each run of a module is recorded as a layer of "
                    "its own"
                )
            names = ", ".join(list(shown)[:4]) + (", ..." if len(shown) > 4 else "")
            raise LayersError(
                f"pattern '{pattern}' matches no module of {type(model).__name__}; expected qualified names "
                f"(wildcards allowed) such as its attention modules: {names or 'none found'}"
            )
        selected.update(matches)
    return {name: m for name, m in candidates.items() if name in selected}


def _laid_out_by_library(model: nn.Module, embedding: tuple | None, name: str) -> bool:
    """Whether a library vitmad reads lays out the layer ``name``'s tokens: the deepest module of a library on its
    path that holds the patch embedding ``embedding`` (X-CLIP, also inside a user's wrapper, QA 432), and every
    module from it down to the layer, are a library's (or torch's containers); its family places or skips its
    layers over frames (QA 429). A user's block inside a library's model, or a user's model built of a library's
    blocks, is laid out by the user (QA 430)."""
    if embedding is None:
        return False
    parts = name.split(".")
    path = [(".".join(parts[:depth]), model.get_submodule(".".join(parts[:depth]))) for depth in range(len(parts) + 1)]
    holders = [i for i, (prefix, module) in enumerate(path) if is_known_library(type(module))
               and (not prefix or embedding[0].startswith(prefix + "."))]
    return bool(holders) and not any(is_users_class(type(module)) for _, module in path[holders[-1]:])


def _first_names_of(model: nn.Module, pattern: str, candidates: dict[str, nn.Module]) -> list[str]:
    """The names ``candidates`` (every module, each once, under the first name it is held by) list for the modules
    that ``pattern`` matches under another name they are held by too, in module order; empty where it matches
    none."""
    matched = {id(m) for name, m in model.named_modules(remove_duplicate=False) if fnmatch.fnmatchcase(name, pattern)}
    return [name for name, m in candidates.items() if id(m) in matched]


def _blocks_by_their_attention(chosen: dict[str, nn.Module], found: dict[str, nn.Module], exact: set[str],
                               model: nn.Module) -> dict[str, nn.Module]:
    """``chosen`` (the modules ``layers=`` matched) with each wildcard's match that holds attention modules vitmad
    found, and computes no attention of its own, replaced by those modules, in module order (``"blocks.?"`` of a
    timm ViT found nothing, QA 359). A block named whole stays the user's layer, as recorded before (QA 362: a ViTamin
    or CrossViT block named so was renamed after its attention module); where it cannot be placed, its refusal
    names the attention modules it holds (:func:`_held_attention`). A block of the user's own computes none where
    neither its forward nor a module it holds outside the attention modules found names a softmax or the fused
    attention: it was taken whole, and one holding two attention modules refused as "2 attention calls in one
    forward" (QA 405); one holding a softmax vitmad does not find (a token mixer) is still taken whole, and refused
    so, rather than recorded without it (QA 406)."""
    replaced = {name: [n for n in found if _holds(name, n)] for name, module in chosen.items()
                if name and name not in found and name not in exact
                and (not may_compute_attention(module) or _attends_only_through_found(name, module, found))}
    replaced = {name: inner for name, inner in replaced.items() if inner}
    if not replaced:
        return chosen
    kept = {n for name in chosen for n in replaced.get(name, [name])}
    return {name: m for name, m in named_module_list(model) if name in kept}


def _holds_chosen_attention(name: str, module: nn.Module, inner: list[str], found: dict[str, nn.Module],
                            exact: set[str], chosen: dict[str, nn.Module]) -> bool:
    """Whether module ``name``, which ``layers=`` chose, holds an attention module also chosen (``inner``) whose calls
    a capture around it would record again: it is then left to that module. A block of the user's whose forward
    attends itself (a softmax or the fused attention beside query or key projections of its own, not a router's or a
    gate's softmax: QA 418) beside ``nn.MultiheadAttention`` layers only (subclasses
    too), whose calls no capture around it reads, is kept beside them: ``"blocks.*"`` recorded the layer alone, the
    block's own attention lost without a word (QA 411, QA 415)."""
    held = [other for other in inner if _holds(name, other) and (other in found or name not in exact)]
    if not held:
        return False
    return not (_attends_itself_beside(module) and all(isinstance(chosen[other], nn.MultiheadAttention)
                                                       for other in held))


def blocks_beside_layers(modules: dict[str, nn.Module], named: set[str]) -> set[str]:
    """The recorded modules that attend themselves beside ``nn.MultiheadAttention`` layers they hold, also recorded
    (:func:`_attends_itself_beside`), not named whole in ``layers=``: their own attention is read where it can be
    placed, and a softmax of theirs that cannot (a gate's over two branches, fed by projections named as a query and
    a key that feed the layer) is passed by, as before such blocks were recorded beside their layers (it refused the
    model, QA 424)."""
    return {name for name, module in modules.items() if name not in named and _attends_itself_beside(module) and any(
        _holds(name, other) and isinstance(layer, nn.MultiheadAttention) for other, layer in modules.items())}


def _attends_itself_beside(module: nn.Module) -> bool:
    """Whether ``module``, a user's class holding ``nn.MultiheadAttention`` layers, attends itself beside them: its
    forward names a softmax or the fused attention beside query or key projections of its own
    (:func:`~.module_capture.attends_itself`), and makes no ``F.multi_head_attention_forward`` call, which a capture
    around it would read as its own. Its capture reads none of the layers' calls, so both are recorded."""
    cls = type(module)
    return is_users_class(cls) and attends_itself(module) and not calls_functional_multihead(cls)


def _attends_only_through_found(name: str, module: nn.Module, found: dict[str, nn.Module]) -> bool:
    """Whether neither ``module`` nor a module it holds outside the attention modules in ``found`` (and those inside
    them) may attend: names a softmax or the fused attention. Beside ``nn.MultiheadAttention`` layers alone, whose
    calls no capture around the block reads (the block was replaced by them before, whatever its softmax), only a
    softmax beside query or key projections of the module's own (:func:`~.module_capture.attends_itself`): a
    router's or a gate's softmax is none (QA 418). Beside other attention modules any softmax keeps the block whole,
    refused if it attends twice: projections named otherwise (``c_attn``, ``Wqkv``) lost its attention without a
    word (QA 419)."""
    held = [inner for inner in found if _holds(name, inner)]
    layers_alone = bool(held) and all(isinstance(found[inner], nn.MultiheadAttention) for inner in held)
    for inner_name, inner in module.named_modules(prefix=name):
        if inner_name in found or any(_holds(outer, inner_name) for outer in found):
            continue
        if attends_itself(inner) if layers_alone else (isinstance(inner, nn.Softmax) or names_softmax(inner)):
            return False
    return True


def _held_attention(chosen: dict[str, nn.Module], found: dict[str, nn.Module]) -> dict[str, list[str]]:
    """The attention modules vitmad found inside each module named whole that is not one itself (a Swin block, whose
    windows are its attention module's): said where that module's own placement is refused."""
    held = {name: [n for n in found if _holds(name, n)] for name in chosen if name and name not in found}
    return {name: inner for name, inner in held.items() if inner}


def _holds(outer: str, inner: str) -> bool:
    """Whether module ``inner`` is inside module ``outer``, by qualified name ('' is the model itself)."""
    return inner != outer and (outer == "" or inner.startswith(outer + "."))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module vitmad recognises as attention, by qualified name in module order: transformers' attention
    modules (query and key projections), timm's (a ``fused_attn`` switch and an input projection), modules whose
    forward computes attention (:func:`~.module_capture.source_attention_modules`) and those only a family knows.
    A module inside another one found is left to the outer one."""
    with shared_walks():
        found = {}
        # A transformers model inside a wrapper (nn.Sequential, nn.DataParallel, a user's module) too: its modules
        # are then recorded as any module that computes attention (module_capture), not through its config. So
        # too a transformers tower that is no PreTrainedModel (Idefics' IdeficsVisionTransformer, recorded alone).
        if any(is_hf_model(m) or type(m).__module__.startswith("transformers.models.") for m in module_list(model)):
            found.update(hf_attention_modules(model))
        found.update(timm_attention_modules(model))
        known = set(found)
        by_source = source_attention_modules(model)
        found.update(by_source)
        families = family_modules(model)
        found.update(families)
        known.update(families)
        multihead = mha_modules(model)
        found.update(multihead)
        # A module found by its source alone that holds an nn.MultiheadAttention (a user's block choosing it or its
        # own F.scaled_dot_product_attention) attends through it: captured around it, the MultiheadAttention's call
        # is one torch function (multi_head_attention_forward) whose SDPA is not seen, and the capture's mode turns
        # off its fast path, changing the output in the last bits (QA helper-247). The MultiheadAttention is kept.
        # One attending itself too (its softmax beside query or key projections of its own) and holding no other
        # attention module found is kept beside the MultiheadAttention layers it holds, as layers= keeps it: its own
        # attention was lost without a word (QA 415). (Beside another module found inside it, the block was left to
        # them, and still is: kept, it took that module's place, QA 424.) Its own softmax is a layer only where it
        # is placed: a gate's is passed by as before (blocks_beside_layers).
        beside = set()
        for name in [n for n in by_source if n not in known]:
            held = [inner for inner in multihead if _holds(name, inner)]
            if held and _attends_itself_beside(found[name]) and all(
                    inner in multihead for inner in found if _holds(name, inner)):
                beside.update(held)
            elif held:
                del found[name]
        ordered = {}
        for name, module in named_module_list(model):
            if name in found and (name in beside or not any(_holds(outer, name) for outer in ordered)):
                ordered[name] = module
        return ordered


def _missing_statistic(name: str, recorded: Sequence[str]) -> KeyError:
    """The error for a statistic not among those ``recorded``: what they are, or how to ask for it."""
    if name == TEMPORAL_MAD:
        return KeyError("vitmad.record: the temporal MAD of a video model is rec.temporal_mad "
                        "(rec.calls[i].temporal_mad), not among the statistics of rec.stats")
    if name not in STAT_NAMES:
        return KeyError(f"vitmad.record: {name!r} is not a statistic; the statistics are "
                        f"{', '.join(map(repr, STAT_NAMES))} (the prefix maps: rec.prefix_maps)")
    return KeyError(f"vitmad.record: the statistic {name!r} was not recorded (recorded: {', '.join(recorded)}); "
                    f"pass stats=[..., {name!r}] to vitmad.record")


class _StatisticsByName(dict):
    """:attr:`Recording.stats`: a dict whose missing name says what was recorded and how to ask for it (a bare
    ``KeyError: 'entropy'`` said neither, QA 280)."""

    def __missing__(self, name):
        raise _missing_statistic(name, list(self))

    def __reduce__(self):
        # Saved as a state dict is (an OrderedDict): torch.load's default weights_only=True refuses a class of
        # vitmad's, and builtins.dict as a global too (QA 285).
        return collections.OrderedDict, (), None, None, iter(self.items())


def split_stat_names(stats) -> tuple[frozenset[str], list[str]] | None:
    """What ``stats`` asks for, in the forms ``record`` and ``vitmad.profile`` take: None (nothing besides MAD), one
    name or a comma list, or a list, tuple or set of names; spaces around a name ignored, a name given twice asked for
    once, ``"all"`` standing for every one of :data:`RECORD_STATS`. Returns the names among them and the unknown
    ones (sorted), for the caller to refuse in its own words; None when ``stats`` is none of those forms, or a
    string that names nothing (``--stats ""``, ``--stats " , "``: an empty shell variable, more likely than a wish
    for MAD alone, which None and ``"mad"`` say)."""
    if stats is None:
        return frozenset(), []
    names = stats.split(",") if isinstance(stats, str) else stats
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(name, str) for name in names):
        return None
    names = {name.strip() for name in names} - {""}
    if isinstance(stats, str) and not names:
        return None
    unknown = sorted(names - {*RECORD_STATS, "all"})
    return frozenset(RECORD_STATS if "all" in names else names - {"all"} - set(unknown)), unknown


def _check_record_stats(stats) -> tuple[tuple[str, ...], bool]:
    """The statistics besides MAD that ``record(stats=...)`` asks for (in the ops' order), and whether the prefix
    maps are asked for (:func:`split_stat_names`)."""
    found = split_stat_names(stats)
    if found is None:
        error = ValueError if isinstance(stats, str) else TypeError  # a string that names nothing
        raise error(f"vitmad.record: stats must be a list of names among {', '.join(map(repr, RECORD_STATS))} "
                    f"(or 'all'), a comma list of them or None, got {stats!r}")
    names, unknown = found
    if unknown:
        # The ops take "temporal_mad" with times=; a recording measures it on every video layer unasked.
        temporal = ("; the temporal MAD of video layers needs no asking: it is always in rec.temporal_mad"
                    if "temporal_mad" in unknown else "")
        raise ValueError(f"vitmad.record: stats must be among {', '.join(map(repr, RECORD_STATS))} (or 'all'), got "
                         f"{', '.join(map(repr, unknown))}{temporal}")
    return tuple(n for n in STAT_NAMES if n in names and n != "mad"), MAP_NAME in names


def _not_recorded() -> bool:
    """Whether this forward is no attention of the model to record: a checkpointed layer run again by backward
    (:func:`_in_backward`), or ``torch.jit.trace`` running the model inside the block, where vitmad's ops would
    become part of the traced graph and run in every call of the traced module, recording or not."""
    if torch.jit.is_tracing():
        # Once per trace, not once per hook that asks (eight for a three-block ViT), whatever the warning filters.
        state = id(torch._C._get_tracing_state())
        if _TRACE_WARNED[0] != state:
            _TRACE_WARNED[0] = state
            warnings.warn("vitmad.record: torch.jit.trace ran a recorded model; that forward is not recorded "
                          "(vitmad's ops would be traced into the module's graph). Trace outside the record block.",
                          stacklevel=2)
        return True
    if torch.compiler.is_exporting():
        # torch.export (non-strict: it runs the Python forward on fake tensors, vitmad's hooks included, whose checks
        # of values then failed inside torch on a data-dependent guard). Warned once per export, which may run the
        # forward more than once: the state is reset by a hook that runs outside an export.
        if not _EXPORT_WARNED[0]:
            _EXPORT_WARNED[0] = True
            warnings.warn("vitmad.record: torch.export ran a recorded model; that forward is not recorded (vitmad's "
                          "ops would be traced into the exported program). Export outside the record block.",
                          stacklevel=2)
        return True
    _EXPORT_WARNED[0] = False
    if _in_transform():
        # Inside torch.func's vmap, grad, jacrev, ...: the tensors are the transform's wrappers, and the values
        # recorded from them would be too, unusable once the transform returns (torch.stack of them fails inside
        # torch). Warned once per forward of the model (_end_forward), not per hook.
        if not _TRANSFORM_WARNED[0]:
            _TRANSFORM_WARNED[0] = True
            warnings.warn("vitmad.record: a torch.func transform (vmap, grad, jacrev, ...) ran a recorded model; that "
                          "forward is not recorded (its tensors are the transform's wrappers). Run the model itself "
                          "inside the record block to record it.", stacklevel=2)
        return True
    _TRANSFORM_WARNED[0] = False
    return _in_backward()


def _in_transform() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) runs this code. (torch.compile's tracing, which stands for
    a transform of its own there, is the compiled route's business.)"""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


_TRACE_WARNED: list[int | None] = [None]  # id of the tracing state last warned about
_TRANSFORM_WARNED = [False]  # warned in this forward of the model or since a hook ran outside a torch.func transform
_EXPORT_WARNED = [False]  # warned in this forward of the model or since a hook ran outside torch.export


def _first_input(args, kwargs) -> torch.Tensor | None:
    """The input a module's forward reads its image from: its first positional tensor, else ``pixel_values=``, else
    its first tensor keyword argument; None without any."""
    tensor = next((value for value in args if isinstance(value, torch.Tensor)), None)
    if tensor is None and isinstance(kwargs.get("pixel_values"), torch.Tensor):
        tensor = kwargs["pixel_values"]
    return tensor if tensor is not None else next(
        (value for value in kwargs.values() if isinstance(value, torch.Tensor)), None)


def _same_storage(one: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether two tensors are one, or views of one storage."""
    if one is other:
        return True
    try:
        return bool(one.numel() and other.numel()) and \
            one.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (a fake or functional tensor under compile)
        return False


_MODEL_IMAGE = "towers.model_image"  # the size of the image the model's forward took in this call
_STEM_MAPS = "towers.stem_maps"  # the maps branches on the image beside the recorded towers made in a call
_TOWERS_ON_STEM = "towers.on_stem"  # the ids of the towers' starts whose tower took such a map in this call
_STEM_TOWER_INPUT = "towers.stem_tower_input"  # (h, w) of the stem's map the running tower took, in this call
_FORWARD = "call.forward"  # the serial of the forward of the model (ForwardOwner) this call started in


def _without_padding(placement: Placement, padded: torch.Tensor, lead: torch.Size) -> Placement:
    """``placement`` with the tokens ``padded`` ``[B, N]`` marks without a position, queries and keys, and absent
    from each image's mean (docs/definition.md: sequence padding the model masks out is neither). Only a layer of
    image tokens whose keys are its queries: its padding tokens still computed query rows, over the image's tokens,
    and were counted in the padded image's MAD (QA 378: 11.4 px where 6.9 px is right)."""
    if placement.key_positions is not None or placement.time_positions is not None:
        return placement
    padded = padded.to(placement.positions.device)
    positions = torch.where(padded[:, None, :, None], float("nan"), placement.positions)
    kept = placement.fold((~padded).to(positions.dtype)[:, None, :].expand(*lead, -1))  # [B, H, T], as values are
    present = kept[:, 0] > 0.5
    if placement.present is not None:
        present = present & placement.present
    return dataclasses.replace(placement, positions=positions, present=present)


def _image_size(args, kwargs=None) -> tuple[int, int] | None:
    """``(H, W)`` of the first tensor of 4 or more dims among a forward's arguments (the image a call starts at)."""
    image = next((a for a in list(args) + list((kwargs or {}).values())
                  if isinstance(a, torch.Tensor) and a.dim() >= 4), None)
    return None if image is None else (int(image.shape[-2]), int(image.shape[-1]))


def _reused_compiled_code(model: nn.Module) -> str:
    """Why a forward of ``model`` may have run without the recording's hooks: a torch.compile wrapper reusing code
    compiled before them (compiled.compiled_forwards), with what to do; empty where dynamo holds no such code."""
    compiled = compiled_forwards(model)
    if not compiled:
        return ""
    return (f": dynamo holds code compiled for {', '.join(compiled)}, made by an earlier torch.compile of this model "
            f"or of another {compiled[0].partition('.')[0]}; a torch.compile wrapper of the model run in the block "
            "reuses it (dynamo does not guard on hooks added since: torch._dynamo.config.skip_nnmodule_hook_guards), "
            "and calls none of the hooks vitmad added; if one ran, give vitmad.record the compiled wrapper, "
            "vitmad.record(compiled_model), which then runs eagerly while recorded, or call torch._dynamo.reset() "
            "before the block, so that the wrapper compiles anew around the hooks")


# The end of the skip reason of a found layer that normalised logits in a form vitmad does not read
# (Recording._say_unseen_layers): such an entry is taken back where a later call records the layer.
_NORMALISED_UNREAD = "(it normalised logits in another form)"

# The reason of a layer in an image tower beside the one a recording places: recorded by a recording of its own.
_SECOND_TOWER = "a second tower that embeds the image"


def _attends_to_nothing(module: nn.Module) -> bool:
    """A module of torch's own that computes no attention (nn.Linear, a norm, an activation: not
    nn.MultiheadAttention, nor a container, whose items may)."""
    return type(module).__module__.startswith("torch.nn.modules.") and not isinstance(
        module, (nn.MultiheadAttention, nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.Transformer,
                 nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))


def _warn_unrecorded_blocks(model: nn.Module, recorded: dict[str, nn.Module], skipped: Iterable[str],
                            embedding: str | None = None) -> None:
    """Warn once where the default layers of a model of the user's own leave out blocks of a list, blocks that hold
    a module computing a softmax or fused attention none of which is recorded or skipped with a reason (an explicit
    softmax in a class not named as attention): those layers were left out silently, and ``rec.mad[1]`` was
    ``blocks.4``'s (QA 257), also where the block was the list's first or last (QA 262), or in a second list beside
    the one holding the recorded layers (``local_blocks`` recorded, ``global_blocks`` not; QA 265). Blocks without
    any (a convolution stage, norms, MLPs) are no gap (they were warned of, QA 262), nor lists inside a recorded
    layer (its own parts) or of a library's classes (whose attention vitmad knows). In a container holding no
    recorded layer, a block counts only where a module of the user's in it also multiplies matrices (``q @ k``):
    classifier heads, MoE routers and calibrators compute a softmax of a projection, and were warned of (QA 270).
    (Beside recorded blocks, any softmax counts: an attention spelled as element-wise products is warned of there,
    QA 273, and so is a softmax head after the backbone in an nn.Sequential.)"""
    if is_known_library(type(model)):
        return
    taken = [*recorded, *skipped]
    # The model's child holding the patch embedding (``visual``): a list inside another child of it that embeds
    # tokens (a text tower: an nn.Embedding) lies outside the tower whose layers are recorded, and is no gap in them
    # (its layers were warned of with advice that layers= then refused, QA 433). Lists on the model itself are (QA
    # 265), and so are those of a child embedding no tokens (a second image tower that patchifies by unfold, QA 434).
    tower = embedding.split(".", 1)[0] if embedding and "." in embedding else None
    # (A ModuleDict of blocks too, QA 270: its items by key.)
    containers = {name: m for name, m in named_module_list(model)
                  if isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict))}
    # A block held twice (weights shared across depth: nn.ModuleList([block] * 3), or blocks sharing one attention
    # module) is named once, its first name: its other items run a recorded layer, and were warned of as left out
    # with advice to name them, which layers= refused as matching no module (QA 420).
    recorded_objects = {id(module) for module in recorded.values()}
    missing = []
    for path, container in containers.items():
        prefix = f"{path}." if path else ""
        if any(path == name or _holds(name, path) for name in recorded):
            continue
        if tower is not None and "." in path and path.split(".", 1)[0] != tower \
                and all(_holds(tower, name) for name in recorded) and _embeds_tokens(model, path.split(".", 1)[0]):
            continue
        items = {key: block for key, block in container._modules.items() if block is not None}
        held = {n[len(prefix):].split(".", 1)[0] for n in taken if n.startswith(prefix)} & items.keys()
        if any(is_known_library(type(items[key] if held else block)) for key, block in items.items()
               if not held or key in held):
            continue
        for key, block in items.items():
            # (An nn.Softmax that is itself an item of the list is an output layer: nn.Sequential(vit, Softmax).)
            if key in held or any(id(inner) in recorded_objects for inner in block.modules()):
                continue
            if not isinstance(block, nn.Softmax) and any(isinstance(inner, nn.Softmax) or (
                    not type(inner).__module__.startswith("torch.") and names_softmax(inner))
                    or named_with_projections(inner) for inner in block.modules()) and (held or any(
                        not type(inner).__module__.startswith("torch.") and multiplies_matrices(inner)
                        for inner in block.modules())):
                missing.append(f"{prefix}{key}")
    if missing:
        shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
        warnings.warn(
            f"vitmad.record: {shown} of {type(model).__name__}, in a list beside recorded attention layers, compute "
            "a softmax that vitmad does not take for attention (an explicit softmax in a class not named as "
            "attention?), or are named as attention with query or key projections and compute no softmax it reads "
            "(logits normalised by hand?): if they attend, they are left out of rec.layers, and rec.mad's layer "
            "axis skips them; pass layers=[every attention module's name] to say which modules attend",
            stacklevel=3)


def _embeds_tokens(model: nn.Module, child: str) -> bool:
    """Whether the model's child ``child`` embeds tokens of a vocabulary (an ``nn.Embedding``: a text tower)."""
    return any(isinstance(module, nn.Embedding) for module in model.get_submodule(child).modules())


class NoLayerError(ValueError):
    """vitmad.record found nothing to record in the model. ``finding`` says what it found, without the advice
    that follows it in the message (``layers=...``), which only a caller of record can act on: the profiler words
    its own (engine.plan_run)."""

    def __init__(self, finding: str, advice: str = ""):
        self.finding, self.advice = finding, advice
        super().__init__(f"vitmad.record: {finding}{advice}")

    def __reduce__(self):  # its arguments, not its message, for a process pool (QA 299: the prefix came back twice)
        return type(self), (self.finding, self.advice)


def _refuse_causal_probabilities(name: str, attn: torch.Tensor) -> None:
    """Refuses attention probabilities ``[..., N, N]`` a module computed itself under a causal mask, as its SDPA and
    flex forms are refused (QA 293: timm's forward(x, is_causal=True) with fused_attn=False was recorded).

    Read from the values, which a mask leaves exactly 0 and a sharp head rounds to 0 too: refused where no query of
    any matrix of the call weighs a key after itself, and some query weighs two keys or more before itself that not
    every query of its matrix weighs. A sharp bidirectional head that puts each patch on itself or the class token
    weighs one (QA 297: refused, in float16); a causal mask with padding, a causal window or rows rounded in float16
    keep more (QA 299: the full lower triangle asked before let them through). Only where the first query weighs no
    later key is every row read."""
    size = attn.shape[-1]
    if attn.shape[-2] != size or size < 3 or not bool((attn[..., 0, 1:] == 0).all()):
        return
    kept = attn != 0
    after = torch.ones(size, size, dtype=torch.bool, device=attn.device).triu(1)
    if bool((kept & after).any()):
        return
    # [..., N]: the keys before each query it weighs, but those every query of its matrix weighs (a class token or
    # registers as attention sinks are no order: QA 300 found a sharp float16 head on them refused).
    earlier = (kept & after.T & ~kept_by_every_query(kept)).sum(-1)
    if bool((earlier >= 2).any()):
        where = [int(i) for i in (earlier >= 2).nonzero()[0].tolist()]
        matrix = f" of matrix {where[:-1]} of {list(attn.shape[:-2])}" if attn.dim() > 2 else ""
        raise ValueError(f"vitmad.record: {name} runs causal attention (its attention probabilities weigh no key after "
                         f"any query, and query {where[-1]}{matrix} weighs {int(earlier[tuple(where)])} keys before "
                         f"it); MAD is defined for a vision transformer's bidirectional attention{CAUSAL_ADVICE}")


class NoAttentionRanError(RuntimeError):
    """A forward call ran and none of the modules being recorded computed attention. ``finding`` says so without
    the advice for a caller of record (``rec.skipped``): the profiler words its own, of the ``layers`` it was given
    (engine.run_batches)."""

    def __init__(self, finding: str, message: str):
        self.finding = finding
        super().__init__(message)

    def __reduce__(self):  # both arguments, for a process pool to send it back (QA 297)
        return type(self), (self.finding, str(self))


# A model compiled with torch.compile inside the block traces its forward hooks and the captures' calls into the
# recording: dynamo would inline vitmad's bookkeeping (threads, frames, the recording's lists) and, with
# fullgraph=True, fail inside the user's forward on a thread identity call that names nothing of vitmad. Disabled for
# dynamo, each of them is a graph break that runs eagerly (the model's own code between them still compiled), and
# fullgraph=True fails with this reason.
_COMPILED_INSIDE = ("vitmad.record's hooks run eagerly, between compiled graphs: a model compiled with "
                    "torch.compile(fullgraph=True) inside the recording block cannot be recorded; compile it before "
                    "the block (it then runs eagerly while recorded), or inside it without fullgraph=True (and "
                    "torch.export(strict=True) of a recorded model cannot trace them: export outside the block)")


def _eager_between_graphs(method: Callable) -> Callable:
    """Marks a method of the recording that the model's forward calls, to be disabled for dynamo
    (``torch.compiler.disable`` with :data:`_COMPILED_INSIDE`) by :func:`_disable_marked_for_dynamo`. Not at class
    definition: ``torch.compiler.disable`` imports dynamo, 0.9 s of ``import vitmad``'s 1.1 s beyond torch's own
    (2-core Xeon VM), which the ops and the command's ``--help`` need not pay."""
    method._vitmad_eager_between_graphs = True
    return method


_marked_disabled = False
_marked_disabled_lock = threading.Lock()


def _disable_marked_for_dynamo() -> None:
    """Replaces the methods marked by :func:`_eager_between_graphs` with their ``torch.compiler.disable`` forms, once
    per process, when the first :class:`Recording` is made: before any of its hooks is installed, so no model ever
    calls the unmarked form."""
    global _marked_disabled
    with _marked_disabled_lock:
        if _marked_disabled:
            return
        for cls in (_RecordingHook, Recording):
            for name, method in list(vars(cls).items()):
                if getattr(method, "_vitmad_eager_between_graphs", False):
                    setattr(cls, name, torch.compiler.disable(method, reason=_COMPILED_INSIDE))
        _marked_disabled = True


class _RecordingHook:
    """A hook of a recording, as the model holds it. A copy of the model (``copy.deepcopy``, pickling) made while
    the recording is active gets an inert hook in its place: the copy runs as it would without vitmad, and never
    into this recording (an EMA or teacher copy made inside the block).

    While another thread is inside a forward of the recorded model (:class:`.forward_owner.ForwardOwner`), a
    pre-hook (``pre``) refuses this thread's forward and any other hook does nothing: those are the hooks torch
    runs as the refused forward unwinds, and the recording's state is the other thread's."""

    __slots__ = ("hook", "owner", "pre")

    def __init__(self, hook: Callable, owner: ForwardOwner, pre: bool):
        self.hook, self.owner, self.pre = hook, owner, pre

    @_eager_between_graphs
    def __call__(self, *args, **kwargs):
        if self.owner.busy_elsewhere():
            if self.pre:
                raise self.owner.refusal()
            return None
        return self.hook(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _inert_hook

    def __reduce__(self):
        return (_inert_hook_factory, ())


def _inert_hook(*args, **kwargs) -> None:
    return None


def _drop_inert_hooks(model: nn.Module) -> None:
    """Removes from ``model``'s modules the inert hooks a copy made inside a recording holds (:class:`_RecordingHook`
    becomes :func:`_inert_hook` when copied): a copy recorded in its turn starts clean, and a chain of copies (an
    EMA of an EMA, each recorded) does not pile them up. Not in the inert hook's own call: torch calls a module's
    forward hooks from the live dict when its forward raised, and a hook may not change that dict then."""
    for module in module_list(model):  # the walk shared with the installation (shared_walks)
        for hooks, flags in ((module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)),
                             (module._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"))):
            for key in [key for key, hook in hooks.items() if hook is _inert_hook]:
                del hooks[key]
                for flag in flags:
                    getattr(module, flag, {}).pop(key, None)


def _inert_hook_factory():
    return _inert_hook


def _wrap_hooks(handles, owner: ForwardOwner, model: nn.Module) -> None:
    """The hooks behind ``handles`` as :class:`_RecordingHook`, in the dicts that hold them: the handles still
    remove them, by id; copies of the modules hold inert ones."""
    pre_hook_dicts = {id(module._forward_pre_hooks) for _, module in named_module_list(model)}
    for handle in handles:
        if not hasattr(handle, "hooks_dict_ref"):
            continue  # not a hook (ViLT's watch of visual_embed, inert in copies by design)
        for hooks in (handle.hooks_dict_ref(), *(ref() for ref in getattr(handle, "extra_dict_ref", ()))):
            if hooks is not None and handle.id in hooks and callable(hooks[handle.id]) \
                    and not isinstance(hooks[handle.id], _RecordingHook):
                hooks[handle.id] = _RecordingHook(hooks[handle.id], owner, id(hooks) in pre_hook_dicts)


# id(model) of the models being recorded: one recording of a model at a time, in any thread (two would mix their
# calls; transformers models also refuse it through their config).
_RECORDING: set[int] = set()


def _trust_same_tokens(host_times: torch.Tensor, times: torch.Tensor, host_positions: torch.Tensor,
                       positions: torch.Tensor) -> None:
    """Marks a video layer's frames and positions (``times``, ``positions``: what the op gets) as NaN at the same
    tokens, compared once on their host originals: the op then skips that comparison, which on a GPU copies both
    to the host (a wait for the queued work) in every layer. Only for values vitmad checked itself (trusted
    copies of its own layouts); a pair that differs is left to the op, which names the first token that does."""
    if is_trusted_same_tokens(times, positions) or not (is_trusted_positions(times)
                                                        and is_trusted_positions(positions)):
        return
    on_host = host_times.device.type == "cpu" and host_positions.device.type == "cpu"
    if on_host and same_tokens(host_times, host_positions):
        trust_same_tokens(times, positions)


def _common_prefix_columns(positions: torch.Tensor) -> torch.Tensor | None:
    """The tokens with a position, when some token has none and those are the same tokens in every matrix; else
    None: rows common to the matrices need that (not so with per-image padding), and the recording then leaves
    the maps out of that layer rather than asking the op, which would raise."""
    missing = positions[..., 0].isnan()
    return common_tokens(~missing) if bool(missing.any()) else None


def _extra_token_rows(positions: torch.Tensor, prefix: int, suffix: int) -> torch.Tensor | None:
    """Of the op's prefix-map rows (the queries without a position, in token order), the indices of the extra
    tokens' (the first ``prefix`` tokens and the last ``suffix``); None when they are every row. The others are
    padding slots. The pattern is the same in every matrix (:func:`_common_prefix_columns` holds it so)."""
    count = positions.shape[-2]
    unplaced = positions[..., 0].isnan().reshape(-1, count)[0].nonzero().squeeze(-1)
    extra = (unplaced < prefix) | (unplaced >= count - suffix)
    return None if bool(extra.all()) else extra.nonzero().squeeze(-1).cpu()


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
        positions: torch.Tensor | Callable[[], torch.Tensor] | None = None,
        stats: Sequence[str] | str | None = ("mad",),
        spacing: float | Sequence[float] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"vitmad.record: model must be an nn.Module (a spec string is for vitmad.profile), "
                            f"got {type(model).__name__}")
        _disable_marked_for_dynamo()
        check_reduction(reduction, "vitmad.record")  # as the ops check it: a TypeError for one that is no string
        check_renormalize(renormalize, "vitmad.record")  # "no" would be true; NumPy's bool is one, as the ops take
        if patch is not None:  # an integer of any kind (NumPy's, a 0-d tensor's), as grid takes
            if index_int(patch) is None or index_int(patch) <= 0:
                raise ValueError(f"vitmad.record: patch must be a positive int (pixels), got {patch!r}")
            patch = index_int(patch)
        if grid is not None:
            grid = grid_ints(grid, "vitmad.record")  # integers, never floats rounded toward zero
            if len(grid) != 2 or any(g <= 0 for g in grid):
                raise ValueError(f"vitmad.record: grid must be [grid_h, grid_w] of positive ints, got {grid}")
        if num_prefix_tokens is not None:
            if index_int(num_prefix_tokens) is None or index_int(num_prefix_tokens) < 0:
                raise ValueError(f"vitmad.record: num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
            num_prefix_tokens = index_int(num_prefix_tokens)
        if isinstance(layers, str):
            raise TypeError(f"vitmad.record: layers must be a list of names or patterns, got the string '{layers}'")
        if layers is not None:  # any iterable of names (a generator is read once, here)
            if not isinstance(layers, Iterable) or isinstance(layers, (bytes, Mapping)):
                raise TypeError(f"vitmad.record: layers must be a list of names or patterns (strings), got "
                                f"{type(layers).__name__} {layers!r}")
            layers = list(layers)
        if layers is not None and not all(isinstance(name, str) for name in layers):
            raise TypeError(f"vitmad.record: layers must be a list of names or patterns (strings), got {layers!r}")
        if layers is not None and len(layers) == 0:  # else "found no attention layer", of a model that has some
            raise ValueError("vitmad.record: layers must name at least one module (None records every attention "
                             "layer), got an empty list")
        if positions is not None and (patch, grid, num_prefix_tokens) != (None, None, None):
            raise ValueError("vitmad.record: positions places every token itself; pass either positions or "
                             "patch/grid/num_prefix_tokens, not both")
        self._stats, self._maps = _check_record_stats(stats)
        self.spacing = check_spacing(spacing)
        self._spacing = None if self.spacing is None else Spacing(self.spacing)
        # A torch.compile wrapper is recorded through the module it wraps; a compiled model runs eagerly inside
        # the block (compiled.py), so that the hooks below see every layer.
        given, model = model, uncompiled(model)
        self._eager = False
        self._registered = False  # in _RECORDING
        self._calls_before_forward: int | None = None  # len(calls) when the model's forward began
        self._warned_runs = False  # _warn_several_runs
        self._model_call: ModuleCall | None = None  # that forward (whether a KeyboardInterrupt ended it)
        self._model_input_shape: tuple[int, ...] | None = None  # its first input of 4 dims or more
        self._forwards = 0  # forwards of the model that ended in this recording
        self._last_done: RecordedCall | None = None  # the call of the latest of them (gone: the user cleared calls)
        self._transformed = 0  # forwards of the model inside a torch.func transform (not recorded)
        self._raised = 0  # forwards of the model that raised (their calls dropped)
        self._reached_inside = False  # the model's current forward ran a module vitmad hooks inside it (_enter_scope)
        self._warned_unseen = False  # _warn_unseen_forward
        self._returned = False  # the model's current forward has returned (not raised)
        self._model_started: RecordedCall | None = None  # a call begun by the model's own pre-hook (_begin_forward)
        self._layer_paths: list[tuple[str, nn.Module]] = []  # each recorded layer and where it sits (_install)
        self._scope_layers: dict[int, list[tuple[str, nn.Module]]] = {}  # by id of a scope, those it holds
        self._warned_other_keys: set[str] = set()  # layers given keys that are not their queries, said once each
        # Found layers of a user's own model whose forward ended without attention vitmad sees but normalised logits
        # in a form it does not read, with the call they ran in (None before any): said once a layer of that call
        # is recorded (_say_unseen_layers). And the layers any call recorded.
        self._unseen: dict[str, RecordedCall | None] = {}
        self._recorded_names: set[str] = set()
        self._owner = ForwardOwner(type(model).__name__)  # the thread inside a forward of the model, if any
        # id(call) -> (the thread that started it, (id, code) of the frame whose forward it is, see _in_progress),
        # until the model's own call that made it ends; by thread, the call it started last.
        self._starters: dict[int, tuple[threading.Thread, tuple | None]] = {}
        self._started: dict[threading.Thread, RecordedCall] = {}
        # The call of the latest call start, when the forward that started it (outside the model's own call) ended
        # before any recorded layer ran: out of rec.calls (a forward that raised there leaves no call), but the
        # layers that run before the next start join it, not the call before it (sam2's SAM2VideoPredictor runs
        # the memory attention after forward_image, which starts each frame's call, has returned).
        self._vacant: RecordedCall | None = None
        self._outermost: _Outermost | None = None  # the outermost forward in progress outside the model's call
        self._trailing_handles: list = []  # _order_trailing
        self._trailing: dict[int, tuple] = {}
        # The user's positions replace the layout of every recorded layer (families/masked.py).
        self._given = None if positions is None else GivenPositionsPlacer(positions)
        self.model = model
        self.renormalize = bool(renormalize)
        self.reduction = reduction
        self._calls: list[RecordedCall] = []  # rec.calls, which first drops a forward a KeyboardInterrupt ended
        self.skipped: dict[str, str] = {}
        self._context = CallContext()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._placers: dict[str, LayerPlacer] = {}
        # Class-attention modules whose class-token maps are recorded (prefix maps asked for): no MAD of theirs.
        self._class_layers: set[str] = set()
        # Root child -> its own patch embedding (find_patch_embedding), for the second-tower checks of
        # _choose_layers and _refuse_other_towers_on_the_plain_grid: one walk of each subtree.
        self._root_embeddings: dict[str, tuple | None] = {}
        # The image towers beside the one placed, whose layers are skipped (in the order found): named where a
        # forward ran none of the recorded layers (VideoLLaVA's image forward runs image_tower, not video_tower).
        self._second_towers: dict[str, None] = {}
        self._second_towers_ran: set[str] = set()  # those whose forward ran while the recording was active
        # Every family asks the module tree its own questions: one walk per root serves them all.
        with shared_walks():
            refused = graph_form_refusal(model)  # first: a family's walk would fail inside torch on TorchScript
            if refused is not None:
                raise TypeError(f"vitmad.record: {refused}")
            self._plain = PlainLayout(model, patch, None if grid is None else (int(grid[0]), int(grid[1])),
                                      num_prefix_tokens)
            self._held_inside: dict[str, list[str]] = {}  # (set by _choose_layers: _held_attention)
            self._modules = self._choose_layers(layers)
            if layers is None:
                embedding = self._plain.embedding
                _warn_unrecorded_blocks(model, self._modules, self.skipped, embedding and embedding[0])
            # The modules the model held when its layers were chosen, and the names asked for: an attention module
            # added since (a block appended to model.blocks) has no hook, and its layer was left out of every call
            # silently (QA 265). Weak: a module the user drops later is not kept alive by the recording.
            self._layers_asked = layers
            self._modules_seen: dict[int, weakref.ref] = {}
            self._see(module_list(model))
            # While active, whether a module may have been added (_check_added_modules): torch's module
            # registration hook says so for setattr, add_module and append; ModuleList and Sequential.insert write
            # their dict directly, told by its items (each list's dict and the ids of its items).
            self._maybe_added = False
            self._registration: torch.utils.hooks.RemovableHandle | None = None
            self._lists: list[tuple[dict, tuple[int, ...]]] = []
            self._refuse_other_towers_on_the_plain_grid()
            self._compiled = check_compiled(model, given)
        # A tower fed flattened_patches takes patch= alone (the pixel size of its patches is not in the model).
        patch_used = any(getattr(p, "takes_given_patch", False) for p in self._placers.values())
        unused = [(k, v) for k, v in (("patch", None if patch_used else patch), ("grid", grid),
                                      ("num_prefix_tokens", num_prefix_tokens)) if v is not None]
        if unused and not any(map(_uses_plain_layout, self._placers.values())):
            # Families read their own layouts (windows, stages, a class token after the grid): values meant for a
            # plain ViT would change nothing, and the user would believe they had.
            given_values = ", ".join(f"{k}={v}" for k, v in unused)
            warnings.warn(f"vitmad.record: {given_values} given, but no recorded layer of {type(model).__name__} has "
                          "a plain ViT layout: each is placed by its family's own layout, so these values are not "
                          "used; pass positions=<[N, 2] pixel position of each token> to replace a layout",
                          stacklevel=3)
        # Per module, the calls of its current forward not yet recorded (several for differential attention).
        self._pending: dict[str, list] = {}
        self._fused_callers: dict[str, bool] = {}  # by module name: its forward calls SDPA or flex_attention
        # (module name, probabilities' shape) read for a causal mask on a device (_refuse_causal_probabilities reads
        # values back: once per layout there, as the positions are checked, not once per layer and forward).
        self._causal_checked: set[tuple[str, tuple[int, ...]]] = set()
        # Modules the user named exactly (no wildcard): one that runs without computing attention is said so once.
        self._named = {name for name in layers or () if not any(c in name for c in "*?[")}
        self._beside_layers = blocks_beside_layers(self._modules, self._named)
        self._found_by_default = layers is None  # else named, exactly or by wildcard
        # Device copies of the host positions of this recording's calls, by device and content (_to_device).
        self._device_positions: dict[tuple, torch.Tensor] = {}
        interface = {n: m for n, m in self._modules.items() if reads_implementation_by_interface(model, n, m)}
        multihead = {n: m for n, m in self._modules.items() if n not in interface and reads_own_arguments(m)}
        own = {n: m for n, m in self._modules.items() if n not in interface and n not in multihead}
        sources = {n: m for n, m in ((n, probabilities_source(m)) for n, m in own.items()) if m is not None}
        views = {n: v for n, v in ((n, probabilities_view(m)) for n, m in own.items()) if v is not None}
        self._hooks = [ModuleAttentionHooks(own, self._on_attention, self._on_probabilities, self._on_module_done,
                                            sources, views, self._unread_flex_refusal),
                       MultiheadAttentionHooks(multihead, self._on_attention, self._on_module_done)]
        if interface:
            self._hooks.append(HFAttentionHooks(model, interface, self._on_attention, self._on_module_done))

    def _choose_layers(self, layers: Sequence[str] | None) -> dict[str, nn.Module]:
        """The modules to record, each with its placer in ``self._placers``; the non-spatial ones go to
        ``self.skipped``."""
        model = self.model
        found = attention_modules(model)
        matched: list[str] = []
        if layers is not None:
            chosen = _select(dict(named_module_list(model)), layers, model, found)
            matched = list(chosen)  # for the refusal, which names what the patterns matched
            # A wildcard's matches vitmad found no attention in are layers only where their forward may compute
            # some (a block of the user's with an explicit softmax), not its norms, dropouts and projections.
            exact = {p for p in layers if not any(c in p for c in "*?[")}
            chosen = _blocks_by_their_attention(chosen, found, exact, model)
            chosen = {name: m for name, m in chosen.items()
                      if name in found or name in exact or may_compute_attention(m)}
            # A module holding a chosen attention module (a pattern such as "blocks.*" takes a block and its
            # attention) would record the same attention calls again as a layer of its own: the inner one is kept.
            # So too a wildcard's match holding a chosen module of the user's that computes a softmax (an attention
            # vitmad does not find by itself, named by the wildcard: recorded twice, QA 265; "*" took the model
            # itself, which was refused as named).
            inner = [name for name, m in chosen.items() if name in found or (
                not type(m).__module__.startswith("torch.") and names_softmax(m))]
            chosen = {name: m for name, m in chosen.items() if not _holds_chosen_attention(name, m, inner, found, exact,
                                                                                    chosen)}
            # A module named that computes no attention itself but holds nn.MultiheadAttention layers (a user's
            # wrapper) runs them through one fused torch function whose attention no capture around it sees: it was
            # skipped as computing none (QA 257). Its MultiheadAttention layers are recorded in its place.
            # (One that attends itself, a softmax beside query or key projections of its own, is kept: a Block
            # running its own softmax, then a MultiheadAttention it holds, was replaced by that layer, silently,
            # QA 411; a router's softmax is none, QA 418.)
            own = source_attention_modules(model)
            replaced = {name: [n for n, m in found.items() if _holds(name, n) and isinstance(m, nn.MultiheadAttention)]
                        for name, module in chosen.items()
                        if name and name not in found and name not in own and not attends_itself(module)}
            if any(replaced.values()):
                kept = {n for name in chosen for n in (replaced.get(name) or [name])}
                chosen = {name: m for name, m in named_module_list(model) if name in kept}
            # (A subclass that defines a forward, kornia's BlockChunk, runs its blocks itself: it is a layer.)
            containers = [name for name, m in chosen.items()
                          if name in exact and isinstance(m, (nn.ModuleList, nn.ModuleDict))
                          and type(m).forward is nn.Module.forward]
            if containers:
                # A list of blocks runs no forward of its own, so no hook on it ever fires: it was accepted, and the
                # recording said after the forward that the model "took a path without" it (QA 325).
                name = containers[0]
                raise LayersError(
                    f"names '{name}', a {type(chosen[name]).__name__} of {type(model).__name__}: a container whose "
                    f"modules its owner calls one by one, with no forward of its own that could be recorded; name "
                    f"its layers ('{name}.*' matches each)"
                )
            self._held_inside = _held_attention({n: m for n, m in chosen.items() if n in exact}, found)
            if "" in chosen and "" not in found:
                # The model itself, named by layers=[""], is no attention layer: its forward runs them all.
                inside = [name for name in found if name]
                shown = ", ".join(inside[:4]) + (", ..." if len(inside) > 4 else "")
                raise LayersError(
                    f"names '' (the model itself), but {type(model).__name__} is not one attention layer; name its "
                    f"attention modules ({shown or 'none found'}), or pass layers=None to record every one"
                )
        prefix = encoder_prefix(model)
        if layers is None:
            # DeepSeek-OCR-2's and Unlimited-OCR's second encoder, on the map their SAM tower projects, is part of
            # the vision model that makes the image's features, and its cells are known: recorded with the tower.
            # So too, a diffusers ControlNet's transformer beside it in a user's denoising step: both nets, each on
            # its own latent grid.
            denoisers = tuple(denoisers_beside(model, prefix))
            # So too a diffusers autoencoder's layers beside the transformer whose patch embedding is the prefix's (a
            # user's denoise-then-decode step: its VAE was left out, listed nowhere, QA 361), each on its own maps.
            autoencoders = set(autoencoder_attention(model)) if beside_a_denoiser(model, prefix) else set()
            chosen = {n: m for n, m in found.items() if n.startswith(prefix) or n in autoencoders
                      or is_second_encoder_of(model, n, m, prefix) or n.startswith(denoisers)}
            text = text_encoders_beside_nets(model) if not prefix else ()
            if text:
                # A user's step holding diffusers nets that embed with no patch convolution (a UNet, a VAE) beside a
                # text encoder: the text encoder left out, as beside a diffusion transformer.
                chosen = {n: m for n, m in chosen.items() if not n.startswith(text)}
            # A second tower that embeds the image is named, not left out silently: one recording places the tokens
            # of one tower (its patch embedding's grid), so the other's layers are its own recording's.
            for tower in other_image_towers(model, prefix):
                self._second_towers.setdefault(tower[:-1])
                for name in found:
                    if name.startswith(tower):
                        self.skipped[name] = (
                            f"in {tower[:-1]}, {_SECOND_TOWER} beside {prefix[:-1]}, the one "
                            "this recording places (the first in module order); record it on its own, "
                            f"vitmad.record(model.get_submodule('{tower[:-1]}')), or both at once with one "
                            "recording per tower"
                        )
        modules = {}
        # Names given whole, not through a wildcard: a module so named is the user's choice even where vitmad found
        # no attention in it.
        named = set() if layers is None else {p for p in layers if not any(c in p for c in "*?[")}

        def taken(name: str) -> bool:
            """A layer the user named in layers=, or one a library lays out: the clip rule is not its (plain.py)."""
            return layers is not None or _laid_out_by_library(model, self._plain.embedding, name)

        for name, module in chosen.items():
            placer = family_placer(model, name, module)
            if placer is None and not name.startswith(prefix) and self._given is None \
                    and self._plain.num_prefix_tokens is None and not keeps_image_layout(model, name):
                if name not in found and name not in named:
                    continue  # a wildcard's match that is no attention module (a norm, a projection): no layer
                # Named in layers= (the default takes the tower alone): skipped, as packed towers skip a
                # language model's layers, so that a wildcard over a whole vision-language model records its tower.
                # A root child beside the image tower (not holding it) with a patch embedding of its own is a
                # second tower.
                root = name.split(".", 1)[0]
                beside = "." in name and not prefix.startswith(root + ".")
                own = self._root_embedding(root) if beside else None
                if own is not None:
                    self._second_towers.setdefault(root)
                placer = Skip(
                    f"in {root}, {_SECOND_TOWER} with its own patch embedding ({root}."
                    f"{own[0]}) beside {prefix[:-1]}, whose patch grid this recording reads (the model's first "
                    "image tower, whether its layers are named or not: one patch grid per recording); "
                    f"record it on its own, vitmad.record(model.get_submodule('{root}')) (both recordings may be "
                    "active around one forward), or pass positions=<[N, 2] pixel position of each token, NaN rows "
                    "for tokens off the image>"
                ) if own is not None else Skip(
                    f"outside {prefix[:-1]}, the tower that embeds the image, so its tokens need not be that "
                    "tower's extra tokens and patch grid (a language model or a multimodal encoder mixes them with "
                    "text or other tokens), and vitmad does not know its layout; pass num_prefix_tokens=<tokens "
                    "before the grid> if its sequence is exactly [those tokens][the full row-major patch grid], or "
                    "positions=<[N, 2] pixel position of each token, NaN rows for tokens off the image>; both place "
                    "self-attention over the image's tokens: learned queries attending to them (a Q-Former's "
                    "cross-attention, a resampler's) have no place on the image, and their attention has no MAD"
                )
            if isinstance(placer, ClassQueries) and self._maps and self._given is None:
                # Skipped as a MAD layer, recorded for its class token's maps.
                self.skipped[name] = placer.reason
                self._class_layers.add(name)
                modules[name] = module
                self._placers[name] = ClassQueryPlacer(placer.keys or PlainPlacer(self._plain, named=taken(name)),
                                                       placer.what,
                                                       placer.queries_in_keys, placer.self_attention, placer.queries)
            elif isinstance(placer, ClassQueries) and self._given is not None:
                self.skipped[name] = (f"{placer.reason.split(';')[0]}; its maps are not recorded with positions= "
                                      "given by hand, which place the self-attention layers' tokens")
            elif isinstance(placer, Skip):
                if name not in found and name not in named:
                    # A wildcard's match that is no attention module (Inkling2-Loop's embed_tokens under
                    # "model.language_model.*", which the packed family skips as any module outside its tower): no
                    # layer, so not listed as an attention layer skipped.
                    continue
                self.skipped[name] = placer.reason
            else:
                modules[name] = module
                if getattr(placer, "defers_to_given_layout", False) and self._plain.given_by_hand:
                    placer.given_layout = PlainPlacer(self._plain, appended_tokens(model, name), named=taken(name))
                if getattr(placer, "takes_given_patch", False) and self._given is None:
                    placer.use_patch(self._plain.patch)  # refuses a patch size it cannot know or that cannot fit
                self._placers[name] = self._given or (
                    PlainPlacer(self._plain, appended_tokens(model, name), named=taken(name))
                    if placer is None else placer)
        if not modules:
            if self.skipped:
                # Three distinct reasons, each with its first layer: a reason shared by many layers (a text tower's)
                # hid the others.
                by_reason: dict[str, list[str]] = {}
                for skipped_name, reason in self.skipped.items():
                    by_reason.setdefault(reason, []).append(skipped_name)
                reasons = "; ".join(
                    f"{names[0]}: {reason}" + (f" (and {len(names) - 1} more layer{'s' * (len(names) > 2)})"
                                               if len(names) > 1 else "")
                    for reason, names in list(by_reason.items())[:3])
                classes = [n for n, r in self.skipped.items() if r.startswith("class attention")]
                towers = any(_SECOND_TOWER in reason for reason in self.skipped.values())
                raise NoLayerError(
                    # A tower left to a recording of its own has a MAD: "not defined" would turn the user away.
                    f"{type(model).__name__}: this recording places none of its layers, and a tower among them is "
                    f"recorded on its own ({reasons})" if towers else
                    f"{type(model).__name__} has no layer with spatial softmax attention over positioned tokens, so "
                    f"MAD is not defined for it ({reasons})",
                    f"; the class token's maps of its class attention ({', '.join(classes)}) are recorded with "
                    "stats=['prefix_maps'] (rec.class_attention_maps)" if classes and self._given is None else "",
                )
            if type(model).__module__.rpartition(".")[2] == "modeling_fuyu":
                # Its language model does attend (a fused query_key_value projection vitmad does not look for), but
                # over text and patches causally: "no attention layer" would send the user looking for one.
                raise NoLayerError(
                    f"{type(model).__name__} has no vision encoder: its image patches go through one Linear "
                    "(vision_embed_tokens) straight into its language model, which attends over them and the text "
                    "causally; MAD is defined for a vision transformer's attention over an image's patches"
                )
            outside = [name for name in found if not name.startswith(prefix)] if layers is None else []
            if outside:
                shown = ", ".join(outside[:4]) + (", ..." if len(outside) > 4 else "")
                raise NoLayerError(
                    f"found no attention layer in {prefix[:-1]}, the tower of {type(model).__name__} that embeds the "
                    f"image; its attention layers ({shown}) all lie outside it (a text transformer, a mask decoder, "
                    "memory attention, a detector's decoder), where its tokens need not be the image's",
                    "; name them in layers= to have each placed where vitmad knows its layout, or skipped with the "
                    "reason",
                )
            hidden = listed_dinov2(model)
            if hidden is not None:  # its attention is out of the module tree, not absent
                raise NoLayerError(hidden)
            # Attention vitmad does not recognise may still be there (UDOP's T5 attention names its projections q
            # and k): say what was searched, and, with layers= given, what it matched (QA helper-115: OneFormer's
            # task encoder, an MLP, was reported as the model having no attention).
            searched = type(model).__name__ if layers is None else (
                f"the modules of {type(model).__name__} that layers={list(layers)!r} names ("
                + (", ".join(matched[:4]) + (", ..." if len(matched) > 4 else "") if matched else "none")
                + ")")
            raise NoLayerError(
                f"found no attention layer vitmad knows in {searched}: none has transformers' query/key "
                "projections, timm's fused_attn switch or a layout vitmad knows",
                ". If some of its modules compute softmax attention (F.scaled_dot_product_attention, torch's "
                "flex_attention, F.multi_head_attention_forward or an explicit softmax, also in a function their "
                "forward calls), pass "
                "layers=[their qualified names]",
            )
        return modules

    # What was recorded -------------------------------------------------------------------------------------

    @property
    def calls(self) -> list[RecordedCall]:
        """Every forward call recorded so far, oldest first (the list itself: a caller may clear it between
        batches). A forward of the model that a KeyboardInterrupt stopped halfway is not among them."""
        self._drop_interrupted()
        return self._calls

    def _latest(self) -> RecordedCall:
        name = type(self.model).__name__
        self._drop_interrupted()
        if not self._calls and self._last_done is not None:
            raise RuntimeError(
                f"vitmad.record: {name} ran {self._forwards} time(s) in this recording, but its recorded calls were "
                "removed from rec.calls (rec.calls.clear() between batches, say) and none ran since; run the model "
                "again before reading the results"
            )
        if not self._calls and self._transformed and not self._forwards:
            raise RuntimeError(
                f"vitmad.record: {name} ran {self._transformed} time(s) in this recording, each inside a torch.func "
                "transform (vmap, grad, ...), whose forwards are not recorded (their tensors are the transform's "
                "wrappers); run the model itself inside the block"
            )
        shown = ", ".join(list(self._modules)[:4]) + (", ..." if len(self._modules) > 4 else "")
        compiled = _reused_compiled_code(self.model) if not self._calls or self._calls[-1]._is_empty() else ""
        # Compiled code is named as a possibility after the ordinary cause, never instead of it: dynamo's cache
        # says code exists for the model's class, not that a wrapper of this model ran it in the block.
        if self._forwards and all(call._is_empty() and not call._modules_ran for call in self._calls) \
                and self._second_towers_ran:
            # VideoLLaVA's image forward runs its image_tower; its video_tower comes first and is placed (QA 271).
            towers = [tower for tower in self._second_towers if tower in self._second_towers_ran]
            raise RuntimeError(
                f"vitmad.record: {name} ran {self._forwards} time(s) in this recording, but not through the "
                f"modules being recorded ({shown}): another image tower of it ran, {', '.join(towers)}, whose layers "
                "this recording skips (one recording places one tower, the first in module order): "
                f"record it on its own: vitmad.record(model.get_submodule('{towers[0]}')), while the whole model "
                "runs (one recording per tower records both)"
                + (f"; or it ran code torch.compile generated before the block{compiled}" if compiled else "")
            )
        if self._forwards and all(call._is_empty() and not call._modules_ran for call in self._calls):
            # No call, or only calls the model's own forward started and no recorded module ran in.
            raise RuntimeError(
                f"vitmad.record: {name} ran {self._forwards} time(s) in this recording, but not through the "
                f"modules being recorded ({shown}): its forward took a path without them (a vision-language "
                "model given text alone, with no image for its tower to embed; a model with two image "
                "towers, say, recorded in the one that did not run: record the module that ran instead, "
                "vitmad.record(<that tower>), while the whole model runs), or it ran code torch.compile generated "
                "before the block, which calls no hooks" + (compiled or " (a torch.compile wrapper made inside the "
                "block reuses the code of an earlier compile of the same model): give vitmad.record the compiled "
                "model, which then runs eagerly while recorded")
            )
        if not self._calls and self._raised and not self._forwards:
            raise RuntimeError(
                f"vitmad.record: {name}'s forward raised {self._raised} time(s) in this recording and never returned "
                "in it; a forward that raises leaves no call (its layers stopped where the error was): run the model "
                "to completion inside the block"
            )
        if not self._calls:
            raise RuntimeError(
                f"vitmad.record: {name} has not run in this recording; call the model inside the "
                "`with vitmad.record(model) as rec:` block (code torch.compile generated before the block calls no "
                "hooks: give vitmad.record the compiled model, which then runs eagerly while recorded; a method "
                "other than its forward that does not run its image tower, such as a CLIP model's encode_text, "
                "records nothing; a copy of the model runs without vitmad, as a predictor's own copy does "
                "(ultralytics' YOLO.predict runs one: record the model it holds, yolo.predictor.model.model, or call "
                "yolo.model itself))"
            )
        if self._calls[-1]._is_empty() and self._in_progress(self._calls[-1]):
            # Read from a hook of the forward running now, before its first recorded layer (QA 359: said to have taken
            # a path without them).
            raise RuntimeError(
                f"vitmad.record: {name}'s forward call in progress has not run any of the modules being recorded "
                f"({shown}) yet, so it has no layers to read; read after its first recorded layer ran, or an earlier "
                "call of rec.calls")
        if self._calls[-1]._is_empty() and not self._calls[-1]._modules_ran:
            raise RuntimeError(
                f"vitmad.record: {name}'s latest forward call ran none of the modules being recorded ({shown}): its "
                "forward took a path without them (no image for its tower, or, of two image towers, the one not "
                "recorded); read an earlier call of rec.calls, or record the module that ran, vitmad.record(<that "
                "tower>), while the whole model runs")
        if self._calls[-1]._is_empty() and any(not call._is_empty() for call in self._calls[:-1]):
            # The same modules computed attention in an earlier call: the layers are right, this call skipped them
            # (a cache such as diffusers' Pyramid Attention Broadcast reuses attention outputs on some steps).
            raise RuntimeError(
                f"vitmad.record: {name}'s latest forward call ran none of the attention of the modules being "
                f"recorded ({shown}), which earlier calls of this recording did: a cache such as diffusers' Pyramid "
                "Attention Broadcast may have skipped them on this step; read the calls that have layers: "
                "[call for call in rec.calls if call.layers]")
        if self._calls[-1]._is_empty():
            finding = (f"{name} ran, but none of the {len(self._modules)} modules being recorded ({shown}) computed "
                       "attention (F.scaled_dot_product_attention, torch's flex_attention, "
                       "F.multi_head_attention_forward, transformers' AttentionInterface or a softmax) in that "
                       "forward call")
            raise NoAttentionRanError(finding,
                f"vitmad.record: {finding}; pass layers=[the modules that compute its attention]" + (
                    f" (its attention modules named were skipped, each with its reason in rec.skipped: "
                    f"{', '.join(list(self.skipped)[:3])}{', ...' if len(self.skipped) > 3 else ''})"
                    if self.skipped else "") + (
                    f"; or it ran code torch.compile generated before the block, which calls no hooks{compiled}"
                    if compiled else "")
            )
        return self._calls[-1]

    @property
    def mad(self) -> torch.Tensor:
        """``[L, B, H]`` float32 (float64 for a float64 model; ``reduction="mean"``) or ``[L, B, H, T]`` of the
        latest forward call; see :attr:`RecordedCall.mad` for layers with different head counts or grids."""
        return self._latest().mad

    @property
    def temporal_mad(self) -> torch.Tensor:
        """Video models: the temporal MAD in frames of the latest call, shaped like :attr:`mad`; see
        :attr:`RecordedCall.temporal_mad`."""
        return self._latest().temporal_mad

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Every statistic recorded in the latest call, by name (``"mad"`` first), each stacked like :attr:`mad`:
        ``[L, B, H]`` (``reduction="mean"``) or ``[L, B, H, T]``."""
        call = self._latest()
        # Layers on different grids stack for none of the statistics: the refusal names where each one is per layer.
        per_layer = " and ".join(["rec.per_layer (MAD)", *(f"rec.calls[-1].statistics['{name}']"
                                                           for name in self._stats)])
        values = {"mad": call.per_layer, **{name: call.statistics[name] for name in self._stats}}
        return _StatisticsByName({name: call._stack(layers, per_layer, "rec.stats") for name, layers in values.items()})

    @property
    def prefix_maps(self) -> list[torch.Tensor | None]:
        """With ``stats=[..., "prefix_maps"]``: per layer of the latest call, ``[B, H, Q, T]``, the attention of the
        ``Q`` tokens without a position (CLS, registers) over the ``T`` positioned tokens in row-major grid order
        (reshape to ``[B, H, Q, grid_h, grid_w]`` with ``rec.geometry[l].grid``); None for a layer whose keys are
        not its queries (pooled keys), without such tokens, or where they differ between images (a row stitched
        from per-window or per-frame copies of those tokens: :attr:`RecordedCall.prefix_maps`). With
        ``positions=`` given by hand there is no grid to fold onto: ``T`` is then the sequence's ``N`` tokens in
        token order, NaN in the columns of the tokens without a position.

        Raises:
            KeyError: the prefix maps were not asked for.
        """
        if not self._maps:
            raise KeyError("vitmad.record: the prefix maps were not recorded; pass stats=[..., 'prefix_maps'] to "
                           "vitmad.record")
        return list(self._latest().prefix_maps)

    @property
    def class_attention_maps(self) -> dict[str, torch.Tensor]:
        """With ``stats=[..., "prefix_maps"]``: ``{layer: [B, H, Q, T]}`` for the class-attention layers (CaiT,
        XCiT, VOLO) and attention-pooling heads (timm ViT / EVA ``global_pool="map"``, SigLIP, AIMv2, the
        ``AttentionPool2d`` of timm's CLIP ResNets) and the DETR decoders' cross-attention (DETR, Conditional DETR,
        DAB-DETR, Table Transformer) of the latest call, which are in ``rec.skipped`` as they have no MAD: the
        attention of their ``Q`` queries (the class token, the learned queries, the pooled token, the object queries)
        over the ``T`` positioned keys in row-major grid order (reshape with
        ``rec.calls[-1].class_geometry[i].grid``). Empty for a model without any.

        Raises:
            KeyError: the prefix maps were not asked for.
        """
        if not self._maps:
            raise KeyError("vitmad.record: the class-attention maps were not recorded; pass "
                           "stats=[..., 'prefix_maps'] to vitmad.record")
        return self._latest().class_attention_maps

    @property
    def per_layer(self) -> list[torch.Tensor]:
        """One ``[B, H_l]`` (or ``[B, H_l, T_l]``) tensor per recorded layer of the latest call."""
        return list(self._latest().per_layer)

    @property
    def geometry(self) -> list[LayerGeometry]:
        """Each recorded layer's token grid, pixel stride, attention kind and head count (latest call)."""
        calls = self.calls
        return list(calls[-1].geometry) if calls else []

    @property
    def layers(self) -> list[str]:
        """The recorded attention modules' qualified names in execution order (latest call)."""
        calls = self.calls
        return list(calls[-1].layers) if calls else []

    @property
    def layout(self) -> ModelLayout | None:
        """Patch size, grid and prefix tokens of the latest call when every layer attends over one plain ViT
        layout (None otherwise: read :attr:`geometry`); before a call, the given or detected values."""
        calls = self.calls
        if calls and calls[-1].geometry:
            return calls[-1].layout
        patch = self._plain.patch
        if patch is None and self._plain.embedding is not None:
            kernel = self._plain.embedding[1].kernel_size
            patch = int(kernel[0]) if kernel[0] == kernel[1] else None  # non-square patches: read geometry
        return ModelLayout(patch, self._plain.grid, self._plain.num_prefix_tokens)

    # Hooks ---------------------------------------------------------------------------------------------------

    def _start_call(self, module: nn.Module, args, kwargs=None) -> None:
        if _not_recorded():
            return
        self._drop_interrupted()
        # What a forward interrupted inside an attention module left (a KeyboardInterrupt skips the hooks that end
        # it): not part of this call.
        self._pending.clear()
        # The image's first convolution run again in one forward with no recorded layer since its last run (several
        # crops embedded first, then each run through the blocks): each run starts a call, and every layer was placed
        # on the last run's grid, the other crops' tokens counted as extra tokens, silently (QA 378).
        serial = self._owner.forward_serial()
        previous = self._calls[-1] if self._calls else None
        unattended = (list(self._context.values.get(RUN_GRIDS, ()))
                      if serial is not None and previous is not None and previous._is_empty()
                      and self._context.values.get(_FORWARD) == serial else [])
        self._context.image_size = _image_size(args, kwargs)
        self._context.values.clear()
        self._context.values[_MODEL_IMAGE] = self._context.image_size
        self._context.values[_FORWARD] = serial
        if self._model_call is not None and self._model_input_shape is not None:
            # The model's input in this forward, for the plain layout to see a clip embedded frame by frame.
            self._context.values[MODEL_INPUT_SHAPE] = self._model_input_shape
        if unattended:
            self._context.values[RUN_GRIDS] = unattended
            # The earlier run's call holds no layer and never will: its crop's layers join this one. Left in
            # rec.calls, it made every forward two calls, the first empty, so that reading each call's MAD raised
            # (QA 412).
            self._calls.pop()
            self._starters.pop(id(previous), None)
        call = RecordedCall()
        self._calls.append(call)
        self._vacant = None
        me, caller = threading.current_thread(), forward_caller_frame()
        self._starters[id(call)] = (me, None if caller is None else (id(caller), caller.f_code))
        self._started[me] = call
        self._model_started = call if module is self.model else None

    def _root_embedding(self, root: str) -> tuple | None:
        """The patch embedding of the model's child ``root`` (:func:`find_patch_embedding`), walked once per child,
        not once per recorded layer in it."""
        if root not in self._root_embeddings:
            self._root_embeddings[root] = find_patch_embedding(self.model.get_submodule(root))
        return self._root_embeddings[root]

    def _refuse_other_towers_on_the_plain_grid(self) -> None:
        """A user's module holding several towers (``self.a``, ``self.b``) whose layers are placed by the plain layout:
        that layout reads one patch embedding, the first found (``a.conv_proj``), so a layer of ``b``, which embeds
        the image with its own, was placed on ``a``'s grid, silently (QA helper-193: a torchvision tower beside an
        OpenCLIP one, a second tower given num_prefix_tokens=). Refused, naming the tower to record on its own."""
        embedding = self._plain.embedding
        if embedding is None or "." not in embedding[0] or self._given is not None:
            return
        home = self._tower_root(embedding[0])
        for name in self._modules:
            root = self._tower_root(name)
            placer = self._placers.get(name)
            if root == home or "." not in name or placer is None or not _uses_plain_layout(placer):
                continue
            own = self._root_embedding(root)
            if own is not None:
                # Both towers named: a recording of the whole model beside one of the second tower still places
                # that tower's layers on the first's grid (QA 378 read the advice so).
                held = [f"vitmad.record(model.{tower})" if "." not in tower
                        else f"vitmad.record(model.get_submodule('{tower}'))" for tower in (home, root)]
                # A convolution over as many channels as the first embedding gives may take its map, not an image:
                # a later stage of a hierarchy, which recorded alone is measured in cells of that map (4x off, QA
                # 423); by its channels alone it cannot be told from a tower on a 16-band image (QA 427).
                # (A grid given by hand cannot tell them apart either: a tower on a 16-band image passed as a stage
                # with grid= and patch=, QA 430.)
                advice = (f"; if {root}.{own[0]} convolves the map of {embedding[0]} (a later stage, not a tower on "
                          f"an image), its layers attend over that map's cells: name them in layers= with "
                          "positions=<[N, 2] pixel position of each cell's centre>"
                          ) if own[1].in_channels == embedding[1].out_channels else ", or pass positions="
                raise ValueError(
                    f"vitmad.record: {name} lies in {root}, which embeds the image with its own patch embedding "
                    f"({root}.{own[0]}), but would be placed on the grid of {embedding[0]}, another tower's: a plain "
                    "ViT layout is read from one patch embedding per recording; record each tower in its own "
                    f"vitmad.record, not the whole model ({held[0]} and {held[1]}; both may be active around one "
                    f"forward){advice}")

    def _tower_root(self, name: str) -> str:
        """The model's child holding the module ``name``, or, where that child is a ``ModuleList`` or ``ModuleDict``
        (towers held in a list), the entry of it holding the module (``towers.1``): towers in one list were one
        tower here, and the second placed on the first's grid, silently (QA 369)."""
        parts = name.split(".")
        depth = 1
        while depth < len(parts) and isinstance(self.model.get_submodule(".".join(parts[:depth])),
                                                (nn.ModuleList, nn.ModuleDict)):
            depth += 1
        return ".".join(parts[:depth])

    def _start_tower_call(self, module: nn.Module, args) -> None:
        """A tower of several recorded ones begins: a call of its own where it runs outside the model's forward
        (called on its own, or by a method of the model other than forward), none inside it (the model's forward
        started that call, whichever tower runs first: towers.tower_starts). Either way its layers are placed in
        the pixels of the image it takes: a wrapper may resize the image for one tower, and the size of the
        wrapper's input, taken for the tower's, made a stem of the ratio (every distance doubled at half size)."""
        if _not_recorded():
            return
        self._drop_interrupted()  # a forward of the model a KeyboardInterrupt ended is no forward in progress
        if self._calls_before_forward is None:
            if self._owner.inside_unentered(self.model):
                # A forward of the model begun before the recording (another thread's, paused): its tower would
                # start a call of its own on the tower's input, the model's image unseen (QA 351).
                raise self._begun_before_refusal()
            self._start_call(module, args)
        else:
            # A run of the tower on the very tensor (or a view of it) that a branch on the image outside the recorded
            # towers made in this call (a learned downsampler, nn.Conv2d(3, 3, 2, 2), before the ViT): a stem, not a
            # tower beside it, so the image is the model's and the plain layout follows the stem's stride. Taken for
            # a tower, its 3 output channels made the ViT's 8 px patches 8 px apart in a 64 px image halved, where 8
            # channels gave 16 (QA 345). The tensor, not its shape: a branch beside the tower whose map has the shape
            # of the image resized for the tower is no stem of it (QA 348). What the modules on the tower's path
            # receive counts (_see_tower_input: the tower may pad or cast the map before its first convolution, QA
            # 351), for this run only (a later run of the tower in the call, on a crop, is its own, QA 354).
            flags = self._context.values.get(_TOWERS_ON_STEM, set())
            on_stem = id(module) in flags
            flags.discard(id(module))
            if on_stem or (args and self._made_by_stem(args[0])):
                # The model's image: an earlier run of a tower in this call, on a crop, left its own (QA 355).
                self._context.image_size = self._context.values.get(_MODEL_IMAGE, self._context.image_size)
                self._context.values[_STEM_TOWER_INPUT] = _image_size(args)
            else:
                self._context.image_size = _image_size(args)
                self._context.values.pop(_STEM_TOWER_INPUT, None)

    def _see_stem_map(self, module: nn.Module, args, output) -> None:
        """A module of a branch on the image outside the recorded towers ran (:func:`.towers.stems_beside_towers`):
        the map it made (a weak reference: the call's context does not keep it alive), which a recorded tower that
        starts on it in this call takes as its stem's."""
        if _not_recorded() or not isinstance(output, torch.Tensor):
            return
        if any(isinstance(value, torch.Tensor) and _same_storage(value, output) for value in args):
            return  # its own input handed back (a downsampler switched off, a tap): the image, no stem's map (QA 355)
        self._context.values.setdefault(_STEM_MAPS, []).append(weakref.ref(output))

    def _see_tower_input(self, start: nn.Module, outermost: bool, args, kwargs) -> None:
        """A module on a recorded tower's path to its start begins (:func:`.towers.tower_inputs`): whether its input
        (its first tensor argument, or ``pixel_values=``; another argument is no image the start reads, QA 354) is a
        stem's map, which the start (a convolution inside it) reads in :meth:`_start_tower_call`. The tower itself
        clears what an earlier run of it in this call said."""
        if _not_recorded():
            return
        flags = self._context.values.setdefault(_TOWERS_ON_STEM, set())
        taken = _first_input(args, kwargs)
        if taken is not None and self._made_by_stem(taken):
            flags.add(id(start))
        elif outermost:
            flags.discard(id(start))

    def _made_by_stem(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a map a stem made in this call (:meth:`_see_stem_map`), or a view of it (a slice, a
        reshape: the same storage, the map kept alive by the view's base)."""
        for made in self._context.values.get(_STEM_MAPS, ()):
            stem = made()
            if stem is None:
                continue
            if _same_storage(stem, tensor):
                return True
        return False

    def _forget_starts(self, calls: list[RecordedCall]) -> None:
        """``calls`` ended or were dropped: their forwards are no longer in progress (and their ids, free again,
        must not lend a new call their thread)."""
        for call in calls:
            self._starters.pop(id(call), None)

    def _in_progress(self, call: RecordedCall) -> bool:
        """Whether the forward that started ``call`` is still running: its model call has not ended, and the frame
        that runs it (forward_features', see forward_caller_frame) is still on its thread's stack."""
        started = self._starters.get(id(call))
        return started is not None and started[1] is not None and frame_live(started[0], *started[1])

    def _check_call_thread(self) -> None:
        """A layer joins the latest call, as always, but never across threads' forwards in progress. Forwards that
        bypass the model's own call (forward_features, the blocks called one by one) hold ownership only while
        inside a module, so another thread may start and even finish a call in between: the paused forward is then
        refused at its next layer (and its half call dropped), as is a layer from another thread while the latest
        call's forward is in progress."""
        me = threading.current_thread()
        mine = self._started.get(me)
        if mine is not None and self._calls and mine is not self._calls[-1] and self._in_progress(mine):
            if any(call is mine for call in self._calls):
                self._calls.remove(mine)
            self._forget_starts([mine])
            del self._started[me]
            self._pending.clear()
            raise RuntimeError(
                f"vitmad.record: {type(self.model).__name__} is being recorded and another thread ran a forward of "
                f"it while this thread's ('{me.name}') was in progress (paused between its recorded modules): a "
                "recorded model runs in one thread at a time (their calls would mix); run the forwards one after "
                "another, or record a separate copy of the model in each thread"
            )
        latest = self._calls[-1] if self._calls else None
        starter = None if latest is None else self._starters.get(id(latest), (None,))[0]
        if starter is not None and starter is not me and self._in_progress(latest):
            self._pending.clear()
            raise RuntimeError(
                f"vitmad.record: {type(self.model).__name__} is being recorded and thread '{starter.name}' is in the "
                f"middle of a forward of it, so this thread ('{me.name}') cannot run a recorded layer now: a "
                "recorded model runs in one thread at a time (their calls would mix); run the forwards one after "
                "another, or record a separate copy of the model in each thread"
            )
        if (mine is None or mine is not latest) and self._owner.inside_unentered(self.model):
            # This thread runs a forward of the model that began before the recording's hooks were there (another
            # thread's, paused as the recording began): joining the latest call appended its layers to another
            # forward's, placed on its grid, silently, and with no call yet it was placed on a grid it never
            # recorded (QA 345). A block called alone still joins the latest call.
            self._pending.clear()
            raise self._begun_before_refusal()

    def _begun_before_refusal(self) -> RuntimeError:
        """The refusal of a recorded module run in a forward of the model begun before the recording."""
        return RuntimeError(
            f"vitmad.record: thread '{threading.current_thread().name}' ran a recorded module of "
            f"{type(self.model).__name__} in a forward of it begun before the recording, whose start (its patch "
            "embedding, its image) vitmad did not see; a recorded model runs in one thread at a time: begin each "
            "forward inside the recording, one after another"
        )

    def _open_call(self) -> None:
        """The last of rec.calls is the call a layer joins: the vacant call (_drop_interrupted), listed again where
        this layer is the first since its start, or a new call where there is none."""
        vacant = self._vacant
        if vacant is not None and vacant._is_empty() and not any(call is vacant for call in self._calls):
            self._calls.append(vacant)
        elif not self._calls:
            self._calls.append(RecordedCall())

    def _place_beside(self, name: str, lead: torch.Size, num_queries: int, num_keys: int) -> Placement | None:
        """:meth:`_place`, or None for an attention call of a block recorded beside the layers it holds that cannot
        be placed (:func:`blocks_beside_layers`: a gate's softmax, its cross-attention): passed by, as it was before
        such a block was recorded at all."""
        try:
            return self._place(name, lead, num_queries, num_keys)
        except ValueError:
            if name not in self._beside_layers:
                raise
            return None

    def _place(self, name: str, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        self._check_call_thread()
        self._open_call()
        try:
            if len(lead) == 2 and num_queries == num_keys:  # (another shape: the placer's own refusal says why)
                self._check_one_run(name, num_queries)
            placement = self._placers[name].place(self._context, lead, num_queries, num_keys)
            # A layer placed: the runs so far are attended, and the next run of the embedding starts a new count
            # (an image embedded and attended, then its half-size copy, in one call: QA 382).
            self._context.values.pop(RUN_GRIDS, None)
            self._check_stem_followed(placement)
            return placement if self._spacing is None else self._spacing.apply(placement)
        except NotPlaceable as error:
            inner = self._held_inside.get(name)
            # A block named whole whose attention module vitmad places (a Swin block: QA 359).
            hint = (f"; {name} holds the attention module(s) {', '.join(inner[:4])}{', ...' if len(inner) > 4 else ''}"
                    ", which vitmad places: name those in layers=" if inner else "")
            raise ValueError(
                f"vitmad.record: {name or 'the model itself'} ({type(self._modules[name]).__name__}) of "
                f"{type(self.model).__name__}: {error}{hint}"
            ) from None

    def _check_one_run(self, name: str, num_queries: int) -> None:
        """Refuses a layer placed by the plain layout (one grid per call, the patch embedding's last) in a forward that
        ran the patch embedding several times since a layer was last placed (each run of the image's first convolution
        starts a call; its runs in a row, with no layer between, are counted together): the layer's tokens may be any
        run's. Not where every run cut one grid and the layer attends over fewer tokens than all those grids hold:
        each run's tokens are then placed alike (a siamese pair of one size embedded first, then each attended: QA
        380, also behind a stem of its own, QA 381)."""
        grids = self._context.values.get(RUN_GRIDS) or []
        if len(grids) < 2 or not _uses_plain_layout(self._placers[name]):
            return
        if len(set(grids)) == 1 and num_queries < len(grids) * grids[0][0] * grids[0][1]:
            return
        first = self._plain.embedding[0] if self._plain.embedding is not None else "its patch embedding"
        shown = ", ".join(dict.fromkeys(f"{g[0]}x{g[1]}" for g in grids))
        raise NotPlaceable(
            f"the forward ran {first} {len(grids)} times before it (grids {shown}: several images or crops embedded "
            "first, then attended one after another, or together?), and a layer of the plain ViT layout is placed on "
            "the grid of the last run, so vitmad cannot tell which run's tokens it attends over; run the blocks on "
            "each input right after embedding it, call the model once per input, or pass positions=<[N, 2] pixel "
            "position of each token> where every run of the layer attends over one layout")

    def _check_stem_followed(self, placement: Placement) -> None:
        """Refuses a layer whose tower runs on a stem's map (a learned downsampler of the user's before it) where its
        family placed it in pixels of the tower's own input, not of the image: the plain layout follows the stem's
        stride, but a family that reads its strides from its own patch embedding (SAM's and SAM 2's encoders,
        kornia's ViT, vit_pytorch's CvT, timm's PVTv2 and Hiera) halved the MAD behind a stride-2 stem (QA 363). Told
        from the layer's grid times its stride: the stem's map's size rather than the image's. (MONAI's ViT and Swin
        start their calls at their own patch embedding, so no stem is seen before them: docs/definition.md.)"""
        tower_input = self._context.values.get(_STEM_TOWER_INPUT)
        image = self._context.image_size
        geometry = placement.geometry
        grid, stride = getattr(geometry, "grid", None), getattr(geometry, "stride", None)
        if tower_input is None or image is None or not grid or not stride or len(grid) != 2 or len(stride) != 2:
            return
        if not any(i >= 1.5 * t for t, i in zip(tower_input, image)):
            return  # no stride to follow: a stride-1 stem that trims the map's edges moves every token alike
        extent = [float(g) * float(s) for g, s in zip(grid, stride)]
        if all(abs(e - t) < abs(e - i) for e, t, i in zip(extent, tower_input, image)):
            raise NotPlaceable(
                f"its tower runs on the {tower_input[0]}x{tower_input[1]} map a stem of yours made from the "
                f"{image[0]}x{image[1]} image, and its layout is read from the tower's own patch embedding, in pixels "
                "of that map, not of the image (vitmad follows a stem's stride for plain ViT layouts only); record "
                "the tower itself, vitmad.record(<tower>), to measure in pixels of its input, or pass "
                "positions=<[N, 2] pixel position of each token in the image>")

    @_eager_between_graphs  # called from the model's own forward
    def _on_attention(self, name, query, key, scale, mask, *, other_keys: bool = False,
                      padded: torch.Tensor | None = None) -> None:
        """One ``F.scaled_dot_product_attention`` / ``AttentionInterface`` call of module ``name``; ``other_keys``:
        its keys are known to come from another sequence than its queries (``nn.MultiheadAttention`` given a
        ``key`` that is not its ``query``); ``padded``: ``[B, N]`` bool, its tokens that padding hides as keys
        (``nn.MultiheadAttention``'s ``key_padding_mask``), which are no queries either."""
        if _not_recorded():  # a checkpointed layer's forward run again by backward: recorded once, in the forward
            return
        query, key, mask = _as_autocast_casts(query, key, mask)
        # SDPA broadcasts the leading dims of q and k and adds a float mask of any float dtype; mad_qk takes
        # equal leading dims (a stride-0 view costs nothing) and a bias in q's dtype, or a bool mask as is.
        lead = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2])
        query = query.detach().expand(*lead, *query.shape[-2:])
        key = key.detach().expand(*lead, *key.shape[-2:])
        if mask is not None and mask.dtype != torch.bool:
            if mask.dtype == torch.float32 and query.dtype in (torch.float16, torch.bfloat16):
                # SDPA adds a float32 mask to a 16-bit call's float32 logits as it is; rounded to q's dtype (96.3 is
                # 96.5 in bfloat16), a user's distance bias moved the entropy 2e-3 (QA 398). q and k widened to
                # float32 exactly have the same float32 products, and take the bias whole.
                query, key = query.float(), key.float()
            mask = mask.to(query.dtype)
        if mask is not None:
            mask = mask.detach()
        placement = self._place_beside(name, lead, query.shape[-2], key.shape[-2])
        if placement is None:
            return
        if padded is not None:
            placement = _without_padding(placement, padded, lead)
        if other_keys and placement.key_positions is None and name not in self._warned_other_keys \
                and not in_a_known_library(self.model, name):
            # The layout places key i at query i's token: true of self-attention, whether the keys are the query
            # tensor or projected apart from the same tokens (ultralytics' TransformerLayer: ma(q(x), k(x), v(x))),
            # but not of cross-attention to a memory of as many slots, which was measured as the image silently
            # (QA 257). A call cannot tell the two apart; the layers of the libraries vitmad reads are known.
            self._warned_other_keys.add(name)
            warnings.warn(
                f"vitmad.record: {name} ({type(self._modules[name]).__name__}) of {type(self.model).__name__} is "
                "given a key that is not its query, and its keys are taken to be its queries' tokens (self-attention "
                "with keys projected apart); if they are another sequence (cross-attention to a memory, another "
                "image), its values are no MAD: leave it out (layers=[the other layers])", stacklevel=2)

        def measure(positions, key_positions, renormalize, stats=(), **times):
            if not stats:
                return mad_qk(query, key, positions=positions, key_positions=key_positions, scale=scale,
                              attn_bias=mask, renormalize=renormalize, reduction="none")
            return attention_stats_qk(query, key, positions=positions, key_positions=key_positions, scale=scale,
                                      attn_bias=mask, renormalize=renormalize, reduction="none", stats=stats,
                                      **times)

        self._measure(name, placement, query.device, measure, fused=True)

    @_eager_between_graphs  # called from the model's own forward
    def _on_probabilities(self, name: str, attn: torch.Tensor) -> None:
        """The attention probabilities ``[..., Nq, Nk]`` a module computed itself."""
        if _not_recorded():
            return
        try:
            placement = self._place_beside(name, attn.shape[:-2], attn.shape[-2], attn.shape[-1])
            if placement is None:
                return
        except ValueError as refusal:
            # In a module whose forward calls the fused attention, a softmax beside it is something else (a gate over
            # the heads, [B, N, H]), which refused the whole layer as "its attention" (QA 325): decided when the
            # module ends, by whether the fused call came. In any other module the refusal stands at once, before
            # the forward goes on past it (QA 328).
            fused = self._fused_callers.get(name)
            if fused is None:
                # (Also a transformers module dispatching through AttentionInterface outside a transformers model,
                # read here by its SDPA call: Sam2's vision attention first takes a softmax over its heads that it
                # never uses, which refused a wrapped Sam2HieraDetModel, QA 331.)
                module = self._modules[name]
                fused = self._fused_callers[name] = reaches_fused_attention(module) or uses_attention_interface(module)
            if not fused:
                raise
            self._pending.setdefault(name, []).append((None, refusal, False, None, None))
            return
        if self._causal_check_due(name, attn) and not attn.is_meta:  # (meta: shape inference, no values)
            _refuse_causal_probabilities(name, attn)

        def measure(positions, key_positions, renormalize, stats=()):
            if not stats:
                return mad(attn, positions=positions, key_positions=key_positions, renormalize=renormalize,
                           reduction="none")
            return attention_stats(attn, positions=positions, key_positions=key_positions,
                                   renormalize=renormalize, reduction="none", stats=stats)

        self._measure(name, placement, attn.device, measure, fused=False)

    def _measure(self, name: str, placement: Placement, device: torch.device, measure: Callable, *,
                 fused: bool) -> None:
        """Per-query values of one attention call (and, for a video layer, its temporal ones), kept until the
        module's forward ends."""
        positions = self._to_device(placement.positions, device)
        key_positions = None if placement.key_positions is None else self._to_device(placement.key_positions, device)
        video = placement.time_positions is not None
        if video and is_differential(self._modules[name]):
            raise ValueError(f"vitmad.record: {name}: differential attention over video tubelets is not supported")
        # A1 - lambda * A2 is not a probability distribution: its entropy, masses and maps are not defined, so
        # such a layer records MAD alone, and NaN for the other statistics (_on_module_done), no maps.
        differential = is_differential(self._modules[name])
        temporal = None
        maps = None
        if name in self._class_layers:
            with torch.no_grad():
                maps = self._class_rows(measure, positions, key_positions, placement.key_positions, device)
            self._pending.setdefault(name, []).append((placement, None, fused, None, maps))
            return
        with torch.no_grad():
            if video:
                key_times = placement.time_key_positions
                times = {"times": self._to_device(placement.time_positions, device),
                         "key_times": None if key_times is None else self._to_device(key_times, device)}
                _trust_same_tokens(placement.time_positions, times["times"], placement.positions, positions)
                if key_times is not None:
                    _trust_same_tokens(key_times, times["key_times"], placement.key_positions, key_positions)
            if video and not fused:
                # From stored probabilities, a second read for the temporal distance.
                temporal = measure(times["times"], times["key_times"], self.renormalize)
            if self._maps and placement.key_positions is None and not differential:
                maps = self._prefix_rows(measure, positions, placement, device)
            if video and fused:
                # From q and k, the temporal distance is a second sum of the same online-softmax pass
                # (benchmarks/bench_video.py: two passes cost 1.8x one).
                value, temporal = self._statistics(measure, positions, key_positions, placement.padded_keys, times)
            elif self._stats and not differential:
                value = self._statistics(measure, positions, key_positions, placement.padded_keys)
            elif not differential:
                value = measure(positions, key_positions, self.renormalize)
            elif not self.renormalize:
                value = CallSums(measure(positions, key_positions, False))
            else:
                # The mass on positioned keys as a MAD: every positioned query at 0, every positioned key at 1.
                keys = positions if key_positions is None else key_positions
                at_zero = torch.where(positions[..., :1].isnan(), positions[..., :1], 0.0)
                at_one = torch.where(keys[..., :1].isnan(), keys[..., :1], 1.0)
                value = CallSums(measure(positions, key_positions, False), measure(at_zero, at_one, False))
        self._pending.setdefault(name, []).append((placement, value, fused, temporal, maps))

    # Distinct host position tensors a recording keeps on a device: a model's layouts (one per grid, window
    # partition or stage) are far fewer.
    _DEVICE_POSITIONS_LIMIT = 64

    def _to_device(self, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A placement's positions on the attention's device, their values checked once on the host.

        Positions built on the host and used on a GPU are checked here, where that costs no wait, and their device
        copy is trusted (``trust_position_values``), so the op does not copy them back to the host to check them
        (a wait for all the GPU work queued before it, per layer). Copies are kept by content: the layers of a
        stage, and the calls of a forward, that share positions share one copy (a host-to-device copy from
        pageable memory waits for the queued work too). A layout's read-only tensors keep their own copies
        (``on_device``); positions already on the device are used as they are (and checked by the op).
        """
        device = torch.device(device)
        if positions.device.type != "cpu" or device.type == "cpu" or is_read_only(positions):
            return on_device(positions, device)
        return copy_by_content(positions, device, self._device_positions, self._DEVICE_POSITIONS_LIMIT,
                               positions=True)

    def _statistics(self, measure: Callable, positions: torch.Tensor, key_positions: torch.Tensor | None,
                    padded_keys: bool, times: dict | None = None):
        """``[1 + S, *lead, Nq]``: MAD, then the statistics asked for, per query (only MAD, ``[*lead, Nq]``,
        when none are). The self mass is measured only where the keys are the queries, padding slots aside
        (``padded_keys``: key i is query i's token); a pooled or halo key set has no "own token" to trust: NaN
        there. With ``times`` (a video layer), the pair (that, the temporal MAD per query) from the same call."""
        wanted = self._stats
        if key_positions is not None and not padded_keys and "self_mass" in wanted:
            wanted = tuple(n for n in wanted if n != "self_mass")
        extra = () if times is None else (TEMPORAL_MAD,)
        rows = measure(positions, key_positions, self.renormalize, ("mad", *wanted, *extra), **(times or {}))
        value = rows["mad"] if not self._stats else torch.stack(
            [rows[n] if n in rows else torch.full_like(rows["mad"], float("nan")) for n in ("mad", *self._stats)])
        return value if times is None else (value, rows[TEMPORAL_MAD])

    def _prefix_rows(self, measure: Callable, positions: torch.Tensor, placement: Placement,
                     device: torch.device) -> torch.Tensor | None:
        """``[*lead, Q, Nk]``: the attention rows of the ``Q`` queries without a position over every key (NaN at
        the keys without one), or None when there is no such query or they differ between matrices.

        Where the layout counts its extra tokens (``geometry.num_prefix_tokens``, and the suffix tokens after the
        grid), the rows are theirs alone: the other tokens without a position are padding slots (a NaFlex batch
        padded to one length), which stand for nothing (docs/definition.md) and have no map."""
        if placement.map_tokens is not None:
            return self._chosen_prefix_rows(measure, positions, placement, device)
        geometry = placement.geometry
        columns = derived_once(positions, None, "prefix_rows", lambda: _common_prefix_columns(positions))
        if columns is None:
            return self._padded_prefix_rows(measure, positions, placement, device)
        kept = None
        if geometry.num_prefix_tokens is not None:
            prefix, suffix = geometry.num_prefix_tokens, geometry.num_suffix_tokens or 0
            kept = derived_once(positions, None, f"prefix_map_rows.{prefix}.{suffix}",
                                lambda: _extra_token_rows(positions, prefix, suffix))
            if kept is not None and kept.numel() == 0:
                return None
        values = measure(positions, None, False, (MAP_NAME,))[MAP_NAME]
        if kept is not None:
            values = values.index_select(-2, kept.to(values.device))
        rows = values.new_full((*values.shape[:-1], positions.shape[-2]), float("nan"))
        return rows.index_copy_(-1, columns, values)

    def _padded_prefix_rows(self, measure: Callable, positions: torch.Tensor, placement: Placement,
                            device: torch.device) -> torch.Tensor | None:
        """The extra tokens' rows, as :meth:`_prefix_rows`, where the padding slots differ between matrices (a
        NaFlex batch of images with grids of their own), or None where the layout does not count its extra tokens.

        The op's maps want the same tokens without a position in every matrix. So for this one measurement each
        padding slot stands in as a token at pixel (0, 0): its row is not a map's, and its column, kept as a key's,
        is set to NaN after. The rows are the raw probabilities (``renormalize=False``), which no position
        changes, so a stand-in changes no value of the image's keys."""
        geometry = placement.geometry
        if geometry.num_prefix_tokens is None:
            return None
        host, count = placement.positions, placement.positions.shape[-2]
        prefix, suffix = geometry.num_prefix_tokens, geometry.num_suffix_tokens or 0
        token = torch.arange(count, device=host.device)
        extra = (token < prefix) | (token >= count - suffix)
        if not bool(extra.any()):
            return None
        stand_in = derived_once(host, None, f"prefix_stand_in.{prefix}.{suffix}",
                                lambda: torch.where(host[..., :1].isnan() & ~extra[:, None], 0.0, host))
        values = measure(self._to_device(stand_in, device), None, False, (MAP_NAME,))[MAP_NAME]
        rows = values.new_full((*values.shape[:-1], count), float("nan"))
        rows.index_copy_(-1, on_device((~extra).nonzero().squeeze(-1), values.device), values)
        return rows.masked_fill_(positions[..., 0].isnan().unsqueeze(-2), float("nan"))

    def _chosen_prefix_rows(self, measure: Callable, positions: torch.Tensor, placement: Placement,
                            device: torch.device) -> torch.Tensor:
        """The rows of the tokens the placement names (``Placement.map_tokens``), as :meth:`_prefix_rows`, where
        other tokens without a position lie among them (Mllama's padding tokens and padding tiles, which may differ
        between images). As in :meth:`_padded_prefix_rows`, each of those others stands in as a token at pixel
        (0, 0) for this measurement, which changes no probability, and its column is set to NaN after; the rows of
        tokens an image does not have (``Placement.map_present``) are NaN."""
        host, chosen = placement.positions, placement.map_tokens
        count = host.shape[-2]

        def stand_in() -> torch.Tensor:
            named = torch.zeros(count, dtype=torch.bool, device=host.device)
            named[chosen.to(host.device)] = True
            return torch.where(host[..., :1].isnan() & ~named[:, None], 0.0, host)

        values = measure(self._to_device(derived_once(host, None, "map_token_stand_in", stand_in), device), None,
                         False, (MAP_NAME,))[MAP_NAME]
        others = torch.ones(count, dtype=torch.bool)
        others[chosen.cpu()] = False
        rows = values.new_full((*values.shape[:-1], count), float("nan"))
        rows.index_copy_(-1, on_device(others.nonzero().squeeze(-1), values.device), values)
        rows.masked_fill_(positions[..., 0].isnan().unsqueeze(-2), float("nan"))
        if placement.map_present is not None:
            rows.masked_fill_(~on_device(placement.map_present, values.device)[:, None, :, None], float("nan"))
        return rows

    def _class_rows(self, measure: Callable, positions: torch.Tensor, key_positions: torch.Tensor,
                    host_keys: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[*lead, Q, Nk]``: the attention rows of a class-attention layer's queries (none has a position) over
        every key, NaN at the keys without one (ClassQueryPlacer). The keys may differ between matrices (a NaFlex
        batch's padding slots), which the op's maps do not take: each key without a position stands in at pixel
        (0, 0) for this measurement, which changes no probability, and its column is set to NaN after. The
        stand-ins are built from the host copy ``host_keys``: on a GPU, no wait for the work queued before."""
        stand_in = derived_once(host_keys, None, "class_key_stand_in",
                                lambda: torch.where(host_keys.isnan(), 0.0, host_keys))
        values = measure(positions, self._to_device(stand_in, device), False, (MAP_NAME,))[MAP_NAME]
        return values.masked_fill_(key_positions[..., 0].isnan().unsqueeze(-2), float("nan"))

    def _fold(self, name: str, placement: Placement, per_query: torch.Tensor) -> torch.Tensor:
        try:
            folded = placement.fold(per_query)
        except NotPlaceable as error:
            raise ValueError(f"vitmad.record: {name} of {type(self.model).__name__}: {error}") from None
        if self.reduction == "none":
            return folded
        if placement.present is None:
            return folded.mean(-1)
        # The mean over the tokens the image has in this call (kept by a masked encoder, or its own grid
        # inside a packed batch): absent tokens are NaN in the fold and must not reach the sum.
        present = on_device(placement.present, folded.device)
        present = present.unsqueeze(-2) if present.dim() == 2 else present
        return torch.where(present, folded, 0.0).sum(-1) / present.sum(-1)

    def _fold_map(self, name: str, placement: Placement, row: torch.Tensor) -> torch.Tensor:
        """One prefix token's attention over the keys, ``[*lead, Nk]``, on the layer's grid ``[B, H, T]``: the keys
        are the queries, so the fold of per-query values places them."""
        try:
            return placement.fold(row)
        except NotPlaceable as error:
            raise ValueError(f"vitmad.record: {name} of {type(self.model).__name__}: {error}") from None

    def _causal_check_due(self, name: str, attn: torch.Tensor) -> bool:
        """Whether module ``name``'s probabilities ``attn`` are read for a causal mask in this call: on the CPU in
        every call; on a device once per shape of this recording, as the positions are checked once per layout (the
        check reads values back, which would make every recorded layer of a windowed model wait for the GPU)."""
        if attn.device.type == "cpu":
            return True
        layout = (name, tuple(attn.shape))
        if layout in self._causal_checked:
            return False
        self._causal_checked.add(layout)
        return True

    @_eager_between_graphs  # called from the model's own forward
    def _unread_flex_refusal(self, name: str, module: nn.Module) -> str:
        """Why ``module`` is refused whose forward ran a ``flex_attention`` call vitmad could not read: its family's
        reason for a forward without attention vitmad sees where it has one (diffusers' backends), else
        flex_call's."""
        placer = self._placers.get(name)
        reason = None if placer is None else placer.refusal_without_attention(module)
        if reason is None:
            return unread_flex_refusal(name, module)
        return f"vitmad.record: {name} ({type(module).__name__}) of {type(self.model).__name__}: {reason}"

    @_eager_between_graphs  # called from the model's own forward
    def _on_module_done(self, name: str, module: nn.Module, completed: bool) -> None:
        """Record what module ``name`` computed in the forward that just ended: one entry per layer."""
        if _not_recorded():
            return
        if self._calls:
            self._calls[-1]._modules_ran = True
        pending = self._pending.pop(name, [])
        if any(entry[2] for entry in pending):
            # A module that calls the fused attention computes it there; a softmax beside it is something else.
            pending = [entry for entry in pending if entry[2]]
        elif any(entry[0] is not None for entry in pending):
            # A deferred softmax that could not be placed (in a module reaching fused attention or the attention
            # interface: above), beside attention that was (the eager interface's softmax after Sam2's unused one
            # over its heads): something else too.
            pending = [entry for entry in pending if entry[0] is not None]
        refused = next((entry[1] for entry in pending if entry[0] is None), None)
        if refused is not None:  # a softmax it computed that could not be placed (_on_probabilities)
            if completed:
                raise refused
            return
        if completed and not pending and name in self._placers:
            # A module a family refuses, or whose attention runs where vitmad does not look, refused all the same.
            reason = self._placers[name].refusal_without_attention(module)
            if reason is not None:
                raise ValueError(f"vitmad.record: {name} ({type(module).__name__}) of {type(self.model).__name__}: "
                                 f"{reason}")
        if completed and not pending and name in self._named and name not in self.skipped:
            # Named by the user, it ran and computed no attention: it is in no call's layers, which is said here
            # rather than left to be found missing.
            # One that normalised logits in a form vitmad does not read attended, which "ran without computing
            # attention" denied (QA 426).
            unread = any(getattr(hooks, "normalised_unread", {}).get(name) for hooks in self._hooks)
            self.skipped[name] = "named in layers, but ran without computing attention" + (
                " vitmad reads (it normalised logits in a form vitmad does not read)" if unread else "")
            form = ("; it normalised logits in a form vitmad does not read (a softmax over another dim than the "
                    "last, a logsumexp, an exp then a sum)") if unread else ""
            warnings.warn(f"vitmad.record: {name} ({type(module).__name__}) of {type(self.model).__name__}, named "
                          "in layers, ran without computing attention vitmad reads (F.scaled_dot_product_attention, "
                          "torch's flex_attention, F.multi_head_attention_forward, transformers' AttentionInterface "
                          f"or a softmax over the last dim){form}; it is not recorded",
                          stacklevel=2)
        if completed and not pending and name in self._placers and name not in self._named \
                and name not in self.skipped and name not in self._recorded_names \
                and any(getattr(hooks, "normalised_unread", {}).get(name) for hooks in self._hooks) \
                and not is_known_library(type(module)):  # (a user's class in a timm ViT too, QA 335)
            self._unseen[name] = self._calls[-1] if self._calls else None
            if self._calls and self._calls[-1].layers:
                self._say_unseen_layers(self._calls[-1])
        if not completed or not pending:
            return
        if 1 < pending[0][0].batch_parts and len(pending) < pending[0][0].batch_parts:
            # One of the forwards over a part of the batch (Placement.batch_parts): the layer waits for the rest.
            self._pending[name] = pending
            return
        if name in self._class_layers:
            self._record_class_maps(name, module, pending)
            return
        temporal = pending[0][3] if len(pending) == 1 else None
        placement = pending[0][0]
        components = None
        if is_differential(module) and len(pending) == 2:
            lam = differential_lambda(module)
            per_query, parts = combine(pending[0][1], pending[1][1], lam, renormalize=self.renormalize,
                                       reduce_mean=False)
            components = {"mad": [self._fold(name, placement, p) for p in parts], "lambda": lam}
            if self._stats:
                # The statistics are not defined for A1 - lambda * A2 (_measure): NaN beside its MAD.
                per_query = torch.stack([per_query, *(torch.full_like(per_query, float("nan")) for _ in self._stats)])
        elif placement.heads_per_call and all(entry[0].heads_per_call for entry in pending):
            per_query = torch.stack([value for _, value, *_ in pending], dim=-2)
        elif placement.consecutive_chunks and all(entry[0].consecutive_chunks for entry in pending):
            per_query = torch.cat([value for _, value, *_ in pending], dim=-1)
            if all(entry[3] is not None for entry in pending):  # packed clips: each chunk's temporal MAD too
                temporal = torch.cat([entry[3] for entry in pending], dim=-1)
        elif placement.rows_per_call and all(entry[0].rows_per_call for entry in pending):
            per_query = torch.cat([value for _, value, *_ in pending], dim=-2)
            if all(entry[3] is not None for entry in pending):
                temporal = torch.cat([entry[3] for entry in pending], dim=-2)
        elif 1 < placement.batch_parts == len(pending) and all(e[0].batch_parts == len(pending) for e in pending):
            per_query = torch.cat([value for _, value, *_ in pending], dim=-3)  # [..., B, H, Nq]: the batch dim
        elif len(pending) == 1 and not is_differential(module):
            per_query = pending[0][1]
        elif is_differential(module):
            raise ValueError(
                f"vitmad.record: {name} ({type(module).__name__}) of {type(self.model).__name__} is differential "
                f"attention that made {len(pending)} attention call(s) in one forward; vitmad reads it as its two "
                "attention calls (A1 and A2, then A1 - lambda * A2), as on timm's fused path: set the module's "
                "fused_attn = True (its explicit path makes both maps in one softmax over [B, 2H, N, N]), or leave it "
                "out with layers=[the other attention modules]"
            )
        else:
            raise ValueError(
                f"vitmad.record: {name or 'the model itself'} ({type(module).__name__}) of {type(self.model).__name__} "
                f"made {len(pending)} attention calls in one forward; vitmad knows how several calls combine only for "
                "differential attention (two calls, A1 - lambda * A2), one call per head (EfficientViT) and one per "
                "chunk of a packed sequence (Qwen2-VL); leave this module out with layers=[the other attention "
                "modules] (a softmax over the last dim run inside its forward counts as an attention call, also one "
                "a hook of yours on one of its submodules runs)"
            )
        self._check_call_thread()
        call = self._calls[-1]
        call.layers.append(name)
        if name not in self._recorded_names and self.skipped.get(name, "").endswith(_NORMALISED_UNREAD):
            del self.skipped[name]  # skipped in an earlier call, recorded in this one: it is in rec.layers
        self._recorded_names.add(name)
        if self._unseen:
            self._say_unseen_layers(call)
        if self._stats:
            folded = [self._fold(name, placement, value) for value in per_query.unbind(0)]
            call.per_layer.append(folded[0])
            for stat, value in zip(self._stats, folded[1:]):
                call.statistics.setdefault(stat, []).append(value)
        else:
            call.per_layer.append(self._fold(name, placement, per_query))
        if self._maps:
            maps = pending[0][4] if len(pending) == 1 else None
            rows = {None if entry[4] is None else entry[4].shape[-2] for entry in pending}
            if len(pending) > 1 and placement.consecutive_chunks and len(rows) == 1 and None not in rows:
                # One call per chunk, each chunk led by the same tokens without a position (RADIO's summary tokens,
                # a class token per image): each chunk's rows cover its own keys, so joined along the keys they
                # fold, like per-query values, onto each image's own grid. Chunks without such rows have no maps.
                maps = torch.cat([entry[4] for entry in pending], dim=-1)
            elif len(pending) > 1 and placement.rows_per_call and len(rows) == 1 and None not in rows:
                maps = torch.cat([entry[4] for entry in pending], dim=-3)  # [rows, Q, Nk]: the calls' rows
            elif 1 < placement.batch_parts == len(pending) and len(rows) == 1 and None not in rows:
                maps = torch.cat([entry[4] for entry in pending], dim=-4)  # [B, H, Q, Nk]: the batch dim
            call.prefix_maps.append(None if maps is None else torch.stack(
                [self._fold_map(name, placement, row) for row in maps.unbind(-2)], dim=-2))
        call.geometry.append(placement.geometry)
        call.temporal.append(None if temporal is None else self._fold(name, placement, temporal))
        if components is not None:
            call.components[name] = components

    def _say_unseen_layers(self, call: RecordedCall) -> None:
        """Skips, with a warning, the layers found in a user's model that ran in ``call`` (or before any call)
        without attention vitmad sees, now that another layer of it is recorded, where they normalised logits in a
        form vitmad does not read (a softmax over another dim than the last, exp(l - logsumexp(l))): they were left
        out of rec.layers silently, and rec.mad[1] was the next block's (QA 333). A layer that normalised nothing
        (a pooling mixer in a hybrid's blocks of one class, a block dropped in this call) is no attention missed
        (QA 335). A named layer is said at once (above); a model none of whose layers is seen raises
        NoAttentionRanError when read; a module holding a recorded layer attended through it."""
        for name, ran_in in list(self._unseen.items()):
            if ran_in is not None and ran_in is not call:
                continue
            module = self._modules[name]
            del self._unseen[name]
            if name in self.skipped or name in self._recorded_names \
                    or any(layer.startswith(f"{name}.") for layer in call.layers):  # its own attention module's
                continue
            self.skipped[name] = (f"{'found as' if self._found_by_default else 'matched in layers as'} an attention "
                                  f"layer, but ran without computing attention vitmad sees {_NORMALISED_UNREAD}")
            warnings.warn(
                f"vitmad.record: {name} ({type(module).__name__}) of {type(self.model).__name__} ran without "
                "computing attention vitmad sees (F.scaled_dot_product_attention, torch's flex_attention, "
                "F.multi_head_attention_forward, transformers' AttentionInterface, or a softmax over the last dim), "
                "while other layers did: it is "
                "not recorded, and rec.mad's layer axis skips it; if it attends in another form (a softmax over "
                "another dim, exp(logits - logsumexp), exp(logits - max) / sum), compute it as one of those, or pass "
                "layers=[the other "
                "attention modules]", stacklevel=2)

    def _record_class_maps(self, name: str, module: nn.Module, pending: list) -> None:
        """A class-attention layer's forward ended: its class token's maps join the call (no MAD of its own)."""
        if len(pending) != 1:
            raise ValueError(
                f"vitmad.record: {name} ({type(module).__name__}) of {type(self.model).__name__} is class attention "
                f"that made {len(pending)} attention calls in one forward, where vitmad knows one; leave it out with "
                "layers=[the other attention modules], or record without 'prefix_maps'"
            )
        placement, _, _, _, maps = pending[0]
        self._check_call_thread()
        call = self._calls[-1]
        call.class_layers.append(name)
        call.class_maps.append(torch.stack([self._fold_map(name, placement, row) for row in maps.unbind(-2)], -2))
        call.class_geometry.append(placement.geometry)

    def __reduce_ex__(self, protocol):
        # It holds the model and the hooks in it: pickling (torch.save, copy.deepcopy) failed on a lock, naming
        # nothing of vitmad (QA 251). What it recorded pickles.
        raise TypeError("vitmad.record: a Recording holds the model's hooks and does not pickle or copy; save what "
                        "it recorded instead: rec.calls (RecordedCall objects), or rec.mad and the other tensors")

    def __enter__(self) -> Recording:
        if self._handles:  # its hooks are in: entering again would remove them at the inner exit
            raise RuntimeError("vitmad.record: this recording is already active; a recording is entered once at "
                               "a time (make another with vitmad.record(...))")
        if id(self.model) in _RECORDING:
            raise RuntimeError(f"vitmad.record: {type(self.model).__name__} is already being recorded (here or in "
                               "another thread); record a model once at a time")
        _RECORDING.add(id(self.model))
        self._registered = True
        if self._compiled:
            EagerWhileRecording.enter()
            self._eager = True
        try:
            with shared_walks():
                _drop_inert_hooks(self.model)
                self._install()
                _wrap_hooks([*self._handles, *(h for hooks in self._hooks for h in getattr(hooks, "_handles", ()))],
                            self._owner, self.model)
                self._order_trailing()
        except BaseException:
            self._remove()
            raise
        return self

    def _install(self) -> None:
        """The hooks of the call start, of the layout, of the placers and of the attention capture."""
        # One thread at a time inside the model (forward_owner.py): ownership is taken before any other hook of a
        # forward runs and given back after all of them, by the model, each recorded layer and every module that
        # holds one or the first convolution, so that a forward through forward_features or stage by stage holds
        # it across the layers too.
        first = first_convolution(self.model, self._modules.values())
        # Several towers recorded: the model's forward (first) starts each call, and each tower's start one run
        # outside it (_start_tower_call).
        towers = [] if first is not self.model else tower_starts(self.model, self._modules.values())
        starts = {id(module) for module in [first, *towers] if module is not None}
        recorded = {id(module) for module in self._modules.values()}
        walk = named_module_list(self.model)
        held = [name for name, module in walk if id(module) in starts | recorded]
        # Where each recorded layer sits, to tell at each forward that it is still there (_check_layers_in_place).
        self._layer_paths = [(name, module) for name, module in walk if id(module) in recorded]
        present = {id(module) for _, module in self._layer_paths}
        gone = [name for name, module in self._modules.items() if id(module) not in present]
        if gone:
            # Replaced between the recording's making (or its last block) and this block: its layer was left out
            # of every call silently (QA 262).
            raise RuntimeError(
                f"vitmad.record: {', '.join(gone[:4])} of {type(self.model).__name__} was replaced (or removed) since "
                "the recording was made; the module there now is not recorded, and the calls would leave its layer "
                "out: make a new recording (vitmad.record(model)) after replacing modules")
        # After the replaced ones: a module put in a recorded layer's place is new too, and was said to be added
        # (QA 359).
        self._check_added_modules(entering=True)
        self._registration = nn.modules.module.register_module_module_registration_hook(self._module_registered)
        inside = {name.rsplit(".", i)[0] for name in held for i in range(name.count(".") + 1)}
        # And the model's own children: a forward_features that raises between its patch embedding and its blocks
        # (position embedding, dropout) leaves no empty call (_leave_scope).
        inside.update(name for name, _ in self.model.named_children())
        scopes = [self.model, *(module for name, module in named_module_list(self.model)
                                if name in inside and module is not self.model)]
        # The recorded layers each scope holds, checked in place as it begins (_enter_scope): a block of a loop
        # checks its own layer, not all of them (the depth squared, QA 270).
        names = {id(module): name for name, module in walk}
        self._scope_layers = {id(scope): [(name, layer) for name, layer in self._layer_paths
                                          if name == names.get(id(scope)) or _holds(names.get(id(scope), ""), name)]
                              for scope in scopes}
        for module in scopes:
            self._handles.append(module.register_forward_pre_hook(
                lambda scope, *_, restart=module is self.model: self._enter_scope(scope, restart), prepend=True))
        if first is not None:
            self._handles.append(first.register_forward_pre_hook(self._start_call))
        else:
            self._handles.append(self.model.register_forward_pre_hook(self._start_call, with_kwargs=True))
        for start in towers:
            self._handles.append(start.register_forward_pre_hook(self._start_tower_call))
        stems = stems_beside_towers(self.model, self._modules.values()) if towers else []
        for stem in stems:
            self._handles.append(stem.register_forward_hook(self._see_stem_map))
        for holder, start, outermost in tower_inputs(self.model, self._modules.values()) if stems else ():
            self._handles.append(holder.register_forward_pre_hook(
                lambda _, args, kwargs, start=start, outermost=outermost: self._see_tower_input(
                    start, outermost, args, kwargs), with_kwargs=True))
        for tower in self._second_towers:
            self._handles.append(self.model.get_submodule(tower).register_forward_pre_hook(
                lambda *_, tower=tower: self._second_towers_ran.add(tower)))
        self._handles.extend(self._plain.install(self._context))
        for placer in {id(p): p for p in self._placers.values()}.values():
            self._handles.extend(placer.install(self._context))
        for hooks in self._hooks:
            hooks.install()
        # Last, so that it runs after every layer's own end: a forward that raised leaves no half call behind.
        self._handles.append(self.model.register_forward_pre_hook(self._begin_forward, with_kwargs=True))
        # A forward that returned runs both hooks below, one that raised only the second: the output cannot tell
        # them apart (a wrapper's forward may return None).
        self._handles.append(self.model.register_forward_hook(self._forward_returned))
        self._handles.append(self.model.register_forward_hook(self._end_forward, always_call=True))
        self._trailing_handles = self._handles[-2:]
        for module in scopes:
            self._handles.append(module.register_forward_hook(
                lambda *_, whole=module is self.model: self._leave_scope(whole), always_call=True))
            self._trailing_handles.append(self._handles[-1])

    def _order_trailing(self) -> None:
        """By hook dict, the hooks that must run after every forward hook of the module, the user's too, in the
        order they were registered: those that tell whether the forward ended (_forward_returned, _end_forward,
        _leave_scope, the captures' leave). A user's forward hook registered inside the block that raised ran
        after them, so a forward ended by it kept its call."""
        self._trailing = {}
        handles = [*self._trailing_handles, *(h for hooks in self._hooks for h in getattr(hooks, "trailing", ()))]
        for handle in handles:
            hooks = handle.hooks_dict_ref()
            if hooks is not None:
                self._trailing.setdefault(id(hooks), (hooks, []))[1].append(handle.id)
        for hooks, ids in self._trailing.values():
            order = {hook_id: i for i, hook_id in enumerate(hooks)}
            ids.sort(key=lambda hook_id: order.get(hook_id, -1))

    def _keep_trailing_last(self, module: nn.Module) -> None:
        """Moves the recording's trailing forward hooks of ``module`` behind any registered since (from a
        pre-hook: torch reads the forward hooks only after the forward)."""
        entry = self._trailing.get(id(module._forward_hooks))
        if entry is not None:
            hooks, ids = entry
            if next(reversed(hooks), None) != ids[-1]:
                for hook_id in ids:
                    if hook_id in hooks:
                        hooks.move_to_end(hook_id)

    def _enter_scope(self, scope: nn.Module, whole_model: bool) -> None:
        """A forward of the model or of a module holding recorded layers begins: ownership, and for the outermost
        such forward outside the model's own call (forward_features), what the calls held before it."""
        outermost = not self._owner.held_here()
        self._owner.enter(whole_model)
        if (outermost or whole_model) and not _in_backward():
            # A new forward: the runs of the patch embedding counted are this forward's only, also where no call start
            # clears the call's values between forwards (a first convolution that does not run: QA 382).
            self._context.values.pop(RUN_GRIDS, None)
        if outermost and not whole_model and not _in_backward():
            # A forward through forward_features, a model's stages or a user's loop over cached tokens never runs
            # the model's own pre-hook (_begin_forward), which checks these (QA 273: a block added, then such a
            # loop, left its layer out). Each block of a loop is a scope of its own: it checks the layers it holds
            # (a module written into a _modules dict directly fires no hook, QA 275), and the walk for added modules
            # costs nothing unless a module may have changed (QA 270: the layers checked at each block, the depth
            # squared).
            self._check_layers_in_place(self._scope_layers.get(id(scope), []))
            self._check_model_modules()
        self._reached_inside |= not whole_model
        self._keep_trailing_last(scope)
        if outermost and not whole_model and not _in_backward():
            self._drop_interrupted()
            call = self._calls[-1] if self._calls else None
            caller = forward_caller_frame()
            self._outermost = _Outermost(
                len(self._calls), call, 0 if call is None else len(call.layers),
                0 if call is None else len(call.class_layers), sys.exc_info()[1], scope,
                current_module_call(), None if caller is None else (threading.current_thread(),
                                                                    (id(caller), caller.f_code)))

    def _leave_scope(self, whole_model: bool) -> None:
        """That forward ended. When the outermost one outside the model's own call raised (an exception other
        than the one being handled when it began: a retry inside an ``except`` block), what it added to the calls
        is taken back, as the model's own call drops a call that raised (_end_forward): a forward_features that
        ran out of memory halfway leaves no half call."""
        entered = self._owner.leave()
        if not entered and not whole_model and self._outermost is None and not self._owner.held_here() \
                and sys.exc_info()[1] is not None and self._calls_before_forward is None and not _in_backward():
            # Its forward raised before _enter_scope ran (a global forward pre-hook; torch then runs the
            # always_call hooks alone): outermost, it stopped the loop that called it (the final norm of
            # forward_features, a block of forward_intermediates).
            call = self._calls[-1] if self._calls else None
            caller = forward_caller_frame()
            if call is not None and caller is not None \
                    and self._starters.get(id(call)) == (threading.current_thread(), (id(caller), caller.f_code)):
                self._forget_starts([self._calls.pop()])
            return
        if whole_model or self._outermost is None or self._owner.held_here():
            return
        outermost, self._outermost = self._outermost, None
        raised = sys.exc_info()[1]
        if raised is None or raised is outermost.handled or self._calls_before_forward is not None \
                or _in_backward():
            return
        self._take_back(outermost)

    def _remove_calls(self, start: int) -> None:
        """Drop the calls from index ``start`` on, those of a forward that did not end. The vacant call among
        them is emptied: the layers of a retry, which no new start precedes, join it again."""
        removed = self._calls[start:]
        self._forget_starts(removed)
        del self._calls[start:]
        if any(call is self._vacant for call in removed):
            self._vacant._keep_layers(0, 0)

    def _take_back(self, outermost: _Outermost) -> None:
        """Undo what an outermost forward outside the model's call added to the calls, as it did not end."""
        self._remove_calls(outermost.count)
        call = outermost.call
        if call is not None and self._calls and self._calls[-1] is call:
            call._keep_layers(outermost.kept, outermost.kept_class)
            # Begun by this forward's convolution, nothing of it stays; begun by the loop that called this forward
            # (timm's forward_intermediates, a user's loop over the blocks, each block an outermost forward: its
            # frame may be gone already, a KeyboardInterrupt taken back later), or by a frame further up this
            # thread's stack (CaiT's forward_features, whose forward_cls calls the class blocks), the error stops
            # that frame too, its call unfinished.
            started = self._starters.get(id(call))
            if call._is_empty() or (outermost.caller is not None and started == outermost.caller) or (
                    started is not None and started[0] is threading.current_thread() and self._in_progress(call)):
                self._forget_starts([self._calls.pop()])

    def _check_layers_in_place(self, layers: list[tuple[str, nn.Module]] | None = None) -> None:
        """Refuse a forward after a recorded layer was replaced in the model (``model.blocks[1].attn = other``
        inside the block): the new module has none of the recording's hooks, and its layer was left out of every
        later call silently, ``rec.mad`` one layer short (QA 251). ``layers``: those to check (every one).

        Raises:
            RuntimeError: naming the layer.
        """
        for name, module in self._layer_paths if layers is None else layers:
            try:
                now = self.model.get_submodule(name)
            except AttributeError:
                now = None
            if now is not module:
                raise RuntimeError(
                    f"vitmad.record: {name} of {type(self.model).__name__} was replaced (or removed) inside the "
                    "recording block; the module there now is not recorded, and the calls would leave its layer out: "
                    "replace modules before the `with vitmad.record(...)` block, or start a new recording after it")

    def _modules_may_have_changed(self) -> bool:
        """Whether a module may have been added or replaced since the model's modules were last checked: torch's
        module registration hook fired (setattr, add_module, append: ``_maybe_added``), or a list's items changed
        (insert writes the list's dict directly)."""
        return self._maybe_added or any(tuple(map(id, d.values())) != items for d, items in self._lists)

    def _check_model_modules(self) -> None:
        """:meth:`_check_layers_in_place` and :meth:`_check_added_modules`, where a module may have changed since
        the last check (entering checks them whatever the flags say: modules changed between recordings)."""
        if self._modules_may_have_changed():
            self._check_layers_in_place()
            self._check_added_modules()

    def _check_added_modules(self, entering: bool = False) -> None:
        """Refuse a forward, or an entry, after an attention module that the recording's choice of layers would
        take was added to the model since the recording was made (``model.blocks.append(Block())``): it has none of
        the recording's hooks, and its layer was left out of every later call silently (QA 265). A module added that
        holds no attention (an adapter, a new head) changes nothing; the recording learns it once. The model is
        walked at entry and after a module may have been added (``_maybe_added``, a list's items), not at every
        forward (a ViT-B's walk is 0.1 ms); modules of torch's own that attend to nothing (a linear layer, a norm
        a model makes at each forward) are learnt without a search for attention (7.5 ms a forward, QA 270). An
        added layer a new recording would skip (CaiT's class attention, whose MAD is not defined) is no reason.

        Raises:
            RuntimeError: naming the module.
        """
        if not (entering or self._modules_may_have_changed()):
            return
        seen = self._modules_seen
        modules = module_list(self.model)
        if {id(m) for m in modules} <= seen.keys():
            self._modules_learnt(modules)
            return
        added = [m for m in modules if id(m) not in seen]
        ids = {id(m) for m in added}
        taken = []
        if not all(_attends_to_nothing(m) for m in added):
            with shared_walks():
                found = [(name, m) for name, m in attention_modules(self.model).items() if id(m) in ids]
                prefix = encoder_prefix(self.model)
                for name, m in found:
                    if self._layers_asked is None and not name.startswith(prefix) or self._layers_asked is not None \
                            and not any(fnmatch.fnmatchcase(name, p) for p in self._layers_asked):
                        continue
                    placer = family_placer(self.model, name, m)
                    if not isinstance(placer, Skip) and not (isinstance(placer, ClassQueries) and not self._maps):
                        taken.append(name)
        if taken:
            raise RuntimeError(
                f"vitmad.record: {', '.join(taken[:4])} of {type(self.model).__name__} "
                f"{'were' if len(taken) > 1 else 'was'} added since the recording was made (vitmad.record(model) "
                "chose its layers then); not recorded, the calls would leave these layers out: make a new recording "
                "after adding modules")
        self._see(added)
        self._modules_learnt(modules)

    def _modules_learnt(self, modules: list[nn.Module]) -> None:
        """The model's modules are all known now: no walk until one may have been added (a refusal leaves the
        flags as they were, so that each forward after it is refused too)."""
        self._maybe_added = False
        # (Their items, not their lengths: insert(0, block) then del list[1] keeps the length, QA 270.)
        self._lists = [(m._modules, tuple(map(id, m._modules.values()))) for m in modules
                       if isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict))]

    def _module_registered(self, *_) -> None:
        self._maybe_added = True

    def _see(self, modules: Iterable[nn.Module]) -> None:
        """Count ``modules`` as the model's own for :meth:`_check_added_modules`, each until it is freed (weakly
        held, so that the recording keeps alive no module the user drops, and an id freed and reused by a new
        module is not taken for the old one)."""
        seen = self._modules_seen
        for module in modules:
            key = id(module)
            if key not in seen:
                seen[key] = weakref.ref(module, lambda _, key=key: seen.pop(key, None))

    def _begin_forward(self, module: nn.Module, args, kwargs) -> None:
        if not _in_backward():
            # Every layer in place at each forward (a few microseconds a layer), whatever the flags say: a module
            # written into a _modules dict directly, or through object.__setattr__, fires no hook (QA 275).
            self._check_layers_in_place()
            self._check_model_modules()
            # A model without a convolution begins its call in its own forward pre-hook, which runs before this
            # one: that call is this forward's, so it is counted as begun by it (and dropped if it raises), and is
            # not a call left by an interrupted forward before it.
            started, self._model_started = self._model_started, None
            own = started is not None and bool(self._calls) and self._calls[-1] is started
            if own:
                self._calls.pop()
            self._drop_unfinished()
            self._calls_before_forward = len(self._calls)
            self._reached_inside = False
            if own:
                self._calls.append(started)
            self._model_call = current_module_call()
            # A clip's shape (5 dims or more) before an image's or a mask's, a keyword argument too: model(clip=clip),
            # HF's pixel_values= (QA 427).
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            image = next((a for a in tensors if a.dim() >= 5), next((a for a in tensors if a.dim() == 4), None))
            self._model_input_shape = None if image is None else tuple(image.shape)
            for hooks in self._hooks:
                if hasattr(hooks, "before_forward"):
                    hooks.before_forward()

    def _drop_unfinished(self) -> None:
        """Drop the calls of a forward that began and never ended: a KeyboardInterrupt skips _end_forward."""
        if self._calls_before_forward is not None:
            self._remove_calls(self._calls_before_forward)
            self._calls_before_forward = self._model_call = None

    def _drop_interrupted(self) -> None:
        """Drop the calls of a forward of the model that a KeyboardInterrupt ended (its frame is gone) before
        anything else starts a call or reads them: its half call was read as the latest forward, and a
        forward_features run after it was dropped with it at the next model call or the end of the block. An
        outermost forward outside the model's call that a KeyboardInterrupt ended is taken back as one that
        raised (_leave_scope), and the empty call of one that ended before its first layer leaves rec.calls (kept
        aside for the layers that may run after it: _open_call)."""
        if self._calls_before_forward is not None and self._model_call is not None \
                and not module_call_live(self._model_call, self.model):
            self._drop_unfinished()
        outermost = self._outermost
        if outermost is not None and outermost.module_call is not None \
                and not module_call_live(outermost.module_call, outermost.scope):
            self._outermost = None
            self._take_back(outermost)
        latest = self._calls[-1] if self._calls else None
        started = None if latest is None else self._starters.get(id(latest))
        if latest is not None and latest._is_empty() and started is not None and started[1] is not None \
                and not frame_live(started[0], *started[1]):
            # Begun by a forward outside the model's call (forward_features, sam2's forward_image) that ended before
            # its first recorded layer, with no module holding the layers around to say whether it raised (timm's
            # _pos_embed between the patch embedding and the blocks raising) or returned (the recorded layers run
            # after it, outside it: sam2's memory attention): no entry of rec.calls while empty, but the call that
            # the layers run before the next start join (_open_call).
            self._vacant = self._calls.pop()
            self._forget_starts([self._vacant])

    def _forward_returned(self, module: nn.Module, args, output) -> None:
        self._returned = True

    def _end_forward(self, module: nn.Module, args, output) -> None:
        """A forward of the model ended; one that raised drops the calls it started, whose layers stopped where
        the error was (an out-of-memory error the caller catches, say)."""
        returned, self._returned = self._returned, False
        if self._calls_before_forward is not None:  # ended: any thread may run the model now
            self._forget_starts(self._calls[self._calls_before_forward:])
        if not returned and not _in_backward():
            self._raised += 1
            self._drop_unfinished()
        elif returned and not _in_backward() and not _not_recorded():
            self._forwards += 1
            self._last_done = self._calls[-1] if self._calls else None
            self._warn_several_runs()
            began = self._calls_before_forward
            if not self._reached_inside and began is not None and all(c._is_empty() for c in self._calls[began:]):
                self._warn_unseen_forward()
        elif returned and _in_transform():
            self._transformed += 1
        self._calls_before_forward = self._model_call = None
        _TRANSFORM_WARNED[0] = False

    def _warn_several_runs(self) -> None:
        """Once per recording: one forward of the model ran its image tower more than once (Step3's global view,
        then its crops; LLaVA-NeXT-Video's images, then its video). Each run is a call of its own, on its own grid,
        and the properties that read the latest call would show the last run alone, silently (found by QA). Runs
        are the calls holding layers: a user's packed tower runs its patch embedding once per image, each a call
        start, before its layers run once (QA 269: "ran its recorded layers 3 times")."""
        began = self._calls_before_forward
        since = [] if began is None else self._calls[began:]
        runs = sum(not call._is_empty() for call in since)
        if runs > 1 and not self._warned_runs:
            self._warned_runs = True
            warnings.warn(f"vitmad.record: one forward of {type(self.model).__name__} ran its recorded layers "
                          f"{runs} times (the tower run on several inputs, e.g. a global view and its crops, or "
                          "images and a video); each run is its own entry of rec.calls, and rec.mad, rec.layers, "
                          f"rec.per_layer read the last one alone: read rec.calls[-{len(since)}:] for all of them",
                          stacklevel=2)

    def _warn_unseen_forward(self) -> None:
        """Once per recording: a forward of the model returned without running any of its modules' hooks (its
        children's, those holding the recorded layers') or recording a layer, as code dynamo compiled before the
        hooks existed does (a torch.compile wrapper of the uncompiled model reusing it: compiled.compiled_forwards).
        It left no call, and the calls of the model's earlier forwards were read as its own, silently (QA
        helper-186)."""
        compiled = _reused_compiled_code(self.model)
        if not compiled or self._warned_unseen:
            return
        self._warned_unseen = True
        name = type(self.model).__name__
        warnings.warn(f"vitmad.record: a forward of {name} ran without calling any hook vitmad added to its modules, "
                      f"so it is not recorded{compiled}. rec.calls holds only the forwards that were recorded, and "
                      "rec.mad, rec.layers, rec.per_layer read the last of them, not this forward", stacklevel=2)

    def _remove(self) -> None:
        # Before the starts are forgotten: the empty call of a tower run whose layers never came (the last frame
        # encoded, a forward_features that raised) is no entry after the block either.
        self._drop_interrupted()
        self._drop_unfinished()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._registration is not None:
            self._registration.remove()
            self._registration = None
        for hooks in self._hooks:
            hooks.remove()
        self._pending.clear()
        self._trailing = {}
        self._owner.reset()
        self._starters.clear()
        self._started.clear()
        self._vacant = None
        if self._eager:
            self._eager = False
            EagerWhileRecording.leave()
        if self._registered:
            self._registered = False
            _RECORDING.discard(id(self.model))

    def __exit__(self, *exc_info) -> None:
        self._remove()


@dataclass
class _Outermost:
    """An outermost forward of a module holding recorded layers, outside the model's own call (forward_features,
    a block called by timm's forward_intermediates or a user's loop): what the calls held before it, so that what
    it added is taken back if it does not end (Recording._take_back)."""

    count: int  # len(calls)
    call: RecordedCall | None  # the latest call then
    kept: int  # its layers then
    kept_class: int  # its class-attention layers then
    handled: BaseException | None  # the exception being handled when it began (a retry inside `except`)
    scope: nn.Module
    module_call: ModuleCall | None  # the scope's forward (whether a KeyboardInterrupt ended it)
    caller: tuple | None  # (thread, (id, code)) of the frame that called it, as Recording._starters holds


def record(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    patch: int | None = None,
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    renormalize: bool = False,
    reduction: str = "mean",
    positions: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    stats: Sequence[str] | str | None = ("mad",),
    spacing: float | Sequence[float] | None = None,
) -> Recording:
    """Records the mean attention distance of every attention layer while ``model`` runs unchanged.

    Example::

        with vitmad.record(model) as rec:
            model(pixel_values)
        rec.mad     # [L, B, H] float32 (float64 for a float64 model), pixels
        rec.layers  # ["layers.0.attention", ...] for transformers 5's ViTModel: the model's own module names

    Works with transformers ``PreTrainedModel``s that use ``AttentionInterface`` (ViT, DeiT, BEiT, DINOv2 with
    and without registers, ViTMAE at any ``mask_ratio``, CLIP and SigLIP vision towers, ...) in any attention
    implementation, and with timm ViTs on the fused path (``vit_*`` with registers or ``dynamic_img_size``,
    ``deit_*``, EVA with RoPE). The model keeps its attention implementation, so its outputs are the same as
    without recording; it is restored on exit, also when the forward raises.

    Args:
        model: the model, called inside the ``with`` block as usual (any entry point).
        layers: qualified names or wildcard patterns of the attention modules to record; by default every
            self-attention layer of the tower that owns the patch embedding. For models neither transformers
            nor timm, the names of the modules that call ``F.scaled_dot_product_attention``. A module named
            exactly (no wildcard) that runs without computing attention is named in ``rec.skipped``, with a warning.
            A layer outside the tower that embeds the image (a language model's) is skipped with the reason unless
            ``num_prefix_tokens`` or ``positions`` states its layout.
        patch: pixel size of a patch; by default the patch-embedding convolution's kernel size. Also the side of the
            square patches of Pix2Struct's and Kosmos-2.5's vision towers (their image processor's ``patch_size``),
            which have no convolution: by default 16 for a ``patch_projection`` of 768 inputs, else required.
        grid: ``[grid_h, grid_w]``; by default the patch embedding's output size in each call.
        num_prefix_tokens: tokens before the patches; by default ``N - grid_h * grid_w`` in each call (for a model
            of no library vitmad reads, a warning says once that they are taken to come first).
        renormalize: see :func:`vitmad.mad`.
        reduction: ``"mean"`` gives ``rec.mad`` ``[L, B, H]``, ``"none"`` ``[L, B, H, N - P]``.
        positions: for a model whose token layout vitmad does not know, where its tokens are: ``[N, 2]`` (every
            image) or ``[B, N, 2]`` (per image) floating (row, column) pixel positions of the ``N`` tokens in the
            model's token order (``[N, 3]`` / ``[B, N, 3]``: (slice, row, column) voxels of a volume), a NaN row
            for a token without a position; or a callable of no arguments returning one, called once per forward
            call. It replaces the detected layout of every recorded layer, whose
            attention must then be ``[B, H, N, N]``; ``reduction="none"`` gives ``[B, H, N]`` in token order, NaN
            at the tokens without a position, and the mean is over the tokens with one. Not combined with
            ``patch``, ``grid``, ``num_prefix_tokens``.
        stats: what to record besides MAD, in the same op call per layer (``docs/definition.md``, "Beside the
            distance"): ``"entropy"`` (of each query's attention row, nats), ``"prefix_mass"`` (the attention on
            the tokens without a position: CLS, registers, the "attention sink"), ``"self_mass"`` (on the query's
            own token; NaN in layers whose keys are not the queries, such as pooled keys), ``"prefix_maps"`` (the
            CLS and register rows over the positioned tokens: ``rec.prefix_maps``; and the class token's rows of
            class attention, which has no MAD: ``rec.class_attention_maps``); ``"all"`` for every one. A
            list, a comma list or one name, as :func:`vitmad.profile` takes them; None or ``("mad",)``: MAD only.
            Read them with ``rec.stats`` (``{name: [L, B, H]}``, MAD included) or ``rec.calls[i].stat(name)``. MAD
            is always recorded; a differential-attention layer (``A1 - lambda * A2``, not a probability
            distribution) records MAD alone, NaN for the other statistics and no maps.
        spacing: the size of one input pixel (voxel) in a physical unit, to measure distances in that unit
            (millimetres of a scan, micrometres of a micrograph) instead of pixels: one number for every axis, or
            ``(row, column)``, or ``(slice, row, column)`` for a volume model. Every layer's positions are scaled
            by it, axis by axis (``positions=`` given by hand too, which are then in input pixels); the other
            statistics, ``rec.geometry`` (pixels) and a video's ``rec.temporal_mad`` (frames) are unchanged. A
            layer whose tokens lie on another number of axes than given is refused. Kept as ``rec.spacing``.

    Returns:
        A :class:`Recording`: ``rec.mad`` / ``rec.layers`` / ``rec.layout`` of the latest forward call and
        ``rec.calls``, a :class:`RecordedCall` per forward call made in the block.

    Raises:
        ValueError: an option is invalid, or the layout cannot be detected: the message names the model class
            and what to pass by hand.
        TypeError: ``positions`` is neither a floating tensor nor a callable.
        RuntimeError: on entering the block, the model is already being recorded (here or in another thread);
            inside it, a forward of the model (or of a recorded layer) from one thread while another thread is
            inside one (a recorded model runs in one thread at a time; :mod:`.forward_owner`).
    """
    return Recording(
        model, layers=layers, patch=patch, grid=grid, num_prefix_tokens=num_prefix_tokens,
        renormalize=renormalize, reduction=reduction, positions=positions, stats=stats, spacing=spacing,
    )
