"""The multi-task DataModule: batch contract, mixture statistics, exact resumption."""

from __future__ import annotations

import warnings
from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from medmoe.data.collate import IGNORE_INDEX
from medmoe.data.datamodule import MultiTaskDataModule, TaskConfig
from medmoe.data.sources import load_records
from medmoe.data.tasks import get_task
from medmoe.data.toy_clinic import DISEASES

TOY = dict(source="toy")


def toy_dm(**kwargs) -> MultiTaskDataModule:
    kwargs.setdefault("batch_size", 16)
    dm = MultiTaskDataModule(**kwargs)
    dm.setup("fit")
    return dm


def fake_trainer(step=0, accumulate=1, world=1, rank=0, max_steps=-1):
    return SimpleNamespace(
        global_step=step,
        accumulate_grad_batches=accumulate,
        world_size=world,
        global_rank=rank,
        max_steps=max_steps,
    )


def batches(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        if n is not None and i == n:
            break
        out.append(batch)
    return out


def test_names_groups_and_vocab():
    dm = MultiTaskDataModule()
    assert dm.task_names == ["medqa", "pubmedqa", "clinical_sum", "mmlu", "gsm8k"]
    assert dm.task_groups == ["domain"] * 3 + ["general"] * 2
    assert dm.vocab_size == len(dm.tokenizer) == 262
    none = MultiTaskDataModule(tasks=[TaskConfig("medqa", **TOY)], replay=[])
    assert none.task_names == ["medqa"]


def test_unknown_and_duplicate_tasks():
    with pytest.raises(ValueError, match="unknown task 'radiology'.*pubmedqa, medqa"):
        TaskConfig("radiology")
    with pytest.raises(ValueError, match="unknown task 'radiology'"):
        MultiTaskDataModule(tasks=[{"name": "radiology"}])
    with pytest.raises(ValueError, match="once"):
        MultiTaskDataModule(tasks=["mmlu"], replay=["mmlu"])
    with pytest.raises(ValueError, match="not in this DataModule.*medqa"):
        MultiTaskDataModule().eval_records.eval_examples("gsm8k_hard")


def test_batch_contract():
    dm = toy_dm(batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    B, T = batch["input_ids"].shape
    assert B == 32 and T <= 64
    for key in ("input_ids", "attention_mask", "labels", "task_id"):
        assert batch[key].dtype == torch.long, key
    assert batch["is_general"].dtype == torch.bool
    assert batch["labels"].shape == batch["attention_mask"].shape == (B, T)
    assert batch["task_id"].shape == batch["is_general"].shape == (B,)
    tok, mixture = dm.tokenizer, dm.mixture()
    for row in range(B):
        task_id, index, general = mixture(row)  # independent path: raw record -> tokens
        name = dm.task_names[task_id]
        assert batch["task_id"][row] == task_id and bool(batch["is_general"][row]) == general
        assert general == (dm.task_groups[task_id] == "general")
        record = dm.eval_records.records(name, get_task(name).train_split)[index]
        prompt, target = get_task(name).styled("toy").format(record)  # toy source: toy style
        p_ids = tok(prompt)["input_ids"]
        t_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p_ids) + len(t_ids)
        mask = batch["attention_mask"][row]
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert batch["input_ids"][row, :n].tolist() == p_ids + t_ids
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        labels = batch["labels"][row]
        assert (labels[: len(p_ids)] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        assert labels[len(p_ids) : n].tolist() == t_ids
    assert batch["is_general"].any() and not batch["is_general"].all()


def test_long_prompts_lose_their_head_never_the_target():
    dm = toy_dm(tasks=[TaskConfig("medqa", **TOY)], replay=[], max_length=16, batch_size=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] == 16
    tok = dm.tokenizer
    for row in range(8):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids[-4:-2]) == "Answer :" and labels[-2] in tok.convert_tokens_to_ids(
            list("ABCD")
        )
        assert labels[-1] == tok.eos_token_id and (labels[:-2] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="'clinical_sum'.*does not fit max_length=4"):
        toy_dm(tasks=[TaskConfig("clinical_sum", **TOY)], replay=[], max_length=4)


def test_mixture_probabilities_and_replay_ratio_hold():
    tasks = [
        TaskConfig("medqa", max_train=300, **TOY),
        TaskConfig("pubmedqa", max_train=100, **TOY),
    ]
    replay = [TaskConfig("mmlu", max_train=400, **TOY), TaskConfig("gsm8k", max_train=100, **TOY)]
    n = 40_000
    cases = {
        "size": ([0.75, 0.25], [0.8, 0.2]),
        "temperature": ([0.634, 0.366], [2 / 3, 1 / 3]),  # sqrt(300):sqrt(100), sqrt(400):sqrt(100)
        "fixed": ([0.25, 0.75], [0.5, 0.5]),
    }
    for sampling, (domain, general) in cases.items():
        tasks[1].weight = 3.0 if sampling == "fixed" else None
        dm = toy_dm(tasks=tasks, replay=replay, replay_ratio=0.3, sampling=sampling)
        expected = [0.7 * p for p in domain] + [0.3 * p for p in general]
        probs = dm.mixture().probabilities
        assert [probs[i] for i in range(4)] == pytest.approx(expected, abs=1e-3)
        mixture = dm.mixture()
        draws = [mixture(k) for k in range(n)]
        counts = Counter(t for t, _, _ in draws)
        for t, p in enumerate(expected):  # 4 sigma
            assert abs(counts[t] / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (sampling, t)
        general_share = sum(g for _, _, g in draws) / n
        assert abs(general_share - 0.3) < 4 * (0.21 / n) ** 0.5
        assert all(g == (t >= 2) for t, _, g in draws)
        sizes = [300, 100, 400, 100]
        assert all(0 <= i < sizes[t] for t, i, _ in draws)


def test_stream_resumes_at_global_step():
    dm = toy_dm(batch_size=8)
    dm.trainer = fake_trainer(step=0, accumulate=2, max_steps=10)
    full = batches(dm.train_dataloader())
    assert len(dm.train_dataloader()) == len(full) == 20  # max_steps * accumulate batches
    dm.trainer = fake_trainer(step=3, accumulate=2, max_steps=10)
    loader = dm.train_dataloader()
    assert len(loader) == 20  # Lightning counts the 6 batches already seen
    tail = batches(loader)
    assert len(tail) == 14
    for a, b in zip(full[6:], tail, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert loader.state_dict()["start"] == 3 * 2 * 8


def test_stream_is_seeded():
    dm = toy_dm(seed=0)
    a = next(iter(dm.train_dataloader()))["input_ids"]
    b = next(iter(toy_dm(seed=0).train_dataloader()))["input_ids"]
    dm.seed = 1
    c = next(iter(dm.train_dataloader()))["input_ids"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ranks_interleave_the_global_stream():
    dm = toy_dm(batch_size=4)
    single = dm.train_dataloader().dataset
    for rank in (0, 1, 2):
        dm.trainer = fake_trainer(world=3, rank=rank, max_steps=5)
        stream = dm.train_dataloader().dataset
        for p in range(10):
            assert stream.sample(p) == single.sample(3 * p + rank)


def test_workers_give_the_same_batches():
    dm = toy_dm(batch_size=8)
    dm.trainer = fake_trainer(step=1, max_steps=6)
    serial = batches(dm.train_dataloader())
    dm.num_workers = 2
    parallel = batches(dm.train_dataloader())
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_epoch_length_without_max_steps():
    dm = toy_dm(batch_size=10, replay_ratio=0.25)
    assert len(dm.train_dataloader()) == 6000 * 4 // 3 // 10  # one pass over the domain records
    dm.epoch_samples = 95
    assert len(dm.train_dataloader()) == 10


def test_validation_loader_covers_every_task_once():
    tasks = [TaskConfig("medqa", max_eval=30, **TOY), TaskConfig("pubmedqa", **TOY)]
    dm = toy_dm(tasks=tasks, replay=[TaskConfig("gsm8k", max_eval=20, **TOY)], eval_batch_size=64)
    ids = torch.cat([b["task_id"] for b in dm.val_dataloader()])
    assert Counter(ids.tolist()) == {0: 30, 1: 200, 2: 20}
    general = torch.cat([b["is_general"] for b in dm.val_dataloader()])
    assert torch.equal(general, ids == 2)
    first = next(iter(dm.val_dataloader()))
    assert torch.equal(first["input_ids"], next(iter(dm.val_dataloader()))["input_ids"])
    test_ids = torch.cat([b["task_id"] for b in dm.test_dataloader()])
    assert Counter(test_ids.tolist()) == {0: 30, 1: 200, 2: 20}


def test_eval_examples_are_fixed_and_correct():
    dm = MultiTaskDataModule()
    examples = dm.eval_records.eval_examples("medqa", limit=40)
    assert examples == dm.eval_records.eval_examples("medqa", limit=40)
    assert dm.eval_records.eval_examples("medqa", limit=10) == examples[:10]
    assert len(dm.eval_records.eval_examples("medqa")) == 200
    for ex in examples:
        letter = ex.choices[ex.answer].strip()
        disease = next(line[3:] for line in ex.prompt.splitlines() if line.startswith(letter + "."))
        symptoms = ex.prompt.split(" has ")[1].split(" . ")[0].replace(" and", " ,").split(" , ")
        assert set(symptoms) <= set(DISEASES[disease][0])
    gsm = dm.eval_records.eval_examples("gsm8k", split="test", limit=3)
    assert gsm[0].reference.split("#### ")[1] == gsm[0].reference.split(" = ")[1].split("\n")[0]


def test_fixture_sources_in_the_datamodule():
    fixtures = "tests/fixtures"
    tasks = [TaskConfig("pubmedqa", source=f"{fixtures}/pubmedqa.jsonl")]
    # 4 GSM8K records: too few for the harness's 5 demonstrations, so zero-shot here
    replay = [TaskConfig("gsm8k", source=f"{fixtures}/gsm8k.jsonl", num_fewshot=0)]
    dm = toy_dm(tasks=tasks, replay=replay, tokenizer="byte", max_length=512, batch_size=4)
    assert dm.vocab_size == 260
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    # one file, carved like the hub's pqa_labeled: 2 train, 1 validation, 3 test records
    assert [
        len(dm.eval_records.records("pubmedqa", s)) for s in ("train", "validation", "test")
    ] == [2, 1, 3]
    expected = load_records("pubmedqa", tasks[0].source, "validation")
    assert dm.eval_records.eval_examples("pubmedqa") == [
        get_task("pubmedqa").eval_example(expected[0])
    ]
    # one file carved for GSM8K too (10% / 5% with at least one each): 1 test, 1 validation
    assert [len(dm.eval_records.records("gsm8k", s)) for s in ("train", "validation", "test")] == [
        2,
        1,
        1,
    ]
    assert len(dm.eval_records.eval_examples("gsm8k", split="test")) == 1


def test_yaml_config_through_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(MultiTaskDataModule, "data")
    cfg = parser.parse_string(
        """
        data:
          tasks:
            - {name: medqa, source: toy, max_eval: 50}
            - {name: pubmedqa, source: toy, weight: 2.0}
          replay: [{name: gsm8k, source: toy}]
          replay_ratio: 0.1
          sampling: temperature
          sampling_temperature: 3.0
          batch_size: 8
        """
    )
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, MultiTaskDataModule)
    assert dm.tasks == [
        TaskConfig("medqa", "toy", max_eval=50),
        TaskConfig("pubmedqa", "toy", weight=2.0),
    ]
    assert dm.task_names == ["medqa", "pubmedqa", "gsm8k"] and dm.sampling == "temperature"


class _Recorder(L.LightningModule):
    """Records a fingerprint of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(batch["input_ids"][:, :6].sum(1).tolist()))
        return (self.w * batch["input_ids"].float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, max_steps, ckpt_path=None, callbacks=()):
    model = _Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    )
    dm = MultiTaskDataModule(batch_size=4, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return model.seen


def test_lightning_resume_continues_the_stream(tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    full = _fit(tmp_path, 6, callbacks=[ckpt])
    assert len(full) == 12  # 6 steps x 2 accumulated batches
    resumed = _fit(tmp_path, 6, ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert resumed == full[6:]
