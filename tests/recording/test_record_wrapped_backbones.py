"""A backbone inside a user's module records as it does bare, whatever the module declares or runs beside it (QA
334): a strided head declared before the backbone (never run) was taken for the patch embedding (torchvision's
ViT, DINOv3) or its stride counted into the stage strides (torchvision's Swin and MaxViT, transformers' MobileViT);
a CNN branch run on the image before the backbone had its strides counted (MaxViT, MobileViT). Each family is
checked against its eager attention in its own tests; held, it must give the very same recording. Still refused,
not guessed: a plain layout's (torchvision's ViT, DINOv3) head declared first, which is a convolution of kernel ==
stride as a patch embedding is (a search for the embedding nearest the layers took a pooling convolution of the
tower for it, QA 340); a hybrid's stem beside such a branch (a walk back from the embedding took a residual
shortcut for a step, QA 338); a second tower's layers on the first's grid. Tiny random-weight models built from
configs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitmad

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

SIZE = 64


def _torchvision_vit():
    return torchvision.models.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32)


def _torchvision_swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                              window_size=[4, 4])


def _torchvision_maxvit():
    return torchvision.models.MaxVit(input_size=(SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[8, 16],
                                     block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0)


def _mobilevit():
    return transformers.MobileViTModel(transformers.MobileViTConfig(
        image_size=SIZE, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32]))


def _dinov3():
    return transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        image_size=SIZE, patch_size=16, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2))


def _dpt_hybrid():
    bit = transformers.BitConfig(global_padding="same", layer_type="bottleneck", depths=[1, 1, 1], num_groups=4,
                                 out_features=["stage1", "stage2", "stage3"], embedding_size=16,
                                 hidden_sizes=[16, 32, 64])
    return transformers.DPTModel(transformers.DPTConfig(
        is_hybrid=True, hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
        image_size=SIZE, backbone_featmap_shape=[1, 64, 4, 4], neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16, backbone_config=bit))


class _HeadFirst(nn.Module):
    """A strided head declared before the backbone, never run (its declaration order alone matters)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.head = nn.Conv2d(32, 3, 2, stride=2)
        self.backbone = backbone

    def forward(self, pixels):
        return self.backbone(pixels)


class _CnnBeside(nn.Module):
    """A strided CNN branch declared first and run on the same image before the backbone."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.cnn = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, 2, 1))
        self.backbone = backbone

    def forward(self, pixels):
        return self.cnn(pixels), self.backbone(pixels)


# (A plain layout's head first, and a hybrid beside a CNN: refused, below.)
CASES = [(build, wrapper) for build in (_torchvision_vit, _torchvision_swin, _torchvision_maxvit, _mobilevit, _dinov3,
                                        _dpt_hybrid) for wrapper in (_HeadFirst, _CnnBeside)
         if (build, wrapper) not in ((_dpt_hybrid, _CnnBeside), (_torchvision_vit, _HeadFirst), (_dinov3, _HeadFirst))]


@pytest.mark.parametrize("build, wrapper", CASES, ids=lambda f: f.__name__.strip("_"))
def test_a_backbone_in_a_users_module_records_as_bare(build, wrapper):
    torch.manual_seed(0)
    backbone = build().eval()
    held = wrapper(backbone).eval()
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), vitmad.record(backbone) as bare:
        backbone(pixels)
    with torch.no_grad(), vitmad.record(held) as rec:
        held(pixels)
    assert bare.layers and rec.layers == [f"backbone.{name}" for name in bare.layers] and rec.skipped == bare.skipped
    assert [(g.grid, g.stride) for g in rec.geometry] == [(g.grid, g.stride) for g in bare.geometry]
    assert len(rec.per_layer) == len(bare.per_layer)
    assert all(torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)) for a, b in zip(rec.per_layer, bare.per_layer))
    assert torch.equal(rec.mad.nan_to_num(-1), bare.mad.nan_to_num(-1))


@pytest.mark.parametrize("build", [_torchvision_vit, _dinov3], ids=["torchvision_vit", "dinov3"])
def test_a_plain_layouts_head_declared_first_is_refused_not_guessed(build):
    torch.manual_seed(0)
    held = _HeadFirst(build().eval()).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"the patch embedding head had not run in this call"):
        with vitmad.record(held):
            held(torch.randn(1, 3, SIZE, SIZE))


def test_a_hybrid_beside_a_cnn_branch_is_refused_not_guessed():
    torch.manual_seed(0)
    held = _CnnBeside(_dpt_hybrid().eval()).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"the strided modules before the patch embedding of "
                                                          r"_CnnBeside do not make one chain of maps"):
        with vitmad.record(held):
            held(torch.randn(1, 3, SIZE, SIZE))


class _Tower(nn.Module):
    """A plain ViT's parts registered as the user's module's own children: a patch embedding and blocks."""

    def __init__(self, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        q, k = self.q(x).unflatten(-1, (2, 8)).transpose(1, 2), self.k(x).unflatten(-1, (2, 8)).transpose(1, 2)
        return x + torch.nn.functional.scaled_dot_product_attention(q, k, k).transpose(1, 2).flatten(2)


def test_a_second_tower_registered_between_the_firsts_parts_stays_refused():
    """The first tower's patch embedding and blocks are the module's own children, a second tower (its own patch
    embedding) registered between them: the second tower's layers come first, and its embedding was taken for the
    whole model's, the first tower's layers placed on its 2 x 8 grid, silently (QA 338). Refused, as before."""
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = _Tower(16)
            self.tower_b = torchvision.models.VisionTransformer(image_size=SIZE, patch_size=32, num_layers=1,
                                                                num_heads=2, hidden_dim=16, mlp_dim=32)
            self.blocks = nn.ModuleList([_Block(), _Block()])

        def forward(self, x):
            tokens = self.patch_embed(x)
            for block in self.blocks:
                tokens = block(tokens)
            return self.tower_b(x), tokens

    model = TwoTowers().eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"lies in tower_b, which embeds the image with its own "
                                                          r"patch embedding \(tower_b\.conv_proj\), but would be "
                                                          r"placed on the grid of patch_embed\.proj"):
        with vitmad.record(model):
            model(torch.randn(1, 3, SIZE, SIZE))


def test_a_patch_embedding_registered_after_the_blocks_is_kept_over_a_convolution_registered_first():
    """A strided convolution registered before the blocks (run on their output) and the patch embedding after
    them: the named projection stays the embedding (QA 338: the scoped search took the first convolution)."""
    class LateEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(16, 16, 2, stride=2)
            self.blocks = nn.ModuleList([_Block(), _Block()])
            self.patch_embed = _Tower(16)

        def forward(self, x):
            tokens = self.patch_embed(x)
            for block in self.blocks:
                tokens = block(tokens)
            return self.down(tokens.transpose(1, 2).unflatten(-1, (4, 4)))

    model = LateEmbedding().eval()
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixels)
    assert [(g.grid, g.stride) for g in rec.geometry] == [((4, 4), (16.0, 16.0))] * 2
    probabilities, tokens = [], model.patch_embed(pixels)
    with torch.no_grad():
        for block in model.blocks:
            q = block.q(tokens).unflatten(-1, (2, 8)).transpose(1, 2).double()
            k = block.k(tokens).unflatten(-1, (2, 8)).transpose(1, 2).double()
            probabilities.append((q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1))
            tokens = block(tokens)
    expected = torch.stack([vitmad.mad_reference(p, 16, num_prefix_tokens=0, grid=(4, 4)) for p in probabilities])
    torch.testing.assert_close(rec.mad.double(), expected, rtol=1e-5, atol=1e-4)
