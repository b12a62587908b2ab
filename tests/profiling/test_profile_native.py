"""vitmad profile --image-size native: each image at its own aspect ratio, on tiny random-weight models (SigLIP2
saved as a folder, timm NaFlexViT, a plain HF ViT that interpolates its position embedding). The inputs the model
received are captured and checked against each model's own resizing rule, and the profile against the MAD of
the model's eager attention on those inputs, placed by geometry written here."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch

import vitmad
from conftest import write_images
from vitmad.cli import main
from vitmad.profiling.images import Preprocessing, find_images, load_image
from vitmad.profiling.models import wrap_module
from vitmad.profiling.options import OptionError

transformers = pytest.importorskip("transformers")

PATCH = 8
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _image_mad(probs: torch.Tensor, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """``[H]`` MAD of one image from its probabilities ``[H, N, N]`` (prefix tokens, its grid row-major, padding)."""
    gh, gw = grid
    n = gh * gw
    rows, cols = np.divmod(np.arange(n), gw)
    centres = np.stack([(rows + 0.5) * PATCH, (cols + 0.5) * PATCH], -1)
    distance = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    block = probs[:, prefix:prefix + n, prefix:prefix + n].double().numpy()
    return (block * distance).sum(-1).mean(-1)


def _capture_inputs(module):
    """A forward pre-hook keeping every call's arguments; returns (calls, handle)."""
    calls = []
    handle = module.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    return calls, handle


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native_images")
    write_images(folder, 5, seed=4)
    return folder


@pytest.fixture(scope="module")
def siglip2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip2")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH,
                  num_patches=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    config = transformers.Siglip2Config(vision_config=vision, text_config=text)
    transformers.Siglip2Model(config).save_pretrained(folder)
    transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=24).save_pretrained(folder)
    return folder


def test_siglip2_native_profile_is_the_mad_of_each_image_on_its_own_grid(siglip2_folder, images):
    loaded = vitmad.profiling.models.load_model(f"hf:{siglip2_folder}")
    calls, handle = _capture_inputs(loaded.module)
    result = vitmad.profile(loaded, images, image_size="native", batch_size=3, device="cpu")
    handle.remove()
    files = find_images(images)
    assert result.count == 5 and result.settings["image_size"] == "native"
    assert result.layers == ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"]

    # The model's own processor on each file gives each image's grid; vitmad fed exactly those.
    processor = transformers.Siglip2ImageProcessor.from_pretrained(siglip2_folder)
    own = [tuple(processor([load_image(f)[0]], return_tensors="pt")["spatial_shapes"][0].tolist()) for f in files]
    assert len(set(own)) > 1
    assert [tuple(result.image_grids[str(f)]["grid"]) for f in files] == own
    assert [result.image_grids[str(f)]["size"] for f in files] == [[h * PATCH, w * PATCH] for h, w in own]
    fed = [tuple(g) for _, kwargs in calls for g in kwargs["spatial_shapes"].tolist()]
    assert fed == own and [kwargs["pixel_values"].shape[0] for _, kwargs in calls] == [3, 2]

    eager = copy.deepcopy(loaded.module)
    eager.set_attn_implementation("eager")
    per_image = []
    with torch.no_grad():
        for _, kwargs in calls:
            attentions = eager(**kwargs, output_attentions=True).attentions
            for i, grid in enumerate(kwargs["spatial_shapes"].tolist()):
                per_image.append([_image_mad(a[i], 0, tuple(grid)) for a in attentions])
    torch.testing.assert_close(result.mad, torch.tensor(np.array(per_image)).mean(0), **TOL)
    assert math.isfinite(result.uniform_mad)

    alone = vitmad.profile(f"hf:{siglip2_folder}", images, image_size="native", batch_size=1, device="cpu")
    torch.testing.assert_close(alone.mad, result.mad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.max, result.max, rtol=1e-5, atol=1e-5)


def test_siglip2_at_one_size_is_refused_with_the_option_to_use(siglip2_folder, images):
    with pytest.raises(OptionError, match="image_size: .*--image-size native"):
        vitmad.profile(f"hf:{siglip2_folder}", images, device="cpu")


def test_timm_naflexvit_native_profile_follows_timms_own_pipeline(images):
    timm = pytest.importorskip("timm")
    from timm.data.naflex_transforms import get_image_size_for_seq

    torch.manual_seed(0)
    model = timm.create_model("naflexvit_base_patch16_gap", pretrained=False, depth=2, embed_dim=32, num_heads=2,
                              patch_size=PATCH, class_token=True, reg_tokens=4, img_size=40).eval()
    # The default input size sets the token budget: 40 x 40 pixels, 25 patches.
    loaded = wrap_module(model, "timm:tiny-naflexvit",
                         Preprocessing((40, 40), ("exact", 40, 40), False, (0.5,) * 3, (0.5,) * 3))
    calls, handle = _capture_inputs(model)
    result = vitmad.profile(loaded, images, image_size="native", batch_size=4, device="cpu")
    handle.remove()

    files = find_images(images)
    budget = (40 // PATCH) ** 2  # the patches of the model's default input size
    own = []
    for f in files:
        image = load_image(f)[0]
        _, (height, width) = get_image_size_for_seq((image.height, image.width), PATCH, budget)
        own.append((height // PATCH, width // PATCH))
    assert [tuple(result.image_grids[str(f)]["grid"]) for f in files] == own and len(set(own)) > 1

    eager = copy.deepcopy(model)
    maps = []
    for block in eager.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda _, args: maps.append(args[0]))
    per_image = []
    with torch.no_grad():
        for args, _ in calls:
            maps.clear()
            eager(args[0])
            coord, valid = args[0]["patch_coord"], args[0]["patch_valid"]
            for i in range(coord.shape[0]):
                grid = (int(coord[i, valid[i], 0].max()) + 1, int(coord[i, valid[i], 1].max()) + 1)
                per_image.append([_image_mad(a[i], 5, grid) for a in maps])  # class token + 4 registers
    torch.testing.assert_close(result.mad, torch.tensor(np.array(per_image)).mean(0), **TOL)


def _native_rule(height: int, width: int, budget: int) -> tuple[int, int]:
    """README's rule for ViTs that follow the input size: one scale, each side floored to whole patches."""
    scale = math.sqrt(budget * PATCH * PATCH / (height * width))
    grid_h = max(1, math.floor(height * scale / PATCH))
    return grid_h, max(1, min(budget // grid_h, math.floor(width * scale / PATCH)))


def test_plain_vit_native_profile_runs_each_image_alone_at_its_aspect_ratio(tiny_model, images, tmp_path):
    loaded = vitmad.profiling.models.load_model(f"hf:{tiny_model}")
    calls, handle = _capture_inputs(loaded.module)
    result = vitmad.profile(loaded, images, image_size="native", batch_size=3, device="cpu")
    handle.remove()
    files = find_images(images)
    sizes = [load_image(f)[0].size for f in files]  # (width, height)
    own = [_native_rule(h, w, 16) for w, h in sizes]
    assert [tuple(result.image_grids[str(f)]["grid"]) for f in files] == own and len(set(own)) > 1
    assert [tuple(args[0].shape) for args, _ in calls] == [(1, 3, h * PATCH, w * PATCH) for h, w in own]

    eager = transformers.ViTModel.from_pretrained(tiny_model, attn_implementation="eager",
                                                  add_pooling_layer=False).eval()
    per_image = []
    with torch.no_grad():
        for (args, _), grid in zip(calls, own):
            attentions = eager(args[0], output_attentions=True, interpolate_pos_encoding=True).attentions
            per_image.append([_image_mad(a[0], 1, grid) for a in attentions])
    torch.testing.assert_close(result.mad, torch.tensor(np.array(per_image)).mean(0), **TOL)
    assert result.geometry[0]["grid"] is None and result.layout is None

    result.to_json(tmp_path / "mad.json")
    again = vitmad.Profile.from_json(tmp_path / "mad.json")
    assert again.image_grids == result.image_grids and again.uniform_mads == result.uniform_mads
    result.plot(tmp_path / "mad.png")


def test_dinov2_which_interpolates_at_every_forward_takes_native_sizes(images):
    """transformers' DINOv2 (the builtin model's class) has no interpolate_pos_encoding flag: it always
    interpolates, so each image runs at its own aspect ratio (was refused as a model of one input size)."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       image_size=32, patch_size=PATCH)
    model = transformers.Dinov2Model(config).eval()
    preprocessing = Preprocessing((32, 32), ("exact", 32, 32), False, (0.5,) * 3, (0.5,) * 3, "bilinear")
    calls, handle = _capture_inputs(model)
    result = vitmad.profile(wrap_module(model, "dinov2", preprocessing), images, image_size="native", device="cpu")
    handle.remove()
    files = find_images(images)
    own = [_native_rule(h, w, 16) for w, h in (load_image(f)[0].size for f in files)]
    assert [tuple(result.image_grids[str(f)]["grid"]) for f in files] == own and len(set(own)) > 1
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    per_image = []
    with torch.no_grad():
        for (args, _), grid in zip(calls, own):
            assert tuple(args[0].shape[-2:]) == (grid[0] * PATCH, grid[1] * PATCH)
            attentions = eager(args[0], output_attentions=True).attentions
            per_image.append([_image_mad(a[0], 1, grid) for a in attentions])
    torch.testing.assert_close(result.mad, torch.tensor(np.array(per_image)).mean(0), **TOL)


def test_native_refuses_a_model_of_one_input_size_and_tensor_images(images, tiny_model):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, embed_dim=32, num_heads=2,
                              img_size=32, patch_size=PATCH)
    loaded = wrap_module(model, "timm:fixed", Preprocessing.from_timm(timm.data.resolve_model_data_config(model)))
    with pytest.raises(OptionError, match="image_size: native: VisionTransformer takes one input size"):
        vitmad.profile(loaded, images, image_size="native", device="cpu")
    with pytest.raises(OptionError, match="images: image_size='native' .* not a tensor"):
        vitmad.profile(f"hf:{tiny_model}", torch.zeros(2, 3, 32, 32), image_size="native", device="cpu")


def test_cli_native_writes_image_grids_and_figures(siglip2_folder, images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["profile", "--model", f"hf:{siglip2_folder}", "--images", str(images), "--image-size", "native",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out), "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "5 images (0 skipped)" in captured.out
    document = json.loads((out / "mad.json").read_text())
    assert document["settings"]["image_size"] == "native" and len(document["image_grids"]) == 5
    assert all(layer["geometry"]["grid"] is None for layer in document["layers"])
    assert (out / "mad.png").stat().st_size > 0 and (out / "mad_map.png").stat().st_size > 0

    # Into that --out again at one size, which SigLIP2 does not take: refused before the earlier outputs are said to
    # go (QA 348: the warning came first, then the refusal), and they stay.
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        code = main(["profile", "--model", f"hf:{siglip2_folder}", "--images", str(images), "--image-size", "32",
                     "--device", "cpu", "--out", str(out), "--workers", "0"])
    assert code == 2 and said == [], said
    assert capsys.readouterr().err.startswith("vitmad: error: --image-size: Siglip2VisionModel takes patches")
    assert json.loads((out / "mad.json").read_text()) == document


def test_native_refuses_a_hierarchy(images, tmp_path):
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=2)
    transformers.SwinModel(config).save_pretrained(tmp_path / "swin")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "swin")
    with pytest.raises(OptionError, match=r"image_size: native: the layers of SwinModel attend at strides"):
        vitmad.profile(f"hf:{tmp_path / 'swin'}", images, image_size="native", device="cpu", max_images=2,
                       checkpoint=tmp_path / "checkpoint.pt")
    assert not (tmp_path / "checkpoint.pt").exists()  # refused at its first batch: no checkpoint of nothing


@pytest.mark.parametrize("budget", [16, 196, 256, 1024])
def test_native_grids_are_the_largest_the_budget_allows(budget):
    """Scaled by one factor s = sqrt(budget / (h w)) in patches, a side of h patches has floor(h s) = the largest g
    with g^2 w <= budget h. The float product landed just below whole numbers: a 300 px square at ViT-B's budget
    of 196 got 13 x 13 patches (255 square sizes up to 2048 px did), 65 px at 16 got 3 x 3."""
    from vitmad.profiling.native import native_grid

    def largest(a: int, b: int) -> int:  # by counting, not by a square root
        g = 0
        while (g + 1) ** 2 * b <= budget * a:
            g += 1
        return g

    sizes = [*range(1, 130), 224, 299, 300, 384, 518, 1000, 2047, 2048]
    for height in sizes:
        for width in sizes[::5] + [height, 3 * height, height * 7 // 2 + 1]:
            grid_h, grid_w = native_grid(height, width, 16, budget)
            expected_h = max(1, min(budget, largest(height, width)))
            assert (grid_h, grid_w) == (expected_h, max(1, min(budget // expected_h, largest(width, height)))), \
                (height, width)
            assert grid_h * grid_w <= budget


def test_cli_native_draws_one_images_prefix_maps(siglip2_folder, tiny_model, images, tmp_path, capsys):
    """A native run has no mean maps (each image its own grid), but the first image's CLS maps are on its own grid:
    prefix_map_image.png is drawn (was: never, in a native run). SigLIP2 has no class or register token: the run
    says why there are no mean maps, as before, and draws its pooling head's map over the first image's grid (was:
    nothing, when the head had no maps)."""
    base = ["profile", "--images", str(images), "--image-size", "native", "--stats", "prefix_maps", "--device",
            "cpu", "--max-images", "2", "--workers", "0"]
    assert main([*base, "--model", f"hf:{tiny_model}", "--out", str(tmp_path / "vit")]) == 0, capsys.readouterr().err
    assert (tmp_path / "vit" / "prefix_map_image.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "vit" / "prefix_maps.npz").exists()
    assert main([*base, "--model", f"hf:{siglip2_folder}", "--out", str(tmp_path / "siglip2")]) == 0
    out = capsys.readouterr().out
    assert "native resolution: every image has its own token grid" in out
    # QA 332: the pooling head's skip line advised the maps (rec.class_attention_maps) this run does not average.
    assert "skipped head.attention: attention pooling: a learned query (SigLIP2's probe) without a position on the " \
           "image; no MAD, and no mean map in this run (native resolution" in out
    saved = json.loads((tmp_path / "siglip2" / "mad.json").read_text())
    reason = {entry["name"]: entry["reason"] for entry in saved["skipped_layers"]}["head.attention"]
    assert "no mean map in this run (native resolution" in reason and "class_attention_maps" not in reason
    assert (tmp_path / "siglip2" / "prefix_map_image.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "siglip2" / "prefix_maps.npz").exists()
    loaded = vitmad.profiling.models.load_model(f"hf:{siglip2_folder}")
    maps, _, name, geometry = vitmad.profiling.image_prefix_maps(loaded, find_images(images)[0], image_size="native",
                                                                 device="cpu")
    assert name == "head.attention" and maps.shape == (2, 1, *geometry["grid"])
    torch.testing.assert_close(maps.sum((-1, -2)), torch.ones(2, 1))  # the probe's row over the image's patches
