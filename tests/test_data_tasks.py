"""Tasks and sources: fixture files in the exact upstream schemas, splits, every error path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medmoe.data.sources import load_records
from medmoe.data.tasks import TASKS, Carve, get_task
from medmoe.eval.examples import GenerationExample, MultipleChoiceExample

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def every_split(task: str, source: str) -> list[dict]:
    """All records of a single-file source whose splits the task carves."""
    return [r for s in ("train", "validation", "test") for r in load_records(task, source, s)]


def test_registry_and_unknown_task():
    assert set(TASKS) == {"pubmedqa", "medqa", "clinical_sum", "mmlu", "gsm8k"}
    assert {t.name: t.group for t in TASKS.values()} == {
        "pubmedqa": "domain", "medqa": "domain", "clinical_sum": "domain",
        "mmlu": "general", "gsm8k": "general",
    }  # fmt: skip
    assert get_task("gsm8k").metric == "gsm8k" and get_task("clinical_sum").metric == "rouge_l"
    with pytest.raises(ValueError, match="unknown task 'medmcqa'") as err:
        get_task("medmcqa")
    for name in TASKS:
        assert name in str(err.value)


def test_pubmedqa_fixture():
    task = get_task("pubmedqa")
    records = sorted(every_split("pubmedqa", fixture("pubmedqa.jsonl")), key=lambda r: r["pubid"])
    assert len(records) == 6 and isinstance(records[0]["pubid"], int)
    prompt, target = task.format(records[1])
    contexts = records[1]["context"]["contexts"]
    assert prompt.startswith("Abstract: Low vitamin D levels")  # harness: one context a line
    assert prompt == (
        "Abstract: " + "\n".join(contexts) + "\nQuestion: " + records[1]["question"] + "\nAnswer:"
    )
    assert target == " no"
    ex = task.eval_example(records[2])
    assert isinstance(ex, MultipleChoiceExample)
    assert ex.choices == (" yes", " no", " maybe") and ex.answer == 2
    assert ex.prompt == task.format(records[2])[0]
    toy = task.styled("toy").format(records[1])[0]  # the toy clinic's own short format
    assert toy.startswith("Context: " + " ".join(contexts) + "\nQuestion: ")


def test_medqa_fixture():
    task = get_task("medqa")
    records = load_records(task, fixture("medqa.jsonl"), "test", whole_file=True)
    prompt, target = task.format(records[0])
    assert prompt.splitlines()[1:] == [
        "A. Acute cystitis", "B. Acute pyelonephritis", "C. Nephrolithiasis",
        "D. Acute interstitial nephritis", "Answer:",
    ]  # fmt: skip
    assert target == " B"
    ex = task.eval_example(records[3])
    assert ex.choices == (" A", " B", " C", " D") and ex.answer == 0


def test_mmlu_fixture():
    task = get_task("mmlu")
    records = load_records(task, fixture("mmlu.jsonl"), "test", whole_file=True)
    prompt, target = task.format(records[0])
    body = (
        "Which cranial nerve innervates the lateral rectus muscle?\n"
        "A. Oculomotor nerve\nB. Trochlear nerve\nC. Abducens nerve\nD. Facial nerve\nAnswer:"
    )
    assert prompt == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n" + body
    )
    assert target == " C"
    assert task.styled("toy").format(records[0])[0] == "Question: " + body
    assert [task.eval_example(r).answer for r in records] == [2, 1, 0, 3, 1]
    assert task.eval_example(records[1]).subject == "high_school_mathematics"


def test_mmlu_unwraps_the_auxiliary_train_nesting():
    nested = {
        "train": {"question": "Q?", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 1}
    }
    task = get_task("mmlu")
    assert task.format(task.normalize(nested)) == (
        "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:",  # no subject, so no subject line
        " B",
    )


def test_gsm8k_fixture():
    task = get_task("gsm8k")
    records = load_records(task, fixture("gsm8k.jsonl"), "test", whole_file=True)
    prompt, target = task.format(records[0])
    assert prompt == f"Question: {records[0]['question']}\nAnswer:"
    assert target == " " + records[0]["answer"] and target.endswith("#### 9")
    ex = task.eval_example(records[3])
    assert isinstance(ex, GenerationExample) and ex.reference.endswith("#### 3,600")


@pytest.mark.parametrize("name", ["clinical_sum.jsonl", "clinical_sum.csv"])
def test_clinical_sum_fixture(name):
    task = get_task("clinical_sum")
    records = sorted(every_split("clinical_sum", fixture(name)), key=lambda r: r["note_id"])
    assert [str(r["note_id"]) for r in records] == ["n-0001", "n-0002", "n-0003", "n-0004"]
    prompt, target = task.format(records[1])
    assert prompt.startswith("Note: 54 y/o F, hx T2DM") and prompt.endswith("\nSummary:")
    assert target.startswith(" 54-year-old woman with type 2 diabetes")
    ex = task.eval_example(records[1])
    assert isinstance(ex, GenerationExample) and ex.reference == target[1:]


def test_field_map_renames_a_stand_in_export(tmp_path):
    path = tmp_path / "notes.jsonl"
    rows = [{"idx": 7, "note": "Pt with fever.", "summary": "Fever."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task("clinical_sum")
    with pytest.raises(ValueError, match="missing required field 'note_id'"):
        load_records(task, str(path), "train")
    records = load_records(task, str(path), "train", {"idx": "note_id", "note": "text"})
    assert task.format(records[0]) == ("Note: Pt with fever.\nSummary:", " Fever.")
    assert task.field_maps["AGBonnet/augmented-clinical-notes"] == {
        "idx": "note_id",
        "note": "text",
    }


def test_single_file_is_carved_into_disjoint_deterministic_splits():
    pubmed = {s: load_records("pubmedqa", fixture("pubmedqa.jsonl"), s) for s in ("train", "test")}
    assert [len(pubmed["train"]), len(pubmed["test"])] == [2, 3]  # 40% / 50%, like the hub
    assert not {r["pubid"] for r in pubmed["train"]} & {r["pubid"] for r in pubmed["test"]}
    # the finding: MMLU from one file gave every split all records; MedQA test all of them
    for task, name, train in (
        ("medqa", "medqa.jsonl", "train"),
        ("mmlu", "mmlu.jsonl", "auxiliary_train"),
    ):
        parts = {s: load_records(task, fixture(name), s) for s in (train, "validation", "test")}
        keys = {s: {json.dumps(r, sort_keys=True) for r in rs} for s, rs in parts.items()}
        assert all(keys.values())
        assert not keys[train] & keys["test"] and not keys[train] & keys["validation"]
        assert not keys["validation"] & keys["test"]
        total = len(load_records(task, fixture(name), "test", whole_file=True))
        assert sum(len(v) for v in parts.values()) == total
        assert load_records(task, fixture(name), "test") == parts["test"]  # deterministic
    assert load_records("mmlu", fixture("mmlu.jsonl"), "train") == load_records(
        "mmlu", fixture("mmlu.jsonl"), "auxiliary_train"
    )
    with pytest.raises(ValueError, match="split 'dev' needs a directory holding dev.jsonl"):
        load_records("mmlu", fixture("mmlu.jsonl"), "dev")


def test_directory_source_carves_missing_splits(tmp_path):
    shutil.copy(FIXTURES / "pubmedqa.jsonl", tmp_path / "train.jsonl")
    task = get_task("pubmedqa")
    parts = {s: load_records(task, str(tmp_path), s) for s in ("train", "validation", "test")}
    ids = {s: [r["pubid"] for r in rs] for s, rs in parts.items()}
    assert [len(ids[s]) for s in ("train", "validation", "test")] == [2, 1, 3]  # 40/10/50 %
    assert sorted(sum(ids.values(), [])) == list(range(90000001, 90000007))
    assert load_records(task, str(tmp_path), "test") == parts["test"]  # fixed


def test_directory_source_uses_existing_splits(tmp_path):
    shutil.copy(FIXTURES / "medqa.jsonl", tmp_path / "train.jsonl")
    shutil.copy(FIXTURES / "medqa.jsonl", tmp_path / "validation-00000.jsonl")
    task = get_task("medqa")
    assert len(load_records(task, str(tmp_path), "validation")) == 4
    assert len(load_records(task, str(tmp_path), "train")) == 4  # not carved: validation exists
    with pytest.raises(ValueError, match="no split 'test'; available: train, validation"):
        load_records(task, str(tmp_path), "test")


def test_carve_is_a_fixed_partition():
    carve = Carve("train", (("test", 0.5), ("validation", 0.1)))
    parts = [carve.indices(1000, p) for p in ("test", "validation", "train")]
    assert [len(p) for p in parts] == [500, 100, 400]
    assert sorted(sum(parts, [])) == list(range(1000))
    assert carve.indices(1000, "test") == parts[0]


# --- error paths ------------------------------------------------------------------------------


def test_missing_file_names_path_and_task():
    with pytest.raises(FileNotFoundError) as err:
        load_records("medqa", "data/medqa/missing.jsonl", "train")
    assert "data/medqa/missing.jsonl" in str(err.value) and "'medqa'" in str(err.value)


def test_empty_directory_names_path_and_task(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*'gsm8k'"):
        load_records("gsm8k", str(tmp_path), "train")


@pytest.mark.parametrize(
    ("task", "name", "field", "line"),
    [
        ("pubmedqa", "pubmedqa_missing_field.jsonl", "final_decision", 3),
        ("clinical_sum", "clinical_sum_missing.csv", "summary", 2),
    ],
)
def test_missing_field_names_field_file_and_line(task, name, field, line):
    with pytest.raises(ValueError) as err:
        load_records(task, fixture(name), "train")
    msg = str(err.value)
    assert f"missing required field '{field}'" in msg
    assert fixture(name) in msg and f"line {line}" in msg and f"'{task}'" in msg


def test_missing_field_line_counts_file_lines(tmp_path):
    lines = (FIXTURES / "pubmedqa_missing_field.jsonl").read_text().splitlines()
    path = tmp_path / "gappy.jsonl"
    path.write_text("\n".join([lines[0], "", lines[1], lines[2]]) + "\n")  # a blank line 2
    with pytest.raises(ValueError, match="gappy.jsonl, line 4: missing required field"):
        load_records("pubmedqa", str(path), "train")


@pytest.mark.parametrize(
    ("task", "name", "line", "value", "accepted"),
    [
        ("pubmedqa", "pubmedqa_bad_value.jsonl", 2, "'perhaps'", "'yes', 'no', 'maybe'"),
        ("medqa", "medqa_bad_answer.jsonl", 2, "'E'", "'A', 'B', 'C', 'D'"),
        ("mmlu", "mmlu_bad_answer.jsonl", 3, "4", "0..3"),
        ("gsm8k", "gsm8k_no_marker.jsonl", 2, "'On Tuesday", "'#### <number>'"),
    ],
)
def test_bad_value_names_value_and_accepted(task, name, line, value, accepted):
    with pytest.raises(ValueError) as err:
        load_records(task, fixture(name), "train")
    msg = str(err.value)
    assert f"has value {value}" in msg and "accepted: " in msg and accepted in msg
    assert fixture(name) in msg and f"line {line}:" in msg


def test_unreadable_file_names_path_and_task(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "Q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(ValueError) as err:
        load_records("gsm8k", str(path), "train")
    assert str(err.value).startswith(f"{path}, line 2: not valid JSON")
    assert "task 'gsm8k'" in str(err.value)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "records.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match="unsupported type"):
        load_records("gsm8k", str(path), "train")


def test_save_to_disk_directory_is_carved_like_the_hub(tmp_path):
    import datasets

    rows = sorted(every_split("pubmedqa", fixture("pubmedqa.jsonl")), key=lambda r: r["pubid"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path)
    test = load_records("pubmedqa", str(tmp_path), "test")
    assert [r["pubid"] for r in test] == [
        rows[i]["pubid"] for i in TASKS["pubmedqa"].carve.indices(6, "test")
    ]
