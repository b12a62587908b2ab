"""The diffusers catalogue of ``benchmarks/sweep_models.py --library diffusers`` (benchmarks/_diffusers_models.py)
cannot rot: it names every model class of the installed diffusers' transformers, UNets and ControlNets, and its first
entries build, run and get a verdict that is no ERROR (a crash, or an output changed by recording). The whole sweep
runs in benchmarks/; this runs its first few entries, a few seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _diffusers_models  # noqa: E402
import sweep_models  # noqa: E402

FIRST = 10  # AceStep (not vision) to HunyuanDiT and PixArt: recorded, refused by name, not vision


def test_catalogue_names_every_model_class_of_diffusers():
    classes = {name for _, name in _diffusers_models.diffusers_classes()}
    listed = [case.label for case in _diffusers_models._cases()]
    assert len(classes) > 80
    assert len(listed) == len(set(listed))
    assert classes - set(listed) == set()  # a class of a newer diffusers: add its config to the catalogue
    assert set(listed) - classes == set()


def test_first_entries_run_and_give_a_verdict_without_error():
    cases = _diffusers_models.diffusers_cases()[:FIRST]
    rows = sweep_models.sweep_cases(cases, "*")
    verdicts = {label: verdict for _, label, verdict in rows}
    assert len(verdicts) == FIRST
    assert not [line for line in verdicts.values() if line.startswith("ERROR")], verdicts
    assert verdicts["AceStepTransformer1DModel"].startswith("not vision: music")
    # Families vitmad places (tests/recording/test_record_diffusers_*.py): recorded, output bit-identical.
    for label in ("AuraFlowTransformer2DModel", "CogVideoXTransformer3DModel", "DiTTransformer2DModel",
                  "HunyuanDiT2DModel", "LatteTransformer3DModel"):
        assert verdicts[label].startswith("recorded"), verdicts[label]
    assert "temporal MAD" in verdicts["CogVideoXTransformer3DModel"]
