"""vitmad.profile on a model whose heads and token grid change with depth (a tiny timm Swin: 1 then 2 heads,
tokens of 4 then 8 px): statistics, mad.json / mad.csv, figures, compare, maps and resume per layer."""

from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("matplotlib")

import vitmad  # noqa: E402
from vitmad.profiling.plotting import plot_compare, plot_mad_maps  # noqa: E402


def _tiny_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(1, 2)).eval()


@pytest.fixture(scope="module")
def swin_and_images():
    return _tiny_swin(), torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_profile_keeps_each_layers_heads_and_geometry(swin_and_images, tmp_path):
    model, pixels = swin_and_images
    result = vitmad.profile(model, pixels, batch_size=2, device="cpu")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert result.heads == [1, 2] and result.layers == rec.layers and result.layout is None
    assert [g["stride"] for g in result.geometry] == [[4.0, 4.0], [8.0, 8.0]]
    assert [g["grid"] for g in result.geometry] == [[8, 8], [4, 4]]
    for i, per_image in enumerate(rec.per_layer):  # [B, H_l]: the profile is the mean over images
        torch.testing.assert_close(result.mad[i, : result.heads[i]], per_image.double().mean(0), rtol=1e-6,
                                   atol=1e-5)
    assert result.mad[0, 1].isnan()  # the first layer has one head only
    # A fully global head on the 8 x 8 grid of 4 px and on the 4 x 4 grid of 8 px.
    assert result.uniform_mads == [pytest.approx(vitmad.uniform_attention_mad(8, 8, 4)),
                                   pytest.approx(vitmad.uniform_attention_mad(4, 4, 8))]

    result.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text())
    assert doc["format"] == "vitmad-profile/2" and doc["num_heads"] == [1, 2] and doc["layout"] is None
    assert [len(layer["mean"]) for layer in doc["layers"]] == [1, 2]
    assert [layer["geometry"]["attention"] for layer in doc["layers"]] == ["window 4x4", "window 4x4"]
    assert [len(row) for row in doc["sums"]["total"]] == [1, 2]
    again = vitmad.Profile.from_json(tmp_path / "mad.json")
    assert again.heads == [1, 2] and again.geometry == result.geometry
    assert torch.equal(again.mad.nan_to_num(-1), result.mad.nan_to_num(-1))

    result.to_csv(tmp_path / "mad.csv")
    rows = (tmp_path / "mad.csv").read_text().strip().splitlines()[1:]
    assert [row.split(",")[:3] for row in rows] == [["0", rec.layers[0], "0"], ["1", rec.layers[1], "0"],
                                                    ["1", rec.layers[1], "1"]]


def test_figures_compare_and_maps_at_each_stage(swin_and_images, tiny_model, tmp_path):
    model, pixels = swin_and_images
    swin = vitmad.profile(model, pixels, device="cpu")
    plain = vitmad.profile(f"hf:{tiny_model}", pixels, device="cpu")
    swin.plot(tmp_path / "mad.png")
    plot_compare([swin, plain], ["swin", "vit"], tmp_path / "compare.png")
    maps, shown, names, geometry = vitmad.profiling.mad_maps(model, pixels[0], layers=[0, 1], device="cpu")
    assert [tuple(m.shape) for m in maps] == [(8, 8), (4, 4)]
    with torch.no_grad(), vitmad.record(model, reduction="none") as rec:
        model(pixels[:1])
    for layer_map, per_token in zip(maps, rec.per_layer):
        torch.testing.assert_close(layer_map.flatten(), per_token[0].mean(0))
    plot_mad_maps(maps, shown, names, tmp_path / "map.png", geometry=geometry)
    for name in ("mad.png", "compare.png", "map.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_resume_from_a_finished_checkpoint_keeps_heads_and_geometry(swin_and_images, tmp_path):
    model, pixels = swin_and_images
    checkpoint = tmp_path / "run.pt"
    first = vitmad.profile(model, pixels, batch_size=2, device="cpu", checkpoint=checkpoint, checkpoint_every=1)
    resumed = vitmad.profile(model, pixels, batch_size=2, device="cpu", checkpoint=checkpoint, resume=True)
    assert resumed.heads == first.heads and resumed.geometry == first.geometry
    assert torch.equal(resumed.stats.total.nan_to_num(-1), first.stats.total.nan_to_num(-1))


def _weights(tmp_path, name: str):
    path = tmp_path / f"{name}.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model(name, pretrained=False).state_dict(), path)
    return path


def test_timm_hierarchies_take_another_image_size_or_say_why_before_any_image(tmp_path):
    """--image-size on a timm model without dynamic_img_size (PVT v2, MViTv2, EfficientFormer, MaxViT, Hiera,
    LeViT, ...) was refused outright ("cannot take other input sizes"). Now: built for the size where the model
    takes img_size, as it is where it takes no size option, and a size it cannot run is said by name before any
    image is read."""
    from vitmad.profiling.models import load_model
    from vitmad.profiling.options import OptionError

    loaded = load_model("timm:pvt_v2_b0", model_checkpoint=_weights(tmp_path, "pvt_v2_b0"), image_size=(96, 128))
    pixels = torch.randn(1, 3, 96, 128)
    with torch.no_grad(), vitmad.record(loaded.module) as rec:
        loaded.forward(pixels)
    assert rec.geometry[0].grid == (24, 32) and rec.geometry[-1].grid == (3, 4)
    # Its constructor refuses the size (MViTv2 pools square maps only).
    with pytest.raises(OptionError, match=r"image_size: timm model mvitv2_tiny cannot be built for 96x128 px "
                                          r"\(AssertionError"):
        load_model("timm:mvitv2_tiny", model_checkpoint=_weights(tmp_path, "mvitv2_tiny"), image_size=(96, 128))
    # Built, it does not run there (EfficientFormer's attention biases are sized for 224 px whatever img_size says).
    with pytest.raises(OptionError, match=r"image_size: timm model efficientformer_l1 does not run at 96x128 px "
                                          r"\(RuntimeError: The size of tensor"):
        load_model("timm:efficientformer_l1", model_checkpoint=_weights(tmp_path, "efficientformer_l1"),
                   image_size=(96, 128))
    # Built for the size, its relative-position tables no longer have the checkpoint's shapes.
    with pytest.raises(OptionError, match=r"image_size: timm model coatnet_nano_rw_224 built for 96x128 px does "
                                          r"not take the weights of .*use the size it was trained at"):
        load_model("timm:coatnet_nano_rw_224", model_checkpoint=_weights(tmp_path, "coatnet_nano_rw_224"),
                   image_size=(96, 128))
