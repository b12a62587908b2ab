"""A backbone inside a user's module records as it does bare, whatever the module declares or runs beside it (QA
334): a strided head declared before the backbone (never run) was taken for the patch embedding (torchvision's
ViT, DINOv3) or its stride counted into the stage strides (torchvision's Swin and MaxViT, transformers' MobileViT);
a CNN branch run on the image before the backbone broke the chain of maps a hybrid's stem is followed by
(DPT-hybrid), or its strides were counted (MaxViT, MobileViT). Each family is checked against its eager attention
in its own tests; held, it must give the very same recording. Tiny random-weight models built from configs."""

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


@pytest.mark.parametrize("build", [_torchvision_vit, _torchvision_swin, _torchvision_maxvit, _mobilevit, _dinov3,
                                   _dpt_hybrid], ids=lambda b: b.__name__.strip("_"))
@pytest.mark.parametrize("wrapper", [_HeadFirst, _CnnBeside], ids=["head_first", "cnn_beside"])
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
