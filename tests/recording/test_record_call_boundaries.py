"""Where vitmad.record's calls begin and end when the recorded layers run outside the method that runs the tower.

A call starts where the tower embeds an image (its first convolution on the image's channels) and holds the recorded
layers that run until the next start. A predictor that runs the tower in one method and the recorded layers in
another, after the first has returned (sam2's ``SAM2VideoPredictor``: ``forward_image``, then the memory attention),
left that start's call empty when the method ended; an empty call whose forward had ended was dropped (a forward
that raised between its tower and its layers must leave no call), and the layers then joined the call before it:
every tracked frame's memory attention in one call (transformers' ``Sam3Model`` too, its DETR encoder run on the
``vision_embeds`` of ``get_vision_features``, where rec.calls was read between the two). Each image the tower embeds
now keeps its call for the layers that follow, the call listed once a layer joins it.

References: each attention's float64 probabilities from the q and k the model computes (the synthetic tracker's
own projections of the tokens its layers receive, sam2's and transformers' as their tests read them), the tokens
placed by the geometry written here (the synthetic tracker's: the row-major 4 x 6 grid of its 8 px patch
convolution, each token at its cell's centre, given to vitmad as ``positions=``). A user's module holding two towers
(timm, transformers and vit_pytorch ViTs) is held to each tower's own softmax (timm's unfused path, transformers'
eager attention function, vit_pytorch's ``nn.Softmax``), its tokens a class token, then the same row-major grid.
"""

from __future__ import annotations

import copy
import importlib
import math
import os

import numpy
import pytest
import torch
from torch import nn
from torch.nn import functional

import vitmad
from conftest import eager_attention_calls, sharpened, unfused_maps

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels; float32 q and k
PATCH, GRID, DIM, HEADS = 8, (4, 6), 8, 2
FRAMES = 3


class _Attention(nn.Module):
    """Multi-head self-attention through SDPA, with a residual: the layer after it still sees the position code."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))

    def heads(self, projection: nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
        return projection(tokens).unflatten(-1, (HEADS, DIM // HEADS)).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.heads(projection, tokens) for projection in (self.q, self.k, self.v))
        return tokens + functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class _Tracker(nn.Module):
    """A frame encoder (an 8 px patch convolution, which starts vitmad's calls, plus a position code) and a
    two-layer memory over its tokens, run by two methods one after the other, as sam2's predictor runs
    ``forward_image``, then its memory attention; ``forward`` runs both."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.memory = nn.Sequential(_Attention(), _Attention())
        # Head h reads cos and sin of w_h r and w_h c: its scores 9 (cos(w_h dr) + cos(w_h dc)) / 2 make each token
        # attend to its neighbours, far from uniform.
        rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
        rows, cols = rows.reshape(-1, 1).float(), cols.reshape(-1, 1).float()
        code = [torch.cat([(w * rows).cos(), (w * rows).sin(), (w * cols).cos(), (w * cols).sin()], -1)
                for w in (0.5, 1.0)]
        self.register_buffer("code", 3 * torch.cat(code, -1))

    def encode(self, frame: torch.Tensor) -> torch.Tensor:
        return self.patch(frame).flatten(2).transpose(1, 2) + self.code

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.memory(tokens)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        return self.attend(self.encode(frame))


def _tracker() -> _Tracker:
    torch.manual_seed(0)
    model = _Tracker().eval()
    with torch.no_grad():
        model.patch.weight.normal_(std=0.05)
        for layer in model.memory:
            layer.q.weight.copy_(torch.eye(DIM))
            layer.k.weight.copy_(torch.eye(DIM))
    return model


def _frames() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=generator) for _ in range(FRAMES)]


def _centres() -> torch.Tensor:
    """Token ``(r, c)`` of the row-major grid at ``((r + 0.5) 8, (c + 0.5) 8)`` pixels."""
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    return (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * PATCH


def _mad(probabilities: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` of ``[B, H, N, N]`` probabilities over the grid."""
    return (probabilities * torch.cdist(_centres(), _centres())).sum(-1).mean(-1)


def _reference(model: _Tracker, frame: torch.Tensor) -> list[torch.Tensor]:
    """``[1, H]`` MAD of each memory layer on ``frame``, in float64 from the q and k its projections make of the
    tokens it receives (read by a pre-hook in a plain run)."""
    inputs = []
    handles = [layer.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach())) for layer in
               model.memory]
    with torch.no_grad():
        model.attend(model.encode(frame))
    for handle in handles:
        handle.remove()
    mads = []
    for layer, tokens in zip(model.memory, inputs, strict=True):
        q = tokens.double() @ layer.q.weight.double().T
        k = tokens.double() @ layer.k.weight.double().T
        q, k = (x.unflatten(-1, (HEADS, DIM // HEADS)).transpose(1, 2) for x in (q, k))
        probabilities = (q @ k.transpose(-2, -1) / math.sqrt(DIM // HEADS)).softmax(-1)
        uniform = _mad(torch.full_like(probabilities, 1 / probabilities.shape[-1]))
        assert (uniform - _mad(probabilities)).abs().min() > 3.0  # far from uniform
        mads.append(_mad(probabilities))
    return mads


def _check(call, references: list[list[torch.Tensor]]) -> None:
    """One call holds ``references``' runs of the memory, each with its layers' MADs."""
    layers = ["memory.0", "memory.1"]
    assert call.layers == layers * len(references)
    for recorded, expected in zip(call.mad, [mad for run in references for mad in run], strict=True):
        torch.testing.assert_close(recorded.double(), expected, **TOL)


@pytest.mark.parametrize("runs", [1, 2])
@pytest.mark.parametrize("read_between", [False, True])
def test_each_frame_is_a_call_when_its_layers_run_after_the_encoder_returned(runs, read_between):
    """Each frame's memory (run once, or twice as per tracked object) is that frame's call; reading rec.calls
    between the encoder and the memory (which lists no call for the frame yet) changes nothing. The calls were
    one, holding every frame's layers."""
    model, frames = _tracker(), _frames()
    references = [_reference(model, frame) for frame in frames]
    with torch.no_grad():
        plain = [model(frame) for frame in frames]
    outputs = []
    with torch.no_grad(), vitmad.record(model, layers=["memory.*"], positions=_centres()) as rec:
        for index, frame in enumerate(frames):
            tokens = model.encode(frame)
            if read_between:
                assert len(rec.calls) == index
            outputs.extend(model.attend(tokens) for _ in range(runs))
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs[::runs], strict=True))
    assert len(rec.calls) == FRAMES
    for call, reference in zip(rec.calls, references, strict=True):
        _check(call, [reference] * runs)


def test_a_frame_encoded_without_its_layers_is_no_call():
    """A frame whose memory does not run (sam2's clicked frame) is no entry, and the next frame's layers are that
    frame's call, not the skipped one's."""
    model, frames = _tracker(), _frames()
    with torch.no_grad(), vitmad.record(model, layers=["memory.*"], positions=_centres()) as rec:
        model.encode(frames[0])
        model.attend(model.encode(frames[1]))
        model.encode(frames[2])
    assert len(rec.calls) == 1
    _check(rec.calls[0], [_reference(model, frames[1])])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_memory_that_raised_is_taken_back_and_its_retry_joins_its_frame(error):
    """The second layer of frame 1's memory raised (out of memory, Ctrl-C): the first layer's entry is taken back,
    and the retry, which no encoder run precedes (sam2 reads the frame's cached features), is frame 1's call, not
    frame 0's."""
    model, frames = _tracker(), _frames()

    def fail(*_):
        raise error("out of memory")

    with torch.no_grad(), vitmad.record(model, layers=["memory.*"], positions=_centres()) as rec:
        model.attend(model.encode(frames[0]))
        tokens = model.encode(frames[1])
        hook = model.memory[1].register_forward_pre_hook(fail)
        with pytest.raises(error):
            model.attend(tokens)
        hook.remove()
        assert len(rec.calls) == 1
        model.attend(tokens)
    assert len(rec.calls) == 2
    for call, frame in zip(rec.calls, frames[:2], strict=True):
        _check(call, [_reference(model, frame)])


def test_the_forward_holding_both_is_a_call_per_frame():
    """Run by the model's own forward, as before: one call per forward."""
    model, frames = _tracker(), _frames()
    with torch.no_grad(), vitmad.record(model, layers=["memory.*"], positions=_centres()) as rec:
        for frame in frames:
            model(frame)
    assert len(rec.calls) == FRAMES
    for call, frame in zip(rec.calls, frames, strict=True):
        _check(call, [_reference(model, frame)])


def _jpeg_frames(folder: str, count: int) -> str:
    """``count`` 96 x 120 JPEG frames, ``<index>.jpg`` as sam2 reads them."""
    image = pytest.importorskip("PIL.Image")
    pixels = numpy.random.default_rng(0).integers(0, 256, (count, 96, 120, 3), dtype=numpy.uint8)
    for index, frame in enumerate(pixels):
        image.fromarray(frame).save(os.path.join(folder, f"{index:05d}.jpg"))
    return folder


@pytest.mark.parametrize("objects", [1, 2])
def test_sam2_tracking_records_the_memory_attention_alone_one_call_per_frame(tmp_path, objects):
    """sam2's ``SAM2VideoPredictor`` runs ``forward_image`` (the trunk's patch embedding starts the call) and returns
    before ``_prepare_memory_conditioned_features`` runs the memory attention. Recorded alone, the memory attention
    of the three propagated frames was one call; it is now a call per frame (the clicked frame 0 runs none: no
    entry), each holding its frame's self-attention layers once per object, equal to that frame's reference, also
    with rec.calls read as each frame is yielded."""
    sam2_memory = pytest.importorskip("test_record_sam2_memory")
    video = _jpeg_frames(str(tmp_path), sam2_memory.FRAMES)
    reference = sam2_memory._self_attention_probabilities(video, objects)
    model = sam2_memory._predictor()
    plain = sam2_memory._track(model, video, objects)
    with vitmad.record(model, layers=["memory_attention.*"]) as rec:
        state = model.init_state(video)
        for obj_id, point in list(zip((1, 2), ([30.0, 40.0], [90.0, 70.0]), strict=True))[:objects]:
            model.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id,
                                        points=numpy.array([point], numpy.float32),
                                        labels=numpy.array([1], numpy.int32))
        recorded, seen = [], []
        for _, _, masks in model.propagate_in_video(state):
            recorded.append(masks.clone())
            seen.append(len(rec.calls))
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    assert seen == list(range(sam2_memory.FRAMES))
    assert len(rec.calls) == sam2_memory.FRAMES - 1
    probabilities = iter(reference)
    for call in rec.calls:
        assert call.layers == [name for _ in range(objects) for name in sam2_memory.SELF]
        for i in range(len(call.layers)):
            expected = sam2_memory._expected(next(probabilities), (sam2_memory.MAP, sam2_memory.MAP),
                                             sam2_memory.STRIDE)
            torch.testing.assert_close(call.mad[i].double(), expected["mad"], **sam2_memory.TOL)
    assert next(probabilities, None) is None


def test_transformers_sam2_video_is_a_call_per_frame_through_propagate_in_video_iterator():
    """transformers' ``Sam2VideoModel`` runs each frame through its own forward (``propagate_in_video_iterator``
    calls the model): the memory attention recorded alone is a call per frame (frame 0, the clicked frame, an empty
    one, as every forward of the model is kept), each equal to that frame's eager reference."""
    memory_attention = pytest.importorskip("test_record_memory_attention")
    model, modeling, session_cls = memory_attention._sam2_video()
    reference = memory_attention._eager_self_attention(model, modeling, session_cls)
    model.set_attn_implementation("sdpa")
    frames = memory_attention.FRAMES
    video = torch.randn(frames, 3, memory_attention.SIZE, memory_attention.SIZE,
                        generator=torch.Generator().manual_seed(1))
    session = session_cls(video=video, video_height=memory_attention.SIZE, video_width=memory_attention.SIZE,
                          dtype=torch.float32)
    session.add_point_inputs(session.obj_id_to_idx(1), 0, {"point_coords": torch.tensor([[[[20.0, 30.0]]]]),
                                                            "point_labels": torch.ones(1, 1, 1, dtype=torch.int32)})
    session.obj_with_new_inputs = [1]
    with torch.no_grad(), vitmad.record(model, layers=[memory_attention.SELF]) as rec:
        model(inference_session=session, frame_idx=0)
        seen = [len(rec.calls) for _ in model.propagate_in_video_iterator(session, start_frame_idx=1)]
    assert seen == [2, 3] and len(rec.calls) == frames and rec.calls[0].layers == []
    for call, probabilities in zip(rec.calls[1:], reference, strict=True):
        assert call.layers == [memory_attention.SELF]
        torch.testing.assert_close(call.mad.double(), memory_attention._expected(probabilities)["mad"][None], **TOL)


def test_transformers_sam3_detr_encoder_on_precomputed_vision_features_is_a_call_per_image():
    """``Sam3Model.get_vision_features`` runs the ViT (its patch embedding starts the call) and returns; the model
    called on those ``vision_embeds`` runs its DETR encoder. With rec.calls read between the two, the encoder of
    every image joined one call; each image is now its own, equal to that image's eager reference (the model run on
    its pixels)."""
    detr_encoder = pytest.importorskip("test_record_detr_encoder")
    model = detr_encoder._sam3("Sam3")
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 6, dtype=torch.long)
    generator = torch.Generator().manual_seed(4)
    images = [torch.randn(1, 3, 48, 32, generator=generator) for _ in range(2)]
    modeling = importlib.import_module("transformers.models.sam3.modeling_sam3")
    own = list(model.detr_encoder.layers)
    references = []
    for image in images:
        calls = detr_encoder.eager_attention_calls(modeling, model, pixel_values=image, input_ids=ids,
                                                   attention_mask=mask)
        references.append([detr_encoder._expected(p, (6, 4), 8) for module, p in calls
                           if any(module is layer.self_attn for layer in own)])
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = [model(pixel_values=image, input_ids=ids, attention_mask=mask).pred_masks for image in images]
        with vitmad.record(model, layers=["detr_encoder.*"]) as rec:
            recorded = []
            for index, image in enumerate(images):
                features = model.get_vision_features(pixel_values=image)
                assert len(rec.calls) == index
                recorded.append(model(vision_embeds=features, input_ids=ids, attention_mask=mask).pred_masks)
    assert all(torch.equal(a, b) for a, b in zip(plain, recorded, strict=True))
    assert len(rec.calls) == len(images)
    for call, reference in zip(rec.calls, references, strict=True):
        assert call.layers == [f"detr_encoder.layers.{i}.self_attn" for i in range(2)] and len(reference) == 2
        torch.testing.assert_close(call.mad.double(), torch.stack([e["mad"] for e in reference]), **TOL)


# A user's module holding two towers ----------------------------------------------------------------------------
# Each tower a ViT of 8 px patches on the 32 x 48 image: a class token, then the row-major 4 x 6 grid, the tokens
# given to vitmad as positions= (the class token without one), so that each tower's layers are placed alike.
TOWER_DIM, TOWER_HEADS = 16, 2


def _timm_tower(channels: int = 3) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, embed_dim=TOWER_DIM,
                             num_heads=TOWER_HEADS, patch_size=PATCH, img_size=(GRID[0] * PATCH, GRID[1] * PATCH),
                             in_chans=channels)


def _hf_tower(channels: int = 3) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=(GRID[0] * PATCH, GRID[1] * PATCH), patch_size=PATCH,
                                    num_channels=channels, hidden_size=TOWER_DIM, num_hidden_layers=2,
                                    num_attention_heads=TOWER_HEADS, intermediate_size=2 * TOWER_DIM,
                                    attn_implementation="sdpa")
    return transformers.ViTModel(config, add_pooling_layer=False)


def _vit_pytorch_tower() -> nn.Module:
    vit_pytorch = pytest.importorskip("vit_pytorch")
    return vit_pytorch.ViT(image_size=(GRID[0] * PATCH, GRID[1] * PATCH), patch_size=PATCH, num_classes=5,
                           dim=TOWER_DIM, depth=2, heads=TOWER_HEADS, mlp_dim=2 * TOWER_DIM, dim_head=8)


# kind -> (build, its attention modules' names in the tower)
TOWERS = {
    "timm": (_timm_tower, ["blocks.0.attn", "blocks.1.attn"]),
    "transformers": (_hf_tower, ["layers.0.attention", "layers.1.attention"]),
    "vit_pytorch": (_vit_pytorch_tower, ["transformer.layers.0.0", "transformer.layers.1.0"]),
}


class _TwoTowers(nn.Module):
    """A user's module declaring tower ``a`` before tower ``b`` and running them in ``order``, the towers named in
    ``gray`` on the image's mean over its channels."""

    def __init__(self, a: nn.Module, b: nn.Module, order: str, gray: str = ""):
        super().__init__()
        self.a, self.b, self.order, self.gray = a, b, order, gray

    def run(self, name: str, pixels: torch.Tensor) -> torch.Tensor:
        out = getattr(self, name)(pixels.mean(1, keepdim=True) if name in self.gray else pixels)
        return getattr(out, "last_hidden_state", out)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [self.run(name, pixels) for name in self.order]


def _tower_probabilities(kind: str, tower: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """``[B, H, 25, 25]`` float64 softmax of each attention layer of ``tower`` on ``pixels``, as the tower computes
    it: timm's unfused path (the input of its attn_drop), transformers' eager attention function, vit_pytorch's own
    nn.Softmax."""
    tower = copy.deepcopy(tower)
    if kind == "timm":
        maps = [p for _, p in _run_for(tower, pixels, unfused_maps(tower, "Attention"))]
    elif kind == "transformers":
        modeling = importlib.import_module("transformers.models.vit.modeling_vit")
        maps = [p for _, p in eager_attention_calls(modeling, tower, pixels)]
    else:
        maps = []
        for layer in tower.transformer.layers:
            layer[0].attend.register_forward_hook(lambda _, args, output: maps.append(output))
        with torch.no_grad():
            tower(pixels)
    assert len(maps) == 2
    return [p.detach().double() for p in maps]


def _run_for(tower: nn.Module, pixels: torch.Tensor, maps: list) -> list:
    with torch.no_grad():
        tower(pixels)
    return maps


def _class_and_grid() -> torch.Tensor:
    """The class token without a position, then :func:`_centres`."""
    return torch.cat([torch.full((1, 2), float("nan"), dtype=torch.float64), _centres()])


def _tower_mad(probabilities: torch.Tensor) -> torch.Tensor:
    """``[B, H, 24]``: each grid query's mean distance to the grid's keys (the class token's column weighs nothing),
    per query, so that a token placed at a wrong cell changes its own value."""
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(-1).mean()
    assert entropy < 0.6 * math.log(probabilities.shape[-1])  # far from uniform: a misplaced token would show
    return (probabilities[..., 1:, 1:] * torch.cdist(_centres(), _centres())).sum(-1)


def _check_tower_mad(recorded: torch.Tensor, probabilities: torch.Tensor) -> None:
    """``recorded`` ``[B, H, 25]`` per token (reduction="none"): NaN for the class token, then :func:`_tower_mad`."""
    assert recorded[..., 0].isnan().all()
    torch.testing.assert_close(recorded[..., 1:].double(), _tower_mad(probabilities), **TOL)


def _sharper(tower: nn.Module) -> nn.Module:
    """Query and key projections scaled up (their 16 wide dot products stay near uniform at conftest's std)."""
    with torch.no_grad():
        for name, module in tower.named_modules():
            if name.rpartition(".")[2] in ("qkv", "q_proj", "k_proj", "to_qkv"):
                module.weight.mul_(3.0)
    return tower


def _two_towers(kinds: tuple[str, str], order: str, gray: str = "") -> tuple[_TwoTowers, list[str]]:
    """The wrapper (towers sharpened, those named in ``gray`` built for one channel) and the names of its recorded
    layers, tower a's then tower b's."""
    torch.manual_seed(0)
    a, b = (_sharper(sharpened(TOWERS[kind][0](*((1,) if tower in gray else ())), seed))
            for seed, (tower, kind) in enumerate(zip("ab", kinds, strict=True)))
    names = [f"{tower}.{layer}" for tower, kind in zip("ab", kinds, strict=True) for layer in TOWERS[kind][1]]
    return _TwoTowers(a, b, order, gray).eval(), names


TOWER_PAIRS = [("timm", "transformers"), ("timm", "timm"), ("timm", "vit_pytorch")]


@pytest.mark.parametrize("kinds", TOWER_PAIRS, ids="+".join)
@pytest.mark.parametrize("order", ["ab", "ba"])
def test_a_forward_running_two_towers_is_one_call_in_either_order(kinds, order):
    """A user's module holding two towers that take the image: each forward is one call holding both towers' layers
    in the order they ran, each equal to that tower's own attention. The first convolution in module order (tower
    a's patch embedding) started the calls: run after tower b, it split each forward there, b's layers joining the
    call before (three calls for two forwards, the first b's alone)."""
    model, names = _two_towers(kinds, order)
    generator = torch.Generator().manual_seed(2)
    images = [torch.randn(2, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=generator) for _ in range(2)]
    references = [{tower: _tower_probabilities(kind, getattr(model, tower), pixels)
                   for tower, kind in zip("ab", kinds, strict=True)} for pixels in images]
    with torch.no_grad():
        plain = [model(pixels) for pixels in images]
        with vitmad.record(model, layers=names, positions=_class_and_grid(), reduction="none") as rec:
            recorded = [model(pixels) for pixels in images]
    for expected, got in zip(plain, recorded, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(expected, got, strict=True))
    assert len(rec.calls) == len(images)
    for call, reference in zip(rec.calls, references, strict=True):
        assert call.layers == [name for tower in order for name in names if name.startswith(tower + ".")]
        probabilities = [p for tower in order for p in reference[tower]]
        for recorded_mad, p in zip(call.mad, probabilities, strict=True):
            _check_tower_mad(recorded_mad, p)


@pytest.mark.parametrize("kinds", TOWER_PAIRS, ids="+".join)
def test_towers_run_outside_the_forward_are_a_call_each(kinds):
    """Outside the wrapper's forward each tower run starts a call of its own (its first convolution, vit_pytorch's
    forward where it has none), whichever runs first: b then a, twice, is four calls, none mixing the towers."""
    model, names = _two_towers(kinds, "ab")
    pixels = torch.randn(1, 3, GRID[0] * PATCH, GRID[1] * PATCH, generator=torch.Generator().manual_seed(3))
    references = {tower: _tower_probabilities(kind, getattr(model, tower), pixels)
                  for tower, kind in zip("ab", kinds, strict=True)}
    with torch.no_grad(), vitmad.record(model, layers=names, positions=_class_and_grid(), reduction="none") as rec:
        for _ in range(2):
            model.run("b", pixels)
            model.run("a", pixels)
    assert [call.layers for call in rec.calls] == [names[2:], names[:2]] * 2
    for call, tower in zip(rec.calls, "baba", strict=True):
        for recorded_mad, p in zip(call.mad, references[tower], strict=True):
            _check_tower_mad(recorded_mad, p)


def test_each_tower_is_placed_in_the_pixels_of_the_image_it_takes():
    """A wrapper running a vit_pytorch ViT (16 px patches) on its 64 x 96 input, then a timm ViT (8 px) on the
    input at half size: each on its own layout, no positions= given. The wrapper's forward starts the call, and the
    timm tower's layers took the size of the wrapper's input for their image (its patch embedding's input half of
    it: a stem of stride 2, every distance doubled); the size each tower's start sees is its image."""
    vit_pytorch = pytest.importorskip("vit_pytorch")

    class Resizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _sharper(sharpened(_timm_tower(), 0))
            self.b = _sharper(sharpened(vit_pytorch.ViT(image_size=(64, 96), patch_size=16, num_classes=5,
                                                        dim=TOWER_DIM, depth=2, heads=TOWER_HEADS,
                                                        mlp_dim=2 * TOWER_DIM, dim_head=8), 1))

        def forward(self, pixels):
            return self.b(pixels), self.a(functional.interpolate(pixels, scale_factor=0.5))

    torch.manual_seed(0)
    model = Resizing().eval()
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    references = {"a": _tower_probabilities("timm", model.a, functional.interpolate(pixels, scale_factor=0.5)),
                  "b": _tower_probabilities("vit_pytorch", model.b, pixels)}
    names = ["b.transformer.layers.0.0", "b.transformer.layers.1.0", "a.blocks.0.attn", "a.blocks.1.attn"]
    with torch.no_grad():
        plain = model(pixels)
        with vitmad.record(model, layers=names, reduction="none") as rec:
            recorded = model(pixels)
    assert all(torch.equal(x, y) for x, y in zip(plain, recorded, strict=True))
    assert len(rec.calls) == 1 and rec.layers == names
    assert [g.stride for g in rec.geometry] == [(16.0, 16.0)] * 2 + [(8.0, 8.0)] * 2
    for recorded_mad, p, stride in zip(rec.per_layer, references["b"] + references["a"], (2, 2, 1, 1), strict=True):
        # _tower_mad places the grid at 8 px cells: the 16 px cells of tower b are twice as far apart.
        torch.testing.assert_close(recorded_mad.double(), stride * _tower_mad(p), **TOL)


def test_a_second_tower_is_never_placed_on_the_first_towers_grid():
    """The plain layout reads one patch embedding per recording, the first found: a layer of a second tower that
    embeds the image with its own was placed on the first tower's grid, silently (QA helper-193: two torchvision
    ViTs, one on a resized image; a timm tower beside a transformers one given num_prefix_tokens=). Refused, naming
    the tower to record on its own."""
    torchvision = pytest.importorskip("torchvision")

    def vit(image: int, patch: int):
        torch.manual_seed(image + patch)
        return torchvision.models.VisionTransformer(image_size=image, patch_size=patch, num_layers=1, num_heads=2,
                                                    hidden_dim=16, mlp_dim=32).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = vit(32, 8), vit(16, 4)

        def forward(self, x):
            return self.a(x), self.b(torch.nn.functional.interpolate(x, size=(16, 16)))

    model = Wrapper()
    for layers in (None, ["b.*self_attention"]):
        with pytest.raises(ValueError, match=r"b\.encoder\.layers\.encoder_layer_0\.self_attention lies in b, which "
                                             r"embeds the image with its own patch embedding \(b\.conv_proj\), but "
                                             r"would be placed on the grid of a\.conv_proj"):
            vitmad.record(model, layers=layers)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model.b) as rec:  # as the message says: the tower on its own
        model(pixels)
    with torch.no_grad(), vitmad.record(model.b) as alone:
        model.b(torch.nn.functional.interpolate(pixels, size=(16, 16)))
    torch.testing.assert_close(rec.mad, alone.mad, rtol=0, atol=0)
    assert rec.geometry[0].grid == (4, 4) and rec.geometry[0].stride == (4.0, 4.0)


def test_towers_held_in_a_module_list_are_told_apart():
    """Two ViTs held in one nn.ModuleList (``towers.0``, ``towers.1``) were taken for one tower, the model's child
    ``towers``: the second tower's layers were placed on the first's grid, silently (QA 369: a timm tower's 8 x 8
    grid of 4 px patches read as 49 extra tokens and a 4 x 4 grid of 8 px). Refused as for towers held as
    attributes, naming the entry to record on its own."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    towers = torch.nn.ModuleList([
        torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                             mlp_dim=32),
        torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16,
                                             mlp_dim=32)])

    class ListOfTwo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.towers = towers

        def forward(self, x):
            return [tower(x) for tower in self.towers]

    model = ListOfTwo().eval()
    with pytest.raises(ValueError, match=r"towers\.1\.encoder\.layers\.encoder_layer_0\.self_attention lies in "
                                         r"towers\.1, .* on the grid of towers\.0\.conv_proj, another tower's: .*"
                                         r"not the whole model \(vitmad\.record\(model\.get_submodule\('towers\.0'\)\) "
                                         r"and vitmad\.record\(model\.get_submodule\('towers\.1'\)\)"):
        vitmad.record(model)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), vitmad.record(model.get_submodule("towers.1")) as rec:
        model(pixels)
    assert rec.geometry[0].grid == (8, 8) and rec.geometry[0].stride == (4.0, 4.0)


def test_timm_towers_in_a_module_list_record_the_first_and_skip_the_second():
    """Two timm ViTs in one nn.ModuleList (an RGB tower in towers.0, a depth tower in towers.1) were one tower, the
    whole model, as a hierarchy's stages are (their embeddings' names end in a list index): the recording was
    refused, and so was the one its message advised beside it (QA 378). A list whose embeddings do not chain (each
    takes the image's channels, not the entry before it's) holds towers: the first is recorded, the second skipped
    with the reason, as towers held as attributes are; a recording of towers.1 beside it records that tower."""
    timm = pytest.importorskip("timm")

    def tower(channels: int, image: tuple[int, int], patch: int) -> nn.Module:
        return timm.models.VisionTransformer(img_size=image, patch_size=patch, in_chans=channels, embed_dim=16,
                                             depth=1, num_heads=2, num_classes=0)

    class RgbAndDepth(nn.Module):
        def __init__(self):
            super().__init__()
            self.towers = nn.ModuleList([tower(3, (24, 32), 8), tower(1, (16, 12), 4)])

        def forward(self, rgb, depth):
            return torch.cat([self.towers[0](rgb), self.towers[1](depth)], -1)

    torch.manual_seed(0)
    model = sharpened(RgbAndDepth())
    maps = unfused_maps(model, "Attention")
    rgb, depth = torch.randn(2, 3, 24, 32), torch.randn(2, 1, 16, 12)
    with torch.no_grad():
        model(rgb, depth)
    expected = []
    for (_, probabilities), (grid, patch) in zip(maps, [((3, 4), 8), ((4, 3), 4)]):
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * patch
        patches = probabilities.double()[:, :, 1:, 1:]  # the class token first, without a position
        expected.append((patches * torch.cdist(centres, centres)).sum(-1).mean(-1))
    maps.clear()
    with torch.no_grad(), vitmad.record(model) as whole, vitmad.record(model.get_submodule("towers.1")) as second:
        model(rgb, depth)
    assert whole.layers == ["towers.0.blocks.0.attn"] and second.layers == ["blocks.0.attn"]
    reason = whole.skipped["towers.1.blocks.0.attn"]
    assert "in towers.1, a second tower that embeds the image beside towers.0" in reason
    assert "vitmad.record(model.get_submodule('towers.1'))" in reason
    torch.testing.assert_close(whole.mad[0].double(), expected[0], **TOL)
    torch.testing.assert_close(second.mad[0].double(), expected[1], **TOL)


def test_crops_embedded_first_then_attended_one_by_one_are_refused():
    """A DINO-style multi-crop forward that embeds every crop first, then runs the shared blocks on each: every run
    of the patch embedding started a call, and every layer was placed on the last crop's grid, the global crops'
    3 x 4 patches counted as 9 extra tokens before a 2 x 2 grid (QA 378: 1.8 px where 13.0 px is right), under the
    warning every class token gets. Refused; embedded right before its blocks, each crop is a call on its own grid."""
    timm = pytest.importorskip("timm")

    class MultiCrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, 16, 8, 8)
            self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
            self.blocks = nn.Sequential(*[timm.models.vision_transformer.Block(16, 2) for _ in range(2)])
            self.embed_first = True

        def tokens(self, image):
            patches = self.patch_embed(image).flatten(2).transpose(1, 2)
            return torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], 1)

        def forward(self, crops):
            if self.embed_first:
                return [self.blocks(tokens)[:, 0] for tokens in [self.tokens(crop) for crop in crops]]
            return [self.blocks(self.tokens(crop))[:, 0] for crop in crops]

    torch.manual_seed(0)
    model = sharpened(MultiCrop())
    crops = [torch.randn(2, 3, 24, 32), torch.randn(2, 3, 16, 16)]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\) of MultiCrop: the forward ran patch_embed 2 "
                                         r"times before it \(grids 3x4, 2x2: .* cannot tell which run's tokens"):
        with torch.no_grad(), vitmad.record(model):
            model(crops)
    model.embed_first = False
    maps = unfused_maps(model, "Attention")
    with torch.no_grad():
        model(crops)
    for module, _ in maps:
        module.fused_attn = True
    expected = []
    for (_, probabilities), (grid, patch) in zip(maps, [((3, 4), 8)] * 2 + [((2, 2), 8)] * 2):
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * patch
        expected.append((probabilities.double()[:, :, 1:, 1:] * torch.cdist(centres, centres)).sum(-1).mean(-1))
    with pytest.warns(UserWarning) as said, torch.no_grad(), vitmad.record(model) as rec:
        model(crops)
    messages = " | ".join(str(w.message) for w in said)  # the class token taken to come first; two runs
    assert "MultiCrop attends over 13 tokens" in messages and "ran its recorded layers 2 times" in messages
    assert len(rec.calls) == 2 and [call.layers for call in rec.calls] == [["blocks.0.attn", "blocks.1.attn"]] * 2
    torch.testing.assert_close(rec.calls[0].mad.double(), torch.stack(expected[:2]), **TOL)
    torch.testing.assert_close(rec.calls[1].mad.double(), torch.stack(expected[2:]), **TOL)
    # Crops of one size embedded first (a siamese pair): each run's tokens are placed alike, so it records (QA 380:
    # it was recorded right before the refusal above, and refused with it), every run in the last call.
    model.embed_first = True
    pair = [torch.randn(2, 3, 24, 32), torch.randn(2, 3, 24, 32)]
    for module, _ in maps:
        module.fused_attn = False
    maps.clear()
    with torch.no_grad():
        model(pair)
    for module, _ in maps:
        module.fused_attn = True
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * 8
    expected = [(p.double()[:, :, 1:, 1:] * torch.cdist(centres, centres)).sum(-1).mean(-1) for _, p in maps]
    with pytest.warns(UserWarning) as said, torch.no_grad(), vitmad.record(model) as rec:
        model(pair)
        model(pair)
    assert any("MultiCrop attends over 13 tokens" in str(w.message) for w in said)
    # One call per forward: the first run's call, empty, was left before each, so reading every call's MAD raised
    # (QA 412).
    assert [call.layers for call in rec.calls] == [["blocks.0.attn", "blocks.1.attn"] * 2] * 2
    for call in rec.calls:
        torch.testing.assert_close(call.mad.double(), torch.stack(expected), **TOL)


def test_runs_of_the_patch_embedding_each_attended_in_one_call_are_recorded():
    """QA 382: where the runs of the patch embedding start no call (the model's first convolution, declared before
    it, does not run in eval mode), crops of two sizes each embedded and attended at once were refused as embedded
    first, the first run's grid still counted after its layer had run; and two forwards, one per size, as one forward's
    runs. Each layer is placed on the grid of the run before it."""
    timm = pytest.importorskip("timm")

    class Crops(nn.Module):
        def __init__(self):
            super().__init__()
            self.augment = nn.Conv2d(3, 3, 1)  # the first convolution on the image, run in training mode only
            self.patch_embed = nn.Conv2d(3, 16, 8, 8)
            self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
            self.block = timm.models.vision_transformer.Block(16, 2)

        def forward(self, crops):
            outputs = []
            for crop in crops:
                crop = self.augment(crop) if self.training else crop
                patches = self.patch_embed(crop).flatten(2).transpose(1, 2)
                outputs.append(self.block(torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], 1)))
            return outputs

    torch.manual_seed(0)
    model = sharpened(Crops())
    crops = [torch.randn(2, 3, 24, 32), torch.randn(2, 3, 16, 16)]
    maps = unfused_maps(model, "Attention")
    with torch.no_grad():
        model(crops)
        model(crops[:1])
        model(crops[1:])
    for module, _ in maps:
        module.fused_attn = True
    expected = []
    for (_, probabilities), grid in zip(maps, [(3, 4), (2, 2), (3, 4), (2, 2)]):
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * 8
        expected.append((probabilities.double()[:, :, 1:, 1:] * torch.cdist(centres, centres)).sum(-1).mean(-1))
    with pytest.warns(UserWarning, match="1 extra token"), torch.no_grad(), vitmad.record(model) as rec:
        model(crops)
        model(crops[:1])
        model(crops[1:])
    # (Which call holds which run is not asked here: with no call start run, the forwards share one.)
    assert [g.grid for call in rec.calls for g in call.geometry] == [(3, 4), (2, 2), (3, 4), (2, 2)]
    torch.testing.assert_close(torch.cat([call.mad for call in rec.calls]).double(), torch.stack(expected), **TOL)


def test_a_stage_downsampling_the_first_stages_map_is_no_second_tower():
    """QA 423: a hierarchical ViT of the user's, whose second stage convolves the first stage's map (2 x 2, stride 2,
    over its 16 channels), was refused as holding a second tower "that embeds the image", advising only to record
    each stage alone: the second then measured in cells of the first stage's map, 4x too small, silently; and grid=
    was refused alike. By its channels it cannot be told from a tower on a 16-band image (QA 427), so it is still
    refused, saying what to pass where it is a stage (positions=, which places it right; a grid given by hand could
    not tell a stage from a tower on a 16-band image either, QA 430)."""
    timm = pytest.importorskip("timm")

    class Stage(nn.Module):
        def __init__(self, channels, stride):
            super().__init__()
            self.proj = nn.Conv2d(channels, 16, stride, stride)
            self.attn = timm.models.vision_transformer.Attention(16, 2)

        def forward(self, image):
            x = self.proj(image)
            tokens = x.flatten(2).transpose(1, 2)
            return (tokens + self.attn(tokens)).transpose(1, 2).reshape(x.shape)

    class TwoStages(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([Stage(3, 4), Stage(16, 2)])

        def forward(self, image):
            for stage in self.stages:
                image = stage(image)
            return image

    torch.manual_seed(0)
    model = sharpened(TwoStages())
    maps = unfused_maps(model, "Attention")
    image = torch.randn(2, 3, 32, 32)  # an 8 x 8 grid of 4 px, then 4 x 4 cells of 8 px
    with pytest.raises(ValueError, match=r"stages\.1\.attn lies in stages\.1, which embeds the image .*; if "
                                         r"stages\.1\.proj convolves the map of stages\.0\.proj \(a later stage, not "
                                         r"a tower on an image\), its layers attend over that map's cells: name them "
                                         r"in layers= with positions="):
        with torch.no_grad(), vitmad.record(model):
            model(image)
    maps.clear()
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    centres = (torch.stack([rows, cols], -1).reshape(-1, 2).double() + 0.5) * 8
    with torch.no_grad(), vitmad.record(model, layers=["stages.1.attn"], positions=centres.float()) as rec:
        model(image)
    expected = (maps[1][1].double() * torch.cdist(centres, centres)).sum(-1).mean(-1)
    torch.testing.assert_close(rec.mad[0].double(), expected, **TOL)


def test_a_tower_on_an_image_of_as_many_bands_as_the_first_towers_width_is_a_second_tower():
    """QA 427: a tower on a 16-band image beside an RGB tower 16 wide was taken for a later stage by its channels
    alone (a change reverted the same day): named in layers= with num_prefix_tokens=, its layer was placed on the RGB
    tower's grid, 8 px apart where its patches are 16 px apart, silently. It is refused as a second tower."""
    timm = pytest.importorskip("timm")

    class Tower(nn.Module):
        def __init__(self, channels, patch):
            super().__init__()
            self.patch_embed = nn.Conv2d(channels, 16, patch, patch)
            self.blocks = nn.ModuleList([timm.models.vision_transformer.Block(16, 2)])

        def forward(self, image):
            tokens = self.patch_embed(image).flatten(2).transpose(1, 2)
            return self.blocks[0](tokens)

    class RgbAndBands(nn.Module):
        def __init__(self):
            super().__init__()
            self.rgb, self.bands = Tower(3, 8), Tower(16, 16)

        def forward(self, rgb, bands):
            return self.rgb(rgb).mean(1) + self.bands(bands).mean(1)

    model = RgbAndBands().eval()
    # (A grid given by hand let it through on the RGB tower's stride too, QA 429.)
    for grid in ({}, {"grid": [4, 4]}):
        with pytest.raises(ValueError, match=r"bands\.blocks\.0\.attn lies in bands, which embeds the image with its "
                                             r"own patch embedding \(bands\.patch_embed\)"):
            with torch.no_grad(), vitmad.record(model, layers=["rgb.blocks.0.attn", "bands.blocks.0.attn"],
                                                num_prefix_tokens=0, **grid):
                model(torch.randn(2, 3, 32, 32), torch.randn(2, 16, 64, 64))
