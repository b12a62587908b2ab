"""vitmad profile --stats prefix_maps on class attention (CaiT): the class token's maps of its class-attention
layers are averaged over the images beside the layers' own maps (map indices after the MAD layers), written to
mad.json and prefix_maps.npz, drawn, resumed; XCiT, whose only spatial attention is class attention, is refused.

Reference: each class-attention layer's eager probabilities in a float64 copy of the model, image by image,
placed by the geometry written here: key 0 is the class token, keys 1.. the row-major 4 x 4 grid of 8 px.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("matplotlib")

import vitmad  # noqa: E402
from conftest import interrupted_profile, write_images  # noqa: E402
from vitmad.profiling import image_prefix_maps  # noqa: E402
from vitmad.profiling.images import Preprocessing, find_images, load_batch  # noqa: E402
from vitmad.profiling.models import wrap_module  # noqa: E402
from vitmad.profiling.options import OptionError  # noqa: E402

PREP = Preprocessing((32, 32), ("exact", 32, 32), False, (0.5,) * 3, (0.5,) * 3)
CLASS_LAYERS = ["blocks_token_only.0.attn", "blocks_token_only.1.attn"]
TOL = {"rtol": 1e-5, "atol": 1e-7}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("class_attention_images")
    write_images(folder, 5)
    return folder


@pytest.fixture(scope="module")
def cait():
    """Two talking-heads blocks over a 4 x 4 grid of 8 px (no CLS), then two class-attention blocks; 4 heads."""
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                              embed_dim=32).eval()
    return wrap_module(model, "timm:tiny-cait", PREP)


def _eager_class_rows(model, pixels) -> list[torch.Tensor]:
    """Per class-attention layer, ``[B, H, 1, 17]`` float64: its eager probabilities, class token first."""
    eager, rows = copy.deepcopy(model).double(), []
    for module in eager.modules():
        if type(module).__name__ == "ClassAttn":
            module.fused_attn = False
            module.attn_drop.register_forward_pre_hook(lambda _, args: rows.append(args[0]))
    with torch.no_grad():
        eager(pixels.double())
    return rows


def _expected_means(model, files) -> list[torch.Tensor]:
    """Per class-attention layer, ``[H, 1, 4, 4]``: the mean over the images of the class token's row over the
    grid (keys 1..16 in row-major order)."""
    pixels, _, _ = load_batch(files, PREP)
    return [row[..., 1:].mean(0).reshape(4, 1, 4, 4) for row in _eager_class_rows(model, pixels)]


def test_class_attention_maps_are_averaged_written_and_read_back(cait, images, tmp_path):
    result = vitmad.profile(cait, images, batch_size=2, device="cpu", stats=["mad", "prefix_maps"])
    expected = _expected_means(cait.module, find_images(images))
    assert result.layers == ["blocks.0.attn", "blocks.1.attn"] and result.class_layers == CLASS_LAYERS
    assert result.map_layers == [*result.layers, *CLASS_LAYERS]
    # The self-attention layers have no class token; the class-attention layers' maps are map indices 2 and 3.
    maps = result.prefix_maps
    assert maps.layers == [2, 3] and set(maps.skipped) == {0, 1}
    for index, mean in zip((2, 3), expected):
        torch.testing.assert_close(maps.mean(index), mean, **TOL)
    assert [g["grid"] for g in result.class_geometry] == [[4, 4], [4, 4]]
    assert all(g["stride"] == [8.0, 8.0] and g["heads"] == 4 for g in result.class_geometry)

    result.to_json(tmp_path / "mad.json")
    result.save_prefix_maps(tmp_path / "prefix_maps.npz")
    doc = json.loads((tmp_path / "mad.json").read_text())
    entry = doc["prefix_maps"]
    assert entry["layers"] == [{"index": 2 + i, "name": name, "grid": [4, 4], "tokens": 1, "count": 5}
                               for i, name in enumerate(CLASS_LAYERS)]
    assert [e["name"] for e in entry["skipped_layers"]] == result.layers
    assert [e["name"] for e in entry["class_attention_layers"]] == CLASS_LAYERS
    assert [layer["name"] for layer in doc["layers"]] == result.layers  # no MAD rows for class attention
    assert set(CLASS_LAYERS) <= {e["name"] for e in doc["skipped_layers"]}
    saved = np.load(tmp_path / "prefix_maps.npz")
    assert list(saved["layer_names"]) == CLASS_LAYERS and list(saved["layer_indices"]) == [2, 3]
    for index, mean in zip((2, 3), expected):
        torch.testing.assert_close(torch.from_numpy(saved[f"layer_{index}"]).double(), mean, **TOL)

    again = vitmad.Profile.from_json(tmp_path / "mad.json")
    assert again.class_layers == CLASS_LAYERS and again.class_geometry == result.class_geometry
    again.to_json(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["prefix_maps"] == entry

    result.plot_prefix_maps(tmp_path / "prefix_maps.png")
    assert (tmp_path / "prefix_maps.png").read_bytes()[:4] == b"\x89PNG"


def test_a_profile_without_the_maps_has_no_class_layers(cait, images, tmp_path):
    result = vitmad.profile(cait, images, batch_size=2, device="cpu")
    assert result.class_layers == [] and result.prefix_maps is None
    result.to_json(tmp_path / "mad.json")
    assert "prefix_maps" not in json.loads((tmp_path / "mad.json").read_text())


def test_one_image_class_token_maps(cait, images):
    path = find_images(images)[0]
    maps, pixels, name, geometry = image_prefix_maps(cait, path, device="cpu")
    # By default the last layer with maps: the last class attention.
    assert name == CLASS_LAYERS[-1] and geometry["grid"] == [4, 4] and maps.shape == (4, 1, 4, 4)
    expected = _eager_class_rows(cait.module, pixels[None])
    torch.testing.assert_close(maps.double(), expected[-1][0, :, :, 1:].reshape(4, 1, 4, 4), **TOL)
    first, _, first_name, _ = image_prefix_maps(cait, path, layer=2, device="cpu")
    assert first_name == CLASS_LAYERS[0]
    torch.testing.assert_close(first.double(), expected[0][0, :, :, 1:].reshape(4, 1, 4, 4), **TOL)
    with pytest.raises(OptionError, match=r"layer 0 has no prefix maps; layers with maps: \[2, 3\]"):
        image_prefix_maps(cait, path, layer=0, device="cpu")
    with pytest.raises(OptionError, match=r"layer: expected a layer index in \[0, 4\) \(negative from the end\) "
                                          r"of the 2 recorded layers and, after them, the 2 class-attention or "
                                          r"pooling layers, got 4"):
        image_prefix_maps(cait, path, layer=4, device="cpu")


def test_resumed_class_attention_maps_equal_an_uninterrupted_run(cait, images, tmp_path, monkeypatch):
    options = dict(batch_size=1, device="cpu", stats=["prefix_maps"], checkpoint_every=1)
    whole = vitmad.profile(cait, images, **options)
    checkpoint = tmp_path / "run.pt"
    interrupted_profile(monkeypatch, lambda: vitmad.profile(cait, images, checkpoint=checkpoint, **options), at_batch=3)
    resumed = vitmad.profile(cait, images, checkpoint=checkpoint, resume=True, **options)
    assert resumed.class_layers == CLASS_LAYERS and resumed.prefix_maps.layers == whole.prefix_maps.layers == [2, 3]
    for index in (2, 3):
        assert torch.equal(resumed.prefix_maps.total[index], whole.prefix_maps.total[index])
        assert torch.equal(resumed.prefix_maps.count[index], whole.prefix_maps.count[index])


def test_a_model_whose_only_spatial_attention_is_class_attention_is_refused(images):
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p8_224", pretrained=False, depth=1, img_size=32).eval()
    loaded = wrap_module(model, "timm:tiny-xcit", PREP)
    with pytest.raises(OptionError, match=r"model: Xcit: no chosen layer has a MAD, only class attention or "
                                          r"attention pooling \(cls_attn_blocks.0.attn, cls_attn_blocks.1.attn\).*"
                                          r"vitmad.record\(model, stats=\['prefix_maps'\]\)"):
        vitmad.profile(loaded, images, device="cpu", stats=["prefix_maps"])
    with pytest.raises(OptionError, match="model: Xcit has no layer with spatial softmax attention"):
        vitmad.profile(loaded, images, device="cpu")


def test_a_pooling_heads_map_is_averaged_where_no_layer_has_a_cls(images):
    """A timm ViT with attention pooling and no class token: no layer had prefix maps; the head's learned query
    over the 4 x 4 grid now has its mean map."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                              embed_dim=32, num_heads=2, global_pool="map", class_token=False).eval()
    loaded = wrap_module(model, "timm:tiny-vit-map", PREP)
    result = vitmad.profile(loaded, images, batch_size=2, device="cpu", stats=["prefix_maps"])
    assert result.class_layers == ["attn_pool"] and result.prefix_maps.layers == [2]
    assert result.class_geometry[0]["attention"] == "attention pooling over global"
    # The head's eager softmax (fused path off) in a float64 copy: [B, 2 heads, 1 query, 16 patches].
    eager, rows = copy.deepcopy(model).double(), []
    eager.attn_pool.fused_attn = False
    real = torch.Tensor.softmax

    def spy(tensor, *args, **kwargs):
        out = real(tensor, *args, **kwargs)
        if inside:
            rows.append(out)
        return out

    inside = []
    eager.attn_pool.register_forward_pre_hook(lambda *_: inside.append(True))
    eager.attn_pool.register_forward_hook(lambda *_: inside.clear())
    pixels, _, _ = load_batch(find_images(images), PREP)
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "softmax", spy)
        eager(pixels.double())
    assert len(rows) == 1 and rows[0].shape == (5, 2, 1, 16)
    torch.testing.assert_close(result.prefix_maps.mean(2), rows[0].mean(0).reshape(2, 1, 4, 4), **TOL)


def test_the_maps_figure_names_each_layer_whole(cait, images, tmp_path, monkeypatch):
    """Its titles break long names after their dots instead of cutting them short (the two class-attention
    layers' names differ only past the cut: "...n_only.0.attn")."""
    from vitmad.profiling import plotting

    result = vitmad.profile(cait, images, batch_size=5, device="cpu", stats=["prefix_maps"])
    titles, real_save = [], plotting._save

    def save(fig, path, **options):
        titles.extend(ax.get_title() for ax in fig.axes)
        real_save(fig, path, **options)

    monkeypatch.setattr(plotting, "_save", save)
    result.plot_prefix_maps(tmp_path / "prefix_maps.png")
    named = [title.split("\ntoken")[0].replace("\n", "") for title in titles if "token 0" in title]
    assert named == CLASS_LAYERS
    assert all(len(line) <= 24 for title in titles for line in title.split("\ntoken")[0].split("\n"))


def _siglip_config():
    """A tiny SigLIP vision tower: 2 layers of 2 heads over a 4 x 4 grid of 8 px, and its pooling head."""
    transformers = pytest.importorskip("transformers")
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)


def test_cli_profiles_a_pooling_heads_map_from_a_checkpoint(images, tmp_path, capsys):
    """`vitmad profile --stats prefix_maps` on a SigLIP checkpoint: its tower has no CLS, so the pooling head's
    probe is its only map; the summary counts it apart from the recorded layers."""
    transformers = pytest.importorskip("transformers")
    from vitmad.cli import main

    torch.manual_seed(0)
    transformers.SiglipVisionModel(_siglip_config()).save_pretrained(tmp_path / "siglip")
    out = tmp_path / "out"
    code = main(["profile", "--model", f"hf:{tmp_path / 'siglip'}", "--images", str(images), "--device", "cpu",
                 "--stats", "prefix_maps", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "prefix maps: 1 of 3 layers (2 recorded, 1 class-attention or pooling)" in stdout
    # The skip line points to this run's file, not to the recorder's attribute.
    assert ("skipped head.attention: attention pooling: a learned query (SigLIP's probe) without a position on the "
            "image; no MAD, its queries' mean map is in prefix_maps.npz") in stdout
    saved = np.load(out / "prefix_maps.npz")
    assert list(saved["layer_names"]) == ["head.attention"] and saved["layer_2"].shape == (2, 1, 4, 4)
    doc = json.loads((out / "mad.json").read_text())
    assert [e["name"] for e in doc["prefix_maps"]["class_attention_layers"]] == ["head.attention"]
    assert {"prefix_maps.png", "prefix_map_image.png"} <= {p.name for p in out.iterdir()}


def test_torchrun_pooling_maps_equal_one_process(images, tmp_path, restore_threads):
    """Two ranks share the images; the pooling head's map sums are merged like the layers' own."""
    from conftest import profile_one_process_and_two_ranks

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.SiglipVisionModel(_siglip_config()).save_pretrained(tmp_path / "siglip")
    args = ["--model", f"hf:{tmp_path / 'siglip'}", "--images", str(images), "--device", "cpu", "--no-figures",
            "--batch-size", "2", "--stats", "prefix_maps"]
    profile_one_process_and_two_ranks(args, tmp_path)
    docs = [json.loads((tmp_path / run / "mad.json").read_text()) for run in ("one", "two")]
    assert docs[1]["processes"] == 2 and docs[0]["prefix_maps"] == docs[1]["prefix_maps"]
    assert [e["name"] for e in docs[1]["prefix_maps"]["class_attention_layers"]] == ["head.attention"]
    one, two = (np.load(tmp_path / run / "prefix_maps.npz") for run in ("one", "two"))
    assert sorted(one.files) == sorted(two.files) and "layer_2" in one.files
    np.testing.assert_allclose(two["layer_2"], one["layer_2"], rtol=1e-6, atol=1e-7)
    assert list(two["layer_names"]) == ["head.attention"] and list(two["counts"]) == [5]
