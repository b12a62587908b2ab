"""What the families that read their tower's embeddings share (ViTMAE's kept patches, ViLT's drawn patches, the
padded patches of Idefics-style towers): finding the embeddings above a layer, the per-call placement its layers
share, and the check that a call attends over the sequence the embeddings built."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..placement import CallContext, LayerPlacer, NotPlaceable, Placement
from .stages import defined_in

__all__ = ["EmbeddingsPlacer", "embeddings_above", "conv_grid", "check_cut_from_input", "check_sequence"]


def embeddings_above(model: nn.Module, name: str, designs) -> tuple[str, nn.Module] | None:
    """The ``embeddings`` module of a tower on the path to module ``name`` (a sibling of one of its ancestors, never
    ``name`` itself or a module inside it) whose class is one of ``designs`` (``(class name, defining module's
    suffix)`` pairs), with its qualified name, or None."""
    parts = name.split(".")
    for depth in range(len(parts)):
        embeddings_name = ".".join(parts[:depth] + ["embeddings"])
        if name == embeddings_name or name.startswith(embeddings_name + "."):
            continue
        try:
            embeddings = model.get_submodule(embeddings_name)
        except AttributeError:
            continue
        if any(defined_in(embeddings, *design) for design in designs):
            return embeddings_name, embeddings
    return None


def conv_grid(pixels: torch.Tensor, projection: nn.Conv2d) -> tuple[int, int]:
    """``(gh, gw)`` of the patch grid an unpadded patch projection makes of ``pixels``."""
    return tuple((int(size) - k) // s + 1 for size, k, s in zip(pixels.shape[-2:], projection.kernel_size,
                                                                projection.stride))


def check_cut_from_input(context: CallContext, cutter: str, height: int, width: int, record: str,
                         unplaced: str) -> None:
    """Refuses a call whose patch embedding (``cutter``, in words) cut pixels of another size than the model's input
    (resized by a wrapper between them): its patches are then no cells of the input image. ``record`` names the
    module to record instead, ``unplaced`` the tokens without a position, for the advice."""
    image = context.image_size
    if image is not None and tuple(image) != (height, width):
        raise NotPlaceable(
            f"{cutter} took {height}x{width} pixels from an input of {image[0]}x{image[1]} (resized before it?), so "
            f"its patches are not cells of the input image; record the {record} on the pixels it cuts, or pass "
            f"positions=<[N, 2] pixel position of each token, NaN rows for {unplaced}>"
        )


def check_sequence(lead: torch.Size, num_queries: int, num_keys: int, batch: int, tokens: int, built: str) -> None:
    """Refuses a call that is not self-attention ``[batch, H, tokens, tokens]`` over the sequence the tower built
    in this call (``built`` says how, for the message)."""
    if len(lead) != 2 or lead[0] != batch or num_queries != tokens or num_keys != tokens:
        raise NotPlaceable(f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; "
                           f"after {built}, a layer of this tower attends [{batch}, H, {tokens}, {tokens}]")


class EmbeddingsPlacer(LayerPlacer):
    """Places the tokens of one layer from what a hook read on its tower's embeddings in the current call.

    Args:
        model: the model (for messages).
        embeddings_name: qualified name of the embeddings that built this layer's sequence.
        embeddings: that module.
    """

    def __init__(self, model: nn.Module, embeddings_name: str, embeddings: nn.Module):
        self.model = model
        self.embeddings_name = embeddings_name
        self.embeddings = embeddings

    def shared(self, context: CallContext, key: str, build: Callable[[], Placement]) -> Placement:
        """The placement the layers of this call share under ``key`` (and its device copies), built once."""
        key = f"{type(self).__name__}.{self.embeddings_name}.{key}"
        placement = context.values.get(key)
        if placement is None:
            placement = context.values[key] = build()
        return placement

    check_sequence = staticmethod(check_sequence)
