"""Tiny random-weight models saved to disk and generated images, for the profile and CLI tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_tiny_hf_vit(folder: Path, *, image_size: int = 32, patch: int = 8, layers: int = 2, heads: int = 2,
                     seed: int = 0) -> Path:
    """A ViTModel with random weights and its image processor, as ``save_pretrained`` folders."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch, hidden_size=24, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=48)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, *, seed: int = 0, nested: bool = True) -> list[Path]:
    """``count`` random RGB images of varied sizes and formats (some in a subfolder), sorted by path."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sub = folder / "sub" if nested and i % 3 == 2 else folder
        sub.mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(20, 70)), int(rng.integers(20, 70))
        # Smooth gradients plus noise: structured enough that heads differ between images.
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = sub / f"img_{i:03d}.{('png', 'jpg', 'bmp')[i % 3]}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return sorted(paths)


def write_corrupt_images(folder: Path) -> list[Path]:
    """A file with an image extension that is not an image, and a truncated PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    garbage = folder / "broken_garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    truncated = folder / "broken_truncated.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8) + 90).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    return [garbage, truncated]
