"""Packed native-resolution vision towers: several images, each of its own size, in one token sequence.

- Qwen2-VL (``Qwen2VisionTransformerPretrainedModel``, the ``visual`` of ``Qwen2VLModel``), Qwen2.5-VL
  (``Qwen2_5_VisionTransformerPretrainedModel``) and Qwen3-VL (``Qwen3VLVisionModel``). The tower receives the
  flattened patches of every image, ``[N, C * temporal_patch * p * p]``, and ``grid_thw`` ``[n_images, 3]``. An
  image of ``h x w`` patches is a run of ``h * w`` tokens ordered by spatial-merge blocks, not row-major: block
  ``(a, b)`` of ``m x m`` patches (row-major over the ``h/m x w/m`` blocks) holds its patches row-major, so token
  ``k`` sits at row ``(k // m**2) // (w/m) * m + (k % m**2) // m``, column ``(k // m**2) % (w/m) * m + k % m``.
  The attention module receives ``cu_seqlens``, the chunks of the sequence that attend among themselves (one per
  image), and, without flash attention, calls the attention once per chunk: the recorder concatenates the calls
  (``Placement.consecutive_chunks``). Qwen2.5-VL reorders the whole sequence by windows of ``s x s`` merge blocks
  (``s = window_size // m // patch``; windows row-major over the image, blocks row-major in each window; a
  window at the bottom or right edge holds only the blocks that exist: the model drops the padding of its window
  partition, so no padding is attended). Its window blocks attend per window, its ``fullatt_block_indexes``
  blocks per image, both over the window-ordered sequence.
- GLM-4.1V / GLM-4.5V / GLM-4.6V (``Glm4vVisionModel``, ``Glm4vMoeVisionModel``; GLM-4.6V's ``visual`` is a
  ``Glm4vVisionModel``), GLM-OCR (``GlmOcrVisionModel``), GLM-5-Next (``Glm5NextVisionModel``), ERNIE-4.5-VL
  (``Ernie4_5_VLMoeVisionTransformerPretrainedModel``, a linear patch embedding without temporal patch) and dots3
  (``Dots3NoteVisionModel``, a 2D patch embedding): the same ``grid_thw``, merge-block order and per-image chunks
  as Qwen2-VL.
- Qwen3-VL's tower under other names, the same modules line for line: Qwen3-VL-MoE (``Qwen3VLMoeVisionModel``),
  Qwen3.5 (``Qwen3_5VisionModel``), Qwen3.5-MoE (``Qwen3_5MoeVisionModel``), Qwen4-Exp (``Qwen4ExpVisionModel``),
  Qwen3-Omni-MoE (``Qwen3OmniMoeVisionEncoder``) and Cohere Compass (``CohereCompassVisionModel``). Qwen2.5-VL's,
  windows included: Qwen2.5-Omni (``Qwen2_5OmniVisionEncoder``, its attention with ``q``, ``k``, ``v``
  projections, found by this family) and EXAONE 4.5 (``Exaone4_5_VisionModel``, grouped-query attention).
- Qwen2-VL's merge-block order and per-image chunks, their towers examined line for line: MiniMax-M3-VL
  (``MiniMaxM3VLVisionModel``, Qwen2.5-VL's 3D patch embedding under ``embeddings``, a 3D rotary embedding),
  Cosmos3-Edge (``Cosmos3EdgeVisionModel``, SigLIP2 layers, a linear patch embedding, its learned position grid
  interpolated per image and laid out block-major) and LFM3-VL (``Lfm3VlVisionModel``, a linear patch embedding,
  attention layers between gated convolution layers that refold each image from the merge-block order); each model's
  image processor patchifies in that order (LFM3-VL's is Qwen2-VL's).
- A class token first in each image's ``cu_seqlens`` chunk, then Qwen2-VL's merge-block order: LLaVA-OneVision-1.5
  (``LlavaOnevision15VisionModel``, its chunks shifted to hold the class token) and Inkling2
  (``Inkling2VisionModel``, one input row per merge block, ``image_grid_thw`` counted in merge blocks). The class
  token has no position (``PackedSequence.prefix``): a query's prefix mass is its attention on its own image's class
  token, the one its call holds, and the prefix maps are each image's class-token row over its own grid (the
  recorder joins the calls' rows along the keys). RADIO's packed forward (``families/radio.py``) uses the same
  sequence with its summary tokens and row-major patches.
- Row-major per image, one ``cu_seqlens`` chunk per image (``"row_major"``: Qwen2-VL's placement with merge blocks
  of one patch; each tower merges, if at all, after its encoder): PaddleOCR-VL (``PaddleOCRVisionModel``; rotary
  position ids ``get_vision_position_ids(grid_thw, 1)``, a learned position grid interpolated row-major; its
  ``attention_mask`` reaches no attention call), HunYuanVL (``HunYuanVLVisionTransformer``) and HY-V4-VL
  (``HYV4VLVisionModel``), without rotary embedding, their learned position grids interpolated to each image's
  ``h x w`` and their patch mergers folding each image's run row-major, and Kimi-K2.5 (``Kimi_K25VisionModel``);
  each model's image processor cuts the patches row-major (Kimi-K2.5's pads the resized image to whole merge
  blocks: those patches are tokens, in pixels of the padded image).
- A merge size per image: VideoLLaMA3 (``VideoLlama3VisionModel``) takes ``merge_sizes``, one per ``grid_thw``
  row (its image processor's default 1: row-major; its video processor's 2), each image's tokens in Qwen2-VL's
  merge-block order of its own size, read in every call.
- Qwen2.5-VL's windows, each block attending per window or per image as its config's ``layer_types`` says
  (``"window_attention"`` / ``"full_attention"``) instead of ``fullatt_block_indexes``: Ovis2.5
  (``Ovis2_5VisionModel``, windows of ``window_size // merge // patch`` merge blocks) and Muse Glimmer / Muse Spark
  (``MuseGlimmerVisionModel``, ``MuseSparkVisionModel``: ``spatial_merge_size`` 1 in the tower, so the windows are
  of ``pos_emb_height`` single patches and the patches row-major, as their processor cuts them).
- Pixtral (``PixtralVisionModel``): image ``i`` of ``image_sizes`` is ``h // p x w // p`` patches, row-major, and
  the images are concatenated into one sequence ``[1, N, C]``; the attention gets a block-diagonal mask, so a
  token of another image has probability 0.

Videos (a ``grid_thw`` row ``(t, h, w)`` with ``t > 1``): Qwen2-VL, Qwen2.5-VL, Qwen3-VL, the towers built as them,
Cosmos3-Edge, LFM3-VL, LLaVA-OneVision-1.5, HY-V4-VL, VideoLLaMA3, Ovis2.5 and the Muse towers, whose designs say
``video_slices``, give each of the ``t`` temporal
slices (a temporal patch of ``temporal_patch_size`` frames) its own ``cu_seqlens`` chunk (``repeat_interleave(h * w,
t)``; Qwen2.5-VL's windows cut each slice as an image; LLaVA-OneVision-1.5 a class token first in each slice's, as in
an image's), its ``h * w`` tokens in an image's merge-block order: each slice attends only within itself, so it is
placed as an image, an entry of its own in the fold, in ``grid_thw`` order (a video's slices in time order). There is
no attention across slices, hence no temporal distance: a slice's MAD is spatial.

Videos attended a whole clip at a time (``whole_clip``): MiniMax-M3-VL and Kimi-K2.5 give each ``grid_thw`` row one
``cu_seqlens`` chunk of its ``t * h * w`` tokens (``get_vision_cu_seqlens(merge_temporal=True)``), time-major, each
temporal slice's ``h * w`` tokens in an image's order (MiniMax-M3-VL's merge blocks, Kimi-K2.5's row-major; their
video processors patchify so and cut a video into rows of at most 4 temporal patches). In a call holding a video,
every row is a clip, an entry of the fold: token ``(s, r, c)`` at its cell's pixel centre and at ``(s + 0.5) *
frame_stride`` frames from the row's first (``Placement.time_positions``; ``frame_stride`` the frames a token spans:
MiniMax-M3-VL's ``temporal_patch_size``, 1 for Kimi-K2.5's one-frame ``Conv2d`` patches), folded onto ``[n_rows,
H, T_max]`` in (frame, row, column) order (``LayerGeometry.image_frames``); its spatial and temporal MAD are over
the keys of its whole row. An image row in such a call is a clip of one temporal patch; images alone stay images.

Every token is the centre of its patch in pixels of the image as the processor resized it, ``(row + 0.5) * p``;
a token of another image is neither query nor key of an image's attention (in a separate call, or at
probability 0 under the mask). The per-query values of the sequence fold onto ``[n_images, H, T_max]``: image
``i``'s tokens row-major on its own grid first, NaN after them (``Placement.present``,
``LayerGeometry.image_grids``); the layer's MAD of an image is the mean over its own tokens.

Refused (a ``ValueError`` naming the layer): GLM-Image's tower (``GlmImageVisionModel``), by name: packed like
Qwen2-VL, but its config's ``spatial_merge_size`` (default 1) and its image processor's ``merge_size`` (default 2)
need not agree, so where a token lies on the image is not settled; videos in the other towers (Inkling2 would
attend a row whole, but has no video processor and no ``get_video_features``, so what frames a row holds is not
settled; HunYuanVL's patch merger folds a whole row into one ``h x w`` map, so it runs no video; PaddleOCR-VL has no
video processor and its per-frame chunks were not checked; GLM-4.1V's and GLM-4.5V's towers cannot run a ``t > 1``
row, their models pass ``t = 1`` rows); flash attention over more than one chunk (one variable-length call whose
chunks the capture does not receive); a tower given precomputed ``position_ids``, ``window_index`` or
``cu_window_seqlens`` (vitmad rebuilds the token order from ``grid_thw``); ``cu_seqlens`` or attention shapes that
are not the chunks rebuilt here (checked in every call, so a block whose ``layer_types`` or merge size did not
make the chunks it received is refused).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..module_index import named_module_list
from ..placement import CallContext, LayerGeometry, LayerPlacer, NotPlaceable, Placement, RefusingPlacer, on_device
from .stages import matching_design

__all__ = ["placer", "attention_modules", "PackedSequence", "packed_sequence", "qwen_token_cells", "QwenPlacer",
           "PixtralPlacer"]


@dataclass(frozen=True)
class _Design:
    """One packed tower: where its classes are defined and how its sequence is ordered.

    Attributes:
        module: the module that defines the classes.
        tower: class name of the vision tower (it receives the images' sizes).
        attention: class name of its attention module (the one recorded).
        kind: ``"qwen"`` (merge-block order, ``cu_seqlens``), ``"row_major"`` (the same chunks, each image's
            patches row-major: merge blocks of one patch, the tower merging after its encoder if at all),
            ``"pixtral"`` (row-major, block-diagonal mask), or ``"refused"`` (a tower packed alike whose token
            positions vitmad does not know: ``reason``).
        windows: the tower has window blocks besides its full-attention blocks (Qwen2.5-VL's
            ``fullatt_block_indexes``; the blocks its config's ``layer_types`` names, with ``layer_types``).
        layer_types: the tower's config says per block ``"window_attention"`` or ``"full_attention"``
            (``config.layer_types``, Ovis2.5 and the Muse towers), instead of ``fullatt_block_indexes``.
        blocks: the tower's list of blocks, whose index says whether a block attends in windows.
        reason: why a ``"refused"`` tower is refused.
        patch: where the tower keeps its patch size, a dotted attribute path from the tower (``"qwen"`` kind).
        token_convolution: class name of the tower's modules whose convolutions run on its tokens, once per image,
            not on the image (LFM3-VL's gated convolution layers): no call of the recorder starts there.
        class_tokens: tokens without a position the tower puts before each image's patches, inside the image's
            ``cu_seqlens`` chunk (LLaVA-OneVision-1.5, Inkling2: one class token); 0 for none.
        merge: where the tower keeps its spatial merge size, a dotted attribute path from the tower.
        merge_argument: the tower's argument holding a merge size per ``grid_thw`` row (VideoLLaMA3's
            ``merge_sizes``), read in every call instead of ``merge``; empty for one merge size.
        grid_argument: the tower's argument holding the images' ``(t, h, w)`` grids.
        grid_unit: what that argument's ``h`` and ``w`` count: ``"patch"``, or ``"merge"`` blocks (Inkling2's
            ``image_grid_thw``, in language-model image tokens).
        video_slices: the tower attends a video (a ``grid_thw`` row with ``t > 1``) one temporal slice at a time:
            each temporal patch its own ``cu_seqlens`` chunk (``repeat_interleave(h * w, t)``, windowed per slice
            as an image), its ``h x w`` tokens in the merge-block order of an image, so each slice is placed as an
            image of its own. False: a video is refused.
        video_refusal: why a video is refused, where more is known than that its chunks were not checked.
        whole_clip: the tower attends each ``grid_thw`` row in one ``cu_seqlens`` chunk over all its ``t`` temporal
            patches (``merge_temporal``), time-major, each temporal slice's ``h * w`` tokens in an image's order:
            a call holding a video places every row as a clip over its frames (space and time).
        temporal_patch: where the tower keeps the frames each token spans (its patch embedding's temporal size), a
            dotted attribute path from the tower; empty for one frame a token (a 2D patch embedding).
    """

    module: str
    tower: str
    attention: str
    kind: str
    windows: bool = False
    layer_types: bool = False
    blocks: str = "blocks"
    reason: str = ""
    patch: str = "patch_embed.patch_size"
    token_convolution: str = ""
    class_tokens: int = 0
    merge: str = "spatial_merge_size"
    merge_argument: str = ""
    grid_argument: str = "grid_thw"
    grid_unit: str = "patch"
    video_slices: bool = False
    video_refusal: str = ""
    whole_clip: bool = False
    temporal_patch: str = ""


# Why Inkling2's video rows are refused: its tower would attend such a row in one chunk, but nothing says what it is.
_INKLING2_VIDEO = (
    "its tower attends a t > 1 row in one cu_seqlens chunk across its slices, but transformers gives Inkling2 no "
    "video processor and its models no get_video_features (input_modalities: image), so which frames such a row "
    "holds, in what order, is not settled (its rotary ids and position grid carry no time)")

_DESIGNS = (
    _Design("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VisionTransformerPretrainedModel",
            "VisionAttention", "qwen", video_slices=True),
    _Design("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel",
            "Qwen2_5_VLVisionAttention", "qwen", windows=True, video_slices=True),
    _Design("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionModel", "Qwen3VLVisionAttention", "qwen",
            video_slices=True),
    _Design("transformers.models.pixtral.modeling_pixtral", "PixtralVisionModel", "PixtralAttention", "pixtral"),
    # GLM-4.1V / GLM-4.5V (and GLM-OCR): Qwen2-VL's token order and per-image chunks. GLM-4.1V's and GLM-4.5V's
    # towers do not run a video row (t > 1: their embeddings index grid_thw by cu_seqlens chunk); their models'
    # get_video_features give the tower a video as one t = 1 row per temporal patch, placed as images.
    _Design("transformers.models.glm4v.modeling_glm4v", "Glm4vVisionModel", "Glm4vVisionAttention", "qwen"),
    _Design("transformers.models.glm4v_moe.modeling_glm4v_moe", "Glm4vMoeVisionModel", "Glm4vMoeVisionAttention",
            "qwen"),
    _Design("transformers.models.glm_ocr.modeling_glm_ocr", "GlmOcrVisionModel", "GlmOcrVisionAttention", "qwen",
            video_slices=True),
    # Qwen3-VL's tower under other names (their vision model, attention, block, patch embedding and rotary
    # embedding are Qwen3-VL's line for line; Qwen3.5 and Qwen4-Exp only drop the deepstack mergers, which run
    # after the blocks and do not reorder the tokens).
    _Design("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionModel",
            "Qwen3VLMoeVisionAttention", "qwen", video_slices=True),
    _Design("transformers.models.qwen3_5.modeling_qwen3_5", "Qwen3_5VisionModel", "Qwen3_5VisionAttention", "qwen",
            video_slices=True),
    _Design("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe", "Qwen3_5MoeVisionModel",
            "Qwen3_5MoeVisionAttention", "qwen", video_slices=True),
    _Design("transformers.models.qwen4_exp.modeling_qwen4_exp", "Qwen4ExpVisionModel", "Qwen4ExpVisionAttention",
            "qwen", video_slices=True),
    _Design("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe", "Qwen3OmniMoeVisionEncoder",
            "Qwen3OmniMoeVisionAttention", "qwen", video_slices=True),
    _Design("transformers.models.cohere_compass.modeling_cohere_compass", "CohereCompassVisionModel",
            "CohereCompassVisionAttention", "qwen", video_slices=True),
    # Qwen2.5-Omni's vision encoder: Qwen2.5-VL's windows and fullatt_block_indexes (its attention projects q, k, v
    # with three linears instead of one qkv: the same calls per chunk).
    _Design("transformers.models.qwen2_5_omni.modeling_qwen2_5_omni", "Qwen2_5OmniVisionEncoder",
            "Qwen2_5OmniVisionAttention", "qwen", windows=True, video_slices=True),
    # EXAONE 4.5: Qwen2.5-VL's tower line for line but for grouped-query attention (fewer key heads, repeated per
    # query head by transformers' attention functions).
    _Design("transformers.models.exaone4_5.modeling_exaone4_5", "Exaone4_5_VisionModel", "Exaone4_5_VisionAttention",
            "qwen", windows=True, video_slices=True),
    # ERNIE-4.5-VL: Qwen2-VL's merge-block order and per-image chunks (its patch embedding is a linear over each
    # patch, without a temporal patch).
    _Design("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe",
            "Ernie4_5_VLMoeVisionTransformerPretrainedModel", "Ernie4_5_VLMoeVisionAttention", "qwen",
            video_slices=True),
    # GLM-5-Next: GLM-4.1V's tower without its learned position embedding, q/k norms before the rotary embedding.
    _Design("transformers.models.glm5_next.modeling_glm5_next", "Glm5NextVisionModel", "Glm5NextVisionAttention",
            "qwen", video_slices=True),
    # dots3 (Dots3NoteVisionModel): Qwen2-VL's merge-block order and per-image chunks (its attention normalises q
    # and k per head before the rotary embedding; some blocks' MLPs are mixtures of experts).
    _Design("transformers.models.dots3_note.modeling_dots3_note", "Dots3NoteVisionModel", "Dots3NoteVisionAttention",
            "qwen", video_slices=True),
    # MiniMax-M3-VL (MiniMaxM3VLVisionModel): Qwen2.5-VL's Conv3d patch embedding (under embeddings), the tokens in
    # merge blocks as get_vision_position_ids lays them out (its processor patchifies the same way), one cu_seqlens
    # chunk per image (merge_temporal joins a video's frames only), no windows; a 3D rotary embedding.
    # A video: one chunk per grid_thw row over its t temporal patches (merge_temporal=True; its video processor cuts
    # a video into rows of at most vision_segment_max_frames temporal patches), time-major, each slice in merge
    # blocks (get_vision_position_ids(include_temporal=True); the processor's permute), a Conv3d token spanning
    # temporal_patch_size frames: placed as a clip.
    _Design("transformers.models.minimax_m3_vl.modeling_minimax_m3_vl", "MiniMaxM3VLVisionModel",
            "MiniMaxM3VLVisionAttention", "qwen", patch="embeddings.patch_size", whole_clip=True,
            temporal_patch="embeddings.temporal_patch_size"),
    # Cosmos3-Edge (Cosmos3EdgeVisionModel): SigLIP2 layers over the same merge-block order (its learned position
    # grid is interpolated per image and laid out block-major; its processor patchifies block-major), one chunk per
    # image; a linear patch embedding. A video: one chunk per frame (get_vision_cu_seqlens per frame, no temporal
    # patch), the position grid repeated per frame, its video processor time-major then block-major.
    _Design("transformers.models.cosmos3_edge.modeling_cosmos3_edge", "Cosmos3EdgeVisionModel",
            "Cosmos3EdgeVisionAttention", "qwen", patch="embeddings.patch_size", video_slices=True),
    # LFM3-VL (Lfm3VlVisionModel): a linear patch embedding, the merge-block order (rotary position ids from
    # get_vision_position_ids; its gated convolutions unfold and refold each image from that order; its image
    # processor is Qwen2VLImageProcessor), one chunk per image in every attention layer (the others convolve). A
    # video: one chunk per temporal patch (get_vision_cu_seqlens), each convolved as a frame of its own, its video
    # processor Qwen3VLVideoProcessor (time-major, then Qwen2-VL's merge blocks).
    _Design("transformers.models.lfm3_vl.modeling_lfm3_vl", "Lfm3VlVisionModel", "Lfm3VlVisionAttention", "qwen",
            patch="config.patch_size", token_convolution="Lfm3VlVisionShortConv", video_slices=True),
    # Refused by name: packed like Qwen2-VL, but where each token lies on the image is not settled.
    _Design("transformers.models.glm_image.modeling_glm_image", "GlmImageVisionModel", "GlmImageVisionAttention",
            "refused", reason=(
                "GLM-Image's vision tower places its tokens by its config's spatial_merge_size (default 1: row-major) "
                "while its image processor orders the patches in merge_size blocks (default 2), so where each token "
                "lies on the image depends on how the checkpoint pairs the two, which vitmad cannot check; vitmad "
                "does not record this tower")),
    # LLaVA-OneVision-1.5 (LlavaOnevision15VisionModel): Qwen2-VL's merge-block order (its patches come "in spatial
    # merge order", its rotary position ids from get_vision_position_ids, its merger joins m*m consecutive tokens),
    # one class token prepended to each image's run (LlavaOnevision15VisionClassEmbeddings.prepend_cls), each
    # image's cu_seqlens chunk shifted to hold it; one call per chunk without flash attention. A video: a class token
    # and a chunk per temporal slice (get_vision_frame_lengths repeats h * w per slice), as an image's.
    _Design("transformers.models.llava_onevision1_5.modeling_llava_onevision1_5", "LlavaOnevision15VisionModel",
            "LlavaOnevision15VisionAttention", "qwen", class_tokens=1, video_slices=True),
    # Inkling2 (Inkling2VisionModel): one input row per merge block, blocks row-major ("raster order within each
    # image"), unfolded by its embeddings into m*m patches row-major (the merge-block order; its rotary position ids
    # from get_vision_position_ids, its learned position grid interpolated block-major), a class token in front of
    # each image (embeddings[patch_index] skips it), one cu_seqlens chunk per image; image_grid_thw counts merge
    # blocks.
    _Design("transformers.models.inkling2.modeling_inkling2", "Inkling2VisionModel", "Inkling2VisionAttention",
            "qwen", patch="embeddings.patch_size", class_tokens=1, merge="embeddings.merge_size",
            grid_argument="image_grid_thw", grid_unit="merge",
            video_refusal=_INKLING2_VIDEO),
    # PaddleOCR-VL (PaddleOCRVisionModel, around its PaddleOCRVisionTransformer): its image processor cuts each
    # image's patches row-major (merge_size only rounds the resize: the projector merges after the encoder); the
    # encoder's rotary position ids are get_vision_position_ids(grid_thw, 1), row-major, its learned position grid
    # interpolated row-major; one cu_seqlens chunk per grid_thw row (the VLM passes t = 1 rows; no video processor).
    # Its attention_mask argument reaches no attention call: the encoder builds a mask and passes it to no layer.
    _Design("transformers.models.paddleocr_vl.modeling_paddleocr_vl", "PaddleOCRVisionModel",
            "PaddleOCRVisionAttention", "row_major", patch="vision_model.embeddings.patch_size"),
    # HunYuanVL (HunYuanVLVisionTransformer) and HY-V4-VL (HYV4VLVisionModel): no rotary embedding; a learned
    # position grid interpolated to each image's h x w and added row-major; the patch merger folds each image's
    # run row-major into h x w; their image processors cut patches row-major ("in comparison to Qwen"). One
    # cu_seqlens chunk per temporal slice. HunYuanVL's merger folds a whole grid_thw row into one h x w map, so it
    # runs no video; HY-V4-VL's video processor cuts each frame row-major, time-major (temporal_patch_size 1: its
    # patch embedding takes one frame's channels), merged frame by frame, each frame its own chunk.
    _Design("transformers.models.hunyuan_vl.modeling_hunyuan_vl", "HunYuanVLVisionTransformer",
            "HunYuanVLVisionAttention", "row_major", patch="embeddings.patch_size",
            video_refusal="its patch merger folds a whole grid_thw row into one h x w map, so it runs no video"),
    _Design("transformers.models.hy_v4_vl.modeling_hy_v4_vl", "HYV4VLVisionModel", "HYV4VLVisionAttention",
            "row_major", patch="embeddings.patch_size", video_slices=True),
    # Kimi-K2.5 (Kimi_K25VisionModel): each image's patches row-major (its image processor; rotary position ids
    # get_vision_position_ids(grid_thw, 1)), one chunk per image. A video row is one chunk over all its t frames
    # (get_vision_attention_seqlens(merge_temporal=True); its video processor cuts a video into rows of
    # temporal_patch_size frames), time-major, each frame row-major (the processor's permute; a frame index per
    # token for the time embedding), a Conv2d token of one frame: placed as a clip.
    _Design("transformers.models.kimi_k25.modeling_kimi_k25", "Kimi_K25VisionModel", "Kimi_K25VisionAttention",
            "row_major", patch="config.patch_size", whole_clip=True),
    # VideoLLaMA3 (VideoLlama3VisionModel): a merge size per grid_thw row (merge_sizes: its image processor's 1,
    # row-major, its video processor's 2), each row's patches in Qwen2-VL's merge-block order of that size
    # (get_vision_position_ids(grid_thw, merge_sizes); pixel_unshuffle folds them back block-major), one
    # cu_seqlens chunk per temporal slice (a video's frames time-major, temporal_patch_size 1).
    _Design("transformers.models.video_llama_3.modeling_video_llama_3", "VideoLlama3VisionModel",
            "VideoLlama3VisionAttention", "qwen", patch="embeddings.patch_size", merge_argument="merge_sizes",
            video_slices=True),
    # Ovis2.5 (Ovis2_5VisionModel): Qwen2.5-VL's window order (get_vision_window_index over merge blocks, the
    # sequence reordered once before the first layer), each layer attending per window or per image as its
    # config's layer_types says; its processors patchify in merge-block order. Muse Glimmer and Muse Spark
    # (MuseGlimmerVisionModel, MuseSparkVisionModel; Spark uses Glimmer's processors): the same windows over single
    # patches (spatial_merge_size 1, the merge deferred to pixel_shuffle; windows of pos_emb_height patches), their
    # processors row-major. A video: one chunk (or windows) per temporal slice, as an image.
    *(_Design(f"transformers.models.{module}.modeling_{module}", f"{prefix}VisionModel", f"{prefix}VisionAttention",
              "qwen", windows=True, layer_types=True, blocks="layers", patch="patch_size", video_slices=True)
      for module, prefix in (("ovis2_5", "Ovis2_5"), ("muse_glimmer", "MuseGlimmer"), ("muse_spark", "MuseSpark"))),
)


def _design_of(module: nn.Module, attribute: str) -> _Design | None:
    return matching_design(module, _DESIGNS, attribute)


@dataclass(frozen=True)
class PackedSequence:
    """Where each token of a packed sequence is, and the fold of its per-query values onto per-image grids.

    Attributes:
        grids: per image, ``(grid_h, grid_w)`` of its patch tokens.
        cells: ``[N_placed, 2]`` (row, column) of each positioned sequence token in its own image's grid.
        target: ``[N_placed]`` index of each positioned sequence token in the folded ``[n_images * T_max]``
            (image-major, each image row-major on its own grid), ``T_max`` the largest image's token count.
        prefix: tokens without a position at the start of each image's run (RADIO's summary tokens, the class
            token of LLaVA-OneVision-1.5 and Inkling2), inside the image's chunk; 0 for none.
        placed: ``[N_placed]`` sequence index of each positioned token; None when every token has a position.
        frames: packed clips: per entry, its temporal patches (its tokens time-major, ``grids[i]`` per slice,
            folded in (frame, row, column) order); None for images.
    """

    grids: tuple[tuple[int, int], ...]
    cells: torch.Tensor
    target: torch.Tensor
    prefix: int = 0
    placed: torch.Tensor | None = None
    frames: tuple[int, ...] | None = None

    @property
    def _counts(self) -> list[int]:
        """Each entry's positioned tokens."""
        frames = self.frames or (1,) * len(self.grids)
        return [t * h * w for t, (h, w) in zip(frames, self.grids)]

    @property
    def tokens_max(self) -> int:
        return max(self._counts)

    def positions(self, stride: tuple[float, float]) -> torch.Tensor:
        """``[N, 2]`` float32 pixel centres of the sequence tokens, NaN rows for the tokens without a position."""
        centres = ((self.cells.double() + 0.5) * torch.tensor(stride, dtype=torch.float64)).float()
        if self.placed is None:
            return centres
        length = self.prefix * len(self.grids) + int(centres.shape[0])
        return centres.new_full((length, 2), float("nan")).index_copy_(0, self.placed, centres)

    def present(self) -> torch.Tensor | None:
        """``[n_images, T_max]`` bool, the folded tokens each image has; None when the images are the same size."""
        if len(set(self._counts)) == 1 and len(set(self.grids)) == 1:
            return None
        return torch.arange(self.tokens_max) < torch.tensor(self._counts)[:, None]

    def geometry(self, stride: tuple[float, float], attention: str, heads: int,
                 frame_stride: float | None = None) -> LayerGeometry:
        """``frame_stride``: packed clips, the frames each token spans."""
        # The prefix tokens are counted per image (each chunk starts with them), as a plain ViT's per image.
        prefix = self.prefix if self.prefix else None
        same = len(set(self.grids)) == 1 and (self.frames is None or len(set(self.frames)) == 1)
        if self.frames is not None:
            if same:
                return LayerGeometry(self.grids[0], stride, attention, heads, prefix, frames=self.frames[0],
                                     frame_stride=frame_stride)
            return LayerGeometry(None, stride, attention, heads, prefix, image_grids=self.grids,
                                 frame_stride=frame_stride, image_frames=self.frames)
        if same:
            return LayerGeometry(self.grids[0], stride, attention, heads, prefix)
        return LayerGeometry(None, stride, attention, heads, prefix, image_grids=self.grids)

    def times(self, frame_stride: float) -> torch.Tensor:
        """``[N, 1]`` float32 frame of each sequence token of packed clips, the centre of its temporal patch in
        frames counted from its own row's first, ``(slice + 0.5) * frame_stride``; NaN for the prefix tokens."""
        counts = [h * w for h, w in self.grids]
        slices = torch.cat([torch.arange(t).repeat_interleave(n) for t, n in zip(self.frames, counts)])
        centres = ((slices.double() + 0.5) * frame_stride).float()[:, None]
        if self.placed is None:
            return centres
        length = self.prefix * len(self.grids) + int(centres.shape[0])
        return centres.new_full((length, 1), float("nan")).index_copy_(0, self.placed, centres)

    def fold(self, heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Maps per-query values ``[1, heads, N]`` (sequence order; also one prefix token's row over the keys) to
        ``[n_images, heads, T_max]``: the values at the tokens without a position are dropped."""
        images, tokens = len(self.grids), self.tokens_max
        target, placed = self.target, self.placed

        def fold(values: torch.Tensor) -> torch.Tensor:
            values = values.reshape(heads, -1)
            if placed is not None:
                values = values.index_select(-1, on_device(placed, values.device))
            folded = values.new_full((heads, images * tokens), float("nan"))
            folded[:, on_device(target, values.device)] = values
            return folded.view(heads, images, tokens).transpose(0, 1)

        return fold


def packed_sequence(grids: tuple[tuple[int, int], ...], cells: list[torch.Tensor], prefix: int = 0,
                    frames: tuple[int, ...] | None = None) -> PackedSequence:
    """The packed sequence of images whose positioned tokens, in sequence order, sit at ``cells[i]``
    (``[h_i * w_i, 2]``), each image's run led by ``prefix`` tokens without a position. ``frames``: packed clips,
    entry ``i`` of ``frames[i]`` temporal slices, time-major, ``cells[i]`` ``[t_i * h_i * w_i, 2]`` (slice after
    slice), folded in (frame, row, column) order."""
    counts = [t * h * w for t, (h, w) in zip(frames or (1,) * len(grids), grids)]
    tokens = max(counts)
    # A token's slice is its index in the entry's run over the slice's h * w tokens (time-major).
    target = torch.cat([entry * tokens + torch.arange(n) // (h * w) * (h * w) + c[:, 0] * w + c[:, 1]
                        for entry, ((h, w), c, n) in enumerate(zip(grids, cells, counts))])
    placed = None
    if prefix:
        starts = torch.tensor([0, *(prefix + n for n in counts)]).cumsum(0)[:-1]
        placed = torch.cat([start + prefix + torch.arange(n) for start, n in zip(starts.tolist(), counts)])
    return PackedSequence(grids, torch.cat(cells), target, prefix, placed, frames)


def qwen_token_cells(grid: tuple[int, int], merge: int, window: int | None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(row, column) of each token of one Qwen image in the tower's sequence order, and its attention chunks.

    Args:
        grid: ``(h, w)`` patches of the image, multiples of ``merge``.
        merge: the spatial merge size ``m``: tokens come in ``m x m`` blocks, row-major within a block.
        window: ``s``, merge blocks per side of a window (Qwen2.5-VL's window order), or None (blocks row-major).

    Returns:
        ``[h * w, 2]`` long cells, and the token counts of the image's chunks: the whole image without
        ``window``, else each window's (row-major over windows, edge windows smaller).
    """
    (h, w), m = grid, merge
    blocks_h, blocks_w = h // m, w // m
    rows, cols = torch.meshgrid(torch.arange(blocks_h), torch.arange(blocks_w), indexing="ij")
    blocks = torch.stack([rows, cols], dim=-1).reshape(-1, 2)
    chunks: tuple[int, ...] = (h * w,)
    if window is not None:
        per_row = math.ceil(blocks_w / window)
        windows = (blocks[:, 0] // window) * per_row + blocks[:, 1] // window
        # Stable sort by window keeps the blocks row-major inside each window.
        blocks = blocks[torch.sort(windows, stable=True).indices]
        counts = torch.bincount(windows)
        chunks = tuple(int(c) * m * m for c in counts if c > 0)
    inner_r, inner_c = torch.meshgrid(torch.arange(m), torch.arange(m), indexing="ij")
    inner = torch.stack([inner_r, inner_c], dim=-1).reshape(1, m * m, 2)
    return (blocks[:, None, :] * m + inner).reshape(-1, 2), chunks


@dataclass(frozen=True)
class ChunkLayout:
    """A packed sequence attended one chunk per call (:func:`chunk_placement`): Qwen-like towers', MiniCPM-V's."""

    sequence: PackedSequence
    positions: torch.Tensor  # [N, 2] float32
    boundaries: tuple[int, ...]  # chunk starts and the sequence end, as cu_seqlens gives them
    times: torch.Tensor | None = None  # packed clips: [N, 1] float32 frames (PackedSequence.times)
    frame_stride: float | None = None  # packed clips: the frames each token spans


# A model sees few image-size combinations; the blocks of one kind share them (read-only tensors).
@functools.lru_cache(maxsize=64)
def _qwen_layout(grids: tuple[tuple[int, int], ...], merges: tuple[int, ...], window: int | None,
                 stride: tuple[float, float], per_window: bool = True, class_tokens: int = 0) -> ChunkLayout:
    """``merges``: the merge size of each of ``grids`` (VideoLLaMA3's differ per image). ``per_window=False``: the
    tokens in window order (``window``) but one chunk per image (Qwen2.5-VL's ``fullatt_block_indexes`` blocks
    attend over the window-ordered sequence). ``class_tokens``: tokens without a position before each image's
    patches, in its chunk (no tower has them with windows)."""
    cells, boundaries = [], [0]
    for grid, merge in zip(grids, merges):
        image_cells, chunks = qwen_token_cells(grid, merge, window)
        cells.append(image_cells)
        for length in (chunks if per_window else (grid[0] * grid[1],)):
            boundaries.append(boundaries[-1] + class_tokens + length)
    sequence = packed_sequence(grids, cells, class_tokens)
    return ChunkLayout(sequence, sequence.positions(stride), tuple(boundaries))


@functools.lru_cache(maxsize=64)
def _clip_layout(rows: tuple[tuple[int, int, int], ...], merges: tuple[int, ...], stride: tuple[float, float],
                 frame_stride: float) -> ChunkLayout:
    """Packed clips attended whole (``whole_clip`` designs): row ``(t, h, w)`` one chunk of ``t`` temporal slices,
    time-major, each slice's ``h * w`` tokens in an image's merge-block order of ``merges[i]`` (1: row-major)."""
    cells = [qwen_token_cells((h, w), merge, None)[0].repeat(t, 1) for (t, h, w), merge in zip(rows, merges)]
    sequence = packed_sequence(tuple((h, w) for _, h, w in rows), cells, frames=tuple(t for t, _, _ in rows))
    boundaries = tuple(torch.tensor([0, *(t * h * w for t, h, w in rows)]).cumsum(0).tolist())
    return ChunkLayout(sequence, sequence.positions(stride), boundaries, sequence.times(frame_stride), frame_stride)


@functools.lru_cache(maxsize=64)
def _pixtral_layout(grids: tuple[tuple[int, int], ...],
                    stride: tuple[float, float]) -> tuple[PackedSequence, torch.Tensor]:
    cells = []
    for h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cells.append(torch.stack([rows, cols], dim=-1).reshape(-1, 2))
    sequence = packed_sequence(grids, cells)
    return sequence, sequence.positions(stride)


def _argument(args: tuple, kwargs: dict, name: str, index: int):
    return kwargs.get(name, args[index] if len(args) > index else None)


class _PackedPlacer(LayerPlacer):
    """What both kinds share: the tower's input of its running forward, and the attention module's own input.

    Args:
        model: the model, named in messages.
        tower_name: qualified name of the vision tower.
        tower: the tower; it receives the images' sizes.
        module: the recorded attention module.
    """

    _attention_argument: tuple[str, int]  # the attention forward's argument read per call

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module, module: nn.Module):
        self.model, self.tower_name, self.tower, self.module = model, tower_name, tower, module
        self._key = f"packed.{id(module)}"
        # The tower's forward starts before the recorder's call starts (at the first convolution, inside the
        # tower), which clears the call's context: the tower's input is kept here while the tower runs.
        self._tower_input: tuple | None = None

    def install(self, context: CallContext) -> list[torch.utils.hooks.RemovableHandle]:
        def see_tower(module, args, kwargs) -> None:
            self._tower_input = (args, kwargs)

        def forget_tower(module, args, output) -> None:
            self._tower_input = None

        def see_attention(module, args, kwargs) -> None:
            context.values[self._key] = {"input": _argument(args, kwargs, *self._attention_argument), "calls": 0}

        return [self.tower.register_forward_pre_hook(see_tower, with_kwargs=True),
                self.tower.register_forward_hook(forget_tower, always_call=True),
                self.module.register_forward_pre_hook(see_attention, with_kwargs=True)]

    def _seen(self, context: CallContext) -> tuple[tuple, dict, dict]:
        seen = context.values.get(self._key)
        if self._tower_input is None or seen is None:
            raise NotPlaceable(
                f"it ran outside a forward of its tower {self.tower_name} ({type(self.tower).__name__}), which "
                "gives the sizes of the packed images"
            )
        return (*self._tower_input, seen)


class QwenPlacer(_PackedPlacer):
    """Places one attention block of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower, or of a tower packed alike
    (``"qwen"`` and ``"row_major"`` designs): one call per chunk of ``cu_seqlens`` (``[1, heads, n_chunk,
    n_chunk]``), or one call when the sequence is one chunk.

    Args:
        block: the block's index in the tower's blocks, where the design has windows: whether it attends within
            Qwen2.5-VL's windows (else per image) is read from the tower in every call, as the tower reads it.
    """

    _attention_argument = ("cu_seqlens", 1)

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module, module: nn.Module, block: int | None,
                 design: _Design):
        super().__init__(model, tower_name, tower, module)
        self.block = block
        self.design = design
        # One merge size for the tower (1: row-major), or None: read per grid_thw row in every call.
        self.merge = (1 if design.kind == "row_major" else None if design.merge_argument
                      else int(functools.reduce(getattr, design.merge.split("."), tower)))
        patch = functools.reduce(getattr, design.patch.split("."), tower)
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))
        self.stride = (float(patch_h), float(patch_w))

    def _windows(self) -> tuple[int | None, bool]:
        """``(window, windowed)`` of this call, read from the tower as its forward reads them (a config changed
        inside the recording block is followed, not refused or misplaced): the window side in merge blocks by
        which the tower orders its whole sequence, once, before its first block (None: no windows), and whether
        this block attends within those windows (else per image, over that same window order)."""
        if not self.design.windows:
            return None, False
        window = int(self.tower.window_size) // self.merge // int(self.stride[0])
        windowed = (self.tower.config.layer_types[self.block] == "window_attention" if self.design.layer_types
                    else self.block not in self.tower.fullatt_block_indexes)
        return window, windowed

    def _merges(self, args: tuple, kwargs: dict, rows: int) -> list[int]:
        """The merge size of each of the ``rows`` grid_thw rows: the tower's one, or its argument's per row."""
        if self.merge is not None:
            return [self.merge] * rows
        name = self.design.merge_argument
        sizes = _argument(args, kwargs, name, 2)
        if sizes is None:
            raise NotPlaceable(f"its tower {type(self.tower).__name__} ran without {name}")
        sizes = [int(v) for v in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
        if len(sizes) < rows:
            raise NotPlaceable(f"its tower {type(self.tower).__name__} was given {name} {sizes}, fewer than the "
                               f"{rows} rows of {self.design.grid_argument}")
        return sizes[:rows]  # the tower pairs them with the rows by zip

    def _layout(self, args: tuple, kwargs: dict, cu_seqlens: torch.Tensor | None) -> tuple[ChunkLayout, str]:
        """The layout of the tower's images and the kind of this block's chunks, checked against the
        ``cu_seqlens`` the block received."""
        tower = type(self.tower).__name__
        argument = self.design.grid_argument
        given = [k for k in ("position_ids", "window_index", "cu_window_seqlens") if kwargs.get(k) is not None]
        if given:
            raise NotPlaceable(
                f"its tower {tower} was given precomputed {', '.join(given)}; vitmad places the tokens by the order "
                f"the tower derives from {argument}: call it with {argument} only"
            )
        grid_thw = _argument(args, kwargs, argument, 1)
        if grid_thw is None or cu_seqlens is None:
            raise NotPlaceable(f"its tower {tower} ran without {argument} or the block without cu_seqlens")
        given_thw = [tuple(int(v) for v in row) for row in grid_thw.tolist()]  # as the user gave it, for messages
        merges = self._merges(args, kwargs, len(given_thw))
        # Inkling2 counts merge blocks (its language model's image tokens): m x m patches each.
        unit = self.merge if self.design.grid_unit == "merge" else 1
        grid_thw = [(t, h * unit, w * unit) for t, h, w in given_thw]
        video = any(t != 1 for t, _, _ in grid_thw)
        if video and not (self.design.video_slices or self.design.whole_clip):
            counted = "merge blocks" if unit != 1 else "patches"
            why = self.design.video_refusal or ("vitmad places a video's temporal slices as images only in the "
                                                "towers whose per-slice chunks it was checked against")
            raise NotPlaceable(
                f"{argument} (t, h, w in {counted}: {given_thw}) holds a video (t > 1), and vitmad gives {tower} no "
                f"temporal placement ({why}); record images (t = 1) only"
            )
        odd = [(h, w) for (_, h, w), m in zip(grid_thw, merges) if h % m or w % m]
        if odd:
            said = merges[0] if len(set(merges)) == 1 else f"of each row, {merges}"
            raise NotPlaceable(f"{argument} has grids {odd} (patches) that are not multiples of the merge size "
                               f"{said}")
        if video and self.design.whole_clip:
            return self._clip_layout(grid_thw, merges, cu_seqlens)
        # A video's temporal slices attend each within itself (checked below against cu_seqlens): each is an entry
        # of the fold, as an image of h x w patches, in time order where the video's row is.
        grids = tuple((h, w) for t, h, w in grid_thw for _ in range(t))
        entry_merges = tuple(m for (t, _, _), m in zip(grid_thw, merges) for _ in range(t))
        window, windowed = self._windows()
        layout = _qwen_layout(grids, entry_merges, window, self.stride, windowed, self.design.class_tokens)
        kind = "global per image"
        if windowed:
            side = window * self.merge
            kind = f"window {side}x{side} patches" + (
                f" ({window}x{window} merge blocks)" if self.merge > 1 else "")
        received = tuple(int(v) for v in cu_seqlens.tolist())
        if received != layout.boundaries:
            merged = "" if len(set(merges)) == 1 else f", merge sizes {merges}"
            raise NotPlaceable(
                f"it received cu_seqlens {list(received)}, but the {kind} chunks of {argument} (t, h, w patches: "
                f"{grid_thw}{merged}{self._class_tokens_said()}) are {list(layout.boundaries)}; vitmad does not "
                "know this tower's token order"
            )
        return layout, kind

    def _clip_layout(self, grid_thw: list[tuple[int, int, int]], merges: list[int],
                     cu_seqlens: torch.Tensor) -> tuple[ChunkLayout, str]:
        """A call holding a video in a tower that attends each grid_thw row whole: every row a clip (an image row a
        clip of one temporal slice), one chunk each, checked against ``cu_seqlens``."""
        argument = self.design.grid_argument
        path = self.design.temporal_patch
        frame_stride = float(functools.reduce(getattr, path.split("."), self.tower)) if path else 1.0
        layout = _clip_layout(tuple(grid_thw), tuple(merges), self.stride, frame_stride)
        received = tuple(int(v) for v in cu_seqlens.tolist())
        if received != layout.boundaries:
            raise NotPlaceable(
                f"it received cu_seqlens {list(received)}, but the chunks of {argument} (t, h, w patches: {grid_thw}) "
                f"attended a clip (a row) at a time are {list(layout.boundaries)}; vitmad does not know this tower's "
                "token order"
            )
        return layout, "space-time per clip"

    def _class_tokens_said(self) -> str:
        count = self.design.class_tokens
        return f", each after {count} class token(s)" if count else ""

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        args, kwargs, seen = self._seen(context)
        if "layout" not in seen:  # once per forward of the block, not per chunk
            seen["layout"] = self._layout(args, kwargs, seen["input"])
        layout, kind = seen["layout"]
        return chunk_placement(seen, layout, self.stride, kind, lead, num_queries, num_keys)


def chunk_placement(seen: dict, layout: ChunkLayout, stride: tuple[float, float], kind: str, lead: torch.Size,
                    num_queries: int, num_keys: int) -> Placement:
    """The placement of the next of a block's one-call-per-chunk attention calls in this forward (``seen["calls"]``
    counts them): the chunk's tokens, checked against its ``cu_seqlens`` bounds (``layout.boundaries``), folded
    over the whole packed ``layout.sequence``. Shared by the Qwen-like towers and MiniCPM-V's."""
    chunk = seen["calls"]
    seen["calls"] += 1
    chunks = len(layout.boundaries) - 1
    if chunk >= chunks:
        raise NotPlaceable(f"it made more attention calls than its {chunks} chunks of cu_seqlens")
    start, end = layout.boundaries[chunk], layout.boundaries[chunk + 1]
    if len(lead) != 2 or lead[0] != 1 or num_queries != num_keys or num_queries != end - start:
        shape = f"[{', '.join(map(str, lead))}, {num_queries}, {num_keys}]"
        if num_queries == layout.boundaries[-1] and chunks > 1:
            raise NotPlaceable(
                f"its attention is one call {shape} over the whole packed sequence of {chunks} chunks "
                "(flash attention's variable-length call, whose chunks vitmad's capture does not receive); "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        raise NotPlaceable(
            f"its attention call {chunk} has shape {shape}, but chunk {chunk} of cu_seqlens is "
            f"[1, heads, {end - start}, {end - start}]"
        )
    heads = int(lead[1])
    sequence = layout.sequence
    return Placement(layout.positions[start:end], None, sequence.fold(heads),
                     sequence.geometry(stride, kind, heads, layout.frame_stride), present=sequence.present(),
                     consecutive_chunks=True, time_positions=None if layout.times is None else layout.times[start:end])


class PixtralPlacer(_PackedPlacer):
    """Places one attention layer of Pixtral's vision tower: one call ``[1, heads, N, N]`` over the packed images
    with their block-diagonal mask."""

    _attention_argument = ("attention_mask", 1)

    def __init__(self, model: nn.Module, tower_name: str, tower: nn.Module, module: nn.Module):
        super().__init__(model, tower_name, tower, module)
        self.patch = int(tower.patch_size)
        self.stride = (float(self.patch), float(self.patch))

    def place(self, context: CallContext, lead: torch.Size, num_queries: int, num_keys: int) -> Placement:
        args, kwargs, seen = self._seen(context)
        pixels = _argument(args, kwargs, "pixel_values", 0)
        sizes = _argument(args, kwargs, "image_sizes", 1)
        if sizes is None:
            sizes = [tuple(pixels.shape[-2:])] * int(pixels.shape[0])
        elif isinstance(sizes, torch.Tensor):
            sizes = sizes.tolist()
        # The tower pairs the images with image_sizes by zip: the shorter of the two counts.
        grids = tuple((int(h) // self.patch, int(w) // self.patch) for _, (h, w) in zip(range(pixels.shape[0]), sizes))
        sequence, positions = _pixtral_layout(grids, self.stride)
        tokens = int(positions.shape[0])
        if len(lead) != 2 or lead[0] != 1 or num_queries != num_keys or num_queries != tokens:
            raise NotPlaceable(
                f"its attention has shape [{', '.join(map(str, lead))}, {num_queries}, {num_keys}], but the "
                f"images of sizes {[list(map(int, s)) for s in sizes]} pack into [1, heads, {tokens}, {tokens}]"
            )
        if seen["input"] is None and len(grids) > 1:
            raise NotPlaceable(
                f"it attends over {len(grids)} packed images without their block-diagonal mask (flash attention's "
                "variable-length call, whose chunks vitmad's capture does not receive); load the model with "
                "attn_implementation='sdpa' or 'eager'"
            )
        if len(grids) > 1:
            _check_block_diagonal(context, seen["input"], grids, tokens)
        heads = int(lead[1])
        return Placement(positions, None, sequence.fold(heads),
                         sequence.geometry(self.stride, "global per image (block-diagonal mask)", heads),
                         present=sequence.present())



def _check_block_diagonal(context: CallContext, mask: torch.Tensor, grids: tuple[tuple[int, int], ...],
                          tokens: int) -> None:
    """Refuse a mask that lets a token attend to another image's (Pixtral's own mask, from
    ``generate_block_attention_mask``, replaced or edited): those keys would be placed at their cells on their own
    image's grid and measured as if they lay on the query's image (49.7 px for 19.8 px, QA 269). Checked once per
    mask of a call (every layer of the tower gets the same one).

    Raises:
        NotPlaceable: naming the pairs of images the mask joins.
    """
    key = f"packed.mask_checked.{id(mask)}"
    if context.values.get(key) is mask:
        return
    # Image by image, the rows of its queries against the keys of the images after it and before it: a slice of the
    # mask at a time (a whole-mask comparison took 8 times the mask's memory, 4 GiB more for four 64 x 64 images,
    # QA 270).
    ends = torch.tensor([h * w for h, w in grids]).cumsum(0).tolist()
    for image, end in enumerate(ends):
        start = end - grids[image][0] * grids[image][1]
        rows = mask[..., start:end, :]
        for columns in (slice(0, start), slice(end, tokens)):
            part = rows[..., columns]
            opened = part if part.dtype == torch.bool else part > torch.finfo(part.dtype).min / 2
            if part.numel() and bool(opened.any()):
                column = int(opened.reshape(-1, part.shape[-1]).any(0).nonzero()[0]) + columns.start
                joined = next(i for i, e in enumerate(ends) if column < e)
                raise NotPlaceable(
                    f"its attention_mask lets the tokens of image {image} attend to those of image {joined} "
                    "(Pixtral's own mask is block-diagonal over the packed images): another image's tokens have no "
                    "position on the query's image, so MAD is not defined there; keep the model's own mask, or run "
                    "one image per forward")
    context.values[key] = mask


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The packed towers' attention modules, by qualified name: transformers' discovery finds those with
    ``qkv`` or ``q_proj`` / ``k_proj``, not Qwen2.5-Omni's, whose projections are named ``q``, ``k`` and ``v``."""
    return {name: m for name, m in named_module_list(model) if _design_of(m, "attention") is not None}


def token_convolutions(model: nn.Module) -> set[int]:
    """Ids of the convolutions inside packed towers that run on the tower's tokens, once per image (LFM3-VL's gated
    convolution layers), not on the image: the recorder starts no call at them."""
    found = set()
    for tower in _towers(model).values():
        design = _design_of(tower, "tower")
        if design.token_convolution:
            for module in tower.modules():
                if type(module).__name__ == design.token_convolution and type(module).__module__ == design.module:
                    found.update(id(m) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    return found


def _towers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in named_module_list(model) if _design_of(m, "tower") is not None}


def placer(model: nn.Module, name: str, module: nn.Module):
    """The placer of a packed tower's attention module; a :class:`~.Skip` for any other attention module of a
    model holding such a tower (a vision-language model's text attention); None otherwise."""
    from . import Skip

    design = _design_of(module, "attention")
    towers = _towers(model) if design is not None or type(model).__module__.startswith("transformers.") else {}
    tower_name = next((t for t in towers if name.startswith(t + ".") or t == ""), None)
    if design is None:
        if towers and tower_name is None:
            return Skip(f"outside the vision tower {next(iter(towers)) or type(model).__name__}: a language model's "
                        "attention over text tokens, which have no position on the image")
        return None
    if design.kind == "refused":
        return RefusingPlacer(design.reason)
    if tower_name is None:
        return RefusingPlacer(f"it is not inside a {design.tower}, which gives the sizes of the packed images")
    tower = model.get_submodule(tower_name)
    if design.kind == "pixtral":
        return PixtralPlacer(model, tower_name, tower, module)
    index = None
    if design.windows:
        block = name[len(tower_name):].lstrip(".").split(".")
        if len(block) < 2 or block[0] != design.blocks or not block[1].isdigit():
            return RefusingPlacer(
                f"it is not in {design.tower}.{design.blocks}, whose index says whether it attends in windows")
        # Whether it attends in windows is read per call; each call's cu_seqlens are checked against the chunks
        # that choice makes.
        index = int(block[1])
    return QwenPlacer(model, tower_name, tower, module, index, design)
