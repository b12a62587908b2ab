"""vitmad.record on the diffusers ControlNets built on a transformer vitmad places (HunyuanDiT's, QwenImage's,
Cosmos Transfer's, with their Multi wrappers), JoyImageEdit and JoyImageEditPlus, and a generic Transformer2DModel
recorded alone; Sana's ControlNet refused as Sana's linear attention, and the calls with reference images refused.

The references, the sharpening and the checks are those of test_record_diffusers_images.py (the float64 softmax of
every ``F.scaled_dot_product_attention`` the processors call) and test_record_diffusers_video.py (the same, per
attention module, with the temporal MAD), placed by geometry written here from diffusers 0.42.1's source, in latent
pixels (and latent frames) of the model's input:

- ``HunyuanDiT2DControlNetModel``: HunyuanDiT's ``PatchEmbed`` (a ``Conv2d`` of kernel = stride = 2, row-major, an odd
  side floored), run on the latent and again on the condition (added); its ``HunyuanDiTBlock``'s ``attn1`` over the
  patches alone (its 2-D RoPE changes the logits only), ``attn2`` to the caption skipped.
- ``QwenImageControlNetModel``: QwenImage's packed latents (2 x 2 latent pixels a token, row-major on ``img_shapes``)
  and ``QwenDoubleStreamAttnProcessor2_0``'s ``cat([caption, image])``, the caption's padding masked.
- ``Transformer2DModel`` without ``patch_size``: ``permute(0, 2, 3, 1).reshape(B, H * W, C)`` of its input (before
  or after ``proj_in``): one token per input pixel, row-major, stride 1.
- ``CosmosControlNetModel``: ``patch_embed`` (``CosmosPatchEmbed``) cuts the control latents into ``(1, 2, 2)``
  tubelets, flattened (frame, row, column); its control blocks' ``attn1`` over them, ``attn2`` (text) skipped.
- ``JoyImageEditTransformer3DModel``: ``img_in`` (``Conv3d``, kernel = stride = ``patch_size``) over ``[B, C, F, H, W]``
  (or one item ``[B, 1, C, F, H, W]``), ``flatten(2)``: (frame, row, column); ``JoyImageAttnProcessor`` attends over
  ``cat([image, caption])``: the caption last.
- ``JoyImageEditPlusTransformer3DModel``: its pipeline cuts the latent, ``reshape(c, t, pt, h, ph, w, pw).permute(1,
  3, 5, 0, 2, 4, 6)``: (frame, row, column); ``cat([image, caption])``, the caption's padding masked.
"""

from __future__ import annotations

import pytest
import torch
from test_record_diffusers_images import TOL, _attention_maps, _check, _positions, _record, _sharpen
from test_record_diffusers_video import BATCH, TEXT, TEXT_DIM
from test_record_diffusers_video import _check as _check_video
from test_record_diffusers_video_2 import _recorded_and_reference
from test_record_diffusers_video_2 import _sharpened as _sharpened_video

import vitmad
from conftest import statistics_reference
from vitmad.recording.recorder import NoLayerError

diffusers = pytest.importorskip("diffusers")
joyimage = pytest.importorskip("diffusers.models.transformers.transformer_joyimage")
joyimage_plus = pytest.importorskip("diffusers.models.transformers.transformer_joyimage_edit_plus")

_HUNYUAN_DIT = dict(num_attention_heads=2, attention_head_dim=8, hidden_size=16, in_channels=4, patch_size=2,
                    sample_size=8, cross_attention_dim=16, pooled_projection_dim=16, text_len=3, text_len_t5=2,
                    cross_attention_dim_t5=16, use_style_cond_and_image_meta_size=False)


def _samples(returned) -> tuple:
    """A ControlNet's block samples: its output's, or the list a Multi wrapper returns (return_dict=False)."""
    samples = returned.controlnet_block_samples if hasattr(returned, "controlnet_block_samples") else returned
    return tuple(samples)


def _hunyuan_inputs(latent: tuple[int, int], grid: tuple[int, int]) -> dict:
    # HunyuanDiTPipeline: the 2-D rotary embedding of the patch grid, resized into its base grid.
    crops = diffusers.pipelines.hunyuandit.pipeline_hunyuandit.get_resize_crop_region_for_grid(grid, 4)
    rotary = diffusers.models.embeddings.get_2d_rotary_pos_embed(8, crops, grid, output_type="pt")
    return {"hidden_states": torch.randn(2, 4, *latent), "timestep": torch.tensor([400.0, 400.0]),
            "controlnet_cond": torch.randn(2, 4, *latent), "encoder_hidden_states": torch.randn(2, 3, 16),
            "text_embedding_mask": torch.ones(2, 3), "encoder_hidden_states_t5": torch.randn(2, 2, 16),
            "text_embedding_mask_t5": torch.ones(2, 2), "image_rotary_emb": rotary}


@pytest.mark.parametrize("wrapped", [False, True])
def test_hunyuan_dit_controlnet_self_attention_on_the_latent_patches(monkeypatch, wrapped):
    torch.manual_seed(0)
    controlnet = _sharpen(diffusers.HunyuanDiT2DControlNetModel(conditioning_channels=4, transformer_num_layers=6,
                                                                **_HUNYUAN_DIT))  # 6 // 2 - 1 = 2 blocks
    grid = (3, 5)  # a 7 x 11 latent cut by 2 x 2 patches, the last row and column dropped
    inputs = _hunyuan_inputs((7, 11), grid)
    model = controlnet
    if wrapped:  # one net: the wrapper returns its output
        model = diffusers.HunyuanDiT2DMultiControlNetModel([controlnet])
        inputs |= {"controlnet_cond": [inputs["controlnet_cond"]], "conditioning_scale": [1.0]}

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    # Besides: each block's cross-attention to the 3 + 2 caption tokens and the text pooler's attention (no layer).
    self_maps = [m for m in maps if m.shape[-2:] == (15, 15)]
    assert len(self_maps) == 2 and len(maps) == 5
    rec, rec_tokens = _record(model, run, spied, _samples)
    prefix = "nets.0." if wrapped else ""
    # The pos_embed convolution cuts the latent, then the condition: one call per forward all the same.
    assert len(rec.calls) == len(rec_tokens.calls) == 1
    assert rec.layers == [f"{prefix}blocks.0.attn1", f"{prefix}blocks.1.attn1"]
    assert set(rec.skipped) == {f"{prefix}blocks.0.attn2", f"{prefix}blocks.1.attn2"}
    for layer, probabilities in enumerate(self_maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 2.0, 0, 0), grid, 2.0, 0, 0)


class _HunyuanStep(torch.nn.Module):
    """A user's denoising step as HunyuanDiTControlNetPipeline runs it: the ControlNet, then the transformer given
    its block samples; the ControlNet is declared first, so its patch convolution (run on the latent, then on the
    condition) is the first of the step in module order."""

    def __init__(self, controlnet, transformer, inputs):
        super().__init__()
        self.controlnet, self.transformer, self.inputs = controlnet, transformer, inputs

    def forward(self):
        given = {k: v for k, v in self.inputs.items() if k != "controlnet_cond"}
        samples = self.controlnet(**self.inputs).controlnet_block_samples
        return self.transformer(**given, controlnet_block_samples=samples)


@pytest.mark.parametrize("layers", [None, ["transformer.*"]])
def test_hunyuan_dit_controlnet_then_transformer_in_a_users_step(monkeypatch, layers):
    """Two steps of a module running HunyuanDiT2DControlNetModel then HunyuanDiT2DModel: one call per step (the
    ControlNet's convolution, run twice per step, opened an empty call before each step's layers with only the
    transformer's recorded), and by default both nets' attn1 recorded (the transformer's were left out, listed
    nowhere), each against its own float64 attention on the 3 x 5 patch grid of the 7 x 11 latent."""
    torch.manual_seed(0)
    controlnet = _sharpen(diffusers.HunyuanDiT2DControlNetModel(conditioning_channels=4, transformer_num_layers=6,
                                                                **_HUNYUAN_DIT))  # 2 blocks
    transformer = _sharpen(diffusers.HunyuanDiT2DModel(num_layers=6, **_HUNYUAN_DIT))  # the ControlNet's 6
    grid = (3, 5)
    step = _HunyuanStep(controlnet, transformer, _hunyuan_inputs((7, 11), grid))

    def run():
        return [step() for _ in range(2)][-1]

    maps, spied = _attention_maps(monkeypatch, run)
    self_maps = [m for m in maps if m.shape[-2:] == (15, 15)]
    assert len(self_maps) == 2 * (2 + 6)
    with torch.no_grad(), vitmad.record(step, layers=layers) as rec:
        recorded = run()
    assert torch.equal(recorded.sample, spied.sample)
    ours = [f"controlnet.blocks.{i}.attn1" for i in range(2)] if layers is None else []
    ours += [f"transformer.blocks.{i}.attn1" for i in range(6)]
    assert [call.layers for call in rec.calls] == [ours, ours]
    skipped = {f"{net}.blocks.{i}.attn2" for net, blocks in (("controlnet", 2), ("transformer", 6))
               for i in range(blocks)}
    assert set(rec.skipped) == (skipped if layers is None else {n for n in skipped if n.startswith("transformer")})
    references = self_maps if layers is None else self_maps[2:8] + self_maps[10:]
    positions = _positions(grid, 2.0, 0, 0)
    assert torch.stack([call.mad for call in rec.calls]).shape == (2, len(ours), 2, 2)
    for index, probabilities in enumerate(references):
        call, layer = divmod(index, len(ours))
        expected = statistics_reference(probabilities, positions)["mad"].mean(-1)
        assert rec.calls[call].geometry[layer].grid == grid
        torch.testing.assert_close(rec.calls[call].per_layer[layer].double(), expected, **TOL)


def _qwen_controlnet():
    torch.manual_seed(0)
    return _sharpen(diffusers.QwenImageControlNetModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4)))


@pytest.mark.parametrize("conditions", [0, 1, 2])  # 0: the ControlNet alone; 1, 2: in its Multi wrapper
def test_qwen_image_controlnet_packed_latents_caption_first(monkeypatch, conditions):
    controlnet = _qwen_controlnet()
    rows, columns, text = 5, 3, 4
    kept = torch.ones(2, text, dtype=torch.bool)
    kept[0, -1] = False  # the caption's padding (QwenImagePipeline's prompt_embeds_mask)
    # QwenImageControlNetPipeline: the latent and the condition packed 2 x 2 alike, img_shapes (1, rows, columns).
    inputs = {"hidden_states": torch.randn(2, rows * columns, 16), "encoder_hidden_states": torch.randn(2, text, 12),
              "encoder_hidden_states_mask": kept, "timestep": torch.tensor([0.6, 0.6]),
              "img_shapes": [[(1, rows, columns)]] * 2}
    if conditions:
        # One union net, run once per condition (its only mode), the samples summed: each run one of the call's.
        model = diffusers.QwenImageMultiControlNetModel([controlnet])
        inputs |= {"controlnet_cond": [torch.randn(2, rows * columns, 16) for _ in range(conditions)],
                   "conditioning_scale": [1.0, 0.5][:conditions], "return_dict": False}
    else:
        model = controlnet
        inputs["controlnet_cond"] = torch.randn(2, rows * columns, 16)

    def run():
        return model(**inputs)

    maps, spied = _attention_maps(monkeypatch, run)
    assert len(maps) == 2 * max(conditions, 1)
    rec, rec_tokens = _record(model, run, spied, _samples)
    names = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert len(rec.calls) == 1 and rec.skipped == {}
    assert rec.layers == ([f"nets.0.{n}" for n in names] * conditions if conditions else names)
    positions = _positions((rows, columns), 2.0, text, 0)
    for layer, probabilities in enumerate(maps):
        assert float(probabilities[0, :, :, text - 1].abs().max()) == 0.0  # the padding token is no key
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, positions, (rows, columns), 2.0, text, 0)


@pytest.mark.parametrize("linear", [False, True])
def test_transformer_2d_alone_attends_over_its_input_pixels(monkeypatch, linear):
    """Transformer2DModel without patch_size, recorded alone (a UNet's, inside it, is diffusers_unets'): its
    ``proj_in`` (a 1x1 Conv2d, or with use_linear_projection a Linear after the flattening) keeps one token per
    input pixel, row-major; attn2 (the caption) skipped."""
    torch.manual_seed(0)
    model = _sharpen(diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, cross_attention_dim=12,
        num_layers=2, use_linear_projection=linear))
    latent, caption, grid = torch.randn(2, 16, 5, 7), torch.randn(2, 3, 12), (5, 7)

    def run():
        return model(latent, encoder_hidden_states=caption)

    maps, spied = _attention_maps(monkeypatch, run)
    self_maps = [m for m in maps if m.shape[-1] == 35]
    assert len(self_maps) == 2 and len(maps) == 4
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert set(rec.skipped) == {"transformer_blocks.0.attn2", "transformer_blocks.1.attn2"}
    for layer, probabilities in enumerate(self_maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 1.0, 0, 0), grid, 1.0, 0, 0)


def test_transformer_2d_alone_double_self_attention_attn2_given_a_caption_is_refused(monkeypatch):
    """Transformer2DModel(double_self_attention=True) builds attn2 as self-attention, but its BasicTransformerBlock
    hands attn2 the forward's encoder_hidden_states whenever it gets them: attn2 then attends to the caption. Without
    a caption both attentions are over the 5 x 7 input pixels (placed, against the model's own softmax); with one of
    exactly 5 * 7 = 35 tokens (the shapes of self-attention) attn2 is refused by name, never placed on the latent;
    attn1 alone is still recorded."""
    torch.manual_seed(0)
    model = _sharpen(diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4, cross_attention_dim=None,
        num_layers=1, double_self_attention=True))
    latent, grid = torch.randn(2, 16, 5, 7), (5, 7)
    caption = torch.randn(2, grid[0] * grid[1], 16)
    names = ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2"]

    def run():
        return model(latent)

    maps, spied = _attention_maps(monkeypatch, run)
    assert len(maps) == 2
    rec, rec_tokens = _record(model, run, spied)
    assert rec.layers == names and rec.skipped == {}
    for layer, probabilities in enumerate(maps):
        _check(rec.calls[0], rec_tokens.calls[0], layer, probabilities, _positions(grid, 1.0, 0, 0), grid, 1.0, 0, 0)

    def run_captioned():
        return model(latent, encoder_hidden_states=caption)

    with torch.no_grad(), vitmad.record(model), pytest.raises(
            ValueError, match=r"transformer_blocks\.0\.attn2 .*given encoder_hidden_states in this call, so its keys "
                              r"are those tokens \(a caption's\), not the latent's own"):
        run_captioned()
    maps, spied = _attention_maps(monkeypatch, run_captioned)
    with torch.no_grad(), vitmad.record(model, layers=["*.attn1"]) as rec:
        recorded = run_captioned()
    assert torch.equal(recorded.sample, spied.sample)
    assert rec.layers == names[:1]
    expected = statistics_reference(maps[0], _positions(grid, 1.0, 0, 0))["mad"].mean(-1)
    torch.testing.assert_close(rec.per_layer[0].double(), expected, **TOL)


def test_transformer_2d_over_its_input_inside_a_users_module_is_refused_with_its_reason():
    """Inside a user's module, its tokens are pixels of its own input, whose stride in the module's input vitmad does
    not know (the module may downsample first): refused naming the transformer to record alone, as a
    TransformerTemporalModel so held is. It was refused as if the model held no attention at all (QA 334). Alone,
    the same transformer is recorded (test_transformer_2d_alone_attends_over_its_input_pixels)."""
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down = torch.nn.Conv2d(16, 16, 2, stride=2)
            self.backbone = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                                         norm_num_groups=4, cross_attention_dim=12)

        def forward(self, latent, caption):
            return self.backbone(self.down(latent), encoder_hidden_states=caption)

    model = Holder().eval()
    with torch.no_grad(), pytest.raises(
            ValueError, match=r"^vitmad.record: backbone\.transformer_blocks\.0\.attn1 \(Attention\) of Holder: it "
                              r"is an attention of the Transformer2DModel backbone inside Holder, which takes a "
                              r"continuous \[B, C, H, W\] input \(no patch_size\) whose stride in the model's input "
                              r"vitmad does not know; record the Transformer2DModel itself"):
        with vitmad.record(model):
            model(torch.randn(1, 16, 10, 14), torch.randn(1, 3, 12))
    with torch.no_grad(), vitmad.record(model.backbone) as rec:
        model(torch.randn(1, 16, 10, 14), torch.randn(1, 3, 12))
    assert rec.layers == ["transformer_blocks.0.attn1"] and rec.geometry[0].grid == (5, 7)


def test_sana_controlnet_linear_attention_has_no_mad():
    model = diffusers.SanaControlNetModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=8, patch_size=2)
    with pytest.raises(NoLayerError, match=r"Sana's linear attention \(ReLU feature maps, no softmax\)"):
        vitmad.record(model)


def test_cosmos_controlnet_control_blocks_attend_over_the_control_tubelets():
    torch.manual_seed(0)
    model = _sharpened_video(diffusers.CosmosControlNetModel(
        n_controlnet_blocks=2, in_channels=6, latent_channels=6, model_channels=32, num_attention_heads=2,
        attention_head_dim=16, mlp_ratio=2, text_embed_dim=TEXT_DIM, adaln_lora_dim=4, patch_size=(1, 2, 2),
        max_size=(4, 16, 16), extra_pos_embed_type=None, img_context_dim_in=None, img_context_dim_out=32))
    torch.manual_seed(2)
    # Cosmos Transfer: control and noisy latents of 2 frames of 7 x 10 (the last row dropped by the 2 x 2 patches),
    # each with its condition mask and padding mask (4 + 1 + 1 channels).
    controls, latents = torch.randn(BATCH, 4, 2, 7, 10), torch.randn(BATCH, 4, 2, 7, 10)
    inputs = {"controls_latents": controls[..., :6, :], "latents": latents[..., :6, :],
              "timestep": torch.tensor([0.5]), "encoder_hidden_states": torch.randn(BATCH, TEXT, TEXT_DIM),
              "condition_mask": torch.ones(BATCH, 1, 2, 6, 10), "padding_mask": torch.zeros(1, 1, 6, 10)}
    layers = ["control_blocks.0.attn1", "control_blocks.1.attn1"]

    def run():
        return torch.cat([sample.flatten() for sample in model(**inputs).control_block_samples])

    rec, maps = _recorded_and_reference(model, layers, run)
    assert set(rec.skipped) == {"control_blocks.0.attn2", "control_blocks.1.attn2"}
    _check_video(rec, 0, maps, frames=2, grid=(3, 5), patch=2, frame_size=1)


def _joy(plus: bool = False, rope_type: str = "rope"):
    torch.manual_seed(0)
    config = dict(patch_size=[1, 2, 2], in_channels=4, hidden_size=16, num_attention_heads=2, text_dim=TEXT_DIM,
                  num_layers=2, rope_dim_list=[2, 2, 4])
    if plus:
        model = joyimage_plus.JoyImageEditPlusTransformer3DModel(**config)
    else:
        model = joyimage.JoyImageEditTransformer3DModel(**config, rope_type=rope_type)
    torch.manual_seed(1)
    with torch.no_grad():  # its fused q, k, v projections redrawn, its q / k norm gains x4: far from uniform
        for name, parameter in model.named_parameters():
            if name.endswith("attn_qkv.weight"):
                parameter.normal_(0.0, 0.5)
            elif name.endswith(("attn_q_norm.weight", "attn_k_norm.weight")):
                parameter.mul_(4.0)
    return model.eval()


@pytest.mark.parametrize(("layout", "rope_type"), [("frames", "rope"), ("one item", "mrope")])
def test_joyimage_edit_tubelets_then_caption(layout, rope_type):
    model = _joy(rope_type=rope_type)
    torch.manual_seed(2)
    # "frames": [B, C, F, H, W] of 2 latent frames of 7 x 11 latent pixels (the 2 x 2 patches drop the last row and
    # column); "one item": JoyImageEditPipeline's [B, 1, C, 1, H, W] without a reference image (whole patches: its
    # output is reshaped back to the items' size).
    frames = 2 if layout == "frames" else 1
    latent = torch.randn(BATCH, 4, 2, 7, 11) if frames == 2 else torch.randn(BATCH, 1, 4, 1, 6, 10)
    caption = torch.randn(BATCH, TEXT, TEXT_DIM)
    layers = ["double_blocks.0.attn", "double_blocks.1.attn"]
    rec, maps = _recorded_and_reference(model, layers, lambda: model(latent, torch.tensor([500.0] * BATCH),
                                                                     caption).sample)
    assert rec.skipped == {}
    _check_video(rec, 0, maps, frames=frames, grid=(3, 5), patch=2, frame_size=1, suffix=TEXT)


def test_joyimage_edit_reference_images_refused():
    model = _joy()
    # JoyImageEditPipeline with an image to edit: [reference, latent] items, the latent moved first.
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match="hidden_states hold 2 items"):
        model(torch.randn(1, 2, 4, 1, 6, 10), torch.tensor([500.0]), torch.randn(1, TEXT, TEXT_DIM))


def _joy_plus_patches(latent: torch.Tensor) -> torch.Tensor:
    """JoyImageEditPlusPipeline.prepare_latents' patchify of ``[B, C, t, H, W]`` by (1, 2, 2), one item a sample."""
    b, c, t, h, w = latent.shape
    patches = latent.reshape(b, c, t, 1, h // 2, 2, w // 2, 2).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return patches.reshape(b, -1, c, 1, 2, 2)


def test_joyimage_edit_plus_patches_then_caption_padding_masked():
    model = _joy(plus=True)
    torch.manual_seed(2)
    rows, columns = 3, 5
    patches = _joy_plus_patches(torch.randn(BATCH, 4, 1, 2 * rows, 2 * columns))
    kept = torch.ones(BATCH, TEXT, dtype=torch.long)
    kept[1, -2:] = 0  # the caption's padding
    caption = torch.randn(BATCH, TEXT, TEXT_DIM)
    layers = ["double_blocks.0.attn", "double_blocks.1.attn"]

    def run():
        return model(patches, torch.tensor([500.0] * BATCH), caption, kept,
                     shape_list=[[(1, rows, columns)]] * BATCH).sample

    rec, maps = _recorded_and_reference(model, layers, run)
    for probabilities in maps:
        assert float(probabilities[1, :, :, -2:].abs().max()) == 0.0  # the padding tokens are no keys
    _check_video(rec, 0, maps, frames=1, grid=(rows, columns), patch=2, frame_size=1, suffix=TEXT)


def test_joyimage_edit_plus_reference_images_refused():
    model = _joy(plus=True)
    # JoyImageEditPlusPipeline with a reference image: a second item after the latent's patches.
    patches = _joy_plus_patches(torch.randn(1, 4, 1, 4, 6))
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=r"its shape_list is \[\[\(1, 2, 3\), "
                                                                                   r"\(1, 2, 3\)\]\]"):
        model(torch.cat([patches, patches], 1), torch.tensor([500.0]), torch.randn(1, TEXT, TEXT_DIM),
              shape_list=[[(1, 2, 3), (1, 2, 3)]])
