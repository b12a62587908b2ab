"""vitmad profile on more packed native-resolution vision towers: the towers of whole Qwen3-VL-MoE, Qwen3.5 and
Qwen3.5-MoE vision-language checkpoints (Qwen3-VL's tower line for line, under ``model.visual``; their image
processor transformers' ``Qwen2VLImageProcessor``).

Tiny random-weight models, their vision weights scaled so that attention is far from uniform, are saved to folders
with their image processors. The reference is written here, independently of vitmad: each image through the
model's own processor, then alone through the tower of the whole model loaded by transformers with eager
attention, its softmax probabilities captured from the modeling file's ``eager_attention_forward``; tokens placed
by geometry written here with explicit loops (spatial-merge blocks row-major, the patches of a block row-major),
each patch at ``(row + 0.5, col + 0.5) * patch`` pixels; a query's MAD over the keys of its image, the image's MAD
the mean over its tokens, in float64.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import vitmad
from conftest import write_images
from vitmad.profiling.images import find_images, load_image
from vitmad.profiling.models import load_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchvision")  # transformers' Qwen2-VL image processor

PATCH, MERGE = 4, 2  # 4 px patches, 2 x 2 merge blocks
# At most 24 x 24 px per image (36 patches), at least 8 x 8.
PROCESSOR = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2, min_pixels=64, max_pixels=576)
TOL = {"rtol": 1e-5, "atol": 1e-4}
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=100, head_dim=16,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 1e4})
VISION = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2,
              hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16)

# name -> (config class, model class, tower class, extra text settings, extra vision settings)
CASES = {
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeVisionModel",
                     dict(moe_intermediate_size=32, num_experts=2, num_experts_per_tok=1),
                     dict(deepstack_visual_indexes=[])),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "Qwen3_5VisionModel",
                dict(layer_types=["full_attention"]), {}),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeVisionModel",
                    dict(layer_types=["full_attention"], moe_intermediate_size=32, shared_expert_intermediate_size=32,
                         num_experts=2, num_experts_per_tok=1), {}),
}


def _modeling(name: str):
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _save(folder, name: str) -> None:
    config_name, model_name, _, text, vision = CASES[name]
    config = getattr(transformers, config_name)(text_config={**TEXT, **text}, vision_config={**VISION, **vision})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    torch.manual_seed(1)
    with torch.no_grad():  # large weights, the query / key rows of qkv larger still
        for module_name, module in model.model.visual.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(std=0.25)
                if module_name.endswith("attn.qkv"):
                    module.weight[:module.weight.shape[0] * 2 // 3] *= 3.0
    model.save_pretrained(folder)
    transformers.Qwen2VLImageProcessor(**PROCESSOR).save_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_more")
    for name in CASES:
        _save(root / name, name)
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed_more_images")
    write_images(folder, 4, seed=7)  # 20 to 70 px sides, several aspect ratios
    return folder


# The reference, written here -------------------------------------------------------------------------------------

def _cells(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """(row, col) of each token of one image in the tower's order: merge blocks row-major, patches row-major in a
    block."""
    h, w = grid
    return [(block_row * MERGE + i, block_col * MERGE + j) for block_row in range(h // MERGE)
            for block_col in range(w // MERGE) for i in range(MERGE) for j in range(MERGE)]


def _image_mad(name: str, tower, patches, grid) -> np.ndarray:
    """``[L, H]`` MAD of one image alone through the eager tower."""
    modeling = _modeling(name)
    original, calls = modeling.eager_attention_forward, []

    def capture(module, *a, **kw):
        output, probabilities = original(module, *a, **kw)
        calls.append(probabilities.detach().double())
        return output, probabilities

    modeling.eager_attention_forward = capture
    try:
        with torch.no_grad():
            tower(patches, grid_thw=torch.tensor([[1, *grid]]))
    finally:
        modeling.eager_attention_forward = original
    assert len(calls) == len(tower.blocks)  # one call per block: one image, one chunk
    cells = _cells(grid)
    centres = torch.tensor([[(r + 0.5) * PATCH, (c + 0.5) * PATCH] for r, c in cells], dtype=torch.float64)
    distances = torch.cdist(centres, centres)
    return np.array([(p[0] * distances).sum(-1).mean(-1).numpy() for p in calls])


# Tests -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_packed_profile_is_each_images_mad_on_its_own_grid(name, folders, images):
    folder = folders / name
    model_name, tower_name = CASES[name][1], CASES[name][2]
    tower = getattr(transformers, model_name).from_pretrained(folder, attn_implementation="eager").model.visual
    assert type(tower).__name__ == tower_name
    processor = transformers.Qwen2VLImageProcessor.from_pretrained(folder)
    files = find_images(images)
    grids, reference = [], []
    for path in files:
        found = processor([load_image(path)[0]], return_tensors="pt")
        grid = tuple(found["image_grid_thw"][0, 1:].tolist())
        grids.append(grid)
        reference.append(_image_mad(name, tower.eval(), found["pixel_values"], grid))
    assert len(set(grids)) > 1  # several grids packed into one forward
    stacked = torch.tensor(np.array(reference))  # [images, L, H]

    loaded = load_model(f"hf:{folder}")
    assert type(loaded.module).__name__ == tower_name
    assert loaded.description.startswith(f"visual ({tower_name}) of {model_name}")
    for (key, value), expected in zip(loaded.module.state_dict().items(), tower.state_dict().values()):
        assert torch.equal(value, expected), key  # the checkpoint's weights, not a fresh initialisation
    calls = []
    handle = loaded.module.register_forward_pre_hook(lambda _, args, kwargs: calls.append(1), with_kwargs=True)
    result = vitmad.profile(loaded, images, image_size="native", batch_size=4, device="cpu")
    handle.remove()
    assert len(calls) == 1  # one packed forward for the four images
    assert [tuple(result.image_grids[str(f)]["grid"]) for f in files] == grids
    torch.testing.assert_close(result.mad, stacked.mean(0), **TOL)
    torch.testing.assert_close(result.min, stacked.min(0).values, **TOL)
    torch.testing.assert_close(result.max, stacked.max(0).values, **TOL)
    assert (result.max - result.min).max() > 1.0  # the images differ: a misplaced image would be noticed
    assert (result.mad - result.uniform_mad).abs().max() > 1.0  # attention far from uniform
