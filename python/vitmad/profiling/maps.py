"""Maps of one image: per-token MAD (``mad_map.png``: where each layer's heads look far or near) and the CLS /
register attention of each head over the image (``prefix_map_image.png``, DINO-style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.arguments import is_int
from .engine import no_known_preprocessing, prepare_model
from .images import NATIVE, load_image, parse_image_size
from .native import native_feed
from .options import OptionError, resolve_device

__all__ = ["mad_maps", "image_prefix_maps"]


def _record_one_image(model, image, image_size, device, **record_options):
    """``(rec, pixels)``: one forward of ``image`` (a file, or preprocessed pixels) under :func:`vitmad.record`."""
    from ..recording import record
    from .models import refuse_random_weights_before_attention

    size = parse_image_size(image_size)
    loaded, preprocessing = prepare_model(model, size)
    if "prefix_maps" in record_options.get("stats", ()) and loaded.unloaded:
        # The maps of a pooling head whose weights the checkpoint lacks would be those of a head drawn at random.
        refuse_random_weights_before_attention(loaded.spec, loaded.module, loaded.unloaded, maps=True)
    native = native_feed(loaded) if size == NATIVE else None
    if isinstance(image, torch.Tensor):
        if native is not None:
            raise OptionError("image", "image_size='native' resizes the image itself: pass an image file")
        if image.dim() != 3 or not image.is_floating_point():
            shape = "[" + ", ".join(map(str, image.shape)) + "]"
            raise OptionError("image", f"expected one image's preprocessed pixels, a floating-point [C, H, W] tensor "
                                       f"(or an image file), got a {image.dtype} tensor of shape {shape}"
                                       + (": drop the batch dim, image[0]" if image.dim() == 4 and
                                          image.shape[0] == 1 else ""))
        pixels = image
    else:
        if native is None and preprocessing is None:  # as profile says it (a model built in Python)
            raise no_known_preprocessing("image", "[3, H, W]")
        picture, reason = load_image(image, (preprocessing if native is None else native).alpha_on_white)
        if picture is None:
            raise OptionError("image", f"cannot read image {image}: {reason}")
        pixels = preprocessing(picture) if native is None else native.display(picture)
    device = resolve_device(device)
    module = loaded.module.to(device)
    dtype = next(module.parameters()).dtype
    with torch.inference_mode(), record(module, **record_options) as rec:
        if native is None:
            loaded.forward(pixels[None].to(device=device, dtype=dtype))
        else:
            native.forwards(loaded, [native.prepare(picture)], device, dtype)
    return rec, pixels


def _layer_index(value, num_layers: int, parameter: str, layers: str | None = None) -> int:
    """``value`` as an index into the ``num_layers`` recorded layers (negative from the end, as Python's);
    ``layers`` says what they are where they are not just the recorded layers."""
    if not is_int(value) or not -num_layers <= value < num_layers:
        what = "a layer index" if parameter == "layer" else "layer indices"
        raise OptionError(parameter, f"expected {what} in [0, {num_layers}) (negative from the end) of the "
                                     f"{layers or f'{num_layers} recorded layers'}, got {value!r}")
    return value % num_layers


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
    if layers is not None and (isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__")):
        raise OptionError("layers", f"expected a list of layer indices, got {layers!r}")
    rec, pixels = _record_one_image(model, image, image_size, device, renormalize=renormalize, reduction="none")
    num_layers = len(rec.layers)
    if layers is None:
        layers = sorted({round(i * (num_layers - 1) / 3) for i in range(4)})
    layers = [_layer_index(i, num_layers, "layers") for i in layers]
    maps, geometry = [], []
    for i in layers:
        layer = rec.geometry[i]
        # A packed call's grids are per image (grid is None): this image's tokens come first.
        grid = layer.grid or layer.image_grids[0]
        per_token = rec.per_layer[i][0].float().mean(0).cpu()  # mean over heads
        maps.append(per_token[:grid[0] * grid[1]].reshape(grid))
        geometry.append(layer.as_dict())
    return maps, pixels, [rec.layers[i] for i in layers], geometry


def image_prefix_maps(
    model,
    image,
    *,
    layer: int | None = None,
    image_size: str | int | Sequence[int] | None = None,
    device: str | torch.device | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor, str, dict]:
    """The attention of each head's tokens without a position (CLS, registers) over one image, at one layer.

    Args:
        model, image, image_size, device: as for :func:`mad_maps`.
        layer: a layer index; the class-attention layers (CaiT, VOLO: their class token's maps) follow the
            recorded layers, ``len(rec.layers) + i``; by default the last layer that has maps.

    Returns:
        ``(maps, pixels, name, geometry)``: ``maps`` ``[H, Q, grid_h, grid_w]`` float32 (head, prefix token in
        token order, grid), ``pixels`` the model input ``[3, H, W]``, the layer's name and geometry.

    Raises:
        OptionError: no recorded layer has such maps (no CLS or register token, or keys that are not the
            queries), or ``layer`` has none.
    """
    rec, pixels = _record_one_image(model, image, image_size, device, stats=["prefix_maps"])
    call = rec.calls[-1]
    names, all_maps, all_geometry = zip(*call.map_layers)
    with_maps = [i for i, m in enumerate(all_maps) if m is not None]
    if not with_maps:
        raise OptionError("model", f"no recorded layer of {type(rec.model).__name__} has tokens without a position "
                          "(CLS, registers) attending over its own grid, and it has no class attention: no prefix maps")
    if layer is None:
        layer = with_maps[-1]
    described = (f"{len(rec.layers)} recorded layers and, after them, the {len(call.class_layers)} class-attention "
                 "or pooling layers") if call.class_layers else None
    layer = _layer_index(layer, len(all_maps), "layer", described)
    if layer not in with_maps:
        raise OptionError("layer", f"layer {layer} has no prefix maps; layers with maps: {with_maps}")
    geometry = all_geometry[layer]
    grid = geometry.grid or geometry.image_grids[0]
    maps = all_maps[layer][0].float().cpu()  # [H, Q, T] of the one image
    maps = maps[..., :grid[0] * grid[1]].reshape(*maps.shape[:2], *grid)
    return maps, pixels, names[layer], geometry.as_dict()
