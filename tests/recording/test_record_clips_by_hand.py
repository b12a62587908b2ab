"""vitmad.record on video transformers written by hand: a clip [B, T, 3, H, W] embedded frame by frame by a Conv2d,
then divided space-time attention (time over [B*N, T, C], space over [B*T, 1 + N, C]).

Where the clip has as many frames as each frame has patches, a layer over time has the shape of a layer over a
frame's grid: it was placed on the grid, 7-10 px where the spatial MAD is 0 (QA 423). Such a model is refused by
default; the spatial layers named in layers= are recorded. The reference is each layer's own softmax, recorded by the
module itself, placed on the 4 x 4 grid of 4 px patches written here, the class token without a position.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitmad

TOL = {"rtol": 1e-5, "atol": 1e-4}  # pixels
BATCH, DIM, HEADS, PATCH, SIDE = 2, 16, 2, 4, 16  # a 4 x 4 grid of 4 px patches


class Attention(nn.Module):
    """Self-attention with an explicit softmax, keeping its last probabilities for the reference."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.seen = None

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (DIM // HEADS) ** -0.5).softmax(-1)
        self.seen = attn.detach()
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, DIM))


class DividedSpaceTime(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.time = nn.ModuleList(Attention() for _ in range(2))
        self.space = nn.ModuleList(Attention() for _ in range(2))

    channels_last = False  # [B, T, H, W, 3]

    def forward(self, clip):  # [B, T, 3, H, W]
        if self.channels_last:
            clip = clip.permute(0, 1, 4, 2, 3)
        b, t = clip.shape[:2]
        tokens = self.patch_embed(clip.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, N, C]
        n = tokens.shape[1]
        tokens = tokens.reshape(b, t, n, DIM)
        for time, space in zip(self.time, self.space):
            over_time = tokens.permute(0, 2, 1, 3).reshape(b * n, t, DIM)
            tokens = tokens + time(over_time).reshape(b, n, t, DIM).permute(0, 2, 1, 3)
            frames = torch.cat([self.cls_token.expand(b * t, 1, DIM), tokens.reshape(b * t, n, DIM)], 1)
            tokens = tokens + space(frames)[:, 1:].reshape(b, t, n, DIM)
        return tokens


def _grid_mad(attn: torch.Tensor) -> torch.Tensor:
    """[B', H] MAD of probabilities over the class token and the 4 x 4 grid, in float64."""
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * PATCH
    patches = attn.double()[..., 1:, 1:]
    return (patches * torch.cdist(centres, centres)).sum(-1).mean(-1)


def _model() -> DividedSpaceTime:
    torch.manual_seed(0)
    model = DividedSpaceTime().eval()
    with torch.no_grad():  # attention far from uniform
        for module in model.modules():
            if isinstance(module, Attention):
                module.qkv.weight.mul_(4)
    return model


@pytest.mark.parametrize("form", ["positional", "keyword", "channels last", "grid given"])
def test_a_clip_with_as_many_frames_as_patches_is_refused_and_its_spatial_layers_recorded_when_named(form):
    model = _model()
    clip = torch.randn(BATCH, 16, 3, SIDE, SIDE)  # 16 frames, 16 patches per frame
    options = {"grid": [4, 4], "patch": PATCH, "num_prefix_tokens": 1} if form == "grid given" else {}
    model.channels_last = form == "channels last"
    with pytest.raises(ValueError, match=r"time\.0 \(Attention\) of DividedSpaceTime: DividedSpaceTime embeds its "
                                         r"input clip as 16 frames \(or slices\), as many as this layer's tokens "
                                         r"\(a frame's 4x4 patches and extra tokens\?\)"):
        with torch.no_grad(), vitmad.record(model, **options):
            if form == "keyword":
                model(clip=clip)
            else:
                model(clip.permute(0, 1, 3, 4, 2) if model.channels_last else clip)
    model.channels_last = False
    with torch.no_grad(), vitmad.record(model, layers=["space.*"], num_prefix_tokens=1) as rec:
        model(clip)
    assert rec.layers == ["space.0", "space.1"]
    expected = torch.stack([_grid_mad(model.space[i].seen) for i in range(2)])  # [2, B*T, H]: each frame an image
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


def test_a_clip_of_another_frame_count_refuses_its_layers_over_time_as_before():
    model = _model()
    clip = torch.randn(BATCH, 8, 3, SIDE, SIDE)  # 8 frames: the layers over time attend over 2 x 16 sequences
    with pytest.raises(ValueError, match=r"time\.0 \(Attention\) of DividedSpaceTime: it attends over 32 sequences, "
                                         r"but the patch embedding patch_embed embedded 16 images"):
        with torch.no_grad(), vitmad.record(model):
            model(clip)
    with torch.no_grad(), vitmad.record(model, layers=["space.*"], num_prefix_tokens=1) as rec:
        model(clip)
    expected = torch.stack([_grid_mad(model.space[i].seen) for i in range(2)])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


class KeyFrame(nn.Module):
    """An image ViT given a clip, run on its middle frame: no frames folded into the batch."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList(Attention() for _ in range(2))

    def forward(self, clip):
        tokens = self.patch_embed(clip[:, clip.shape[1] // 2]).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(tokens), 1, DIM), tokens], 1)
        for block in self.blocks:
            tokens = tokens + block(tokens)
        return tokens


def test_a_model_embedding_one_frame_of_a_clip_is_an_image_model():
    """QA 427: a model given a 16-frame clip that embeds its middle frame alone (4 x 4 patches) was refused as a
    clip of as many frames as patches: the frames per sample were read from the input's size, not from the images
    the patch embedding took."""
    torch.manual_seed(0)
    model = KeyFrame().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                module.qkv.weight.mul_(4)
        with vitmad.record(model, num_prefix_tokens=1) as rec:
            model(torch.randn(BATCH, 16, 3, SIDE, SIDE))
    assert rec.layers == ["blocks.0", "blocks.1"]
    expected = torch.stack([_grid_mad(block.seen) for block in model.blocks])
    torch.testing.assert_close(rec.mad.double(), expected, **TOL)


def test_a_clip_model_of_a_librarys_attention_modules_is_refused_alike():
    """QA 429 review: the clip rule was lifted for every layer inside a library's module, so a user's divided space-time
    model built of timm's blocks was placed on the grid at as many frames as patches, silently. Only a
    library module holding both the patch embedding and the layer (X-CLIP's vision tower) lays out the tokens."""
    timm = pytest.importorskip("timm")
    model = _model()
    model.time = nn.ModuleList(timm.models.vision_transformer.Block(DIM, HEADS) for _ in range(2))
    model.space = nn.ModuleList(timm.models.vision_transformer.Block(DIM, HEADS) for _ in range(2))
    with pytest.raises(ValueError, match=r"time\.0\.attn \(Attention\) of DividedSpaceTime: DividedSpaceTime embeds "
                                         r"its input clip as 16 frames"):
        with torch.no_grad(), vitmad.record(model.eval()):
            model(torch.randn(BATCH, 16, 3, SIDE, SIDE))


class ClassTokenPerFrame(nn.Module):
    """Divided space-time attention over each frame's class token and 2 x 2 patches: time over [B*(1+N), T, C]."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.time, self.space = Attention(), Attention()

    def forward(self, clip):
        b, t = clip.shape[:2]
        patches = self.patch_embed(clip.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, N, C]
        tokens = torch.cat([self.cls_token.expand(b * t, 1, DIM), patches], 1)  # [B*T, 1+N, C]
        n = tokens.shape[1]
        over_time = tokens.reshape(b, t, n, DIM).transpose(1, 2).reshape(b * n, t, DIM)
        tokens = tokens + self.time(over_time).reshape(b, n, t, DIM).transpose(1, 2).reshape(b * t, n, DIM)
        return tokens + self.space(tokens)


def test_a_clip_with_as_many_frames_as_a_frames_tokens_is_refused():
    """QA 431: with a class token per frame, a clip of as many frames as a frame's tokens (5 frames, 1 + 2 x 2
    tokens) has its layer over time ([B*5, H, 5, 5]) shaped as the frame's: it was placed on the class token and the
    grid, 5.5 px where no pixel MAD exists, since the rule compared the frames with the patches alone."""
    torch.manual_seed(0)
    model = ClassTokenPerFrame().eval()
    with pytest.raises(ValueError, match=r"time \(Attention\) of ClassTokenPerFrame: ClassTokenPerFrame embeds its "
                                         r"input clip as 5 frames \(or slices\), as many as this layer's tokens"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(BATCH, 5, 3, 2 * PATCH, 2 * PATCH))


def test_a_users_block_inside_a_librarys_model_is_laid_out_by_the_user():
    """QA 430: the clip rule was lifted where a library module (a timm VisionTransformer) held both the patch
    embedding and the layer, so a user's divided blocks put in its place were placed on the grid at as many frames
    as patches. A library lays out a layer's tokens only where it defines every module down to it."""
    timm = pytest.importorskip("timm")
    from vitmad.recording.recorder import _laid_out_by_library

    class Divided(nn.Module):
        def __init__(self):
            super().__init__()
            self.time = timm.models.vision_transformer.Block(DIM, HEADS)

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIDE, patch_size=PATCH,
                            embed_dim=DIM, depth=2, num_heads=HEADS)
    embedding = ("patch_embed.proj", vit.patch_embed.proj)
    assert _laid_out_by_library(vit, embedding, "blocks.1.attn")
    vit.blocks[0] = Divided()
    assert not _laid_out_by_library(vit, embedding, "blocks.0.time.attn")
    assert _laid_out_by_library(vit, embedding, "blocks.1.attn")
    wrapper = nn.Sequential(vit)  # a library's model inside a wrapper still lays out its tokens (QA 432)
    assert _laid_out_by_library(wrapper, ("0.patch_embed.proj", vit.patch_embed.proj), "0.blocks.1.attn")


class TimeClassToken(DividedSpaceTime):
    """Its layers over time attend over a temporal class token and the T frames of a cell: [B*N, 1+T, C]."""

    def forward(self, clip):
        b, t = clip.shape[:2]
        tokens = self.patch_embed(clip.flatten(0, 1)).flatten(2).transpose(1, 2)
        n = tokens.shape[1]
        over_time = tokens.reshape(b, t, n, DIM).transpose(1, 2).reshape(b * n, t, DIM)
        over_time = torch.cat([self.cls_token.expand(b * n, 1, DIM), over_time], 1)
        attended = self.time[0](over_time)[:, 1:].reshape(b, n, t, DIM).transpose(1, 2).reshape(b * t, n, DIM)
        frames = torch.cat([self.cls_token.expand(b * t, 1, DIM), tokens + attended], 1)
        return self.space[0](frames)


def test_a_layer_over_time_with_a_class_token_of_its_own_is_refused():
    """QA 432: the rule compared the frames with the layer's tokens only, so a layer over time with a temporal class
    token ([B*16, 17] for 16 frames of 4 x 4 patches, the spatial layer's shape) was placed on the grid, 7.6 px where
    it attends across one cell's frames. Frames as many as a frame's patches refuse every layer, as before."""
    model = _model()
    model.__class__ = TimeClassToken
    with pytest.raises(ValueError, match=r"time\.0 \(Attention\) of TimeClassToken: TimeClassToken embeds its input "
                                         r"clip as 16 frames \(or slices\), as many as the 4x4 patches of each"):
        with torch.no_grad(), vitmad.record(model):
            model(torch.randn(BATCH, 16, 3, SIDE, SIDE))
