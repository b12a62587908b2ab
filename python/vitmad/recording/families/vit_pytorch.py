"""lucidrains' vit-pytorch (``vit_pytorch``): the plain designs, whose image is cut by an einops ``Rearrange``.

Every model here cuts its input with ``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')`` (or ``-> b h w ...``;
video: ``'b c (f pf) (h p1) (w p2) -> b (f h w) ...'``) and projects the patches with a ``Linear``, so there is no
patch-embedding convolution for the plain layout to find; and its ``Attention`` modules compute their softmax through
an ``nn.Softmax`` (``self.attend``), which the generic discovery does not take for attention. This family finds them
(:func:`attention_modules`), reads in each call the shape of the pixels the ``Rearrange`` cuts (a pre-hook), and
places the tokens the way each model's ``forward`` builds its sequence:

- ``vit.ViT``, ``deepvit.DeepViT``, ``vit_for_small_dataset.ViT``: the class token first (``vit.ViT`` with
  ``pool='mean'`` has none: its ``cls_token`` has 0 rows), then the row-major ``h x w`` patches;
  ``distill.DistillableViT`` the same, then its distillation token LAST in a call given ``distill_token``;
- ``simple_vit.SimpleViT`` and its variants with the same sequence (``simple_vit_with_qk_norm``,
  ``simple_vit_with_value_residual``, ``simple_vit_orthog_residual_update``, ``simple_vit_with_patch_dropout``,
  ``simple_vit_with_relative_proj_pos_bias``): the patches alone; ``simple_vit_with_register_tokens``: the patches,
  then the register tokens (``pack([x, r])``); ``simple_vit_with_sparse_gating``: the register tokens, then the
  patches (``pack([r, x])``); ``simple_vit_with_specialized_cls``: one class token, then the patches;
  ``vit_with_patch_dropout.ViT``: the class token, then the patches;
- ``cait.CaiT``: its ``patch_transformer`` over the patches alone; its ``cls_transformer`` is class attention (the
  class token the only query, over the class token then the patches): skipped, its maps recorded with
  ``stats=[..., 'prefix_maps']``;
- ``vit_3d.ViT`` (a class token first) and ``simple_vit_3d.SimpleViT``: tubelets of ``pf`` frames by ``p1 x p2``
  pixels in (frame, row, column) order, placed in space and time (:class:`.video.VideoPlacer`);
- ``vivit.ViViT``: ``factorized_encoder``: the spatial transformer attends within each tubelet frame (a class token
  first, per frame, unless ``pool='mean'``), its temporal transformer over one token per frame is skipped;
  ``factorized_self_attention``: each block's spatial attention as above, its temporal attention over the frames of
  each token (the class tokens' rows without a position); the tubelet frames its ``mask`` pads (``False``) have no
  position, as queries and keys, in both (the model masks them as keys in time only);
- ``simmim.SimMIM``: its encoder's transformer over every patch (mask tokens at their cells, no class token);
  ``mae.MAE``: its encoder over the patches each image kept, its decoder over every patch; the patch-dropout designs
  in training: the patches each image kept (after the class token in ``vit_with_patch_dropout``). The kept patches
  are drawn inside the model's forward and handed to no module: they are read per call by matching the rows the
  model gathered to the rows it gathered them from (exact copies), and refused where a row matches none or several
  (no single cell);
- ``na_vit.NaViT``: images of their own sizes packed in rows (``patch_size`` cells, row-major, one image after the
  other, the rows padded), a block-diagonal mask keeping each image to itself: each image on its own grid, one MAD
  per image; its attention pooling (a learned query per image) skipped; token dropout in training refused;
- ``extractor.Extractor``, ``recorder.Recorder`` and ``distill.DistillWrapper`` hold a model: it is placed as above.

DeepViT's re-attention mixes the heads' softmax outputs and normalises them over the heads (``reattn_norm``), and
CaiT's talking heads mix them after the softmax (``mix_heads_post_attn``): what they apply is no distribution over
the keys, so the MAD is that of each head's own softmax, before the mixing, as for timm's CaiT (docs/definition.md).

Placed by :mod:`.vit_pytorch_variants` (this module finds their attention and dispatches to it): the 2-D designs
whose sequence or attention is their own (ViT-5, VAT, JumboViT, ViTDetPool, the Fourier SimpleViT, the hyper-connection
SimpleViT and SimpleUViT with their registers, the learnable-memory Adapter, MP3, RvT, JetViT, XCiT, the attention-
residual SimpleViT, AcceptVideoWrapper), and those with a plain sequence (flash-attention and DCA SimpleViTs, nViT,
the decorrelation, parallel, learnable-memory, KEEL post-LN and looped ViTs).

Left to ``vit_pytorch_stages``: the hierarchical designs (CrossViT, PiT, LeViT, CvT, Twins, MaxViT, NesT, CCT, T2T,
MobileViT, RegionViT, CrossFormer, ScalableViT, SepViT); to ``vit_pytorch_nd`` (tried before this family): the N-D
ViTs, ``simple_flash_attn_vit_3d``, ViViT with MOSS, the ViT with a patch merger, ``efficient.ViT``, MPP, the ViT with
adaptive token sampling, CCT on video, and the refusals of LeVJEPA and the nested-tensor NaViTs. Any other vit_pytorch
model is refused by name at its first call: its token layout is not known here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import (
    CallContext,
    LayerGeometry,
    LayerPlacer,
    NotPlaceable,
    Placement,
    RefusingPlacer,
    cell_centres,
    on_device,
    read_only,
    select_tokens,
)
from .embeddings import check_cut_from_input
from .plain import _plain_positions
from .video import GridSource, VideoPlacer, _Grid, tubelet_positions

__all__ = ["placer", "attention_modules", "image_cuts", "token_convolutions"]

_LIBRARY = "vit_pytorch."
# The hierarchical designs, placed by families/vit_pytorch_stages.py: never claimed nor refused here.
_STAGED = frozenset({"cross_vit", "pit", "levit", "cvt", "twins_svt", "max_vit", "max_vit_with_registers", "nest",
                     "cct", "cct_3d", "t2t", "mobile_vit", "regionvit", "crossformer", "scalable_vit", "sep_vit"})
# The cuts of the designs below, spaces removed -> whether the input is a video (tokens row-major, frames first).
_CUTS = {
    "bc(hp1)(wp2)->b(hw)(p1p2c)": False,
    "bc(hp1)(wp2)->bhw(p1p2c)": False,
    "bc(fpf)(hp1)(wp2)->b(fhw)(pfp1p2c)": True,
    "bc(fpf)(hp1)(wp2)->bfhw(pfp1p2c)": True,
    "bc(fpf)(hp1)(wp2)->bf(hw)(pfp1p2c)": True,
    "bc(hp1)(wp2)->b(hw)(cp1p2)": False,  # normalized_vit: the same tokens, each patch's pixels channel-first
    "bc(fp0)(gp1)->b(fg)(p0p1c)": False,  # looped_vit with ndim=2: its axes named for any ndim
}
# The axes that hold the patch height and width in a cut whose names are not p1 and p2.
_PATCH_AXES = {"bc(fp0)(gp1)->b(fg)(p0p1c)": ("p0", "p1")}
_SIMPLE = ("simple_vit", "simple_vit_with_qk_norm", "simple_vit_with_value_residual",
           "simple_vit_orthog_residual_update", "simple_vit_with_patch_dropout", "simple_vit_with_register_tokens",
           "simple_vit_with_relative_proj_pos_bias", "simple_vit_with_specialized_cls", "simple_flash_attn_vit",
           "attn_residual_with_dca_simple_vit", "simple_vit_with_hyper_connections", "simple_vit_with_fft")
_SPARSE_GATING = ("simple_vit_with_sparse_gating", "SimpleViTWithSparseGating")
# Models whose forward builds [prefix][row-major grid][suffix] over one image: (module, class) -> in words.
_IMAGE_DESIGNS = {
    ("vit", "ViT"): "ViT",
    ("distill", "DistillableViT"): "DistillableViT",
    ("deepvit", "DeepViT"): "DeepViT",
    ("vit_for_small_dataset", "ViT"): "ViT for small datasets",
    ("vit_with_patch_dropout", "ViT"): "ViT with patch dropout",
    ("cait", "CaiT"): "CaiT",
    **{(module, "SimpleViT"): f"SimpleViT ({module})" for module in _SIMPLE},
    _SPARSE_GATING: "SimpleViTWithSparseGating",
    # Placed by families/vit_pytorch_variants.py where their sequence or attention differs from the above.
    **{(module, "ViT"): f"ViT ({module})" for module in ("vit_with_decorr", "parallel_vit", "learnable_memory_vit",
                                                         "vit_with_keel_post_ln", "vit_5", "mp3", "vat")},
    ("normalized_vit", "nViT"): "nViT",
    ("simple_vit_attn_residual", "SimpleViTAttnResidual"): "SimpleViTAttnResidual",
    ("simple_uvit", "SimpleUViT"): "SimpleUViT",
    ("jumbo_vit", "JumboViT"): "JumboViT",
    ("looped_vit", "LoopedViT"): "LoopedViT",
    ("vit_detpool", "ViTDetPool"): "ViTDetPool",
    ("jet_vit", "JetViT"): "JetViT",
    ("rvt", "RvT"): "RvT",
    ("xcit", "XCiT"): "XCiT",
}
_VIDEO_DESIGNS = {("vit_3d", "ViT"): "3-D ViT", ("simple_vit_3d", "SimpleViT"): "3-D SimpleViT",
                  ("vivit", "ViViT"): "ViViT"}
_WRAPPERS = {("simmim", "SimMIM"), ("mae", "MAE")}
_NAVIT = ("na_vit", "NaViT")
_NAVIT_POOL = ("attention pooling: NaViT's learned query per image, without a position on the image, over that image's "
               "patches")
_CLASS_ATTENTION = ("class attention: only the class token queries the patches (vit_pytorch's CaiT); its attention "
                    "over the patches is recorded with stats=[..., 'prefix_maps'] (rec.class_attention_maps)")
_FRAME_TOKENS = ("attention over one token per video frame (ViViT's temporal transformer, over each frame's class "
                 "token or mean): no token has a position on the image")


def _design(module: nn.Module) -> tuple[str, str] | None:
    """(defining module without the library's prefix, class name) of a vit_pytorch module, else None."""
    cls = type(module)
    if not cls.__module__.startswith(_LIBRARY):
        return None
    return cls.__module__[len(_LIBRARY):], cls.__name__


def _staged(module: nn.Module) -> bool:
    """Whether ``module`` is (or derives from) a class of the hierarchical designs of ``vit_pytorch_stages``."""
    return any(c.__module__.startswith(_LIBRARY) and c.__module__[len(_LIBRARY):] in _STAGED
               for c in type(module).__mro__)


def _is_attention(module: nn.Module) -> bool:
    """A vit_pytorch attention module: named as attention (``Attention``, ``LSA``) with its own query projection."""
    design = _design(module)
    if design is None or not ("Attention" in design[1] or design[1] == "LSA"):
        return False
    return any(isinstance(getattr(module, p, None), nn.Module) for p in ("to_qkv", "to_q", "to_qk", "to_qkv_and_mask"))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """vit_pytorch's attention modules (their ``nn.Softmax`` is no ``softmax(`` in their source), outside the
    hierarchical designs; one inside another is left to the outer one."""
    found = {}
    for name, module in named_module_list(model):
        if _is_attention(module) and not any(name.startswith(outer + ".") for outer in found):
            path = _path(model, name)
            if not any(_staged(m) for m in path):
                found[name] = module
    return found


def image_cuts(model: nn.Module) -> list[nn.Module]:
    """The ``Rearrange`` modules that cut the image (or video) of a plain vit_pytorch design in ``model``, in module
    order: where such a tower takes the image, as another tower's first convolution does (towers.tower_starts)."""
    cuts = []
    for module in module_list(model):
        if _design(module) in _IMAGE_DESIGNS or _design(module) in _VIDEO_DESIGNS:
            rearrange, pattern = _cut_of(module)
            if rearrange is not None and pattern in _CUTS and all(rearrange is not c for c in cuts):
                cuts.append(rearrange)
    return cuts


def token_convolutions(model: nn.Module) -> set[int]:
    """Ids of the convolutions inside the image designs of this family (RvT's query convolution, XCiT's local patch
    interaction): their image is cut by a ``Rearrange``, so these run over tokens, and the recorder starts no call at
    them (the first runs after the cut)."""
    return {id(conv) for owner in module_list(model) if _design(owner) in _IMAGE_DESIGNS
            for conv in owner.modules() if isinstance(conv, (nn.Conv2d, nn.Conv3d))}


def _path(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules from ``model`` down to module ``name``, both included."""
    modules, parts = [model], name.split(".") if name else []
    for depth in range(1, len(parts) + 1):
        modules.append(model.get_submodule(".".join(parts[:depth])))
    return modules


def _cut_of(owner: nn.Module) -> tuple[nn.Module | None, str]:
    """The ``Rearrange`` that cuts ``owner``'s input into patches and its pattern, spaces removed."""
    embedding = getattr(owner, "to_patch_embedding", None)
    embedding = getattr(embedding, "to_patch_tokens", embedding)  # vit_for_small_dataset's SPT
    first = embedding[0] if isinstance(embedding, nn.Sequential) and len(embedding) else None
    if first is None or type(first).__name__ != "Rearrange" or not type(first).__module__.startswith("einops."):
        return None, ""
    return first, "".join(str(first.pattern).split())


@dataclass(frozen=True)
class _Cut:
    """The pixels a ``Rearrange`` cut in this call: the batch and ``(H, W)`` of ``[B, C, (F,) H, W]``, and the patch
    sides."""

    batch: int
    size: tuple[int, int]
    patch: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        return self.size[0] // self.patch[0], self.size[1] // self.patch[1]


def _install_cut(context: CallContext, rearrange: nn.Module, video: bool) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook that puts the shape of the pixels ``rearrange`` cuts into ``context`` (and, for a video, the
    tubelet grid :class:`.video.VideoPlacer` reads, under ``_key(rearrange, "grid")``)."""
    lengths = rearrange.axes_lengths
    rows, cols = _PATCH_AXES.get("".join(str(rearrange.pattern).split()), ("p1", "p2"))
    patch = (int(lengths[rows]), int(lengths[cols]))
    frame_patch = int(lengths["pf"]) if video else None

    def see(module, args) -> None:
        pixels = args[0] if args else None
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != (5 if video else 4):
            context.values.pop(_key(rearrange), None)
            return
        cut = _Cut(int(pixels.shape[0]), (int(pixels.shape[-2]), int(pixels.shape[-1])), patch)
        context.values[_key(rearrange)] = cut
        if video:
            context.values[_key(rearrange, "grid")] = _Grid(cut.batch, int(pixels.shape[2]) // frame_patch, cut.grid,
                                          (float(patch[0]), float(patch[1])), frame_patch)

    return rearrange.register_forward_pre_hook(see)


def _key(module: nn.Module, what: str = "cut") -> str:
    return f"vit_pytorch.{what}.{id(module)}"


def _install_ran(context: CallContext, module: nn.Module, with_kwargs: bool = False):
    """A pre-hook that notes in ``context`` that ``module``'s forward ran in this call (with its arguments)."""

    def see(m, args, kwargs=None) -> None:
        context.values[_key(module, "ran")] = (args, kwargs or {})

    return module.register_forward_pre_hook(see, with_kwargs=with_kwargs)


@functools.lru_cache(maxsize=64)
def _grid_layout(grid: tuple[int, int], stride: tuple[float, float], prefix: int, suffix: int):
    return _plain_positions(grid, stride, prefix, suffix)


def _kept_cells(context: CallContext, full: torch.Tensor, kept: torch.Tensor, what: str) -> torch.Tensor:
    """``[B, K]`` on the host: for each row of ``kept`` ``[B, K, D]``, the index of the row of ``full`` ``[B, N, D]``
    it is an exact copy of (the model gathered it by index), found once per call. Refused where a row matches no row
    or several."""
    known = context.values.get(_key(kept, "cells"))
    if known is not None and known[0] is kept:
        return known[1]
    if kept.dim() != 3 or full.dim() != 3 or kept.shape[0] != full.shape[0] or kept.shape[2] != full.shape[2]:
        raise NotPlaceable(f"{what} gathered rows of shape {list(kept.shape)} from {list(full.shape)}, not a subset "
                           "of each image's patch tokens")
    cells = []
    for image, rows in zip(full.detach(), kept.detach()):
        same = (rows[:, None, :] == image[None, :, :]).all(-1)  # [K, N]
        count = same.sum(-1)
        if bool((count != 1).any()):
            raise NotPlaceable(
                f"{what} keeps a random subset of the patches, drawn inside its forward; vitmad finds each kept "
                "patch by its token, which here matches no patch token or several (equal tokens: a constant image?), "
                "so which cell it came from is not known; pass positions=<[B, N, 2] pixel position of each kept "
                "token> (a patch dropout keeps every patch in eval mode; MAE masks in eval mode too)"
            )
        cells.append(same.float().argmax(-1))
    cells = torch.stack(cells).cpu()
    context.values[_key(kept, "cells")] = (kept, cells)  # the layers of this call share it
    return cells


def _subset_placement(cells: torch.Tensor, grid: tuple[int, int], stride: tuple[float, float], heads: int,
                      attention: str, prefix: int) -> Placement:
    """``prefix`` tokens without a position, then token ``j`` of image ``b`` at cell ``cells[b, j]`` of the row-major
    grid (-1: a slot without a position, a padding row of an image that kept fewer tokens than another), folded onto
    the whole grid with the cells an image lacks absent."""
    batch, count = cells.shape
    total = grid[0] * grid[1]
    placed = cells >= 0
    kept = cell_centres(*grid, stride).reshape(total, 2)[cells.clamp(min=0)]  # [B, K, 2]
    kept = torch.where(placed[..., None], kept, float("nan"))
    positions = torch.cat([kept.new_full((batch, prefix, 2), float("nan")), kept], dim=1).unsqueeze(1)
    slots = torch.where(placed, cells, total)  # the slots without a position go to a last cell, dropped

    def fold(values: torch.Tensor) -> torch.Tensor:
        # values [B, H, prefix + K] -> [B, H, gh * gw]: kept token j of image b goes to cell cells[b, j].
        index = slots.to(values.device).unsqueeze(1).expand(values.shape[0], values.shape[1], count)
        folded = values.new_full((*values.shape[:2], total + 1), float("nan")).scatter(-1, index, values[..., prefix:])
        return folded[..., :total]

    present = torch.zeros(batch, total + 1, dtype=torch.bool).scatter_(1, slots, True)[:, :total]
    return Placement(positions, None, fold, LayerGeometry(grid, stride, attention, heads, prefix), present=present)


def _extra_tokens(owner: nn.Module, ran: tuple, cut: _Cut) -> tuple[int, int]:
    """The tokens without a position before and after the patches of an image model's layers, as its forward (which
    ran with the arguments ``ran``, on the pixels of ``cut``) builds its sequence."""
    from .vit_pytorch_variants import extra_tokens

    variant = extra_tokens(owner, cut)
    if variant is not None:
        return variant
    design = _design(owner)
    registers = int(owner.register_tokens.shape[0]) if hasattr(owner, "register_tokens") else 0
    if design == ("cait", "CaiT"):
        return 0, 0  # its patch transformer runs before the class token joins
    if design == ("simple_vit_with_register_tokens", "SimpleViT"):
        return 0, registers  # pack([x, r])
    if design == _SPARSE_GATING:
        return registers, 0  # pack([r, x])
    if design == ("simple_vit_with_specialized_cls", "SimpleViT"):
        return 1, 0  # cls_token is one [D] vector
    prefix = int(owner.cls_token.shape[-2]) if hasattr(owner, "cls_token") else 0  # [n, D] or [1, n, D]
    if design == ("distill", "DistillableViT"):
        args, kwargs = ran
        return prefix, int((args[1] if len(args) > 1 else kwargs.get("distill_token")) is not None)
    return prefix, 0


class _ImagePlacer(LayerPlacer):
    """One layer of a vit_pytorch image model: the tokens its forward (or SimMIM's, MAE's around it) built in this
    call from the patches its ``Rearrange`` cut.

    Args:
        model: the recorded model (messages).
        owner: the vit_pytorch model the layer belongs to; ``what`` names it.
        rearrange: its cut.
        wrapper: the SimMIM or MAE that holds ``owner`` as its encoder (or the MAE whose decoder this is), or None.
        decoder: the layer is MAE's decoder (every patch, row-major, mask tokens at their cells).
    """

    def __init__(self, model: nn.Module, owner: nn.Module, what: str, rearrange: nn.Module,
                 wrapper: nn.Module | None = None, decoder: bool = False):
        self.model, self.owner, self.what, self.rearrange = model, owner, what, rearrange
        self.wrapper, self.decoder = wrapper, decoder
        self.dropout = getattr(owner, "patch_dropout", None)

    def install(self, context: CallContext) -> list:
        handles = [_install_cut(context, self.rearrange, video=False),
                   _install_ran(context, self.owner, with_kwargs=True)]
        if self.wrapper is not None:
            handles.append(_install_ran(context, self.wrapper))
            if _design(self.wrapper) == ("mae", "MAE") and not self.decoder:
                handles += self._install_mae(context)
        if self.dropout is not None:
            def see(module, args, output) -> None:
                context.values[_key(module, "dropped")] = (args[0], output) if module.training and module.prob else None

            handles.append(self.dropout.register_forward_hook(see))
        return handles

    def _install_mae(self, context: CallContext) -> list:
        # MAE embeds every patch (patch_to_emb), adds the position embedding in place, gathers the kept rows and
        # runs encoder.transformer on them: both tensors are read when the transformer starts.
        mae = self.wrapper

        def embedded(module, args, output) -> None:
            context.values[_key(mae, "embedded")] = output

        def encoded(module, args) -> None:
            full = context.values.get(_key(mae, "embedded"))
            context.values[_key(mae, "kept")] = None if full is None else (full, args[0])

        return [mae.patch_to_emb.register_forward_hook(embedded),
                self.owner.transformer.register_forward_pre_hook(encoded)]

    def cut(self, context: CallContext) -> _Cut:
        """The pixels the model's ``Rearrange`` cut in this call, refused where it did not run or cut other pixels
        than the model's input."""
        cut = context.values.get(_key(self.rearrange))
        if cut is None:
            raise NotPlaceable(
                f"{self.what}'s patch cut (to_patch_embedding's Rearrange) did not run on images in this call before "
                "it attended (its transformer called on tokens?), so its patch grid is unknown; run the model on "
                "images, or pass positions=<[N, 2] pixel position of each token, NaN rows for tokens off the image>"
            )
        check_cut_from_input(context, f"{self.what}'s patch cut", *cut.size, "model",
                             "its class, register or distillation tokens")
        return cut

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cut = self.cut(context)
        stride = (float(cut.patch[0]), float(cut.patch[1]))
        heads = int(lead[-1])
        owner_ran = _key(self.owner, "ran") in context.values
        if self.decoder or (not owner_ran and self.wrapper is not None
                            and _design(self.wrapper) == ("simmim", "SimMIM")
                            and _key(self.wrapper, "ran") in context.values):
            # SimMIM's encoder and MAE's decoder: every patch (mask tokens at their cells carry their cell's
            # position embedding), no class token.
            return self._grid(lead, num_queries, num_keys, cut, stride, 0, 0,
                              "SimMIM's encoder: every patch, mask tokens at their cells" if not self.decoder else
                              "MAE's decoder: every patch, mask tokens at their cells")
        if not owner_ran and self.wrapper is not None and _key(self.wrapper, "ran") in context.values:
            kept = context.values.get(_key(self.wrapper, "kept"))
            if kept is None:
                raise NotPlaceable("MAE's patch embedding did not run before its encoder in this call, so which "
                                   "patches the encoder keeps is unknown")
            cells = _kept_cells(context, *kept, "MAE")
            self._check(lead, num_queries, num_keys, cut.batch, cells.shape[1], "the patches each image kept")
            return _subset_placement(cells, cut.grid, stride, heads, "global over the kept patches (MAE)", 0)
        if not owner_ran:
            raise NotPlaceable(
                f"its transformer ran outside {self.what}'s forward in this call, so vitmad does not know which "
                "tokens it was given; record the model whose forward runs it, or pass positions=<[N, 2] pixel "
                "position of each token>"
            )
        prefix, suffix = _extra_tokens(self.owner, context.values[_key(self.owner, "ran")], cut)
        dropped = context.values.get(_key(self.dropout, "dropped")) if self.dropout is not None else None
        if dropped is not None:  # the class token joins after the dropout (vit_with_patch_dropout)
            cells = _kept_cells(context, *dropped, f"{self.what}'s PatchDropout (training)")
            self._check(lead, num_queries, num_keys, cut.batch, prefix + cells.shape[1],
                        (f"{prefix} token(s), then " if prefix else "") + "the patches each image kept")
            return _subset_placement(cells, cut.grid, stride, heads, "global over the kept patches (patch dropout)",
                                     prefix)
        return self._grid(lead, num_queries, num_keys, cut, stride, prefix, suffix, "global")

    def _grid(self, lead, num_queries, num_keys, cut: _Cut, stride, prefix: int, suffix: int,
              attention: str) -> Placement:
        grid = cut.grid
        self._check(lead, num_queries, num_keys, cut.batch, prefix + grid[0] * grid[1] + suffix,
                    (f"{prefix} token(s) before " if prefix else "") + f"the {grid[0]}x{grid[1]} patches"
                    + (f", then {suffix} after them" if suffix else ""))
        positions, index = _grid_layout(grid, stride, prefix, suffix)
        geometry = LayerGeometry(grid, stride, attention, int(lead[-1]), prefix, num_suffix_tokens=suffix or None)
        return Placement(positions, None, select_tokens(index), geometry)

    def _check(self, lead, num_queries: int, num_keys: int, batch: int, tokens: int, described: str) -> None:
        if len(lead) != 2 or int(lead[0]) != batch or num_queries != tokens or num_keys != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; after "
                f"{self.what}'s patch cut of {batch} image(s), it attends [{batch}, H, {tokens}, {tokens}]: "
                f"{described}"
            )


class _VideoCut(GridSource):
    """The ``embedding`` of a :class:`.video.VideoPlacer`: the hook that reads each call's tubelet grid from the
    ``Rearrange`` that cuts the video."""

    def __init__(self, rearrange: nn.Module):
        self.rearrange = rearrange

    @property
    def key(self) -> str:  # what _install_cut writes
        return _key(self.rearrange, "grid")

    def install(self, context: CallContext) -> list:
        return [_install_cut(context, self.rearrange, video=True)]


@functools.lru_cache(maxsize=64)
def _divided_layout(kind: str, frames: int, size: tuple[int, int], stride: tuple[float, float], frame_stride: int,
                    cls: bool) -> tuple[torch.Tensor, ...]:
    """ViViT's divided attention: ``[G, n, 2]`` pixel and ``[G, n, 1]`` frame positions of each group of a video
    (``"space"``: a group per frame, its class token first if ``cls``; ``"time"``: a group per token of a frame,
    the class token's first if ``cls``, each over the frames), NaN rows without a position, and ``slot``: where
    tubelet (frame, row, column) sits among the ``G * n`` tokens of one video."""
    patches = size[0] * size[1]
    grid = torch.arange(frames * patches).view(frames, patches)
    tokens = torch.cat([torch.full((frames, 1), -1), grid], dim=1) if cls else grid  # [F, n]
    if kind == "time":
        tokens = tokens.t()  # [n, F]
    return read_only(*tubelet_positions(tokens, frames, size, stride, frame_stride), positions=2)


class _VivitPlacer(LayerPlacer):
    """ViViT's spatial attention (``"space"``: ``[B * F, H, n, n]``, a frame's class token and patches) and the
    temporal attention of ``factorized_self_attention`` (``"time"``: ``[B * n, H, F, F]``, one token of every frame).
    """

    def __init__(self, model: nn.Module, vivit: nn.Module, rearrange: nn.Module, kind: str):
        self.model, self.vivit, self.rearrange, self.kind = model, vivit, rearrange, kind

    def install(self, context: CallContext) -> list:
        frame_patch = int(self.vivit.frame_patch_size)

        def see_mask(module, args, kwargs) -> None:
            # forward(video, mask=None): [B, frames] True where a frame is the video's; a tubelet frame is the
            # video's where all of its frames are, as ViViT reduces it for its temporal attention.
            mask = kwargs.get("mask", args[1] if len(args) > 1 else None)
            context.values[_key(self.vivit, "frames")] = None if not isinstance(mask, torch.Tensor) or mask.dim() != 2 \
                else mask.reshape(mask.shape[0], -1, frame_patch).all(-1).cpu()

        return [_install_cut(context, self.rearrange, video=True),
                self.vivit.register_forward_pre_hook(see_mask, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get(_key(self.rearrange, "grid"))
        if grid is None or _key(self.rearrange) not in context.values:
            raise NotPlaceable("ViViT's tubelet cut (to_patch_embedding's Rearrange) did not run on a video in this "
                               "call before it attended, so its tubelet grid is unknown")
        kept = context.values.get(_key(self.vivit, "frames"))
        if kept is not None and tuple(kept.shape) != (grid.batch, grid.frames):
            raise NotPlaceable(f"its frame mask has shape {list(kept.shape)} in tubelet frames, not [{grid.batch}, "
                               f"{grid.frames}] as its videos")
        cls = self.vivit.spatial_cls_token is not None
        patches = grid.size[0] * grid.size[1]
        per_frame = int(cls) + patches
        groups, tokens = (grid.frames, per_frame) if self.kind == "space" else (per_frame, grid.frames)
        if len(lead) != 2 or num_queries != num_keys or num_queries != tokens or lead[0] != grid.batch * groups:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; ViViT's "
                f"{self.kind} attention over {grid.batch} video(s) of {grid.frames}x{grid.size[0]}x{grid.size[1]} "
                f"tubelets{' (a class token per frame)' if cls else ''} gives [{grid.batch * groups}, heads, "
                f"{tokens}, {tokens}]"
            )
        positions, time_positions, slot = _divided_layout(self.kind, grid.frames, grid.size, grid.stride,
                                                          grid.frame_stride, cls)
        batch, heads = grid.batch, int(lead[1])

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(batch, groups, heads, tokens).transpose(1, 2).reshape(batch, heads, -1)
            return values.index_select(-1, on_device(slot, values.device))

        geometry = LayerGeometry(grid.size, grid.stride, self.kind, heads, frames=grid.frames,
                                 frame_stride=float(grid.frame_stride))
        positions, time_positions = positions.repeat(batch, 1, 1), time_positions.repeat(batch, 1, 1)
        present = None
        if kept is not None and not kept.all():
            # A padding frame (the mask's False) is no frame of its video: its tokens have no position, as queries
            # and as keys, in its spatial attention (which the model does not mask) and in the temporal one (which
            # masks it as a key); they were counted as queries (QA helper-248).
            # Rows: (video, token of a frame) over the frames for "time", (video, frame) over its tokens for "space".
            padding = (~kept).repeat_interleave(groups, dim=0) if self.kind == "time" else \
                (~kept).reshape(-1, 1).expand(batch * groups, tokens)
            positions = positions.masked_fill(padding[..., None], float("nan"))
            time_positions = time_positions.masked_fill(padding[..., None], float("nan"))
            present = kept.repeat_interleave(patches, dim=1)  # the folded tubelets, (frame, row, column)
        return Placement(positions.unsqueeze(1), None, fold, geometry, time_positions=time_positions.unsqueeze(1),
                         present=present)


def _vivit_placer(model: nn.Module, vivit: nn.Module, rearrange: nn.Module, name: str, module: nn.Module):
    from . import Skip

    if vivit.variant == "factorized_encoder":
        if any(m is module for m in vivit.temporal_transformer.modules()):
            return Skip(_FRAME_TOKENS)
        return _VivitPlacer(model, vivit, rearrange, "space")
    for spatial, temporal, _ in vivit.factorized_transformer.layers:
        if spatial is module:
            return _VivitPlacer(model, vivit, rearrange, "space")
        if temporal is module:
            return _VivitPlacer(model, vivit, rearrange, "time")
    return None


def _refusal(path: list[nn.Module], module: nn.Module) -> RefusingPlacer:
    # The models whose forward builds the tokens: those with a patch embedding, and the recorded root when it is a
    # model of its own (LookViT cuts its patches otherwise; "a transformer recorded alone?" misled about it).
    models = [m for m in path[:-1] if _design(m) is not None and (
        hasattr(m, "to_patch_embedding") or (m is path[0] and not type(m).__name__.endswith("Transformer")))]
    if not models:
        design = _design(path[0]) or _design(module)
        return RefusingPlacer(
            f"it is recorded inside {type(path[0]).__name__}" + (f" of vit_pytorch.{design[0]}" if design else "")
            + ", without the vit_pytorch model whose forward builds its tokens (a transformer recorded alone?), so "
            "vitmad does not know their layout; record the whole model, or pass positions=<[N, 2] pixel position of "
            "each token, NaN rows for tokens off the image>"
        )
    design = _design(models[-1])
    return RefusingPlacer(
        f"{design[1]} of vit_pytorch.{design[0]}: vitmad does not know how it lays out its tokens (vitmad places "
        "vit_pytorch's ViT, SimpleViT and its variants with the same sequence, DeepViT, CaiT, DistillableViT, the "
        "ViT for small datasets, the 3-D ViTs, ViViT, SimMIM, MAE, NaViT, the 2-D variants of vit_pytorch_variants "
        "and the hierarchical designs); pass "
        "positions=<[N, 2] pixel position of each token, NaN rows for tokens off the image>"
    )


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import ClassQueries, Skip, vit_pytorch_variants

    if _design(module) is None or not _is_attention(module):
        return None
    path = _path(model, name)
    if any(_staged(m) for m in path):
        return None
    owner = next((m for m in reversed(path[:-1]) if _design(m) in _IMAGE_DESIGNS or _design(m) in _VIDEO_DESIGNS),
                 None)
    wrapper = next((m for m in reversed(path[:-1]) if _design(m) in _WRAPPERS), None)
    if owner is None and wrapper is not None and _design(wrapper) == ("mae", "MAE") \
            and any(m is module for m in wrapper.decoder.modules()):
        owner, decoder = wrapper.encoder, True
    else:
        decoder = False
    if owner is None:
        navit = next((m for m in reversed(path[:-1]) if _design(m) == _NAVIT), None)
        if navit is not None:
            return Skip(_NAVIT_POOL) if module is navit.attn_pool else _NaVitPlacer(navit)
        return vit_pytorch_variants.unowned_placer(path, module) or _refusal(path, module)
    rearrange, pattern = _cut_of(owner)
    design = _design(owner)
    video = design in _VIDEO_DESIGNS
    if rearrange is None or pattern not in _CUTS or _CUTS[pattern] != video:
        return RefusingPlacer(f"{design[1]} of vit_pytorch.{design[0]} cuts its input with "
                              f"{pattern or 'no einops Rearrange'}, not a cut vitmad knows")
    if design == ("vivit", "ViViT"):
        return _vivit_placer(model, owner, rearrange, name, module)
    if video:
        return VideoPlacer(model, _VideoCut(rearrange), "space-time", prefix=1 if hasattr(owner, "cls_token") else 0)
    what = _IMAGE_DESIGNS[design]
    if design == ("cait", "CaiT") and any(m is module for m in owner.cls_transformer.modules()):
        keys = _ImagePlacer(model, owner, what, rearrange)
        return ClassQueries(_CLASS_ATTENTION, _CaitKeys(keys), "the class token and CaiT's patch grid")
    variant = vit_pytorch_variants.placer(model, path, module, owner, what, rearrange)
    if variant is not None:
        return variant
    if not decoder and wrapper is not None and wrapper.encoder is not owner:
        wrapper = None  # a model held elsewhere in the wrapper than as its encoder: run by its own forward
    return _ImagePlacer(model, owner, what, rearrange, wrapper, decoder)


class _CaitKeys(LayerPlacer):
    """The keys of CaiT's (and XCiT's) class attention: its class token, then the patch grid its patch transformer
    ran over."""

    def __init__(self, patches: _ImagePlacer):
        self.patches = patches

    def install(self, context: CallContext) -> list:
        return self.patches.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        cut = context.values.get(_key(self.patches.rearrange))
        if cut is None or _key(self.patches.owner, "ran") not in context.values:
            raise NotPlaceable(f"{self.patches.what}'s patch cut did not run in its forward in this call, so the "
                               "grid of its class attention's keys is unknown")
        stride = (float(cut.patch[0]), float(cut.patch[1]))
        return self.patches._grid(lead, num_queries, num_keys, cut, stride, 1, 0, "global")


@dataclass(frozen=True)
class _Packed:
    """NaViT's packing of one call: per image its grid, and where its tokens sit in the call's rows."""

    grids: tuple[tuple[int, int], ...]
    rows: int
    length: int  # tokens per row, padding included
    positions: torch.Tensor  # [rows, 1, length, 2], NaN at padding
    slots: torch.Tensor  # [images, T_max]: index of each image token in the rows' [rows * length], rows * length absent
    present: torch.Tensor | None


class _NaVitPlacer(LayerPlacer):
    """NaViT's transformer: images of their own sizes packed in rows (``batched_images``, a list of groups, or grouped
    by ``group_images_by_max_seq_len``), each image's patches row-major after the previous image's, the rows padded
    to the longest; a block-diagonal mask keeps each image to its own patches. Each image is placed on its own grid,
    in its own pixels, and folded onto ``[images, H, T_max]`` in the order of the model's logits."""

    def __init__(self, navit: nn.Module):
        self.navit = navit
        self.patch = int(navit.patch_size)

    def install(self, context: CallContext) -> list:
        return [_install_ran(context, self.navit, with_kwargs=True)]

    def grouped(self, images: list, max_seq_len: int) -> list:
        """The rows ``forward`` packs a flat list of ``images`` into with ``group_images=True``, as it groups them."""
        from vit_pytorch.na_vit import group_images_by_max_seq_len

        return group_images_by_max_seq_len(images, patch_size=self.patch, calc_token_dropout=None,
                                           max_seq_len=max_seq_len)

    def _packed(self, context: CallContext) -> _Packed:
        from .stages import forward_arguments

        ran = context.values.get(_key(self.navit, "ran"))
        if ran is None:
            raise NotPlaceable("its transformer ran outside NaViT's forward in this call, so the images it packs are "
                               "unknown")
        known = context.values.get(_key(self.navit, "packed"))
        if known is not None and known[0] is ran:
            return known[1]
        navit = self.navit
        if navit.training and navit.calc_token_dropout is not None:
            raise NotPlaceable(
                "NaViT drops a random subset of each image's patches in training (token_dropout_prob), drawn inside "
                "its forward and handed to no module, so which patches remain is not known; record it in eval mode"
            )
        arguments = forward_arguments(navit, *ran)
        images = arguments["batched_images"]
        if arguments.get("group_images", False):
            images = self.grouped(images, arguments.get("group_max_seq_len", 2048))
        if torch.is_tensor(images[0]):
            images = [images]
        grids, starts, lengths = [], [], []
        for row, group in enumerate(images):
            offset = 0
            for image in group:
                grid = (int(image.shape[-2]) // self.patch, int(image.shape[-1]) // self.patch)
                grids.append(grid)
                starts.append((row, offset))
                offset += grid[0] * grid[1]
            lengths.append(offset)
        length, stride = max(lengths), (float(self.patch), float(self.patch))
        positions = torch.full((len(images), 1, length, 2), float("nan"))
        counts = [h * w for h, w in grids]
        slots = torch.full((len(grids), max(counts)), len(images) * length, dtype=torch.long)
        for index, ((row, offset), grid, count) in enumerate(zip(starts, grids, counts)):
            positions[row, 0, offset:offset + count] = cell_centres(*grid, stride).reshape(count, 2)
            slots[index, :count] = row * length + offset + torch.arange(count)
        present = None if len(set(grids)) == 1 else torch.arange(max(counts)) < torch.tensor(counts)[:, None]
        packed = _Packed(tuple(grids), len(images), length, positions, slots, present)
        context.values[_key(self.navit, "packed")] = (ran, packed)
        return packed

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        packed = self._packed(context)
        if len(lead) != 2 or int(lead[0]) != packed.rows or num_queries != packed.length or num_keys != packed.length:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; NaViT packs "
                f"{len(packed.grids)} image(s) of grids {[list(g) for g in packed.grids]} into [{packed.rows}, H, "
                f"{packed.length}, {packed.length}]"
            )
        heads, slots = int(lead[1]), packed.slots

        def fold(values: torch.Tensor) -> torch.Tensor:
            # [rows, H, length] -> [H, rows * length + 1] (a NaN slot for the absent tokens) -> [images, H, T_max]
            flat = values.transpose(0, 1).reshape(heads, -1)
            flat = torch.cat([flat, flat.new_full((heads, 1), float("nan"))], dim=1)
            index = on_device(slots, values.device)
            return flat.index_select(1, index.reshape(-1)).view(heads, *index.shape).transpose(0, 1)

        stride = (float(self.patch), float(self.patch))
        attention = "global per image (block-diagonal mask)"
        same = len(set(packed.grids)) == 1
        geometry = LayerGeometry(packed.grids[0] if same else None, stride, attention, heads, 0,
                                 image_grids=None if same else packed.grids)
        return Placement(packed.positions, None, fold, geometry, present=packed.present)
