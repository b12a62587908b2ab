"""What the windowed and hierarchical families share: a stage's pixel stride, window and grid partitions as token
indices into the stage's feature map, and the placement of a call over such a partition.

A partition is the ``[num_windows, tokens_per_window, 2]`` (row, column) cells of a stage's feature map, in the
order the model lays the windows out (row-major over windows, tokens row-major in each window); cells past the
map's bottom or right edge are padding (a window reaching over the edge). The model's own
partition code is not called: the families read the partition's parameters (window size, grid size) and rebuild
the order here, and the tests check it against the model's eager attention placed by their own geometry.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..module_index import enclosing_modules
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, on_device

__all__ = ["stage_stride", "InputMapPlacer", "block_partition", "grid_partition", "window_placement", "parent_module",
           "PartitionPlacer", "nchw", "nhwc", "whole_map"]


def parent_module(model: nn.Module, name: str) -> nn.Module | None:
    """The module holding ``name`` (None for a top-level module)."""
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else None


def _feature_reduction(model: nn.Module, name: str) -> int | None:
    """The reduction timm's ``feature_info`` gives the stage holding module ``name``, or None: that of the nearest
    module above it whose ``feature_info`` names such a stage (a timm model inside a user's module or an
    nn.Sequential, QA 331: a wrapped NesT was refused)."""
    for prefix, owner in enclosing_modules(model, name):
        reduction = _own_feature_reduction(owner, name[len(prefix) + 1:] if prefix else name)
        if reduction is not None:
            return reduction
    return None


def _own_feature_reduction(model: nn.Module, name: str) -> int | None:
    """As :func:`_feature_reduction`, from ``model``'s own ``feature_info`` alone (``name`` relative to it)."""
    best = None
    infos = getattr(model, "feature_info", None)
    infos = getattr(infos, "info", infos)  # features_only models keep the list in a FeatureInfo
    for info in infos if isinstance(infos, (list, tuple)) else []:
        module = info.get("module") if isinstance(info, dict) else None
        if not module:
            continue
        # features_only models rename their top-level modules: "stages.0" becomes "stages_0".
        owns = name.startswith(module + ".") or name.startswith(module.replace(".", "_") + ".")
        if owns and (best is None or len(module) > len(best[0])):
            best = module, info.get("reduction")
    if best is None:
        best = _numbered_stage(infos, name)
    return None if best is None or best[1] is None else int(best[1])


def _numbered_stage(infos, name: str) -> tuple[str, int] | None:
    """ByobNet (MobileViT) lists its last stage under the 1x1 ``final_conv`` after it, numbered ``stage`` = its
    index + 1: ``(module, reduction)`` of the entry so numbered for a module in ``stages.<i>``, or None."""
    parts = name.replace("stages_", "stages.", 1).split(".")
    if len(parts) < 2 or parts[0] != "stages" or not parts[1].isdigit():
        return None
    for info in infos if isinstance(infos, (list, tuple)) else []:
        if isinstance(info, dict) and info.get("stage") == int(parts[1]) + 1:
            return info.get("module"), info.get("reduction")
    return None


def stage_stride(model: nn.Module, name: str, image: tuple[int, int] | None,
                 grid: tuple[int, int], reduction: int | None = None) -> tuple[float, float]:
    """Pixels of the input image per token of a stage whose feature map is ``grid``.

    The stage's nominal reduction (``reduction`` where the family knows it, else timm's ``feature_info``),
    checked against the call: convolutions with padding round up and pools round down, so a map of side
    ``ceil(image / s)`` or ``floor(image / s)`` has stride ``s``. The ratio of the image to the map is no
    substitute: it is ambiguous for rounded maps (a 66 px image over a 3-token map is 22 px per token, or 32 px
    rounded up), so a stage without a reduction that fits is refused.
    """
    if image is None:
        raise NotPlaceable("it ran before any convolution saw the image, so its pixel scale is unknown")
    # The family's own reading of the stride (its convolutions, its config) is named as such in a refusal: a model
    # without feature_info is not to be told its feature_info disagrees.
    source = "its stage's stride {}, read from the model,"
    if reduction is None:
        reduction = _feature_reduction(model, name)
        source = "its stage's feature_info reduction {}"
    if reduction is None:
        raise NotPlaceable(
            f"{type(model).__name__}.feature_info names no stage holding it, so the pixel stride of its "
            f"{grid[0]}x{grid[1]} map is unknown"
        )
    mismatch = stride_mismatch(image, grid, reduction)
    if mismatch is not None:
        raise NotPlaceable(mismatch.format(source.format(reduction)) + ", so the map's pixel stride is unknown")
    return float(reduction), float(reduction)


def stride_mismatch(image: tuple[int, int], grid: tuple[int, int], stride: float) -> str | None:
    """None when each side of the map ``grid`` is the floor or the ceiling of the image's side over ``stride`` (a
    convolution with padding rounds up, a pool down); else the first side that is not, in words, with ``{}`` where
    the caller names the stride's source."""
    for size, side, axis in zip(image, grid, ("height", "width")):
        if side not in (math.floor(size / stride), math.ceil(size / stride)):
            return (f"its feature map has {axis} {side} for an image {axis} of {size}, but {{}} gives "
                    f"{math.floor(size / stride)} or {math.ceil(size / stride)}")
    return None


class InputMapPlacer(LayerPlacer):
    """Base of the placers of a module that attends over its own input, a stage's ``[B, C, H, W]`` map:
    :meth:`install` keeps the map's size of each call, :meth:`stage` gives it with its pixel stride.

    Args:
        model: the model (its class names the errors; its ``feature_info`` gives the stride).
        name: the module's qualified name.
        module: the attention module.
        reduction: the stage's nominal pixel stride, for models whose ``feature_info`` does not name the stage.
    """

    def __init__(self, model: nn.Module, name: str, module: nn.Module, reduction: int | None = None):
        self.model, self.name, self.module, self.reduction = model, name, module, reduction
        self.key = f"input_map.{name}"

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args) -> None:
            x = args[0] if args else None
            context.values[self.key] = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.dim() == 4 else None

        return [self.module.register_forward_pre_hook(see)]

    def stage(self, context: CallContext) -> tuple[tuple[int, int], tuple[float, float]]:
        """``(grid, stride)`` of the map the module received in this call."""
        grid = context.values.get(self.key)
        if grid is None:
            raise NotPlaceable("its input was not a [B, C, H, W] feature map")
        grid = (int(grid[0]), int(grid[1]))
        return grid, stage_stride(self.model, self.name, context.image_size, grid, self.reduction)


def block_partition(grid: tuple[int, int], window: tuple[int, int]) -> torch.Tensor:
    """Non-overlapping ``window`` blocks of the map, the map padded at the bottom and right to whole windows.

    Window ``(a, b)`` (row-major) holds token ``(i, j)`` (row-major) at map row ``a * wh + i``, column
    ``b * ww + j``; past the map's edge that is a padding cell.
    """
    (gh, gw), (wh, ww) = grid, window
    rows = torch.arange(math.ceil(gh / wh) * wh).view(-1, 1, wh, 1)  # [a, 1, i, 1]
    cols = torch.arange(math.ceil(gw / ww) * ww).view(1, -1, 1, ww)  # [1, b, 1, j]
    rows, cols = torch.broadcast_tensors(rows, cols)
    return torch.stack([rows, cols], dim=-1).reshape(-1, wh * ww, 2)


def grid_partition(grid: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """Dilated grid windows (MaxViT's grid attention): ``cells`` = (gh', gw') tokens per window, one every
    ``grid / cells`` tokens of the map.

    Window ``(a, b)`` (row-major over ``(grid_h / gh', grid_w / gw')``) holds token ``(i, j)`` at map row
    ``i * (grid_h / gh') + a``, column ``j * (grid_w / gw') + b``.
    """
    (gh, gw), (ch, cw) = grid, cells
    if gh % ch or gw % cw:
        raise NotPlaceable(f"its {gh}x{gw} map does not divide into a {ch}x{cw} attention grid")
    step_h, step_w = gh // ch, gw // cw
    rows = torch.arange(ch).view(1, 1, -1, 1) * step_h + torch.arange(step_h).view(-1, 1, 1, 1)
    cols = torch.arange(cw).view(1, 1, 1, -1) * step_w + torch.arange(step_w).view(1, -1, 1, 1)
    rows, cols = torch.broadcast_tensors(rows, cols)
    return torch.stack([rows, cols], dim=-1).reshape(step_h * step_w, ch * cw, 2)


def whole_map(grid: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """Global attention over the whole map as one window."""
    return block_partition(grid, grid), "global"


_ORDERS = ("windows in batch", "windows after heads", "windows before heads")


def window_placement(cells: torch.Tensor, grid: tuple[int, int], stride: tuple[float, float], lead: torch.Size,
                     num_queries: int, num_keys: int, *, order: str, attention: str, prefix: int = 0) -> Placement:
    """The placement of a call attending within windows of a stage's map.

    Padding cells (past the map's bottom or right edge) are attended by the model like any token: as keys they
    sit at their cell of the padded grid, beyond the image edge; as queries they have no position
    (``docs/definition.md``, windows).

    Args:
        cells: ``[num_windows, N, 2]`` (row, column) on the padded map of each window's tokens, windows in the
            model's order, tokens in its order within a window; ``[num_windows, N, 3]`` (slice, row, column) for a
            volume's map (3-D models: the positions are then in three axes, ``LayerGeometry.depth``).
        grid: the stage's feature map ``(grid_h, grid_w)`` (a volume's: ``(depth, grid_h, grid_w)``); every token
            of it is in exactly one window.
        stride: pixels (voxels) per token of that map, one per axis.
        lead: the call's leading dims.
        num_queries, num_keys: the call's attention size; both must be ``N``.
        order: where the windows are in ``lead``: ``"windows in batch"`` (``[B * num_windows, H]``, image-major;
            Swin-style window attention), ``"windows after heads"`` (``[B, H, num_windows]``; NesT) or
            ``"windows before heads"`` (``[B, num_windows, H]``; torchvision's MaxViT).
        attention: the geometry's description.
        prefix: tokens without a position that lead each window's sequence, a token of its own in every window
            (RegionViT's regional token, SepViT's window token): each window's rows are then ``prefix + N``,
            those tokens first; their values are left out of the fold, their rows kept in the prefix maps (the
            geometry counts no prefix tokens, as for RF-DETR's class token copies).
    """
    windows, size, axes = cells.shape
    shown = "x".join(map(str, grid))
    if num_queries != prefix + size or num_keys != prefix + size:
        lead_tokens = f"{prefix} token(s) without a position, then " if prefix else ""
        raise NotPlaceable(
            f"its attention is [{', '.join(map(str, lead))}, {num_queries}, {num_keys}], expected {prefix + size} "
            f"queries and keys per window: {lead_tokens}{size} of the window ({attention} over a {shown} map)"
        )
    shape = [int(d) for d in lead]
    if order == "windows in batch" and len(shape) == 2 and shape[0] % windows == 0:
        batch, heads = shape[0] // windows, shape[1]
    elif order == "windows after heads" and len(shape) == 3 and shape[2] == windows:
        batch, heads = shape[0], shape[1]
    elif order == "windows before heads" and len(shape) == 3 and shape[1] == windows:
        batch, heads = shape[0], shape[2]
    else:
        raise NotPlaceable(
            f"its attention has leading dims {shape}, expected {windows} windows ({order}) of {attention} over a "
            f"{shown} map"
        )
    flat = cells.reshape(-1, axes)
    real = (flat < torch.tensor(grid)).all(-1)
    index = torch.zeros_like(flat[:, 0])
    for axis in range(axes):  # row-major over the map's axes
        index = index * grid[axis] + flat[:, axis]
    tokens = math.prod(grid)
    if not torch.equal(index[real].sort().values, torch.arange(tokens)):
        raise NotPlaceable(f"its windows do not cover the {shown} map exactly once")
    centres = ((flat.double() + 0.5) * torch.tensor(stride, dtype=torch.float64)).float()
    positions = torch.where(real[:, None], centres, float("nan")).view(windows, 1, size, axes)
    key_positions = None if bool(real.all()) else centres.view(windows, 1, size, axes)
    if prefix:
        lead_rows = torch.full((windows, 1, prefix, axes), float("nan"))
        positions = torch.cat([lead_rows, positions], dim=2)
        key_positions = None if key_positions is None else torch.cat([lead_rows, key_positions], dim=2)
    length = prefix + size
    if not bool(real.all()):
        attention += f", padded to {'x'.join(str(int(n) + 1) for n in flat.max(0).values)}"
    if order == "windows in batch":
        positions = positions.repeat(batch, 1, 1, 1)
        key_positions = None if key_positions is None else key_positions.repeat(batch, 1, 1, 1)
    elif order == "windows after heads":
        positions = positions.view(windows, length, axes)
        key_positions = None if key_positions is None else key_positions.view(windows, length, axes)
    # "windows before heads": [num_windows, 1, N, 2] broadcasts over [B, num_windows, H, N, 2] as it is.
    # Where each token of the map is among the window-major values of one image and head.
    inverse = torch.empty(tokens, dtype=torch.long)
    inverse[index[real]] = real.nonzero().squeeze(1)

    def fold(values: torch.Tensor) -> torch.Tensor:
        if order == "windows after heads":
            values = values.reshape(batch, heads, windows, length)
        else:  # windows in batch, or before heads: [B, windows, H, length] either way
            values = values.reshape(batch, windows, heads, length).transpose(1, 2)
        values = values[..., prefix:].reshape(batch, heads, windows * size)
        return values.index_select(-1, on_device(inverse, values.device))

    return Placement(positions, key_positions, fold, LayerGeometry.of_grid(grid, stride, attention, heads),
                     padded_keys=key_positions is not None)


class PartitionPlacer(LayerPlacer):
    """Places a layer attending within a partition of one stage's feature map.

    Args:
        model: the model (its class names the errors; its ``feature_info`` gives the stage's stride).
        name: the attention module's qualified name.
        watch: the module whose input (``output=False``) or output (``output=True``) is the stage's map.
        read_map: ``(batch, grid_h, grid_w)`` of that tensor, or None when it is not such a map.
        partition: ``grid -> (cells, attention)``: the windows of the map (see :func:`window_placement`) and their
            description; read when each call is placed, so partition sizes changed on the model are followed. A
            model that resizes its map before partitioning it (MobileViT, to whole patches) returns ``(cells,
            attention, resized)``: the cells are of the ``resized`` grid, which covers the same image, each token
            at the centre of its bin (bilinear resizing without aligned corners samples there).
        order: where the windows are in the call's leading dims (see :func:`window_placement`).
        output: the map is ``watch``'s output rather than its input.
        reduction: the stage's nominal pixel stride, for models without timm's ``feature_info``.
        prefix: tokens without a position that lead each window's sequence (see :func:`window_placement`).
    """

    def __init__(self, model: nn.Module, name: str, watch: nn.Module,
                 read_map: Callable[[torch.Tensor], tuple[int, int, int] | None],
                 partition: Callable[[tuple[int, int]], tuple[torch.Tensor, str]], order: str, *,
                 output: bool = False, reduction: int | None = None, prefix: int = 0):
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        self.model, self.name, self.watch, self.read_map = model, name, watch, read_map
        self.partition, self.order, self.output, self.reduction = partition, order, output, reduction
        self.prefix = prefix
        self.key = f"windows.map.{name}"
        # The latest placement, reused while the call's shape, map and partition stay the same.
        self._cached: tuple[tuple, Placement] | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(tensor) -> None:
            context.values[self.key] = self.read_map(tensor) if isinstance(tensor, torch.Tensor) else None

        if self.output:
            return [self.watch.register_forward_hook(lambda m, args, out: see(out))]
        return [self.watch.register_forward_pre_hook(lambda m, args: see(args[0] if args else None))]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        seen = context.values.get(self.key)
        if seen is None:
            raise NotPlaceable(
                f"the feature map of its stage was not seen before it ran ({type(self.watch).__name__} did not run "
                "on a [B, C, H, W] / [B, H, W, C] map first)"
            )
        batch, *grid = seen
        grid = (int(grid[0]), int(grid[1]))
        stride = stage_stride(self.model, self.name, context.image_size, grid, self.reduction)
        cells, attention, *resized = self.partition(grid)
        if resized:  # the same image area in more (or fewer) tokens: the stride scales by the ratio of the sizes
            stride = (stride[0] * grid[0] / resized[0][0], stride[1] * grid[1] / resized[0][1])
            grid = (int(resized[0][0]), int(resized[0][1]))
        if _batch(lead, cells.shape[0], self.order) != batch:
            raise NotPlaceable(f"its attention has leading dims {list(lead)} for a batch of {batch} maps")
        key = (grid, stride, tuple(lead), num_queries, num_keys, attention)
        if self._cached is None or self._cached[0] != key:
            placement = window_placement(cells, grid, stride, lead, num_queries, num_keys, order=self.order,
                                         attention=attention, prefix=self.prefix)
            self._cached = key, placement
        return self._cached[1]


def _batch(lead: torch.Size, windows: int, order: str) -> int:
    return int(lead[0]) // windows if order == "windows in batch" else int(lead[0])


def nchw(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(B, H, W)`` of a ``[B, C, H, W]`` map."""
    return (int(x.shape[0]), int(x.shape[2]), int(x.shape[3])) if x.dim() == 4 else None


def nhwc(x: torch.Tensor) -> tuple[int, int, int] | None:
    """``(B, H, W)`` of a ``[B, H, W, C]`` map."""
    return (int(x.shape[0]), int(x.shape[1]), int(x.shape[2])) if x.dim() == 4 else None
