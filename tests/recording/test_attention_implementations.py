"""What a transformers AttentionInterface call attends to, read per implementation (recording/interface_call.py).

The reference is each implementation's own output: transformers' ``sdpa``, ``flex_attention`` and a modeling
file's ``eager_attention_forward`` run on random q, k, v with each mask and flag, and the keys and mask vitmad
derives must reproduce that output as softmax(q k^T * scale + bias) v in float64. Flash attention cannot run
here (no GPU): its rules are written out in the test. End to end: a flex ViT against its eager attention maps,
refusals that name the layer and the argument (a ViT whose modules are causal under SDPA, a soft-capped model).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402
from vitmad.recording.interface_call import attention_semantics, bound_arguments, call_bias  # noqa: E402

B, H, NQ, D = 2, 3, 150, 16  # 150 tokens: across flex's 128-token blocks


class _Module(nn.Module):
    """What the implementations read from the attention module: training, is_causal (or its absence)."""

    def __init__(self, is_causal=None):
        super().__init__()
        if is_causal is not None:
            self.is_causal = is_causal


def _qkv(nk=NQ, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, NQ, D, generator=gen)
    k = torch.randn(B, H, nk, D, generator=gen)
    v = torch.randn(B, H, nk, D, generator=gen)
    return q, k, v


def _reference_output(q, k, v, scale, bias):
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else logits + bias.double()
    return (logits.softmax(-1) @ v[..., : k.shape[-2], :].double()).transpose(1, 2)  # [B, NQ, H, D]


def _check_semantics(function, semantics, module, mask, nk=NQ, **kwargs):
    q, k, v = _qkv(nk)
    scale = 0.3
    with torch.no_grad():
        out = function(module, q, k, v, mask, scaling=scale, **kwargs)[0]
    named = bound_arguments(function, module, q, k, v, mask, (), dict(scaling=scale, **kwargs))
    key, bias = call_bias(semantics, "layer", named, q, k, mask)
    torch.testing.assert_close(out.double(), _reference_output(q, key, v, scale, bias), rtol=1e-4, atol=1e-5)
    return key, bias


def _padding(nk=NQ) -> torch.Tensor:
    keep = torch.ones(B, nk, dtype=torch.bool)
    keep[0, -37:] = False  # the first image's last keys are padding
    return keep


SDPA_CASES = {
    "no mask, module not causal": (dict(is_causal=False), None, {}),
    "no mask, is_causal=False given": (dict(is_causal=True), None, dict(is_causal=False)),
    "bool mask beats is_causal": (dict(is_causal=True), "bool", {}),
    "additive mask": (dict(is_causal=False), "float", {}),
    "position bias": (dict(is_causal=False), None, dict(position_bias="bias")),
    "position bias and bool mask": (dict(is_causal=False), "bool", dict(position_bias="bias")),
}


def _mask(kind, nk=NQ):
    keep = _padding(nk)[:, None, None, :].expand(B, 1, NQ, nk)
    if kind == "bool":
        return keep
    if kind == "float":
        return torch.zeros(B, 1, NQ, nk).masked_fill(~keep, torch.finfo(torch.float32).min) + torch.randn(B, 1, NQ, nk)
    return None


def _resolve(kwargs, nk=NQ):
    if kwargs.get("position_bias") == "bias":
        kwargs = dict(kwargs, position_bias=torch.randn(B, H, NQ, nk, generator=torch.Generator().manual_seed(5)))
    return kwargs


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_calls_are_read_as_sdpa_computes_them(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attributes, mask_kind, kwargs = SDPA_CASES[case]
    _check_semantics(sdpa_attention_forward, "sdpa", _Module(**attributes), _mask(mask_kind), **_resolve(kwargs))


@pytest.mark.parametrize("attributes, kwargs, why", [
    (dict(), {}, "sdpa runs a module without an is_causal attribute causal"),
    (dict(is_causal=True), {}, "its is_causal attribute is True"),
    (dict(is_causal=False), dict(is_causal=True), "is_causal=True"),
])
def test_sdpa_calls_that_run_causal_are_refused(attributes, kwargs, why):
    """The premise (sdpa's output is the causal attention's) checked first, then the refusal and its reason."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv()
    module = _Module(**attributes)
    with torch.no_grad():
        out = sdpa_attention_forward(module, q, k, v, None, scaling=0.3, **kwargs)[0]
    causal = torch.ones(NQ, NQ, dtype=torch.bool).tril()
    torch.testing.assert_close(out.double(), _reference_output(q, k, v, 0.3, causal), rtol=1e-4, atol=1e-5)
    named = bound_arguments(sdpa_attention_forward, module, q, k, v, None, (), dict(scaling=0.3, **kwargs))
    with pytest.raises(ValueError, match=f"vitmad.record: layer runs causal attention \\({why}.*\\); MAD is defined"):
        call_bias("sdpa", "layer", named, q, k, None)
    call_bias("sdpa", "layer", named, q[..., :1, :], k, None)  # one query: nothing to hide, as sdpa reads it


@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_grouped_key_heads_serve_consecutive_query_heads(mask_kind):
    """sdpa pairs 6 query heads with 2 key heads (enable_gqa or repeat_kv) as heads 0-2 and 3-5: the same here."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Module(is_causal=False)
    module.num_key_value_groups = 3
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, 6, NQ, D, generator=gen)
    k = torch.randn(B, 2, NQ, D, generator=gen)
    v = torch.randn(B, 2, NQ, D, generator=gen)
    mask = _mask(mask_kind)
    with torch.no_grad():
        out = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0]
    named = bound_arguments(sdpa_attention_forward, module, q, k, v, mask, (), {"scaling": 0.3})
    key, bias = call_bias("sdpa", "layer", named, q, k, mask)
    assert key.shape == q.shape and torch.equal(key[:, 2], k[:, 0]) and torch.equal(key[:, 3], k[:, 1])
    values = torch.cat([v[:, :1].expand(B, 3, NQ, D), v[:, 1:].expand(B, 3, NQ, D)], 1)
    torch.testing.assert_close(out.double(), _reference_output(q, key, values, 0.3, bias), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="vitmad.record: layer: 6 query heads cannot share 4 key heads"):
        call_bias("sdpa", "layer", named, q, torch.randn(B, 4, NQ, D), None)


@pytest.mark.parametrize("mask_kind", [None, "float"])  # transformers builds additive masks for eager
def test_eager_calls_use_their_mask_as_given(mask_kind):
    from transformers.models.vit.modeling_vit import eager_attention_forward

    module = _Module(is_causal=True)  # eager has no causal flag: its mask is all there is
    module.training = False
    _check_semantics(eager_attention_forward, "eager", module, _mask(mask_kind))


def test_a_positional_scaling_is_read_by_the_parameter_it_fills():
    """sdpa's sixth parameter is dropout, an eager function's is scaling: bound by name, never by position."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.vit.modeling_vit import eager_attention_forward

    q, k, v = _qkv()
    named = bound_arguments(eager_attention_forward, None, q, k, v, None, (0.25, 0.0), {})
    assert named["scaling"] == 0.25 and named["dropout"] == 0.0
    named = bound_arguments(sdpa_attention_forward, None, q, k, v, None, (0.0, 0.25), {"is_causal": False})
    assert named["scaling"] == 0.25 and named["dropout"] == 0.0 and named["is_causal"] is False


# flex_attention on the CPU compiles its kernel once per mask design: a few cases.

def _flex():
    from transformers.integrations.flex_attention import flex_attention_forward

    return flex_attention_forward


def test_flex_block_masks_are_read_element_by_element():
    from torch.nn.attention.flex_attention import create_block_mask

    padding = _padding()

    def padded(b, h, q_idx, kv_idx):
        return padding[b, kv_idx]

    def causal_windows(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < 100)

    for mask_mod in (padded, causal_windows):
        block_mask = create_block_mask(mask_mod, B, None, NQ, NQ, device="cpu")
        _, keep = _check_semantics(_flex(), "flex", _Module(), block_mask)
        expected = torch.stack([torch.stack([torch.tensor([[bool(mask_mod(b, 0, i, j)) for j in range(NQ)]
                                                           for i in range(0, NQ, 7)])])
                                for b in range(B)])
        assert keep is not None and torch.equal(keep[:, :1, ::7].expand_as(expected), expected)


def test_flex_all_true_block_mask_is_no_mask_and_a_float_mask_is_read_at_head_0():
    from torch.nn.attention.flex_attention import create_block_mask

    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= 0, B, None, NQ, NQ, device="cpu")
    _, keep = _check_semantics(_flex(), "flex", _Module(), block_mask)
    assert keep is None
    # flex's score_mod adds head 0 of a 4-D mask to every head (score_mask[batch_idx][0][q_idx][kv_idx]). Not run
    # through flex here: torch 2.14's CPU flex kernel with a captured score tensor crashes the process.
    per_head = torch.randn(B, H, NQ, NQ + 4)
    q, k, _ = _qkv()
    key, bias = call_bias("flex", "layer", {"module": _Module()}, q, k, per_head)
    assert key is k and torch.equal(bias, per_head[:, :1, :, :NQ])


# Flash attention: its rules, written out (it needs a GPU and flash_attn).

def _flash(named, mask=None, nk=NQ):
    q, k, _ = _qkv(nk)
    return call_bias("flash", "layer", dict(named, module=named.get("module", _Module(is_causal=False))), q, k, mask)


def test_flash_padding_mask_packed_sequences_and_causality():
    padding = _padding().to(torch.int64)  # 1: keep, as transformers hands flash attention
    _, keep = _flash({}, padding)
    assert torch.equal(keep, padding.bool()[:, None, None, :])

    starts = torch.tensor([0, 40, 100, NQ], dtype=torch.int32)
    _, keep = _flash({"cu_seq_lens_q": starts, "cu_seq_lens_k": starts})
    sequence = torch.tensor([0] * 40 + [1] * 60 + [2] * 50)
    assert torch.equal(keep, sequence[:, None] == sequence[None, :])

    _, keep = _flash({"module": _Module(is_causal=True), "is_causal": False})
    assert keep is None
    _, keep = _flash({"sliding_window": NQ + 5, "position_ids": torch.arange(NQ)[None]})  # no effect: allowed
    assert keep is None


@pytest.mark.parametrize("named, mask, nk, message", [
    ({"sliding_window": 64}, None, NQ, "sliding window of 64 keys"),
    ({"position_ids": torch.cat([torch.arange(100), torch.arange(50)])[None]}, None, NQ, "position_ids"),
    ({}, torch.ones(B, 1, NQ, NQ), NQ, "4-D mask"),
    ({"cu_seq_lens_q": torch.tensor([0, NQ])}, None, NQ, "only one of cu_seq_lens_q"),
    ({"module": _Module(is_causal=True)}, None, NQ, "causal attention .flash attention runs it causal"),
    ({"position_bias": torch.zeros(1)}, None, NQ, "position_bias"),
])
def test_flash_arguments_vitmad_cannot_read_are_refused(named, mask, nk, message):
    with pytest.raises(ValueError, match=f"vitmad.record: layer.*{message}"):
        _flash(named, mask, nk)


@pytest.mark.parametrize("semantics", ["eager", "sdpa", "flex", "flash"])
def test_softcap_and_attention_sinks_are_refused_everywhere(semantics):
    q, k, _ = _qkv()
    for named, what in (({"softcap": 50.0}, "capped .softcap=50.0"), ({"s_aux": torch.zeros(H)}, "s_aux")):
        with pytest.raises(ValueError, match=f"vitmad.record: layer: .*{what}.*not be the model's attention"):
            call_bias(semantics, "layer", dict(named, module=_Module(is_causal=False)), q, k, None)


def test_unknown_implementations_are_refused_by_name():
    for name in ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3"):
        attention_semantics(name, "ViTModel")
    with pytest.raises(ValueError, match="ViTModel uses the attention implementation 'paged|eager'"):
        attention_semantics("paged|eager", "ViTModel")


# End to end ------------------------------------------------------------------------------------------------

PATCH, SIDE = 8, 5  # a 5 x 5 grid of 8-pixel patches after CLS


def _vit(implementation):
    config = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=SIDE * PATCH, patch_size=PATCH)
    config._attn_implementation = implementation
    torch.manual_seed(0)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def _pixels():
    return torch.randn(2, 3, SIDE * PATCH, SIDE * PATCH, generator=torch.Generator().manual_seed(3))


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__ == "ViTAttention"]


def test_sdpa_modules_that_are_causal_are_refused_by_layer():
    """A module whose is_causal is True makes SDPA's attention causal: refused, not measured as bidirectional."""
    model = _vit("sdpa")
    for module in _attention_modules(model):
        module.is_causal = True
    with pytest.raises(ValueError, match=r"vitmad.record: layers.0.attention runs causal attention \(its is_causal"):
        with torch.no_grad(), vitmad.record(model):
            model(_pixels())
    assert all(not m._forward_hooks for m in model.modules())


def _eager_mad(model, pixels):
    """``[L, B, H]`` MAD of a copy of ``model`` run eager, from the probabilities it returns: CLS, then the grid."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        maps = eager(pixels, output_attentions=True).attentions
    return torch.stack([vitmad.mad_reference(a, PATCH, num_prefix_tokens=1, grid=(SIDE, SIDE)) for a in maps])


def test_flex_model_is_recorded_as_its_eager_attention():
    model = _vit("flex_attention")
    pixels = _pixels()
    with torch.no_grad():
        plain = model(pixels).last_hidden_state
        with vitmad.record(model) as rec:
            recorded = model(pixels).last_hidden_state
    assert torch.equal(plain, recorded)
    expected = _eager_mad(model, pixels)
    torch.testing.assert_close(rec.mad.double(), expected, rtol=1e-5, atol=1e-4)


class _Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.backbone = model

    def forward(self, pixels):
        return self.backbone(pixels)


@pytest.mark.parametrize("wrap", [torch.nn.Sequential, _Wrapper])
def test_flex_model_inside_a_users_module_is_recorded_as_bare(wrap):
    """Inside an nn.Sequential or a user's module the flex model was refused (its attention goes through the
    AttentionInterface, which was routed for a transformers root only; QA 334). Its config's implementation is
    switched while recording and set back after; an SDPA model so wrapped keeps its implementation (the module
    capture reads it)."""
    model = _vit("flex_attention")
    wrapped, pixels = wrap(model).eval(), _pixels()
    with torch.no_grad():
        plain = model(pixels).last_hidden_state
        with vitmad.record(wrapped) as rec:
            assert model.config._attn_implementation != "flex_attention"  # routed through the recording's wrapper
            recorded = wrapped(pixels).last_hidden_state
    assert model.config._attn_implementation == "flex_attention"
    assert torch.equal(plain, recorded)
    prefix = "0." if wrap is torch.nn.Sequential else "backbone."
    assert rec.layers == [f"{prefix}layers.0.attention", f"{prefix}layers.1.attention"]
    expected = _eager_mad(model, pixels)
    torch.testing.assert_close(rec.mad.double(), expected, rtol=1e-5, atol=1e-4)
    sdpa = wrap(_vit("sdpa")).eval()
    with torch.no_grad(), vitmad.record(sdpa) as rec_sdpa:
        inner = sdpa[0] if wrap is torch.nn.Sequential else sdpa.backbone
        assert inner.config._attn_implementation == "sdpa"
        sdpa(pixels)
    torch.testing.assert_close(rec_sdpa.mad.double(), expected, rtol=1e-5, atol=1e-4)  # the same weights (seed 0)


@pytest.mark.parametrize("implementation, wrap", [("sdpa", False), ("flex_attention", False),
                                                  ("flex_attention", True)])
def test_a_recording_begun_inside_another_over_some_of_its_layers_leaves_the_outer_its_layers(implementation, wrap):
    """Through the AttentionInterface each module had one active recording: a recording of layer 1 begun inside a
    recording of every layer took layer 1 from the outer one, whose rec.layers then lacked it, silently (QA 336; a
    transformers model, and since wrapped flex models take that route, those too). Both record it now."""
    model = _vit(implementation)
    if wrap:  # two wrappers of one model, each recorded
        outer_model, inner_model, prefix, inner_prefix = (torch.nn.Sequential(model), torch.nn.Sequential(model),
                                                          "0.", "0.")
    else:  # a transformers model holding another: the classifier and its ViT
        outer_model = transformers.ViTForImageClassification(model.config).eval()
        outer_model.vit = model
        inner_model, prefix, inner_prefix = model, "vit.", ""
    pixels = _pixels()
    with torch.no_grad(), vitmad.record(outer_model) as outer:
        with vitmad.record(inner_model, layers=[f"{inner_prefix}layers.1.attention"]) as inner:
            outer_model(pixels)
    assert outer.layers == [f"{prefix}layers.0.attention", f"{prefix}layers.1.attention"]
    assert inner.layers == [f"{inner_prefix}layers.1.attention"]
    expected = _eager_mad(model, pixels)
    torch.testing.assert_close(outer.mad.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(inner.mad.double(), expected[1:], rtol=1e-5, atol=1e-4)
    assert model.config._attn_implementation == implementation


def _stand_in_flash_attn(monkeypatch) -> None:
    """A pure-torch ``flash_attn`` package (its two functions by SDPA, on [B, N, H, D] tensors), so that
    transformers' own ``flash_attention_2`` path, its lazy kernel import included, runs on the CPU; transformers'
    loaded-kernel globals are restored after the test."""
    import importlib.machinery
    import sys
    import types

    import transformers.modeling_flash_attention_utils as flash_utils

    def attend(q, k, v, scale, causal):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), scale=scale, is_causal=causal)
        return out.transpose(1, 2)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        return attend(q, k, v, softmax_scale, causal)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, **_):
        bounds = cu_seqlens_q.tolist()
        return torch.cat([attend(q[None, a:b], k[None, a:b], v[None, a:b], softmax_scale, causal)[0]
                          for a, b in zip(bounds[:-1], bounds[1:])])

    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    package.flash_attn_func, package.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    package.flash_attn_with_kvcache = None
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = flash_utils._pad_input, flash_utils._unpad_input
    package.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(flash_utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setattr(flash_utils, "is_flash_attn_3_available", lambda: False)
    monkeypatch.setattr(flash_utils, "is_flash_attn_4_available", lambda: False)
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        if hasattr(flash_utils, name):
            monkeypatch.setattr(flash_utils, name, getattr(flash_utils, name))


def test_flash_attention_model_runs_its_own_kernel_while_recorded(monkeypatch):
    """transformers' flash_attention_forward chooses the kernel it imports by ``module.config._attn_implementation``;
    while recorded that named vitmad's wrapper, and the call failed ("Could not find the currently requested flash
    attention implementation at 'vitmad_record_flash_attention_2'"; found by QA helper-136). The model runs its
    flash kernel (here a stand-in over SDPA) and the recording equals the SDPA model's."""
    _stand_in_flash_attn(monkeypatch)
    model, reference = _vit("sdpa"), _vit("sdpa")
    # Set after the build: building with it checks for a CUDA device and the real package.
    model.config._attn_implementation = "flash_attention_2"
    pixels = _pixels()
    with torch.no_grad():
        plain = model(pixels).last_hidden_state
        with vitmad.record(model) as rec:
            recorded = model(pixels).last_hidden_state
        with vitmad.record(reference) as expected:
            reference(pixels)
    assert torch.equal(plain, recorded)
    assert model.config._attn_implementation == "flash_attention_2"
    assert rec.layers == expected.layers and len(rec.layers) == 2
    torch.testing.assert_close(rec.mad, expected.mad, rtol=1e-6, atol=1e-5)


def test_an_implementation_vitmad_cannot_read_is_refused_before_any_change():
    model = _vit("sdpa")
    model.config._attn_implementation = "paged|eager"
    with pytest.raises(ValueError, match="uses the attention implementation 'paged|eager'"):
        with vitmad.record(model):
            pass
    assert model.config._attn_implementation == "paged|eager"


def test_softcapped_video_model_is_refused_even_with_positions_given():
    """VideoPrism caps its logits (softcap 50): a MAD of uncapped logits would not be its attention."""
    videoprism = pytest.importorskip("transformers.models.videoprism.modeling_videoprism")
    config = transformers.VideoPrismVisionConfig(image_size=36, num_frames=2, hidden_size=32, num_attention_heads=2,
                                                 intermediate_size=64, num_spatial_layers=1, num_temporal_layers=1,
                                                 num_auxiliary_layers=0)
    model = videoprism.VideoPrismVisionModel(config).eval()
    positions = torch.tensor([[9.0, 9.0], [9.0, 27.0], [27.0, 9.0], [27.0, 27.0]])
    with pytest.raises(ValueError, match=r"spatial_layers.0.attention: the logits are capped \(softcap=50.0\)"):
        with torch.no_grad(), vitmad.record(model, positions=positions, layers=["spatial_layers.*.attention"]):
            model(torch.randn(1, 2, 3, 36, 36))


def test_phi4_multimodal_vision_tower_is_causal_under_sdpa_only():
    """transformers' Phi-4-multimodal vision attention sets is_causal = True: SDPA runs it causal, eager does not
    (their outputs differ). Under sdpa it is refused with that reason; under eager it is recorded against its
    eager maps on its 4 x 4 grid of 14-pixel patches."""
    config = transformers.Phi4MultimodalVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=56, patch_size=14)
    torch.manual_seed(0)
    model = transformers.Phi4MultimodalVisionModel(config).eval()
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="runs causal attention .its is_causal attribute is True.*attn_implementation="
                                         "'eager' the same module attends to every key"):
        with torch.no_grad(), vitmad.record(model):
            model(pixel_values=pixels)

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        assert not torch.allclose(model(pixel_values=pixels).last_hidden_state,
                                  eager(pixel_values=pixels).last_hidden_state, atol=1e-3)
        maps = eager(pixel_values=pixels, output_attentions=True).attentions
        plain = eager(pixel_values=pixels).last_hidden_state
        with vitmad.record(eager) as rec:
            # Its eager function is simple_eager_attention_forward, not the file's eager_attention_forward (which
            # needs num_key_value_groups): the one the module names is the one called.
            recorded = eager(pixel_values=pixels).last_hidden_state
    assert torch.equal(plain, recorded)
    expected = torch.stack([vitmad.mad_reference(a, 14, num_prefix_tokens=0, grid=(4, 4)) for a in maps])
    torch.testing.assert_close(rec.mad.double(), expected, rtol=1e-5, atol=1e-4)


def test_sdpa_replaced_by_a_wrapper_that_calls_it_is_still_recorded(monkeypatch):
    """A profiler or library that wraps F.scaled_dot_product_attention (and calls torch's) left every layer
    unrecorded, and rec.mad then advised naming the layers (helper-61)."""
    import torch.nn.functional as F

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    original, wrapped = F.scaled_dot_product_attention, []

    def wrapper(*args, **kwargs):
        wrapped.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", wrapper)
    with torch.no_grad(), vitmad.record(model) as again:
        model(pixels)
    assert len(wrapped) == 2 and again.layers == rec.layers
    torch.testing.assert_close(again.mad, rec.mad, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [True, False])
def test_causal_attention_is_refused_whether_fused_or_computed_by_the_module(fused):
    """timm's forward(x, is_causal=True): the SDPA path was refused, the module's own softmax (fused_attn=False)
    recorded the causal attention's MAD without a word (QA 293). Its probabilities are checked to be the causal
    attention's first, then the refusal."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=24, num_heads=3).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    pixels = torch.randn(2, 3, 32, 32)
    if not fused:  # the premise: the module's probabilities weigh no later key
        seen = []
        hook = model.blocks[0].attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
        with torch.no_grad():
            model(pixels, is_causal=True)
        hook.remove()
        assert bool((seen[0].triu(1) == 0).all()) and bool((seen[0].tril(-1) > 0).any())
    with torch.no_grad(), pytest.raises(ValueError, match=r"vitmad.record: blocks\.0\.attn .*runs causal attention"):
        with vitmad.record(model):
            model(pixels, is_causal=True)
    # The same model without is_causal is recorded: the check refuses causal attention alone.
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert rec.mad.isfinite().all()


def test_probabilities_that_round_to_zero_in_a_sharp_head_are_not_taken_for_a_causal_mask():
    """QA 297: read from the values, each patch on itself or the class token (weights rounded to 0 in float16) was
    refused as causal. Causal probabilities weigh every key up to each query; a sharp head does not."""
    from vitmad.recording.recorder import _refuse_causal_probabilities

    sharp = torch.zeros(2, 3, 4, 4)
    sharp[..., 0, 0] = 1.0
    sharp[..., [1, 2, 3], [0, 2, 3]] = 1.0  # patch 1 on the class token, patches 2 and 3 on themselves
    _refuse_causal_probabilities("layer", sharp)
    _refuse_causal_probabilities("layer", torch.tensor([[1.0, 0.0], [0.5, 0.5]]))  # two tokens: no order to read
    causal = torch.randn(2, 3, 4, 4).masked_fill(torch.ones(4, 4, dtype=torch.bool).triu(1), float("-inf"))
    with pytest.raises(ValueError, match=r"layer runs causal attention \(its attention probabilities weigh no key "
                                         r"after any query, and query 3 of matrix \[0, 0\] of \[2, 3\] weighs 2 "
                                         r"keys before it\)"):  # key 0, weighed by every query, is no order
        _refuse_causal_probabilities("layer", causal.softmax(-1))
    # QA 300: a sharp float16 head of attention sinks, every patch on the class token and register 0 alone.
    sinks = torch.zeros(1, 1, 6, 6)
    sinks[..., 0, 0] = 1.0
    sinks[..., 1:, :2] = 0.5
    _refuse_causal_probabilities("layer", sinks)
    # QA 299: causal rows with zeros below the diagonal too (padding keys, a causal window, float16 rounding).
    window = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)
    windowed = torch.randn(1, 2, 6, 6).masked_fill(~window, float("-inf")).softmax(-1)
    with pytest.raises(ValueError, match=r"query 2 of matrix \[0, 0\] of \[1, 2\] weighs 2 keys before it"):
        _refuse_causal_probabilities("layer", windowed)


def test_a_causal_mask_given_to_sdpa_is_refused_as_is_causal_is():
    """QA 299: timm's forward(x, attn_mask=tril) on the SDPA path was recorded (is_causal alone was refused); a
    padding mask, which keeps later keys, is recorded."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              embed_dim=24, num_heads=3).eval()
    pixels = torch.randn(2, 3, 32, 32)
    causal = torch.ones(17, 17, dtype=torch.bool).tril()
    with torch.no_grad(), pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\) runs causal attention "
                                                          r"\(its scaled_dot_product_attention mask keeps no key after "
                                                          r"its query, in image 0, head 0\)"):
        with vitmad.record(model):
            model(pixels, attn_mask=causal)
    padding = torch.ones(2, 1, 17, 17, dtype=torch.bool)
    padding[1, ..., -2:] = False  # image 1's last two keys masked
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels, attn_mask=padding)
    assert rec.mad.isfinite().all()
    # QA 300: torch's CausalBias (its storage no bias: MAD from uninitialised memory), a causal mask filled with the
    # dtype's lowest value (transformers') or -1e4, and a 3-D mask's heads.
    from torch.nn.attention.bias import causal_upper_left

    filled = torch.zeros(17, 17).masked_fill(~causal, torch.finfo(torch.float32).min)
    head_1 = torch.ones(3, 17, 17, dtype=torch.bool)
    head_1[1] = causal
    for mask, where in ((causal_upper_left(17, 17), r"; MAD is defined"),
                        (filled, r" \(its scaled_dot_product_attention mask"), (filled.clamp(min=-1e4), r" \(its"),
                        (head_1, r" .*in image 0, head 1\)")):
        with torch.no_grad(), pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\) runs causal attention"
                                                              + where):
            with vitmad.record(model):
                model(pixels, attn_mask=mask)
    # Each token on itself and the class token, image 1's last three query rows padded (keeping no key): recorded.
    sinks = torch.eye(17, dtype=torch.bool).expand(2, 1, 17, 17).clone()
    sinks[..., 0] = True
    sinks[1, :, -3:] = False
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels, attn_mask=sinks)
    assert rec.mad[0, 0].isfinite().all()
    # The whole mask is read where some matrix's first query keeps no later key (a padding mask is read one row):
    # image 0 bidirectional beside image 1 causal, and a causal mask whose first query is padding, are refused.
    mixed = torch.ones(2, 1, 17, 17, dtype=torch.bool)
    mixed[1, 0] = causal
    padded_first = causal.clone()
    padded_first[0] = False
    for mask, where in ((mixed, "image 1, head 0"), (padded_first, "image 0, head 0")):
        with torch.no_grad(), pytest.raises(ValueError, match=rf"runs causal attention .*, in {where}\)"):
            with vitmad.record(model):
                model(pixels, attn_mask=mask)
    keys = torch.ones(2, 1, 1, 17, dtype=torch.bool)  # one row broadcast over the queries
    keys[1, ..., -4:] = False
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels, attn_mask=keys)
    assert rec.mad.isfinite().all()
