"""`medmoe predict` on the demo and `medmoe.load_adapted` for notebooks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import medmoe
from medmoe.cli import main
from medmoe.data import MultiTaskDataModule
from medmoe.eval import generate_greedy, score_multiple_choice

ROOT = Path(__file__).resolve().parents[1]
CONFIG = [
    "--config",
    str(ROOT / "configs" / "demo.yaml"),
    "--config",
    str(ROOT / "tests" / "configs" / "tiny_fit.yaml"),
    "--model.init_args.tiny_llama",
    "null",
    "--model.init_args.model_name_or_path",
    "toy",
]


def predict(*args: str) -> None:
    try:
        main(["predict", *CONFIG, *args])
    except SystemExit as exit_:
        assert exit_.code in (0, None), exit_.code


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def tokenizer():
    return MultiTaskDataModule(tokenizer="toy").tokenizer


def test_predict_generates_one_jsonl_line_per_record(trained_run, tmp_path, tokenizer):
    out = tmp_path / "pred.jsonl"
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    predict("--ckpt_path", str(ckpt), "--limit", "2", "--max_new_tokens", "6", "--output", str(out))
    lines = read_lines(out)
    assert [line["task"] for line in lines] == ["medqa"] * 2 + ["pubmedqa"] * 2 + ["gsm8k"] * 2
    for line in lines:
        assert {"prompt", "output", "task", "index", "reference", "gates"} <= set(line)
        # gates: per decoder layer of the toy base (4), one mean probability per expert
        assert sorted(line["gates"]) == ["layer_0", "layer_1", "layer_2", "layer_3"]
        assert [len(g) for g in line["gates"].values()] == [2, 3, 3, 4]  # eq 2, n 2..4
        for gates in line["gates"].values():
            assert sum(gates) == pytest.approx(1.0, abs=1e-4)
    # an independent path: the exported adapter on the toy base, generated greedily
    model = medmoe.load_adapted("toy", trained_run / "adapter")
    expected = generate_greedy(model, tokenizer, [line["prompt"] for line in lines], 6)
    assert [line["output"] for line in lines] == expected


def test_predict_scores_choices_and_reads_a_prompts_file(trained_run, tmp_path, tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {
            "prompt": "Question: Is fever a symptom of pneumonia ?\nAnswer:",
            "choices": [" yes", " no"],
        },
        {
            "prompt": "Question: Is rash a symptom of gout ?\nAnswer:",
            "choices": [" yes", " no"],
            "task": "quiz",
        },
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    adapter = str(trained_run / "adapter")
    predict(
        "--adapter_dir", adapter, "--prompts", str(prompts), "--mode", "score", "--output", str(out)
    )
    lines = read_lines(out)
    assert [line["task"] for line in lines] == [None, "quiz"]
    from medmoe.eval import MultipleChoiceExample

    model = medmoe.load_adapted("toy", adapter)
    examples = [MultipleChoiceExample(r["prompt"], tuple(r["choices"]), 0) for r in rows]
    result = score_multiple_choice(model, tokenizer, examples)
    for line, want, pred in zip(
        lines, result.loglikelihoods.tolist(), result.predictions, strict=True
    ):
        assert line["scores"] == pytest.approx(want, rel=1e-6)
        assert line["output"] == line["choices"][int(pred)]


def test_load_adapted_changes_the_base_and_a_bad_adapter_changes_nothing(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from medmoe.data import toy_base_path

    ids = torch.tensor([[1, 5, 9, 13, 17]])
    base = AutoModelForCausalLM.from_pretrained(toy_base_path()).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted_logits = medmoe.load_adapted("toy", trained_run / "adapter")(ids).logits
    assert not torch.allclose(base_logits, adapted_logits)  # the trained adapter acts

    broken = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=f"adapter weights {weights} cannot be read"):
        medmoe.load_adapted(base, broken)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        medmoe.load_adapted(base, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no adapter: expected adapter_config.json"):
        medmoe.load_adapted(base, tmp_path / "empty")
