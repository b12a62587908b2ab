"""Sweep: try ``vitmad.record`` on every timm architecture, every transformers vision model family,
torchvision's transformers, and the models of vit-pytorch, MONAI, Ultralytics and Segment Anything / SAM 2.

One line per architecture: recorded (layers, heads, token strides; layers skipped with their reason), refused
(vitmad's message), no attention (a CNN), or ERROR (anything else: a defect to fix). For every recorded model
the sweep also checks that the model's output is bit-identical with and without recording and that every MAD
is finite and between 0 and the image diagonal. Exactness against each family's eager attention is the job of
the tests (``tests/recording/``); the sweep shows what a new user meets across the libraries.

Models are built with random weights (nothing is downloaded): for timm the smallest model name of each model
module (``--per model`` tries every name), at its default input size; for transformers each family's default
configuration with two layers per stage where the config allows.

    python benchmarks/sweep_models.py                 # timm and transformers, summary at the end
    python benchmarks/sweep_models.py --library timm --filter 'swin*'
    python benchmarks/sweep_models.py --write         # also writes the table into benchmarks/RESULTS.md
    python benchmarks/sweep_models.py --stats         # records every statistic and the prefix maps too
    python benchmarks/sweep_models.py --library torchvision   # its ViT, Swin, Swin V2, MaxViT, video Swin and MViT
    python benchmarks/sweep_models.py --library vit_pytorch   # also monai, ultralytics, segment_anything (+ sam2)
    python benchmarks/sweep_models.py --library diffusers     # every transformer, UNet and ControlNet class

``--library vit_pytorch``, ``monai``, ``ultralytics`` and ``segment_anything`` build the models listed in
``benchmarks/_library_models.py``: every model class of vit-pytorch's modules, MONAI's nets with attention and four
without, every packaged Ultralytics yaml (``YOLO_OFFLINE=1``; a yaml whose layers would download weights is listed as
not run), Segment Anything's packaged ``vit_b`` model and each config's encoder, and every packaged SAM 2 config,
each small or on a small image. ``--library diffusers`` builds every model class of diffusers' ``models.transformers``,
``models.unets`` and ``models.controlnets`` tiny, with the inputs its pipeline would pass
(``benchmarks/_diffusers_models.py``); audio, music and protein models are listed as "not vision", a diffusers model
whose attention modules vitmad does not take for layers as refused (not "no attention"). A model that cannot be
built, or whose own forward fails without vitmad, is listed as "not run" with the reason; a recording that names its
modules but finds no attention in them is "refused when read" (the error reading ``rec.mad`` gives).

With ``--stats`` each recording also asks for entropy, prefix mass, self mass and the prefix maps, and the line
says ERROR where one is outside its range (entropy in [0, ln N], masses and maps in [0, 1], self mass NaN only in
layers whose keys are not the queries).
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import random
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _library_models  # noqa: E402
from _results import machine, markdown_table, write_section  # noqa: E402

# Smaller first: the sweep runs one model per timm module, so it picks the cheapest name.
_SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "mini", "small", "s0", "t", "s", "m", "b")

# transformers families: (label, config class, model class, config overrides).
HF_FAMILIES = [
    ("ViT", "ViTConfig", "ViTModel", {}),
    ("DeiT", "DeiTConfig", "DeiTModel", {}),
    ("BEiT", "BeitConfig", "BeitModel", {"use_relative_position_bias": True}),
    ("Data2VecVision", "Data2VecVisionConfig", "Data2VecVisionModel", {}),
    ("DINOv2", "Dinov2Config", "Dinov2Model", {}),
    ("DINOv2 registers", "Dinov2WithRegistersConfig", "Dinov2WithRegistersModel", {}),
    ("DINOv3 ViT", "DINOv3ViTConfig", "DINOv3ViTModel", {}),
    ("ViTMAE", "ViTMAEConfig", "ViTMAEModel", {"mask_ratio": 0.0}),
    ("ViTMSN", "ViTMSNConfig", "ViTMSNModel", {}),
    ("IJEPA", "IJepaConfig", "IJepaModel", {}),
    ("CLIP vision", "CLIPVisionConfig", "CLIPVisionModel", {}),
    ("SigLIP vision", "SiglipVisionConfig", "SiglipVisionModel", {}),
    ("SigLIP2 vision", "Siglip2VisionConfig", "Siglip2VisionModel", {}),
    ("AIMv2 vision", "Aimv2VisionConfig", "Aimv2VisionModel", {}),
    ("RADIO", "RadioConfig", "RadioModel", {}),
    ("Swin", "SwinConfig", "SwinModel", {}),
    ("Swinv2", "Swinv2Config", "Swinv2Model", {}),
    ("DonutSwin", "DonutSwinConfig", "DonutSwinModel", {}),
    ("MaskFormerSwin", "MaskFormerSwinConfig", "MaskFormerSwinModel", {}),
    ("Hiera", "HieraConfig", "HieraModel", {}),
    ("VitDet", "VitDetConfig", "VitDetModel", {}),
    ("SAM vision", "SamVisionConfig", "SamVisionModel", {}),
    ("PVT", "PvtConfig", "PvtModel", {}),
    ("PVTv2", "PvtV2Config", "PvtV2Model", {}),
    ("Segformer", "SegformerConfig", "SegformerModel", {}),
    ("YOLOS", "YolosConfig", "YolosModel", {}),
    ("DPT", "DPTConfig", "DPTModel", {}),
    ("DPT hybrid", "DPTConfig", "DPTModel", {"is_hybrid": True}),
    ("BLIP vision", "BlipVisionConfig", "BlipVisionModel", {}),
    ("FLAVA image", "FlavaImageConfig", "FlavaImageModel", {}),
    ("LeViT", "LevitConfig", "LevitModel", {}),
    ("MobileViT", "MobileViTConfig", "MobileViTModel", {}),
    ("CvT", "CvtConfig", "CvtModel", {}),
    ("MobileViTV2", "MobileViTV2Config", "MobileViTV2Model", {}),
    ("AltCLIP vision", "AltCLIPVisionConfig", "AltCLIPVisionModel", {}),
    ("Chinese-CLIP vision", "ChineseCLIPVisionConfig", "ChineseCLIPVisionModel", {}),
    ("MetaCLIP 2 vision", "MetaClip2VisionConfig", "MetaClip2VisionModel", {}),
    ("MLCD vision", "MLCDVisionConfig", "MLCDVisionModel", {}),
    ("OWL-ViT vision", "OwlViTVisionConfig", "OwlViTVisionModel", {}),
    ("OWLv2 vision", "Owlv2VisionConfig", "Owlv2VisionModel", {}),
    ("CLIPSeg vision", "CLIPSegVisionConfig", "CLIPSegVisionModel", {}),
    ("BLIP-2 vision", "Blip2VisionConfig", "Blip2VisionModel", {}),
    ("InstructBLIP vision", "InstructBlipVisionConfig", "InstructBlipVisionModel", {}),
    ("Janus vision", "JanusVisionConfig", "JanusVisionModel", {}),
    ("TIPSv2 vision", "Tipsv2VisionConfig", "Tipsv2VisionModel", {}),
    ("Pixio", "PixioConfig", "PixioModel", {}),
    ("Sapiens2", "Sapiens2Config", "Sapiens2Model", {}),
    ("VitPose backbone", "VitPoseBackboneConfig", "VitPoseBackbone", {}),
    ("Florence-2 vision", "Florence2VisionConfig", "Florence2VisionBackbone", {}),
    ("EoMT", "EomtConfig", "EomtForUniversalSegmentation", {"num_blocks": 1}),
    ("Swin2SR", "Swin2SRConfig", "Swin2SRModel", {}),
    ("Pix2Struct vision", "Pix2StructVisionConfig", "Pix2StructVisionModel", {}),
    # Tested since 2026-12-05 (tests/recording/test_record_more_towers*.py, test_record_windowed_vit.py).
    ("SAM-HQ vision", "SamHQVisionConfig", "SamHQVisionModel", {}),
    ("GIT vision", "GitVisionConfig", "GitVisionModel", {}),
    ("InternVL vision", "InternVLVisionConfig", "InternVLVisionModel", {}),
    ("Qianfan-OCR vision", "QianfanOCRVisionConfig", "QianfanOCRVisionModel", {}),
    ("Granite Docling vision", "GraniteDoclingVisionConfig", "GraniteDoclingVisionModel", {}),
    ("InstructBLIP-Video vision", "InstructBlipVideoVisionConfig", "InstructBlipVideoVisionModel", {}),
    ("Step3p7 vision", "Step3p7VisionConfig", "Step3p7VisionModel", {}),
    ("MGP-STR", "MgpstrConfig", "MgpstrForSceneTextRecognition", {}),
]


def _size_rank(name: str) -> tuple:
    parts = name.replace("-", "_").split("_")
    ranks = [i for i, word in enumerate(_SIZE_WORDS) for part in parts if part == word or part.startswith(word)
             and part[len(word):].isdigit()]
    return (min(ranks) if ranks else len(_SIZE_WORDS), len(name), name)


def timm_candidates(per: str, pattern: str) -> list[tuple[str, str]]:
    """(module, model name) pairs to try."""
    import timm

    chosen = []
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if fnmatch.fnmatch(n, pattern)]
        if not names:
            continue
        chosen += [(module, n) for n in names] if per == "model" else [(module, min(names, key=_size_rank))]
    return chosen


# What --stats records besides MAD.
ALL_STATS = ["entropy", "prefix_mass", "self_mass", "prefix_maps"]
_record_stats = ["mad"]


def _statistics_problem(rec) -> str | None:
    """What is wrong with the recorded statistics, if anything (--stats)."""
    slack = 1e-4
    for index, name in enumerate(rec.layers):
        heads = rec.geometry[index].heads
        values = {stat: rec.calls[-1].statistics[stat][index][:, :heads] for stat in ALL_STATS[:3]}
        entropy = values["entropy"]
        if not bool(entropy.isfinite().all()) or float(entropy.min()) < -slack or float(entropy.max()) > 20:
            return f"entropy of {name} outside [0, ln N]: {entropy.min():.3g} to {entropy.max():.3g}"
        for stat in ("prefix_mass", "self_mass"):
            mass = values[stat]
            finite = mass[mass.isfinite()]
            if stat == "prefix_mass" and finite.numel() != mass.numel():
                return f"prefix_mass of {name} not finite"
            if finite.numel() and (float(finite.min()) < -slack or float(finite.max()) > 1 + slack):
                return f"{stat} of {name} outside [0, 1]: {finite.min():.3g} to {finite.max():.3g}"
        maps = rec.calls[-1].prefix_maps[index]
        if maps is not None and (not bool(maps.isfinite().all()) or float(maps.min()) < -slack
                                 or float(maps.sum(-1).max()) > 1 + slack):
            return f"prefix maps of {name} not rows of probabilities"
    return _class_maps_problem(rec)


def _class_maps_problem(rec) -> str | None:
    """What is wrong with the class-attention maps (--stats), if anything: each is part of a row of
    probabilities (the class token's own key is left out)."""
    for name, maps in zip(rec.calls[-1].class_layers, rec.calls[-1].class_maps):
        if not bool(maps.isfinite().all()) or float(maps.min()) < -1e-4 or float(maps.sum(-1).max()) > 1 + 1e-4:
            return f"class-attention maps of {name} not rows of probabilities"
    return None


def _check(model: torch.nn.Module, pixels, forward, extent: tuple[int, ...] | None = None,
           frames: int | None = None) -> str:
    """Record one forward; the sweep line's verdict. ``extent``: the input's spatial size that bounds the MAD where
    ``pixels`` is not one tensor of that shape (packed images); by default its last two dims, or three for volumes.
    ``frames``: the frame count that bounds the temporal MAD where ``pixels`` is not a ``[B, C, T, H, W]`` tensor."""
    import vitmad

    with torch.inference_mode():
        # Models that draw noise in their forward (ViTMAE's shuffle, vit-pytorch's Dino augmentations, which draw
        # from Python's random) draw the same twice.
        torch.manual_seed(0)
        random.seed(0)
        try:
            plain = forward(model, pixels)
        except Exception as err:  # noqa: BLE001 - a model that fails without vitmad is not vitmad's finding
            return f"not run: its own forward fails without vitmad: {type(err).__name__}: {str(err)[:200]}"
        try:
            with vitmad.record(model, stats=_record_stats) as rec:
                torch.manual_seed(0)
                random.seed(0)
                recorded = forward(model, pixels)
        except ValueError as err:
            message = str(err)
            if "found no attention layer" in message:
                if any(callable(getattr(m, "set_processor", None)) for m in model.modules()):
                    # diffusers' attention modules (their processors) that vitmad does not take for layers: the
                    # model has attention, vitmad refused it.
                    return "refused: " + message.replace("vitmad.record: ", "")
                return "no attention"
            if "has no layer with spatial softmax attention" in message:
                # The finding alone (NoLayerError): the advice after it is no part of the table's reasons.
                finding = getattr(err, "finding", message)
                return "no spatial attention: " + finding.split("(", 1)[-1].rstrip(")")
            return "refused: " + message.replace("vitmad.record: ", "")
    same = all(torch.equal(a, b) for a, b in zip(_tensors(plain), _tensors(recorded)))
    if not rec.layers and not rec.calls[-1].class_layers and not rec.skipped:
        try:  # modules taken for attention that computed none vitmad sees: refused when the recording is read
            _ = rec.mad
        except (RuntimeError, ValueError) as err:
            return "refused when read: " + str(err).replace("vitmad.record: ", "")
    if not rec.layers:  # XCiT with --stats: class attention alone, whose maps are recorded
        problem = _class_maps_problem(rec)
        line = (f"no spatial attention: class-attention maps in {len(rec.calls[-1].class_layers)} layers"
                + ("" if problem is None else f" (ERROR: {problem})") + " and no layer with a MAD; "
                + "; ".join(f"{n}: {r}" for n, r in list(rec.skipped.items())[:2]))
        return line if same else "ERROR: output changed by recording; " + line
    if extent is None:
        volume = all(g.depth is not None for g in rec.geometry)  # MONAI's 3-D models: MAD over three axes
        extent = tuple(pixels.shape[-3:] if volume else pixels.shape[-2:])
    diagonal = math.hypot(*extent)
    values = torch.cat([t.flatten().float() for t in rec.per_layer])
    sane = bool(values.isfinite().all()) and float(values.min()) >= 0 and float(values.max()) <= diagonal
    heads = sorted(set(rec.geometry[i].heads for i in range(len(rec.layers))))
    strides = sorted({g.stride[0] for g in rec.geometry})
    line = (f"recorded {len(rec.layers)} layers, heads {'/'.join(map(str, heads))}, "
            f"stride {'/'.join(f'{s:g}' for s in strides)} px, MAD {values.min():.1f}-{values.max():.1f} px")
    if all(g.frames is not None for g in rec.geometry):  # a video model ([B, C, T, H, W]): frames apart, too
        times = torch.cat([t.flatten().float() for t in rec.calls[-1].temporal])
        sane = (sane and bool(times.isfinite().all()) and float(times.min()) >= 0
                and float(times.max()) <= (pixels.shape[-3] if frames is None else frames))
        line += f", temporal MAD {times.min():.2f}-{times.max():.2f} frames"
    if rec.skipped:
        reasons = Counter(rec.skipped.values())
        line += "; skipped " + "; ".join(f"{count} x {reason}" for reason, count in reasons.items())
    if len(_record_stats) > 1:
        maps = sum(m is not None for m in rec.calls[-1].prefix_maps)
        classes = len(rec.calls[-1].class_layers)
        problem = _statistics_problem(rec)
        line += f"; statistics ok, prefix maps in {maps} layers" if problem is None else ""
        line += f", class-attention maps in {classes} layers" if problem is None and classes else ""
        if problem is not None:
            line = f"ERROR: {problem}; " + line
    if not same:
        line = "ERROR: output changed by recording; " + line
    if not sane:
        line = "ERROR: MAD not finite or outside [0, image diagonal] (temporal MAD: [0, frames]); " + line
    return line


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):  # nested too: diffusers' ControlNets return lists of block residuals
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def sweep_timm(per: str, pattern: str, max_params: float) -> list[tuple[str, str, str]]:
    import timm

    rows = []
    for module, name in timm_candidates(per, pattern):
        start = time.perf_counter()
        try:
            # Counted on the meta device first: building a multi-billion-parameter model only to skip it ran a
            # 24 GiB machine out of memory (the --per model sweep of 2026-12-01).
            with torch.device("meta"):
                params = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()) / 1e6
            if params > max_params:
                rows.append((module, name, f"not run: {params:.0f} M parameters (> --max-params)"))
                continue
            model = timm.create_model(name, pretrained=False).eval()
            size = model.pretrained_cfg.get("input_size", (3, 224, 224))
            pixels = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
            verdict = _check(model, pixels, lambda m, x: m(x))
        except Exception as err:  # noqa: BLE001 - the sweep reports every failure, it never stops
            verdict = f"ERROR: {type(err).__name__}: {str(err)[:300]}"
        rows.append((module, name, verdict))
        print(f"{module:28s} {name:44s} {verdict}  [{time.perf_counter() - start:.1f} s]", flush=True)
    return rows


def _shrink(config) -> None:
    """Two layers per stage where the config says how many: the sweep checks layouts, not depth."""
    if hasattr(config, "num_hidden_layers") and isinstance(config.num_hidden_layers, int):
        config.num_hidden_layers = min(config.num_hidden_layers, 2)
    for key in ("depths", "num_encoder_blocks"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            setattr(config, key, [min(d, 2) for d in value])


def _naflex_forward(config):
    """SigLIP2 (NaFlex) takes patches, not images: the image cut into its patch grid, all patches valid."""
    patch = config.patch_size

    def forward(model, pixels):
        batch, channels, height, width = pixels.shape
        grid = (height // patch, width // patch)
        patches = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, gh, gw, p, p]
        patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(batch, grid[0] * grid[1], patch * patch * channels)
        mask = torch.ones(batch, grid[0] * grid[1], dtype=torch.long)
        return model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=torch.tensor([grid] * batch))

    return forward


def _flattened_patches_forward(model, pixels):
    """Pix2Struct takes its processor's flattened_patches: each 16 x 16 patch's row and column id (from 1), then its
    pixels; every slot a patch here, none padding."""
    patch = 16
    batch, channels, height, width = pixels.shape
    rows, cols = height // patch, width // patch
    patches = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, rows, cols, p, p]
    patches = patches.permute(0, 2, 3, 4, 5, 1).reshape(batch, rows * cols, patch * patch * channels)
    ids = torch.cartesian_prod(torch.arange(1.0, rows + 1), torch.arange(1.0, cols + 1)).expand(batch, -1, -1)
    return model(flattened_patches=torch.cat([ids, patches], -1), attention_mask=torch.ones(batch, rows * cols))


def sweep_transformers(pattern: str) -> list[tuple[str, str, str]]:
    import transformers

    rows = []
    for label, config_name, model_name, overrides in HF_FAMILIES:
        if not fnmatch.fnmatch(label, pattern):
            continue
        start = time.perf_counter()
        config_cls, model_cls = getattr(transformers, config_name, None), getattr(transformers, model_name, None)
        if config_cls is None or model_cls is None:
            rows.append(("transformers", label, f"not in transformers {transformers.__version__}"))
            continue
        try:
            config = config_cls(**overrides)
            _shrink(config)
            model = model_cls(config).eval()
            size = getattr(config, "image_size", 224)
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            channels = getattr(config, "num_channels", 3)
            pixels = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(0))
            if label.startswith("SigLIP2"):
                forward = _naflex_forward(config)
            elif label.startswith("Pix2Struct"):
                forward = _flattened_patches_forward
            elif label.startswith("Florence-2"):
                forward = lambda m, x: m(x)  # noqa: E731 - its argument is named hidden_states
            else:
                forward = lambda m, x: m(pixel_values=x)  # noqa: E731
            verdict = _check(model, pixels, forward)
        except Exception as err:  # noqa: BLE001 - the sweep reports every failure, it never stops
            verdict = f"ERROR: {type(err).__name__}: {str(err)[:300]}"
        rows.append(("transformers", label, verdict))
        print(f"{'transformers':28s} {label:44s} {verdict}  [{time.perf_counter() - start:.1f} s]", flush=True)
    return rows


# torchvision's classification models with attention: the smallest of each family (the rest are CNNs), and its
# video Swin and video MViT, given a clip of 16 frames [B, C, T, H, W] (224 x 224, the size the MViT is built for).
# (maxvit_t was refused until 2026-12-01, swin3d_t and mvit_v2_s until 2026-12-05.)
TORCHVISION_MODELS = ("vit_b_16", "swin_t", "swin_v2_t", "maxvit_t", "swin3d_t", "mvit_v2_s")


def sweep_torchvision(pattern: str) -> list[tuple[str, str, str]]:
    import torchvision

    rows = []
    for name in TORCHVISION_MODELS:
        if not fnmatch.fnmatch(name, pattern):
            continue
        start = time.perf_counter()
        try:
            model = torchvision.models.get_model(name).eval()
            size = 256 if name.startswith("swin_v2") else 224
            frames = (16,) if name.startswith(("swin3d", "mvit")) else ()  # a video: [B, 3, T, H, W]
            pixels = torch.randn(1, 3, *frames, size, size, generator=torch.Generator().manual_seed(0))
            verdict = _check(model, pixels, lambda m, x: m(x))
        except Exception as err:  # noqa: BLE001 - the sweep reports every failure, it never stops
            verdict = f"ERROR: {type(err).__name__}: {str(err)[:300]}"
        rows.append(("torchvision", name, verdict))
        print(f"{'torchvision':28s} {name:44s} {verdict}  [{time.perf_counter() - start:.1f} s]", flush=True)
    return rows


# --library: (the catalogue in benchmarks/_library_models.py, the distributions whose versions the table names).
LIBRARY_CASES = {
    "vit_pytorch": ("vit_pytorch_cases", ("vit-pytorch", "einops")),
    "monai": ("monai_cases", ("monai",)),
    "ultralytics": ("ultralytics_cases", ("ultralytics",)),
    "segment_anything": ("segment_anything_cases", ("segment_anything", "sam2")),
    "diffusers": ("diffusers_cases", ("diffusers",)),
}


def sweep_cases(cases, pattern: str) -> list[tuple[str, str, str]]:
    """vit-pytorch, MONAI, Ultralytics, Segment Anything: each ``Case`` of benchmarks/_library_models.py built,
    put in eval mode (training mode where it is what is swept) and recorded once."""
    rows = []
    for case in cases:
        if not (fnmatch.fnmatch(case.label, pattern) or fnmatch.fnmatch(case.module, pattern)):
            continue
        start = time.perf_counter()
        if case.skip or case.not_vision:
            verdict = f"not vision: {case.not_vision}" if case.not_vision else f"not run: {case.skip}"
            rows.append((case.module, case.label, verdict))
            print(f"{case.module:28s} {case.label:44s} {rows[-1][2]}", flush=True)
            continue
        try:
            torch.manual_seed(0)
            model = case.build()
        except Exception as err:  # noqa: BLE001 - the sweep reports every failure, it never stops
            verdict = f"not run: cannot be built: {type(err).__name__}: {str(err)[:200]}"
        else:
            try:
                model.train(case.training)
                verdict = _check(model, case.inputs(), case.forward, case.extent, case.frames)
            except Exception as err:  # noqa: BLE001 - the sweep reports every failure, it never stops
                verdict = f"ERROR: {type(err).__name__}: {str(err)[:300]}"
        rows.append((case.module, case.label, verdict))
        print(f"{case.module:28s} {case.label:44s} {verdict}  [{time.perf_counter() - start:.1f} s]", flush=True)
    return rows


def summarise(rows: list[tuple[str, str, str]]) -> str:
    kinds = Counter()
    for _, _, verdict in rows:
        if verdict.startswith("recorded"):
            kinds["recorded (no layer skipped)" if "skipped" not in verdict else "recorded, some layers skipped"] += 1
        else:
            kinds[verdict.split(":")[0]] += 1
    attention = sum(count for kind, count in kinds.items()
                    if kind not in ("no attention", "no spatial attention", "not run", "not vision"))
    recorded = kinds["recorded (no layer skipped)"] + kinds["recorded, some layers skipped"]
    lines = [f"- {kind}: {count}" for kind, count in sorted(kinds.items())]
    lines.append(f"- recorded / with spatial softmax attention: {recorded} / {attention}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--library", choices=("timm", "transformers", "both", "torchvision", *LIBRARY_CASES),
                        default="both", help="both: timm and transformers; torchvision: its ViT, Swin, MaxViT, video "
                        "Swin and MViT; vit_pytorch, monai, ultralytics, segment_anything (with sam2): "
                        "benchmarks/_library_models.py; diffusers: benchmarks/_diffusers_models.py")
    parser.add_argument("--per", choices=("module", "model"), default="module",
                        help="timm: the smallest model of each module, or every model name")
    parser.add_argument("--filter", default="*", help="model names (timm) or family labels (transformers)")
    parser.add_argument("--max-params", type=float, default=150.0, help="skip timm models larger than this (M)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    parser.add_argument("--stats", action="store_true", help="record every statistic and the prefix maps too")
    args = parser.parse_args()
    if args.stats:
        _record_stats[:] = ["mad", *ALL_STATS]
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    rows = []
    if args.library in ("timm", "both"):
        rows += sweep_timm(args.per, args.filter, args.max_params)
    if args.library in ("transformers", "both"):
        rows += sweep_transformers(args.filter)
    if args.library == "torchvision":
        rows += sweep_torchvision(args.filter)
    if args.library in LIBRARY_CASES:
        rows += sweep_cases(getattr(_library_models, LIBRARY_CASES[args.library][0])(), args.filter)
    summary = summarise(rows)
    print(summary)
    if args.write:
        table = markdown_table(["library / module", "model", "result"],
                               [[m, n, v.replace("|", "/").replace("\n", " ")] for m, n, v in rows])
        kind = "-stats" if args.stats else ""
        if args.library == "diffusers":
            name, title = f"sweep-diffusers{kind}", ("diffusers, every model class of its transformers, UNets and "
                                                     "ControlNets, benchmarks/_diffusers_models.py")
        elif args.library in LIBRARY_CASES:
            name, title = f"sweep-{args.library}{kind}", f"{args.library}, every model of benchmarks/_library_models.py"
        else:
            name, title = f"sweep-{args.library}-{args.per}{kind}", f"{args.library}, one model per {args.per}"
        write_section(name, f"## Sweep of vitmad.record{' with every statistic' if args.stats else ''} ({title}; "
                      f"benchmarks/sweep_models.py)\n\n{machine()}; {_versions(args.library)}\n\n{summary}\n\n"
                      f"{table}")


def _versions(library: str) -> str:
    """The versions of the libraries the sweep built its models with."""
    from importlib.metadata import version

    packages = LIBRARY_CASES[library][1] if library in LIBRARY_CASES else ("timm", "transformers", "torchvision")
    return ", ".join(f"{package} {version(package)}" for package in packages)

if __name__ == "__main__":
    main()
