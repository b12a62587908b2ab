"""Project MONAI (``monai.networks``, 1.6): ViT, UNETR, ViTAutoEnc, MaskedAutoEncoderViT and SwinUNETR's Swin
transformer, on images (``spatial_dims=2``, input ``[B, C, H, W]``) and on volumes (``spatial_dims=3``, input
``[B, C, D, H, W]``).

ViT (``monai.networks.nets.vit``; also UNETR's ``vit`` and ViTAutoEnc): ``PatchEmbeddingBlock`` cuts the input into
patches either with a convolution of kernel = stride = the patch (``proj_type="conv"``: floors a side the patch does
not divide) and flattens its map row-major, or with einops' ``Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)")``
and a ``Linear`` (``"perceptron"``: the sides must divide), row-major over the spatial axes in their order as well.
ViT then puts its class token first when it was built with ``classification=True`` (``forward`` tests
``hasattr(self, "cls_token")``); ViTAutoEnc has none. Its position embeddings (learned, sin-cos, Fourier, none) are
added to each token and move none. Every ``SABlock`` attends over ``[class token][the grid]`` with its own softmax
(``att_mat.softmax(dim=-1)``). A pre-hook on the patch embedding reads each call's input, so any size the model
accepts is placed as cut (the position table fixes the patch count only: sides swapped also run). UNETR reshapes
the outputs of blocks 3, 6 and 9 (from 0) and the normed last onto the same grid row-major (``proj_feat``), so what
it reads is what is placed.

Swin (``SwinTransformer`` in ``monai.networks.nets.swin_unetr``, SwinUNETR's ``swinViT``): ``PatchEmbed`` pads the
input at the end of each axis to whole patches; each ``BasicLayer`` (a stage) runs its blocks on the map
``[B, *spatial, C]``, then a 2 x 2 (x 2) ``PatchMerging`` (an odd side padded by one first). Each
``SwinTransformerBlock`` clamps its window to the map along an axis the map does not exceed and drops the shift
there (``get_window_size``), pads the map at the end of each axis to whole windows, rolls the padded map by
``-shift`` and cuts it into windows row-major, each window's tokens row-major (``window_partition``): the attention
is ``[B * nW, heads, N, N]``, images outermost. A token keeps the cell it stands for (the roll undone); a padding
slot is a key at its cell of the padded map and no query, as torchvision's Swin (``docs/definition.md``, windows).
The window and shift are read from the block and the map from its input in each call; the map is checked against
the input through the patch embedding and the mergings before the block.

Positions are cell centres in pixels of the input (voxels for a volume): ``(i + 0.5) * stride`` along each axis,
the stride being the patch (times 2 per merging). A volume's tokens are placed in all three axes (``[..., N, 3]``
positions, ``(slice, row, column)``), so its MAD is the Euclidean distance over them; its layers fold onto
``depth x grid_h x grid_w`` (``LayerGeometry.depth``).

MaskedAutoEncoderViT (``monai.networks.nets.masked_autoencoder_vit``): the same patch embedding, then ``_masking``
draws, in each forward, the patches each input keeps (``torch.multinomial`` without replacement: ``selected_indices``
``[B, K]``, in the order drawn) and gathers them; the encoder's blocks attend over ``[class token][the kept patches in
that order]``, the decoder's over ``[class token][every patch, row-major]`` (mask tokens at the cells not kept).
``_masking`` hands its draw to no module: a wrapper of the class's ``_masking`` (:class:`.method_watch.MethodWatch`),
for the recording only, reads the ``selected_indices`` it returned in each call (nothing is drawn again), and each
kept patch is placed at the centre of its cell; the encoder's values fold onto the whole grid with the cells an input
did not keep absent (``Placement.present``), so a layer's MAD is the mean over the kept patches.

The diffusion UNets' and autoencoders' attention over their feature maps: :mod:`.monai_spatial`. Refused by name:
any other use of MONAI's attention blocks (``SABlock``, ``CrossAttentionBlock``, ``WindowAttention`` outside those
models: the generative transformers), whose tokens are not a patch grid vitmad knows. (Restormer's attention runs over
channels, which vitmad does not take for attention; MONAI's NaViT: :mod:`.monai_spatial`.)
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    read_only,
    select_tokens,
)
from .method_watch import MethodWatch
from .stages import innermost_on_path
from .swin import merged_length
from .windows import window_placement

__all__ = ["placer", "call_start", "MonaiViTPlacer", "MonaiMaskedEncoderPlacer", "MonaiSwinPlacer"]

_VIT_MODELS = (("monai.networks.nets.vit", "ViT"), ("monai.networks.nets.vitautoenc", "ViTAutoEnc"))
_MASKED = ("monai.networks.nets.masked_autoencoder_vit", "MaskedAutoEncoderViT")
_SWIN = ("monai.networks.nets.swin_unetr", "SwinTransformer")
_SWIN_BLOCK = ("monai.networks.nets.swin_unetr", "SwinTransformerBlock")
_MERGING = ("monai.networks.nets.swin_unetr", "PatchMergingV2")  # PatchMerging is its subclass
_ATTENTION = {("monai.networks.blocks.selfattention", "SABlock"),
              ("monai.networks.blocks.crossattention", "CrossAttentionBlock"),
              ("monai.networks.nets.swin_unetr", "WindowAttention")}
_CUT = "monai.cut."  # + the patch embedding's owner: (batch, spatial sides) of the input it cut
_MAP = "monai.map."  # + a Swin block's name: (batch, spatial sides) of the map it received
_KEPT = "monai.kept."  # + a MaskedAutoEncoderViT's name: the selected_indices its _masking returned in this call


def _is(module: nn.Module, where: tuple[str, str]) -> bool:
    cls = type(module)
    return (cls.__module__, cls.__name__) == where


def _is_vit(module: nn.Module) -> bool:
    return any(_is(module, where) for where in _VIT_MODELS)


def call_start(model: nn.Module, recorded=()) -> nn.Module | None:
    """The patch embedding of the MONAI ViT or Swin transformer in ``model`` whose input is the image or volume: a
    forward call starts there. UNETR's first convolution in module order runs on the input only after its ViT (and a
    perceptron embedding has none), so the first convolution is no call boundary. Of several such towers, the one
    holding the ``recorded`` modules (the first in module order where none does): a wrapper's other tower may run
    before or after it, and its embedding split the calls where it ran (QA helper-153).

    Raises:
        ValueError: ``recorded`` modules in two of them: which runs first in a forward is not known, so neither
            embedding marks where a call starts.
    """
    towers = []
    for name, module in named_module_list(model):
        if _is_vit(module) or _is(module, _MASKED):
            towers.append((name, module, module.patch_embedding))
        elif _is(module, _SWIN):
            towers.append((name, module, module.patch_embed))
    if not towers:
        return None
    inside = {id(m) for m in recorded}
    holding = [(name, start) for name, tower, start in towers if any(id(m) in inside for m in tower.modules())]
    if len(holding) > 1:
        shown = ", ".join(name or type(model).__name__ for name, _ in holding)
        raise ValueError(f"vitmad.record: the layers recorded lie in {len(holding)} MONAI towers of "
                         f"{type(model).__name__} ({shown}), each starting a forward call at its own patch "
                         "embedding, and which runs first is not known; record each tower in its own vitmad.record "
                         "(both may be active around one forward)")
    return (holding or [(None, towers[0][2])])[0][1]


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of a MONAI attention module: a ViT's ``SABlock``, a Swin block's ``WindowAttention``, a
    :class:`RefusingPlacer` for any other; None for a module not defined in MONAI."""
    cls = type(module)
    if (cls.__module__, cls.__name__) not in _ATTENTION:
        return None
    owner = name.rpartition(".")[0]
    if cls.__name__ == "SABlock":
        vit = innermost_on_path(model, name, _is_vit)
        if vit is not None and owner.rpartition(".")[0] == (f"{vit[0]}." if vit[0] else "") + "blocks":
            return MonaiViTPlacer(model, *vit)
        masked = innermost_on_path(model, name, lambda m: _is(m, _MASKED))
        if masked is not None:
            blocks = owner.rpartition(".")[0]
            where = f"{masked[0]}." if masked[0] else ""
            if blocks == where + "blocks":
                return MonaiMaskedEncoderPlacer(model, *masked)
            if blocks == where + "decoder_blocks":
                return MonaiViTPlacer(model, *masked, "global over every patch (mask tokens at the cells not kept), "
                                                      "class token first (MAE decoder)")
            return RefusingPlacer(
                f"it is an SABlock of MONAI's MaskedAutoEncoderViT ({masked[0] or 'the model'}) outside its blocks "
                "and decoder_blocks, whose tokens vitmad does not know"
            )
    if cls.__name__ == "WindowAttention":
        block = model.get_submodule(owner) if owner else None
        swin = innermost_on_path(model, name, lambda m: _is(m, _SWIN))
        if block is not None and _is(block, _SWIN_BLOCK) and swin is not None:
            return _swin_placer(model, *swin, owner, block)
    holder = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
    return RefusingPlacer(
        f"MONAI's {cls.__name__} in a {holder}: vitmad places MONAI's attention in ViT, UNETR, ViTAutoEnc, "
        "MaskedAutoEncoderViT, SwinUNETR's SwinTransformer, and the feature maps of DiffusionModelUNet, ControlNet, "
        "SPADEDiffusionModelUNet, AutoencoderKL and SPADEAutoencoderKL only (those classes themselves: a subclass's "
        "forward may cut, mask or order its tokens otherwise), and does not know where this one's tokens are; pass "
        "positions=<[N, 2] (or [N, 3] for a volume) pixel position of each token, NaN rows for tokens off the "
        "image> if they are the same in every forward"
    )


@functools.lru_cache(maxsize=64)
def _grid_positions(grid: tuple[int, ...], stride: tuple[float, ...], prefix: int) -> tuple[torch.Tensor, ...]:
    """``[prefix + prod(grid), K]`` cell centres, row-major over the grid's ``K`` axes, after ``prefix`` NaN rows;
    and the grid tokens' indices. Read-only: cached per layout."""
    axes = [(torch.arange(n, dtype=torch.float64) + 0.5) * s for n, s in zip(grid, stride)]
    cells = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid)).float()
    positions = torch.cat([torch.full((prefix, len(grid)), float("nan")), cells])
    return read_only(positions, torch.arange(prefix, prefix + cells.shape[0]), positions=1)


def _sides(sides: tuple[int, ...]) -> str:
    return "x".join(map(str, sides))


class MonaiViTPlacer(LayerPlacer):
    """Places the tokens of one ``SABlock`` of a MONAI ViT (or ViTAutoEnc): its class token, if it has one, then the
    grid its patch embedding cut in this call, row-major over the input's 2 or 3 spatial axes.

    Args:
        model: the recorded model (for messages).
        vit_name: qualified name of the ViT (or of the MaskedAutoEncoderViT whose decoder the block is).
        vit: that module.
        attention: what the block attends over, in words, for the geometry; by default a ViT's global attention.
    """

    def __init__(self, model: nn.Module, vit_name: str, vit: nn.Module, attention: str | None = None):
        self.model, self.vit_name, self.vit, self.attention = model, vit_name, vit, attention
        self.embedding = vit.patch_embedding
        self.key = _CUT + vit_name
        self.where = f"{vit_name + '.' if vit_name else ''}patch_embedding"

    def install(self, context: CallContext) -> list:
        def see(module, args, kwargs) -> None:
            pixels = args[0] if args else kwargs.get("x")
            if isinstance(pixels, torch.Tensor) and pixels.dim() in (4, 5):
                context.values[self.key] = (int(pixels.shape[0]), tuple(int(s) for s in pixels.shape[2:]))
            else:
                context.values.pop(self.key, None)  # a call the module itself refuses: nothing of it to place

        def forget(module, args, output) -> None:
            # The grid is known only while the ViT runs: its blocks called on their own are refused.
            context.values.pop(self.key, None)

        return [self.embedding.register_forward_pre_hook(see, with_kwargs=True),
                self.vit.register_forward_hook(forget, always_call=True)]

    def _patch(self, dims: int) -> tuple[int, ...]:
        """The patch's sides, read from the embedding the way it cuts: the convolution's kernel (= its stride), or
        the ``Rearrange`` pattern MONAI builds for a perceptron embedding."""
        cut = self.embedding.patch_embeddings
        if self.embedding.proj_type == "conv":
            kernel, stride = tuple(cut.kernel_size), tuple(cut.stride)
            if kernel != stride or any(cut.padding) or any(d != 1 for d in cut.dilation) or len(kernel) != dims:
                raise NotPlaceable(
                    f"{self.where} convolves kernel {kernel}, stride {stride}, padding {cut.padding}, dilation "
                    f"{cut.dilation} over {dims} spatial axes; MONAI's patch embedding is kernel = stride, unpadded, "
                    "over the input's axes, and vitmad places that one only"
                )
            return kernel
        rearrange = cut[0]
        names = (("h", "p1"), ("w", "p2"), ("d", "p3"))[:dims]
        expected = (f"b c {' '.join(f'({a} {p})' for a, p in names)} -> b ({' '.join(a for a, _ in names)}) "
                    f"({' '.join(p for _, p in names)} c)")
        if getattr(rearrange, "pattern", None) != expected:
            raise NotPlaceable(
                f"{self.where} rearranges {getattr(rearrange, 'pattern', type(rearrange).__name__)!r}; vitmad places "
                f"MONAI's perceptron patches {expected!r} (row-major over the input's axes) only"
            )
        return tuple(int(rearrange.axes_lengths[p]) for _, p in names)

    def _cut(self, context: CallContext) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """``(batch, input sides, patch, grid)`` of what the patch embedding cut in this call."""
        cut = context.values.get(self.key)
        if cut is None:
            raise NotPlaceable(
                f"MONAI's patch embedding ({self.where}) did not run on a [B, C, H, W] or [B, C, D, H, W] input in "
                "this call before it attended (its blocks called on hidden states?), so the grid of its tokens is "
                "unknown; run the ViT on the image"
            )
        batch, sides = cut
        patch = self._patch(len(sides))
        # The convolution floors; Rearrange needs whole patches.
        return batch, sides, patch, tuple(n // p for n, p in zip(sides, patch))

    def _check(self, lead: torch.Size, num_queries: int, num_keys: int, tokens: int, cut: tuple,
               described: str) -> None:
        batch, sides, patch, grid = cut
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; after "
                f"{self.where} cut {batch} inputs of {_sides(sides)} into {_sides(grid)} patches of {_sides(patch)}, "
                f"a block of this {type(self.vit).__name__} attends [{batch}, H, {tokens}, {tokens}]{described}"
            )

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cut = self._cut(context)
        _, _, patch, grid = cut
        prefix = 1 if hasattr(self.vit, "cls_token") else 0  # as ViT.forward decides
        self._check(lead, num_queries, num_keys, prefix + math.prod(grid), cut,
                    " (the class token, then the patches)" if prefix else "")
        stride = tuple(float(p) for p in patch)
        positions, index = _grid_positions(grid, stride, prefix)
        attention = self.attention or ("global, class token first" if prefix else "global")
        geometry = LayerGeometry.of_grid(grid, stride, attention, int(lead[1]), prefix)
        return Placement(positions, None, select_tokens(index), geometry)


class MonaiMaskedEncoderPlacer(MonaiViTPlacer):
    """Places the tokens of one ``SABlock`` of the encoder of MONAI's ``MaskedAutoEncoderViT``: its class token, then
    the patches its ``_masking`` kept in this call, in the order drawn, each at the centre of its cell; the values
    fold onto the whole grid with the cells not kept absent.

    Args:
        model: the recorded model (for messages).
        vit_name: qualified name of the MaskedAutoEncoderViT.
        vit: that module.
    """

    def install(self, context: CallContext) -> list:
        key = _KEPT + self.vit_name

        def clear(module, args) -> None:
            context.values.pop(key, None)  # a call whose _masking does not run must not see an earlier draw

        def report(module, output) -> None:
            context.values[key] = output[1]  # (x_masked, selected_indices [B, K], mask)

        return [*super().install(context), self.vit.register_forward_pre_hook(clear),
                MethodWatch(self.vit, "_masking", report)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cut = self._cut(context)
        batch, _, patch, grid = cut
        kept = context.values.get(_KEPT + self.vit_name)
        what = f"MONAI's MaskedAutoEncoderViT ({self.vit_name or 'the model'})"
        if kept is None:
            raise NotPlaceable(
                f"the _masking of its class did not run in this forward of {what} before its encoder attended (its "
                "forward replaced, or _masking set on the instance?), so which patches the encoder keeps is not "
                "known; run the class's own forward and _masking, or pass positions=<[B, 1 + K, 2] pixel position of "
                "each token, a NaN row for the class token>"
            )
        if not isinstance(kept, torch.Tensor) or kept.dim() != 2 or int(kept.shape[0]) != batch:
            shown = list(kept.shape) if isinstance(kept, torch.Tensor) else type(kept).__name__
            raise NotPlaceable(f"the _masking of {what} returned selected_indices {shown} in this call, not the "
                               f"[{batch}, K] patches each input kept, so where its encoder's tokens are is not known")
        self._check(lead, num_queries, num_keys, 1 + int(kept.shape[1]), cut,
                    f" (the class token, then the {int(kept.shape[1])} patches _masking kept)")
        stride = tuple(float(p) for p in patch)
        shared = context.values.get(_KEPT + "placement." + self.vit_name)
        if shared is not None and shared[0] is kept and shared[1] == tuple(lead):
            return shared[2]  # the encoder's layers of one call share its draw
        placement = _kept_placement(kept.detach().cpu(), grid, stride, int(lead[1]))
        context.values[_KEPT + "placement." + self.vit_name] = (kept, tuple(lead), placement)
        return placement


def _kept_placement(kept: torch.Tensor, grid: tuple[int, ...], stride: tuple[float, ...], heads: int) -> Placement:
    """The class token without a position, then token ``j`` of input ``b`` at cell ``kept[b, j]`` of the row-major
    grid; folded onto the whole grid with the cells an input did not keep absent."""
    batch, count = kept.shape
    cells, _ = _grid_positions(grid, stride, 0)
    total = cells.shape[0]
    present = torch.zeros(batch, total, dtype=torch.bool).scatter_(1, kept, True)
    if bool((present.sum(-1) != count).any()):
        raise NotPlaceable("_masking kept a patch twice for one input; vitmad places each cell once")
    positions = torch.cat([cells.new_full((batch, 1, cells.shape[1]), float("nan")), cells[kept]], dim=1)

    copies = {}  # the draw on each device, copied once for the layers sharing this placement (a fresh draw per
    # call: no content-keyed cache of on_device's to fill)

    def fold(values: torch.Tensor) -> torch.Tensor:
        # values [B, H, 1 + K] -> [B, H, N]: kept token j of input b goes to cell kept[b, j].
        device = values.device
        if device not in copies:
            copies[device] = kept.to(device)
        index = copies[device].unsqueeze(1).expand(values.shape[0], values.shape[1], count)
        return values.new_full((*values.shape[:2], total), float("nan")).scatter(-1, index, values[..., 1:])

    geometry = LayerGeometry.of_grid(grid, stride, "global over the patches _masking kept, class token first (MAE "
                                     "encoder)", heads, 1)
    return Placement(positions.unsqueeze(1), None, fold, geometry, present=present)


def _swin_placer(model: nn.Module, swin_name: str, swin: nn.Module, block_name: str, block: nn.Module):
    """A :class:`MonaiSwinPlacer` for the block ``block_name`` of the Swin transformer ``swin_name``, with the
    mergings of the stages before it; a refusal where one of them is a downsampling vitmad does not know."""
    stages = (swin.layers1, swin.layers2, swin.layers3, swin.layers4)[:swin.num_layers]
    for index, stage in enumerate(stages):
        layer = stage[0]
        if any(b is block for b in getattr(layer, "blocks", ())):
            return MonaiSwinPlacer(model, swin_name, swin, block_name, block, index)
        if not any(_is_class(cls, _MERGING) for cls in type(layer.downsample).__mro__):
            return RefusingPlacer(
                f"stage {index + 1} of MONAI's SwinTransformer ({swin_name or 'the model'}) downsamples with "
                f"{type(layer.downsample).__name__}, not MONAI's PatchMerging / PatchMergingV2, so the pixel stride "
                "of the later stages is unknown"
            )
    return RefusingPlacer(f"it is in no stage of MONAI's SwinTransformer ({swin_name or 'the model'})")


def _is_class(cls: type, where: tuple[str, str]) -> bool:
    return (cls.__module__, cls.__name__) == where


@functools.lru_cache(maxsize=64)
def _swin_cells(size: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]) -> torch.Tensor:
    """``[nW, N, K]`` the cell of the padded map under each slot of each window, when the map ``size`` is padded at
    the end of each axis to whole windows, rolled by ``-shift`` and cut into windows (row-major over windows, each
    window's slots row-major); cells past ``size`` are padding."""
    axes = len(size)
    padded = [math.ceil(n / w) * w for n, w in zip(size, window)]
    cells = torch.stack(torch.meshgrid(*(torch.arange(n) for n in padded), indexing="ij"), dim=-1)
    if any(shift):
        cells = torch.roll(cells, shifts=tuple(-s for s in shift), dims=tuple(range(axes)))
    split = [d for n, w in zip(padded, window) for d in (n // w, w)]
    order = [*range(0, 2 * axes, 2), *range(1, 2 * axes, 2), 2 * axes]
    return cells.view(*split, axes).permute(order).reshape(-1, math.prod(window), axes)


class MonaiSwinPlacer(LayerPlacer):
    """Places the tokens of one MONAI ``SwinTransformerBlock``'s window attention (``[B * nW, heads, N, N]``).

    Args:
        model: the recorded model (for messages).
        swin_name: qualified name of the ``SwinTransformer``.
        swin: that module; its ``patch_embed`` sees the input of each call.
        block_name: qualified name of the block.
        block: the block; its ``window_size`` and ``shift_size`` are read in each call.
        merges: the patch mergings before the block's stage.
    """

    def __init__(self, model: nn.Module, swin_name: str, swin: nn.Module, block_name: str, block: nn.Module,
                 merges: int):
        self.model, self.swin_name, self.swin = model, swin_name, swin
        self.block_name, self.block, self.merges = block_name, block, merges
        self.input_key, self.map_key = _CUT + swin_name, _MAP + block_name
        self._cached: tuple[tuple, Placement] | None = None

    def install(self, context: CallContext) -> list:
        def see_input(module, args) -> None:
            x = args[0] if args else None
            context.values[self.input_key] = (tuple(int(s) for s in x.shape[2:])
                                              if isinstance(x, torch.Tensor) and x.dim() in (4, 5) else None)

        def see_map(module, args) -> None:
            x = args[0] if args else None
            context.values[self.map_key] = ((int(x.shape[0]), tuple(int(s) for s in x.shape[1:-1]))
                                            if isinstance(x, torch.Tensor) and x.dim() in (4, 5) else None)

        def forget(module, args, output) -> None:
            # The block's map is known only while it runs: its attention called on its own is refused.
            context.values.pop(self.map_key, None)

        return [self.swin.patch_embed.register_forward_pre_hook(see_input),
                self.block.register_forward_pre_hook(see_map),
                self.block.register_forward_hook(forget, always_call=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen, image = context.values.get(self.map_key), context.values.get(self.input_key)
        if seen is None or image is None:
            raise NotPlaceable(
                f"it ran outside a forward of its block {self.block_name} (SwinTransformerBlock) on a [B, H, W, C] or "
                f"[B, D, H, W, C] map after {self.swin_name + '.' if self.swin_name else ''}patch_embed saw the input, "
                "so its windows cannot be placed"
            )
        batch, size = seen
        patch = tuple(int(p) for p in self.swin.patch_embed.patch_size)
        # PatchEmbed pads to whole patches, and each merging pads an odd side by one: every side rounds up.
        expected = tuple(merged_length(-(-n // p), self.merges) for n, p in zip(image, patch))
        if size != expected:
            raise NotPlaceable(
                f"its block {self.block_name} sees a map of {_sides(size)} tokens, but an input of {_sides(image)} "
                f"through patches of {_sides(patch)} and {self.merges} patch mergings gives {_sides(expected)}; "
                "vitmad does not know what ran in between"
            )
        # get_window_size: along an axis the map does not exceed, the window is the map and there is no shift.
        window, shift = [], []
        for n, w, s in zip(size, self.block.window_size, self.block.shift_size):
            window.append(n if n <= w else int(w))
            shift.append(0 if n <= w else int(s))
        window, shift = tuple(window), tuple(shift)
        stride = tuple(float(p * 2 ** self.merges) for p in patch)
        windows = math.prod(math.ceil(n / w) for n, w in zip(size, window))
        if len(lead) != 2 or int(lead[0]) != batch * windows:
            raise NotPlaceable(
                f"its attention has leading dims {list(lead)}; its block {self.block_name} cuts {batch} maps of "
                f"{_sides(size)} into {windows} windows of {_sides(window)} each: [{batch * windows}, heads]"
            )
        attention = f"window {_sides(window)}" + (f", shift {_sides(shift)}" if any(shift) else "")
        key = (size, window, shift, stride, tuple(lead), num_queries, num_keys)
        if self._cached is None or self._cached[0] != key:
            placement = window_placement(_swin_cells(size, window, shift), size, stride, lead, num_queries, num_keys,
                                         order="windows in batch", attention=attention)
            self._cached = key, placement
        return self._cached[1]
