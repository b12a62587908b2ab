"""vitmad.record on tiny random-weight transformers models: every family of the issue, against eager maps."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from vitmad.recording import transformers_capture as hf_hooks  # noqa: E402

# MAD from the recorded q/k against the reference on the eager model's maps: both softmaxes are float32, formed
# by different kernels (SDPA-side q @ k^T vs eager), so probabilities differ by float32 rounding only.
RECORD_TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels; MADs here are 5 to 40 px

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _vit_like(config_cls, model_cls, **extra):
    return lambda image: model_cls(config_cls(**SMALL, image_size=image, patch_size=8, **extra))


def _tower(config_cls, model_cls):
    return lambda image: model_cls(config_cls(**SMALL, image_size=image, patch_size=8))


# name -> (builder(image_size), prefix tokens, forward kwargs for a non-square input)
FAMILIES = {
    "vit": (_vit_like(transformers.ViTConfig, transformers.ViTModel), 1, {"interpolate_pos_encoding": True}),
    "deit_distilled": (
        _vit_like(transformers.DeiTConfig, transformers.DeiTModel), 2, {"interpolate_pos_encoding": True}),
    "beit_relative_bias": (
        _vit_like(transformers.BeitConfig, transformers.BeitModel, use_relative_position_bias=True,
                  use_absolute_position_embeddings=False),
        1, {"interpolate_pos_encoding": True}),
    "dinov2": (_vit_like(transformers.Dinov2Config, transformers.Dinov2Model), 1, {}),
    "dinov2_registers": (
        _vit_like(transformers.Dinov2WithRegistersConfig, transformers.Dinov2WithRegistersModel,
                  num_register_tokens=3),
        4, {}),
    "vit_mae": (
        _vit_like(transformers.ViTMAEConfig, transformers.ViTMAEModel, mask_ratio=0.0), 1,
        {"interpolate_pos_encoding": True}),
    "clip_vision": (_tower(transformers.CLIPVisionConfig, transformers.CLIPVisionModel), 1,
                    {"interpolate_pos_encoding": True}),
    "siglip_vision": (_tower(transformers.SiglipVisionConfig, transformers.SiglipVisionModel), 0,
                      {"interpolate_pos_encoding": True}),
}

IMAGE = 32
# (height, width) of the inputs: the configured square size, and a non-square one.
SIZES = [(IMAGE, IMAGE), (24, 40)]


def _build(family: str):
    build, prefix, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = build(IMAGE).eval()
    assert model.config._attn_implementation == "sdpa"
    return model, prefix, kwargs


def _forward_kwargs(family, model, size, kwargs, batch):
    extra = dict(kwargs) if size != (IMAGE, IMAGE) else {}
    if family == "vit_mae":
        # The same shuffle in the recorded and the eager run; rec must undo it, the test undoes it by hand.
        num_patches = (size[0] // 8) * (size[1] // 8)
        extra["noise"] = torch.rand(batch, num_patches, generator=torch.Generator().manual_seed(1))
    return extra


def _eager_maps(model, pixels, extra) -> tuple[list[torch.Tensor], object]:
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(pixels, output_attentions=True, **extra)
    return list(out.attentions), out


def _unshuffle(attn: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """ViTMAE's maps in shuffled token order -> row-major patch order ([B, H, N, N], CLS first)."""
    num_prefix = attn.shape[-1] - ids_restore.shape[1]
    out = torch.empty_like(attn)
    for b in range(attn.shape[0]):
        order = torch.cat([torch.arange(num_prefix), num_prefix + ids_restore[b]])
        out[b] = attn[b][:, order][:, :, order]
    return out


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_record_matches_eager_maps_and_keeps_outputs(family, size):
    model, prefix, kwargs = _build(family)
    batch = 2
    pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(2))
    extra = _forward_kwargs(family, model, size, kwargs, batch)
    grid = (size[0] // 8, size[1] // 8)

    with torch.no_grad():
        plain = model(pixels, **extra).last_hidden_state
        with vitmad.record(model) as rec:
            recorded = model(pixels, **extra).last_hidden_state

    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    assert rec.layout == vitmad.recording.ModelLayout(patch=8, grid=grid, num_prefix_tokens=prefix)
    attention_modules = list(hf_hooks.hf_attention_modules(model))
    assert rec.layers == attention_modules and len(rec.layers) == 2

    maps, out = _eager_maps(model, pixels, extra)
    if family == "vit_mae":
        maps = [_unshuffle(a, out.ids_restore) for a in maps]
    expected = torch.stack([vitmad.mad_reference(a, 8, num_prefix_tokens=prefix, grid=grid) for a in maps])
    assert rec.mad.shape == (2, batch, 2) and rec.mad.dtype == torch.float32
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


@pytest.mark.parametrize("wrapper", ["Sequential", "DataParallel"])
@pytest.mark.parametrize("family", ["vit", "dinov2_registers"])
def test_a_model_inside_a_wrapper_is_recorded_as_itself(family, wrapper):
    """vitmad.record(nn.DataParallel(model)) found no attention layer: transformers' modules were looked for only
    when the model passed was a PreTrainedModel."""
    model, prefix, _ = _build(family)
    wrapped = getattr(torch.nn, wrapper)(model)  # DataParallel without a GPU runs the module itself
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(wrapped) as rec:
        wrapped(pixels)
    outer = "0" if wrapper == "Sequential" else "module"
    assert rec.layers == [f"{outer}.{name}" for name in hf_hooks.hf_attention_modules(model)]
    maps, _ = _eager_maps(model, pixels, {})
    grid = (IMAGE // 8, IMAGE // 8)
    expected = torch.stack([vitmad.mad_reference(a, 8, num_prefix_tokens=prefix, grid=grid) for a in maps])
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


@pytest.mark.parametrize("family", ["vit", "beit_relative_bias"])
def test_record_per_query_and_renormalized(family):
    model, prefix, kwargs = _build(family)
    pixels = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), vitmad.record(model, reduction="none", renormalize=True) as rec:
        model(pixels, **kwargs)
    maps, _ = _eager_maps(model, pixels, kwargs)
    expected = torch.stack([
        vitmad.mad_reference(a, 8, num_prefix_tokens=prefix, grid=[3, 5], renormalize=True, reduction="none")
        for a in maps
    ])
    assert rec.mad.shape == (2, 1, 2, 15)
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)


def test_repeated_forwards_append_calls():
    model, _, kwargs = _build("vit")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(3, 3, 32, 32))
        model(torch.randn(1, 3, 16, 40), **kwargs)
    assert len(rec.calls) == 2
    assert rec.calls[0].mad.shape == (2, 3, 2) and rec.calls[0].layout.grid == (4, 4)
    assert rec.mad.shape == (2, 1, 2) and rec.layout.grid == (2, 5)
    assert torch.equal(rec.mad, rec.calls[1].mad)


def test_layers_selection_and_overrides():
    model, _, _ = _build("vit")
    # patch= wins over the embedding's 8 px stride, an override said once (filterwarnings makes a second an error).
    with torch.no_grad(), vitmad.record(model, layers=["*.1.attention"], num_prefix_tokens=1, patch=4) as rec:
        with pytest.warns(UserWarning, match=r"the given patch=4 is not the 8 px stride vitmad reads from ViTModel's "
                                             r"patch embedding embeddings.patch_embeddings.projection on the image it "
                                             r"was given; the given one is used \(MAD in units of 4 px per token\)"):
            model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))
    assert rec.layers == ["layers.1.attention"]
    assert rec.layout == vitmad.recording.ModelLayout(patch=4, grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="layers pattern 'nope' matches no module of ViTModel"):
        vitmad.record(model, layers=["nope"])
    # A list of blocks has no forward to record: it was accepted, and refused after the forward as a path the model
    # had not taken (QA 325).
    with pytest.raises(ValueError, match=r"layers names 'layers', a ModuleList of ViTModel: a container .* name its "
                                         r"layers \('layers\.\*' matches each\)"):
        vitmad.record(model, layers=["layers"])
    # A module named exactly that runs without computing attention is said so, once, not silently left out.
    with torch.no_grad(), vitmad.record(model, layers=["layers.0.mlp", "layers.1.attention"]) as rec:
        with pytest.warns(UserWarning, match=r"layers.0.mlp \(ViTMLP\) of ViTModel, named in "
                                             "layers, ran without computing attention"):
            model(torch.randn(1, 3, 32, 32))
        model(torch.randn(1, 3, 32, 32))  # no second warning (filterwarnings makes one an error)
    assert rec.layers == ["layers.1.attention"] and list(rec.skipped) == ["layers.0.mlp"]
    # A pattern taking a block and its attention records the attention once (the block was a second layer).
    with torch.no_grad(), vitmad.record(model, layers=["layers.*"]) as rec:
        model(torch.randn(1, 3, 32, 32))
    assert rec.layers == ["layers.0.attention", "layers.1.attention"]


def _assert_restored(model, attention_modules):
    assert model.config._attn_implementation == "sdpa"
    assert not any(id(m) in hf_hooks._ACTIVE for m in attention_modules.values())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_model_restored_after_exit_and_after_exception():
    model, _, _ = _build("vit_mae")
    modules = hf_hooks.hf_attention_modules(model)
    pixels = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 16)
    with torch.no_grad():
        before = model(pixels, noise=noise).last_hidden_state
        with vitmad.record(model):
            model(pixels, noise=noise)
        _assert_restored(model, modules)

        def fail(*_):
            raise RuntimeError("boom")

        handle = list(modules.values())[1].register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="boom"), vitmad.record(model):
            model(pixels, noise=noise)
        handle.remove()
        _assert_restored(model, modules)
        assert torch.equal(model(pixels, noise=noise).last_hidden_state, before)


def test_clip_full_model_records_the_vision_tower_only():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(**SMALL, vocab_size=50, max_position_embeddings=16),
        vision_config=dict(**SMALL, image_size=32, patch_size=8),
        projection_dim=16,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(input_ids=torch.randint(0, 50, (2, 7)), pixel_values=torch.randn(2, 3, 32, 32))
    assert rec.layers == [f"vision_model.encoder.layers.{i}.self_attn" for i in range(2)]
    assert rec.mad.shape == (2, 2, 2)
    assert model.config._attn_implementation == "sdpa"


def test_nested_record_of_the_same_model_is_refused_and_leaves_the_outer_one_working():
    model, _, _ = _build("vit")
    with torch.no_grad(), vitmad.record(model) as outer:
        with pytest.raises(RuntimeError, match="ViTModel is already being recorded"), vitmad.record(model):
            pass
        model(torch.randn(1, 3, 32, 32))
    assert outer.mad.shape == (2, 1, 2)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_transformers_tower_that_is_no_pretrained_model_is_found_alone(attn_implementation):
    """Idefics' IdeficsVisionTransformer is a plain nn.Module of transformers (the IdeficsModel holds it): recorded
    alone, its q_proj / k_proj attention went unfound ("found no attention layer"). Against its own eager
    probabilities on a 5 x 7 grid of 8 px patches after its class token, placed here."""
    from transformers.models.idefics.vision import IdeficsVisionAttention, IdeficsVisionTransformer

    config = transformers.IdeficsVisionConfig(embed_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, image_size=32, patch_size=8)
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    tower = IdeficsVisionTransformer(config).eval()
    with torch.no_grad():
        for name, parameter in tower.named_parameters():
            if "position" in name or "class" in name or name.endswith("proj.weight"):
                parameter.normal_(std=0.5 if name.endswith("proj.weight") else 1.0)
    pixels = torch.randn(2, 3, 40, 56)
    maps = []
    hooks = [m.register_forward_hook(lambda m, args, out: maps.append(out[1].double()))
             for m in tower.modules() if isinstance(m, IdeficsVisionAttention)]
    with torch.no_grad():
        tower(pixels, interpolate_pos_encoding=True)
    for hook in hooks:
        hook.remove()
    config._attn_implementation = attn_implementation
    with torch.no_grad():
        plain = tower(pixels, interpolate_pos_encoding=True).last_hidden_state
        with vitmad.record(tower) as rec:
            recorded = tower(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert torch.equal(plain, recorded)
    assert rec.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(35, 2).double() + 0.5) * 8
    expected = torch.stack([(m[:, :, 1:, 1:] * torch.cdist(centres, centres)).sum(-1).mean(-1) for m in maps])
    assert float(expected.std()) > 1.0  # heads far apart: a misplaced token would show
    torch.testing.assert_close(rec.mad.double(), expected, **RECORD_TOL)
