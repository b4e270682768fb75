"""Short real fits on CPU with every callback; the TensorBoard event files are read back."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medmoe.adapters import MoELoRAConfig
from medmoe.adapters.baselines import FullFineTune, MultiLoRA
from medmoe.adapters.spec import AdapterSpec
from medmoe.callbacks import (
    DomainEval,
    ForgettingMonitor,
    PaperTables,
    RoutingStats,
    TemperatureMonitor,
)
from medmoe.data import MultiTaskDataModule, TaskConfig
from medmoe.model import MedMoEModule

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
NUM_EXPERTS = 3
TAU_RANGE = (0.5, 1.0)  # tau_init = 1.0 sits at the upper bound: the warning must fire
EVAL = {"limit": 4, "batch_size": 4, "max_new_tokens": 4}


def _data(**kwargs) -> MultiTaskDataModule:
    return MultiTaskDataModule(batch_size=8, max_length=48, eval_batch_size=8, **kwargs)


def _module(data: MultiTaskDataModule, adapter: AdapterSpec) -> MedMoEModule:
    torch.manual_seed(0)
    return MedMoEModule(
        tiny_llama=TINY,
        adapter=adapter,
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        learning_rate=1e-2,
        lambda_kp=0.1,
        warmup_ratio=0.0,
    )


def _trainer(tmp_path: Path, callbacks: list[Callback], max_steps: int, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        log_every_n_steps=5,  # the callbacks keep their own step cadence
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _tester(tables: PaperTables) -> Trainer:
    return Trainer(
        accelerator="cpu",
        logger=False,
        callbacks=[tables],
        limit_test_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _events(tmp_path: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(tmp_path / "tb" / "version_0"), {"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def _values(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


class ModeProbe(Callback):
    """Records whether every submodule is in train mode when each training batch starts."""

    def __init__(self) -> None:
        self.modes: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append(all(m.training for m in pl_module.model.modules()))


@contextmanager
def _caught() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def test_moe_lora_fit_logs_routing_forgetting_and_domain(tmp_path: Path) -> None:
    data = _data()
    adapter = MoELoRAConfig(
        allocation="uniform",
        num_experts=NUM_EXPERTS,
        allowed_ranks=[4],
        rank_pattern="equal",
        num_base_experts=1,
        dropout=0.0,
        tau_range=TAU_RANGE,
    )
    module = _module(data, adapter)
    probe = ModeProbe()
    forgetting = ForgettingMonitor(tasks=("mmlu", "gsm8k", "absent"), every_n_steps=3, **EVAL)
    callbacks = [
        forgetting,  # evaluates before RoutingStats reads the training step's routing
        RoutingStats(log_every_n_steps=2, image_every_n_steps=3),
        TemperatureMonitor(log_every_n_steps=2),
        DomainEval(**EVAL),
        probe,
    ]
    trainer = _trainer(tmp_path, callbacks, 6, val_check_interval=3, limit_val_batches=1)
    with _caught() as caught:
        trainer.fit(module, datamodule=data)
    messages = [str(w.message) for w in caught]
    assert any("clamp bound" in m for m in messages)
    assert any("'absent'" in m for m in messages)
    assert all(probe.modes), "an evaluation left the model out of train mode"
    events = _events(tmp_path)
    scalars = set(events.Tags()["scalars"])

    # routing: entropy in [0, ln N], utilisation sums to 1 per layer, CV >= 0
    layers = [f"L{i:02d}.{m}" for i in range(2) for m in adapter.target_modules]
    for name in [*layers, "L00", "L01", "mean"]:
        assert [e.step for e in events.Scalars(f"routing/entropy/{name}")] == [2, 4, 6]
        values = _values(events, f"routing/entropy/{name}")
        assert all(-1e-6 <= v <= math.log(NUM_EXPERTS) + 1e-6 for v in values)
        assert all(v >= 0 for v in _values(events, f"routing/cv/{name}"))
    for name in [*layers, "L00", "L01"]:
        per_expert = [_values(events, f"routing/utilisation/{name}/e{i}") for i in range(3)]
        for step_values in zip(*per_expert, strict=True):
            assert sum(step_values) == pytest.approx(1.0, abs=1e-5)
    for group in ("general", "domain"):
        for tag in (f"routing/base_share/{group}", f"routing/base_share/{group}/L01"):
            assert all(0.0 <= v <= 1.0 for v in _values(events, tag))
    assert "routing/base_share/gap" in scalars
    images = set(events.Tags()["images"])
    assert {"routing/utilisation_heatmap", "routing/task_affinity"} <= images
    assert len(events.Images("routing/utilisation_heatmap")) == 2  # steps 3 and 6

    # temperature: inside the clamp range, min <= mean <= max, the bound counted
    for name in layers:
        assert all(
            TAU_RANGE[0] <= v <= TAU_RANGE[1] for v in _values(events, f"temperature/{name}")
        )
    low, mean, high = (_values(events, f"temperature/{s}") for s in ("min", "mean", "max"))
    assert all(a <= b + 1e-6 <= c + 2e-6 for a, b, c in zip(low, mean, high, strict=True))
    assert max(_values(events, "temperature/at_bound")) >= 1

    # forgetting: base once at step 0; scores at steps 3 and 6 (fit end adds no duplicate)
    for task, metric in (("mmlu", "accuracy"), ("gsm8k", "exact_match_strict")):
        base = events.Scalars(f"forgetting/{task}/base")
        assert [e.step for e in base] == [0]
        scores = events.Scalars(f"forgetting/{task}/{metric}")
        assert [e.step for e in scores] == [3, 6]
        assert all(0.0 <= e.value <= 1.0 for e in scores)
        deltas = _values(events, f"forgetting/{task}/delta")
        assert deltas == pytest.approx([e.value - base[0].value for e in scores])
        assert forgetting.base[task] == pytest.approx(base[0].value)
    assert "forgetting/gsm8k/exact_match_flexible" in scalars
    assert not any(tag.startswith("forgetting/absent") for tag in scalars)
    seconds = _values(events, "eval/forgetting_seconds")
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert all(0 < v < 1 for v in _values(events, "eval/forgetting_fraction"))

    # domain: at the two validation ends, not at the sanity check
    for tag in (
        "domain/pubmedqa/accuracy",
        "domain/medqa/accuracy",
        "domain/clinical_sum/rouge_l",
        "domain/average",
    ):
        values = _values(events, tag)
        assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
    assert "eval/domain_seconds" in scalars
    assert "domain/average" in trainer.callback_metrics

    # the paper's tables on a datamodule without clinical_sum and gsm8k
    partial = _data(
        tasks=[TaskConfig("medqa", source="toy"), TaskConfig("pubmedqa", source="toy")],
        replay=[TaskConfig("mmlu", source="toy")],
    )
    tables = PaperTables(output_dir=tmp_path / "tables", method="Med-MoE-LoRA", **EVAL)
    _tester(tables).test(module, datamodule=partial, verbose=False)
    markdown = (tmp_path / "tables" / "paper_tables.md").read_text()
    assert "| Med-MoE-LoRA |" in markdown and "| Base Model |" in markdown
    medical_rows = (tmp_path / "tables" / "table1_medical.csv").read_text().splitlines()
    assert medical_rows[0] == "Method,PubMedQA,MedQA,Clinical-Sum,Average"
    assert all(row.split(",")[3] == "n/a" for row in medical_rows[1:])
    general_rows = (tmp_path / "tables" / "table2_general.csv").read_text().splitlines()
    ours = general_rows[2].split(",")
    assert ours[0] == "Med-MoE-LoRA" and ours[3:] == ["n/a", "n/a"]
    assert float(ours[2]) == pytest.approx(
        100 * (tables.scores["mmlu"] - tables.base_scores["mmlu"]), abs=0.01
    )
    assert 0.0 <= tables.scores["medqa"] <= 1.0


def test_full_fine_tuning_scores_the_step_zero_model_as_base(tmp_path: Path) -> None:
    data = _data()
    module = _module(data, FullFineTune())
    forgetting = ForgettingMonitor(tasks=("mmlu",), every_n_steps=None, **EVAL)
    domain = DomainEval(tasks=("medqa",), every_n_steps=1, **EVAL)
    callbacks = [forgetting, domain, RoutingStats(log_every_n_steps=2), TemperatureMonitor(2)]
    trainer = _trainer(tmp_path, callbacks, 2, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    events = _events(tmp_path)
    assert [e.step for e in events.Scalars("forgetting/mmlu/base")] == [0]
    assert [e.step for e in events.Scalars("forgetting/mmlu/accuracy")] == [2]
    assert len(events.Scalars("forgetting/mmlu/delta")) == 1
    assert [e.step for e in events.Scalars("domain/medqa/accuracy")] == [1, 2]
    scalars = events.Tags()["scalars"]
    assert not any(t.startswith(("routing/", "temperature/")) for t in scalars)

    tables = PaperTables(output_dir=tmp_path / "tables", **EVAL)
    with pytest.warns(UserWarning, match="cannot switch its adapter off"):
        _tester(tables).test(module, datamodule=data, verbose=False)
    assert tables.base_scores is None
    general_rows = (tmp_path / "tables" / "table2_general.csv").read_text().splitlines()
    assert general_rows[1] == "Base Model,n/a,-,n/a,-"
    assert general_rows[2].startswith("FullFineTune,")


def test_multi_lora_scores_each_task_with_its_adapter(tmp_path: Path) -> None:
    data = _data()
    domain = [n for n, g in zip(data.task_names, data.task_groups, strict=True) if g == "domain"]
    module = _module(data, MultiLoRA(num_tasks=len(domain), r=4, dropout=0.0))
    assert module.adapter.num_tasks == 3  # one adapter per medical task, none for replay
    forgetting = ForgettingMonitor(tasks=("mmlu", "gsm8k"), every_n_steps=None, **EVAL)
    trainer = _trainer(tmp_path, [forgetting, DomainEval(**EVAL)], 2, limit_val_batches=1)
    trainer.fit(module, datamodule=data)
    events = _events(tmp_path)
    assert len(events.Scalars("forgetting/gsm8k/delta")) == 1
    assert len(events.Scalars("domain/clinical_sum/rouge_l")) == 1
    # general benchmarks answered under each domain adapter: mean, worst, and each one
    scalars = events.Tags()["scalars"]
    under = {
        t.rsplit("_under_", 1)[1]
        for t in scalars
        if t.startswith("forgetting/mmlu/") and "_under_" in t
    }
    assert under == set(domain)  # never under an adapter trained on MMLU or GSM8K
    each = [events.Scalars(f"forgetting/mmlu/accuracy_under_{n}")[-1].value for n in domain]
    mean = events.Scalars("forgetting/mmlu/accuracy")[-1].value
    worst = events.Scalars("forgetting/mmlu/accuracy_worst")[-1].value
    assert mean == pytest.approx(sum(each) / len(each), abs=1e-6)
    assert worst == pytest.approx(min(each), abs=1e-6)
