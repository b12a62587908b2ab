"""vitmad.record on torch.nn.MultiheadAttention layers (recording/mha_capture.py): torchvision's ViT and a ViT
built here from nn.MultiheadAttention with each of its input forms and masks.

The reference is each layer's own attention probabilities (need_weights=True, average_attn_weights=False, the
same module, weights and inputs), placed on a patch grid written in the test: CLS first, row-major patches."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import vitmad
from vitmad.recording.recorder import NoLayerError

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels: q and k projected again in float32 vs the layer's own


def _reference(maps, patch, grid, prefix=1) -> torch.Tensor:
    return torch.stack([vitmad.mad_reference(a, patch, num_prefix_tokens=prefix, grid=grid) for a in maps])


def _expected(maps, patch, grid, masks) -> torch.Tensor:
    """``[layers, B, H]`` float64 MAD of the layers' own ``maps``: where a boolean ``key_padding_mask`` hides tokens
    (padding), those are neither keys (zero mass) nor queries of their image (docs/definition.md: sequence padding
    the model masks out has no position); else :func:`_reference`."""
    padded = masks.get("key_padding_mask")
    if padded is None or padded.dtype != torch.bool:
        return _reference(maps, patch, grid)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * patch
    distances = torch.cdist(centres, centres)
    layers = []
    for probabilities in maps:
        per_query = (probabilities.double()[:, :, 1:, 1:] * distances).sum(-1)  # [B, H, T]: the class token first
        layers.append(torch.stack([per_query[b][:, ~padded[b, 1:]].mean(-1) for b in range(len(per_query))]))
    return torch.stack(layers)


def _own_maps(layers, calls) -> list[torch.Tensor]:
    """Each layer's per-head probabilities for the inputs it received (calls: (args, kwargs) per layer)."""
    maps = []
    for layer, (args, kwargs) in zip(layers, calls):
        kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
        with torch.no_grad():
            maps.append(layer(*args, **kwargs)[1])
    return maps


def _spy(layers):
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)),
                                               with_kwargs=True) for layer in layers]
    return calls, handles


def _recorded_with_calls(model, layers, pixels, **options):
    """``(rec, output, calls)``: one forward of ``model`` without grad under ``vitmad.record(**options)``, and the
    inputs each of ``layers`` was called with (for :func:`_own_maps`), its spies removed afterwards."""
    calls, handles = _spy(layers)
    try:
        with torch.no_grad(), vitmad.record(model, **options) as rec:
            output = model(pixels)
    finally:
        for handle in handles:
            handle.remove()
    return rec, output, calls


def test_torchvision_vit_matches_its_layers_own_probabilities():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=80, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64).eval()
    pixels = torch.randn(2, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    layers = [block.self_attention for block in model.encoder.layers]
    calls, handles = _spy(layers)
    with torch.no_grad():
        plain = model(pixels)
        calls.clear()
        with vitmad.record(model) as rec:
            recorded = model(pixels)
    for handle in handles:
        handle.remove()
    assert torch.equal(plain, recorded)
    assert rec.layers == ["encoder.layers.encoder_layer_0.self_attention",
                          "encoder.layers.encoder_layer_1.self_attention"]
    assert rec.layout == vitmad.recording.ModelLayout(patch=16, grid=(5, 5), num_prefix_tokens=1)
    torch.testing.assert_close(rec.mad.double(), _reference(_own_maps(layers, calls), 16, (5, 5)), **TOL)


@pytest.mark.parametrize("strides, kernel, subclassed", [((2, 2), 3, False), ((2, 1, 2, 2), 3, True),
                                                        ((2, 2), None, False)])
def test_torchvision_conv_stem_vit_is_placed_by_its_stems_stride(strides, kernel, subclassed):
    # conv_stem_configs makes conv_proj a stack of 3x3 Conv-BN-ReLU blocks and a 1x1 conv_last: one token per cell of
    # the stem's map, so the tokens lie prod(strides) pixels apart (4 or 8 here; the model needs it to be its patch).
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import ConvStemConfig
    torch.manual_seed(0)
    patch = 1
    for stride in strides:
        patch *= stride
    # kernel None: each convolution's kernel is its stride, which made the first of them a candidate embedding
    # taken before conv_last (QA 371).
    stem = [ConvStemConfig(out_channels=8 * (i + 1), kernel_size=kernel or s, stride=s) for i, s in enumerate(strides)]
    builder = torchvision.models.VisionTransformer
    if subclassed:  # a user's subclass, defined in another module, holds the same stem; its class token is stated
        builder = type("MyViT", (builder,), {"__module__": __name__})
    model = builder(image_size=56, patch_size=patch, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                    conv_stem_configs=stem).eval()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    layers = [block.self_attention for block in model.encoder.layers]
    calls, handles = _spy(layers)
    with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1 if subclassed else None) as rec:
        model(pixels)
    for handle in handles:
        handle.remove()
    grid = (56 // patch, 56 // patch)
    assert rec.layout == vitmad.recording.ModelLayout(patch=patch, grid=grid, num_prefix_tokens=1)
    torch.testing.assert_close(rec.mad.double(), _reference(_own_maps(layers, calls), patch, grid), **TOL)


@pytest.mark.parametrize("adapter", ["lora", "modules_to_save", "lora-stack"])
def test_torchvision_conv_stem_vit_with_lora_on_its_last_convolution(adapter):
    # PEFT's LoRA layer holds the 1x1 conv_last as conv_proj.conv_last.base_layer: read as conv_last (QA 369: refused
    # as having no patch embedding); modules_to_save of the whole stack makes conv_proj PEFT's wrapper, no Sequential
    # (QA 371: refused so too). The adapter, drawn away from zero, changes the tokens, not their places.
    torchvision = pytest.importorskip("torchvision")
    peft = pytest.importorskip("peft")
    from torchvision.models.vision_transformer import ConvStemConfig
    torch.manual_seed(0)
    # lora-stack: LoRA on the stack's convolutions, of kernel == stride, whose lora_A has their kernel and stride
    # (QA 372: taken for the embedding).
    kernel = 2 if adapter == "lora-stack" else 3
    stem = [ConvStemConfig(out_channels=8, kernel_size=kernel, stride=2),
            ConvStemConfig(out_channels=16, kernel_size=kernel, stride=2)]
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32,
                                               mlp_dim=64, conv_stem_configs=stem).eval()
    config = {"lora": peft.LoraConfig(r=4, target_modules=["conv_last"]),
              "modules_to_save": peft.LoraConfig(r=4, target_modules=["out_proj"], modules_to_save=["conv_proj"]),
              "lora-stack": peft.LoraConfig(r=4, target_modules=r".*conv_bn_relu_\d+\.0")}[adapter]
    model = peft.get_peft_model(vit, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name and name.endswith("conv_last.weight"):
                parameter.normal_(std=0.5)
    model.eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    layers = [block.self_attention for block in vit.encoder.layers]
    calls, handles = _spy(layers)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    for handle in handles:
        handle.remove()
    assert [g.stride for g in rec.geometry] == [(4.0, 4.0)] * 2
    torch.testing.assert_close(rec.mad.double(), _reference(_own_maps(layers, calls), 4, (8, 8)), **TOL)


class _MHAViT(nn.Module):
    """A ViT of nn.MultiheadAttention layers: an 8-pixel patch convolution, CLS first, masks passed through."""

    def __init__(self, batch_first=True, same_dim=True, depth=2, dim=24, heads=3, bias=True):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        kdim = None if same_dim else dim
        self.layers = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                                          bias=bias) for _ in range(depth))
        if not same_dim:  # kdim == embed_dim still packs the weights: force separate projections
            for layer in self.layers:
                layer._qkv_same_embed_dim = False
                layer.q_proj_weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
                layer.k_proj_weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
                layer.v_proj_weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
                layer.in_proj_weight = None
        self.batch_first = batch_first

    def forward(self, x, attn_mask=None, key_padding_mask=None, unbatched=False, **causal):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1)  # [B, N, C]
        if unbatched:
            tokens = tokens[0]
        elif not self.batch_first:
            tokens = tokens.transpose(0, 1)
        for layer in self.layers:
            tokens = tokens + layer(tokens, tokens, tokens, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                    need_weights=False, **causal)[0]
        return tokens


GRID = (3, 4)
N = 1 + GRID[0] * GRID[1]


def _masks(kind):
    gen = torch.Generator().manual_seed(7)
    hidden = torch.rand(N, N, generator=gen) < 0.3
    hidden.fill_diagonal_(False)  # every query keeps a key
    padding = torch.zeros(2, N, dtype=torch.bool)
    padding[1, -3:] = True  # the second image's last three patches are padding: neither keys nor queries
    return {
        "none": {},
        "bool attn_mask": {"attn_mask": hidden},
        "float attn_mask": {"attn_mask": torch.randn(N, N, generator=gen)},
        "per-head attn_mask": {"attn_mask": torch.randn(2 * 3, N, N, generator=gen)},
        "key_padding_mask": {"key_padding_mask": padding},
        "both": {"attn_mask": hidden, "key_padding_mask": padding},
        "float key_padding_mask": {"key_padding_mask": torch.randn(2, N, generator=gen)},
    }[kind]


@pytest.mark.parametrize("same_dim", [True, False], ids=["packed weights", "separate weights"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch first", "sequence first"])
@pytest.mark.parametrize("masks", ["none", "bool attn_mask", "float attn_mask", "per-head attn_mask",
                                   "key_padding_mask", "both", "float key_padding_mask"])
def test_multihead_layers_match_their_own_probabilities(batch_first, same_dim, masks):
    torch.manual_seed(0)
    model = _MHAViT(batch_first=batch_first, same_dim=same_dim).eval()
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    kwargs = _masks(masks)
    calls, _ = _spy(model.layers)
    with torch.no_grad():
        plain = model(pixels, **kwargs)
        calls.clear()
        with vitmad.record(model, num_prefix_tokens=1) as rec:  # a model of no library: its class token said
            recorded = model(pixels, **kwargs)
    assert torch.equal(plain, recorded)
    assert rec.layers == ["layers.0", "layers.1"]
    torch.testing.assert_close(rec.mad.double(), _expected(_own_maps(model.layers, calls), 8, GRID, kwargs), **TOL)


class _EncoderViT(nn.Module):
    """A ViT of torch's nn.TransformerEncoder (batch first, 2 heads: its fused inference fast path applies)."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, pixels, **kwargs):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        return self.encoder(torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1), **kwargs)


@pytest.mark.parametrize("masks", ["none", "key_padding_mask"])
def test_transformer_encoder_layers_recorded_run_their_python_path(masks):
    """QA 333: torch runs nn.TransformerEncoderLayer's fused fast path only while no hook is on it or its
    submodules, so a recorded one runs its Python path (README: the one exception to bit-identical outputs); with
    the fast path off, the outputs are bit-identical, and the MAD is the layers' own attention."""
    torch.manual_seed(0)
    model = _EncoderViT().eval()
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    kwargs = {} if masks == "none" else {"src_key_padding_mask": _masks("key_padding_mask")["key_padding_mask"]}
    attentions = [layer.self_attn for layer in model.encoder.layers]
    calls, handles = _spy(attentions)
    enabled = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad():
            python_path = model(pixels, **kwargs)
            calls.clear()
            with vitmad.record(model, num_prefix_tokens=1) as rec:
                recorded = model(pixels, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)
        for handle in handles:
            handle.remove()
    assert torch.equal(python_path, recorded)
    assert rec.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    torch.testing.assert_close(rec.mad.double(), _expected(_own_maps(attentions, calls), 8, GRID,
                                                           {"key_padding_mask": kwargs.get("src_key_padding_mask")}),
                               **TOL)
    # The fast path on: the layer's Python path still, whose nn.MultiheadAttention then takes its own fused path
    # (blind to hooks): the next layer's input differs in the last bits, so its MAD does too.
    with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1) as fast:
        model(pixels, **kwargs)
    torch.testing.assert_close(fast.mad[0], rec.mad[0], rtol=0, atol=0)
    torch.testing.assert_close(fast.mad, rec.mad, rtol=1e-6, atol=1e-5)


def test_nested_tensors_are_refused_naming_the_encoders_switch():
    """nn.TransformerEncoder built as by default turns a batch given src_key_padding_mask into nested tensors in
    eval mode without grad; the refusal named no way out (QA 378). It names enable_nested_tensor=False and
    use_nested_tensor, and with the latter set the padded batch records, its padding neither key nor query."""
    torch.manual_seed(0)
    model = _EncoderViT()
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model.encoder = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True, torch's default
    model.eval()
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    padding = _masks("key_padding_mask")["key_padding_mask"]
    with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1), pytest.raises(
            ValueError, match=r"encoder\.layers\.0\.self_attn \(MultiheadAttention\) received nested tensors.*"
                              r"build it with enable_nested_tensor=False, or set its use_nested_tensor = False"):
        model(pixels, src_key_padding_mask=padding)
    model.encoder.use_nested_tensor = False
    attentions = [encoder_layer.self_attn for encoder_layer in model.encoder.layers]
    calls, handles = _spy(attentions)
    try:
        with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1) as rec:
            model(pixels, src_key_padding_mask=padding)
    finally:
        for handle in handles:
            handle.remove()
    expected = _expected(_own_maps(attentions, calls), 8, GRID, {"key_padding_mask": padding})
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


def test_unbatched_input_and_training_mode():
    torch.manual_seed(0)
    model = _MHAViT().train()  # dropout 0: training changes only the fast path, not the attention
    pixels = torch.randn(1, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(3))
    calls, _ = _spy(model.layers)
    with vitmad.record(model, num_prefix_tokens=1) as rec:
        model(pixels, unbatched=True)
    assert rec.mad.shape == (2, 1, 3)
    maps = [m.unsqueeze(0) for m in _own_maps(model.layers, calls)]
    torch.testing.assert_close(rec.mad.double(), _reference(maps, 8, GRID), **TOL)


def test_what_the_layer_cannot_be_measured_with_is_refused_by_name():
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1])
    model = _MHAViT().eval()
    causal = torch.ones(N, N, dtype=torch.bool).triu(1)
    with pytest.raises(ValueError, match=r"vitmad.record: layers.0 \(MultiheadAttention\) runs causal attention"):
        with torch.no_grad(), vitmad.record(model):
            model(pixels, attn_mask=causal, is_causal=True)

    extra = _MHAViT().eval()
    extra.layers[0] = nn.MultiheadAttention(24, 3, batch_first=True, add_bias_kv=True)
    with pytest.raises(ValueError, match=r"layers.0 \(MultiheadAttention\) adds keys of its own"):
        with torch.no_grad(), vitmad.record(extra):
            extra(pixels)
    assert all(not m._forward_pre_hooks for m in extra.modules())


class _MemoryViT(_MHAViT):
    """Its second layer attends from the image's tokens to a learned memory of as many slots (``memory``), or to
    the tokens normalised twice (equal tensors, not one)."""

    def __init__(self, keys: str):
        super().__init__()
        self.keys = keys
        self.memory = nn.Parameter(torch.randn(1, N, 24))
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1)
        tokens = tokens + self.layers[0](tokens, tokens, tokens, need_weights=False)[0]
        if self.keys == "memory":
            keys = self.memory.expand(len(tokens), -1, -1)
            return self.layers[1](tokens, keys, keys, need_weights=False)[0]
        return self.layers[1](self.norm(tokens), self.norm(tokens), tokens, need_weights=False)[0]


def test_keys_that_are_not_the_queries_in_a_users_model_are_said_to_be_taken_for_its_tokens():
    """A key that is not the query (a memory, no place in the image) was placed at the queries' tokens whenever its
    length matched, silently (QA 257: 19.3 px of a memory). A call cannot tell it from keys projected apart from
    the same tokens (ultralytics' TransformerLayer, tests/recording/test_record_ultralytics.py): a model of the
    user's own says so once per layer. Keys equal to the queries (a norm run twice) are the same tokens: no
    warning."""
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1])
    model = _MemoryViT("memory").eval()
    positions = torch.cat([torch.full((1, 2), float("nan")), torch.cartesian_prod(
        torch.arange(GRID[0]) * 8.0 + 4, torch.arange(GRID[1]) * 8.0 + 4)])
    for layout in ({"num_prefix_tokens": 1}, {"positions": positions}):
        with pytest.warns(UserWarning, match=r"^vitmad\.record: layers\.1 \(MultiheadAttention\) of _MemoryViT is "
                                             r"given a key that is not its query, and its keys are taken to be its "
                                             r"queries' tokens") as said:
            with torch.no_grad(), vitmad.record(model, **layout):
                model(pixels)
                model(pixels)
        assert len([w for w in said if "not its query" in str(w.message)]) == 1  # once per layer
    twice = _MemoryViT("normalised twice").eval()
    with torch.no_grad(), vitmad.record(twice, num_prefix_tokens=1) as rec:
        twice(pixels)
    calls, handles = _spy(twice.layers)
    with torch.no_grad():
        twice(pixels)
    for handle in handles:
        handle.remove()
    maps = _own_maps(twice.layers, calls)
    assert rec.layers == ["layers.0", "layers.1"]
    torch.testing.assert_close(rec.mad.double(), _reference(maps, 8, GRID), **TOL)



def test_a_pooling_head_with_a_learned_query_is_skipped_with_its_reason():
    """SigLIP's pooling head calls nn.MultiheadAttention with its learned probe as the query: no place on the
    image, so no MAD; the tower's own layers are recorded as before."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(pixels).pooler_output
        with vitmad.record(model) as rec:
            recorded = model(pixels).pooler_output
    assert torch.equal(plain, recorded)
    assert rec.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    assert rec.skipped == {"head.attention": "attention pooling: a learned query (SigLIP's probe) without a "
                                            "position on the image; its attention over the tokens is recorded with "
                                            "stats=[..., 'prefix_maps'] (rec.class_attention_maps)"}


class _ChoosingBlock(nn.Module):
    """A user's attention block that runs its nn.MultiheadAttention, or with ``own`` its own SDPA on the same
    weights: found by its source (it calls F.scaled_dot_product_attention) around the MultiheadAttention."""

    def __init__(self, dim=24, heads=3, own=False):
        super().__init__()
        self.own, self.heads = own, heads
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, *_, **__):  # called as _MHAViT calls its layers: (x, x, x, masks...) -> (out, weights)
        if not self.own:
            return self.mha(x, x, x, need_weights=False)
        b, n, c = x.shape
        q, k, v = (x @ self.mha.in_proj_weight.T + self.mha.in_proj_bias).view(b, n, 3, self.heads, -1).permute(
            2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.mha.out_proj(out.transpose(1, 2).reshape(b, n, c)), None


def test_a_block_choosing_its_multihead_attention_records_the_multihead_attention():
    """Recorded around the MultiheadAttention, the block's capture saw one multi_head_attention_forward call (no SDPA):
    nothing was recorded, and its mode turned off the fast path, changing the output (QA helper-247). The
    MultiheadAttention is the layer; a block that runs its own SDPA is named in layers=."""
    torch.manual_seed(0)
    model = _MHAViT(depth=2).eval()
    model.layers = nn.ModuleList(_ChoosingBlock() for _ in range(2))
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    mhas = [block.mha for block in model.layers]
    calls, _ = _spy(mhas)
    with torch.no_grad():
        plain = model(pixels)
        calls.clear()
        with vitmad.record(model, num_prefix_tokens=1) as rec:
            recorded = model(pixels)
    assert torch.equal(plain, recorded)
    assert rec.layers == ["layers.0.mha", "layers.1.mha"]
    torch.testing.assert_close(rec.mad.double(), _reference(_own_maps(mhas, calls), 8, GRID), **TOL)
    for block in model.layers:
        block.own = True
    with torch.no_grad():
        own_plain = model(pixels)
        with vitmad.record(model, layers=["layers.0", "layers.1"], num_prefix_tokens=1) as own:
            assert torch.equal(model(pixels), own_plain)
    assert own.layers == ["layers.0", "layers.1"]
    torch.testing.assert_close(own.mad, rec.mad, rtol=1e-5, atol=1e-4)


class _Wrapped(nn.Module):
    """A user's wrapper around a MultiheadAttention layer."""

    def __init__(self):
        super().__init__()
        self.inner = nn.MultiheadAttention(24, 3, batch_first=True)

    def forward(self, query, key, value, **options):
        return self.inner(query, key, value, **options)


def test_a_wrapper_named_in_layers_records_the_multihead_attention_it_holds():
    """layers=["blocks.0"] naming a wrapper of an nn.MultiheadAttention: its fused call shows no attention to a
    capture around the wrapper, which was skipped with a warning that it computed none (QA 257)."""
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1])
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(_Wrapped() for _ in range(2))
    calls, handles = _spy([wrapper.inner for wrapper in model.layers])
    with torch.no_grad():
        model(pixels)
    for handle in handles:
        handle.remove()
    with torch.no_grad(), vitmad.record(model, layers=["layers.1"], num_prefix_tokens=1) as rec:
        model(pixels)
    assert rec.layers == ["layers.1.inner"] and rec.skipped == {}
    expected = _reference(_own_maps([model.layers[1].inner], calls[1:]), 8, GRID)
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


class _OwnForwardMHA(nn.MultiheadAttention):
    """A user's subclass with a forward of its own: it adds a relative position bias of its own ([B * H, N, N]) and
    calls the layer's forward with it. Taken as the call's own arguments, the bias was missed (a silently wrong
    MAD) and a ``forward(x)`` failed with a KeyError (QA 398): it is read from the function the layer runs."""

    def __init__(self, dim=24, heads=3):
        super().__init__(dim, heads, batch_first=True)
        self.table = nn.Parameter(torch.randn(heads, N, N) * 2)
        self.seen = []  # (x, bias) of each call, for the reference

    def forward(self, x, *_, **__):
        bias = self.table.repeat(len(x), 1, 1)
        self.seen.append((x.detach(), bias.detach()))
        return super().forward(x, x, x, attn_mask=bias, need_weights=False)


class _OneArgumentViT(_MHAViT):
    """Calls each layer with its tokens alone (``layer(x)``)."""

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1)
        for layer in self.layers:
            tokens = tokens + layer(tokens)[0]
        return tokens


def _seen_maps(layers) -> list[torch.Tensor]:
    """Each _OwnForwardMHA layer's own per-head probabilities for the input and bias it last had."""
    maps = []
    for layer in layers:
        x, bias = layer.seen[-1]
        with torch.no_grad():
            maps.append(nn.MultiheadAttention.forward(layer, x, x, x, attn_mask=bias, need_weights=True,
                                                      average_attn_weights=False)[1])
    return maps


@pytest.mark.parametrize("model_class", [_MHAViT, _OneArgumentViT], ids=["called as the layer", "forward(x)"])
def test_a_subclass_with_its_own_forward_is_read_from_the_call_it_makes(model_class):
    torch.manual_seed(0)
    model = model_class().eval()
    model.layers = nn.ModuleList(_OwnForwardMHA() for _ in range(2))
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, num_prefix_tokens=1, stats=["entropy"]) as rec:
            recorded = model(pixels)
    # Recorded, the layer runs its Python path rather than torch's fused inference path: the same attention.
    torch.testing.assert_close(recorded, plain)
    assert rec.layers == ["layers.0", "layers.1"] and rec.skipped == {}
    maps = _seen_maps(model.layers)
    torch.testing.assert_close(rec.mad.double(), _reference(maps, 8, GRID), **TOL)
    entropy = torch.stack([-(m.double() * m.double().log()).sum(-1)[:, :, 1:].mean(-1) for m in maps])
    torch.testing.assert_close(rec.stats["entropy"].double(), entropy, rtol=0, atol=5e-5)


class _FunctionalBlock(nn.Module):
    """A user's block calling F.multi_head_attention_forward with weights of its own (as CLIP's attention pool
    does), called as _MHAViT calls its layers."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Parameter(torch.randn(3 * dim, dim) / dim ** 0.5)
        self.in_bias = nn.Parameter(torch.randn(3 * dim) * 0.1)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, *_, need_weights=False, **__):
        sequence = x.transpose(0, 1)
        out, weights = torch.nn.functional.multi_head_attention_forward(
            sequence, sequence, sequence, x.shape[-1], self.heads, self.in_proj, self.in_bias, None, None, False, 0.0,
            self.out.weight, self.out.bias, training=self.training, need_weights=need_weights,
            average_attn_weights=False)
        return out.transpose(0, 1), weights


def test_a_block_calling_the_functional_multihead_attention_is_recorded_where_named():
    """QA 398: named in layers=, it "ran without computing attention" (the function hides its SDPA call)."""
    torch.manual_seed(0)
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(_FunctionalBlock() for _ in range(2))
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    calls, handles = _spy(model.layers)
    with torch.no_grad():
        plain = model(pixels)
    for handle in handles:
        handle.remove()
    with pytest.raises(NoLayerError, match="F.multi_head_attention_forward"):
        with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1):
            model(pixels)
    with torch.no_grad(), vitmad.record(model, layers=["layers.0", "layers.1"], num_prefix_tokens=1) as rec:
        assert torch.equal(model(pixels), plain)
    assert rec.layers == ["layers.0", "layers.1"] and rec.skipped == {}
    maps = []
    for layer, (args, _) in zip(model.layers, calls):
        with torch.no_grad():
            maps.append(layer(args[0], need_weights=True)[1])
    torch.testing.assert_close(rec.mad.double(), _reference(maps, 8, GRID), **TOL)


def test_torchs_quantizable_multihead_attention_is_not_read_from_weights_it_does_not_use():
    """torch.ao's quantizable MultiheadAttention (eager-mode static quantization) projects with its linear_Q and
    linear_K; its in_proj_weight stays as initialised. Read from the call's arguments and in_proj_weight as the
    layer's forward would be, its MAD was another attention's, silently; its own softmax, over batch and heads
    merged in one dim, is refused by name."""
    from torch.ao.nn.quantizable import MultiheadAttention as Quantizable

    torch.manual_seed(0)
    model = _MHAViT().eval()
    for i, layer in enumerate(model.layers):
        layer.qconfig = torch.ao.quantization.default_qconfig
        model.layers[i] = Quantizable.from_float(layer)
    assert not torch.equal(model.layers[0].in_proj_weight, model.layers[0].linear_Q.weight)
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1])
    with pytest.raises(ValueError, match=r"vitmad.record: layers.0 \(MultiheadAttention\) of _MHAViT: its attention "
                                         r"has shape \[6, 13, 13\] \(batch and heads merged in one dim"):
        with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1):
            model(pixels)


class _OwnAttentionThenLayer(nn.Module):
    """A user's block attending itself (an explicit softmax, or SDPA), then through an nn.MultiheadAttention it
    holds, over its own tokens or over 5 text tokens."""

    def __init__(self, fused, text, dim=24, heads=3):
        super().__init__()
        self.fused, self.heads = fused, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.layer = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.text = nn.Parameter(torch.randn(1, 5, dim)) if text else None
        self.seen = []

    def forward(self, x, *_, **__):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        self.seen.append((q.detach(), k.detach()))
        if self.fused:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v
        x = x + out.transpose(1, 2).reshape(b, n, c)
        memory = x if self.text is None else self.text.expand(b, -1, -1)
        return x + self.layer(x, memory, memory, need_weights=False)[0], None


def _blocks_own_mad(rec, model) -> tuple[torch.Tensor, torch.Tensor]:
    """(recorded, float64 reference) MAD [2, B, H] of _OwnAttentionThenLayer blocks "layers.0" and "layers.1": the
    reference from each block's own softmax of the q and k it last computed, on the grid of _MHAViT."""
    maps = []
    for block in model.layers:
        q, k = block.seen[-1]
        maps.append((q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1))
    got = torch.stack([rec.mad[rec.layers.index(name)] for name in ("layers.0", "layers.1")])
    return got.double(), _reference(maps, 8, GRID)


@pytest.mark.parametrize("text", [False, True], ids=["layer over its tokens", "layer over text"])
@pytest.mark.parametrize("fused", [False, True], ids=["softmax", "sdpa"])
def test_a_block_named_whole_records_its_own_attention_not_the_layer_it_holds(fused, text):
    """QA 406: the F.multi_head_attention_forward call of the layer a block holds was read as the block's: the
    layer's attention replaced the block's own softmax silently, and beside SDPA (or over text) the block was
    refused. The block's own attention is its layer's MAD, as before the function was read."""
    torch.manual_seed(0)
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(_OwnAttentionThenLayer(fused, text) for _ in range(2))
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model, layers=["layers.0", "layers.1"], num_prefix_tokens=1) as rec:
        model(pixels)
    assert rec.layers == ["layers.0", "layers.1"]
    torch.testing.assert_close(*_blocks_own_mad(rec, model), **TOL)


class _BlockThenLayer(_OwnAttentionThenLayer):
    """The block with its softmax alone, under a name no rule takes for attention: found by no source rule."""

    def forward(self, x, *_, **__):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        self.seen.append((q.detach(), k.detach()))
        x = x + ((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return x + self.layer(x, x, x, need_weights=False)[0], None


class _AttentionThenFunctional(_OwnAttentionThenLayer):
    """The block with a held module that calls F.multi_head_attention_forward itself, with weights of its own."""

    def __init__(self, fused, text):
        super().__init__(fused, text)
        self.layer = _FunctionalBlock()


@pytest.mark.parametrize("block, layers", [
    (_BlockThenLayer, ["layers.0", "layers.1"]), (_BlockThenLayer, ["layers.?"]), (_BlockThenLayer, ["layers.*"]),
    (_AttentionThenFunctional, ["layers.0", "layers.1"])])
def test_a_block_attending_itself_is_not_replaced_by_the_attention_it_holds(block, layers):
    """QA 411: a block not named as attention, running its own softmax then a MultiheadAttention layer, was replaced
    by that layer (named whole, "layers.?" or "layers.*": the layer's MAD under the block's name, or alone), and a
    held module calling F.multi_head_attention_forward itself had its call read as the block's."""
    torch.manual_seed(0)
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(block(False, False) for _ in range(2))
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model, layers=layers, num_prefix_tokens=1) as rec:
        model(pixels)
    blocks = ["layers.0", "layers.1"]
    # "layers.*" also chose the MultiheadAttention layers, recorded beside the blocks (their values: the tests above).
    expected_layers = blocks if layers != ["layers.*"] else ["layers.0.layer", "layers.0", "layers.1.layer", "layers.1"]
    assert rec.layers == expected_layers
    torch.testing.assert_close(*_blocks_own_mad(rec, model), **TOL)


def _attend_with(block, x):
    """A helper of the user's making the functional call for a module: the call's frame has no module."""
    sequence = x.transpose(0, 1)
    return torch.nn.functional.multi_head_attention_forward(
        sequence, sequence, sequence, x.shape[-1], block.heads, block.in_proj, block.in_bias, None, None, False, 0.0,
        block.out.weight, block.out.bias, training=block.training, need_weights=False)[0].transpose(0, 1)


class _FunctionalThroughAHelper(_FunctionalBlock):
    def forward(self, x, *_, **__):
        return _attend_with(self, x), None


class _CheckpointedFunctional(_FunctionalBlock):
    def forward(self, x, *_, **__):
        return torch.utils.checkpoint.checkpoint(_attend_with, self, x, use_reentrant=False), None


class _BlockThenHeld(_BlockThenLayer):
    def __init__(self, held):
        super().__init__(False, False)
        self.layer = held()


class _SelfAttentionThenHeld(_BlockThenHeld):
    """Named as attention, with a query/key projection: found without layers=."""


@pytest.mark.parametrize("block_class, held, layers", [
    (_SelfAttentionThenHeld, _FunctionalThroughAHelper, None),
    (_BlockThenHeld, _FunctionalThroughAHelper, ["layers.0", "layers.1"]),
    (_BlockThenHeld, _CheckpointedFunctional, ["layers.?"]), (_BlockThenHeld, _FunctionalBlock, ["layers.*"]),
    (_BlockThenHeld, _OwnForwardMHA, ["layers.*"])])
def test_a_block_attending_itself_keeps_its_attention_whatever_its_held_module_calls(block_class, held, layers):
    """QA 415: a held module's F.multi_head_attention_forward call made through a helper, a checkpoint, or that
    module's own capture (both chosen by "layers.*") was read as the block's: the block's MAD was the held
    module's, silently; beside a MultiheadAttention subclass with a forward of its own, "layers.*" dropped the
    block. Only a module that makes the call itself (or a subclass of the layer) is read by it."""
    torch.manual_seed(0)
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(block_class(held) for _ in range(2))
    if held is _OwnForwardMHA:  # its bias table is over the 13 tokens of _MHAViT's grid and class token
        for block in model.layers:
            block.layer.forward = functools.partial(_call_own_forward, block.layer)
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model, layers=layers, num_prefix_tokens=1) as rec:
        model(pixels)
    blocks = ["layers.0", "layers.1"]
    if layers == ["layers.*"]:
        assert rec.layers == ["layers.0.layer", "layers.0", "layers.1.layer", "layers.1"]
    else:
        assert rec.layers == blocks
    torch.testing.assert_close(*_blocks_own_mad(rec, model), **TOL)


class _SelfAttentionThenLayer(_OwnAttentionThenLayer):
    """The block named as attention: found by its source without layers=."""


class _BlockSdpaThenLayer(_OwnAttentionThenLayer):
    """The block not named as attention: found by its SDPA call without layers=."""


@pytest.mark.parametrize("block_class, fused", [(_SelfAttentionThenLayer, False), (_SelfAttentionThenLayer, True),
                                                (_BlockSdpaThenLayer, True)])
def test_a_block_found_attending_itself_is_recorded_beside_the_layer_it_holds(block_class, fused):
    """QA 415: a block vitmad finds by its source (its own softmax or SDPA beside a qkv projection) that also holds
    an nn.MultiheadAttention was left to that layer without layers=, to keep the layer's fast path (QA helper-247):
    the block's own attention was lost without a word. Both are recorded; outputs stay bit-identical."""
    torch.manual_seed(0)
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(block_class(fused, False) for _ in range(2))
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    layers = [block.layer for block in model.layers]
    with torch.no_grad():
        plain = model(pixels)
    rec, recorded, calls = _recorded_with_calls(model, layers, pixels, num_prefix_tokens=1)
    assert torch.equal(plain, recorded)
    assert rec.layers == ["layers.0.layer", "layers.0", "layers.1.layer", "layers.1"] and rec.skipped == {}
    torch.testing.assert_close(*_blocks_own_mad(rec, model), **TOL)
    held = torch.stack([rec.mad[rec.layers.index(f"layers.{i}.layer")] for i in range(2)])
    torch.testing.assert_close(held.double(), _reference(_own_maps(layers, calls), 8, GRID), **TOL)


class _GatedAttention(nn.Module):
    """A user's attention class holding an nn.MultiheadAttention, gating it by a softmax over two branches of a
    projection named as a query: no attention of its own."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.layer = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.q = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, 2)

    def forward(self, x, *_, **__):
        out = self.layer(x, x, x, need_weights=False)[0]
        weights = self.gate(self.q(x)).softmax(-1)
        return x + weights[..., :1] * out + weights[..., 1:] * x, None


class _InnerAttention(nn.Module):
    """Attention of the user's found by its source (named as attention, a qkv projection, a softmax)."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.heads, self.qkv, self.seen = heads, nn.Linear(dim, 3 * dim), []

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        self.seen.append((q.detach(), k.detach()))
        return x + ((q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)


class _SelfAttentionHoldingTwo(_OwnAttentionThenLayer):
    """A block attending itself around its MultiheadAttention and an attention module of the user's it holds."""

    def __init__(self):
        super().__init__(False, False)
        self.inner = _InnerAttention()

    def forward(self, x, *args, **kwargs):
        return super().forward(self.inner(x), *args, **kwargs)


def test_a_block_beside_its_layer_keeps_the_layers_it_held_before():
    """QA 424, on the change above: a gate's softmax beside a projection named as a query made a user's gated
    attention class a block attending itself, and its gate was refused as "its queries are not its keys" (the layer
    alone was recorded before); a block holding another attention module found beside its layer took that module's
    place. The gate is passed by, and such a block is left to the modules it holds, as before."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(_GatedAttention() for _ in range(2))
    layers = [block.layer for block in model.layers]
    with torch.no_grad():
        plain = model(pixels)
    rec, recorded, calls = _recorded_with_calls(model, layers, pixels, num_prefix_tokens=1)
    assert torch.equal(recorded, plain)
    assert rec.layers == ["layers.0.layer", "layers.1.layer"] and rec.skipped == {}
    torch.testing.assert_close(rec.mad.double(), _reference(_own_maps(layers, calls), 8, GRID), **TOL)

    model.layers = nn.ModuleList(_SelfAttentionHoldingTwo() for _ in range(2))
    with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1) as rec:
        model(pixels)
    assert rec.layers == ["layers.0.inner", "layers.0.layer", "layers.1.inner", "layers.1.layer"]
    maps = []
    for block in model.layers:
        q, k = block.inner.seen[-1]
        maps.append((q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1))
    torch.testing.assert_close(rec.mad[0::2].double(), _reference(maps, 8, GRID), **TOL)


class _AttentionPoolBlock(nn.Module):
    """A user's block attending over its tokens through a MultiheadAttention, then pooling them by a softmax over
    the tokens of a projection (no learned query): named as an attention pool."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.layer = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.key = nn.Linear(dim, heads)

    def forward(self, x, *_, **__):
        x = x + self.layer(x, x, x, need_weights=False)[0]
        weights = self.key(x).softmax(dim=1)  # [B, N, H]
        return x + torch.einsum("bnh,bnc->bc", weights, x)[:, None], None


class _LearnedQueryAttentionPool(nn.Module):
    """A user's attention pool: its learned query attends to the tokens through a MultiheadAttention."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        self.layer = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, *_, **__):
        pooled = self.layer(self.query.expand(len(x), -1, -1), x, x, need_weights=False)[0]
        return x + pooled, None


def test_a_users_attention_pool_is_skipped_by_its_learned_query_not_its_name():
    """QA 424: a MultiheadAttention held by any class named *AttentionPool* was skipped as attention pooling by a
    learned query, even where it attends over the tokens (the block pools them after): a class of the user's is a
    pool where it holds a parameter of its own, its learned query."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(_AttentionPoolBlock() for _ in range(2))
    layers = [block.layer for block in model.layers]
    rec, _, calls = _recorded_with_calls(model, layers, pixels, num_prefix_tokens=1)
    assert rec.layers == ["layers.0.layer", "layers.1.layer"] and rec.skipped == {}
    torch.testing.assert_close(rec.mad.double(), _reference(_own_maps(layers, calls), 8, GRID), **TOL)
    model.layers[1] = _LearnedQueryAttentionPool()
    with torch.no_grad(), vitmad.record(model, num_prefix_tokens=1) as rec:
        model(pixels)
    assert rec.layers == ["layers.0.layer"] and rec.skipped["layers.1.layer"].startswith("attention pooling")


def _call_own_forward(layer, x, *_, **__):
    """_OwnForwardMHA called as _BlockThenLayer calls its layer: (x, x, x, need_weights=False)."""
    return type(layer).forward(layer, x)


class _RoutedBlock(nn.Module):
    """A user's block attending only through its MultiheadAttention, then weighting two expert MLPs by a router's
    softmax over them ([B, N, 2]): no query or key projection of its own."""

    def __init__(self, dim=24, heads=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.router = nn.Linear(dim, 2)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(2))

    def forward(self, x, *_, **__):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        weights = torch.softmax(self.router(x), -1)
        return x + sum(weights[..., i:i + 1] * expert(x) for i, expert in enumerate(self.experts)), None


@pytest.mark.parametrize("layers", [["layers.0", "layers.1"], ["layers.?"], ["layers.*"], ["*"]])
def test_a_routers_softmax_beside_a_multihead_attention_is_no_attention_of_the_block(layers):
    """QA 418: a block's forward naming a softmax was taken to attend itself, so a block routing over experts kept
    its name and its router's softmax was read as its attention (refused: "its queries are not its keys"), or it was
    left out; its MultiheadAttention is the layer, as before QA 411's change."""
    torch.manual_seed(0)
    model = _MHAViT().eval()
    model.layers = nn.ModuleList(_RoutedBlock() for _ in range(2))
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1], generator=torch.Generator().manual_seed(2))
    mhas = [block.attn for block in model.layers]
    calls, handles = _spy(mhas)
    with torch.no_grad():
        model(pixels)
    for handle in handles:
        handle.remove()
    with torch.no_grad(), vitmad.record(model, layers=layers, num_prefix_tokens=1) as rec:
        model(pixels)
    assert rec.layers == ["layers.0.attn", "layers.1.attn"] and rec.skipped == {}
    torch.testing.assert_close(rec.mad.double(), _reference(_own_maps(mhas, calls), 8, GRID), **TOL)


def test_one_tensor_given_as_query_and_key_is_self_attention_whatever_its_values():
    """QA 418: a batch-first layer's query and key, one tensor, were transposed apart and told apart by their values:
    NaN in it (an earlier layer's overflow) made them unequal, and the layer was warned of as given a key that is
    not its query."""
    model = _MHAViT().eval()
    pixels = torch.randn(2, 3, 8 * GRID[0], 8 * GRID[1])
    pixels[0, :, 0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        with vitmad.record(model, num_prefix_tokens=1) as rec:
            model(pixels)
    assert not [w for w in caught if "not its query" in str(w.message)]
    assert rec.layers == ["layers.0", "layers.1"] and torch.isfinite(rec.mad[:, 1]).all()
