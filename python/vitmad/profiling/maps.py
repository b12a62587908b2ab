"""Per-token MAD maps of one image (``mad_map.png``): where in the image each layer's heads look far or near."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import prepare_model
from .images import NATIVE, load_image, parse_image_size
from .native import native_feed
from .options import OptionError, resolve_device

__all__ = ["mad_maps"]


def mad_maps(
    model,
    image,
    *,
    layers: Sequence[int] | None = None,
    image_size: str | int | Sequence[int] | None = None,
    renormalize: bool = False,
    device: str | torch.device | None = "auto",
) -> tuple[list[torch.Tensor], torch.Tensor, list[str], list[dict]]:
    """Per-token MAD maps of one image, averaged over heads, for a few layers, each on its own token grid.

    Args:
        model: as for :func:`profile`.
        image: an image file, or preprocessed pixels ``[3, H, W]`` (not with ``image_size="native"``, which
            resizes the image itself).
        layers: layer indices; by default four spread from the first to the last layer.

    Returns:
        ``(maps, pixels, names, geometry)``: ``maps`` one ``[grid_h, grid_w]`` float32 map in pixels per chosen
        layer (a hierarchy's stages have their own grids), ``pixels`` ``[3, H, W]`` the model input, the chosen
        layers' names and their geometry (``grid``, ``stride`` in pixels, ``attention``, ``heads``).
    """
    from ..recording import record

    size = parse_image_size(image_size)
    loaded, preprocessing = prepare_model(model, size)
    native = native_feed(loaded) if size == NATIVE else None
    if isinstance(image, torch.Tensor):
        if native is not None:
            raise OptionError("image", "image_size='native' resizes the image itself: pass an image file")
        pixels = image
    else:
        picture, reason = load_image(image)
        if picture is None:
            raise OptionError("image", f"cannot read image {image}: {reason}")
        pixels = preprocessing(picture) if native is None else native.display(picture)
    device = resolve_device(device)
    module = loaded.module.to(device)
    dtype = next(module.parameters()).dtype
    with torch.inference_mode(), record(module, renormalize=renormalize, reduction="none") as rec:
        if native is None:
            loaded.forward(pixels[None].to(device=device, dtype=dtype))
        else:
            native.forwards(loaded, [native.prepare(picture)], device, dtype)
    num_layers = len(rec.layers)
    if layers is None:
        layers = sorted({round(i * (num_layers - 1) / 3) for i in range(4)})
    maps, geometry = [], []
    for i in layers:
        layer = rec.geometry[i]
        # A packed call's grids are per image (grid is None): this image's tokens come first.
        grid = layer.grid or layer.image_grids[0]
        per_token = rec.per_layer[i][0].float().mean(0).cpu()  # mean over heads
        maps.append(per_token[:grid[0] * grid[1]].reshape(grid))
        geometry.append(layer.as_dict())
    return maps, pixels, [rec.layers[i] for i in layers], geometry
