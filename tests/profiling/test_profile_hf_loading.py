"""``hf:`` checkpoints that AutoModel alone did not load right: Florence-2 (its vision tower, not the BART that took
pixels as input_ids), EoMT (no AutoModel class: the class its config names in ``architectures``), and the models
whose tower takes the patches its processor cuts (Pix2Struct, Kosmos-2.5, Molmo2), refused at load."""

from __future__ import annotations

import pytest
import torch

import vitmad
from vitmad.profiling.images import Preprocessing, find_images, load_batch
from vitmad.profiling.models import load_model, vision_tower
from vitmad.profiling.options import OptionError

transformers = pytest.importorskip("transformers")

_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def test_florence2_is_profiled_through_its_vision_tower(tmp_path, image_folder):
    """AutoModel gives Florence2Model, whose forward wants input_ids: its vision_tower (Florence2VisionBackbone,
    fed the image positionally) is profiled, with the MAD vitmad.record gives on that tower for the same pixels."""
    torch.manual_seed(0)
    config = transformers.Florence2Config(
        vision_config=dict(embed_dim=[16, 32], depths=[1, 1], num_heads=[1, 2], num_groups=[1, 2], window_size=4,
                           patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1], patch_prenorm=[False, True],
                           projection_dim=32),
        text_config=dict(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=64))
    transformers.Florence2ForConditionalGeneration(config).save_pretrained(tmp_path)
    transformers.CLIPImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64},
                                    do_center_crop=False).save_pretrained(tmp_path)
    result = vitmad.profile(f"hf:{tmp_path}", image_folder, device="cpu", max_images=2)
    assert result.count == 2 and len(result.layers) == 2  # the window attention; channel attention is skipped
    # mad.json says which part of the checkpoint was profiled, as for the model given from Python.
    assert result.settings["profiled"] == (
        "vision_tower (Florence2VisionBackbone) of Florence2Model, its vision tower")
    loaded = load_model(f"hf:{tmp_path}")
    assert type(loaded.module).__name__ == "Florence2VisionBackbone"
    pixels, _, _ = load_batch(find_images(image_folder)[:2], loaded.preprocessing)
    tower = transformers.AutoModel.from_pretrained(tmp_path).vision_tower.eval()
    with torch.no_grad(), vitmad.record(tower) as rec:
        tower(pixels)
    # The first stage has one head (num_heads=[1, 2]): its second column is NaN in both.
    assert torch.isnan(result.mad[0, 1]) and bool(torch.isfinite(result.mad).sum() == 3)
    torch.testing.assert_close(result.mad, rec.mad.mean(1).double(), rtol=1e-6, atol=1e-6, equal_nan=True)
    # From Python, the whole Florence2ForConditionalGeneration: its tower lies under its base model
    # (model.vision_tower), found through it.
    whole = transformers.Florence2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    found, prefix = vision_tower(whole)
    assert found is whole.model.vision_tower and prefix == "model.vision_tower."
    from_module = vitmad.profile(whole, pixels, device="cpu")
    torch.testing.assert_close(from_module.mad, rec.mad.mean(1).double(), rtol=1e-6, atol=1e-6, equal_nan=True)


def _eomt(folder):
    torch.manual_seed(0)
    config = transformers.EomtConfig(**_LAYERS, image_size=32, patch_size=8, num_blocks=1, num_queries=4,
                                     num_register_tokens=1)
    transformers.EomtForUniversalSegmentation(config).save_pretrained(folder)
    transformers.EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(folder)


def test_eomt_loads_by_the_class_its_config_names(tmp_path, image_folder):
    """AutoModel has no class for EomtConfig ("Unrecognized configuration class"): the checkpoint's architectures
    (EomtForUniversalSegmentation) loads it; its processor is then refused as any other, and an image size
    profiles it."""
    _eomt(tmp_path)
    with pytest.raises(OptionError, match="model: the EomtImageProcessor resizes the longest edge and pads"):
        load_model(f"hf:{tmp_path}")
    loaded = load_model(f"hf:{tmp_path}", image_size=(32, 32))
    assert type(loaded.module).__name__ == "EomtForUniversalSegmentation"
    result = vitmad.profile(f"hf:{tmp_path}", image_folder, image_size=32, device="cpu", max_images=2)
    assert result.count == 2 and result.mad.shape == (2, 2) and bool(torch.isfinite(result.mad).all())


def test_videomt_profiles_each_image_as_a_clip_of_one_frame(tmp_path, image_folder):
    """VidEoMT (no AutoModel class either) takes clips [B, F, 3, H, W] and crashed on images ("only supports 5D
    video inputs"); it attends within each frame only, so each image is fed as a clip of one frame: the MAD
    vitmad.record gives on the model fed those clips."""
    torch.manual_seed(0)
    config = transformers.VideomtConfig(**_LAYERS, image_size=32, patch_size=8, num_blocks=1, num_queries=4,
                                        num_register_tokens=1)
    transformers.VideomtForUniversalSegmentation(config).save_pretrained(tmp_path)
    transformers.VideomtVideoProcessor(size={"shortest_edge": 32, "longest_edge": 32}).save_pretrained(tmp_path)
    with pytest.raises(OptionError, match="resizes each image at its own aspect ratio"):
        load_model(f"hf:{tmp_path}")
    result = vitmad.profile(f"hf:{tmp_path}", image_folder, image_size=32, device="cpu", max_images=2)
    loaded = load_model(f"hf:{tmp_path}", image_size=(32, 32))
    pixels, _, _ = load_batch(find_images(image_folder)[:2], loaded.preprocessing.with_size((32, 32)))
    model = transformers.VideomtForUniversalSegmentation.from_pretrained(tmp_path).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels[:, None])
    assert result.count == 2 and rec.mad.shape == (2, 2, 2)
    torch.testing.assert_close(result.mad, rec.mad.mean(1).double(), rtol=1e-6, atol=1e-6)


def test_a_config_transformers_cannot_load_is_still_said(tmp_path):
    """Neither AutoModel nor the architectures named (none here) load it: transformers' own error is quoted."""
    _eomt(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"EomtForUniversalSegmentation"', '"NoSuchModel"')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(OptionError, match="cannot load it with transformers: Unrecognized configuration class"):
        load_model(f"hf:{tmp_path}")


def _pix2struct():
    return transformers.Pix2StructForConditionalGeneration(transformers.Pix2StructConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, d_ff=64, d_kv=16,
                           patch_embed_hidden_size=768),
        text_config=dict(vocab_size=100, hidden_size=32, num_layers=1, num_heads=2, d_ff=64, d_kv=16)))


def _kosmos25():
    return transformers.Kosmos2_5ForConditionalGeneration(transformers.Kosmos2_5Config(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           head_dim=16, patch_embed_hidden_size=768),
        text_config=dict(vocab_size=100, embed_dim=32, layers=1, attention_heads=2, ffn_dim=64), latent_query_num=4))


def _molmo2():
    return transformers.Molmo2ForConditionalGeneration(transformers.Molmo2Config(
        vit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        intermediate_size=64, head_dim=16, image_patch_size=14, image_default_input_size=[56, 56]),
        text_config=dict(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, head_dim=16)))


PRE_CUT = [
    # builder, image processor, what hf: loads, the tower's path in it, the tower, the inputs named
    (_pix2struct, "Pix2StructImageProcessor", "Pix2StructForConditionalGeneration", "encoder", "Pix2StructVisionModel",
     "flattened_patches=, attention_mask="),
    (_kosmos25, "Kosmos2_5ImageProcessor", "Kosmos2_5Model", "vision_model", "Kosmos2_5VisionModel",
     "flattened_patches=, attention_mask="),
    (_molmo2, "Molmo2ImageProcessor", "Molmo2Model", "vision_tower", "Molmo2VisionModel", "pixel_values="),
]


@pytest.mark.parametrize("build, processor, loaded, path, tower, inputs", PRE_CUT,
                         ids=["pix2struct", "kosmos2_5", "molmo2"])
def test_towers_fed_pre_cut_patches_are_refused_at_load(tmp_path, build, processor, loaded, path, tower, inputs):
    """Their processor was refused advising --image-size or vitmad.profile(model, pixel_values), and both crashed
    in the model (pixels are not patches): refused at load instead, before the processor, saying what records
    them."""
    torch.manual_seed(0)
    model = build().eval()
    model.save_pretrained(tmp_path)
    getattr(transformers, processor)().save_pretrained(tmp_path)
    said = (f"model: {loaded}: its vision tower ({tower}) takes the patches its own image processor cuts, not "
            f"[B, 3, H, W] images, so vitmad profile cannot feed it; record it around a forward on that processor's "
            f"output instead: with vitmad.record(model) as rec: model.{path}({inputs} from image_processor(")
    for image_size in (None, (32, 32)):
        with pytest.raises(OptionError) as refused:
            load_model(f"hf:{tmp_path}", image_size=image_size)
        assert str(refused.value).startswith(said)
    with pytest.raises(OptionError, match=f"its vision tower \\({tower}\\) takes the patches"):
        vitmad.profile(model, torch.zeros(1, 3, 32, 32), device="cpu")


@pytest.mark.parametrize("whole", [False, True], ids=["XCLIPVisionModel", "XCLIPModel"])
def test_x_clip_whose_frames_are_folded_into_its_batch_is_refused_at_load(tmp_path, whole):
    """X-CLIP's config has num_frames, so profile fed it clips [B, frames, 3, H, W]; its forward takes the frames
    folded into its batch and failed, and the refusal blamed the size its own preprocessing gives (QA 399)."""
    torch.manual_seed(0)
    vision = dict(image_size=24, patch_size=8, num_frames=3, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=48, mit_hidden_size=32, mit_intermediate_size=48,
                  mit_num_hidden_layers=1, mit_num_attention_heads=2)
    if whole:
        model = transformers.XCLIPModel(transformers.XCLIPConfig(
            vision_config=vision, text_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=48),
            projection_dim=16, prompt_layers=1, prompt_attention_heads=2, prompt_hidden_act="gelu"))
    else:
        model = transformers.XCLIPVisionModel(transformers.XCLIPVisionConfig(**vision))
    model.eval().save_pretrained(tmp_path)
    transformers.VideoMAEImageProcessor(size={"shortest_edge": 24},
                                        crop_size={"height": 24, "width": 24}).save_pretrained(tmp_path)
    said = r"takes a video's frames folded into its batch \(\[B \* frames, 3, H, W\]\)"
    with pytest.raises(OptionError, match=said):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(OptionError, match=said):
        vitmad.profile(model, torch.zeros(1, 3, 3, 24, 24), device="cpu")


def test_the_processor_refusal_says_it_once():
    """"... code of its own (_preprocess) that this library does not reproduce, which vitmad does not reproduce"."""
    with pytest.raises(OptionError) as refused:
        Preprocessing.from_hf(transformers.Kosmos2_5ImageProcessor().to_dict())
    message = str(refused.value)
    assert message.startswith("model: the Kosmos2_5ImageProcessor preprocesses with code of its own (_preprocess), "
                              "which vitmad does not reproduce: pass an image size")
    assert message.count("not reproduce") == 1


def test_an_image_text_checkpoint_names_the_tower_profiled(tmp_path, image_folder):
    """An hf: CLIP is profiled through its vision tower, and mad.json's settings.profiled names it (it did only for
    a model given from Python); a checkpoint of the tower alone names nothing more than the spec."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=dict(_LAYERS, vocab_size=100, bos_token_id=0, eos_token_id=1),
                                     vision_config=dict(_LAYERS, image_size=32, patch_size=8), projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "clip")
    result = vitmad.profile(f"hf:{tmp_path / 'clip'}", image_folder, device="cpu", max_images=1)
    assert result.settings["profiled"] == "vision_model (CLIPVisionModel) of CLIPModel, its vision tower"
    transformers.CLIPVisionModel(config.vision_config).save_pretrained(tmp_path / "tower")
    processor.save_pretrained(tmp_path / "tower")
    tower = vitmad.profile(f"hf:{tmp_path / 'tower'}", image_folder, device="cpu", max_images=1)
    assert "profiled" not in tower.settings


_TEXT = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def _whole_model_profile(folder, image_folder, model, image_size=None):
    """The profile of ``hf:folder``, a whole vision-language model ``model`` saved with its processor, at
    ``image_size`` (None: the processor's own): it is profiled through its tower, which must give the MAD
    vitmad.record gives on that tower fed the same preprocessed images."""
    result = vitmad.profile(f"hf:{folder}", image_folder, device="cpu", max_images=2, image_size=image_size)
    preprocessing = load_model(f"hf:{folder}", image_size=image_size).preprocessing
    if image_size is not None:
        preprocessing = preprocessing.with_size(image_size)
    pixels, _, _ = load_batch(find_images(image_folder)[:2], preprocessing)
    tower = vision_tower(model)[0].eval()
    with torch.no_grad(), vitmad.record(tower) as rec:
        tower(pixels)
    assert result.count == 2
    torch.testing.assert_close(result.mad, rec.mad.mean(1).double(), rtol=1e-6, atol=1e-6)
    return result


def test_internvl_is_profiled_through_its_vision_tower_at_any_size(tmp_path, image_folder):
    """An hf: InternVL (vision-language model) is profiled through its InternVLVisionModel: the class token, then
    the patch grid (its position embedding interpolated at every size its input takes, without a flag); the pixel
    shuffle after the tower changes nothing. Its processor's crops (crop_to_patches) are refused, as any tiling."""
    torch.manual_seed(0)
    config = transformers.InternVLConfig(vision_config=dict(_LAYERS, image_size=48, patch_size=8),
                                         text_config=dict(_TEXT, model_type="qwen2"), image_token_id=150,
                                         downsample_ratio=0.5)
    model = transformers.InternVLForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    size = {"height": 48, "width": 48}
    transformers.GotOcr2ImageProcessor(size=size, crop_to_patches=True).save_pretrained(tmp_path)
    with pytest.raises(OptionError, match=r"GotOcr2ImageProcessor cuts each image into patches \(crop_to_patches"):
        load_model(f"hf:{tmp_path}")
    transformers.GotOcr2ImageProcessor(size=size, crop_to_patches=False).save_pretrained(tmp_path)
    result = _whole_model_profile(tmp_path, image_folder, model)
    assert result.settings["profiled"] == "vision_tower (InternVLVisionModel) of InternVLModel, its vision tower"
    assert result.layout == {"patch": 8, "grid": [6, 6], "num_prefix_tokens": 1}
    wide = _whole_model_profile(tmp_path, image_folder, model, (40, 56))
    assert wide.layout == {"patch": 8, "grid": [5, 7], "num_prefix_tokens": 1}


def test_granite_docling_is_profiled_through_its_tower_at_its_tile_size_only(tmp_path, image_folder):
    """An hf: Granite Docling: its processor's tiles are refused (pass a size); at its tile size, its tower (no class
    token, the row-major patch grid); at another size refused up front, naming the option: its embeddings add their
    fixed table of positions and its forward takes no interpolate_pos_encoding (a shape error inside the model at
    the first batch before)."""
    torch.manual_seed(0)
    vision = dict(_LAYERS, image_size=64, patch_size=8, out_hidden_size=32, deepstack_visual_indexes=[0])
    config = transformers.GraniteDoclingConfig(vision_config=vision, text_config=_TEXT, image_token_id=150)
    model = transformers.GraniteDoclingForConditionalGeneration(config)
    model.save_pretrained(tmp_path)
    transformers.GraniteDoclingImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    with pytest.raises(OptionError, match="GraniteDoclingImageProcessor cuts each image into tiles"):
        load_model(f"hf:{tmp_path}")
    result = _whole_model_profile(tmp_path, image_folder, model, (64, 64))
    assert result.settings["profiled"] == ("vision_model (GraniteDoclingVisionModel) of GraniteDoclingModel, its "
                                           "vision tower")
    assert result.layout == {"patch": 8, "grid": [8, 8], "num_prefix_tokens": 0}
    with pytest.raises(OptionError, match=r"^image_size: GraniteDoclingVisionModel takes 64x64 px only \(embeddings "
                                          r"adds one position embedding per patch of its image_size, and the model "
                                          r"does not interpolate its position embeddings\), got 96x96$"):
        vitmad.profile(f"hf:{tmp_path}", image_folder, device="cpu", max_images=2, image_size=96)


def test_aimv2_fixed_table_is_refused_at_another_size_and_native_aimv2_takes_any_size(tmp_path):
    """QA 269: AIMv2's fixed tower (a learned table of image_size's positions, taken out before the sum) failed
    inside the model at another image_size, a traceback after the images were read: refused up front now, naming
    the option. Its native tower (config.is_native: sin-cos positions built for the input's grid) was refused for
    image_size 'native' as taking one input size: it takes any, as the MAD its eager attention gives on a 3 x 5 grid
    of 14 px patches (no class token) shows, and native resolution resizes each 60 x 100 image to that grid."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        pixels = torch.randint(0, 256, (60, 100, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        Image.fromarray(pixels.numpy()).save(images / f"{i}.png")
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    for native in (False, True):
        torch.manual_seed(0)
        config = transformers.Aimv2VisionConfig(**_LAYERS, patch_size=14, image_size=56, is_native=native,
                                                attn_implementation="eager")
        model = transformers.Aimv2VisionModel(config).eval()
        folder = tmp_path / f"native_{native}"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        if not native:
            with pytest.raises(OptionError, match=r"^image_size: Aimv2VisionModel takes 56x56 px only \(embeddings "
                                                  r"adds one position embedding per patch of its image_size"):
                vitmad.profile(f"hf:{folder}", images, device="cpu", image_size=(42, 70))
            assert vitmad.profile(f"hf:{folder}", images, device="cpu").layout["grid"] == [4, 4]
            continue
        result = vitmad.profile(f"hf:{folder}", images, device="cpu", image_size=(42, 70))
        preprocessing = load_model(f"hf:{folder}").preprocessing.with_size((42, 70))
        pixels, _, _ = load_batch(find_images(images), preprocessing)
        with torch.no_grad():
            attentions = model(pixels, output_attentions=True).attentions
        rows, columns = torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij")
        centres = torch.stack([rows.flatten(), columns.flatten()], 1).double() * 14 + 7
        distances = torch.cdist(centres, centres)
        expected = torch.stack([(a.double() * distances).sum(-1).mean((0, 2)) for a in attentions])
        torch.testing.assert_close(result.mad, expected, rtol=1e-5, atol=1e-5)
        at_native = vitmad.profile(f"hf:{folder}", images, device="cpu", image_size="native")
        torch.testing.assert_close(at_native.mad, result.mad, rtol=1e-6, atol=1e-6)


def test_a_vit_built_at_a_non_square_size_is_profiled_at_that_size_without_interpolation(tmp_path, image_folder):
    """transformers' interpolate_pos_encoding reads the position table as a square: a ViT built at 24x48 px failed
    inside the model at every size with it ("shape '[1, 4, 4, 32]' is invalid"). vitmad runs it without the flag at
    its own size (MAD as its eager attention gives on a 3x6 grid of 8 px patches, after the class token) and refuses
    any other size or native resolution, naming the option."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(**_LAYERS, image_size=(24, 48), patch_size=8, attn_implementation="eager")
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 24, "width": 48}).save_pretrained(tmp_path)
    result = vitmad.profile(f"hf:{tmp_path}", image_folder, device="cpu", max_images=2)
    pixels, _, _ = load_batch(find_images(image_folder)[:2], load_model(f"hf:{tmp_path}").preprocessing)
    with torch.no_grad():
        attentions = model(pixels, output_attentions=True).attentions
    rows, columns = torch.meshgrid(torch.arange(3.0), torch.arange(6.0), indexing="ij")
    centres = torch.stack([rows.flatten(), columns.flatten()], 1).double() * 8 + 4
    distances = torch.cdist(centres, centres)
    expected = torch.stack([(a[:, :, 1:, 1:].double() * distances).sum(-1).mean((0, 2)) for a in attentions])
    torch.testing.assert_close(result.mad, expected, rtol=1e-5, atol=1e-5)
    assert result.layout == {"patch": 8, "grid": [3, 6], "num_prefix_tokens": 1}
    said = r"^image_size: (native: )?ViTModel takes 24x48 px only: it was built for that non-square image_size, and "
    with pytest.raises(OptionError, match=said + r"transformers' interpolate_pos_encoding reads the position table "
                                          r"as a square; got 32x64$"):
        vitmad.profile(f"hf:{tmp_path}", image_folder, device="cpu", max_images=2, image_size=(32, 64))
    with pytest.raises(OptionError, match=said):
        vitmad.profile(f"hf:{tmp_path}", image_folder, device="cpu", max_images=2, image_size="native")


def test_a_tower_under_a_name_of_its_own_is_profiled_and_a_model_taking_no_images_is_refused(tmp_path, image_folder):
    """Phi-4-multimodal holds its tower as embed_tokens_extend.image_embed.img_processor: the pixels went to the
    language model as token ids ("Expected tensor for argument #1 'indices'"); the tower is now found on the way to
    the patch embedding. An audio model (AST, input_values) crashed in its convolution at the first batch, after a
    checkpoint was written: refused at load, naming what its forward takes."""
    torch.manual_seed(0)
    vision = transformers.Phi4MultimodalVisionConfig(**_LAYERS, image_size=56, patch_size=14)
    config = transformers.Phi4MultimodalConfig(vision_config=vision, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    # Eager: its vision attention says is_causal=True, which transformers' SDPA applies without a mask (refused).
    model = transformers.Phi4MultimodalForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    result = vitmad.profile(model, pixels, device="cpu")
    tower = model.model.embed_tokens_extend.image_embed.img_processor
    assert result.settings["profiled"] == ("model.embed_tokens_extend.image_embed.img_processor "
                                           "(Phi4MultimodalVisionModel) of Phi4MultimodalForCausalLM, its vision tower")
    with torch.no_grad(), vitmad.record(tower) as rec:
        tower(pixels)
    torch.testing.assert_close(result.mad, rec.mad.mean(1).double(), rtol=1e-6, atol=1e-6)

    ast = transformers.ASTModel(transformers.ASTConfig(**_LAYERS, max_length=64, num_mel_bins=32))
    ast.save_pretrained(tmp_path)
    transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=64).save_pretrained(tmp_path)
    with pytest.raises(OptionError, match=r"^model: ASTModel's forward takes input_values, not images \[B, 3, H, W\] "
                                          r"\(text or audio features\), and vitmad found no vision tower in it"):
        vitmad.profile(f"hf:{tmp_path}", image_folder, device="cpu", max_images=2)


@pytest.mark.parametrize("image_size", [None, 32, "native"])
def test_a_naflex_tower_fed_by_a_processor_of_its_own_is_refused_at_any_size(tmp_path, image_size):
    """LFM2-VL's SigLIP2 tower takes the patches Lfm2VlImageProcessor cuts: without a size it was refused to ask
    for one, with a size to ask for native, with native to ask for a size again (QA 224)."""
    torch.manual_seed(0)
    vision = transformers.Siglip2VisionConfig(**_LAYERS, num_patches=16, patch_size=4, vision_use_head=False)
    text = transformers.Lfm2Config(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                                   num_hidden_layers=2, vocab_size=400, layer_types=["conv", "full_attention"])
    config = transformers.Lfm2VlConfig(vision_config=vision, text_config=text, image_token_id=396,
                                       projector_hidden_size=32)
    transformers.Lfm2VlForConditionalGeneration(config).save_pretrained(tmp_path)
    transformers.Lfm2VlImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(OptionError, match=r"^model: Lfm2VlModel's vision tower \(Siglip2VisionModel\) takes the "
                                          r"patches its processor cuts, and its Lfm2VlImageProcessor cuts them its own "
                                          r"way, .* at any --image-size; record the model around a forward on that "
                                          r"processor's output"):
        load_model(f"hf:{tmp_path}", image_size=image_size)


def test_trocr_is_profiled_through_its_image_encoder(tmp_path, image_folder):
    """An hf: VisionEncoderDecoderModel (a ViT encoder, TrOCR's text decoder) is profiled through its encoder: its
    forward wanted decoder_input_ids ("You have to specify either decoder_input_ids or decoder_inputs_embeds")."""
    torch.manual_seed(0)
    decoder = transformers.TrOCRConfig(vocab_size=100, d_model=32, decoder_layers=1, decoder_attention_heads=2,
                                       decoder_ffn_dim=64, max_position_embeddings=32)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(**_LAYERS, image_size=48, patch_size=8), decoder)
    model = transformers.VisionEncoderDecoderModel(config)
    model.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(tmp_path)
    result = _whole_model_profile(tmp_path, image_folder, model)
    assert result.settings["profiled"] == "encoder (ViTModel) of VisionEncoderDecoderModel, its vision tower"
    assert result.layout == {"patch": 8, "grid": [6, 6], "num_prefix_tokens": 1}


# (the key in the saved file, transformers 4's names as save_pretrained writes them; the parameter of the loaded model)
@pytest.mark.parametrize(("dropped", "parameter", "refused"), [
    ("encoder.layer.1.attention.attention.key.weight", "layers.1.attention.k_proj.weight", True),
    ("encoder.layer.0.output.dense.bias", "layers.0.mlp.fc2.bias", True),
    ("embeddings.patch_embeddings.projection.weight", "embeddings.patch_embeddings.projection.weight", True),
    ("layernorm.weight", "layernorm.weight", False),
    # The last layer's pre-attention norm, registered after its attention (QA 366: loaded, a norm of ones).
    ("encoder.layer.1.layernorm_before.weight", "layers.1.layernorm_before.weight", True),
])
def test_a_checkpoint_lacking_weights_that_run_before_attention_is_refused(tmp_path, dropped, parameter, refused):
    """transformers draws a weight the checkpoint lacks at random: one that runs before or in the last attention
    layer makes the MAD that of random weights, different at every load (it ran without a word, QA helper-140);
    refused, naming it. One after it (the final norm, a pooler or a head) changes no attention: loaded."""
    from safetensors.torch import load_file, save_file

    from conftest import save_tiny_hf_vit

    save_tiny_hf_vit(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert dropped in weights
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    if refused:
        with pytest.raises(OptionError, match=r"model: hf:.*: the checkpoint has no weights for 1 parameters of "
                                              r"ViTModel that run before or in its attention layers, or in the "
                                              r"block of the last of them \(e\.g\. "
                                              + parameter.replace(".", r"\.") + r"\)"):
            load_model(f"hf:{tmp_path}")
    else:
        assert parameter in load_model(f"hf:{tmp_path}").unloaded  # besides the pooler the checkpoint never had


@pytest.mark.parametrize("dropped", ["head.", "post_layernorm."])
def test_a_siglip_tower_without_its_pooling_head_or_final_norm_is_loaded(tmp_path, dropped):
    """The attention-pooling head's attention, which the recording skips, was counted as the last attention layer:
    a SigLIP tower saved without its head or final norm, as vision-language models store it, was refused (QA 366).
    Neither runs before a placed layer."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    transformers.SiglipVisionModel(config).save_pretrained(tmp_path)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.removeprefix("vision_model.").startswith(dropped)}
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(f"hf:{tmp_path}")
    assert loaded.unloaded and all(name.startswith(dropped) for name in loaded.unloaded)
    # The head's maps are recorded with prefix_maps: then it counts (QA 371: its maps were a random head's).
    pixels = torch.rand(1, 3, 32, 32)
    assert vitmad.profile(f"hf:{tmp_path}", pixels, stats=["entropy"]).layers
    with pytest.raises(OptionError, match=r"model: hf:.*: the checkpoint has no weights for \d+ parameters of "
                                          r"SiglipVisionModel that run before or in its attention layers, the pooling "
                                          r"head whose maps --stats prefix_maps records included, .* the maps would "
                                          r"be those of random weights"):
        vitmad.profile(f"hf:{tmp_path}", pixels, stats=["prefix_maps"])
    # Where the maps are drawn for one image rather than averaged (native resolution; image_prefix_maps), alike
    # (QA 372: the native run drew the random head's maps).
    from PIL import Image

    image = tmp_path / "image.png"
    Image.new("RGB", (40, 24), (10, 200, 30)).save(image)
    for run in (lambda: vitmad.profile(f"hf:{tmp_path}", [str(image)], image_size="native", stats=["prefix_maps"]),
                lambda: vitmad.profiling.maps.image_prefix_maps(f"hf:{tmp_path}", str(image))):
        with pytest.raises(OptionError, match=r"the pooling head whose maps --stats prefix_maps records included"):
            run()
