"""Hiera (timm ``hiera``, transformers ``HieraModel``): mask-unit attention over "unrolled" tokens.

Hiera keeps its tokens in *unroll* order, not row-major. Starting from the ``gh x gw`` patch grid, each entry
``(sy, sx)`` of the unroll schedule (one per stage change, usually ``(2, 2)``) splits every row index into
``row // sy, row % sy`` (columns alike) and moves the ``(row % sy, col % sx)`` digits in front of the sequence,
so that:

- a query pooling by ``sy * sx`` (``x.view(B, sy * sx, -1, C).amax(1)``) max-pools ``sy x sx`` cells, and the
  pooled sequence is again in unroll order, with one schedule entry consumed;
- the last ``nW`` positions of the order enumerate the mask units (``8 x 8`` patches at stage 1), so mask-unit
  attention reads its windows as ``x.view(B, tokens_per_window, nW, C)``: token ``t`` is in window
  ``t % nW``. Later stages attend globally.

A call is ``[B, heads, nW, Nq, Nk]`` (mask units) or ``[B, heads, Nq, Nk]`` (global; transformers keeps
``nW = 1``), with ``Nq = Nk / q_stride`` in the first block of a pooled stage: pooled queries against unpooled
keys. This module replays the unroll on the cells' integer ``(row, col)`` and follows each pooling, checking that
the tokens pooled together are one ``sy x sx`` cell (else it refuses), then places each token at its cell's
centre in input pixels: the patch stride (4) times the pooling so far (stages at 4, 8, 16, 32 pixels).

Masked inputs (MAE pretraining, ``mask=`` in timm) drop mask units; the token count then no longer matches the
patch grid and the call is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..module_index import module_list, named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, on_device
from .stages import innermost_on_path

__all__ = ["placer", "attention_modules", "unrolled_cells"]

# (attention class, its module suffix) -> (class of the model owning the unroll, attribute names of the
# attention: heads, flattened query stride, mask unit size after pooling, mask-unit attention switch).
_DESIGNS = {
    ("MaskUnitAttention", "hiera"): (("Hiera",), ("heads", "q_stride", "window_size", "use_mask_unit_attn")),
    ("HieraMaskUnitAttention", "modeling_hiera"): (("HieraModel", "HieraBackbone"),
                                                   ("num_heads", "query_stride", "window_size", "use_mask_unit_attn")),
}
_GRID = "hiera.grid"


def _key(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, cls.__module__.rpartition(".")[2]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """transformers' ``HieraMaskUnitAttention`` (its ``qkv`` is no query/key pair; timm's is found generically)."""
    return {name: m for name, m in named_module_list(model) if _key(m) in _DESIGNS}


def _owner(model: nn.Module, name: str, owner_classes: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    """The Hiera model (timm ``Hiera``, transformers ``HieraModel``) that holds the attention module ``name``: the
    innermost module of an owner class on the path to it (the path's prefixes only, not every module)."""
    return innermost_on_path(model, name, lambda module: type(module).__name__ in owner_classes)


def placer(model: nn.Module, name: str, module: nn.Module):
    design = _DESIGNS.get(_key(module))
    if design is None:
        return None
    owner_classes, attributes = design
    owner = _owner(model, name, owner_classes)
    if owner is None:
        return None
    owner_name, owner_module = owner
    relative = name[len(owner_name) + 1:] if owner_name else name
    if not relative.startswith("blocks." if type(owner_module).__name__ == "Hiera" else "encoder."):
        return None  # transformers' MAE decoder runs on rerolled tokens: not this layout
    return HieraPlacer(model, name, owner_module, attributes)


def unrolled_cells(grid: tuple[int, int], schedule: list[tuple[int, int]]) -> torch.Tensor:
    """``[gh * gw, 2]`` integer ``(row, col)`` of each token of a ``gh x gw`` grid in Hiera's unroll order."""
    gh, gw = grid
    cells = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
    x, batch, size = cells.view(1, gh, gw, 2), 1, [gh, gw]
    for sy, sx in schedule:
        size = [size[0] // sy, size[1] // sx]
        # [B, H/sy, sy, W/sx, sx, 2] -> [B, sy, sx, H/sy, W/sx, 2]: the in-cell digits go before the rest.
        x = x.reshape(batch, size[0], sy, size[1], sx, 2).permute(0, 2, 4, 1, 3, 5)
        batch *= sy * sx
        x = x.reshape(batch, size[0], size[1], 2)
    return x.reshape(gh * gw, 2)


class HieraPlacer(LayerPlacer):
    """Places the calls of one Hiera attention module from the unroll order and the poolings before it."""

    def __init__(self, model: nn.Module, name: str, owner: nn.Module, attributes: tuple[str, str, str, str]):
        self.model, self.name, self.owner = model, name, owner
        self.attention = model.get_submodule(name)
        self.attributes = attributes
        # The flattened query strides of this owner's attention modules up to and including this one.
        strides = []
        for module in module_list(owner):
            if _key(module) in _DESIGNS:
                strides.append(int(getattr(module, attributes[1])))
                if module is self.attention:
                    break
        self.pools_before, self.query_stride = [s for s in strides[:-1] if s > 1], strides[-1]
        self.conv = next((m for m in module_list(owner) if isinstance(m, nn.Conv2d)), None)
        self._cache: dict = {}
        self._placed: dict = {}

    def _schedule(self) -> list[tuple[int, int]]:
        unroll = getattr(self.owner, "unroll", None)
        # transformers' HieraBackbone runs its encoder on the row-major tokens, without the unroll.
        schedule = unroll.schedule if unroll is not None else getattr(self.owner, "unroll_schedule", [])
        return [(int(s[0]), int(s[1])) for s in schedule]

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        if self.conv is None:
            return []

        def see(module, args, output) -> None:
            context.values[_GRID, id(self.owner)] = (int(output.shape[-2]), int(output.shape[-1]))

        return [self.conv.register_forward_hook(see)]

    def _layout(self, grid: tuple[int, int]):
        """(key cells, query cells, key stride, query stride factor) of this layer for a patch grid."""
        schedule = self._schedule()
        total = (1, 1)
        for sy, sx in schedule:
            total = (total[0] * sy, total[1] * sx)
        if grid[0] % total[0] or grid[1] % total[1]:
            raise NotPlaceable(f"its patch grid {grid[0]}x{grid[1]} does not divide by the unroll schedule "
                               f"{schedule} ({total[0]}x{total[1]})")
        cells, factor, remaining = unrolled_cells(grid, schedule), (1, 1), list(schedule)
        for flat in self.pools_before + ([self.query_stride] if self.query_stride > 1 else []):
            if not remaining or remaining[0][0] * remaining[0][1] != flat:
                raise NotPlaceable(
                    f"it pools {flat} tokens where the unroll schedule left {remaining}"
                    + (f": {type(self.owner).__name__} does not unroll its tokens, so its query pooling groups "
                       "rows far apart instead of 2x2 cells" if not schedule else "")
                )
            keys, keys_factor = cells, factor
            stride = remaining.pop(0)
            cells, factor = self._pool(cells, stride), (factor[0] * stride[0], factor[1] * stride[1])
        if self.query_stride > 1:
            return keys, cells, keys_factor, factor
        return cells, cells, factor, factor

    @staticmethod
    def _pool(cells: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
        members = cells.view(stride[0] * stride[1], -1, 2) // torch.tensor(stride)
        if not bool((members == members[:1]).all()):
            raise NotPlaceable(f"the tokens its query pooling groups are not {stride[0]}x{stride[1]} cells")
        return members[0]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get((_GRID, id(self.owner)))
        if grid is None:
            raise NotPlaceable("it ran before the patch embedding of its Hiera model")
        heads_name, _, window_name, masked_name = self.attributes
        heads = int(getattr(self.attention, heads_name))
        windowed = bool(getattr(self.attention, masked_name))
        # The placement of a call depends on nothing else: built once, reused by every call of the same shape.
        window = int(getattr(self.attention, window_name))
        placed_key = (grid, tuple(lead), num_queries, num_keys, heads, windowed, window)
        if placed_key not in self._placed:
            self._placed[placed_key] = self._placement(grid, lead, num_queries, num_keys, heads, windowed)
        return self._placed[placed_key]

    def _placement(self, grid: tuple[int, int], lead: torch.Size, num_queries: int, num_keys: int, heads: int,
                   windowed: bool) -> Placement:
        _, _, window_name, _ = self.attributes
        if grid not in self._cache:
            self._cache[grid] = self._layout(grid)
        keys, queries, key_factor, query_factor = self._cache[grid]
        num_windows = keys.shape[0] // (self.query_stride * int(getattr(self.attention, window_name))) \
            if windowed else 1
        tokens_k, tokens_q = keys.shape[0] // num_windows, queries.shape[0] // num_windows
        batch = int(lead[0]) if len(lead) else 0
        shapes = [(batch, heads, num_windows)] + ([(batch, heads)] if num_windows == 1 else [])
        if tuple(lead) not in shapes or (num_queries, num_keys) != (tokens_q, tokens_k):
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; from the "
                f"{grid[0]}x{grid[1]} patch grid vitmad expects [B, {heads}, {num_windows}, {tokens_q}, {tokens_k}] "
                f"({'mask units' if windowed else 'global'}, query stride {self.query_stride}); were mask units "
                "dropped (a mask or MAE pretraining)?"
            )
        patch = tuple(float(s) for s in self.conv.stride)
        key_stride = (patch[0] * key_factor[0], patch[1] * key_factor[1])
        query_stride = (patch[0] * query_factor[0], patch[1] * query_factor[1])
        # Token t of the sequence is in window t % nW, at place t // nW within it.
        key_positions = _centres(keys, key_stride).view(tokens_k, num_windows, 2).transpose(0, 1)
        positions = _centres(queries, query_stride).view(tokens_q, num_windows, 2).transpose(0, 1)
        query_grid = (grid[0] // query_factor[0], grid[1] // query_factor[1])
        flat = queries.view(tokens_q, num_windows, 2).transpose(0, 1).reshape(-1, 2)
        index = flat[:, 0] * query_grid[1] + flat[:, 1]
        order = torch.argsort(index)
        if not torch.equal(index[order], torch.arange(index.numel())):
            raise NotPlaceable(f"its queries do not cover the {query_grid[0]}x{query_grid[1]} grid once each")

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(values.shape[0], values.shape[1], -1)
            return values.index_select(-1, on_device(order, values.device))

        attention = "mask units" if windowed else "global"
        if self.query_stride > 1:
            attention += f", queries pooled {query_factor[0] // key_factor[0]}x{query_factor[1] // key_factor[1]}"
        geometry = LayerGeometry(query_grid, query_stride, attention, heads)
        return Placement(positions, None if queries is keys else key_positions, fold, geometry)


def _centres(cells: torch.Tensor, stride: tuple[float, float]) -> torch.Tensor:
    return (cells.double() + 0.5).mul(torch.tensor(stride, dtype=torch.float64)).float()
