"""lucidrains' vit-pytorch: the 2-D image designs whose sequence or attention differs from the plain ones of
:mod:`.vit_pytorch`, which finds their attention modules and dispatches to this module (:func:`placer`,
:func:`unowned_placer`, :func:`extra_tokens`).

Each sequence is read from the model's own ``forward`` (vit-pytorch 1.26.14):

- tokens without a position around the row-major patch grid: ``vit_5.ViT`` its class token, then its
  ``num_registers`` register tokens (``cat((cls, registers, x))``); ``vat.ViT`` its register tokens, then its class
  token (``pack((registers, cls, x))``); ``simple_vit_with_hyper_connections.SimpleViT`` and
  ``simple_uvit.SimpleUViT`` the patches, then the register tokens (``pack([x, r])``); ``jumbo_vit.JumboViT`` its
  ``num_jumbo_cls * jumbo_cls_k`` jumbo class tokens first; ``vit_detpool.ViTDetPool`` its class token first where
  ``use_cls_token`` (its object mask masks keys: they keep their cells, with the mass the model gives them, zero);
  ``simple_vit_with_fft.SimpleViT`` the ``freq_patch_size`` patches of the image's 2-D Fourier transform first
  (``pack((f, x))``): frequency cells, no place on the image, so no position, like class tokens;
- ``learnable_memory_vit.ViT`` run by its ``Adapter``: the adapter's memory class token, the class token, the
  patches; the keys are those, then the layer's ``num_memories_per_layer`` learned memories (keys only, no
  position: their mass drops out of MAD as a class token's does). Several ``Adapter`` s sharing one ViT (one per
  task on a frozen backbone): each run placed by the adapter whose forward began last (its own memory count), or as
  the ViT's own sequence where its own forward did;
- ``mp3.ViT`` run by ``MP3``: cross attention of every patch (row-major, no position embedding: it is what MP3
  learns to predict) over the patches each image kept, drawn inside MP3's forward and found per call as exact copies
  of the rows they were gathered from (as MAE's);
- ``rvt.RvT``: the class token, then the patches; batch and heads merged, ``[(B heads), N, N]``;
- ``jet_vit.JetViT``: full attention (``FA``) over the patches, window attention (``WA``) within the
  ``window_size`` blocks of the patch grid (windows row-major, batched with the images), its linear attention
  (``LA``) skipped: no softmax, no map;
- ``simple_vit_attn_residual.SimpleViTAttnResidual``: each block's attention over the patches; its attention
  residuals (each token's query over its own outputs of the earlier layers: over depth, not tokens) skipped;
- ``xcit.XCiT``: its cross-covariance attention (XCA) skipped: the softmax runs over channels, not tokens (its local
  patch interaction is a convolution); its class-attention layers skipped as CaiT's, their maps recorded with
  ``stats=[..., 'prefix_maps']`` (keys: the class token, then the patches);
- ``VAT``: its ViT's layers as above, over each view and frame the ViT runs on; its own layers skipped (its action,
  register and extra tokens have no place on the image);
- ``AcceptVideoWrapper``: its image model runs (``forward_function='forward'``, called as a method, so no hook of
  the model runs) on every frame of the video, frames merged into the batch: placed as that model's own forward,
  one image per (video, frame), video-major.

The others have the plain sequences of :mod:`.vit_pytorch`: ``simple_flash_attn_vit``,
``attn_residual_with_dca_simple_vit`` and ``mp3.ViT`` run alone: the patches alone (normalized_vit's nViT too, its
patches cut channel-first); ``vit_with_decorr``, ``parallel_vit`` (each branch), ``learnable_memory_vit.ViT`` run
alone, ``vit_with_keel_post_ln`` and ``looped_vit.LoopedViT`` (``ndim=2``; its looped blocks recorded once per loop,
each run an entry of its own): the class token, then the patches.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..module_index import module_list
from ..placement import CallContext, LayerGeometry, NotPlaceable, Placement, cell_centres, read_only, select_tokens
from .vit_pytorch import (
    _CaitKeys,
    _Cut,
    _design,
    _grid_layout,
    _ImagePlacer,
    _install_ran,
    _kept_cells,
    _key,
)
from .vit_pytorch_stages import _MergedHeads
from .windows import block_partition, window_placement

__all__ = ["placer", "unowned_placer", "extra_tokens"]

_CHANNELS = ("cross-covariance attention (vit_pytorch's XCiT, XCA): its softmax runs over channels, a [d, d] map "
             "per head, not over tokens, so no token attends to another (its local patch interaction mixes tokens "
             "by convolution)")
_XCIT_CLASS = ("class attention: only the class token queries the patches (vit_pytorch's XCiT); its attention over "
               "the patches is recorded with stats=[..., 'prefix_maps'] (rec.class_attention_maps)")
_DEPTH = ("attention over depth (simple_vit_attn_residual's AttentionResidual): each token's query over its own "
          "outputs of the earlier layers, not over other tokens")
_LINEAR = ("JetViT's linear attention (ReLU feature maps, no softmax) beside a dynamic convolution: it makes no "
           "attention map")
_VAT_CROSS = ("cross attention of VAT's action, register and extra tokens (learned, no position on the image) over "
              "its ViT's hidden tokens of each view and frame")
_VAT_SELF = "self-attention among VAT's action, register and extra tokens: none has a position on the image"


def _registers(owner: nn.Module) -> int:
    tokens = getattr(owner, "register_tokens", None)
    return 0 if tokens is None else int(tokens.shape[0])


def extra_tokens(owner: nn.Module, cut: _Cut) -> tuple[int, int] | None:
    """The tokens without a position before and after the patches of a design of this module whose forward builds
    them its own way, over the pixels of ``cut``; None for the other designs."""
    design = _design(owner)
    if design == ("vit_5", "ViT"):
        return 1 + _registers(owner), 0  # cat((cls, registers, x))
    if design == ("vat", "ViT"):
        return _registers(owner) + 1, 0  # pack((registers, cls, x)); its cls_token is one [D] vector
    if design in {("simple_vit_with_hyper_connections", "SimpleViT"), ("simple_uvit", "SimpleUViT")}:
        return 0, _registers(owner)  # pack([x, r])
    if design == ("jumbo_vit", "JumboViT"):
        return int(owner.jumbo_cls_token.shape[0]) * int(owner.jumbo_cls_to_tokens.axes_lengths["k"]), 0
    if design == ("vit_detpool", "ViTDetPool"):
        return int(owner.use_cls_token), 0
    if design == ("simple_vit_with_fft", "SimpleViT"):
        # pack((f, x)): the cells of the image's Fourier transform, cut from an array of the image's own size.
        lengths = owner.to_freq_embedding[0].axes_lengths
        return (cut.size[0] // int(lengths["p1"])) * (cut.size[1] // int(lengths["p2"])), 0
    return None


def placer(model: nn.Module, path: list[nn.Module], module: nn.Module, owner: nn.Module, what: str,
           rearrange: nn.Module):
    """The placer or :class:`~.Skip` of attention ``module`` of the image design ``owner`` (on ``path``), where this
    module places it otherwise than the plain layout; None where the plain layout does."""
    from . import ClassQueries, Skip

    design, kind = _design(owner), type(module).__name__
    if design == ("xcit", "XCiT"):
        if any(m is module for m in owner.cls_transformer.modules()):
            keys = _ImagePlacer(model, owner, what, rearrange)
            return ClassQueries(_XCIT_CLASS, _CaitKeys(keys), "the class token and XCiT's patch grid")
        return Skip(_CHANNELS)
    if design == ("simple_vit_attn_residual", "SimpleViTAttnResidual") \
            and type(path[-2]).__name__ == "AttentionResidual" and getattr(path[-2], "attn", None) is module:
        return Skip(_DEPTH)
    if design == ("jet_vit", "JetViT") and kind == "JetViTLinearAttention":
        return Skip(_LINEAR)
    if design == ("jet_vit", "JetViT") and kind == "WindowAttention":
        return _JetWindows(model, owner, what, rearrange, module)
    if design == ("rvt", "RvT"):
        return _MergedHeads(_ImagePlacer(model, owner, what, rearrange), module.heads)
    at = next((index for index, m in enumerate(path) if m is owner), 0)  # not on the path: MAE's decoder
    holder = path[at - 1] if at else None
    if design == ("learnable_memory_vit", "ViT"):
        # Every Adapter running this ViT, not only the one holding it in module order: several tasks' Adapters share
        # one frozen ViT (the design's purpose), each with its own memories, and module order lists the ViT under
        # the first alone.
        adapters = [m for m in module_list(model)
                    if _design(m) == ("learnable_memory_vit", "Adapter") and getattr(m, "vit", None) is owner]
        if adapters:
            return _AdapterPlacer(model, owner, what, rearrange, adapters)
    if design == ("mp3", "ViT") and _design(holder) == ("mp3", "MP3"):
        return _Mp3Placer(model, owner, what, rearrange, holder)
    if _design(holder) == ("accept_video_wrapper", "AcceptVideoWrapper") and holder.image_net is owner:
        return _FramesPlacer(model, owner, what, rearrange, holder)
    return None


def unowned_placer(path: list[nn.Module], module: nn.Module):
    """The :class:`~.Skip` of an attention module outside every image design that a model of this module runs
    (VAT's own layers); None for the others."""
    from . import Skip

    vat = next((m for m in reversed(path[:-1]) if _design(m) == ("vat", "VAT")), None)
    if vat is not None and not any(m is module for m in vat.vit.modules()):
        return Skip(_VAT_CROSS if module.cross_attend else _VAT_SELF)
    return None


@functools.lru_cache(maxsize=64)
def _memory_layout(grid: tuple[int, int], stride: tuple[float, float], prefix: int, memories: int):
    """The Adapter's keys: the queries' positions (``prefix`` rows without one, then the grid), then ``memories``
    rows without a position."""
    positions, _ = _grid_layout(grid, stride, prefix, 0)
    return read_only(torch.cat([positions, torch.full((memories, 2), float("nan"))]), positions=1)[0]


class _AdapterPlacer(_ImagePlacer):
    """``learnable_memory_vit.ViT``'s layers: its own forward's sequence, or, run by one of its ``Adapter`` s, that
    adapter's memory class token, the class token and the patches, the keys followed by the layer's learned memories
    (as many as that adapter has).

    Args:
        model: the recorded model.
        owner: the ViT.
        what: its name in messages.
        rearrange: its patch cut.
        adapters: every ``Adapter`` of ``model`` whose ``vit`` is ``owner``: which one runs it is read per run (the
            latest forward begun, of the ViT's or of an adapter's).
    """

    def __init__(self, model: nn.Module, owner: nn.Module, what: str, rearrange: nn.Module,
                 adapters: list[nn.Module]):
        super().__init__(model, owner, what, rearrange)
        self.adapters = adapters
        self.running_key = _key(owner, "adapter")

    def install(self, context: CallContext) -> list:
        def running(adapter: nn.Module | None, module, args, kwargs=None) -> None:
            context.values[self.running_key] = adapter

        # The Adapter calls its ViT's img_to_tokens and transformer, not its forward: the forward begun last, the
        # ViT's own (None) or an adapter's, is the one whose tokens its transformer gets.
        handles = [a.register_forward_pre_hook(functools.partial(running, a)) for a in self.adapters]
        handles.append(self.owner.register_forward_pre_hook(functools.partial(running, None)))
        return super().install(context) + handles

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        adapter = context.values.get(self.running_key)
        if adapter is None:
            return super().place(context, lead, num_queries, num_keys)
        cut = self.cut(context)
        grid, stride = cut.grid, (float(cut.patch[0]), float(cut.patch[1]))
        memories, tokens = int(adapter.memories_per_layer.shape[1]), 2 + grid[0] * grid[1]
        if len(lead) != 2 or int(lead[0]) != cut.batch or num_queries != tokens or num_keys != tokens + memories:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; run by an "
                f"Adapter with {memories} memories per layer on {cut.batch} image(s) of {grid[0]}x{grid[1]} patches, "
                f"it attends [{cut.batch}, H, {tokens}, {tokens + memories}]: the memory class token, the class token "
                f"and the patches, over those and {memories} learned memories"
            )
        positions, index = _grid_layout(grid, stride, 2, 0)
        geometry = LayerGeometry(grid, stride, f"global, and {memories} learned memory keys (Adapter)",
                                 int(lead[-1]), 2)
        return Placement(positions, _memory_layout(grid, stride, 2, memories), select_tokens(index), geometry)


class _Mp3Placer(_ImagePlacer):
    """``mp3.ViT``'s layers: its own forward's patches, or, run by ``MP3``, every patch over the patches each image
    kept (its transformer's ``context``)."""

    def __init__(self, model: nn.Module, owner: nn.Module, what: str, rearrange: nn.Module, mp3: nn.Module):
        super().__init__(model, owner, what, rearrange)
        self.mp3 = mp3

    def install(self, context: CallContext) -> list:
        return super().install(context) + [_install_ran(context, self.mp3),
                                           _install_ran(context, self.owner.transformer, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        ran = context.values.get(_key(self.owner.transformer, "ran"))
        if _key(self.owner, "ran") in context.values or _key(self.mp3, "ran") not in context.values or ran is None:
            return super().place(context, lead, num_queries, num_keys)
        args, kwargs = ran
        kept = args[1] if len(args) > 1 else kwargs.get("context")
        if kept is None:
            raise NotPlaceable("MP3 ran its ViT's transformer without the patches it kept (no context), so its keys "
                               "are unknown")
        cut = self.cut(context)
        grid, stride = cut.grid, (float(cut.patch[0]), float(cut.patch[1]))
        cells = _kept_cells(context, args[0], kept, "MP3")
        if len(lead) != 2 or int(lead[0]) != cut.batch or num_queries != grid[0] * grid[1] \
                or num_keys != cells.shape[1]:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; MP3 attends "
                f"from the {grid[0]}x{grid[1]} patches of {cut.batch} image(s) over the {cells.shape[1]} each kept"
            )
        positions, index = _grid_layout(grid, stride, 0, 0)
        keys = cell_centres(*grid, stride).reshape(-1, 2)[cells].unsqueeze(1)  # [B, 1, K, 2]
        geometry = LayerGeometry(grid, stride, "every patch over the patches each image kept (MP3)", int(lead[-1]), 0)
        return Placement(positions, keys, select_tokens(index), geometry)


class _FramesPlacer(_ImagePlacer):
    """An image design run by ``AcceptVideoWrapper`` on the frames of a video: the wrapper calls the model's
    ``forward`` as a method, so the model's own hook never runs; the wrapper's says it ran, with the
    ``forward_kwargs`` it passes."""

    def __init__(self, model: nn.Module, owner: nn.Module, what: str, rearrange: nn.Module, wrapper: nn.Module):
        super().__init__(model, owner, what, rearrange)
        self.video_wrapper = wrapper

    def install(self, context: CallContext) -> list:
        wrapper, owner = self.video_wrapper, self.owner

        def see(module, args, kwargs) -> None:
            if wrapper.forward_function == "forward" and wrapper.image_net is owner:
                given = kwargs.get("forward_kwargs", args[2] if len(args) > 2 else {})
                context.values[_key(owner, "ran")] = ((), dict(given))

        return super().install(context) + [wrapper.register_forward_pre_hook(see, with_kwargs=True)]


class _JetWindows(_ImagePlacer):
    """JetViT's window attention: ``window_size`` blocks of the patch grid, row-major, batched with the images
    (``[B * windows, H, w * w, w * w]``)."""

    def __init__(self, model: nn.Module, owner: nn.Module, what: str, rearrange: nn.Module, module: nn.Module):
        super().__init__(model, owner, what, rearrange)
        self.module = module

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cut = self.cut(context)
        if _key(self.owner, "ran") not in context.values:
            raise NotPlaceable(f"its transformer ran outside {self.what}'s forward in this call, so vitmad does not "
                               "know which tokens it was given")
        grid, window = cut.grid, int(self.module.window_size)
        windows = (grid[0] // window) * (grid[1] // window)
        if grid[0] % window or grid[1] % window or len(lead) != 2 or int(lead[0]) != cut.batch * windows:
            raise NotPlaceable(
                f"its attention has leading dims {list(lead)}; JetViT's {window}x{window} windows over {cut.batch} "
                f"image(s) of {grid[0]}x{grid[1]} patches give [{cut.batch} * {windows}, heads]"
            )
        return window_placement(block_partition(grid, (window, window)), grid,
                                (float(cut.patch[0]), float(cut.patch[1])), lead, num_queries, num_keys,
                                order="windows in batch", attention=f"window {window}x{window}")
