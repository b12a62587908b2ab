"""Token grids of hierarchical vision transformers: the stage a call runs in, pooled and subsampled tokens.

Shared by the families whose attention runs over a feature map that a chain of strided convolutions (patch
embeddings, stems, downsampling layers) made from the image: PVT, Segformer, Twins, MViTv2, PiT, CrossViT, ...

- :class:`StageGrid` follows, in each forward call, the stage embeddings that ran: the latest one's output is
  the grid the next attention layers attend over, and the product of the strides of all that ran is its pixel
  stride (per axis), so every stage's MAD is in pixels of the input image.
- :func:`strided_centres` and :func:`adaptive_centres` place the tokens a pooling (convolution, average or max
  pool, strided subsampling, adaptive pool) makes from a grid (docs/definition.md, "Beyond one grid"): the output
  ``i`` of a strided operation of stride ``s`` sits at the centre of its stride cell, ``(i + 0.5) * s`` cells,
  whatever its kernel or padding, so that it matches the next stage's tokens; an adaptive pooling's output sits
  at the centre of its bin. ``kernel == stride == r`` puts a pooled token at the centre of the ``r x r`` cells it
  pools either way.
- :func:`grid_placement` builds the :class:`~..placement.Placement` of a ``[B, H, Nq, Nk]`` call from the
  positioned tokens of both sides, after checking the counts.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, cell_centres, select_tokens

__all__ = ["matching_design", "reduction_before", "innermost_on_path", "backbone_layer", "Stage", "StageGrid",
           "StagePlacer", "KeyLayout", "global_keys", "strided_modules", "strided_centres", "strided_axis",
           "strided_module_centres", "adaptive_centres", "grid_placement", "pair", "defined_in", "owner_of",
           "owner_or_features", "features_wrapper",
           "forward_arguments"]


def pair(value) -> tuple[int, int]:
    """``(v, v)`` for a number, the pair itself for a pair (conv and pool kernel, stride and padding, window and
    shift sizes; a config may hold a NumPy or tensor scalar)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def forward_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments by parameter name (defaults left out), as a pre-hook ``with_kwargs`` sees them."""
    return inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments


def defined_in(module: nn.Module, class_name: str, module_suffix: str) -> bool:
    """Whether ``module`` is an instance of the class ``class_name`` defined in a module named ``*module_suffix``
    (timm and transformers reuse class names such as ``Attention`` across families)."""
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__.rpartition(".")[2] == module_suffix


def backbone_layer(model: nn.Module, name: str, backbone_class: str,
                   module_suffix: str) -> tuple[nn.Module | None, nn.Module | None]:
    """``(backbone, layer)`` of the attention module ``name``: the innermost ``backbone_class`` (defined in
    ``*module_suffix``) on its path and the module holding it (its block, whose flags say window or global), each
    None where there is none."""
    found = innermost_on_path(model, name, lambda owner: defined_in(owner, backbone_class, module_suffix))
    parent = name.rpartition(".")[0]
    return None if found is None else found[1], model.get_submodule(parent) if parent else None


def innermost_on_path(model: nn.Module, name: str, test) -> tuple[str, nn.Module] | None:
    """The innermost module on the path to module ``name`` (its ancestors, the model itself included, not ``name``)
    for which ``test(module)`` holds, with its qualified name, or None: the tower or backbone that holds an
    attention module."""
    found = None
    parts = name.split(".")
    for depth in range(len(parts)):
        owner_name = ".".join(parts[:depth])
        module = model.get_submodule(owner_name) if owner_name else model
        if test(module):
            found = owner_name, module
    return found


def innermost_holders(model: nn.Module, recorded, test) -> tuple[list[nn.Module], list[nn.Module]]:
    """The modules of ``model`` for which ``test`` holds that hold ``recorded`` modules, each the innermost such
    module on the path to one of them, in module order; and the ``recorded`` modules in none of them (the networks
    whose maps a family follows: MONAI's UNets and autoencoders, diffusers' autoencoder networks)."""
    inside = {id(m) for m in recorded}
    found, held = {}, set()
    for name, module in named_module_list(model):
        if id(module) in inside and name:
            holder = innermost_on_path(model, name, test)
            if holder is not None:
                found[id(holder[1])] = holder[1]
                held.add(id(module))
    order = {id(m): i for i, m in enumerate(module_list(model))}
    return sorted(found.values(), key=lambda m: order[id(m)]), [m for m in recorded if id(m) not in held]


def owner_of(model: nn.Module, class_name: str, module_suffix: str) -> nn.Module | None:
    """The first module of ``model`` (itself included) of the class ``class_name`` defined in ``*module_suffix``:
    the model around an attention module (PiT, CrossViT, NextViT, CSATv2), or None."""
    return next((m for m in module_list(model) if defined_in(m, class_name, module_suffix)), None)


# timm's features_only wrappers: they hold the model's children (its stem, stages, ...) in their order, flattened
# one level at most, and no module of the model's own class (timm.models._features).
_FEATURE_WRAPPERS = ("FeatureListNet", "FeatureDictNet", "FeatureHookNet")


def features_wrapper(model: nn.Module) -> nn.Module | None:
    """The timm ``features_only`` wrapper in ``model`` (itself included), or None: where the model's own class is
    gone, it stands for the model wherever the modules' order is all that is read (the strides before each
    attention; a None owner crashed, QA 293: EfficientFormerV2, NextViT)."""
    return next((m for m in module_list(model) if any(defined_in(m, name, "_features") for name in _FEATURE_WRAPPERS)),
                None)


def owner_or_features(model: nn.Module, class_name: str, module_suffix: str) -> nn.Module | None:
    """:func:`owner_of`, or where ``model`` holds no module of that class, its :func:`features_wrapper`."""
    return owner_of(model, class_name, module_suffix) or features_wrapper(model)


def matching_design(module: nn.Module, designs, attribute: str):
    """The first of ``designs`` (each with a ``module`` attribute: the defining module's full name) whose class
    name in ``attribute`` is ``module``'s class, or None."""
    cls = type(module)
    return next((d for d in designs if cls.__module__ == d.module and cls.__name__ == getattr(d, attribute)), None)


def reduction_before(model: nn.Module, target: nn.Module, inside: tuple[type, ...] = ()) -> int:
    """The product of the strides of the convolutions registered before ``target``: the nominal pixel stride of
    the map ``target`` runs on, in models whose modules are registered in the order they run and whose every
    convolution is on the main path (MobileViT, the MobileNet hybrids; square strides). Convolutions inside
    modules of the classes ``inside`` (attention modules pooling their own keys) do not count."""
    reduction = 1
    skipped = {id(m) for outer in module_list(model) if isinstance(outer, inside) for m in module_list(outer)}
    for module in module_list(model):
        if module is target:
            return reduction
        if isinstance(module, nn.Conv2d) and id(module) not in skipped:
            reduction *= pair(module.stride)[0]
    raise ValueError(f"{type(target).__name__} is not a module of {type(model).__name__}")


@dataclass(frozen=True)
class Stage:
    """The grid of the latest stage embedding that ran: ``index`` into the embeddings, ``grid`` its output
    ``(h, w)``, ``stride`` the input pixels per cell (per axis)."""

    index: int
    grid: tuple[int, int]
    stride: tuple[float, float]


class StageGrid:
    """Follows a hierarchical model's stage embeddings during each forward call.

    Args:
        model: the model (named in messages).
        embeddings: the strided modules that make each stage's grid, in the order they run (a stem's
            convolutions, patch embeddings, downsampling convolutions); each must return ``[B, C, h, w]``.
        strides: each embedding's stride (an int or a pair), for embeddings that are not convolutions or pools
            (CSATv2's block-DCT stem); by default each module's own ``stride``.
    """

    def __init__(self, model: nn.Module, embeddings: list[nn.Module], strides=None):
        self.model = model
        self.embeddings = embeddings
        self.strides = [pair(m.stride) for m in embeddings] if strides is None else [pair(s) for s in strides]
        if len(self.strides) != len(embeddings):
            raise ValueError(f"StageGrid: {len(embeddings)} embeddings but {len(self.strides)} strides")
        self.key = ("stages.grid", id(self))

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, output, index) -> None:
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise RuntimeError(
                    f"vitmad.record: stage embedding {index} ({type(module).__name__}) of "
                    f"{type(self.model).__name__} returned {shape}, expected [B, C, h, w]"
                )
            previous = context.values.get(self.key)
            # The first embedding takes the image: a model run again within one call (an EsViT trainer runs its
            # teacher CvT twice) starts from the image again, not from the last stage of its previous run (its
            # second run was placed at 16 times its strides).
            stride = (1.0, 1.0) if previous is None or index == 0 else previous.stride
            sy, sx = self.strides[index]
            grid = (int(output.shape[-2]), int(output.shape[-1]))
            context.values[self.key] = Stage(index, grid, (stride[0] * sy, stride[1] * sx))

        return [module.register_forward_hook(lambda m, a, o, i=i: see(m, a, o, i))
                for i, module in enumerate(self.embeddings)]

    def current(self, context: CallContext) -> Stage:
        stage = context.values.get(self.key)
        if stage is None:
            raise NotPlaceable("it ran before any stage embedding of the model, so its token grid is unknown")
        return stage


def strided_modules(model: nn.Module, inside: tuple[nn.Module, ...] = ()) -> list[nn.Module]:
    """The convolutions and pools of stride above 1 of ``model`` in module order, but for those inside
    ``inside`` (attention modules, whose own poolings do not change the model's grid): the stage embeddings of
    a convolutional hierarchy whose modules are registered in the order they run."""
    skipped = {id(m) for outer in inside for m in module_list(outer)}
    return [m for m in module_list(model)
            if isinstance(m, (nn.Conv2d, nn.AvgPool2d, nn.MaxPool2d)) and id(m) not in skipped
            and pair(m.stride) != (1, 1)]


def strided_centres(grid: tuple[int, int], stride: tuple[float, float], kernel, step, padding, dilation=1,
                    ceil_mode: bool = False) -> tuple[tuple[int, int], torch.Tensor]:
    """The output grid of a strided operation (convolution, pool, subsampling ``x[::step]``) over ``grid``, and
    the pixel centre of each output's stride cell: ``((h, w), [h * w, 2])``.

    The size is PyTorch's (floor, or ceil with ``ceil_mode``, where a last window must start inside the input or
    its left padding). Output ``i`` sits at the centre of its stride cell, cells ``step * i ... step * i + step
    - 1`` of the input grid, at pixel ``(i + 0.5) * step * stride``, whatever the kernel, padding or dilation
    (docs/definition.md, "Beyond one grid"): so it lands on the cell centres of the ``step``-times coarser grid
    the model's next stage runs on, also where rounding lets a cell pass the image edge.
    """
    sizes, axes = zip(*(strided_axis(n, s, k, st, p, d, ceil_mode) for n, s, k, st, p, d in zip(
        grid, stride, pair(kernel), pair(step), pair(padding), pair(dilation))))
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return (sizes[0], sizes[1]), centres.reshape(-1, 2).float()


def strided_axis(n: int, stride: float, kernel: int, step: int, padding: int, dilation: int = 1,
                 ceil_mode: bool = False) -> tuple[int, torch.Tensor]:
    """One axis of :func:`strided_centres`: the output count of a strided operation over ``n`` cells of
    ``stride`` pixels (or frames, for a video's time axis), and the centre of each output's stride cell, float64
    ``[count]``."""
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // step) if ceil_mode else span // step) + 1
    if ceil_mode and (out - 1) * step >= n + padding:
        out -= 1  # PyTorch drops a last window that would start in the right padding
    if out < 1:
        raise NotPlaceable(f"a {kernel}-wide pooling with stride {step} and padding {padding} leaves no token of {n}")
    return out, (torch.arange(out, dtype=torch.float64) + 0.5) * step * stride


def strided_module_centres(grid: tuple[int, int], stride: tuple[float, float], pool: nn.Module) -> tuple[
        tuple[int, int], torch.Tensor]:
    """:func:`strided_centres` of a ``Conv2d``, ``AvgPool2d`` or ``MaxPool2d`` module (its kernel, stride,
    padding, dilation and ``ceil_mode``)."""
    if isinstance(getattr(pool, "padding", 0), str):
        raise NotPlaceable(f"its tokens are pooled by a {type(pool).__name__} with padding={pool.padding!r}, "
                           "whose output size vitmad does not derive")
    return strided_centres(grid, stride, pool.kernel_size, pool.stride, pool.padding, getattr(pool, "dilation", 1),
                           bool(getattr(pool, "ceil_mode", False)))


def adaptive_centres(grid: tuple[int, int], stride: tuple[float, float], output) -> torch.Tensor:
    """``[oh * ow, 2]`` pixel centres of the cells of ``AdaptiveAvgPool2d(output)`` over ``grid``: output ``i``
    of ``o`` averages input cells ``floor(i * n / o)`` to ``ceil((i + 1) * n / o) - 1``."""
    axes = []
    for n, s, o in zip(grid, stride, pair(output)):
        starts = [math.floor(i * n / o) for i in range(o)]
        ends = [math.ceil((i + 1) * n / o) for i in range(o)]
        axes.append(torch.tensor([(a + b) / 2 * s for a, b in zip(starts, ends)], dtype=torch.float64))
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 2).float()


# A function of (grid, stride) -> (key positions or None for the queries' own, words for the geometry).
KeyLayout = Callable[[tuple[int, int], tuple[float, float]], tuple["torch.Tensor | None", str]]


def global_keys(grid, stride):
    """The keys are the queries: global attention over the grid."""
    return None, "global"


class StagePlacer(LayerPlacer):
    """Queries: the stage's grid (after ``prefix`` tokens without a position); keys: pooled from it.

    Args:
        stages: the model's stage embeddings.
        keys: the key layout of this layer; by default the queries themselves.
        prefix: per stage embedding index, the tokens before the grid (PVT v1's CLS in its last stage, PiT's
            CLS and distillation tokens).
    """

    def __init__(self, stages: StageGrid, keys: KeyLayout = global_keys,
                 prefix: Callable[[int], int] = lambda index: 0):
        self.stages, self.keys, self.prefix = stages, keys, prefix

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        return self.stages.install(context)

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        stage = self.stages.current(context)
        keys, words = self.keys(stage.grid, stage.stride)
        return grid_placement(lead, num_queries, num_keys, grid=stage.grid, stride=stage.stride, attention=words,
                              prefix=self.prefix(stage.index), keys=keys)


def _with_prefix(prefix: int, cells: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((prefix, 2), float("nan")), cells])


def grid_placement(
    lead: torch.Size,
    num_queries: int,
    num_keys: int,
    *,
    grid: tuple[int, int],
    stride: tuple[float, float],
    attention: str,
    prefix: int = 0,
    queries: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    key_prefix: int | None = None,
) -> Placement:
    """The placement of a ``[B, H, Nq, Nk]`` call: ``prefix`` tokens without a position, then the queries.

    Args:
        lead: the call's leading dims, ``[B, H]``.
        num_queries, num_keys: the call's ``Nq`` and ``Nk``.
        grid, stride: the grid the queries are folded onto and its pixels per cell.
        attention: what the layer attends over, in words.
        prefix: query tokens without a position before the grid's (CLS, distillation).
        queries: ``[gh * gw, 2]`` query positions in grid order; by default the cell centres of ``grid``.
        keys: ``[Nk - key_prefix, 2]`` key positions; by default the keys are the queries.
        key_prefix: key tokens without a position before them; by default ``prefix``.

    Raises:
        NotPlaceable: the call's shape does not have these token counts.
    """
    cells = cell_centres(*grid, stride).reshape(-1, 2) if queries is None else queries
    key_prefix = prefix if key_prefix is None else key_prefix
    expected_keys = key_prefix + (cells.shape[0] if keys is None else keys.shape[0])
    if len(lead) != 2 or num_queries != prefix + cells.shape[0] or num_keys != expected_keys:
        raise NotPlaceable(
            f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; expected "
            f"[B, H, {prefix + cells.shape[0]}, {expected_keys}]: "
            + (f"{prefix} tokens without a position and " if prefix else "")
            + f"a {grid[0]}x{grid[1]} grid of queries, attending over {attention}"
        )
    if keys is not None and key_prefix == prefix and keys.shape == cells.shape and torch.equal(keys, cells):
        # Keys made from the map at the queries' own cells (a stride-1 key convolution: CvT's kv_proj_stride 1,
        # Twins' global_k 1, MobileNetV4's kv_stride 1), one per cell in the same order: key i is query i's token,
        # as where MViTv2 pools both alike, so the self mass is measured (it was NaN, as beside pooled keys; QA 248).
        keys = None
    positions = _with_prefix(prefix, cells)
    key_positions = None if keys is None and key_prefix == prefix else _with_prefix(
        key_prefix, cells if keys is None else keys)
    index = torch.arange(prefix, prefix + cells.shape[0])
    geometry = LayerGeometry(tuple(grid), tuple(float(s) for s in stride), attention, int(lead[-1]),
                             prefix if keys is None and key_prefix == prefix else None)
    return Placement(positions, key_positions, select_tokens(index), geometry)
