"""vitmad.record on video transformers: VideoMAE, ViViT, TimeSformer (divided, joint, space-only) and V-JEPA 2.

Tiny random-weight models (weights scaled up so heads differ from uniform attention). The reference is each model's
own eager attention probabilities (``output_attentions=True``, or for TimeSformer, which computes its softmax
itself, the input of its attention dropout), placed by geometry written here: every call's tokens listed as
(frame, row, column) of the tubelet grid in the model's own order, spatial centres ``(index + 0.5) * patch``
pixels, temporal centres ``(frame + 0.5) * tubelet`` frames, the MAD sums computed in float64 and each query's
value put back at its tubelet, (frame, row, column) order.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitmad

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-5, "atol": 1e-4}  # atol in pixels or frames; MADs here are 0.5 to 30
BATCH, FRAMES, IMAGE, PATCH, TUBELET = 2, 4, 32, 8, 2
NAN = float("nan")


def _scaled(model):
    """Random weights large enough that attention is far from uniform (tiny inits give uniform heads)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and any(k in name for k in ("query", "key", "q_proj", "k_proj", "qkv")):
                parameter.normal_(0.0, 0.4)
    return model.eval()


def _build(kind: str, implementation: str = "sdpa"):
    """(model, input keyword, frames) of a tiny video model."""
    t = transformers
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "videomae":
        config = t.VideoMAEConfig(image_size=IMAGE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                                  **common)
        model, argument = t.VideoMAEModel, "pixel_values"
    elif kind == "vivit":
        config = t.VivitConfig(image_size=IMAGE, num_frames=FRAMES, tubelet_size=[TUBELET, PATCH, PATCH], **common)
        model, argument = t.VivitModel, "pixel_values"
    elif kind == "vjepa2":
        config = t.VJEPA2Config(crop_size=IMAGE, patch_size=PATCH, frames_per_clip=FRAMES, tubelet_size=TUBELET,
                                hidden_size=48, num_hidden_layers=2, num_attention_heads=2, pred_hidden_size=32,
                                pred_num_hidden_layers=1, pred_num_attention_heads=2, num_pooler_layers=1)
        model, argument = t.VJEPA2Model, "pixel_values_videos"
    else:  # timesformer_<attention type>
        config = t.TimesformerConfig(image_size=IMAGE, patch_size=PATCH, num_frames=FRAMES,
                                     attention_type=kind.removeprefix("timesformer_"), **common)
        model, argument = t.TimesformerModel, "pixel_values"
    torch.manual_seed(0)
    if model is t.TimesformerModel:  # it computes its softmax itself, with no other implementation
        return _scaled(model(config)), argument
    return _scaled(model._from_config(config, attn_implementation=implementation)), argument


def _video(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, FRAMES, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


# Geometry, written here ------------------------------------------------------------------------------------------

GRID = IMAGE // PATCH  # rows = columns of tubelets
CELLS = [(r, c) for r in range(GRID) for c in range(GRID)]


def _tubelets(frames: int, cells=CELLS):
    return [(f, r, c) for f in range(frames) for r, c in cells]  # (frame, row, column) order


def _call_tokens(kind: str, frames: int, cells=CELLS) -> list[list[tuple]]:
    """Per group of one video's rows of the attention call (videos outermost), its tokens: (frame, row, column) or
    None for a token without a position."""
    if kind in ("videomae", "vjepa2"):
        return [_tubelets(frames, cells)]
    if kind == "vivit":
        return [[None] + _tubelets(frames, cells)]
    if kind == "joint":  # TimeSformer joint_space_time: CLS, then (row, column, frame), frames fastest
        return [[None] + [(f, r, c) for r, c in cells for f in range(frames)]]
    if kind == "time":  # one row per patch position, rows in (row, column) order
        return [[(f, r, c) for f in range(frames)] for r, c in cells]
    if kind == "space":  # one row per frame, each with its own CLS
        return [[None] + [(f, r, c) for r, c in cells] for f in range(frames)]
    raise AssertionError(kind)


def _reference(probabilities: torch.Tensor, kind: str, frames: int, frame_size: int, grid=(GRID, GRID)):
    """Spatial (px) and temporal (frames) MAD per tubelet ``[B, H, frames * rows * columns]`` from one call's
    probabilities ``[B * G, H, n, n]``, float64, on a grid of ``grid`` (rows, columns) tubelets."""
    rows, columns = grid
    groups = _call_tokens(kind, frames, [(r, c) for r in range(rows) for c in range(columns)])
    heads = probabilities.shape[1]
    spatial = torch.full((BATCH, heads, frames * rows * columns), NAN, dtype=torch.float64)
    temporal = spatial.clone()
    p = probabilities.double().view(BATCH, len(groups), heads, *probabilities.shape[-2:])
    for g, tokens in enumerate(groups):
        positioned = [i for i, token in enumerate(tokens) if token is not None]
        for i in positioned:
            f, r, c = tokens[i]
            space_sum = torch.zeros(BATCH, heads, dtype=torch.float64)
            time_sum = torch.zeros(BATCH, heads, dtype=torch.float64)
            for j in positioned:
                g_f, g_r, g_c = tokens[j]
                space = PATCH * ((r - g_r) ** 2 + (c - g_c) ** 2) ** 0.5
                time = abs((f + 0.5) * frame_size - (g_f + 0.5) * frame_size)
                space_sum += p[:, g, :, i, j] * space
                time_sum += p[:, g, :, i, j] * time
            spatial[:, :, (f * rows + r) * columns + c] = space_sum
            temporal[:, :, (f * rows + r) * columns + c] = time_sum
    assert not spatial.isnan().any() and not temporal.isnan().any(), "a tubelet is not a query of this call"
    return spatial, temporal


def _check(rec, expected, grid=(GRID, GRID)):
    """rec (reduction="none") against ``expected``: a list of (kind, probabilities, frames, frame_size)."""
    assert len(rec.layers) == len(expected)
    for index, (kind, probabilities, frames, frame_size) in enumerate(expected):
        spatial, temporal = _reference(probabilities, kind, frames, frame_size, grid)
        torch.testing.assert_close(rec.per_layer[index].double(), spatial, **TOL)
        torch.testing.assert_close(rec.calls[-1].temporal[index].double(), temporal, **TOL)
        geometry = rec.geometry[index]
        assert geometry.grid == grid and geometry.stride == (PATCH, PATCH)
        assert geometry.frames == frames and geometry.frame_stride == frame_size
        assert geometry.attention == {"time": "time", "space": "space"}.get(kind, "space-time")


# Joint space-time attention through AttentionInterface -----------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["videomae", "vivit", "vjepa2"])
def test_joint_space_time_equals_the_mad_of_its_eager_attention(kind, implementation):
    model, argument = _build(kind, implementation)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    video = _video()
    with torch.no_grad():
        plain = model(**{argument: video}).last_hidden_state
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(**{argument: video}).last_hidden_state
        attentions = eager(**{argument: video}, output_attentions=True).attentions
    assert torch.equal(recorded, plain)
    assert len(attentions) == 2 and rec.skipped == {}
    _check(rec, [(kind, a, FRAMES // TUBELET, TUBELET) for a in attentions])
    assert rec.temporal_mad.shape == rec.mad.shape == (2, BATCH, 2, (FRAMES // TUBELET) * GRID * GRID)


def test_mean_is_the_mean_over_the_tubelets_in_space_and_in_time():
    model, argument = _build("videomae")
    video = _video()
    with torch.no_grad(), vitmad.record(model) as mean:
        model(**{argument: video})
    with torch.no_grad(), vitmad.record(model, reduction="none") as tokens:
        model(**{argument: video})
    torch.testing.assert_close(mean.mad, tokens.mad.mean(-1))
    torch.testing.assert_close(mean.temporal_mad, tokens.temporal_mad.mean(-1))
    assert mean.temporal_mad.shape == (2, BATCH, 2)
    # Random, far-from-uniform heads: the temporal MAD lies strictly between 0 and the 2-frame tubelet gap.
    assert ((mean.temporal_mad > 0.05) & (mean.temporal_mad < TUBELET)).all()


# TimeSformer: its own softmax ------------------------------------------------------------------------------------


def _timesformer_probabilities(model) -> list[torch.Tensor]:
    """The softmax output of every TimesformerSelfAttention (its attn_drop's input), in call order."""
    maps = []
    for module in model.modules():
        if type(module).__name__ == "TimesformerSelfAttention":
            module.attn_drop.register_forward_pre_hook(lambda m, args: maps.append(args[0]))
    return maps


@pytest.mark.parametrize("attention_type, kinds", [
    ("divided_space_time", ["time", "space"] * 2),
    ("joint_space_time", ["joint"] * 2),
    ("space_only", ["space"] * 2),
])
def test_timesformer_equals_the_mad_of_its_own_softmax(attention_type, kinds):
    model, argument = _build(f"timesformer_{attention_type}")
    eager = copy.deepcopy(model)
    probabilities = _timesformer_probabilities(eager)
    video = _video()
    with torch.no_grad():
        plain = model(**{argument: video}).last_hidden_state
        with vitmad.record(model, reduction="none") as rec:
            recorded = model(**{argument: video}).last_hidden_state
        eager(**{argument: video})
    assert torch.equal(recorded, plain)
    _check(rec, [(kind, p, FRAMES, 1) for kind, p in zip(kinds, probabilities, strict=True)])
    if attention_type == "divided_space_time":
        assert rec.layers == ["encoder.layer.0.temporal_attention.attention", "encoder.layer.0.attention.attention",
                              "encoder.layer.1.temporal_attention.attention", "encoder.layer.1.attention.attention"]
        # A time call's tokens share their place, a space call's their frame: each one's other MAD is 0.
        assert (rec.mad[0::2] == 0).all() and (rec.temporal_mad[1::2] == 0).all()
        assert (rec.mad[1::2].mean(-1) > 1).all() and (rec.temporal_mad[0::2].mean(-1) > 0.1).all()


@pytest.mark.parametrize("attention_type, kind", [("joint_space_time", "joint"), ("space_only", "space")])
@pytest.mark.parametrize("frames", [3, 6])
def test_timesformer_takes_the_frame_count_of_the_video_where_its_blocks_do(attention_type, kind, frames):
    """The frame count was config.num_frames (4): 2 videos of 6 frames were read as 3 videos of 4 (space_only:
    rec.mad of batch 3, silently), 2 of 3 refused with a message about masked tubelets. TimeSformer's embedding
    interpolates its time embeddings, and these blocks attend over whatever tokens they get."""
    model, argument = _build(f"timesformer_{attention_type}")
    eager = copy.deepcopy(model)
    probabilities = _timesformer_probabilities(eager)
    video = torch.randn(BATCH, frames, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with vitmad.record(model, reduction="none") as rec:
            model(**{argument: video})
        eager(**{argument: video})
    _check(rec, [(kind, p, frames, 1) for p in probabilities])
    assert rec.mad.shape == (2, BATCH, 2, frames * GRID * GRID)


def test_timesformer_divided_attention_with_another_frame_count_is_refused():
    # Its blocks group the tokens by config.num_frames whatever the video holds: the groups are not frames.
    model, argument = _build("timesformer_divided_space_time")
    with torch.no_grad(), vitmad.record(model), pytest.raises(
            ValueError, match="groups its tokens by config.num_frames = 4, and this video has 6 frames"):
        model(**{argument: torch.randn(BATCH, 6, 3, IMAGE, IMAGE)})


def test_timesformer_divided_attention_takes_frames_of_whole_rows_of_its_configured_width():
    """Its blocks cut each frame's patches into rows of config.image_size // patch_size = 4 whatever the frame's
    width, then attend over them in their order: 16 x 48 px frames (2 x 6 patches, three such rows) run as they
    should and are placed on their own grid (the profile refuses only a count of patches that is no whole number
    of rows)."""
    model, argument = _build("timesformer_divided_space_time")
    eager = copy.deepcopy(model)
    probabilities = _timesformer_probabilities(eager)
    video = torch.randn(BATCH, FRAMES, 3, 2 * PATCH, 6 * PATCH, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with vitmad.record(model, reduction="none") as rec:
            model(**{argument: video})
        eager(**{argument: video})
    _check(rec, [(kind, p, FRAMES, 1) for kind, p in zip(["time", "space"] * 2, probabilities, strict=True)],
           grid=(2, 6))


# What is left out, refused or not video ----------------------------------------------------------------------------


def test_vjepa2_records_its_encoder_and_skips_its_pooler_with_the_reason():
    # The predictor is recorded when named, with masks that share no tubelet (test_record_video_masked.py).
    model, argument = _build("vjepa2")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**{argument: _video()})
    assert rec.layers == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    classifier = transformers.VJEPA2ForVideoClassification(model.config).eval()
    with pytest.raises(ValueError, match="no layer with spatial softmax attention.*attentive pooler"):
        vitmad.record(classifier, layers=["pooler.self_attention_layers.*.self_attn",
                                          "pooler.cross_attention_layer.cross_attn"])


def test_videomae_pretraining_records_its_encoder_and_its_decoder_when_named():
    """The decoder's tokens are the visible tubelets, then the mask tokens, in bool_masked_pos's order: their count
    is the whole grid, and it was once placed in (frame, row, column) order, silently (12 % off in space, 21 % in
    time). It is placed by that order now (test_record_video_masked.py), and recorded only when named."""
    config = transformers.VideoMAEConfig(image_size=IMAGE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=TUBELET,
                                         hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=48, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                         decoder_num_attention_heads=2, decoder_intermediate_size=48)
    torch.manual_seed(0)
    model = transformers.VideoMAEForPreTraining(config).eval()
    mask = torch.zeros(BATCH, (FRAMES // TUBELET) * GRID * GRID, dtype=torch.bool)
    mask[:, ::2] = True
    with torch.no_grad(), vitmad.record(model) as rec:
        model(pixel_values=_video(), bool_masked_pos=mask)
    assert rec.layers == ["videomae.encoder.layer.0.attention.attention"]
    decoder = "decoder.decoder_layers.0.attention.attention"
    with torch.no_grad(), vitmad.record(model, layers=[decoder]) as named:
        model(pixel_values=_video(), bool_masked_pos=mask)
    assert named.layers == [decoder] and named.skipped == {}
    with torch.no_grad(), vitmad.record(model.videomae) as encoder:
        model.videomae(pixel_values=_video())
    assert encoder.layers == ["encoder.layer.0.attention.attention"]


def test_image_layers_have_no_temporal_mad_and_keep_their_geometry_keys():
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=24, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=48)
    model = transformers.ViTModel(config).eval()
    with torch.no_grad(), vitmad.record(model) as rec:
        model(torch.randn(1, 3, 32, 32))
    assert rec.calls[-1].temporal == [None]
    assert "frames" not in rec.geometry[0].as_dict()
    with pytest.raises(ValueError, match=r"temporal_mad is defined for video layers only; of the recorded layers, 1 "
                                         r"attends over images without frames \(layers\.0\.attention\)$"):
        _ = rec.temporal_mad


def test_video_geometry_is_written_with_frames():
    model, argument = _build("videomae")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**{argument: _video()})
    assert rec.geometry[0].as_dict() == {"grid": [GRID, GRID], "stride": [8.0, 8.0], "attention": "space-time",
                                         "heads": 2, "num_prefix_tokens": None, "frames": FRAMES // TUBELET,
                                         "frame_stride": float(TUBELET)}
    assert rec.layout is None  # not a plain image layout


def test_tubelet_centres_are_the_middle_of_their_frames():
    # Uniform attention (zero queries and keys) over 2 tubelet frames of 2 frames each: every query's temporal
    # MAD is (0 + 2) / 2 = 1 frame; over 4 frames of 1 (TimeSformer time calls): mean |i - j| over 4 x 4 = 1.25.
    for kind, expected in (("videomae", 1.0), ("timesformer_divided_space_time", 1.25)):
        model, argument = _build(kind)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if any(k in name for k in ("query", "key", "qkv")):
                    parameter.zero_()
            with vitmad.record(model) as rec:
                model(**{argument: _video()})
        time_layers = [i for i, g in enumerate(rec.geometry) if g.attention != "space"]
        torch.testing.assert_close(rec.temporal_mad[time_layers], torch.full((len(time_layers), BATCH, 2), expected))


def test_frame_count_follows_the_input():
    model, argument = _build("vjepa2")
    with torch.no_grad(), vitmad.record(model) as rec:
        model(**{argument: torch.randn(1, 8, 3, IMAGE, IMAGE)})
    assert [g.frames for g in rec.geometry] == [4, 4]
    assert rec.temporal_mad.shape == (2, 1, 2)


def test_a_recording_entered_again_places_video_layers_again():
    """Its embedding hook was installed once per recording (keyed by the recording's context): the exit removed it,
    and in the second entry every layer refused, "it ran before the video embedding"."""
    model, argument = _build("videomae")
    rec = vitmad.record(model)
    with torch.no_grad():
        with rec:
            model(**{argument: _video()})
        first = rec.mad
        with rec:
            model(**{argument: _video()})
    assert len(rec.calls) == 2 and torch.equal(rec.mad, first)


class _BesideAnotherTower(torch.nn.Module):
    """A user's wrapper: another tower declared first (its own patch convolution, its own input), then the video
    model of the tests above, which takes the video as it is."""

    def __init__(self, first: torch.nn.Module, video: torch.nn.Module, argument: str):
        super().__init__()
        self.first, self.video, self.argument = first, video, argument

    def forward(self, video):
        # Half the pixels of every other frame for the first tower (the first frame alone for an image tower).
        small = torch.nn.functional.interpolate(video.flatten(0, 1), scale_factor=0.5)
        small = small.view(*video.shape[:2], *small.shape[1:])
        first = self.first(pixel_values=small[:, ::2] if self.first.config.model_type == "vivit" else small[:, 0])
        return first.last_hidden_state.mean() + self.video(**{self.argument: video}).last_hidden_state.mean()


@pytest.mark.parametrize("first", ["vit", "vivit"])
def test_a_video_tower_beside_another_is_placed_on_its_own_tubelets(first):
    """Every video layer was placed on the first patch-embedding convolution of the whole model: beside an image ViT
    declared first, that ViT's 8 px patch kernel was read as the tubelet's frame count (temporal MAD 4x), and beside
    a ViViT of 4 px, 1-frame tubelets, the video model's own layers took that grid (both MADs halved), silently,
    even with only its layers named (QA 323)."""
    if first == "vit":
        tower = transformers.ViTModel(transformers.ViTConfig(image_size=IMAGE // 2, patch_size=PATCH, hidden_size=24,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=48))
    else:
        tower = transformers.VivitModel(transformers.VivitConfig(image_size=IMAGE // 2, num_frames=FRAMES // 2,
                                                                 tubelet_size=[1, 4, 4], hidden_size=24,
                                                                 num_hidden_layers=1, num_attention_heads=2,
                                                                 intermediate_size=48))
    model, argument = _build("videomae")
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    wrapper = _BesideAnotherTower(tower.eval(), model, argument)
    video = _video()
    with torch.no_grad():
        with vitmad.record(wrapper, layers=["video.*"], reduction="none") as rec:
            wrapper(video)
        attentions = eager(**{argument: video}, output_attentions=True).attentions
    assert rec.layers == ["video.encoder.layer.0.attention.attention", "video.encoder.layer.1.attention.attention"]
    _check(rec, [("videomae", a, FRAMES // TUBELET, TUBELET) for a in attentions])


def test_a_model_and_its_video_tower_recorded_at_once_each_read_the_video():
    """Both recordings shared one hook reading TimeSformer's video shape: the first read it, and the second fell back
    to config.num_frames, 3 videos of 4 frames for 2 of 6, silently (QA 326)."""
    model, argument = _build("timesformer_space_only")
    wrapper = torch.nn.ModuleDict({"timesformer": model})
    video = torch.randn(BATCH, 6, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with vitmad.record(model) as alone:
            model(**{argument: video})
        with vitmad.record(wrapper) as outer, vitmad.record(model) as inner:
            model(**{argument: video})
    assert alone.mad.shape == (2, BATCH, 2) and alone.geometry[0].frames == 6
    assert torch.equal(outer.mad, alone.mad) and torch.equal(inner.mad, alone.mad)
