"""vitmad.record's arguments: a wrong kind of value is an error naming the argument, never a number; a recording
is active once at a time."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vitmad  # noqa: E402


def _tiny_vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8)
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


@pytest.mark.parametrize(("model", "options", "error", "message"), [
    (42, {}, TypeError, "vitmad.record: model must be an nn.Module (a spec string is for vitmad.profile), got int"),
    ("builtin:dinov2-s14", {}, TypeError, "vitmad.record: model must be an nn.Module"),
    (None, {"renormalize": "no"}, TypeError, "vitmad.record: renormalize must be True or False, got 'no'"),
    (None, {"reduction": None}, TypeError, "vitmad.record: reduction must be a string, got NoneType None"),
    (None, {"reduction": "sum"}, ValueError, "vitmad.record: reduction must be 'mean' or 'none', got 'sum'"),
    (None, {"num_prefix_tokens": "1"}, ValueError, "vitmad.record: num_prefix_tokens must be an int >= 0, got '1'"),
    (None, {"num_prefix_tokens": True}, ValueError, "vitmad.record: num_prefix_tokens must be an int >= 0"),
    (None, {"patch": True}, ValueError, "vitmad.record: patch must be a positive int (pixels), got True"),
    # A bool tensor is no patch size either (QA 294: recorded with patch 1).
    (None, {"patch": torch.tensor(True)}, ValueError, "vitmad.record: patch must be a positive int (pixels), got "
                                                      "tensor(True)"),
    (None, {"layers": [1]}, TypeError, "vitmad.record: layers must be a list of names or patterns (strings)"),
    (None, {"layers": []}, ValueError, "vitmad.record: layers must name at least one module (None records every "
                                       "attention layer), got an empty list"),
    (None, {"layers": 5}, TypeError, "vitmad.record: layers must be a list of names or patterns (strings), got int 5"),
    (None, {"layers": {"layers.0.attention": 1}}, TypeError,
     "vitmad.record: layers must be a list of names or patterns (strings), got dict"),
    (None, {"layers": [""]}, ValueError, "vitmad.record: layers names '' (the model itself), but ViTModel is not one "
                                         "attention layer; name its attention modules (layers.0.attention"),
    (None, {"stats": ["entropy", "temporal_mad"]}, ValueError,
     "vitmad.record: stats must be among 'mad', 'entropy', 'prefix_mass', 'self_mass', 'prefix_maps' (or 'all'), got "
     "'temporal_mad'; the temporal MAD of video layers needs no asking: it is always in rec.temporal_mad"),
    (None, {"positions": torch.zeros(5, 2, device="meta")}, ValueError,
     "vitmad.record: positions must be a floating tensor [N, 2]"),
])
def test_arguments_of_the_wrong_kind(model, options, error, message):
    with pytest.raises(error) as raised:
        vitmad.record(_tiny_vit() if model is None else model, **options)
    assert str(raised.value).startswith(message)


def test_numpy_bool_renormalizes_as_the_ops_take_it():
    """``renormalize=np.True_`` is True for vitmad.record as for vitmad.mad (was refused by record alone)."""
    import numpy as np

    model, pixels = _tiny_vit(), torch.randn(1, 3, 32, 32)
    sums = []
    for flag in (np.True_, True, False):
        with torch.no_grad(), vitmad.record(model, renormalize=flag) as rec:
            model(pixel_values=pixels)
        sums.append(rec.mad)
    assert torch.equal(sums[0], sums[1]) and not torch.equal(sums[1], sums[2])


def test_a_recording_is_active_once_at_a_time():
    """Entering an active recording again is refused, and the outer block goes on recording (was: the inner
    exit removed the hooks, and the outer block recorded nothing, silently for some models)."""
    model, pixels = _tiny_vit(), torch.randn(1, 3, 32, 32)
    rec = vitmad.record(model)
    with torch.no_grad(), rec:
        with pytest.raises(RuntimeError, match="vitmad.record: this recording is already active"):
            with rec:
                pass
        model(pixel_values=pixels)
    assert rec.mad.shape == (2, 1, 2) and bool(rec.mad.isfinite().all())


def test_a_grid_that_is_not_the_patch_embeddings_is_refused():
    """grid=[3, 3] on a 4x4 ViT counted 8 of the 16 patches as prefix tokens and measured the rest on a 3x3 grid
    (6.16 px instead of 15.1), with no error. With num_prefix_tokens also given the user's layout is taken."""
    model, pixels = _tiny_vit(), torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"the given grid=\[3, 3\] is not the 4x4 grid of its patch embedding "
                                         r"\(embeddings.patch_embeddings.projection\)"):
        with torch.no_grad(), vitmad.record(model, grid=[3, 3]):
            model(pixel_values=pixels)
    with torch.no_grad(), vitmad.record(model, grid=[4, 4]) as rec:
        model(pixel_values=pixels)
    with torch.no_grad(), vitmad.record(model) as detected:
        model(pixel_values=pixels)
    torch.testing.assert_close(rec.mad, detected.mad, rtol=0, atol=0)
    # With num_prefix_tokens too, the tokens are counted as given, but the cells of another grid than the
    # embedding's are not its stride: patch= is needed (Unlimited-OCR's CLIP stage after SAM's strided convolutions
    # was measured at SAM's 8 px for 32 px cells, found by QA).
    with pytest.raises(ValueError, match=r"the given grid=\[3, 3\] is not the 4x4 grid of its patch embedding .*so "
                                         r"the pixels per token are not that embedding's stride; pass patch="):
        with torch.no_grad(), vitmad.record(model, grid=[3, 3], num_prefix_tokens=8):
            model(pixel_values=pixels)
    with torch.no_grad(), vitmad.record(model, grid=[3, 3], num_prefix_tokens=8, patch=10) as given:
        model(pixel_values=pixels)
    assert given.geometry[0].stride == (10.0, 10.0) and given.geometry[0].grid == (3, 3)


def test_pooled_tokens_are_refused_naming_every_argument_that_places_them(monkeypatch):
    """Patches average-pooled 2x2 before the blocks: the first refusal named grid= alone, the next num_prefix_tokens=,
    the next patch= (three tries, found by QA). Each now names all three, and with them the MAD is the one of the
    2 x 2 grid of 16 px cells (centres 8 and 24 px) under the layer's own attention."""
    torch.manual_seed(0)
    model, pixels = _tiny_vit(), torch.randn(1, 3, 32, 32)

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = model

        def forward(self, x):
            tokens = self.vit.embeddings(x)[:, 1:]  # the 4 x 4 patches, class token dropped
            grid = tokens.unflatten(1, (4, 4)).permute(0, 3, 1, 2)
            pooled = torch.nn.functional.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
            return self.vit.layers[0](pooled)

    pooled = Pooled().eval()
    for options in ({}, {"grid": [2, 2]}):
        with pytest.raises(ValueError) as refused:
            with torch.no_grad(), vitmad.record(pooled, **options):
                pooled(pixels)
        message = str(refused.value)
        assert "num_prefix_tokens=<tokens before the grid>" in message and "patch=<pixels per token" in message
        assert "grid=[grid_h, grid_w]" in message or "leave grid unset" in message
    captured = {}
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, *args, **kwargs):
        captured["logits"] = (query.double() @ key.double().transpose(-1, -2)) / math.sqrt(query.shape[-1])
        return original(query, key, *args, **kwargs)

    with torch.no_grad(), vitmad.record(pooled, grid=[2, 2], num_prefix_tokens=0, patch=16) as rec:
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        pooled(pixels)
        monkeypatch.undo()
    centres = torch.tensor([[8.0, 8.0], [8.0, 24.0], [24.0, 8.0], [24.0, 24.0]], dtype=torch.float64)
    want = (captured["logits"].softmax(-1) * torch.cdist(centres, centres)).sum(-1).mean(-1)  # [B, H]
    torch.testing.assert_close(rec.mad[0].double(), want, rtol=1e-5, atol=1e-5)


def test_a_call_the_model_cannot_make_fails_with_the_models_error_not_vitmads():
    """A transformers Swin run where a stage is smaller than its window (its relative bias no longer fits the
    logits) fails without vitmad; recorded, vitmad's refusal of the same bias came first and read as vitmad's
    fault. Fused timm-style attention alike: torch's own error for an attn_mask that does not fit."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=64, patch_size=4, window_size=7, depths=[1, 1], embed_dim=8,
                                     num_heads=[1, 2])
    swin = transformers.SwinModel(config).eval()
    pixels = torch.randn(1, 3, 24, 24)
    with pytest.raises(RuntimeError) as plain:
        swin(pixels)
    with vitmad.record(swin), pytest.raises(RuntimeError) as recorded:
        swin(pixels)
    assert str(recorded.value) == str(plain.value)

    class MaskedAttention(torch.nn.Module):
        fused_attn = True

        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 1, 8).permute(2, 0, 3, 1, 4)
            mask = torch.zeros(x.shape[1] + 1, x.shape[1] + 1)  # one key too many
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    block = MaskedAttention()
    tokens = torch.randn(2, 17, 8)
    with pytest.raises(RuntimeError) as plain:
        block(tokens)
    with vitmad.record(block, positions=torch.zeros(17, 2)), pytest.raises(RuntimeError) as recorded:
        block(tokens)
    assert str(recorded.value) == str(plain.value)


def _recorded_mad(model, pixels, **options):
    with torch.no_grad(), vitmad.record(model, **options) as rec:
        model(pixel_values=pixels)
    return rec.mad


def test_integers_of_any_kind_and_any_iterable_of_layer_names():
    """patch and num_prefix_tokens take NumPy and 0-d tensor integers as grid does; layers takes a generator (read
    once) and a wildcard matching every module ('*', the model itself among them) records the attention modules
    alone, as None does (was: the model itself was chosen too, whose forward made every layer's attention calls)."""
    np = pytest.importorskip("numpy")
    model, pixels = _tiny_vit(), torch.randn(1, 3, 32, 32)
    expected = _recorded_mad(model, pixels)
    for options in ({"patch": np.int64(8), "num_prefix_tokens": np.int64(1)},
                    {"patch": torch.tensor(8), "num_prefix_tokens": torch.tensor(1)},
                    {"layers": (f"layers.{i}.attention" for i in range(2))},
                    {"layers": ["*"]}):
        torch.testing.assert_close(_recorded_mad(model, pixels, **options), expected, rtol=0, atol=0)
    for patch in (np.float64(8.0), torch.tensor(8.0), np.bool_(True)):
        with pytest.raises(ValueError, match=r"vitmad.record: patch must be a positive int \(pixels\), got "):
            vitmad.record(model, patch=patch)


def test_results_after_the_user_cleared_the_calls_say_so():
    model, pixels = _tiny_vit(), torch.randn(1, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixel_values=pixels)
        first = rec.mad
        rec.calls.clear()
        with pytest.raises(RuntimeError, match=r"ran 1 time\(s\) in this recording, but its recorded calls were "
                                               r"removed from rec.calls"):
            _ = rec.mad
        model(pixel_values=pixels)
        torch.testing.assert_close(rec.mad, first, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_a_forward_inside_a_torch_func_transform_is_not_recorded():
    """vmap and grad run the model on their wrapper tensors: that forward is left out with a warning (was: the
    wrappers were recorded, and reading rec.mad failed inside torch.stack with an internal assert), and the model's
    own forward inside the block is still recorded."""
    model, pixels = _tiny_vit(), torch.randn(2, 1, 3, 32, 32)
    with vitmad.record(model) as rec:
        with torch.no_grad(), pytest.warns(UserWarning, match="a torch.func transform .* ran a recorded model; that "
                                                              "forward is not recorded"):
            batched = torch.vmap(lambda x: model(pixel_values=x).last_hidden_state)(pixels)
        assert rec.calls == []
        with pytest.raises(RuntimeError, match=r"ran 1 time\(s\) in this recording, each inside a torch.func "
                                               r"transform \(vmap, grad, ...\), whose forwards are not recorded"):
            _ = rec.mad
        with pytest.warns(UserWarning, match="a torch.func transform"):
            torch.func.grad(lambda x: model(pixel_values=x).last_hidden_state.sum())(pixels[0])
        assert rec.calls == []
        with torch.no_grad():
            plain = torch.stack([model(pixel_values=x).last_hidden_state for x in pixels])
    torch.testing.assert_close(batched, plain)
    assert rec.mad.shape == (2, 1, 2) and len(rec.calls) == 2
    torch.testing.assert_close(rec.mad, _recorded_mad(model, pixels[1]))


def test_positions_of_another_length_name_both_shapes_and_the_packed_case():
    model, pixels = _tiny_vit(), torch.randn(1, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model, positions=torch.zeros(16, 2)):
        with pytest.raises(ValueError, match=r"attention runs over 1 sequence of 17 tokens \(images, or windows of "
                                             r"them\), so positions must be \[17, 2\] or "
                                             r"\[1, 17, 2\]; got shape \[16, 2\] \(if this module attends over parts "
                                             r"of a packed sequence one call at a time"):
            model(pixel_values=pixels)


def test_a_plain_layout_given_for_a_model_without_one_warns_that_it_is_not_used():
    """Swin's family reads its own windows and stages: patch= given for it changed nothing, silently."""
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=4)
    swin = transformers.SwinModel(config).eval()
    with pytest.warns(UserWarning, match=r"patch=8, grid=\[8, 8\] given, but no recorded layer of SwinModel has a "
                                         r"plain ViT layout: .* these values are not used") as warned:
        recording = vitmad.record(swin, patch=8, grid=[8, 8])
    assert warned[0].filename == __file__  # pointed at the user's call
    with recording as rec, torch.no_grad():
        swin(torch.rand(1, 3, 32, 32))
    assert rec.geometry[0].stride == (4.0, 4.0)
    # A plain ViT takes them: no warning (warnings are errors in the tests).
    with vitmad.record(_tiny_vit(), patch=8, grid=[4, 4]) as rec, torch.no_grad():
        rec.model(torch.rand(1, 3, 32, 32))
    assert rec.layout.patch == 8


def test_layers_matching_no_attention_name_what_they_matched():
    """A wildcard in layers= that matches only modules without attention outside the tower (QA helper-115:
    OneFormer's task encoder, an MLP) is refused with what it matched, not as a model without attention."""
    transformers = pytest.importorskip("transformers")
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tower, vision_config=dict(
        tower, image_size=32, patch_size=8)))
    with pytest.raises(ValueError, match=r"found no attention layer vitmad knows in the modules of CLIPModel that "
                                         r"layers=\['text_model.embeddings\*'\] names \(text_model.embeddings, "):
        vitmad.record(model, layers=["text_model.embeddings*"])


def test_entries_of_different_batch_sizes_do_not_stack_and_say_why():
    """A model that runs its layers once per part of the batch (AnimateDiff's FreeNoise split inference): each run
    is an entry of the call; rec.mad cannot stack them, and says so (was torch's own "stack expects each tensor to
    be equal size", QA helper-175). Each entry equals the plain recording's rows of its part."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()

    class Chunked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit

        def forward(self, pixels):
            tokens = self.vit._pos_embed(self.vit.patch_embed(pixels))
            return [self.vit.blocks(part) for part in tokens.split([1, 2])]

    chunked = Chunked()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # The class token, then the 2 x 2 grid of 16 px patches: given by hand, as no layout of a chunked batch is known.
    positions = torch.tensor([[math.nan, math.nan], [8.0, 8.0], [8.0, 24.0], [24.0, 8.0], [24.0, 24.0]])
    with torch.no_grad():
        with vitmad.record(vit, positions=positions) as whole:
            vit(pixels)
        with vitmad.record(chunked, positions=positions) as rec:
            chunked(pixels)
    assert len(rec.calls) == 1 and [t.shape[0] for t in rec.per_layer] == [1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"the recorded entries of this call have different batch sizes \(\[1, 2\]\): "
                                         r"its layers ran on batches of different sizes .* a layer run once per part "
                                         r"of the batch"):
        _ = rec.mad
    torch.testing.assert_close(torch.cat([rec.per_layer[0], rec.per_layer[2]]), whole.per_layer[0])


def test_vitmads_errors_pickle_as_they_were():
    """A process pool sends a worker's error back pickled (QA 297: its two-argument __init__ broke unpickling)."""
    import pickle

    from vitmad.profiling.options import MissingPathError, OptionError, Parameter
    from vitmad.recording.recorder import LayersError, NoAttentionRanError, NoLayerError

    errors = [NoAttentionRanError("M ran, but none of ...", "vitmad.record: M ran, but none of ...; pass layers="),
              NoLayerError("found no attention layer", "; pass layers="),  # its prefix came back twice (QA 299)
              LayersError("pattern 'x' matches no module of M"),
              OptionError("resume", ("changed since: ", Parameter("batch_size"))),  # broke a process pool
              MissingPathError("images", "no such file or folder")]
    for error in errors:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and vars(again) == vars(error)


def test_layers_naming_blocks_by_wildcard_record_the_attention_modules_they_hold():
    """QA 359: ``layers=["blocks.?"]`` (a timm ViT's blocks, by wildcard) found no attention layer; a wildcard's
    blocks now record the attention modules they hold, with the numbers of the default recording. A block named
    whole stays the user's layer (QA 362: renaming a ViTamin block after its attention module broke code keyed by
    the name given); a Swin block so named, which cannot be placed as a plain layer (its windows are its attention
    module's), is refused naming the attention module to pass instead."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3).eval()
    vitamin = timm.create_model("vitamin_small_224", pretrained=False, img_size=64).eval()
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, depths=(1, 1, 1, 1),
                             embed_dim=24, num_heads=(1, 2, 2, 4)).eval()
    for model, size, layers, expected in [
            (vit, 64, ["blocks.?"], ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]),
            (vit, 64, ["blocks.1"], ["blocks.1"]),
            (vitamin, 64, ["blocks.0"], ["blocks.0"]),
            (swin, 112, ["layers.?"], [f"layers.{i}.blocks.0.attn" for i in range(4)])]:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), vitmad.record(model) as whole:
            model(x)
        with torch.no_grad(), vitmad.record(model, layers=layers) as rec:
            model(x)
        assert rec.layers == expected, layers
        for name, values in zip(rec.layers, rec.calls[0].per_layer, strict=True):
            own = whole.layers.index(name if name in whole.layers else f"{name}.attn")
            torch.testing.assert_close(values, whole.calls[0].per_layer[own], rtol=0, atol=0)
    with torch.no_grad(), vitmad.record(swin, layers=["layers.1.blocks.0"]):
        with pytest.raises(ValueError, match=r"; layers\.1\.blocks\.0 holds the attention module\(s\) "
                                             r"layers\.1\.blocks\.0\.attn, which vitmad places: name those in "
                                             r"layers=$"):
            swin(torch.randn(1, 3, 112, 112))
