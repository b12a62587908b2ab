"""Per-patch MAD maps of one image (``mad_map.png``): where in the image each layer's heads look far or near."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import prepare_model
from .images import load_image, parse_image_size
from .options import OptionError, resolve_device
from .results import layout_dict

__all__ = ["mad_maps"]


def mad_maps(
    model,
    image,
    *,
    layers: Sequence[int] | None = None,
    image_size: str | int | Sequence[int] | None = None,
    renormalize: bool = False,
    device: str | torch.device | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """Per-patch MAD maps of one image, averaged over heads, for a few layers.

    Args:
        model: as for :func:`profile`.
        image: an image file, or preprocessed pixels ``[3, H, W]``.
        layers: layer indices; by default four spread from the first to the last layer.

    Returns:
        ``(maps, pixels, names, layout)``: ``maps`` ``[len(layers), gh, gw]`` float32 in pixels,
        ``pixels`` ``[3, H, W]`` the model input, the chosen layers' names and the layout.
    """
    from ..recording import record

    loaded, preprocessing = prepare_model(model, parse_image_size(image_size))
    if isinstance(image, torch.Tensor):
        pixels = image
    else:
        picture, reason = load_image(image)
        if picture is None:
            raise OptionError("image", f"cannot read image {image}: {reason}")
        pixels = preprocessing(picture)
    device = resolve_device(device)
    module = loaded.module.to(device)
    with torch.inference_mode(), record(module, renormalize=renormalize, reduction="none") as rec:
        loaded.forward(pixels[None].to(device=device, dtype=next(module.parameters()).dtype))
    per_patch = rec.mad[:, 0].float().mean(1).cpu()  # [L, N - P], mean over heads
    num_layers = per_patch.shape[0]
    if layers is None:
        layers = sorted({round(i * (num_layers - 1) / 3) for i in range(4)})
    layout = layout_dict(rec.layout)
    grid_h, grid_w = layout["grid"]
    maps = per_patch[list(layers)].reshape(len(layers), grid_h, grid_w)
    return maps, pixels, [rec.layers[i] for i in layers], layout
