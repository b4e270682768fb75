"""The callback presets parse as a second --config, append to earlier lists, document every key."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from medmoe import callbacks as medmoe_callbacks
from medmoe.cli import MedMoECLI
from medmoe.data import MultiTaskDataModule
from medmoe.model import MedMoEModule

PRESETS = Path(__file__).resolve().parents[1] / "callbacks"
NAMES = ("routing", "forgetting", "domain", "all")


def _base_config(tmp_path: Path, with_callbacks: bool) -> Path:
    config = {
        "model": {"class_path": "medmoe.model.MedMoEModule", "init_args": {"tiny_llama": {}}},
        "data": {"class_path": "medmoe.data.MultiTaskDataModule"},
        "trainer": {"logger": False, "default_root_dir": str(tmp_path)},
    }
    if with_callbacks:
        config["trainer"]["callbacks"] = [
            {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}
        ]
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _callbacks(tmp_path: Path, presets: list[str], with_callbacks: bool = True) -> list[str]:
    args = ["--config", str(_base_config(tmp_path, with_callbacks))]
    for name in presets:
        args += ["--config", str(PRESETS / f"{name}.yaml")]
    cli = MedMoECLI(
        MedMoEModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=args,
    )
    return [type(c).__name__ for c in cli.trainer.callbacks]


def test_presets_append_to_earlier_callbacks(tmp_path: Path) -> None:
    names = _callbacks(tmp_path, ["routing", "forgetting", "domain"])
    expected = ["LearningRateMonitor", "RoutingStats", "TemperatureMonitor"]
    assert names[:5] == [*expected, "ForgettingMonitor", "DomainEval"]


def test_all_preset_without_earlier_callbacks(tmp_path: Path) -> None:
    names = _callbacks(tmp_path, ["all"], with_callbacks=False)
    assert names[:5] == [
        "RoutingStats",
        "TemperatureMonitor",
        "ForgettingMonitor",
        "DomainEval",
        "PaperTables",
    ]


@pytest.mark.parametrize("name", NAMES)
def test_every_key_is_commented_and_matches_the_signature(name: str) -> None:
    text = (PRESETS / f"{name}.yaml").read_text()
    assert text.startswith("#") and f"--config callbacks/{name}.yaml" in text
    for line in text.splitlines():
        if re.match(r"^\s{8,}\w+:", line):  # an init_args key
            assert "#" in line, f"{name}.yaml: undocumented key in {line.strip()!r}"
    entries = yaml.safe_load(text)["trainer"]["callbacks+"]
    for entry in entries:
        module, _, cls_name = entry["class_path"].rpartition(".")
        assert module == "medmoe.callbacks"
        cls = getattr(medmoe_callbacks, cls_name)
        parameters = set(inspect.signature(cls).parameters)
        assert set(entry["init_args"]) == parameters, f"{cls_name}: every argument, no other"
        cls(**entry["init_args"])
