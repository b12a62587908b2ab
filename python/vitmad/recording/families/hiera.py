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

**Masked inputs** (transformers' MAE pretraining, ``HieraForPreTraining`` / ``HieraModel(is_mae=True)``: a mask
drawn per image as ``argsort(noise)``; timm's ``mask=`` and its training-time ``patch_drop_rate``) drop whole mask
units. Both models take a bool ``mask [B, U]`` over the ``U`` mask units (True: kept), tile it over the unrolled
sequence (token ``t`` belongs to unit ``t % U``, the unroll's last digits) and keep the tokens it marks, in
sequence order: ``tokens_per_unit x K`` tokens for ``K`` kept units. A hook on the module that receives the mask
(timm's ``PatchEmbed``, its ``mask=`` argument; transformers' ``HieraPatchEmbeddings``, its returned
``bool_masked_pos``) reads it in every call; the kept tokens' cells are selected from the unrolled cells the same
way, and the poolings and windows that follow are applied to them per image (mask-unit attention then has one
window per kept unit). Each kept token sits at its own cell; the per-query values fold onto the full query grid
with the dropped cells absent (NaN, ``Placement.present`` False), so an image's MAD is the mean over its kept
tokens.

**The MAE decoder** (``HieraForPreTraining.decoder``, a ``HieraDecoder``; recorded when named in ``layers=``, as
``decoder.decoder_block.layers.*.attn``, not by default) attends globally (no mask units, query stride 1) over the
full final-stage grid, row-major. ``HieraDecoder.forward`` embeds the encoder's kept tokens, rerolled per kept mask
unit ``[B, K, uh, uw, C]``, scatters them into ``[B, U, uh, uw, C]`` at the units ``bool_masked_pos`` keeps (the
others get the mask token), and ``undo_windowing`` views the ``U`` units as their ``U_h x U_w`` grid (unit ``u`` at
``divmod(u, U_w)``, as the patch embedding views the mask) and interleaves them to ``[B, U_h * uh, U_w * uw, C]``,
flattened row-major: token ``n`` is cell ``divmod(n, gw')`` of the ``gh' x gw'`` grid
(``tokens_spatial_shape_final``, the patch grid over ``query_stride ** num_query_pool``). Its position embeddings
are indexed so, and its prediction of token ``n`` is compared with the ``pred_stride``-pixel patch ``n`` of the
image, row-major. Every cell is a token: a kept one or a mask token, which stands for its cell as ViTMAE's do. A
cell is ``patch stride x query_stride ** num_query_pool`` pixels. Each call is checked against what hooks saw in that
forward: the patch grid of the encoder's embedding (the decoder's grid must be it pooled) and the decoder's input.
"""

from __future__ import annotations

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
)
from .stages import innermost_on_path

__all__ = ["placer", "attention_modules", "unrolled_cells"]

_UNGROUPED = "the tokens its query pooling groups are not"  # (its refusal, told apart where a mask is given)

# (attention class, its module suffix) -> (class of the model owning the unroll, attribute names of the
# attention: heads, flattened query stride, mask unit size after pooling, mask-unit attention switch).
_DESIGNS = {
    ("MaskUnitAttention", "hiera"): (("Hiera",), ("heads", "q_stride", "window_size", "use_mask_unit_attn")),
    ("HieraMaskUnitAttention", "modeling_hiera"): (("HieraModel", "HieraBackbone"),
                                                   ("num_heads", "query_stride", "window_size", "use_mask_unit_attn")),
}
_GRID = "hiera.grid"
# + id(owner): the bool [B, U] mask of the current call; None for an unmasked one, or one keeping every unit.
_MASK = "hiera.mask"
# The modules that receive the mask (module suffix of the class): timm's as its ``mask=`` argument, transformers'
# in its output ``(embeddings, bool_masked_pos, ids_restore)``.
_MASK_READERS = {("PatchEmbed", "hiera"): "argument", ("HieraPatchEmbeddings", "modeling_hiera"): "output"}
_DECODER = ("HieraDecoder", "modeling_hiera")
_DECODER_INPUT = "hiera.decoder"  # + id(decoder): (encoder_hidden_states shape, bool_masked_pos shape) of the call


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
    decoder = innermost_on_path(model, name, lambda m: _key(m) == _DECODER)
    if decoder is not None:
        return _decoder_placer(model, name, module, *decoder)
    owner = _owner(model, name, owner_classes)
    if owner is None:
        return None
    owner_name, owner_module = owner
    relative = name[len(owner_name) + 1:] if owner_name else name
    if not relative.startswith("blocks." if type(owner_module).__name__ == "Hiera" else "encoder."):
        return None  # outside the blocks that run on the unrolled tokens: not this layout
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
        self.masking = next((m for m in module_list(owner) if _key(m) in _MASK_READERS), None)
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

        def read_mask(module, args, kwargs, output) -> None:
            key = (_MASK, id(self.owner))
            if key in context.values:  # every layer's placer hooks the same module: the first hook of the call reads it
                return
            if _MASK_READERS[_key(module)] == "argument":
                mask = kwargs.get("mask", args[1] if len(args) > 1 else None)  # timm: [B, 1, U_h, U_w]
            else:
                mask = output[1]  # transformers: bool_masked_pos [B, U]
            if mask is not None:
                mask = mask.detach().reshape(mask.shape[0], -1)
                if mask.dtype == torch.bool and bool(mask.all()):
                    mask = None  # every unit kept: the unmasked layout (read once per call, not once per layer)
            context.values[key] = mask

        handles = [self.conv.register_forward_hook(see)]
        if self.masking is not None:
            handles.append(self.masking.register_forward_hook(read_mask, with_kwargs=True))
        return handles

    def _unrolled(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[gh * gw, 2]`` the cells of the model's unrolled sequence for a patch grid."""
        schedule = self._schedule()
        total = (1, 1)
        for sy, sx in schedule:
            total = (total[0] * sy, total[1] * sx)
        if grid[0] % total[0] or grid[1] % total[1]:
            raise NotPlaceable(f"its patch grid {grid[0]}x{grid[1]} does not divide by the unroll schedule "
                               f"{schedule} ({total[0]}x{total[1]})")
        return unrolled_cells(grid, schedule)

    def _not_unrolled(self, flat: int) -> str:
        """The refusal of a pooling layer of a model that does not unroll its tokens (transformers' HieraBackbone
        runs its blocks on the row-major sequence), naming the layers before the first pooling, which it can
        record."""
        inside = {id(m) for m in module_list(self.owner)}
        unpooled = []
        for name, module in named_module_list(self.model):
            if id(module) in inside and _key(module) in _DESIGNS:
                if int(getattr(module, self.attributes[1])) > 1:
                    break
                unpooled.append(name)
        # Listed whole, however many, so that it can be pasted (a list shortened with "..." could not).
        return (f"it pools {flat} tokens into each query, and {type(self.owner).__name__} does not unroll its tokens "
                "(it runs its blocks on the row-major sequence), so the tokens a pooled query takes the maximum over "
                "lie far apart in the image and it stands for no cell; record the layers before the first pooling, "
                f"layers={unpooled!r} ({len(unpooled)} of them), or HieraModel, which unrolls its tokens, for every "
                "stage")

    def _layout(self, cells: torch.Tensor):
        """(key cells, query cells, key stride factor, query stride factor) of this layer: the cells ``[B, N, 2]``
        of the sequence that enters the first block (B = 1 when every image has them all) followed through the
        poolings up to this layer."""
        schedule = self._schedule()
        factor, remaining = (1, 1), list(schedule)
        for flat in self.pools_before + ([self.query_stride] if self.query_stride > 1 else []):
            if not schedule:
                raise NotPlaceable(self._not_unrolled(flat))
            if not remaining or remaining[0][0] * remaining[0][1] != flat:
                left = f"a step of {remaining[0][0]}x{remaining[0][1]} next" if remaining else "no step left"
                raise NotPlaceable(f"it pools {flat} tokens into each query where the model's unroll schedule "
                                   f"{schedule} has {left}, so its pooled queries stand for no cell of the image")
            keys, keys_factor = cells, factor
            stride = remaining.pop(0)
            cells, factor = self._pool(cells, stride), (factor[0] * stride[0], factor[1] * stride[1])
        if self.query_stride > 1:
            return keys, cells, keys_factor, factor
        return cells, cells, factor, factor

    @staticmethod
    def _pool(cells: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
        # The model pools x.view(B, sy * sx, -1, C).amax(1): token j with j + N / (sy * sx), ...
        members = cells.view(cells.shape[0], stride[0] * stride[1], -1, 2) // torch.tensor(stride)
        if not bool((members == members[:, :1]).all()):
            raise NotPlaceable(f"{_UNGROUPED} {stride[0]}x{stride[1]} cells")
        return members[:, 0]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get((_GRID, id(self.owner)))
        if grid is None:
            raise NotPlaceable("it ran before the patch embedding of its Hiera model")
        heads_name, _, window_name, masked_name = self.attributes
        heads = int(getattr(self.attention, heads_name))
        windowed = bool(getattr(self.attention, masked_name))
        mask = context.values.get((_MASK, id(self.owner)))
        if mask is not None and mask.dtype != torch.bool:
            raise NotPlaceable(f"its mask is {mask.dtype}; vitmad places the mask units a bool mask keeps (True: "
                               "kept), the mask Hiera draws and indexes its tokens with")
        window = int(getattr(self.attention, window_name))
        if mask is not None:
            # The layers of one call share the kept cells, and those of one layout (the poolings before, the query
            # stride, the windows, the call's shape) their placement.
            cells_key = (_MASK + ".cells", id(self.owner))
            if cells_key not in context.values:
                context.values[cells_key] = (self._kept_cells(grid, mask), (int(mask[0].sum()), int(mask.shape[1])))
            cells, kept = context.values[cells_key]
            layout_key = (_MASK + ".placed", id(self.owner), tuple(self.pools_before), self.query_stride, tuple(lead),
                          num_queries, num_keys, heads, windowed, window)
            if layout_key not in context.values:
                try:
                    layout = self._layout(cells)
                except NotPlaceable as error:
                    if not str(error).startswith(_UNGROUPED):
                        raise
                    # QA 356: a mask unit smaller than the total query stride: once each kept unit is one token,
                    # a later pooling groups tokens of different units, which lie anywhere on the image.
                    raise NotPlaceable(
                        f"{error}: with a mask, each kept mask unit is pooled to fewer tokens at every query "
                        "pooling, and this one groups tokens of different units (its mask units are smaller than "
                        "the poolings' total stride); run it without a mask, or build it with mask units at least "
                        "as large as the total query stride") from None
                context.values[layout_key] = self._placement(grid, layout, lead, num_queries, num_keys, heads,
                                                             windowed, kept)
            return context.values[layout_key]
        # The placement of an unmasked call depends on nothing else: built once, reused by every call of the shape.
        placed_key = (grid, tuple(lead), num_queries, num_keys, heads, windowed, window)
        if placed_key not in self._placed:
            if grid not in self._cache:
                self._cache[grid] = self._layout(self._unrolled(grid).unsqueeze(0))
            self._placed[placed_key] = self._placement(grid, self._cache[grid], lead, num_queries, num_keys, heads,
                                                       windowed)
        return self._placed[placed_key]

    def _kept_cells(self, grid: tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
        """``[B, M, 2]`` the cells of the tokens a bool ``mask [B, U]`` keeps, in the model's sequence order."""
        cells = self._unrolled(grid)
        tokens, units = cells.shape[0], mask.shape[1]
        if tokens % units:
            raise NotPlaceable(f"its mask covers {units} mask units, which do not divide the {tokens} tokens of its "
                               f"{grid[0]}x{grid[1]} patch grid")
        counts = mask.sum(1).tolist()
        if len(set(counts)) > 1:
            raise NotPlaceable(f"its mask keeps {counts} mask units in the images of the batch; Hiera keeps as many "
                               "in every image")
        # The model tiles the mask over the unrolled sequence (token t is in mask unit t % U, the unroll's last
        # digits) and keeps the tokens it marks, in sequence order.
        keep = mask.cpu().repeat(1, tokens // units)
        return cells[keep.nonzero()[:, 1].view(mask.shape[0], -1)]

    def _placement(self, grid: tuple[int, int], layout, lead: torch.Size, num_queries: int, num_keys: int,
                   heads: int, windowed: bool, kept: tuple[int, int] | None = None) -> Placement:
        """The placement of a call from its layout (:meth:`_layout`); ``kept`` is (kept, all) mask units of each
        image of a masked call (the layout's cells then per image), None for an unmasked one."""
        _, _, window_name, _ = self.attributes
        keys, queries, key_factor, query_factor = layout
        images = keys.shape[0]
        num_windows = keys.shape[1] // (self.query_stride * int(getattr(self.attention, window_name))) \
            if windowed else 1
        tokens_k, tokens_q = keys.shape[1] // max(num_windows, 1), queries.shape[1] // max(num_windows, 1)
        batch = int(lead[0]) if len(lead) else 0
        shapes = [(batch, heads, num_windows)] + ([(batch, heads)] if num_windows == 1 else [])
        if (tuple(lead) not in shapes or (num_queries, num_keys) != (tokens_q, tokens_k)
                or tokens_k * num_windows != keys.shape[1] or (kept is not None and batch != images)):
            seen = (f"its mask keeps {kept[0]} of the {kept[1]} mask units of each of {images} images" if kept
                    else "vitmad saw no mask units dropped in this call")
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; from the "
                f"{grid[0]}x{grid[1]} patch grid vitmad expects [B, {heads}, {num_windows}, {tokens_q}, {tokens_k}] "
                f"({'mask units' if windowed else 'global'}, query stride {self.query_stride}): {seen}"
            )
        patch = tuple(float(s) for s in self.conv.stride)
        key_stride = (patch[0] * key_factor[0], patch[1] * key_factor[1])
        query_stride = (patch[0] * query_factor[0], patch[1] * query_factor[1])
        # Token t of the sequence is in window t % nW, at place t // nW within it.
        key_positions = _centres(keys, key_stride).view(images, tokens_k, num_windows, 2).transpose(1, 2)
        positions = _centres(queries, query_stride).view(images, tokens_q, num_windows, 2).transpose(1, 2)
        if kept is None:  # [nW, T, 2], every image's
            key_positions, positions = key_positions[0], positions[0]
        else:  # [B, 1, nW, T, 2] (or [B, 1, T, 2] for a call without a window dim): each image's, every head's
            key_positions, positions = key_positions.unsqueeze(1), positions.unsqueeze(1)
            if len(lead) == 2:
                key_positions, positions = key_positions.squeeze(2), positions.squeeze(2)
        query_grid = (grid[0] // query_factor[0], grid[1] // query_factor[1])
        num_cells = query_grid[0] * query_grid[1]
        # The per-query values come window by window: the cells in that order, as grid indices.
        flat = queries.view(images, tokens_q, num_windows, 2).transpose(1, 2).reshape(images, -1, 2)
        index = flat[..., 0] * query_grid[1] + flat[..., 1]
        attention = "mask units" if windowed else "global"
        if self.query_stride > 1:
            attention += f", queries pooled {query_factor[0] // key_factor[0]}x{query_factor[1] // key_factor[1]}"
        if kept is None:
            order = torch.argsort(index[0])
            if not torch.equal(index[0, order], torch.arange(num_cells)):
                raise NotPlaceable(f"its queries do not cover the {query_grid[0]}x{query_grid[1]} grid once each")

            def fold(values: torch.Tensor) -> torch.Tensor:
                values = values.reshape(values.shape[0], values.shape[1], -1)
                return values.index_select(-1, on_device(order, values.device))

            geometry = LayerGeometry(query_grid, query_stride, attention, heads)
            return Placement(positions, None if queries is keys else key_positions, fold, geometry)
        ordered = index.sort(1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()) or int(ordered.min()) < 0 or \
                int(ordered.max()) >= num_cells:
            raise NotPlaceable(f"its queries do not fall on distinct cells of the {query_grid[0]}x{query_grid[1]} "
                               "grid")

        def fold_kept(values: torch.Tensor) -> torch.Tensor:
            # values [B, H, nW, T] -> [B, H, cells]: each kept query at its own cell, the dropped ones NaN.
            values = values.reshape(values.shape[0], values.shape[1], -1)
            cells = on_device(index, values.device).unsqueeze(1).expand(values.shape[0], values.shape[1], -1)
            return values.new_full((*values.shape[:2], num_cells), float("nan")).scatter(-1, cells, values)

        present = torch.zeros(images, num_cells, dtype=torch.bool).scatter_(1, index, True)
        geometry = LayerGeometry(query_grid, query_stride, f"{attention} ({kept[0]} of {kept[1]} mask units kept)",
                                 heads)
        return Placement(positions, None if queries is keys else key_positions, fold_kept, geometry,
                         present=present)


def _centres(cells: torch.Tensor, stride: tuple[float, float]) -> torch.Tensor:
    return (cells.double() + 0.5).mul(torch.tensor(stride, dtype=torch.float64)).float()


def _decoder_placer(model: nn.Module, name: str, module: nn.Module, decoder_name: str,
                    decoder: nn.Module) -> LayerPlacer:
    """The placer of an attention module of transformers' ``HieraDecoder``, or one that refuses every call where
    the decoder is not in a ``HieraForPreTraining`` or does not attend globally at query stride 1."""
    pretraining = innermost_on_path(model, decoder_name, lambda m: type(m).__name__ == "HieraForPreTraining")
    if pretraining is None:
        return RefusingPlacer(
            f"it is in {f'{decoder_name} (a HieraDecoder)' if decoder_name else 'a HieraDecoder'}, recorded "
            "without the HieraForPreTraining around it, whose patch embedding gives the image grid the decoder's "
            "tokens stand for; record the HieraForPreTraining and name this layer in layers="
        )
    if module.use_mask_unit_attn or module.query_stride != 1:
        return RefusingPlacer(
            f"it is in {decoder_name} (HieraDecoder) with use_mask_unit_attn={module.use_mask_unit_attn} and "
            f"query_stride={module.query_stride}; vitmad places the decoder's global attention at query stride 1, "
            "over the final-stage grid"
        )
    return HieraDecoderPlacer(module, decoder_name, decoder, pretraining[1])


class HieraDecoderPlacer(LayerPlacer):
    """Places the calls of one attention module of ``HieraForPreTraining``'s decoder: every cell of the final-stage
    grid, row-major, at its centre (see the module docstring).

    Args:
        attention: the attention module.
        decoder_name: qualified name of its ``HieraDecoder``.
        decoder: that module.
        pretraining: the ``HieraForPreTraining`` holding it (its ``hiera`` embeds the image).
    """

    def __init__(self, attention: nn.Module, decoder_name: str, decoder: nn.Module, pretraining: nn.Module):
        self.heads, self.decoder_name, self.decoder = int(attention.num_heads), decoder_name, decoder
        self.encoder = pretraining.hiera
        self.conv = next(m for m in module_list(self.encoder) if isinstance(m, nn.Conv2d))
        config = pretraining.config
        self.pooling = tuple(int(s) ** int(config.num_query_pool) for s in config.query_stride)
        self._placed: dict = {}

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see(module, args, output) -> None:
            context.values[_GRID, id(self.encoder)] = (int(output.shape[-2]), int(output.shape[-1]))

        def read_input(module, args, kwargs) -> None:
            encoded = args[0] if args else kwargs["encoder_hidden_states"]
            mask = args[1] if len(args) > 1 else kwargs["bool_masked_pos"]
            context.values[_DECODER_INPUT, id(self.decoder)] = (tuple(encoded.shape), tuple(mask.shape))

        return [self.conv.register_forward_hook(see),
                self.decoder.register_forward_pre_hook(read_input, with_kwargs=True)]

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        grid = context.values.get((_GRID, id(self.encoder)))
        if grid is None:
            raise NotPlaceable(
                "it ran in a forward call where the patch embedding of the HieraForPreTraining's encoder did not "
                f"run (the decoder called outside the model's forward), so vitmad does not know the image grid "
                f"{self.decoder_name}'s tokens stand for; call the HieraForPreTraining itself"
            )
        seen = context.values.get((_DECODER_INPUT, id(self.decoder)))
        if seen is None:
            raise NotPlaceable(f"it ran outside the forward of {self.decoder_name} (HieraDecoder), which lays out "
                               "its tokens; vitmad places the decoder's attention in its own forward")
        final = tuple(int(s) for s in self.decoder.tokens_spatial_shape_final)
        unit = tuple(int(s) for s in self.decoder.mask_unit_spatial_shape_final)
        if grid != (final[0] * self.pooling[0], final[1] * self.pooling[1]):
            raise NotPlaceable(
                f"the encoder's patch embedding made a {grid[0]}x{grid[1]} grid in this call, but "
                f"{self.decoder_name} lays its tokens on a {final[0]}x{final[1]} grid, which pooled "
                f"{self.pooling[0]}x{self.pooling[1]} (query_stride ** num_query_pool) comes from a "
                f"{final[0] * self.pooling[0]}x{final[1] * self.pooling[1]} one"
            )
        encoded, mask = seen
        units = (final[0] // unit[0]) * (final[1] // unit[1])
        batch = int(lead[0]) if len(lead) else 0
        if len(encoded) != 5 or encoded[2:4] != unit or mask != (batch, units):
            raise NotPlaceable(
                f"{self.decoder_name} received encoder_hidden_states of shape {list(encoded)} and bool_masked_pos "
                f"of shape {list(mask)}; with its attention's batch of {batch}, vitmad places [{batch}, K, "
                f"{unit[0]}, {unit[1]}, C] kept mask units and a [{batch}, {units}] mask"
            )
        heads = self.heads
        tokens = final[0] * final[1]
        if tuple(lead) not in ((batch, heads, 1), (batch, heads)) or (num_queries, num_keys) != (tokens, tokens):
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}]; over the "
                f"{final[0]}x{final[1]} grid of {self.decoder_name} vitmad expects [{batch}, {heads}, 1, {tokens}, "
                f"{tokens}] (global, every cell a kept token or a mask token)"
            )
        stride = (float(self.conv.stride[0]) * self.pooling[0], float(self.conv.stride[1]) * self.pooling[1])
        key = (final, stride, heads)
        if key not in self._placed:
            positions, = read_only(cell_centres(*final, stride).reshape(tokens, 2), positions=1)
            geometry = LayerGeometry(final, stride, "global over every cell, mask tokens at the dropped mask units",
                                     heads, 0)
            self._placed[key] = Placement(positions, None, _per_image_head, geometry)
        return self._placed[key]


def _per_image_head(values: torch.Tensor) -> torch.Tensor:
    # [B, H, 1, N] or [B, H, N] -> [B, H, N]: the tokens are already the grid, row-major.
    return values.reshape(values.shape[0], values.shape[1], -1)
