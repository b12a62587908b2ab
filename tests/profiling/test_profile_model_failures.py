"""A size the model's own forward cannot run is said in one line naming the option, not as a shape error from
deep inside the model (QA 330): transformers' LeViT at another size than its config's, Swin on an image whose
map at native resolution is smaller than its window, a user's module fed a tensor it refuses. A failure of
vitmad's own, where the model runs alone, keeps its traceback; a batch after one that ran is not blamed on the
size. Tiny random-weight models built from configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vitmad
from vitmad.profiling import engine
from vitmad.profiling.options import OptionError

transformers = pytest.importorskip("transformers")


def _save_levit(folder):
    torch.manual_seed(0)
    config = transformers.LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                                      depths=[1, 1, 1], key_dim=[8, 8, 8])
    transformers.LevitModel(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)


def _image(path, height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_a_size_the_hf_model_cannot_run_is_refused_naming_image_size_and_no_checkpoint_is_left(tmp_path):
    """LeViT's attention biases are sized for its config's 64 px: at 96 px its own forward fails (a shape error
    in the first batch, naming nothing, before). At 64 px it runs."""
    _save_levit(tmp_path / "levit")
    image = _image(tmp_path / "a.png", 40, 50)
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(OptionError, match=r"^image_size: LevitModel \(hf:.*levit\) does not run at 96x96 px: its own "
                                          r"forward, without vitmad, fails with RuntimeError: .*; use its own size, or "
                                          r"one it takes$") as caught:
        vitmad.profile(f"hf:{tmp_path / 'levit'}", [image], image_size=96, checkpoint=checkpoint)
    assert isinstance(caught.value.__cause__, RuntimeError)  # the recorded forward's error, kept as the cause
    assert not checkpoint.exists()
    profile = vitmad.profile(f"hf:{tmp_path / 'levit'}", [image], image_size=64)
    assert profile.count == 1 and torch.isfinite(profile.mad[:, 0]).all()  # (NaN: heads a layer has not)


def test_an_image_the_model_cannot_run_at_native_resolution_is_named(tmp_path):
    """HF Swin shrinks its window to a map side smaller than the window, but keeps the window's relative position
    bias: its own forward fails there. At native resolution the image that fails is named with its size. (A Swin
    that runs is refused at native resolution for its strides, after the first batch.)"""
    torch.manual_seed(0)
    folder = tmp_path / "swin"
    transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                   num_heads=[1, 2], window_size=4)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    thin = _image(tmp_path / "thin.png", 64, 48, seed=1)
    with pytest.raises(OptionError, match=r"^image_size: SwinModel \(hf:.*swin\) does not run .*thin\.png at native "
                                          r"resolution \(\d+x\d+ px\): its own forward, without vitmad, fails with "
                                          r"RuntimeError: .*; give a fixed size$"):
        vitmad.profile(f"hf:{folder}", [thin], image_size="native")


class _SizedBlock(torch.nn.Module):
    """A ViT-like module that asserts its input is 32x32 px, as models with a fixed position table do."""

    def __init__(self):
        super().__init__()
        self.patch_embed = torch.nn.Conv2d(3, 8, 8, 8)
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        assert x.shape[-2:] == (32, 32), f"input must be 32x32, got {tuple(x.shape[-2:])}"
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).view(x.shape[0], -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_a_pixel_tensor_the_module_refuses_is_said_of_images():
    with pytest.raises(OptionError, match=r"^images: _SizedBlock does not run the pixel tensor's first batch "
                                          r"\(shape \[2, 3, 40, 40\]\): its own forward, without vitmad, fails with "
                                          r"AssertionError: input must be 32x32, got \(40, 40\)$"):
        vitmad.profile(_SizedBlock().eval(), torch.randn(2, 3, 40, 40))
    profile = vitmad.profile(_SizedBlock().eval(), torch.randn(2, 3, 32, 32))
    assert profile.count == 2 and torch.isfinite(profile.mad).all()


def test_a_failure_of_vitmads_own_is_raised_as_it_is(monkeypatch):
    """The model runs alone: the error is vitmad's, and stays the error raised (its traceback is the one to read)."""
    def failing(plan, state, batch):
        raise RuntimeError("recording failed")

    monkeypatch.setattr(engine, "_run_batch", failing)
    with pytest.raises(RuntimeError, match=r"^recording failed$"):
        vitmad.profile(_SizedBlock().eval(), torch.randn(2, 3, 32, 32))


def test_a_batch_failing_after_one_that_ran_is_not_blamed_on_the_size():
    """One size for the whole run, and a batch of it ran: the size is not the cause, and is not named."""
    class FailsOnSecond(_SizedBlock):
        def forward(self, x):
            if x.amax() > 100:
                raise RuntimeError("values out of range")
            return super().forward(x)

    pixels = torch.randn(4, 3, 32, 32)
    pixels[2:] += 1000
    with pytest.raises(RuntimeError, match=r"^values out of range$"):
        vitmad.profile(FailsOnSecond().eval(), pixels, batch_size=2)


class _FailsAlone(_SizedBlock):
    """Raises ``error`` in its own forward, at any size."""

    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def forward(self, x):
        super().forward(x)  # attention, then the error
        raise self.error


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 123456789 bytes."),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("vitmad.record: Block is being recorded and thread 'A' is inside a forward of it"),
], ids=["cpu_allocation", "cublas_allocation", "vitmads_own"])
def test_a_failed_allocation_or_vitmads_own_refusal_is_not_blamed_on_the_size(error):
    """A batch too large for the CPU's memory (a plain RuntimeError from the allocator) was said as the model not
    running at its size, and vitmad's refusal of a model another thread records as the model's own failure, worded
    "without vitmad" (QA 336). Both are raised as they are."""
    with pytest.raises(RuntimeError) as caught:
        vitmad.profile(_FailsAlone(error).eval(), torch.randn(2, 3, 32, 32))
    assert caught.value is error


def test_a_packed_video_run_is_not_asked(monkeypatch):
    """A packed tower's clips are sized by its video processor, not by an option of the run: its failure is raised
    as it is (the check read an attribute its feed has not, and an AttributeError hid the error, QA 336)."""
    from vitmad.profiling.model_failure import own_forward_refusal
    from vitmad.profiling.packed_videos import PackedVideoFeed

    class Plan:  # what own_forward_refusal reads of a run: a packed-video feed and a model that would fail alone
        native = object.__new__(PackedVideoFeed)
        settings = {"image_size": None}

        class loaded:  # noqa: N801
            module, spec = _FailsAlone(RuntimeError("shape")), None

            @staticmethod
            def forward(pixels):
                raise RuntimeError("shape")

    error = RuntimeError("The size of tensor a (36) must match the size of tensor b (16)")
    assert own_forward_refusal(Plan, (torch.zeros(1, 2, 3, 8, 8), ["clip.mp4"], []), error, ran_before=False) is None
