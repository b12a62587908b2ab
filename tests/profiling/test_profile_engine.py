"""vitmad.profile on tiny random-weight models saved to disk: values, batching, resume, broken images, maps."""

from __future__ import annotations

import json

import pytest
import torch

import vitmad
from conftest import grid_centres, statistics_reference, write_corrupt_images, write_images
from vitmad.profiling.images import find_images, load_batch
from vitmad.profiling.models import load_model

transformers = pytest.importorskip("transformers")


def _expected_mad(model_dir, files, *, image_size=None) -> torch.Tensor:
    """[L, H] float64: eager attention maps of each image through the float64 reference, mean over images."""
    loaded = load_model(f"hf:{model_dir}")
    model = transformers.ViTModel.from_pretrained(model_dir, attn_implementation="eager",
                                                  add_pooling_layer=False).eval()
    prep = loaded.preprocessing if image_size is None else loaded.preprocessing.with_size(image_size)
    pixels, _, _ = load_batch(files, prep)
    with torch.no_grad():
        attentions = model(pixels, output_attentions=True, interpolate_pos_encoding=True).attentions
    grid = (pixels.shape[2] // 8, pixels.shape[3] // 8)
    per_image = torch.stack([vitmad.mad_reference(a, 8, grid=grid) for a in attentions])  # [L, B, H]
    return per_image.mean(1)


def test_profile_matches_reference_over_images(tiny_model, image_folder):
    result = vitmad.profile(f"hf:{tiny_model}", image_folder, batch_size=3, device="cpu")
    files = find_images(image_folder)
    assert result.count == len(files) == 7
    assert result.images == [str(f) for f in files]
    assert result.mad.shape == result.std.shape == (2, 2)
    assert result.layout == {"patch": 8, "grid": [4, 4], "num_prefix_tokens": 1}
    assert len(result.layers) == 2 and result.skipped == []
    # record computes MAD from float32 q and k; the reference from eager float32 probabilities in float64.
    torch.testing.assert_close(result.mad, _expected_mad(tiny_model, files), rtol=1e-4, atol=1e-4)
    assert (result.std > 0).all() and (result.min <= result.mad).all() and (result.mad <= result.max).all()


def test_batch_size_does_not_change_the_result(tiny_model, image_folder):
    one = vitmad.profile(f"hf:{tiny_model}", image_folder, batch_size=1, device="cpu")
    five = vitmad.profile(f"hf:{tiny_model}", image_folder, batch_size=5, device="cpu")
    torch.testing.assert_close(one.mad, five.mad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.std, five.std, rtol=1e-4, atol=1e-4)


def test_non_square_image_size(tiny_model, image_folder):
    result = vitmad.profile(f"hf:{tiny_model}", image_folder, image_size="16x40", device="cpu", max_images=4)
    assert result.layout["grid"] == [2, 5] and result.count == 4
    expected = _expected_mad(tiny_model, find_images(image_folder)[:4], image_size=(16, 40))
    torch.testing.assert_close(result.mad, expected, rtol=1e-4, atol=1e-4)


def test_module_and_tensor_inputs(tiny_model):
    module = transformers.ViTModel.from_pretrained(tiny_model, add_pooling_layer=False)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = vitmad.profile(module, pixels, batch_size=2, device="cpu")
    assert result.images == [f"tensor[{i}]" for i in range(5)] and result.model == "ViTModel"
    with torch.no_grad():
        eager = transformers.ViTModel.from_pretrained(tiny_model, attn_implementation="eager",
                                                      add_pooling_layer=False)(pixels, output_attentions=True)
    expected = torch.stack([vitmad.mad_reference(a, 8) for a in eager.attentions]).mean(1)
    torch.testing.assert_close(result.mad, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"^images: a tensor of images must be \[B, 3, H, W\], got shape \[3, 32"):
        vitmad.profile(module, pixels[0])


def test_json_schema_and_round_trip(tiny_model, image_folder, tmp_path):
    result = vitmad.profile(f"hf:{tiny_model}", image_folder, batch_size=4, device="cpu")
    result.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text())
    assert doc["format"] == "vitmad-profile/2" and doc["model"] == f"hf:{tiny_model}"
    assert doc["layout"] == result.layout and doc["count"] == 7 and doc["num_heads"] == 2
    assert doc["uniform_attention_mad"] == pytest.approx(vitmad.uniform_attention_mad(4, 4, 8))
    assert doc["images"] == result.images and doc["skipped"] == []
    assert doc["settings"]["renormalize"] is False and doc["settings"]["dtype"] == "float32"
    for i, layer in enumerate(doc["layers"]):
        assert layer["index"] == i and layer["name"] == result.layers[i] and layer["count"] == 7
        assert layer["mean"] == result.mad[i].tolist() and layer["std"] == result.std[i].tolist()
        assert layer["min"] == result.min[i].tolist() and layer["max"] == result.max[i].tolist()
        assert layer["summary"]["min_head"] == min(layer["mean"])
    back = vitmad.Profile.from_json(tmp_path / "mad.json")
    assert torch.equal(back.mad, result.mad) and torch.equal(back.std, result.std)
    assert back.count == 7 and back.layers == result.layers and back.images == result.images
    result.to_csv(tmp_path / "mad.csv")
    rows = (tmp_path / "mad.csv").read_text().splitlines()
    assert rows[0].startswith("layer,name,head,mad_mean") and len(rows) == 1 + 2 * 2
    assert float(rows[3].split(",")[3]) == result.mad[1, 0].item()
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a vitmad profile"):
        vitmad.Profile.from_json(tmp_path / "other.json")


def _interrupt_at_call(loaded, call: int):
    """Makes ``loaded``'s forward raise KeyboardInterrupt (Ctrl-C) at its ``call``-th call; returns the real one."""
    real_forward, calls = loaded.forward, []

    def interrupted_forward(pixels):
        calls.append(len(pixels))
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_forward(pixels)

    loaded.forward = interrupted_forward
    return real_forward


def test_resume_after_interrupt_equals_uninterrupted_run(tiny_model, image_folder, tmp_path, monkeypatch):
    spec = f"hf:{tiny_model}"
    full = vitmad.profile(spec, image_folder, batch_size=2, device="cpu", checkpoint=tmp_path / "full.pt")

    loaded = load_model(spec)
    real_forward = _interrupt_at_call(loaded, 3)
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        vitmad.profile(loaded, image_folder, batch_size=2, device="cpu", checkpoint=checkpoint, checkpoint_every=5)
    state = torch.load(checkpoint, weights_only=True)
    assert state["batches_done"] == 2 and len(state["images"]) == 4

    loaded.forward = real_forward
    resumed = vitmad.profile(loaded, image_folder, batch_size=2, device="cpu", checkpoint=checkpoint, resume=True)
    assert resumed.images == full.images
    assert torch.equal(resumed.stats.total, full.stats.total)
    assert torch.equal(resumed.stats.total_sq, full.stats.total_sq)
    assert torch.equal(resumed.min, full.min) and torch.equal(resumed.max, full.max)
    with pytest.raises(ValueError, match="other settings, other model weights or other images"):
        vitmad.profile(loaded, image_folder, batch_size=3, device="cpu", checkpoint=checkpoint, resume=True)


def test_resume_refuses_an_image_replaced_under_its_own_name(tiny_model, tmp_path):
    """The fingerprint held the file names only: an image profiled before the interruption and replaced by
    another under the same name was resumed into one mixed result."""
    folder = tmp_path / "images"
    paths = write_images(folder, 4, nested=False)
    loaded = load_model(f"hf:{tiny_model}")
    real_forward = _interrupt_at_call(loaded, 2)
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        vitmad.profile(loaded, folder, batch_size=2, device="cpu", checkpoint=checkpoint)
    assert torch.load(checkpoint, weights_only=True)["batches_done"] == 1
    loaded.forward = real_forward
    write_images(tmp_path / "other", 1, seed=7, nested=False)[0].replace(paths[0])  # same name, other image
    with pytest.raises(ValueError, match="resume: .* other settings, other model weights or other images"):
        vitmad.profile(loaded, folder, batch_size=2, device="cpu", checkpoint=checkpoint, resume=True)


def test_broken_images_are_skipped_and_listed(tiny_model, tmp_path):
    good = write_images(tmp_path, 4, nested=False)
    broken = write_corrupt_images(tmp_path)
    with pytest.warns(UserWarning, match="skipping image") as caught:
        result = vitmad.profile(f"hf:{tiny_model}", tmp_path, batch_size=2, device="cpu")
    assert len(caught) == 2
    assert result.count == 4 and result.images == [str(p.resolve()) for p in good]
    assert sorted(s["path"] for s in result.skipped) == sorted(str(p.resolve()) for p in broken)
    clean = vitmad.profile(f"hf:{tiny_model}", good, batch_size=4, device="cpu")
    torch.testing.assert_close(result.mad, clean.mad, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 2 images could be read"):
        vitmad.profile(f"hf:{tiny_model}", broken, device="cpu")


def test_mad_maps_average_to_the_image_mad(tiny_model, image_folder):
    file = find_images(image_folder)[0]
    maps, pixels, names, geometry = vitmad.profiling.mad_maps(f"hf:{tiny_model}", file, device="cpu")
    assert [m.shape for m in maps] == [(4, 4)] * 2 and pixels.shape == (3, 32, 32) and len(names) == 2
    assert [g["grid"] for g in geometry] == [[4, 4]] * 2 and [g["stride"] for g in geometry] == [[8.0, 8.0]] * 2
    single = vitmad.profile(f"hf:{tiny_model}", [file], device="cpu")
    torch.testing.assert_close(torch.stack(maps).double().mean((1, 2)), single.mad.mean(1), rtol=1e-5, atol=1e-4)


def test_figures_are_written(tiny_model, image_folder, tmp_path):
    from vitmad.profiling.plotting import plot_compare, plot_mad_maps

    result = vitmad.profile(f"hf:{tiny_model}", image_folder, device="cpu", max_images=3)
    result.plot(tmp_path / "mad.png")
    maps, pixels, names, geometry = vitmad.profiling.mad_maps(f"hf:{tiny_model}", result.images[0], device="cpu")
    plot_mad_maps(maps, pixels, names, tmp_path / "map.png", geometry=geometry)
    plot_compare([result, result], ["a", "b"], tmp_path / "compare.svg")
    for name in ("mad.png", "map.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert b"<svg" in (tmp_path / "compare.svg").read_bytes()[:500]


def test_timm_spec_with_local_checkpoint(tmp_path, image_folder):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    spec = "timm:vit_tiny_patch16_224"
    result = vitmad.profile(spec, image_folder, image_size=48, model_checkpoint=tmp_path / "weights.pth",
                            device="cpu", max_images=3)
    assert result.layout == {"patch": 16, "grid": [3, 3], "num_prefix_tokens": 1}
    assert result.mad.shape == (12, 3) and result.count == 3

    # Reference: the same weights with timm's explicit softmax path, probabilities caught at attn_drop.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True)
    model.load_state_dict(torch.load(tmp_path / "weights.pth", weights_only=True))
    model.eval()
    caught = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda mod, args, out: caught.append(out))
    pixels, _, _ = load_batch(find_images(image_folder)[:3], _timm_prep(model).with_size((48, 48)))
    with torch.no_grad():
        model(pixels)
    expected = torch.stack([vitmad.mad_reference(a, 16) for a in caught]).mean(1)
    torch.testing.assert_close(result.mad, expected, rtol=1e-4, atol=1e-4)


def test_timm_pretrained_weights_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    """Offline, timm would ask the hub for the weights for about a minute even when they are cached: the cached
    file is loaded at once, and weights not in the cache are a one-line error naming the way around it."""
    timm = pytest.importorskip("timm")
    import huggingface_hub

    from vitmad.profiling import models
    from vitmad.profiling.options import OptionError

    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def cache(repo, filename, revision=None):
        asked.append((repo, filename))
        return cached.get(filename)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cache)
    cached = {}
    with pytest.raises(OptionError, match=r"timm:vit_tiny_patch16_224: cannot reach the Hugging Face hub .* weights "
                                          r"of vit_tiny_patch16_224 \(timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k\) "
                                          r"are not in the local cache"):
        models.load_model("timm:vit_tiny_patch16_224")
    assert asked == [("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "model.safetensors"),
                     ("timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", "pytorch_model.bin")]

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    cached = {"pytorch_model.bin": str(tmp_path / "pytorch_model.bin")}
    loaded = models.load_model("timm:vit_tiny_patch16_224")
    for ours, theirs in zip(loaded.module.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_timm_model_with_an_unknown_crop_mode(tmp_path, monkeypatch):
    """A crop mode timm may add later refuses the model's own preprocessing, naming the way around it; with an
    image size, which replaces the resize and crop, the model loads."""
    timm = pytest.importorskip("timm")
    from vitmad.profiling.models import load_model
    from vitmad.profiling.options import OptionError

    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "weights.pth")
    resolve = timm.data.resolve_model_data_config
    monkeypatch.setattr(timm.data, "resolve_model_data_config",
                        lambda module: {**resolve(module), "crop_mode": "letterbox"})
    spec, weights = "timm:vit_tiny_patch16_224", tmp_path / "weights.pth"
    with pytest.raises(OptionError, match=r"crop_mode 'letterbox' .* pass an image size \(--image-size"):
        load_model(spec, model_checkpoint=weights)
    loaded = load_model(spec, model_checkpoint=weights, image_size=(48, 48))
    assert loaded.preprocessing.with_size((48, 48)).resize == ("cover",)


def _timm_prep(model):
    import timm

    from vitmad.profiling.images import Preprocessing

    return Preprocessing.from_timm(timm.data.resolve_model_data_config(model))


def test_timm_errors_name_the_option(tmp_path, image_folder):
    timm = pytest.importorskip("timm")
    with pytest.raises(ValueError, match="timm has no model named 'no_such_vit'"):
        vitmad.profile("timm:no_such_vit", image_folder)
    with pytest.raises(ValueError, match=r"model: timm:vit_tiny_patch16_224.no_such_tag: Invalid pretrained tag "
                                         r"\(no_such_tag\) for vit_tiny_patch16_224"):
        vitmad.profile("timm:vit_tiny_patch16_224.no_such_tag", image_folder)
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=2).state_dict(), tmp_path / "small.pth")
    # torch's first line names only the class: the keys that differ come with it (QA 215)
    with pytest.raises(ValueError, match="model_checkpoint: .*small.pth does not fit timm model vit_tiny_patch16_224: "
                                         "Error.s. in loading state_dict for VisionTransformer: Missing key.s. in "
                                         'state_dict: "blocks.2.norm1.weight"'):
        vitmad.profile("timm:vit_tiny_patch16_224", image_folder, model_checkpoint=tmp_path / "small.pth")
    with pytest.raises(FileNotFoundError, match="model_checkpoint: no such file"):
        vitmad.profile("timm:vit_tiny_patch16_224", image_folder, model_checkpoint=tmp_path / "none.pth")


def test_timm_weights_the_hub_refuses_offline_name_the_local_weights_option(image_folder, monkeypatch, tmp_path):
    """With HF_HUB_OFFLINE set the hub library's own error came alone, without --weights (QA 215)."""
    pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ValueError, match=r"model: timm:test_vit: cannot load its pretrained weights \(.*\); pass "
                                         r"local weights \(--weights FILE, model_checkpoint=\)$"):
        vitmad.profile("timm:test_vit", image_folder)


@pytest.mark.parametrize("image_size", [None, 64])
def test_a_timm_weights_file_that_cannot_be_read_is_refused_as_unreadable(tmp_path, image_folder, image_size):
    """An empty file crashed with a bare EOFError, a cut one was said not to fit the model (or, built for a size,
    to hold tables of another size): each is a file torch cannot read (QA helper-130)."""
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("test_vit").state_dict(), tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_bytes(b"not a checkpoint")  # weights_only's complaint was of pickle globals
    for name, said in (("empty", "EOFError: no message"), ("cut", "RuntimeError: PytorchStreamReader failed"),
                       ("text", "neither torch.save's zip archive nor a pickle: it starts with b'not a ch'")):
        with pytest.raises(ValueError, match=rf"model_checkpoint: .*{name}.pth cannot be read as a torch checkpoint "
                                             rf"\({said}"):
            vitmad.profile("timm:test_vit", image_folder, model_checkpoint=tmp_path / f"{name}.pth",
                           image_size=image_size)
    assert vitmad.profile("timm:test_vit", image_folder, model_checkpoint=tmp_path / "whole.pth", max_images=1,
                          image_size=image_size).count == 1


def test_a_timm_weights_file_holding_no_state_dict_is_refused_naming_it(tmp_path, image_folder):
    """QA 284: a text file that torch reads as a legacy pickle, a tensor or a list saved alone, a dict of other
    things and a junk .safetensors escaped from timm's loader as KeyError, AttributeError or SafetensorError
    tracebacks; torchvision's, sam2's and monai's were one line each."""
    timm = pytest.importorskip("timm")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    torch.save({"model": 5}, tmp_path / "dict.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"junk\n")
    (tmp_path / "legacy.pth").write_bytes(b"junk\n")
    keys = "neither as a whole nor under 'state_dict_ema', 'model_ema', 'state_dict', 'model'"
    for name, said in (("tensor.pth", f"holds no state dict \\(tensors by name\\), {keys}"),
                       ("list.pth", "holds no state dict"), ("dict.pth", "holds no state dict"),
                       ("junk.safetensors", r"cannot be read as a safetensors file \(SafetensorError"),
                       ("legacy.pth", "cannot be read as a torch checkpoint")):
        with pytest.raises(ValueError, match=rf"model_checkpoint: .*{name} {said}"):
            vitmad.profile("timm:test_vit", image_folder, model_checkpoint=tmp_path / name)
    # Under the keys timm's loader reads, as training checkpoints keep them, it loads.
    torch.save({"state_dict": timm.create_model("test_vit").state_dict(), "epoch": 3}, tmp_path / "train.pth")
    assert vitmad.profile("timm:test_vit", image_folder, model_checkpoint=tmp_path / "train.pth",
                          max_images=1).count == 1


def test_image_text_model_profiles_its_vision_tower(tmp_path, image_folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    result = vitmad.profile(f"hf:{tmp_path}", image_folder, device="cpu", max_images=3)
    assert result.mad.shape == (2, 2) and result.count == 3
    assert result.layout == {"patch": 8, "grid": [4, 4], "num_prefix_tokens": 1}
    pixels, _, _ = load_batch(find_images(image_folder)[:3], load_model(f"hf:{tmp_path}").preprocessing)
    eager = CLIPModel.from_pretrained(tmp_path, attn_implementation="eager").vision_model
    with torch.no_grad():
        attentions = eager(pixels, output_attentions=True).attentions
    expected = torch.stack([vitmad.mad_reference(a, 8) for a in attentions]).mean(1)
    torch.testing.assert_close(result.mad, expected, rtol=1e-4, atol=1e-4)


def test_an_image_text_model_built_in_python_is_profiled_through_its_vision_tower():
    """CLIPModel given as a module: the pixels landed in its forward's input_ids (an AttributeError from
    transformers); an hf: spec of it profiles its vision tower, and so does the module now, with the same MAD."""
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8))
    torch.manual_seed(0)
    clip = transformers.CLIPModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = vitmad.profile(clip, pixels, device="cpu")
    assert result.model == "CLIPModel" and len(result.layers) == 2
    assert result.settings["profiled"].endswith("of CLIPModel, its vision tower")
    with torch.no_grad(), vitmad.record(clip.vision_model) as rec:
        clip.vision_model(pixels)
    torch.testing.assert_close(result.mad, rec.mad.mean(1).double(), rtol=1e-6, atol=1e-6)


def test_an_mae_checkpoint_is_profiled_on_every_patch_the_same_in_every_run(tmp_path, image_folder):
    """ViTMAE drops mask_ratio of the patches at random at every forward, eval mode too: two runs of one checkpoint
    gave 9.3 and 10.1 px, and mad_map.png another draw (QA 259). A checkpoint is profiled on every patch, said in
    settings.profiled; a module passed with its masking on is refused (it is the caller's to change)."""
    torch.manual_seed(0)
    config = transformers.ViTMAEConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=48, mask_ratio=0.75)
    transformers.ViTMAEModel(config).save_pretrained(tmp_path / "mae")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "mae")
    runs = [vitmad.profile(f"hf:{tmp_path / 'mae'}", image_folder, batch_size=4, device="cpu") for _ in range(2)]
    # The same numbers (its patches still run in a random order, so float32 sums differ in the last bits).
    torch.testing.assert_close(runs[0].mad, runs[1].mad, rtol=1e-6, atol=0)
    assert "mask_ratio, set to 0" in runs[0].settings["profiled"]
    # The reference: every patch in order (noise rising: no shuffle), eager attention in float64 placement.
    model = transformers.ViTMAEModel.from_pretrained(tmp_path / "mae", mask_ratio=0.0,
                                                     attn_implementation="eager").eval()
    pixels, _, _ = load_batch(find_images(image_folder), load_model(f"hf:{tmp_path / 'mae'}").preprocessing)
    with torch.no_grad():
        attentions = model(pixels, noise=torch.arange(16.0).expand(len(pixels), 16),
                           output_attentions=True).attentions
    expected = torch.stack([vitmad.mad_reference(a, 8, grid=(4, 4)) for a in attentions]).mean(1)
    torch.testing.assert_close(runs[0].mad, expected, rtol=1e-4, atol=1e-4)
    masking = transformers.ViTMAEModel(config).eval()
    with pytest.raises(ValueError, match=r"^model: ViTMAEModel drops 0\.75 of the patches at random at every forward "
                                         r"\(config\.mask_ratio\), .* set model\.config\.mask_ratio = 0\.0"):
        vitmad.profile(masking, pixels, device="cpu")


class _ClassTokenLast(torch.nn.Module):
    """A user's ViT: a 3 x 5 grid of 8 px patches, then its class token last; one SDPA layer of 2 heads."""

    def __init__(self):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, 16, 8, 8)
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.qkv = torch.nn.Linear(16, 48)
        self.seen = []

    def forward(self, pixels):
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([x, self.cls_token.expand(len(x), -1, -1)], 1)
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        self.seen.append((q.detach(), k.detach()))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_a_token_layout_given_to_profile_places_a_class_token_last(tmp_path):
    """QA 413: profile placed a user's class token last as first, with the recorder's warning advising positions=
    or num_prefix_tokens=, which profile did not take. It takes them (the run's settings), as vitmad.record does."""
    torch.manual_seed(0)
    model = _ClassTokenLast().eval()
    pixels = torch.randn(3, 3, 24, 40)
    placed = torch.cat([grid_centres((3, 5), 8), torch.full((1, 2), float("nan"), dtype=torch.float64)])
    positions = placed.float()
    checkpoint = tmp_path / "sums.pt"
    prof = vitmad.profile(model, pixels, device="cpu", batch_size=2, positions=positions, checkpoint=checkpoint,
                          stats=["prefix_mass"])
    assert prof.settings["layout"]["positions"]["shape"] == [16, 2]
    # Of the tensor as given, as before: a checkpoint written then resumes (QA 429, QA 430).
    from vitmad.profiling.checkpoint import tensors_digest
    assert prof.settings["layout"]["positions"]["digest"] == tensors_digest([("positions", positions)])
    # The reference: each image's own softmax, the class token (index 15) without a position.
    expected_mad, expected_prefix = [], []
    for q, k in model.seen:
        stats = statistics_reference((q.double() @ k.double().transpose(-1, -2) * 8 ** -0.5).softmax(-1), placed)
        expected_mad.append(stats["mad"].mean(-1))
        expected_prefix.append(stats["prefix_mass"].mean(-1))
    torch.testing.assert_close(prof.mad[0], torch.cat(expected_mad).mean(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(prof.running("prefix_mass").mean[0], torch.cat(expected_prefix).mean(0),
                               rtol=0, atol=5e-5)
    with pytest.raises(vitmad.profiling.options.OptionError, match="the token layout given"):
        vitmad.profile(model, pixels, device="cpu", batch_size=2, positions=positions.flip(0),
                       checkpoint=checkpoint, resume=True, stats=["prefix_mass"])

    with pytest.raises(vitmad.profiling.options.OptionError, match="positions: expected a tensor"):
        vitmad.profile(model, pixels, device="cpu", positions=lambda: positions)
    # No grid, so no uniform-attention MAD: null in strict JSON, not NaN (QA 428), and the figure says what it is.
    prof.to_json(tmp_path / "mad.json")
    doc = json.loads((tmp_path / "mad.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert doc["uniform_attention_mad"] is None and doc["layers"][0]["uniform_attention_mad"] is None
    from vitmad.profiling.plotting import _describe_grids
    assert _describe_grids(prof) == "tokens at the positions given"
    prof.plot(tmp_path / "mad.png")
