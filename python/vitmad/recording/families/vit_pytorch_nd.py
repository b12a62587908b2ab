"""lucidrains' vit-pytorch (``vit_pytorch``): the N-D, video and token-reducing variants of the plain ViT.

Each design's sequence, as its ``forward`` builds it (tokens placed in pixels of the input, voxels along a third axis):

- ``vit_nd.ViTND``, ``vit_nd_pope.ViTND``, ``vit_nd_rotary.ViTND`` and ``levjepa_nd.NDTransformer`` (also as
  ``LeVJEPAND``'s encoder): one einops ``Rearrange`` cuts the input ``[B, C, *sides]`` into patches row-major over its
  ``ndim`` axes (axis 0 slowest; ``-> b (f g ...) ...`` or ``-> b f g ... ...``, flattened). ``ViTND`` of ``vit_nd``
  and ``NDTransformer`` put one class token first (``ViTND`` always, whatever ``pool``), the PoPE and rotary ``ViTND``
  none. With ``ndim=2`` the tokens are an image's grid; with ``ndim=3`` a volume's (``LayerGeometry.depth``: MAD is the
  distance over all three axes, in voxels, as for MONAI's 3-D ViTs). Other ``ndim`` are refused: vitmad places tokens
  on two or three axes. Their causal masks (``ViTND(causal_dims=...)``; ``NDTransformer``'s ``causal_dims``, ``(0,)``
  by default) are refused: MAD is defined for bidirectional attention. These models compute their attention with
  torch's ``flex_attention`` where ``vit_nd_masking.flex_attention_supported`` says the compiled kernel exists (CUDA,
  an x86 CPU with AVX2 unless ``ATEN_CPU_CAPABILITY=default``; ``NDTransformer`` wherever its block mask builds),
  recorded from the q and k it is handed (:mod:`..flex_call`), and elsewhere with their dense fallback
  (``scores.softmax``), recorded as it is; a forward whose attention vitmad saw in neither (``flex_attention`` compiled
  into the model's code) is refused.
- ``levjepa.VideoTransformer`` built with ``block_causal=False``: its class token, then each frame's patches
  (``b c f (h p1) (w p2) -> b (f h w) ...``: frames of one frame each, row-major), attended through ``flex_attention``
  with no mask, as the video models' joint attention (:class:`.video.VideoPlacer`). Block-causal across frames (its
  default) is refused, as causal attention is; so is a training forward that drops tokens (``drop_ratio``), whose
  sequence is then not the whole video.
- ``simple_flash_attn_vit_3d.SimpleViT``: tubelets in (frame, row, column) order, no class token, as
  ``simple_vit_3d`` (:class:`.video.VideoPlacer`); its ``F.scaled_dot_product_attention`` is read where it is called.
- ``vivit_with_moss.ViViT``: its spatial transformer as ViViT's factorized encoder (per tubelet frame, a class token
  first unless ``pool='mean'``); its temporal transformer over one token per frame (causal by default) is skipped.
- ``vit_with_patch_merger.ViT``: the patches alone (no class token) up to and including layer
  ``transformer.patch_merge_layer_index``; its ``PatchMerger`` then replaces them by ``patch_merge_num_tokens``
  learned queries' pooled tokens, which stand for no cell: the layers after it are skipped.
- ``efficient.ViT`` and ``distill.DistillableEfficientViT``: the class token, then the row-major patches (the
  distillation token last in a call given ``distill_token``), handed to the user's ``transformer``: its
  ``nn.MultiheadAttention`` layers (``nn.TransformerEncoder``) are placed there when they take ``batch_first`` tokens
  (a sequence-first layer would attend across the batch); any other attention in it is refused.

- ``mpp.MPP``: the transformer it holds (a DeepViT, or any model with a ``[1, 1, D]`` class token) is run by MPP's own
  forward over the class token, then every patch of MPP's ``patch_size`` cut, row-major: masked patches are the mask
  token, replaced ones another patch's pixels, each at its own cell.

- ``ats_vit.ViT`` (adaptive token sampling): layer 0 over the class token, then every patch (row-major); each layer
  that samples returns ``sampled_token_ids`` (per image, the slots of its sequence the next layer keeps: the class
  token first, the sampled tokens sorted, then padding rows where another image kept more, masked out of the next
  layer's attention), by which ``Transformer.forward`` gathers the tokens. The tokens of layer ``l`` are read in each
  call by composing the ids the layers before it returned: each at the cell of the patch it started as, per image
  (folded onto the grid with the patches an image dropped absent); the class token and the padding rows (the
  ``mask`` the layer is given) without a position.

- ``cct_3d.CCT``: its ``Tokenizer``'s ``Conv3d`` and ``MaxPool3d`` layers make a ``[B, C, F, H, W]`` map, flattened
  ``b (f h w) c``: tubelets in (frame, row, column) order, read per call from that map, each at the centre of its
  stride cell in pixels and frames (the strides' product along each axis), as the video models' joint attention
  (:class:`.video.VideoPlacer`); no class token (CCT pools the sequence after its encoder).

Refused with the reason (:data:`_REFUSED`): ``levjepa``'s attention outside a ``VideoTransformer``, the nested-tensor
NaViTs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, RefusingPlacer, select_tokens
from .embeddings import check_cut_from_input, check_sequence
from .monai import _grid_positions
from .video import GridSource, VideoPlacer, _Grid
from .vit_pytorch import (
    _cut_of,
    _design,
    _ImagePlacer,
    _install_cut,
    _key,
    _path,
    _subset_placement,
    _VideoCut,
    _VivitPlacer,
)

__all__ = ["placer", "call_start"]

_ND = {("vit_nd", "ViTND"): 1, ("vit_nd_pope", "ViTND"): 0, ("vit_nd_rotary", "ViTND"): 0,
       ("levjepa_nd", "NDTransformer"): 1}  # -> class tokens before the patches
_UNSEEN = ("computed its attention where vitmad did not see it: neither a call of torch's flex_attention from Python "
           "(vit_pytorch's path on CUDA and x86 CPUs with AVX2) nor its dense fallback's softmax (flex_attention "
           "compiled into the model's code, or replaced by another function); record the uncompiled model, or pass "
           "positions=...")
_NESTED = ("NaViT with nested tensors attends over a jagged torch.nested tensor (one sequence per image); vitmad "
           "measures dense [B, H, N, N] attention calls only (vit_pytorch.na_vit.NaViT, which packs images into padded "
           "rows, is placed)")
_MERGED = ("attention over the tokens of vit_with_patch_merger's PatchMerger: learned queries' pools of the patches, "
           "which stand for no cell of the image")
# Attention classes refused wherever they are, with the reason.
_REFUSED = {
    ("levjepa", "Attention"): "it is an Attention of vit_pytorch.levjepa outside a VideoTransformer, whose forward "
                              "builds its tokens; record the VideoTransformer, or pass positions=...",
    ("na_vit_nested_tensor", "Attention"): _NESTED,
    ("na_vit_nested_tensor_3d", "Attention"): _NESTED,
}
_MOSS_FRAMES = ("attention over one token per video frame (ViViT with MOSS's temporal transformer, over each frame's "
                "class token or mean): no token has a position on the image")


class _NDCut:
    """Reads in each call the ``[B, C, *sides]`` an N-D design's ``Rearrange`` cuts, and its patch sides."""

    def __init__(self, owner: nn.Module, rearrange: nn.Module, ndim: int):
        self.owner, self.rearrange, self.ndim = owner, rearrange, ndim
        self.patch = tuple(int(rearrange.axes_lengths[f"p{i}"]) for i in range(ndim))

    def install(self, context: CallContext) -> list:
        def see(module, args) -> None:
            pixels = args[0] if args else None
            if isinstance(pixels, torch.Tensor) and pixels.dim() == 2 + self.ndim:
                context.values[_key(self.rearrange)] = (int(pixels.shape[0]), tuple(int(s) for s in pixels.shape[2:]))
            else:
                context.values.pop(_key(self.rearrange), None)

        return [self.rearrange.register_forward_pre_hook(see)]


class _LevjepaFrames(GridSource):
    """The ``embedding`` of a :class:`.video.VideoPlacer` for LeVJEPA's ``VideoTransformer``: the hook that reads each
    call's grid from the video its ``Rearrange`` cuts per frame (``b c f (h p1) (w p2) -> b (f h w) ...``: one frame
    per tubelet)."""

    def __init__(self, rearrange: nn.Module):
        self.rearrange = rearrange
        self.patch = (int(rearrange.axes_lengths["p1"]), int(rearrange.axes_lengths["p2"]))

    def install(self, context: CallContext) -> list:
        def see(module, args) -> None:
            video = args[0] if args else None
            if isinstance(video, torch.Tensor) and video.dim() == 5:
                grid = (int(video.shape[3]) // self.patch[0], int(video.shape[4]) // self.patch[1])
                context.values[self.key] = _Grid(int(video.shape[0]), int(video.shape[2]), grid,
                                              (float(self.patch[0]), float(self.patch[1])), 1)
            else:
                context.values.pop(self.key, None)

        return [self.rearrange.register_forward_pre_hook(see)]


def _levjepa_placer(model: nn.Module, video_transformer: nn.Module):
    what = "VideoTransformer of vit_pytorch.levjepa"
    if video_transformer.block_causal:
        return RefusingPlacer(f"{what} masks its attention block-causally across frames (block_causal=True): MAD is "
                              "defined for a vision transformer's bidirectional attention (build it with "
                              "block_causal=False)")
    rearrange = video_transformer.to_patch_embedding[0]
    pattern = "".join(str(getattr(rearrange, "pattern", "")).split())
    if type(rearrange).__name__ != "Rearrange" or pattern != "bcf(hp1)(wp2)->b(fhw)(cp1p2)":
        return RefusingPlacer(f"{what} cuts its video with {pattern or type(rearrange).__name__!r}; vitmad places "
                              "frames cut as b c f (h p1) (w p2) -> b (f h w) (c p1 p2)")
    # A training forward given drop_ratio keeps a random subset of the tokens: the placer's count check refuses it.
    return VideoPlacer(model, _LevjepaFrames(rearrange), "space-time", prefix=1)


class _NDPlacer(LayerPlacer):
    """A layer of an N-D design over 2 or 3 axes: ``prefix`` class tokens, then the grid row-major."""

    def __init__(self, what: str, cut: _NDCut, prefix: int):
        self.what, self.cut, self.prefix = what, cut, prefix

    def install(self, context: CallContext) -> list:
        return self.cut.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        found = context.values.get(_key(self.cut.rearrange))
        if found is None:
            raise NotPlaceable(f"{self.what}'s patch cut (to_patch_embedding's Rearrange) did not run on a "
                               f"[B, C, {', '.join('S' * self.cut.ndim)}] input in this call before it attended, so "
                               "its grid is unknown; run the model on its input")
        batch, sides = found
        grid = tuple(s // p for s, p in zip(sides, self.cut.patch))
        tokens = self.prefix + math.prod(grid)
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; after "
                f"{self.what} cut {batch} input(s) of {'x'.join(map(str, sides))} into "
                f"{'x'.join(map(str, grid))} patches, it attends [{batch}, H, {tokens}, {tokens}]"
                + (" (the class token first)" if self.prefix else "")
            )
        stride = tuple(float(p) for p in self.cut.patch)
        positions, index = _grid_positions(grid, stride, self.prefix)
        attention = "global, class token first" if self.prefix else "global"
        geometry = LayerGeometry.of_grid(grid, stride, attention, int(lead[1]), self.prefix)
        return Placement(positions, None, select_tokens(index), geometry)

    def refusal_without_attention(self, module: nn.Module) -> str | None:
        return f"{self.what} {_UNSEEN}"


def _nd_placer(owner: nn.Module, design: tuple[str, str]):
    what = f"{design[1]} of vit_pytorch.{design[0]}"
    ndim = int(owner.ndim)
    if ndim not in (2, 3):
        return RefusingPlacer(f"{what} has ndim={ndim}: vitmad places tokens on 2 axes (an image) or 3 (a volume), "
                              "so the positions of its patches are not known; pass positions=<[N, K] position of "
                              "each token>")
    causal = (owner.causal_mask_fn is not None) if design[0] != "levjepa_nd" else bool(owner.causal_dims)
    if causal:
        return RefusingPlacer(f"{what} masks its attention causally along axes "
                              f"{list(getattr(owner, 'causal_dims', ()) or [])}: MAD is defined for a vision "
                              "transformer's bidirectional attention (build it without causal_dims)")
    rearrange = owner.to_patch_embedding[0]
    names = "fghijkl"[:ndim]
    left = "bc" + "".join(f"({d}p{i})" for i, d in enumerate(names))
    pattern = "".join(str(getattr(rearrange, "pattern", "")).split())
    if type(rearrange).__name__ != "Rearrange" or not pattern.startswith(f"{left}->b") \
            or not pattern[len(left) + 3:].replace("(", "").replace(")", "").startswith(names):
        return RefusingPlacer(f"{what} cuts its input with {pattern or type(rearrange).__name__!r}; vitmad places "
                              f"patches cut as {left}->b({names})..., row-major over the axes")
    return _NDPlacer(what, _NDCut(owner, rearrange, ndim), _ND[design])


def _merged(owner: nn.Module, module: nn.Module) -> bool:
    """Whether ``module`` (a layer of ``vit_with_patch_merger``'s transformer) runs after its PatchMerger, which its
    forward applies after layer ``patch_merge_layer_index`` (never where that index is out of range)."""
    transformer = owner.transformer
    merge = int(transformer.patch_merge_layer_index)
    index = next(i for i, (attention, _) in enumerate(transformer.layers) if attention is module)
    return 0 <= merge < index


class _MppPlacer(LayerPlacer):
    """A layer of the transformer ``MPP`` runs itself: the class token, then every patch of the image ``MPP`` cut
    (``patch_size``, row-major): a masked patch is the mask token, a replaced one another patch's pixels, each at its
    own cell (with its cell's position embedding)."""

    def __init__(self, mpp: nn.Module):
        self.mpp = mpp

    def install(self, context: CallContext) -> list:
        def see(module, args) -> None:
            pixels = args[0] if args else None
            context.values[_key(self.mpp)] = (int(pixels.shape[0]), tuple(int(s) for s in pixels.shape[-2:])) \
                if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 else None

        def forget(module, args, output) -> None:
            context.values.pop(_key(self.mpp), None)

        return [self.mpp.register_forward_pre_hook(see), self.mpp.register_forward_hook(forget, always_call=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        found = context.values.get(_key(self.mpp))
        if found is None:
            raise NotPlaceable("its transformer ran outside MPP's forward on a [B, C, H, W] image in this call, so "
                               "the patches it was given are unknown; record the MPP, or pass positions=...")
        batch, size = found
        patch = int(self.mpp.patch_size)
        grid = (size[0] // patch, size[1] // patch)
        tokens = 1 + grid[0] * grid[1]
        check_sequence(lead, num_queries, num_keys, batch, tokens,
                       f"MPP cut {batch} image(s) of {size[0]}x{size[1]} into {grid[0]}x{grid[1]} patches after a "
                       "class token")
        stride = (float(patch), float(patch))
        positions, index = _grid_positions(grid, stride, 1)
        geometry = LayerGeometry(grid, stride, "global: every patch (masked ones as the mask token at their cells)",
                                 int(lead[1]), 1)
        return Placement(positions, None, select_tokens(index), geometry)


class _AtsPlacer(LayerPlacer):
    """A layer of ``ats_vit.ViT``: the tokens its ``Transformer`` hands it in this call. Layer 0 takes the class token,
    then every patch of the image's cut (row-major); an ``Attention`` that samples returns ``sampled_token_ids``, per
    image the slots of its own sequence that the next layer keeps (slot 0, the class token, first; the sampled tokens
    sorted; padding rows, index 0 again, after them), and ``Transformer.forward`` gathers the tokens (and their
    original indices) by them. So the tokens of layer ``l`` are read by composing the ids the layers before it
    returned in this call, and its ``mask`` (its keyword argument) tells the padding rows: a token stands at the cell
    of the patch it started as, the class token and the padding rows without a position.

    Args:
        vit: the ``ats_vit.ViT``.
        attention: this layer's ``Attention``.
    """

    def __init__(self, vit: nn.Module, attention: nn.Module):
        self.vit, self.attention = vit, attention
        self.rearrange = vit.to_patch_embedding[0]
        layers = [a for a, _ in vit.transformer.layers]
        self.before = layers[:next(i for i, a in enumerate(layers) if a is attention)]

    def install(self, context: CallContext) -> list:
        transformer = self.vit.transformer

        def start(module, args) -> None:
            x = args[0] if args else None
            context.values[_key(transformer, "ats")] = tuple(x.shape[:2]) if isinstance(x, torch.Tensor) else None
            for layer in self.before:
                context.values.pop(_key(layer, "ats"), None)

        def sampled(module, args, kwargs, output) -> None:
            context.values[_key(module, "ats")] = (output[2],) if isinstance(output, tuple) and len(output) == 3 \
                else None

        def masked(module, args, kwargs) -> None:
            context.values[_key(module, "ats.mask")] = kwargs.get("mask")

        return [_install_cut(context, self.rearrange, video=False), transformer.register_forward_pre_hook(start),
                self.attention.register_forward_pre_hook(masked, with_kwargs=True),
                *(layer.register_forward_hook(sampled, with_kwargs=True) for layer in self.before)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cut = context.values.get(_key(self.rearrange))
        start = context.values.get(_key(self.vit.transformer, "ats"))
        if cut is None or start is None:
            raise NotPlaceable("the ViT with adaptive token sampling did not cut an image and run its transformer on "
                               "its tokens in this call before this layer attended, so its tokens are unknown; run the "
                               "ViT on images")
        check_cut_from_input(context, "its patch cut", *cut.size, "ViT", "the class token and the padding rows")
        patches = cut.grid[0] * cut.grid[1]
        if start != (cut.batch, 1 + patches):
            raise NotPlaceable(f"its transformer took {start[1]} tokens of {start[0]} image(s); the ViT cut "
                               f"{cut.batch} image(s) into {patches} patches after its class token")
        ids = torch.arange(1 + patches).expand(cut.batch, -1)  # each slot's token of layer 0 (0: the class token)
        for index, layer in enumerate(self.before):
            returned = context.values.get(_key(layer, "ats"))
            if returned is None:
                raise NotPlaceable(f"layer {index} of its transformer did not return (out, mask, sampled_token_ids) "
                                   "before this layer attended, so which tokens this layer keeps is unknown")
            chosen = returned[0]
            if chosen is not None:
                chosen = chosen.detach().cpu()
                if chosen.dim() != 2 or chosen.shape[0] != cut.batch or bool((chosen >= ids.shape[1]).any()):
                    raise NotPlaceable(f"layer {index} returned sampled_token_ids of shape {list(chosen.shape)}, not "
                                       f"[{cut.batch}, K] slots of its {ids.shape[1]} tokens")
                ids = ids.gather(1, chosen)
        mask = context.values.get(_key(self.attention, "ats.mask"))
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            raise NotPlaceable(f"its mask is {list(mask.shape) if isinstance(mask, torch.Tensor) else mask}, not one "
                               f"flag per slot of the {list(ids.shape)} tokens the layers before it kept")
        check_sequence(lead, num_queries, num_keys, cut.batch, ids.shape[1],
                       "the class token and the patches the layers before it kept, per image padded to the longest")
        cells = torch.where(mask.cpu() & (ids > 0), ids - 1, -1)[:, 1:]
        stride = (float(cut.patch[0]), float(cut.patch[1]))
        attention = "global" if not self.before else "global over the patches each image kept (adaptive sampling)"
        return _subset_placement(cells, cut.grid, stride, int(lead[1]), attention, 1)


class _CctTubelets(GridSource):
    """The ``embedding`` of a :class:`.video.VideoPlacer` for CCT on video: the hook that reads each call's tubelet grid
    from the output ``[B, C, F, H, W]`` of its tokenizer's convolutions and max pools (flattened ``b (f h w) c``).
    Each axis's stride is the product of those modules' strides along it: every token at the centre of its stride
    cell, in pixels and frames (docs/definition.md, "Beyond one grid"), whatever their kernels and paddings.

    Args:
        cct: the ``cct_3d.CCT``.
        strided: its tokenizer's ``Conv3d`` and ``MaxPool3d`` modules.
    """

    def __init__(self, cct: nn.Module, strided: list[nn.Module]):
        self.cct, self.layers = cct, cct.tokenizer.conv_layers
        self.stride = [1, 1, 1]  # frames, rows, columns
        for module in strided:
            step = module.stride if isinstance(module.stride, tuple) else (module.stride,) * 3
            self.stride = [s * int(t) for s, t in zip(self.stride, step)]

    def install(self, context: CallContext) -> list:
        def see(module, args, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 5:
                frames, rows, cols = (int(n) for n in output.shape[2:])
                context.values[self.key] = _Grid(int(output.shape[0]), frames, (rows, cols),
                                              (float(self.stride[1]), float(self.stride[2])), self.stride[0])
            else:
                context.values.pop(self.key, None)

        return [self.layers.register_forward_hook(see)]


def _cct_3d_placer(model: nn.Module, cct: nn.Module):
    what = "CCT of vit_pytorch.cct_3d"
    layers = cct.tokenizer.conv_layers
    strided = [m for m in layers.modules() if hasattr(m, "stride")]
    others = sorted({type(m).__name__ for m in strided if not isinstance(m, (nn.Conv3d, nn.MaxPool3d))})
    if others:
        return RefusingPlacer(f"{what} has strided modules {others} in its tokenizer; vitmad places the tubelets of "
                              "Conv3d and MaxPool3d layers; pass positions=...")
    # Sequence pooling (seq_pool, always with CCT's own classifier) pools after the encoder: no class token.
    prefix = 0 if cct.classifier.seq_pool else 1
    return VideoPlacer(model, _CctTubelets(cct, strided), "space-time", prefix=prefix)


def _owner(path: list[nn.Module], designs) -> tuple[nn.Module | None, tuple[str, str] | None]:
    """The innermost module on ``path`` (the attention excluded) of one of ``designs``, and its design."""
    for module in reversed(path[:-1]):
        design = _design(module)
        if design in designs:
            return module, design
    return None, None


def call_start(model: nn.Module, recorded=()) -> nn.Module | None:
    """The outermost ViViT with MOSS in ``model`` (itself included) holding ``recorded`` modules, or None: a forward
    call starts at its forward. Its first convolutions (MOSS's) run after its spatial transformer, which a call
    started there would drop."""
    inside = {id(m) for m in recorded}
    holding = [m for m in named_module_list(model) if _design(m[1]) == _MOSS
               and any(id(s) in inside for s in m[1].modules())]
    return min(holding, key=lambda m: m[0].count("."))[1] if holding else None


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    own = _design(module)
    if own == _ATS:
        vit, _ = _owner(_path(model, name), {_ATS_VIT})
        if vit is None or _cut_of(vit)[1] != "bc(hp1)(wp2)->b(hw)(p1p2c)":
            return RefusingPlacer("it is an Attention of vit_pytorch.ats_vit outside an ats_vit.ViT that cuts its "
                                  "image as b c (h p1) (w p2) -> b (h w) (p1 p2 c), whose forward builds its tokens; "
                                  "record the ViT, or pass positions=...")
        return _AtsPlacer(vit, module)
    if own == _CCT_3D:
        cct, _ = _owner(_path(model, name), {_CCT_3D_MODEL})
        if cct is None:
            return RefusingPlacer("it is an Attention of vit_pytorch.cct_3d outside its CCT, whose tokenizer makes its "
                                  "tubelets; record the CCT, or pass positions=...")
        return _cct_3d_placer(model, cct)
    if own == _LEVJEPA:
        video_transformer, _ = _owner(_path(model, name), {_LEVJEPA_VIDEO})
        if video_transformer is not None:
            return _levjepa_placer(model, video_transformer)
    if own in _REFUSED:
        return RefusingPlacer(_REFUSED[own])
    if own is None and not isinstance(module, nn.MultiheadAttention):
        return None
    path = _path(model, name)
    mpp, _ = _owner(path, {_MPP})
    if mpp is not None and own is not None:
        return _MppPlacer(mpp)
    owner, design = _owner(path, _DESIGNS)
    if owner is None:
        return None
    if isinstance(module, nn.MultiheadAttention):
        if design != _EFFICIENT:
            return None
        if not module.batch_first:
            return RefusingPlacer("ViT of vit_pytorch.efficient hands its [B, N, D] tokens to a sequence-first "
                                  "nn.MultiheadAttention (batch_first=False), which then attends across the batch: "
                                  "vitmad does not place that; build its encoder layers with batch_first=True")
        return _ImagePlacer(model, owner, "ViT (efficient)", _cut_of(owner)[0])
    if design in _ND:
        return _nd_placer(owner, design)
    if design == _MERGER:
        return Skip(_MERGED) if _merged(owner, module) else _ImagePlacer(model, owner, "ViT with patch merger",
                                                                         _cut_of(owner)[0])
    rearrange, pattern = _cut_of(owner)
    if design == _MOSS:
        if any(m is module for m in owner.temporal_transformer.modules()):
            return Skip(_MOSS_FRAMES)
        if pattern != "bc(fpf)(hp1)(wp2)->bf(hw)(pfp1p2c)":
            return RefusingPlacer(f"ViViT of vit_pytorch.vivit_with_moss cuts its video with {pattern!r}, not the "
                                  "cut vitmad knows")
        return _VivitPlacer(model, owner, rearrange, "space")
    if pattern != "bc(fpf)(hp1)(wp2)->bfhw(pfp1p2c)":  # simple_flash_attn_vit_3d
        return RefusingPlacer(f"SimpleViT of vit_pytorch.simple_flash_attn_vit_3d cuts its video with {pattern!r}, "
                              "not the cut vitmad knows")
    return VideoPlacer(model, _VideoCut(rearrange), "space-time")


_ATS, _ATS_VIT = ("ats_vit", "Attention"), ("ats_vit", "ViT")
_CCT_3D, _CCT_3D_MODEL = ("cct_3d", "Attention"), ("cct_3d", "CCT")
_EFFICIENT = ("efficient", "ViT")
_LEVJEPA, _LEVJEPA_VIDEO = ("levjepa", "Attention"), ("levjepa", "VideoTransformer")
_MERGER = ("vit_with_patch_merger", "ViT")
_MOSS = ("vivit_with_moss", "ViViT")
_MPP = ("mpp", "MPP")
_DESIGNS = {*_ND, _EFFICIENT, _MERGER, _MOSS, ("simple_flash_attn_vit_3d", "SimpleViT")}
