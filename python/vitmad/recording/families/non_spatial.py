"""Attention layers that are not spatial softmax attention over positioned tokens: skipped, with the reason.

Their MAD is not defined (``docs/definition.md``): the softmax runs over channels, over a token's own
neighbourhood without a query-key product, over the keys alone (CoaT's factorized attention), or not at all (ReLU
linear attention), or from queries that have no place on the image (the learned latent query of attention
pooling; class attention, whose class-token maps :mod:`.class_attention` records on request), or between a SAM-style
mask decoder's prompt tokens and the image embedding; or its tokens are not the image's at all (audio frames, one
token per video frame).
"""

from __future__ import annotations

from torch import nn

from ..module_index import is_known_library, named_module_list
from .stages import innermost_on_path
from .windows import parent_module

# class name -> why its attention has no MAD. (timm's AttentionPool2d and RotAttentionPool2d are placed by
# .attention_pool2d first; these reasons are those of other classes so named, OpenAI's and open_clip's.)
_REASONS = {
    "AttentionPoolLatent": "attention pooling: learned latent queries without a position on the image",
    "Aimv2AttentionPoolingHead": "attention pooling: a learned query without a position on the image",
    "AttentionPool2d": "attention pooling: one pooled query without a position on the image",
    "RotAttentionPool2d": "attention pooling: one pooled query without a position on the image",
    "XCA": "cross-covariance attention: the softmax runs over channels, not tokens (XCiT)",
    "CrossCovarianceAttn": "cross-covariance attention: the softmax runs over channels, not tokens (EdgeNeXt)",
    "ChannelAttention": "channel attention: the softmax runs over channels, not tokens (DaViT)",
    "ChannelAttentionV2": "channel attention: the softmax runs over channels, not tokens (DaViT)",
    "Florence2VisionChannelAttention": "channel attention: the softmax runs over channels, not tokens (Florence-2's "
                                       "DaViT)",
    "OutlookAttention": "outlook attention: each token's weights over its neighbourhood come from a linear "
                        "layer, not a query-key softmax (VOLO)",
    # Beside an image tower in one model, and named in layers= (or recorded alone): their tokens are audio frames or
    # whole video frames, never cells of an image, whatever layout is given by hand.
    "Gemma3nAudioAttention": "attention over audio frames (Gemma 3n's audio conformer: chunked local attention over "
                             "time with soft-capped logits): no token has a position on the image",
    "PeAudioEncoderAttention": "attention over audio frames (PE-Audio's encoder, a class token first): no token has "
                               "a position on the image",
    "PeVideoEncoderAttention": "attention over a video's frames (PE-Video's temporal encoder: one token per frame, "
                               "a class token first): no token has a position on the image",
    "PeAudioVideoEncoderAttention": "attention over audio-video frames (PE-Audio-Video's encoder: audio frames fused "
                                    "with the video's frames, a class token first): no token has a position on the "
                                    "image",
    "ClapAudioSelfAttention": "attention over an audio clip's mel spectrogram (CLAP's HTSAT audio encoder: Swin "
                              "windows over spectrogram patches, the clip's time folded into rows of a square "
                              "image): no token has a position on an image",
    # Keypoint matchers: the tokens are the keypoints a detector found in each image of a pair, a varying set at
    # sub-pixel places, no cells of a grid; the cross layers' keys lie on the other image.
    "SuperGlueSelfAttention": "attention among keypoints (SuperGlue's graph network: self-attention among one "
                              "image's keypoints, cross-attention to the other image's): its tokens are the "
                              "keypoints the detector found, not cells of the image's grid",
    "LightGlueAttention": "attention among keypoints (LightGlue: self-attention among one image's keypoints, "
                          "cross-attention to the other image's): its tokens are the keypoints the detector found, "
                          "not cells of the image's grid",
}
# Class names too common to match alone: (class name, defining module's suffix) -> reason.
_REASONS_IN = {
    ("CrossAttention", "crossvit"): "cross-attention from one branch's class token to the other branch (CrossViT)",
    # Attention that forms no softmax row per query over the tokens.
    ("FactorAttnConvRelPosEnc", "coat"): "factorized attention (CoaT): softmax(k)^T v is applied to the queries, so "
                                         "no query has attention weights over the tokens",
    ("LiteMLA", "efficientvit_mit"): "ReLU linear attention (EfficientViT-MIT's LiteMLA): relu(k)^T v is applied to "
                                     "relu(q), so no softmax over the tokens is formed",
    ("LambdaLayer", "lambda_layer"): "lambda layer (LambdaNetworks): softmax(k) over the positions gives a content "
                                     "lambda, softmax(k)^T v, applied to the queries with a positional one from a "
                                     "convolution, so no query has attention weights over the tokens",
    # Its refusal said no patch embedding was found and asked for positions= or patch= and grid=, neither of which
    # can place a latent (QA 271).
    ("PerceiverSelfAttention", "modeling_perceiver"): "Perceiver's attention: its learned latents, the queries of its "
                                                      "cross-attention to the inputs and the tokens of its "
                                                      "self-attention, have no position on the image",
    # A softmax over the image's tokens, but no query per token (QA 274: refused as having no attention, with
    # advice to name them in layers=, which then failed twice).
    ("HSMSSD", "efficientvim"): "hidden-state mixer (EfficientViM's HSM-SSD): a softmax over the tokens per latent "
                                "state, read back through the states, so no query token has attention weights over "
                                "the tokens",
    ("GlobalContext", "global_context"): "global context block (GCNet): one softmax over the positions pools a "
                                         "single context vector, no query per token",
    ("SLANetAttentionGRUCell", "modeling_slanet"): "additive attention of SLANet's table-structure decoder: each "
                                                   "step's query is the GRU's state, without a position on the "
                                                   "image, scoring the map's tokens through tanh",
}
# Of those, the ones the generic discovery does not find (no fused_attn switch, no query/key projections it
# knows): attention_modules lists them, so that they are skipped with the reason rather than the model refused
# as having no attention at all.
_UNDISCOVERED = {("FactorAttnConvRelPosEnc", "coat"), ("LiteMLA", "efficientvit_mit"), ("LambdaLayer", "lambda_layer"),
                 ("SLANetAttentionGRUCell", "modeling_slanet"), ("OutlookAttention", "volo"),
                 ("HSMSSD", "efficientvim"), ("GlobalContext", "global_context")}


def _class_key(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, cls.__module__.rpartition(".")[2]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """CoaT's factorized, EfficientViT-MIT's ReLU linear, LambdaNet's and SLANet's additive, VOLO's outlook
    attention (absent from rec.skipped by default, which the README said it was in; QA 264), and the
    transformers detectors' deformable attention, by qualified name, to list them as skipped (a detector with a
    convolutional backbone is refused naming its deformable encoder, not only its decoder)."""
    return {name: m for name, m in named_module_list(model) if _class_key(m) in _UNDISCOVERED or _is_deformable(m)}


def _is_deformable(module: nn.Module) -> bool:
    """A transformers ``*MultiscaleDeformableAttention`` (``MultiScale`` in some files)."""
    return type(module).__name__.lower().endswith("multiscaledeformableattention") and \
        type(module).__module__.startswith("transformers.")


_POOLING_QUERY = "attention pooling: a learned query without a position on the image"


def _pools_with_learned_query(model: nn.Module, name: str, module: nn.Module) -> bool:
    """A ``torch.nn.MultiheadAttention`` that an attention-pooling head calls with its learned query (transformers'
    SigLIP heads hold it as ``probe``): its queries are not the image's tokens. A class of the user's named as an
    attention pool holds that query itself (a parameter of its own): one holding none, whose layer attends over the
    tokens before it pools them, was skipped by its name (QA 424)."""
    if not isinstance(module, nn.MultiheadAttention) or "." not in name:
        return False
    owner = model.get_submodule(name.rpartition(".")[0])
    if isinstance(getattr(owner, "probe", None), nn.Parameter):
        return True
    return "AttentionPool" in type(owner).__name__ and (
        is_known_library(type(owner)) or any(p is not None for p in owner._parameters.values()))


# Deformable DETR and its kin (RT-DETR, D-FINE, Grounding DINO, Mask2Former's pixel decoder, ...): every
# transformers class named *MultiscaleDeformableAttention.
_DEFORMABLE = ("deformable attention: each query's softmax runs over a few points sampled from the feature maps at "
               "learned offsets, not over the tokens, so no query has attention weights over the tokens")


# (owner class name, attribute) -> reason, for attention modules of a class used for spatial attention elsewhere.
_REASONS_AS = {
    ("XCLIPVisionEncoderLayer", "message_attn"): "attention across a video's frames between their message tokens "
                                                 "(X-CLIP): one token per frame, no position on the image",
}

# (grandparent class name, parent attribute) -> reason: attention modules held by a wrapper whose own name in its
# owner says what it attends to (EfficientLoFTR's self- and cross-attention are the same two classes).
_REASONS_UNDER = {
    ("EfficientLoFTRLocalFeatureTransformerLayer", "cross_attention"):
        "cross-attention from one image of a pair to the other (EfficientLoFTR): the keys lie on another image, so "
        "no distance on the query's image is defined",
}


def _reason_under(model: nn.Module, name: str) -> str | None:
    parts = name.split(".")
    if len(parts) < 3:
        return None
    grandparent = model.get_submodule(".".join(parts[:-2]))
    return _REASONS_UNDER.get((type(grandparent).__name__, parts[-2]))


# The two-way transformer of a SAM-style mask decoder (SAM, SAM-HQ, SAM2, SAM2-video, EdgeTAM, EdgeTAM-video, SAM3's
# tracker; every transformers class named *TwoWayTransformer): prompt tokens and the image embedding attend to each
# other, and the prompt tokens' self-attention has no token of the image.
_TWO_WAY = ("two-way transformer of the mask decoder: prompt (point/box) tokens and the image embedding attend to "
            "each other, not image self-attention")


def _in_two_way_transformer(model: nn.Module, name: str) -> bool:
    return innermost_on_path(model, name, lambda m: type(m).__name__.endswith("TwoWayTransformer")
                             and type(m).__module__.startswith("transformers.")) is not None


# X-CLIP's multi-frame integration transformer (``mit``): its tokens are the frames' pooled CLS embeddings, one per
# frame. Its attention class is the text's and the vision tower's own, so it is told by where it sits (QA 357: named
# in layers= with a grid stated, it was recorded as an image's grid).
_FRAME_INTEGRATION = ("attention over a video's frames (X-CLIP's multi-frame integration transformer: one token per "
                      "frame, the frame's pooled embedding), no position on the image")


def _in_frame_integration(model: nn.Module, name: str) -> bool:
    return innermost_on_path(model, name, lambda m: type(m).__name__ == "XCLIPMultiframeIntegrationTransformer"
                             and type(m).__module__.startswith("transformers.")) is not None


def placer(model: nn.Module, name: str, module: nn.Module):
    from . import Skip

    cls = type(module)
    reason = _REASONS.get(cls.__name__) or _REASONS_IN.get(_class_key(module))
    if reason is None:
        reason = _REASONS_AS.get((type(parent_module(model, name)).__name__, name.rpartition(".")[2]))
    # By where they sit: only the attention modules there (a wildcard in layers= names their norms, projections and
    # blocks too, which are no attention to skip).
    if reason is None and cls.__name__.endswith("Attention"):
        reason = _reason_under(model, name)
        if reason is None and _in_two_way_transformer(model, name):
            reason = _TWO_WAY
        if reason is None and _in_frame_integration(model, name):
            reason = _FRAME_INTEGRATION
    if reason is None and _pools_with_learned_query(model, name, module):
        reason = _POOLING_QUERY
    if reason is None and _is_deformable(module):
        reason = _DEFORMABLE
    return None if reason is None else Skip(reason)
