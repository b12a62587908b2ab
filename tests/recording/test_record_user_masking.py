"""A masked encoder written as research code writes it (MAE's random_masking: argsort of random noise, a gather of
the kept patches, the class token after masking) keeps a random subset of the patches in a random order. Where the
count happened to fit the grid (every patch kept but shuffled, for probing; or as many patches dropped as there are
extra tokens) its tokens were placed as the row-major grid, silently, up to 4 px off (QA 337). Now warned, naming the
function (a refusal refused models that draw a random mask kept in place and many more, QA 340); with positions=
(each kept patch's cell) it is placed, against the float64 softmax of each block's own queries and keys placed by
the cells written here. Random numbers without an order drawn from them, or an order without random numbers, are
no sign of it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import vitmad

timm = pytest.importorskip("timm")
from timm.layers import PatchEmbed  # noqa: E402
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

IMG, PATCH, DIM, HEADS = 32, 8, 32, 2
SIDE = IMG // PATCH
CELLS = torch.tensor([((r + 0.5) * PATCH, (c + 0.5) * PATCH) for r in range(SIDE) for c in range(SIDE)],
                     dtype=torch.float64)


def random_masking(x, mask_ratio):
    """MAE's: shuffle by argsort of noise, keep the first ``len_keep``."""
    batch, length, width = x.shape
    keep = int(length * (1 - mask_ratio))
    order = torch.argsort(torch.rand(batch, length), dim=1)
    kept = order[:, :keep]
    return torch.gather(x, 1, kept[..., None].expand(-1, -1, width)), kept


class _MaskedAutoencoder(nn.Module):
    """The MAE repository's layout: timm's PatchEmbed and Blocks in a module of the user's, its masking a method."""

    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(IMG, PATCH, 3, DIM)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, SIDE * SIDE + 1, DIM))
        self.blocks = nn.ModuleList([Block(DIM, HEADS) for _ in range(2)])

    def random_masking(self, x, mask_ratio):  # as a method, as MAE's own class holds it
        batch, length, width = x.shape
        noise = torch.rand(batch, length)
        kept = noise.argsort(dim=1)[:, :int(length * (1 - mask_ratio))]
        return torch.gather(x, 1, kept[..., None].expand(-1, -1, width)), kept

    def forward(self, images, mask_ratio=0.75):
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        x, self.kept = self.masked(x, mask_ratio)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return x

    def masked(self, x, mask_ratio):
        return self.random_masking(x, mask_ratio)


class _HelperMasking(_MaskedAutoencoder):
    """The same, its masking the module-level helper."""

    def masked(self, x, mask_ratio):
        return random_masking(x, mask_ratio)


class _MaskedTimm(VisionTransformer):
    """A timm VisionTransformer whose forward masks (it declares num_prefix_tokens: 1, or 5 with 4 registers)."""

    def forward(self, images, mask_ratio=0.75):
        x = self.patch_embed(images) + self.pos_embed[:, self.num_prefix_tokens:]
        x, self.kept = random_masking(x, mask_ratio)
        extra = [self.cls_token.expand(len(x), -1, -1)]
        if self.reg_token is not None:
            extra.append(self.reg_token.expand(len(x), -1, -1))
        return self.blocks(torch.cat([*extra, x], 1))


def _timm(registers=0):
    return _MaskedTimm(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=HEADS, num_classes=0,
                       reg_tokens=registers)


def _sharpened(model):
    torch.manual_seed(1)
    for block in model.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=0.4)
    nn.init.normal_(model.pos_embed, std=1.0)
    return model.eval()


def _reference(model, inputs, extra):
    """``[L, B, H]`` MAD from each block's own q and k in float64, kept token j at cell ``model.kept[:, j]``."""
    out = []
    for block, x in zip(model.blocks, inputs):
        attention, norm = block.attn, block.norm1
        x = nn.functional.layer_norm(x.double(), norm.normalized_shape, norm.weight.double(), norm.bias.double(),
                                     norm.eps)
        batch, tokens, _ = x.shape
        bias = 0.0 if attention.qkv.bias is None else attention.qkv.bias.double()
        qkv = (x @ attention.qkv.weight.double().T + bias).reshape(
            batch, tokens, 3, attention.num_heads, attention.head_dim)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        probabilities = ((q @ k.transpose(-1, -2)) * attention.head_dim ** -0.5).softmax(-1)[:, :, extra:, extra:]
        per_image = []
        for b in range(batch):
            cells = CELLS[model.kept[b]]
            per_image.append((probabilities[b] * torch.cdist(cells, cells)).sum(-1).mean(-1))
        out.append(torch.stack(per_image))
    return torch.stack(out)


@pytest.mark.parametrize("build, ratio, where", [
    (_HelperMasking, 0.0, "random_masking"),  # every patch kept, shuffled (probing)
    (_HelperMasking, 0.05, "random_masking"),  # 1 + 15 tokens: as many as the grid
    (_MaskedAutoencoder, 0.0, "_MaskedAutoencoder.random_masking"),
    (lambda: _timm(), 0.05, "random_masking"),
], ids=["helper_all_kept", "helper_one_masked", "method", "timm_subclass"])
def test_a_users_random_masking_is_warned_of_and_placed_with_positions(build, ratio, where):
    model = _sharpened(build())
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, vitmad.record(model):
        warnings.simplefilter("always")
        model(images, mask_ratio=ratio)
    said = [str(w.message) for w in caught if "sorts random numbers" in str(w.message)]
    assert len(said) == 1 and f"sorts random numbers ({where}), as MAE-style masking" in said[0]
    assert "pass positions=<[N, 2] pixel position of each token in this call" in said[0]
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for block in model.blocks]

    def kept_cells():  # read at the first recorded layer, after this forward's masking
        return torch.cat([torch.full((len(model.kept), 1, 2), float("nan")), CELLS.float()[model.kept]], 1)

    with torch.no_grad(), vitmad.record(model, positions=kept_cells) as rec:
        model(images, mask_ratio=ratio)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(rec.mad.double(), _reference(model, inputs, 1), rtol=1e-5, atol=1e-4)


class _NoShuffle(_MaskedAutoencoder):
    """Random numbers without an order drawn from them (a random scale in training), and a sort of no random
    numbers: placed as the grid, against its own probabilities."""

    def forward(self, images, mask_ratio=0.0):
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        if self.training:
            x = x * torch.rand(len(x), 1, 1)
        order = torch.sort(torch.arange(x.shape[1])).indices  # the identity
        x = x[:, order]
        self.kept = order.expand(len(x), -1)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return x


def test_random_numbers_or_a_sort_alone_are_no_shuffle():
    model = _sharpened(_NoShuffle())
    images = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for block in model.blocks]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, vitmad.record(model) as rec:
        warnings.simplefilter("always")
        model(images)
    said = [str(w.message) for w in caught]
    assert any("1 extra token" in m for m in said) and not any("sorts random numbers" in m for m in said)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(rec.mad.double(), _reference(model, inputs, 1), rtol=1e-5, atol=1e-4)


def _backbone():
    torch.manual_seed(0)
    return VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=1, num_heads=HEADS).eval()


class _Mixup(nn.Module):
    """Mixup's batch permutation, in training only."""

    def __init__(self):
        super().__init__()
        self.backbone = _backbone()

    def forward(self, x):
        if self.training:
            index = torch.randperm(x.size(0))
            x = 0.7 * x + 0.3 * x[index]
        return self.backbone(x)


class _NoisyTopK(nn.Module):
    """Noise added to the input, then the five best classes of the logits."""

    def __init__(self):
        super().__init__()
        self.backbone = _backbone()

    def forward(self, x):
        x = x + 0.01 * torch.randn_like(x)
        return self.backbone(x).topk(5, dim=-1)


class _CropSorted(nn.Module):
    """A random crop offset, then the predictions sorted."""

    def __init__(self):
        super().__init__()
        self.backbone = _backbone()

    def forward(self, x):
        offset = int(torch.randint(0, 1, ()))
        return torch.sort(self.backbone(x[..., offset:offset + IMG, :IMG]).softmax(-1), descending=True)


@pytest.mark.parametrize("wrapper", [_Mixup, _NoisyTopK, _CropSorted], ids=lambda w: w.__name__.strip("_"))
def test_random_numbers_used_otherwise_are_no_shuffle(wrapper):
    """QA 338: three wrappers were refused as shuffling (a randperm under `if self.training`, a sort of values
    computed from a noisy input, a sort beside a random crop offset); the backbone records as bare."""
    model = wrapper().eval()
    pixels = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    with torch.no_grad(), vitmad.record(model.backbone) as bare:
        model.backbone(pixels + 0.01 * torch.randn_like(pixels) if wrapper is _NoisyTopK else pixels)
    torch.manual_seed(5)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, vitmad.record(model) as rec:
        warnings.simplefilter("always")
        model(pixels)
    assert not caught
    assert rec.layers == ["backbone." + name for name in bare.layers]
    torch.testing.assert_close(rec.mad, bare.mad, rtol=0, atol=0)


@pytest.mark.parametrize("spelling", ["uniform", "sort_indices"])
def test_other_spellings_of_sorted_noise_are_warned_of(spelling):
    """QA 338: torch.empty(...).uniform_() then argsort was missed; noise.sort().indices is read too."""
    class Shuffled(_MaskedAutoencoder):
        def random_masking(self, x, mask_ratio):
            batch, length, width = x.shape
            if spelling == "uniform":
                kept = torch.empty(batch, length).uniform_().argsort(dim=1)
            else:
                noise = torch.rand(batch, length)
                kept = noise.sort(dim=1).indices
            return torch.gather(x, 1, kept[..., None].expand(-1, -1, width)), kept

    model = _sharpened(Shuffled())
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, vitmad.record(model):
        warnings.simplefilter("always")
        model(torch.randn(1, 3, IMG, IMG), mask_ratio=0.0)
    assert any("sorts random numbers (Shuffled.random_masking)" in str(w.message) for w in caught)


def test_a_permutation_drawn_at_once_is_not_read():
    """MoCo's batch shuffle (a randperm over the batch, undone after): no warning, the recording as bare (QA 340:
    refused, with a random caption's multinomial and NumPy's permutation of an augmentation list)."""
    class ShuffleBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = _backbone()

        def forward(self, x):
            order = torch.randperm(len(x))
            return self.backbone(x[order])[torch.argsort(order)]

    model = ShuffleBN().eval()
    pixels = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(7)
    order = torch.randperm(3)
    with torch.no_grad(), vitmad.record(model.backbone) as bare:
        model.backbone(pixels[order])
    torch.manual_seed(7)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, vitmad.record(model) as rec:
        warnings.simplefilter("always")
        model(pixels)
    assert not caught
    torch.testing.assert_close(rec.mad, bare.mad, rtol=0, atol=0)
