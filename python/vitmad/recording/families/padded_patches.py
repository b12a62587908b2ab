"""Vision towers that pad each image to the batch's size and mask the padding patches: Idefics2, Idefics3 (and
Aria, whose tower it is), SmolVLM, Phi-4-multimodal.

Their embeddings take ``pixel_values`` padded to the largest image and ``patch_attention_mask`` ``[B, gh, gw]``
(the patches that hold some of the image; the model derives it from the pixel mask, all True without one), embed
the full ``gh x gw`` grid row-major with no extra token, and the attention masks the padding patches as keys. As
queries they still attend: the plain layout counted them into the image's mean (a 2 x 3-patch image padded to
4 x 4: 15.5 px where its own patches give 9.4). A hook on the embeddings reads the mask in each call; a padding
patch has no position, neither query nor key, and an image's MAD is the mean over its own patches
(``Placement.present``). The cells stay those of the padded input, in its pixels (the patch projection's
stride), so an image's positions are its own pixels: the padding lies after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..placement import CallContext, LayerGeometry, NotPlaceable, Placement, cell_centres
from .embeddings import EmbeddingsPlacer, conv_grid, embeddings_above

__all__ = ["placer", "PaddedPatchesPlacer"]

# (embeddings class, defining module's suffix): each takes (pixel_values, patch_attention_mask).
_EMBEDDINGS = (
    ("Idefics2VisionEmbeddings", "modeling_idefics2"),
    ("Idefics3VisionEmbeddings", "modeling_idefics3"),
    ("SmolVLMVisionEmbeddings", "modeling_smolvlm"),
    ("Phi4MultimodalVisionEmbeddings", "modeling_phi4_multimodal"),
)
_SEEN = "padded_patches.seen."  # + the embeddings' name: the _Patches of the current call


def placer(model: nn.Module, name: str, module: nn.Module) -> EmbeddingsPlacer | None:
    """A :class:`PaddedPatchesPlacer` for the attention modules of a tower whose ``embeddings`` is one of those
    designs, else None."""
    found = embeddings_above(model, name, _EMBEDDINGS)
    return None if found is None else PaddedPatchesPlacer(model, *found)


@dataclass(frozen=True)
class _Patches:
    """The padded grid of one call: ``grid`` ``(gh, gw)``, ``stride`` in pixels, ``mask`` ``[B, gh * gw]`` (the
    patches of the image), or an explanation of why its tokens cannot be placed."""

    grid: tuple[int, int]
    stride: tuple[float, float]
    mask: torch.Tensor | None
    problem: str | None = None


class PaddedPatchesPlacer(EmbeddingsPlacer):
    """Places the tokens of one layer of such a tower (attention ``[B, H, gh * gw, gh * gw]``).

    Args:
        model: the model (for messages).
        embeddings_name: qualified name of the tower's embeddings.
        embeddings: that module.
    """

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        key = _SEEN + self.embeddings_name
        projection = self.embeddings.patch_embedding

        def see(module, args, kwargs, output) -> None:
            pixels = args[0] if args else kwargs["pixel_values"]
            mask = args[1] if len(args) > 1 else kwargs.get("patch_attention_mask")
            grid = conv_grid(pixels, projection)
            stride = (float(projection.stride[0]), float(projection.stride[1]))
            if mask is None:
                context.values[key] = _Patches(grid, stride, None, "its embeddings got no patch_attention_mask")
            elif tuple(mask.shape) != (pixels.shape[0], *grid):
                context.values[key] = _Patches(grid, stride, None, (
                    f"its patch_attention_mask has shape {list(mask.shape)}, not [{pixels.shape[0]}, {grid[0]}, "
                    f"{grid[1]}], the images and the patch grid of pixel_values"))
            else:
                context.values[key] = _Patches(grid, stride, mask.reshape(mask.shape[0], -1).bool())

        return [self.embeddings.register_forward_hook(see, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        patches: _Patches | None = context.values.get(_SEEN + self.embeddings_name)
        if patches is None:
            raise NotPlaceable(f"it ran before {self.embeddings_name} embedded the patches of this call")
        if patches.problem is not None:
            raise NotPlaceable(patches.problem)
        batch, tokens = (int(s) for s in patches.mask.shape)
        self.check_sequence(lead, num_queries, num_keys, batch, tokens,
                       f"{self.embeddings_name} embedded {batch} images of {patches.grid[0]}x{patches.grid[1]} patches")
        heads = int(lead[-1])
        return self.shared(context, str(heads), lambda: _padded_placement(patches, heads))


def _padded_placement(patches: _Patches, heads: int) -> Placement:
    mask = patches.mask
    cells = cell_centres(*patches.grid, patches.stride, device=mask.device).reshape(-1, 2)
    positions = torch.where(mask.unsqueeze(-1), cells, float("nan")).unsqueeze(1)  # [B, 1, N, 2]
    geometry = LayerGeometry(patches.grid, patches.stride, "global, padding patches without a position", heads, 0)
    return Placement(positions, None, _identity, geometry, present=None if bool(mask.all()) else mask)


def _identity(values: torch.Tensor) -> torch.Tensor:
    return values  # the tokens are the padded grid, row-major
