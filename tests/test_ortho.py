"""Ortho-LoRA: one-backward per-task gradients against per-task backward, and the projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from torch import nn

from medmoe.adapters import MoELoRAConfig, apply_moe_lora, moe_lora_layers
from medmoe.adapters.baselines import LoRA
from medmoe.objectives.projection import (
    OrthoLoRA,
    ProjectionReport,
    pcgrad_coefficients,
    project_task_gradients,
    projection_orders,
)
from medmoe.objectives.task_gradients import lora_factors, per_task_gradients_reference

NUM_TASKS = 3
TASK_IDS = torch.tensor([0, 1, 2, 2, 0, 1])
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")


MOE = dict(allowed_ranks=[2, 4, 8], layer_ranges={"1-2": 2, "3-4": 3}, dropout=0.0)


def _batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(1, 96, (6, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    attention_mask[3, 7:] = 0
    input_ids[attention_mask == 0] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt tokens carry no loss
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _masked_lm_loss(model: nn.Module, batch: dict, task: int | None = None) -> torch.Tensor:
    """Mean token loss of the batch; with ``task``, only that task's part (same denominator)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:].clone()  # [B, T-1]
    count = (labels != -100).sum()
    if task is not None:
        labels[TASK_IDS.ne(task)] = -100
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
    )
    return losses / count


def _perturb(model: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.2)


def _peft_model() -> nn.Module:
    model = LoRA(r=4, dropout=0.0).apply(make_tiny_llama().double())
    _perturb(model)
    return model


def _moe_model(**overrides) -> nn.Module:
    model = make_tiny_llama().double()
    apply_moe_lora(model, MoELoRAConfig(**{**MOE, **overrides}))
    _perturb(model)
    return model


def _one_backward(model: nn.Module, ortho: OrthoLoRA, batch: dict) -> dict[str, torch.Tensor]:
    with ortho.capture(TASK_IDS):
        loss = _masked_lm_loss(model, batch)
    loss.backward()
    return ortho.per_task_gradients()


@pytest.mark.parametrize(
    "build", [_peft_model, _moe_model, lambda: _moe_model(top_k=2)], ids=["peft", "moe", "moe_top2"]
)
def test_one_backward_equals_per_task_backward(build):
    model, batch = build(), _batch()
    ortho = OrthoLoRA(model, NUM_TASKS)
    got = _one_backward(model, ortho, batch)
    expected = per_task_gradients_reference(
        model, lambda task: _masked_lm_loss(model, batch, task), NUM_TASKS
    )
    assert got.keys() == expected.keys() and len(got) == len(lora_factors(model))
    for name, grads in expected.items():
        assert grads.abs().amax(dim=tuple(range(1, grads.dim()))).min() > 0, name  # B != 0
        torch.testing.assert_close(got[name], grads, rtol=1e-10, atol=1e-13, msg=name)
    # the per-task gradients decompose the ordinary gradient
    params = dict(model.named_parameters())
    for name, grads in got.items():
        torch.testing.assert_close(grads.sum(0), params[name].grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("method", ["peft", "moe"])
def test_dropout_in_training_is_captured(method):
    model = (
        LoRA(r=4, dropout=0.3).apply(make_tiny_llama().double())
        if method == "peft"
        else _moe_model(dropout=0.3)
    )
    _perturb(model)
    model.train()
    grads = _one_backward(model, OrthoLoRA(model, NUM_TASKS), _batch())
    params = dict(model.named_parameters())
    for name, value in grads.items():
        torch.testing.assert_close(value.sum(0), params[name].grad, rtol=1e-10, atol=1e-13)


def test_mixed_ranks_are_covered():
    ranks = {layer.ranks for _, layer in moe_lora_layers(_moe_model())}
    assert (2, 4) in ranks and (2, 4, 8) in ranks


def test_samples_without_loss_contribute_exactly_zero():
    model, batch = _peft_model(), _batch()
    batch["labels"][TASK_IDS == 2] = -100  # task 2's samples: prompt/padding only
    grads = _one_backward(model, OrthoLoRA(model, NUM_TASKS), batch)
    for name, value in grads.items():
        assert torch.count_nonzero(value[2]) == 0, name
        assert torch.count_nonzero(value[0]) > 0, name


def test_capture_checks_task_ids_and_batch_size():
    model, batch = _peft_model(), _batch()
    ortho = OrthoLoRA(model, NUM_TASKS)
    with pytest.raises(ValueError, match="0..2"):
        ortho.set_task_ids(torch.tensor([0, 3, 1, 1, 0, 0]))
    with pytest.raises(ValueError, match="batch dimension"), ortho.capture(TASK_IDS[:4]):
        _masked_lm_loss(model, batch)
    with pytest.raises(RuntimeError, match="capture"):
        ortho.project()  # nothing captured


# ----------------------------------------------------------------- the projection rule
def test_hand_computed_two_tasks_in_2d():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # <g1, g2> = -1: g1' = g1 - (-1 / 2) g2 = (0.5, 0.5); g2' = g2 - (-1 / 1) g1 = (0, 1)
    projected = project_task_gradients(g)
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=g.dtype))
    assert projected[0] @ g[1] == 0 and projected[1] @ g[0] == 0


def test_non_conflicting_gradients_are_untouched_exactly():
    generator = torch.Generator().manual_seed(0)
    g = torch.rand(3, 5, 7, generator=generator)  # all entries positive: no conflict
    assert torch.equal(project_task_gradients(g, order="shuffle", generator=generator), g)


def test_conflicting_pair_becomes_orthogonal_to_the_original():
    generator = torch.Generator().manual_seed(1)
    g = torch.randn(2, 40, generator=generator, dtype=torch.float64)
    g[1] = -g[0] + 0.5 * torch.randn(40, generator=generator, dtype=torch.float64)
    assert g[0] @ g[1] < 0
    projected = project_task_gradients(g)
    torch.testing.assert_close(projected[0] @ g[1], torch.tensor(0.0, dtype=g.dtype))
    torch.testing.assert_close(projected[1] @ g[0], torch.tensor(0.0, dtype=g.dtype))


def test_sequential_rule_with_three_tasks_by_hand():
    # g0 conflicts with g1 and g2; fixed order: g0 is projected on g1, then on g2.
    g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]], dtype=torch.float64)
    projected = project_task_gradients(g, order="fixed")
    # g0' = g0 + 0.5 g1 = (0.5, 0.5, 0); <g0', g2> = -0.5 -> g0'' = g0' + 0.25 g2
    torch.testing.assert_close(projected[0], torch.tensor([0.5, 0.25, 0.25], dtype=g.dtype))
    # g1 vs g0: -1 -> g1' = g1 + g0 = (0, 1, 0); <g1', g2> = -1 -> g1'' = g1' + 0.5 g2
    torch.testing.assert_close(projected[1], torch.tensor([0.0, 0.5, 0.5], dtype=g.dtype))
    # g2 vs g0: 0; vs g1: -1 -> g2' = g2 + 0.5 g1 = (-0.5, -0.5, 1)
    torch.testing.assert_close(projected[2], torch.tensor([-0.5, -0.5, 1.0], dtype=g.dtype))


def test_shuffled_orders_are_seeded():
    def orders(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.stack([projection_orders(4, "shuffle", generator) for _ in range(5)])

    assert torch.equal(orders(0), orders(0))
    assert not torch.equal(orders(0), orders(1))
    fixed = projection_orders(3)
    assert fixed.tolist() == [[1, 2], [0, 2], [0, 1]]
    assert torch.equal(orders(0).sort(dim=-1).values[0], projection_orders(4))


def test_zero_gradients_never_conflict():
    gram = torch.zeros(1, 3, 3)
    assert torch.equal(pcgrad_coefficients(gram, projection_orders(3)), torch.eye(3)[None])


def test_project_rewrites_only_conflicting_factors():
    model, batch = _peft_model(), _batch()
    ortho = OrthoLoRA(model, 2, order="fixed")
    task_ids = (TASK_IDS > 0).long()  # two tasks
    with ortho.capture(task_ids):
        loss = _masked_lm_loss(model, batch)
    loss.backward()
    per_task = ortho.per_task_gradients()
    params = dict(model.named_parameters())
    before = {name: params[name].grad.clone() for name in per_task}
    report = ortho.project()
    conflicting = 0
    for name, (g0, g1) in per_task.items():
        after = params[name].grad
        dot = (g0 * g1).sum()
        if dot >= 0:
            assert torch.equal(after, before[name]), name
            continue
        conflicting += 1
        p0 = g0 - dot / (g1 * g1).sum() * g1
        p1 = g1 - dot / (g0 * g0).sum() * g0
        torch.testing.assert_close(after, p0 + p1, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close((p0 * g1).sum(), torch.zeros((), dtype=g0.dtype))
    assert 0 < conflicting < len(per_task)
    assert report.conflicts[:, 0, 1].sum() == conflicting
    assert all(torch.count_nonzero(g) == 0 for g in ortho.per_task_gradients().values())


def test_accumulated_micro_batches_are_projected_together():
    model, batch = _peft_model(), _batch()
    ortho = OrthoLoRA(model, NUM_TASKS)
    for half in (slice(0, 3), slice(3, 6)):
        part = {k: v[half] for k, v in batch.items()}
        with ortho.capture(TASK_IDS[half]):
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
        labels = part["labels"][:, 1:]
        F.cross_entropy(logits.logits[:, :-1].reshape(-1, 96), labels.reshape(-1)).backward()
    accumulated = ortho.per_task_gradients()
    params = dict(model.named_parameters())
    for name, grads in accumulated.items():
        torch.testing.assert_close(grads.sum(0), params[name].grad)
    ortho.project()


@pytest.mark.parametrize(
    "kwargs, field",
    [({"num_tasks": 1}, "num_tasks"), ({"num_tasks": 3, "order": "random"}, "order")],
)
def test_bad_ortho_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OrthoLoRA(_peft_model(), **kwargs)


def test_shuffle_generator_state_resumes_the_same_task_orders():
    from medmoe.model import MedMoEModule
    from medmoe.objectives.projection import projection_orders

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, vocab_size=96)
    tiny.update(num_attention_heads=4, num_key_value_heads=2)

    def module() -> MedMoEModule:
        m = MedMoEModule(
            tiny_llama=tiny,
            adapter=MoELoRAConfig(**MOE),
            task_names=["a", "b", "c", "d"],
            gradient_projection="ortho",
        )
        m.configure_model()
        return m

    first = module()
    for _ in range(3):  # the run so far drew three steps' orders
        projection_orders(4, "shuffle", first.ortho._generator)
    checkpoint = {"state_dict": first.state_dict()}
    first.on_save_checkpoint(checkpoint)
    expected = [projection_orders(4, "shuffle", first.ortho._generator) for _ in range(3)]
    resumed = module()
    resumed.on_load_checkpoint(checkpoint)
    got = [projection_orders(4, "shuffle", resumed.ortho._generator) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    fresh = module()  # without the saved state the orders would differ
    restarted = [projection_orders(4, "shuffle", fresh.ortho._generator) for _ in range(3)]
    assert not all(torch.equal(a, b) for a, b in zip(expected, restarted, strict=True))


# ----------------------------------------------------------------- domain tasks only
def test_domain_only_projection_by_hand_leaves_the_replay_gradient_as_it_is():
    # tasks 0, 1 domain, 2 replay; the replay gradient conflicts with both domain gradients
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    projected = project_task_gradients(g, tasks=[0, 1])
    # <g0, g1> = -1: g0' = g0 + g1 / 2 = (0.5, 0.5); g1' = g1 + g0 = (0, 1); g2' = g2
    expected = torch.tensor([[0.5, 0.5], [0.0, 1.0], [-1.0, -1.0]], dtype=g.dtype)
    torch.testing.assert_close(projected, expected)
    assert torch.equal(projected[2], g[2])
    # over all three, the replay gradient would be projected and projected against
    everything = project_task_gradients(g, order="fixed")
    assert not torch.equal(everything[2], g[2])
    assert not torch.allclose(everything[:2].sum(0), expected[:2].sum(0))
    # the subset order is drawn over the subset: two domain tasks give the same under shuffle
    generator = torch.Generator().manual_seed(0)
    shuffled = project_task_gradients(g, order="shuffle", generator=generator, tasks=[0, 1])
    torch.testing.assert_close(shuffled, expected)


def test_domain_only_ortho_lora_writes_projected_domain_plus_raw_replay_into_grad():
    model, batch = _peft_model(), _batch()
    ortho = OrthoLoRA(model, NUM_TASKS, order="fixed", projected_tasks=[0, 1])
    assert ortho.projected_tasks == [0, 1]
    with ortho.capture(TASK_IDS):
        loss = _masked_lm_loss(model, batch)
    loss.backward()
    per_task = ortho.per_task_gradients()
    report = ortho.project()
    params = dict(model.named_parameters())
    projected_pairs = 0
    for name, (g0, g1, g2) in per_task.items():
        dot = (g0 * g1).sum()
        if dot < 0:
            projected_pairs += 1
            p0 = g0 - dot / (g1 * g1).sum() * g1
            p1 = g1 - dot / (g0 * g0).sum() * g0
        else:
            p0, p1 = g0, g1
        torch.testing.assert_close(params[name].grad, p0 + p1 + g2, rtol=1e-10, atol=1e-14)
    assert 0 < projected_pairs < len(per_task)
    # conflicts with the replay task exist but were left alone
    assert report.conflicts[:, 0, 2].any() or report.conflicts[:, 1, 2].any()
    assert torch.equal(
        report.coefficients[:, 2], torch.eye(3, dtype=torch.float64)[2].expand(len(per_task), 3)
    )
    assert torch.equal(report.coefficients[:, :, 2], report.coefficients[:, 2])


@pytest.mark.parametrize("tasks", [[0], [0, 3], [-1, 1]])
def test_projected_tasks_need_two_valid_ids(tasks):
    with pytest.raises(ValueError, match="projected_tasks"):
        OrthoLoRA(_peft_model(), NUM_TASKS, projected_tasks=tasks)


def test_projected_tasks_covering_every_task_is_the_default_rule():
    assert OrthoLoRA(_peft_model(), NUM_TASKS, projected_tasks=[2, 1, 0]).projected_tasks is None


# ----------------------------------------------------------------- conflict statistics
def _report(task_grads: torch.Tensor) -> ProjectionReport:
    """A report for one-factor-per-row gradients: task_grads [F, K, n]."""
    gram = task_grads @ task_grads.transpose(1, 2)
    return ProjectionReport([f"f{i}" for i in range(len(gram))], gram, torch.zeros_like(gram))


def test_conflict_rate_is_one_for_conflicting_and_zero_for_aligned_gradients():
    conflicting = torch.tensor([[[1.0, 0.0], [-1.0, 0.5], [-0.2, -1.0]]])  # every pair < 0
    stats = _report(conflicting).task_conflicts()
    assert float(stats["conflict_rate"]) == 1.0 and float(stats["task_pairs"]) == 3
    assert float(stats["mean_cosine"]) < 0
    aligned = torch.tensor([[[1.0, 0.0], [2.0, 0.1], [0.3, 0.3]]])
    stats = _report(aligned).task_conflicts()
    assert float(stats["conflict_rate"]) == 0.0 and float(stats["mean_cosine"]) > 0
    same = _report(torch.tensor([[[1.0, 2.0], [2.0, 4.0]]])).task_conflicts()
    torch.testing.assert_close(same["mean_cosine"], torch.tensor(1.0))


def test_conflicts_are_over_the_whole_adapter_present_tasks_and_the_projected_subset():
    # factor 0: tasks 0 and 1 conflict slightly; factor 1: they agree strongly -> no conflict
    # over the whole adapter. Task 2 has no gradient (absent from the step), task 3 conflicts
    # with task 0 in both factors.
    grads = torch.tensor(
        [
            [[1.0, 0.0], [-0.1, 1.0], [0.0, 0.0], [-1.0, 0.0]],
            [[1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [-1.0, 0.0]],
        ]
    )
    report = _report(grads)
    stats = report.task_conflicts()
    # present pairs: (0,1) +2.9 agree, (0,3) -2 conflict, (1,3) -2.9 conflict
    assert float(stats["task_pairs"]) == 3
    torch.testing.assert_close(stats["conflict_rate"], torch.tensor(2 / 3))
    whole = grads.permute(1, 0, 2).reshape(4, -1)  # each task's gradient of both factors
    cos = F.cosine_similarity(whole[:, None], whole[None, :], dim=-1)
    torch.testing.assert_close(stats["mean_cosine"], (cos[0, 1] + cos[0, 3] + cos[1, 3]) / 3)
    domain = report.task_conflicts([0, 1, 2])  # task 3 is replay: not counted
    assert float(domain["conflict_rate"]) == 0.0 and float(domain["task_pairs"]) == 1
    alone = report.task_conflicts([0, 2])  # one task with a gradient: no pair
    assert float(alone["task_pairs"]) == 0 and float(alone["conflict_rate"]) == 0.0


def test_domain_only_ortho_lora_in_the_training_loop_logs_conflicts_to_tensorboard(tmp_path):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medmoe.data import MultiTaskDataModule, TaskConfig
    from medmoe.model import MedMoEModule

    seed_everything(0)
    data = MultiTaskDataModule(
        tasks=[
            TaskConfig("medqa", source="toy", max_train=16, max_eval=4),
            TaskConfig("pubmedqa", source="toy", max_train=16, max_eval=4),
        ],
        replay=[TaskConfig("gsm8k", source="toy", max_train=16, max_eval=4)],
        replay_ratio=0.25,
        batch_size=8,
        max_length=48,
    )
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    tiny.update(num_attention_heads=4, num_key_value_heads=2)
    module = MedMoEModule(
        tiny_llama=tiny,
        adapter=LoRA(r=2, dropout=0.0, target_modules=["q_proj", "v_proj"]),
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        lambda_balance=0.0,
        lambda_kp=0.0,
        learning_rate=1e-2,
        gradient_projection="ortho",
        ortho_tasks="domain",
        loss_normalization="task_mean",
    )
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    assert module.ortho.projected_tasks == [0, 1]  # medqa, pubmedqa; gsm8k is replay
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), {"scalars": 0})
    events.Reload()
    for tag in ("ortho/conflict_rate", "ortho/mean_cosine", "ortho/task_pairs"):
        values = [e.value for e in events.Scalars(tag)]
        assert len(values) == 3, tag
    assert all(0.0 <= e.value <= 1.0 for e in events.Scalars("ortho/conflict_rate"))
    assert all(-1.0 <= e.value <= 1.0 for e in events.Scalars("ortho/mean_cosine"))
    # one domain pair at most (replay pairs are not counted), present in some step
    assert {e.value for e in events.Scalars("ortho/task_pairs")} <= {0.0, 1.0}
    assert max(e.value for e in events.Scalars("ortho/task_pairs")) == 1.0


def test_domain_only_ortho_lora_needs_two_domain_tasks(tmp_path):
    from lightning.pytorch import Trainer

    from medmoe.data import MultiTaskDataModule, TaskConfig
    from medmoe.model import MedMoEModule

    data = MultiTaskDataModule(
        tasks=[TaskConfig("medqa", source="toy", max_train=8, max_eval=4)],
        replay=[TaskConfig("gsm8k", source="toy", max_train=8, max_eval=4)],
        batch_size=2,
        max_length=48,
    )
    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    tiny.update(num_attention_heads=4, num_key_value_heads=2)
    module = MedMoEModule(
        tiny_llama=tiny,
        adapter=LoRA(r=2, dropout=0.0, target_modules=["q_proj"]),
        vocab_size=data.vocab_size,
        task_names=data.task_names,
        gradient_projection="ortho",
        ortho_tasks="domain",
    )
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with pytest.raises(ValueError, match="at least 2 domain tasks.*medqa"):
        trainer.fit(module, datamodule=data)


def test_an_unknown_ortho_tasks_value_names_the_accepted_ones():
    from medmoe.model import MedMoEModule

    with pytest.raises(ValueError, match="ortho_tasks must be one of all, domain"):
        MedMoEModule(tiny_llama={}, ortho_tasks="medical")
