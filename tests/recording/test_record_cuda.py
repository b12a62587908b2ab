"""vitmad.record on a GPU: tiny random-weight ViTs (timm with register tokens, transformers' ViT) run their fused
attention on CUDA in float32, float16 and bfloat16 while the recording computes MAD from their queries and keys
(16-bit on sm_80+ goes to the tensor-core mad_qk kernel). The reference is the float64 definition applied to the
same model's own unfused attention probabilities on the same device, placed by the grid written here. The CUDA
cases are skipped without a CUDA device (benchmarks/gpu_check.sh runs them on one); the CPU cases run anywhere
and keep the test itself honest."""

from __future__ import annotations

import copy

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from test_record_timm import unfused_maps  # noqa: E402

import vitmad  # noqa: E402

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CASES = [("cpu", torch.float32), ("cpu", torch.bfloat16),
         *(pytest.param("cuda", dtype, marks=CUDA) for dtype in (torch.float32, torch.float16, torch.bfloat16))]

# Float32: the recording's float32 logits against the unfused path's float32 softmax (as in test_record_timm).
# 16-bit: the unfused path rounds its probabilities to the model's dtype (a relative 2^-8 for bfloat16, 2^-11 for
# float16) before the reference reads them, while mad_qk keeps float32 from the 16-bit q and k: MAD, a mean of
# those probabilities times distances, moves by at most that relative rounding.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-4},
    torch.float16: {"rtol": 2e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2},
}


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN convolutions (the patch embedding) default to TF32, which would round the float32 inputs of both
    routes differently from run to run of the algorithm search."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("device, dtype", CASES)
def test_timm_vit_with_registers(device, dtype):
    # 16 x 12 patches of 8 pixels, CLS + 4 registers; head size 32 (16-byte rows for the 16-bit kernel's copies).
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=64, num_heads=2,
                              img_size=(128, 96), patch_size=8, reg_tokens=4).eval().to(device, dtype)
    pixels = torch.randn(3, 3, 128, 96, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model) as rec:
            recorded = model(pixels)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=0)
    maps = unfused_maps(model, pixels)
    expected = torch.stack([vitmad.mad_reference(a.double(), 8, num_prefix_tokens=5, grid=[16, 12]) for a in maps])
    assert rec.mad.device.type == device and rec.mad.shape == (2, 3, 2)
    torch.testing.assert_close(rec.mad.double(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("device, dtype", CASES)
def test_transformers_vit(device, dtype):
    # 14 x 14 patches of 16 pixels (N = 197), head size 32; SDPA for the record, eager for the reference.
    config = transformers.ViTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
                                    image_size=224, patch_size=16)
    torch.manual_seed(0)
    sdpa = transformers.ViTModel(config).eval().to(device, dtype)
    assert sdpa.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    with torch.no_grad():
        with vitmad.record(sdpa) as rec:
            sdpa(pixels)
        maps = eager(pixels, output_attentions=True).attentions
    expected = torch.stack([vitmad.mad_reference(a.double(), 16, num_prefix_tokens=1, grid=[14, 14]) for a in maps])
    assert rec.mad.shape == (2, 2, 3)
    torch.testing.assert_close(rec.mad.double(), expected, **TOLERANCE[dtype])


@CUDA
def test_recording_a_vit_on_cuda_waits_for_the_gpu_nowhere():
    """After the first forward has built the grid's layout and copied it to the GPU once, a recorded forward of
    a plain ViT synchronises with the GPU nowhere, in a new recording too: no host-to-device copy of positions or
    indices per layer, no host copy of the positions for their value check (recording/placement.py,
    ``read_only``). torch's sync debug mode turns any synchronising call into an error."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, embed_dim=64, num_heads=2,
                              img_size=(64, 64), patch_size=8).eval().to("cuda")
    pixels = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        with vitmad.record(model) as first:
            model(pixels)
        with vitmad.record(model) as rec:
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(pixels)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(rec.mad, first.mad, rtol=0, atol=0)
    assert rec.mad.shape == (3, 2, 2) and rec.mad.isfinite().all()


def _second_forward_without_waits(model, inputs, **options) -> vitmad.Recording:
    """Records two forwards; the second under torch's sync debug mode "error" (any call that waits for the GPU
    raises, naming itself)."""
    with torch.no_grad(), vitmad.record(model, **options) as rec:
        model(inputs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return rec


@CUDA
def test_recording_swin_on_cuda_waits_for_the_gpu_nowhere_after_its_first_forward():
    """A windowed model builds its windows' positions per call on the host: the recording checks them there and
    copies each distinct set to the GPU once (Recording._to_device), the folds' window orders likewise
    (placement.on_device), so its second forward synchronises nowhere."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(2, 4),
                              embed_dim=32, img_size=112).eval().to("cuda")
    rec = _second_forward_without_waits(model, torch.randn(2, 3, 112, 112, device="cuda"))
    # Stage 1 has 2 heads of the 4: NaN pads them in rec.mad.
    torch.testing.assert_close(rec.calls[1].mad, rec.calls[0].mad, rtol=0, atol=0, equal_nan=True)
    assert rec.mad.shape == (4, 2, 4)


@CUDA
def test_recording_a_video_on_cuda_waits_for_the_gpu_nowhere_after_its_first_forward():
    """A video layer's frames and positions are compared on the host once per layout (recording/recorder.py,
    _trust_same_tokens) rather than by the op in every layer, which copied both to the host."""
    config = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.VideoMAEModel(config).eval().to("cuda")
    rec = _second_forward_without_waits(model, torch.randn(2, 4, 3, 32, 32, device="cuda"))
    torch.testing.assert_close(rec.calls[1].mad, rec.calls[0].mad, rtol=0, atol=0)
    torch.testing.assert_close(rec.calls[1].temporal_mad, rec.calls[0].temporal_mad, rtol=0, atol=0)
    assert rec.temporal_mad.shape == (2, 2, 2) and rec.temporal_mad.isfinite().all()


@CUDA
def test_recording_statistics_and_cls_maps_on_cuda_waits_for_the_gpu_nowhere_after_its_first_forward():
    """The CLS maps need the tokens with a position in every layer: found once per layout (ops/stats_op.py,
    derived_once), not read back from the GPU per layer."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=64, num_heads=2,
                              img_size=(64, 64), patch_size=8, reg_tokens=2).eval().to("cuda")
    stats = ("entropy", "prefix_mass", "self_mass", "prefix_maps")
    rec = _second_forward_without_waits(model, torch.randn(2, 3, 64, 64, device="cuda"), stats=stats)
    assert len(rec.prefix_maps) == 2 and rec.prefix_maps[0].shape == (2, 2, 3, 64)
    torch.testing.assert_close(rec.calls[1].mad, rec.calls[0].mad, rtol=0, atol=0)
