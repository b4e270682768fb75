"""TaskScorer's few-shot demonstrations come from the split each task trains on."""

from __future__ import annotations

from types import SimpleNamespace

from medmoe.callbacks.scoring import TaskScorer
from medmoe.data import MultiTaskDataModule, TaskConfig


def test_shots_default_to_the_task_training_split():
    data = MultiTaskDataModule(
        tasks=[TaskConfig("medqa", source="toy")],
        replay=[TaskConfig("mmlu", source="toy", split="validation")],  # e.g. MMLU's dev/aux
        batch_size=4,
    )
    trainer = SimpleNamespace(datamodule=data)
    scorer = TaskScorer(shots=2)
    assert scorer._shot_split(trainer, "mmlu") == "validation"
    assert scorer._shot_split(trainer, "medqa") == "train"
    assert TaskScorer(shots=2, shot_split="test")._shot_split(trainer, "mmlu") == "test"
