"""Token layouts vitmad knows it does not place: skipped with the reason, or refused, so that the plain layout never
guesses them.

The plain layout takes any sequence of at least ``gh x gw`` tokens as extra tokens followed by the patch grid. The
towers once refused here by name because they pass that test with tokens that are no such grid (Mllama's tiles in
one sequence, MiniCPM-V's patches packed in one row) have families of their own now (:mod:`.mllama`,
:mod:`.minicpmv`).

RADIO (``RadioModel``) cuts its patches with a reshape and a ``Linear``: its family (:mod:`.radio`) places its dense
forward; a layout given by hand for it without both ``patch=`` and ``grid=`` is refused with
:func:`radio_layout_unknown` (the plain layout has no patch-embedding convolution to complete it from). So is one for
Molmo2's vision tower (:mod:`.molmo2`, pre-cut patches embedded by a ``Linear``), with :func:`molmo2_layout_unknown`.

DepthPro's patch encoder runs a ViT on overlapping crops of a multi-scale pyramid of the image, the crops of every
scale batched together: its layers are skipped with the reason (its per-crop values are in each crop's own pixels,
one row per crop, not per image).

GroupViT's vision encoder (transformers' ``modeling_groupvit``) attends, batch and heads merged in one dim, over the
patches and the learned group tokens appended after them, then over the groups each grouping block makes (segments
of the image, no cells): skipped with the reason rather than refused at the first call as an unknown shape.

UDOP's encoder (transformers' ``modeling_udop``) follows its text tokens with the patches no text box covers, then
zero tokens up to the grid's size: which of its tokens are patches, and which cells they are, depends on each
input's boxes. Its token count passes the plain layout's test, and the layout read from it was silently wrong (QA
helper-239): its attention layers are skipped with the reason.
"""

from __future__ import annotations

from torch import nn

from ..module_index import named_module_list
from .stages import defined_in

_DEPTH_PRO_CROPS = (
    "DepthPro's patch encoder attends within overlapping crops of a multi-scale pyramid of the image, the crops of "
    "every scale batched together, so its values would be per crop, in each crop's own pixels; record the image "
    "encoder alone (depth_pro.encoder.image_encoder.model, on the image it is given) for a MAD in its input's pixels"
)

_UDOP_LAYOUT = (
    "UDOP's encoder follows its text tokens with the patches whose cells hold no text box's centre (a covered "
    "patch's features are added to its text token), row-major, then zero tokens up to the grid's size: which tokens "
    "are patches, and which cells they are, depends on each input's boxes, a layout vitmad does not place"
)

_GROUPVIT_GROUPS = (
    "GroupViT's encoder attends, batch and heads merged in one dim, over the patches and learned group tokens "
    "appended after them, and after each grouping block over the groups it made (segments of the image, with no "
    "cell of their own), and each grouping block assigns the patches to its groups by a hard (Gumbel) softmax: a "
    "layout vitmad does not place"
)


def radio_layout_unknown(model: nn.Module) -> str | None:
    """Why the plain layout cannot complete a partial layout given by hand for RADIO's tokens (no patch-embedding
    convolution gives their grid), and what to pass; None for a model without RADIO's patch embeddings."""
    name, embeddings = next(((n, m) for n, m in named_module_list(model)
                             if defined_in(m, "RadioPatchEmbeddings", "modeling_radio")), (None, None))
    if embeddings is None:
        return None
    p, summary = int(embeddings.patch_size), int(embeddings.cls_register_token.shape[0])
    # Named as the tower: inside a vision-language model (Nemotron-H-Omni's vision_model) the model is not RADIO.
    tower_name = name.rpartition(".")[0]
    tower = type(model).__name__ if not tower_name else \
        f"{tower_name}, a {type(model.get_submodule(tower_name)).__name__}"
    return (f"RADIO ({tower}) cuts its patches with a reshape and a Linear, no patch-embedding Conv2d "
            "from which vitmad would complete a layout given by hand: vitmad places its dense forward (pixel_values "
            f"[B, C, H, W]: {summary} summary tokens, then the row-major H/{p} x W/{p} patch grid) by itself, so "
            f"leave patch=, grid= and num_prefix_tokens= unset, or give both patch={p} and grid=[H // {p}, W // {p}] "
            "(or positions=<[N, 2] pixel position of each token, NaN rows for the summary tokens>)")


def molmo2_layout_unknown(model: nn.Module) -> str | None:
    """Why the plain layout cannot complete a partial layout given by hand for Molmo2's vision tower (pre-cut patches
    embedded by a Linear: no patch-embedding convolution gives their grid), and what to pass; None for a model
    without that tower."""
    name, tower = next(((n, m) for n, m in named_module_list(model)
                        if defined_in(m, "Molmo2VisionModel", "modeling_molmo2")), (None, None))
    if tower is None:
        return None
    p = int(tower.config.patch_size)
    grid = [int(s) // p for s in tower.config.image_size]
    where = type(model).__name__ if not name else f"{name}, a Molmo2VisionModel"
    return (f"Molmo2's vision tower ({where}) embeds pre-cut patches with a Linear, no patch-embedding Conv2d from "
            "which vitmad would complete a layout given by hand: vitmad places each view of its pixel_values on the "
            f"{grid[0]}x{grid[1]} grid of {p} px patches its config fixes by itself, so leave patch=, grid= and "
            f"num_prefix_tokens= unset, or give both patch={p} and grid={grid} (or positions=<[N, 2] pixel position "
            "of each token>)")


def placer(model: nn.Module, name: str, module: nn.Module):
    """A Skip for DepthPro's patch encoder, GroupViT's vision attention and UDOP's attention, else None."""
    from . import Skip

    if defined_in(module, "UdopAttention", "modeling_udop"):
        return Skip(_UDOP_LAYOUT)
    if (defined_in(module, "GroupViTAttention", "modeling_groupvit") or defined_in(
            module, "GroupViTAssignAttention", "modeling_groupvit")) and ".text_model." not in f".{name}.":
        return Skip(_GROUPVIT_GROUPS)
    parts = name.split(".")
    for depth in range(len(parts)):
        owner = model.get_submodule(".".join(parts[:depth]))
        if type(owner).__name__ == "DepthProPatchEncoder":
            return Skip(_DEPTH_PRO_CROPS)
    return None
