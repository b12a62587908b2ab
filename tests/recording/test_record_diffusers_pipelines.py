"""vitmad.record(pipe.transformer) through a whole diffusers pipeline: one call per denoising step, classifier-free
guidance's doubled batch, each step equal to the model's own attention.

A tiny ``DiTPipeline`` (random DiT, tiny ``AutoencoderKL``, DDIM, 3 steps) runs as a user runs it. The reference
is the float64 softmax of the q and k the DiT's processor hands ``F.scaled_dot_product_attention`` in each step,
placed by the geometry written here from diffusers' source: ``DiTPipeline`` draws latents of ``sample_size``
latent pixels a side and, with ``guidance_scale > 1``, feeds the transformer ``torch.cat([latents] * 2)`` with the
null class label for the first half; ``PatchEmbed`` cuts the latent into ``patch_size`` cells, row-major, each
token at its cell's centre in latent pixels.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_record_diffusers_images import TOL, _attention_maps, _sharpen

import vitmad
from conftest import grid_centres, statistics_reference

diffusers = pytest.importorskip("diffusers")


def _pipeline():
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                                  latent_channels=4, norm_num_groups=2, sample_size=16)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=10)
    torch.manual_seed(0)
    # 1000 classes: the pipeline's null label for guidance is class 1000 (the table's extra row).
    dit = _sharpen(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        norm_num_groups=1, num_embeds_ada_norm=1000, out_channels=8), scale=6.0)  # learned sigma, as DiT-XL
    pipe = diffusers.DiTPipeline(transformer=dit, vae=vae.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_pipeline_records_a_call_per_denoising_step(monkeypatch):
    pipe = _pipeline()
    steps = 3

    def run():
        return pipe(class_labels=[3], num_inference_steps=steps, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    maps, spied = _attention_maps(monkeypatch, run)
    maps = [m for m in maps if m.shape[-1] == 16]  # the DiT's 4 x 4 patches; the VAE decoder's mid-block attends too
    with torch.no_grad(), vitmad.record(pipe.transformer, reduction="none") as rec:
        recorded = run()
    assert (recorded == spied).all()  # the pipeline's images unchanged by recording
    assert len(rec.calls) == steps and len(maps) == 2 * steps
    positions = grid_centres((4, 4), 2.0)  # sample_size 8, patch 2: a 4 x 4 grid of 2-latent-pixel cells
    for step, call in enumerate(rec.calls):
        assert call.layers == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
        for layer in range(2):
            probabilities = maps[2 * step + layer]
            assert probabilities.shape[0] == 2  # guidance: the null label's half, then the class's
            expected = statistics_reference(probabilities, positions)
            assert float(expected["entropy"].mean()) < 0.75 * math.log(16)  # far from uniform
            torch.testing.assert_close(call.per_layer[layer].double(), expected["mad"], **TOL)
    # The steps differ: MAD against the timestep is the recording's calls in order.
    assert not torch.equal(rec.calls[0].per_layer[0], rec.calls[-1].per_layer[0])
