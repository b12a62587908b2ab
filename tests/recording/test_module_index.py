"""The shared module walks of the recorder's setup (python/vitmad/recording/module_index.py).

Setting up ``vitmad.record`` asks every family's finder and placer about the module tree; before the walks were
shared, a ViT took dozens of full walks (one per family and two per attention module: about 30 ms for a
ViT-S/16, paid per ``with vitmad.record(model)``). These tests count walks instead of timing them: within
``shared_walks`` a root is walked once, outside it every call walks afresh, and a whole recorder setup walks the
model's root at most twice (its construction and its hook installation).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vitmad
from vitmad.recording.module_index import module_list, named_module_list, shared_walks

timm = pytest.importorskip("timm")


def _count_walks(module: nn.Module) -> list[int]:
    """Makes ``module.named_modules()`` (which ``modules()`` calls) count its calls from outside; returns the
    counter (one element)."""
    calls = [0]
    walk = module.named_modules

    def counted(*args, **kwargs):
        if not args:  # a walk from the root (modules() passes a keyword), not a parent's recursion (positional)
            calls[0] += 1
        return walk(*args, **kwargs)

    module.named_modules = counted
    return calls


def _tree() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))


def test_one_walk_per_root_inside_the_block():
    model = _tree()
    calls = _count_walks(model)
    with shared_walks():
        first = named_module_list(model)
        assert named_module_list(model) is first
        assert module_list(model) == [m for _, m in first]
        with shared_walks():  # a nested block shares the outer one's walks
            assert named_module_list(model) is first
    assert calls[0] == 1
    assert [name for name, _ in first] == [name for name, _ in model.named_modules()]


def test_walks_afresh_outside_the_block():
    """Nothing outlives the block: a module added afterwards is seen by the next walk."""
    model = _tree()
    with shared_walks():
        before = module_list(model)
    model.append(nn.Tanh())
    after = module_list(model)
    assert len(after) == len(before) + 1 and isinstance(after[-1], nn.Tanh)
    calls = _count_walks(model)
    module_list(model)
    named_module_list(model)
    assert calls[0] == 2


def test_each_root_has_its_own_walk():
    model = _tree()
    with shared_walks():
        inner = module_list(model[1])
        whole = module_list(model)
    assert inner == list(model[1].modules()) and whole == list(model.modules())


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "swin_tiny_patch4_window7_224", "pit_ti_224",
                                  "crossvit_tiny_240"])
def test_recorder_setup_walks_the_model_at_most_twice(name):
    """Construction and hook installation each walk the root once, whatever the number of attention modules and
    families. (That the recordings are right with the shared walks is what every family's test against the
    model's eager attention checks.)"""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    calls = _count_walks(model)
    recording = vitmad.record(model)
    with recording:
        assert calls[0] <= 2, calls[0]
        image = torch.randn(1, 3, *model.default_cfg["input_size"][1:])
        with torch.no_grad():
            model(image)
    assert recording.mad.shape[0] == len(recording.layers) > 0
