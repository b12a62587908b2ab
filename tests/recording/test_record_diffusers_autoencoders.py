"""vitmad.record on diffusers' image autoencoders: the self-attention over each feature map of ``AutoencoderKL``'s
(and ``VQModel``'s) encoder and decoder.

Tiny random-weight autoencoders, sharpened so that attention is far from uniform. The reference is the float64
softmax of the q and k each processor hands ``F.scaled_dot_product_attention`` (or, for the classic processor, the
probabilities it computes itself), placed by geometry written here from diffusers' source:

- A block's ``Attention`` is handed the map ``[B, C, h, w]`` and flattens it row-major: token ``t`` is cell ``t``,
  at ``(i + 0.5) * s`` along each axis, ``s`` the map's stride in pixels of the image.
- The encoder: ``conv_in`` keeps the image's sides; each down block but the last ends in a ``Downsample2D`` that pads
  one at the end of each axis, then convolves 3 x 3 with stride 2: level ``i``'s map is the image floor-halved ``i``
  times, stride ``2 ** i``; its mid block on the last level's map.
- The decoder: its mid block attends over the latent, at stride ``2 ** (L - 1)`` (L levels); up block ``j`` attends
  before its up-sampling, on the latent doubled ``j`` times, stride ``2 ** (L - 1 - j)``: pixels of the image it
  decodes.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_record_diffusers_images import _attention_maps

import vitmad
from conftest import grid_centres, sharpened, statistics_reference

diffusers = pytest.importorskip("diffusers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # float32 flash-MAD against float64 on the same q and k; atol in pixels
STAT_TOL = {"rtol": 1e-5, "atol": 1e-6}
STATS = ["entropy", "prefix_mass"]
LEVELS = 3


def _sharp(model: torch.nn.Module, scale: float = 8.0) -> torch.nn.Module:
    """Every Linear redrawn, each attention's query projection ``scale`` times larger: far from uniform over a
    group-normed map."""
    model = sharpened(model)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "processor"):
                module.to_q.weight.mul_(scale)
    return model


def _autoencoder(down=("AttnDownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                 up=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D")):
    torch.manual_seed(0)
    return _sharp(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=down, up_block_types=up, block_out_channels=(8, 16, 16),
        latent_channels=4, norm_num_groups=4, layers_per_block=1))


def _halved(sides, times: int) -> tuple[int, int]:
    for _ in range(times):
        sides = tuple(n // 2 for n in sides)
    return tuple(sides)


def _layers(model, sides) -> dict[str, tuple[tuple[int, int], float]]:
    """``{layer name: (map sides, stride)}`` in the order the forward runs them (encoder, then decoder)."""
    latent = _halved(sides, LEVELS - 1)
    layers = {}
    for i, block in enumerate(model.encoder.down_blocks):
        for r in range(len(getattr(block, "attentions", ()))):
            layers[f"encoder.down_blocks.{i}.attentions.{r}"] = (_halved(sides, i), float(2 ** i))
    layers["encoder.mid_block.attentions.0"] = (latent, float(2 ** (LEVELS - 1)))
    layers["decoder.mid_block.attentions.0"] = (latent, float(2 ** (LEVELS - 1)))
    for j, block in enumerate(model.decoder.up_blocks):
        for r in range(len(getattr(block, "attentions", ()))):
            doubled = tuple(n * 2 ** j for n in latent)
            layers[f"decoder.up_blocks.{j}.attentions.{r}"] = (doubled, float(2 ** (LEVELS - 1 - j)))
    return layers


def _check(call, tokens_call, layers, maps) -> None:
    """Each layer's MAD (mean and per token) and statistics equal the reference from its spied probabilities."""
    assert sorted(call.layers) == sorted(layers)
    for name, probabilities in zip(layers, maps, strict=True):
        sides, stride = layers[name]
        index = call.layers.index(name)
        expected = statistics_reference(probabilities, grid_centres(sides, stride))
        assert probabilities.shape[-1] == math.prod(sides)
        assert float(expected["entropy"].mean()) < 0.7 * math.log(probabilities.shape[-1]), name  # far from uniform
        torch.testing.assert_close(tokens_call.per_layer[index].double(), expected["mad"], **TOL)
        torch.testing.assert_close(call.per_layer[index].double(), expected["mad"].mean(-1), **TOL)
        for stat in STATS:
            torch.testing.assert_close(tokens_call.statistics[stat][index].double(), expected[stat], **STAT_TOL)
        geometry = call.geometry[index]
        assert geometry.grid == sides and geometry.stride == (stride, stride)


def _record(model, run):
    with torch.no_grad():
        with vitmad.record(model, stats=STATS) as rec:
            recorded = run()
        with vitmad.record(model, stats=STATS, reduction="none") as tokens:
            run()
    return rec, tokens, recorded


def _check_forward(monkeypatch, model, run, layers) -> None:
    """One recorded ``run()`` of ``model``: its output unchanged by recording, one call, each layer of ``layers``
    equal to the reference from the probabilities spied in a plain run."""
    maps, plain = _attention_maps(monkeypatch, run)
    rec, tokens, recorded = _record(model, run)
    assert torch.equal(plain, recorded)
    assert len(rec.calls) == 1
    _check(rec.calls[0], tokens.calls[0], layers, maps)


def _mid_blocks(latent) -> dict[str, tuple[tuple[int, int], float]]:
    """The encoder's and decoder's mid-block attention of a two-level autoencoder: the latent, 2 px cells."""
    return {"encoder.mid_block.attentions.0": (latent, 2.0), "decoder.mid_block.attentions.0": (latent, 2.0)}


@pytest.mark.parametrize("sides", [(13, 21), (16, 12)], ids=["odd", "even"])
def test_autoencoder_forward_places_encoder_and_decoder_maps(monkeypatch, sides):
    model = _autoencoder()
    x = torch.randn(2, 3, *sides, generator=torch.Generator().manual_seed(1))
    _check_forward(monkeypatch, model, lambda: model(x).sample, _layers(model, sides))


def test_encode_and_decode_alone_are_calls_of_their_own(monkeypatch):
    # Latent diffusion decodes latents without the autoencoder's forward: each encode and decode is an entry of its
    # own, the decoder's maps in pixels of the image it decodes.
    model = _autoencoder()
    x = torch.randn(1, 3, 20, 12, generator=torch.Generator().manual_seed(2))

    def run():
        z = model.encode(x).latent_dist.mode()
        return model.decode(z * 1.5).sample

    maps, plain = _attention_maps(monkeypatch, run)
    rec, tokens, recorded = _record(model, run)
    assert torch.equal(plain, recorded)
    layers = _layers(model, (20, 12))
    encoder = {n: g for n, g in layers.items() if n.startswith("encoder.")}
    decoder = {n: g for n, g in layers.items() if n.startswith("decoder.")}
    assert len(rec.calls) == 2
    _check(rec.calls[0], tokens.calls[0], encoder, maps[:len(encoder)])
    _check(rec.calls[1], tokens.calls[1], decoder, maps[len(encoder):])


def test_decoder_recorded_alone_places_the_latent_at_its_stride(monkeypatch):
    model = _autoencoder()
    z = torch.randn(2, 4, 5, 3, generator=torch.Generator().manual_seed(3))
    maps, plain = _attention_maps(monkeypatch, lambda: model.decoder(z))
    rec, tokens, recorded = _record(model.decoder, lambda: model.decoder(z))
    assert torch.equal(plain, recorded)
    layers = {n.removeprefix("decoder."): g for n, g in _layers(model, (20, 12)).items() if n.startswith("decoder.")}
    _check(rec.calls[0], tokens.calls[0], layers, maps)


def test_classic_processor_merged_heads_equal_its_own_probabilities():
    # AttnProcessor merges batch and heads and computes the softmax itself (get_attention_scores): its probabilities
    # are read and unmerged. Two heads, so that the merge matters.
    from diffusers.models.attention_processor import AttnProcessor

    torch.manual_seed(0)
    model = _sharp(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        layers_per_block=1))
    for attention in (model.encoder.mid_block.attentions[0], model.decoder.mid_block.attentions[0]):
        attention.heads = 2  # 16 channels, two heads of 8 (the processor reads attn.heads)
    model.set_attn_processor(AttnProcessor())
    x = torch.randn(2, 3, 11, 14, generator=torch.Generator().manual_seed(4))
    saved, original = [], diffusers.models.attention_processor.Attention.get_attention_scores

    def spy(self, query, key, attention_mask=None):
        probabilities = original(self, query, key, attention_mask)
        saved.append(probabilities.double().unflatten(0, (-1, self.heads)))
        return probabilities

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers.models.attention_processor.Attention, "get_attention_scores", spy)
        plain = model(x).sample
    rec, tokens, recorded = _record(model, lambda: model(x).sample)
    assert torch.equal(plain, recorded)
    _check(rec.calls[0], tokens.calls[0], _mid_blocks(_halved((11, 14), 1)), saved)
    assert rec.calls[0].geometry[0].heads == 2


def test_vq_model_with_a_spatially_normed_decoder(monkeypatch):
    # MoVQ's decoder (norm_type="spatial") norms each map with the quantized latent: the attention's map unchanged.
    torch.manual_seed(0)
    model = _sharp(diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("AttnUpDecoderBlock2D",) * 2, block_out_channels=(32, 32), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, norm_type="spatial", num_vq_embeddings=16),
        scale=12.0)  # SpatialNorm: 32 groups, and a scale drawn from the latent
    x = torch.randn(1, 3, 17, 24, generator=torch.Generator().manual_seed(5))
    latent = _halved((17, 24), 1)
    layers = _mid_blocks(latent) | {f"decoder.up_blocks.0.attentions.{r}": (latent, 2.0) for r in range(2)}
    layers |= {f"decoder.up_blocks.1.attentions.{r}": (tuple(2 * n for n in latent), 1.0) for r in range(2)}
    _check_forward(monkeypatch, model, lambda: model(x).sample, layers)


def test_asymmetric_autoencoder_with_an_inpainting_mask(monkeypatch):
    # AsymmetricAutoencoderKL's MaskConditionDecoder blends the masked image's features into each up block's map:
    # the maps keep their sides, and its condition encoder (convolutions on the image) holds no attention.
    torch.manual_seed(0)
    model = _sharp(diffusers.AsymmetricAutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, down_block_out_channels=(8, 16),
        up_block_types=("UpDecoderBlock2D",) * 2, up_block_out_channels=(8, 16), layers_per_down_block=1,
        layers_per_up_block=1, latent_channels=4, norm_num_groups=4))
    x = torch.randn(1, 3, 14, 10, generator=torch.Generator().manual_seed(7))
    mask = (torch.rand(1, 1, 14, 10, generator=torch.Generator().manual_seed(8)) > 0.5).float()
    _check_forward(monkeypatch, model, lambda: model(x, mask=mask).sample, _mid_blocks(_halved((14, 10), 1)))


def test_attention_run_outside_its_network_is_refused():
    model = _autoencoder()
    with torch.no_grad(), vitmad.record(model, layers=["decoder.mid_block.attentions.0"]):
        with pytest.raises(ValueError, match="conv_in made its map"):
            model.decoder.mid_block.attentions[0](torch.randn(1, 16, 3, 5))


@pytest.mark.parametrize("net", ["vae", "unet"])
def test_a_block_run_by_hand_after_its_networks_forward_is_refused(net):
    # After a forward, a block run by hand on a map of the user's found the ended forward's last map, was placed at
    # its stride and joined that finished call (QA 370). The network's map ends with its forward.
    generator = torch.Generator().manual_seed(3)
    if net == "vae":
        model, block = _autoencoder(), "encoder.mid_block.attentions.0"
        x, own_map = torch.randn(1, 3, 16, 12, generator=generator), torch.randn(1, 16, 4, 3, generator=generator)
        run = lambda: model.encode(x)  # noqa: E731
        by_hand = lambda: model.encoder.mid_block(own_map)  # noqa: E731
    else:
        model, block = _unet(), "down_blocks.0.attentions.0"
        x, own_map = torch.randn(1, 4, 8, 6, generator=generator), torch.randn(1, 8, 8, 6, generator=generator)
        run = lambda: model(x, torch.tensor([3]))  # noqa: E731
        by_hand = lambda: model.down_blocks[0].attentions[0](own_map)  # noqa: E731
    with torch.no_grad(), vitmad.record(model) as rec:
        run()
        layers = list(rec.layers)
        assert block in layers
        with pytest.raises(ValueError, match=re.escape(block) + r" .*or after the forward of \w+ ended \(which "
                                                                   r"ends its map\)"):
            by_hand()
        run()  # the next forward is recorded as the first was
    assert [call.layers for call in rec.calls] == [layers, layers]
    torch.testing.assert_close(rec.calls[0].per_layer, rec.calls[1].per_layer, rtol=0, atol=0)


def test_temporal_decoder_is_refused_by_name():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLTemporalDecoder(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(32, 32),
        latent_channels=4, layers_per_block=2)  # its norms' 32 groups; its mid block attends from 2 layers on
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match="TemporalDecoder .decoder., Stable Video Diffusion's decoder"):
            model.decode(z, num_frames=2)
    # Its encoder is the image autoencoders' own, and is placed as theirs.
    with torch.no_grad(), vitmad.record(model, layers=["encoder.mid_block.attentions.0"]) as rec:
        model.encode(torch.randn(1, 3, 8, 8))
    assert rec.calls[0].geometry[0].grid == (4, 4) and rec.calls[0].geometry[0].stride == (2.0, 2.0)


def _small_autoencoder():
    torch.manual_seed(0)
    return _sharp(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        layers_per_block=1))


class _Img2Img(torch.nn.Module):
    """A user's step: encode, one denoising step of a UNet2DModel (or a DiT) on the latent, decode."""

    def __init__(self, net: torch.nn.Module | None):
        super().__init__()
        self.vae, self.net = _small_autoencoder(), net

    def forward(self, x):
        z = self.vae.encode(x).latent_dist.mode()
        if isinstance(self.net, diffusers.DiTTransformer2DModel):
            z = z - self.net(z, timestep=torch.tensor([5]), class_labels=torch.tensor([1])).sample[:, :4]
        else:
            z = z - self.net(z, torch.tensor([5])).sample
        return self.vae.decode(z).sample


def _unet():
    torch.manual_seed(1)
    return sharpened(diffusers.UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8))


def _dit():
    torch.manual_seed(1)
    return sharpened(diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, patch_size=2,
        norm_num_groups=1, num_embeds_ada_norm=1000, out_channels=8))


@pytest.mark.parametrize("net", [_unet, _dit], ids=["unet", "dit"])
def test_a_step_holding_an_autoencoder_and_a_denoiser_is_one_call_per_forward(net):
    # QA 361: the UNet's forward started each call, so the second forward's encoder joined the first's call (and a
    # DiT beside the decoder split them the other way); beside a DiT the autoencoder was left out by default, listed
    # nowhere. Each forward is one call of all three nets' layers, each as the net recorded alone gives it.
    model = _Img2Img(net()).eval()
    images = [torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    with torch.no_grad(), vitmad.record(model) as rec:
        for x in images:
            model(x)
    alone = {}
    for part in ("vae", "net"):
        with torch.no_grad(), vitmad.record(getattr(model, part)) as own:
            for x in images:
                model(x)
        alone |= {(i, f"{part}.{name}"): values for i, call in enumerate(own.calls)
                  for name, values in zip(call.layers, call.per_layer, strict=True)}
    assert len(rec.calls) == 2
    for i, call in enumerate(rec.calls):
        assert call.layers[0] == "vae.encoder.mid_block.attentions.0"
        assert call.layers[-1] == "vae.decoder.mid_block.attentions.0"
        assert len(call.layers) > 2 and all(n.startswith("net.") for n in call.layers[1:-1])
        for name, values in zip(call.layers, call.per_layer, strict=True):
            part_call = i if name.startswith("net.") else 2 * i + name.startswith("vae.decoder.")
            torch.testing.assert_close(values, alone[part_call, name], rtol=0, atol=0)


class _TextToImageStep(torch.nn.Module):
    """A user's img2img step as a Stable Diffusion pipeline runs it: a CLIP text encoder (causal), encode, one step
    of a UNet2DConditionModel conditioned on the text, decode."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(2)
        self.text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=50, hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=1))
        self.vae = _small_autoencoder()
        self.unet = sharpened(diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, attention_head_dim=4,
            norm_num_groups=4))

    def forward(self, x, ids):
        text = self.text_encoder(ids).last_hidden_state
        z = self.vae.encode(x).latent_dist.mode()
        z = z - self.unet(z, torch.tensor([3]), encoder_hidden_states=text).sample
        return self.vae.decode(z).sample


def test_a_step_with_a_text_encoder_beside_its_unet_records_the_diffusers_nets_by_default():
    # No patch convolution names a tower (a UNet and a VAE embed with conv_in): every attention was taken, and the
    # text encoder's causal attention refused the whole step (QA 370), where beside a DiT it is left out. The nets'
    # layers, as named in layers=.
    model = _TextToImageStep().eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 50, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(x, ids)
    with torch.no_grad(), vitmad.record(model, layers=["vae.*", "unet.*"]) as named:
        model(x, ids)
    assert len(rec.calls) == 1 and rec.layers == named.layers and rec.skipped == named.skipped
    assert rec.layers[0] == "vae.encoder.mid_block.attentions.0" and any(n.startswith("unet.") for n in rec.layers)
    torch.testing.assert_close(rec.per_layer, named.per_layer, rtol=0, atol=0)


class _LatentViT(torch.nn.Module):
    """A user's latent ViT: timm's PatchEmbed and Blocks at the module's root (no tower prefix), on the latent of a
    diffusers VAE it holds."""

    def __init__(self):
        super().__init__()
        timm = pytest.importorskip("timm")
        self.vae = _small_autoencoder()
        torch.manual_seed(3)
        self.patch_embed = timm.layers.PatchEmbed(img_size=8, patch_size=2, in_chans=4, embed_dim=16)
        self.blocks = torch.nn.Sequential(*[timm.models.vision_transformer.Block(16, 2) for _ in range(2)])

    def forward(self, x):
        return self.blocks(self.patch_embed(self.vae.encode(x).latent_dist.mode()))


def test_a_users_own_attention_beside_a_vae_is_kept_by_default():
    # Only a text encoder beside the nets is left out: a first version kept the diffusers nets' layers alone, and the
    # user's latent ViT beside its VAE was dropped, listed nowhere (QA 371).
    model = sharpened(_LatentViT())
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(x)
    assert rec.layers == ["vae.encoder.mid_block.attentions.0", "blocks.0.attn", "blocks.1.attn"]
    with torch.no_grad(), vitmad.record(model, layers=["blocks.*"]) as blocks:
        model(x)
    # With the VAE, the image is the VAE's: its latent cells are 2 px; alone, the blocks are in latent pixels.
    assert [g.stride for g in rec.geometry] == [(2.0, 2.0), (4.0, 4.0), (4.0, 4.0)]
    assert [g.stride for g in blocks.geometry] == [(2.0, 2.0)] * 2
    torch.testing.assert_close(torch.stack(rec.per_layer[1:]), 2 * blocks.mad, rtol=1e-6, atol=0)


class _LinearLatentDiT(torch.nn.Module):
    """A user's latent transformer with no convolution: 2 x 2 latent patches through a Linear, a class-label
    embedding named ``shared`` (as T5's token embedding is), two timm blocks."""

    def __init__(self):
        super().__init__()
        timm = pytest.importorskip("timm")
        torch.manual_seed(4)
        self.patchify, self.shared = torch.nn.Linear(16, 16), torch.nn.Embedding(10, 16)
        self.blocks = torch.nn.Sequential(*[timm.models.vision_transformer.Block(16, 2) for _ in range(2)])

    def forward(self, z, label):
        patches = torch.nn.functional.unfold(z, 2, stride=2).transpose(1, 2)  # [B, 16 patches, 4 x 2 x 2]
        return self.blocks(self.patchify(patches) + self.shared(label)[:, None])


def test_a_users_module_with_an_embedding_named_as_a_text_encoders_is_kept():
    # Only a library's text model counts as a text encoder: the user's transformer was dropped, listed nowhere, even
    # with its layout given (QA 372).
    model = torch.nn.ModuleDict({"vae": _small_autoencoder(), "dit": sharpened(_LinearLatentDiT())}).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def run():
        return model["dit"](model["vae"].encode(x).latent_dist.mode(), torch.tensor([3]))

    layout = {"patch": 2, "grid": (4, 4), "num_prefix_tokens": 0}
    with torch.no_grad(), vitmad.record(model, layers=["dit.*"], **layout) as alone:
        run()
    with torch.no_grad(), vitmad.record(model, **layout) as rec:
        run()
    assert rec.layers == ["vae.encoder.mid_block.attentions.0", "dit.blocks.0.attn", "dit.blocks.1.attn"]
    torch.testing.assert_close(torch.stack(rec.per_layer[1:]), alone.mad, rtol=0, atol=0)


class _OwnTextThenUNet(torch.nn.Module):
    """A user's step: a causal text encoder of the user's own (not a library's, so kept by default), then a UNet."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.token_embedding = torch.nn.Embedding(20, 16)
        self.text = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.unet = _unet()

    def forward(self, ids, z):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        self.text(self.token_embedding(ids), src_mask=mask, is_causal=True)
        return self.unet(z, torch.tensor([5])).sample


def test_a_users_own_causal_text_encoder_is_refused_naming_layers():
    # Kept by default (it is no library's text model), its causal attention refuses the step; the refusal says
    # how to leave it out (QA 373: it named no way out).
    model = _OwnTextThenUNet().eval()
    ids, z = torch.randint(0, 20, (1, 5)), torch.randn(1, 4, 8, 8)
    with torch.no_grad(), vitmad.record(model), pytest.raises(ValueError, match=(
            r"text\.self_attn \(MultiheadAttention\) runs causal attention .* if it is not the image tower's \(a text "
            r"encoder or language model beside it\), leave it out with layers=\[the layers to record\]")):
        model(ids, z)
    with torch.no_grad(), vitmad.record(model, layers=["unet.*"]) as rec:
        model(ids, z)
    assert rec.layers and all(name.startswith("unet.") for name in rec.layers)


def test_consistency_decoder_vae_encode_and_each_decoder_step_are_calls():
    # ConsistencyDecoderVAE: the image autoencoders' Encoder, then a UNet2DModel that decodes in steps. encode alone
    # is a call, and so is each step of the UNet (QA 361: the second encode joined the last decoder step's call).
    torch.manual_seed(0)
    model = diffusers.ConsistencyDecoderVAE(
        encoder_block_out_channels=(8, 16), encoder_down_block_types=("DownEncoderBlock2D",) * 2,
        encoder_layers_per_block=1, encoder_norm_num_groups=4, decoder_add_attention=True,
        decoder_block_out_channels=(32, 32), decoder_down_block_types=("DownBlock2D",) * 2,
        decoder_up_block_types=("UpBlock2D",) * 2, decoder_layers_per_block=1, decoder_norm_num_groups=8).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(model) as rec:
        for _ in range(2):
            z = model.encode(x).latent_dist.mode()
            model.decode(z, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    encoder, unet = ["encoder.mid_block.attentions.0"], ["decoder_unet.mid_block.attentions.0"]
    assert [call.layers for call in rec.calls] == [encoder, unet, unet] * 2
    assert rec.calls[0].geometry[0].grid == (8, 8) and rec.calls[0].geometry[0].stride == (2.0, 2.0)


def test_a_subclass_of_the_encoder_is_placed_as_the_encoder(monkeypatch):
    # QA 361: a subclass of diffusers' Encoder (research code's) was not read as one: its attention was left out by
    # default, listed nowhere, and refused when named. Its blocks are the Encoder's, read per call.
    from diffusers.models.autoencoders.vae import Encoder

    class MyEncoder(Encoder):
        pass

    model = _small_autoencoder()
    mine = MyEncoder(in_channels=3, out_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                     block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, double_z=True)
    mine.load_state_dict(model.encoder.state_dict())
    model.encoder = mine.eval()
    x = torch.randn(1, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    _check_forward(monkeypatch, model, lambda: model(x).sample, _mid_blocks(_halved((12, 10), 1)))


def test_a_processor_not_read_is_refused_naming_the_autoencoder():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class MyProcessor(AttnProcessor2_0):
        pass

    model = _small_autoencoder()
    model.set_attn_processor(MyProcessor())
    with torch.no_grad(), vitmad.record(model):
        with pytest.raises(ValueError, match=r"its processor is MyProcessor, .* set it back with "
                                             r"vae\.set_attn_processor\(AttnProcessor2_0\(\)\)"):
            model(torch.randn(1, 3, 8, 8))


def test_a_vit_beside_an_autoencoder_keeps_its_own_calls_and_layers():
    # A REPA-style module: a timm ViT encoder beside a VAE. Without layers=, the ViT that embeds the image is the one
    # recorded (QA 362: the VAE's layers were taken too, and the model's forward became the start of every call, so
    # three runs of the ViT alone were one call of six layers).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)

    class Repa(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
            self.vae = _small_autoencoder()

        def forward(self, x):
            return self.encoder(x), self.vae.encode(x).latent_dist.mode()

    model = Repa().eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(x)
        for _ in range(3):
            model.encoder(x)
    assert [call.layers for call in rec.calls] == [["encoder.blocks.0.attn", "encoder.blocks.1.attn"]] * 4
    with torch.no_grad(), vitmad.record(model.encoder) as alone:
        model.encoder(x)
    torch.testing.assert_close(rec.calls[-1].per_layer[0], alone.calls[0].per_layer[0], rtol=0, atol=0)


def test_parts_of_a_step_run_alone_are_calls_of_their_own():
    # A DiT and a VAE in a user's step: encode alone and the DiT alone each start a call (QA 362: the DiT's start was
    # taken to be the VAE's first convolution, so encode left an empty call before each, and DiT runs merged); so
    # too two UNets of one step (a ControlNet beside its UNet), each run alone.
    model = _Img2Img(_dit()).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    dit_layers = ["net.transformer_blocks.0.attn1", "net.transformer_blocks.1.attn1"]
    with torch.no_grad(), vitmad.record(model) as rec:
        for _ in range(2):
            model.vae.encode(x)
        for _ in range(2):
            model.net(z, timestep=torch.tensor([5]), class_labels=torch.tensor([1]))
    assert [call.layers for call in rec.calls] == [["vae.encoder.mid_block.attentions.0"]] * 2 + [dit_layers] * 2

    class TwoNets(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.control, self.unet = _unet(), _unet()

        def forward(self, z):
            return self.unet(z + self.control(z, torch.tensor([5])).sample, torch.tensor([5])).sample

    step = TwoNets().eval()
    with torch.no_grad(), vitmad.record(step) as rec:
        step(z)
        step.control(z, torch.tensor([5]))
        step.unet(z, torch.tensor([5]))
    names = [[n.split(".")[0] for n in call.layers] for call in rec.calls]
    assert [sorted(set(call)) for call in names] == [["control", "unet"], ["control"], ["unet"]]

    class OneNetTwice(torch.nn.Module):  # as MultiControlNetModel([net, net]) holds it: one call per forward
        def __init__(self):
            super().__init__()
            self.nets = torch.nn.ModuleList([step.unet, step.unet])

        def forward(self, z):
            return sum(net(z, torch.tensor([5])).sample for net in self.nets)

    twice = OneNetTwice().eval()
    with torch.no_grad(), vitmad.record(twice) as rec:
        twice(z)
        twice.nets[0](z, torch.tensor([5]))  # alone: a call of its own (QA 365: it joined the forward's)
    assert [len(call.layers) for call in rec.calls] == [8, 4]
