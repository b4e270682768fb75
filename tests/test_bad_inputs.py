"""Table-driven: every bad input or fault exits non-zero with a last stderr line naming it.

Each case runs the ``medmoe`` CLI in-process (``medmoe.cli.main``), asserts the exit status,
that the last stderr line is one sentence naming the fault (no traceback, no Namespace dump),
and that the earlier run's checkpoint and adapter are byte-for-byte intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from medmoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny_fit.yaml"
FIXTURES = ROOT / "tests" / "fixtures"
# the conftest's trained_run config: the tiny fit on the shipped toy base
BASE = ("--config", str(DEMO), "--config", str(TINY), "--model.init_args.tiny_llama", "null",
        "--model.init_args.model_name_or_path", "toy")  # fmt: skip


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def trained(trained_run) -> Path:
    return trained_run


@dataclass
class Case:
    id: str
    args: Callable[[Path, Path], list[str]]  # (tmp dir, trained run dir) -> extra CLI args
    names: tuple[str, ...]  # substrings the last stderr line must contain
    code: int = 2
    command: str = "fit"
    base: tuple[str, ...] = field(default=BASE)
    # run before the CLI: (tmp dir, monkeypatch, request) -> more substrings the line must hold
    setup: Callable[[Path, pytest.MonkeyPatch, pytest.FixtureRequest], tuple[str, ...]] | None = (
        None
    )


# (case, seconds from main() to its exit, last stderr line), filled as the cases run
TIMES: list[tuple[str, float, str]] = []


def arg(*values: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: list(values)


def tasks_json(**task) -> str:
    return json.dumps([{"name": "pubmedqa", "source": "toy", **task}])


def write(tmp: Path, name: str, text: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def data_file(name: str, content: str | bytes, task: str = "pubmedqa", **extra):
    def build(tmp: Path, run: Path) -> list[str]:
        source = write(tmp, name, content)
        return ["--data.init_args.tasks", json.dumps([{"name": task, "source": source, **extra}])]

    return build


def ckpt(make: Callable[[Path, Path], str], *extra: str):
    return lambda tmp, run: ["--ckpt_path", make(tmp, run), *extra]


def last(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


def truncated_ckpt(tmp: Path, run: Path) -> str:
    data = last(run).read_bytes()
    return write(tmp, "cut.ckpt", data[: len(data) // 2])


def foreign_ckpt(tmp: Path, run: Path) -> str:
    torch.save({"weights": torch.ones(2)}, tmp / "foreign.ckpt")
    return str(tmp / "foreign.ckpt")


def adapter_copy(tmp: Path, run: Path, cut: bool) -> str:
    target = tmp / "adapter"
    shutil.copytree(run / "adapter", target)
    weights = target / "adapter_model.safetensors"
    if cut:
        weights.write_bytes(weights.read_bytes()[:100])
    return str(target)


def load_weights(cut: bool):
    def build(tmp: Path, run: Path) -> list[str]:
        callback = {
            "class_path": "medmoe.callbacks.LoadAdapterWeights",
            "init_args": {"path": adapter_copy(tmp, run, cut)},
        }
        return ["--trainer.callbacks+", json.dumps(callback)]

    return build


def corrupted_ckpt(tmp: Path, run: Path) -> str:
    data = bytearray(last(run).read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    return write(tmp, "flipped.ckpt", bytes(data))


def adapter_config_cut(tmp: Path, run: Path) -> str:
    target = Path(adapter_copy(tmp, run, cut=False))
    config = target / "adapter_config.json"
    config.write_bytes(config.read_bytes()[:40])
    return str(target)


def run_dir(tmp: Path) -> Path:
    return tmp / "runs" / "demo" / "version_0"


def parent_is_a_file(tmp: Path, monkeypatch, request) -> tuple[str, ...]:
    (tmp / "afile").write_text("not a directory")
    return ()


def read_only_save_dir(tmp: Path, monkeypatch, request) -> tuple[str, ...]:
    """This machine runs as root (chmod cannot make a directory read-only for it): os.access
    is told that the save_dir is read-only."""
    locked = tmp / "ro"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: Path(path) != locked and real(path, mode, **kw)
    )
    return ()


def held_by_another_fit(tmp: Path, monkeypatch, request) -> tuple[str, ...]:
    """Another process holds the run directory's lock (as a running ``medmoe fit`` does)."""
    code = (
        "import sys, time; from medmoe.run_lock import RunDirectoryLock; "
        "RunDirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(300)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir(tmp))], stdout=subprocess.PIPE, text=True
    )

    def stop() -> None:
        holder.kill()
        holder.wait()
        holder.stdout.close()

    request.addfinalizer(stop)
    assert holder.stdout.readline().strip() == "held"
    return (f"in use by process {holder.pid}",)


def save_dir(path: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: ["--trainer.logger.init_args.save_dir", str(tmp / path)]


PUBMED_ROW = json.loads((FIXTURES / "pubmedqa.jsonl").read_text().splitlines()[0])
MMLU = (FIXTURES / "mmlu.jsonl").read_text()
ADAPTER = "--model.init_args.adapter.init_args."

CASES = [
    # --- config values rejected by a dataclass or a constructor: the key is named
    Case("replay_ratio", arg("--data.init_args.replay_ratio", "1.5"), ("replay_ratio", "1.5")),
    Case("n_min", arg(f"{ADAPTER}n_min", "9"), ("MoELoRAConfig", "n_min=9", "n_max")),
    Case("tau_init", arg(f"{ADAPTER}tau_init", "20"), ("tau_init=20", "tau_range")),
    Case("expert_rank", arg(f"{ADAPTER}expert_rank", "5"), ("expert_rank 5", "allowed_ranks")),
    Case("allowed_ranks", arg(f"{ADAPTER}allowed_ranks", "[0]"), ("allowed_ranks", "[0]")),
    Case(
        "allocation",
        arg(f"{ADAPTER}allocation", "eq3"),
        ("model.adapter.allocation", "eq3", "'eq2'"),
    ),
    Case(
        "torch_dtype",
        arg("--model.init_args.torch_dtype", "float8"),
        ("model.torch_dtype", "float8", "'bfloat16'"),
    ),
    Case("unknown_key", arg("--data.init_args.bogus", "1"), ("config key data", "'bogus'")),
    Case(
        "unknown_argument", arg("--trainer.max_stepz", "3"), ("unrecognized arguments", "max_stepz")
    ),
    Case("config_file_missing", arg("--config", "no_such.yaml"), ("no_such.yaml",)),
    Case("gamma", arg(f"{ADAPTER}gamma", "0.5"), ("gamma", "0.5")),
    Case("dropout", arg(f"{ADAPTER}dropout", "1.5"), ("dropout", "1.5")),
    Case("top_k", arg(f"{ADAPTER}top_k", "0"), ("top_k", "0")),
    Case("lambda_balance", arg("--model.init_args.lambda_balance", "-1"), ("lambda_balance",)),
    Case("warmup_ratio", arg("--model.init_args.warmup_ratio", "1.5"), ("warmup_ratio", "1.5")),
    Case(
        "duplicate_task",
        arg("--data.init_args.replay", json.dumps([{"name": "medqa", "source": "toy"}])),
        ("['medqa']", "more than once"),
    ),
    Case(
        "unknown_task",
        arg("--data.init_args.tasks", tasks_json(name="medqaa")),
        ("'medqaa'", "known tasks"),
    ),
    Case(
        "max_eval_zero", arg("--data.init_args.tasks", tasks_json(max_eval=0)), ("max_eval", ">= 1")
    ),
    Case(
        "weight_negative", arg("--data.init_args.tasks", tasks_json(weight=-1)), ("weight", ">= 0")
    ),
    Case(
        "eval_batch_size_zero",
        arg("--data.init_args.eval_batch_size", "0"),
        ("eval_batch_size", "0"),
    ),
    Case("batch_size_zero", arg("--data.init_args.batch_size", "0"), ("batch_size must be >= 1",)),
    Case(
        "sampling",
        arg(
            "--data.init_args.sampling_temperature", "0", "--data.init_args.sampling", "temperature"
        ),
        ("sampling_temperature", "> 0"),
    ),
    # --- files and paths
    Case(
        "model_dir_missing",
        arg(
            "--model.init_args.tiny_llama",
            "null",
            "--model.init_args.model_name_or_path",
            "./no/such/model",
        ),
        ("model_name_or_path", "./no/such/model", "no existing local directory"),
    ),
    Case(
        "model_path_like_missing",
        arg(
            "--model.init_args.tiny_llama",
            "null",
            "--model.init_args.model_name_or_path",
            "models/no_such_model",
        ),
        ("model_name_or_path", "'models/no_such_model'", "no existing local directory"),
        setup=lambda tmp, monkeypatch, request: (
            (tmp / "models").mkdir(),
            monkeypatch.chdir(tmp),
            ("nearest existing parent is models",),
        )[-1],
    ),
    Case(
        "run_dir_parent_is_a_file",
        save_dir("afile/runs"),
        ("afile", "is a file, not a directory"),
        setup=parent_is_a_file,
    ),
    Case(
        "run_dir_read_only",
        save_dir("ro"),
        ("run directory", "is not writable", "read-only"),
        setup=read_only_save_dir,
    ),
    Case(
        "run_dir_locked_by_another_fit",
        arg("--trainer.logger.init_args.version", "0"),
        ("run directory", "version_0", "one writer per run"),
        setup=held_by_another_fit,
    ),
    Case(
        "tokenizer_missing",
        arg("--data.init_args.tokenizer", "./no_tokenizer_dir"),
        ("tokenizer", "./no_tokenizer_dir"),
    ),
    Case(
        "vocab_mismatch",
        arg(
            "--model.init_args.tiny_llama",
            "null",
            "--model.init_args.model_name_or_path",
            "toy",
            "--data.init_args.tokenizer",
            "byte",
        ),
        ("260 tokens", "embeds 262", "allow_vocab_mismatch"),
    ),
    Case(
        "data_file_missing",
        arg("--data.init_args.tasks", tasks_json(source="./missing.jsonl")),
        ("missing.jsonl", "does not exist"),
    ),
    Case(
        "jsonl_malformed",
        data_file("bad.jsonl", json.dumps(PUBMED_ROW) + "\n{oops\n"),
        ("bad.jsonl, line 2", "not valid JSON"),
    ),
    Case("jsonl_empty", data_file("empty.jsonl", ""), ("empty.jsonl", "empty")),
    Case("jsonl_blank_lines", data_file("blank.jsonl", "\n\n"), ("blank.jsonl", "empty")),
    Case(
        "jsonl_not_object",
        data_file("list.jsonl", "[1, 2]\n"),
        ("list.jsonl, line 1", "JSON object"),
    ),
    Case(
        "missing_field",
        data_file(
            "nofield.jsonl",
            json.dumps({k: v for k, v in PUBMED_ROW.items() if k != "final_decision"}) + "\n",
        ),
        ("nofield.jsonl, line 1", "final_decision"),
    ),
    Case(
        "bad_value",
        data_file("value.jsonl", json.dumps({**PUBMED_ROW, "final_decision": "perhaps"}) + "\n"),
        ("value.jsonl, line 1", "'perhaps'", "accepted"),
    ),
    Case(
        "field_map_unknown",
        data_file("fm.jsonl", json.dumps(PUBMED_ROW) + "\n", field_map={"abstract": "context"}),
        ("field_map", "'abstract'", "fm.jsonl"),
    ),
    Case(
        "tiny_pubmedqa",
        data_file(
            "three.jsonl", "".join(json.dumps({**PUBMED_ROW, "pubid": i}) + "\n" for i in range(3))
        ),
        ("no training records", "3 record(s)", "test 2, validation 1, train 0", "eval_source"),
    ),
    Case("unsupported_type", data_file("data.txt", "hello"), ("data.txt", "unsupported type")),
    Case(
        "overlap_refused",
        lambda tmp, run: [
            "--data.init_args.tasks",
            json.dumps(
                [
                    {
                        "name": "mmlu",
                        "source": write(tmp, "mmlu.jsonl", MMLU),
                        "eval_source": write(tmp, "mmlu_copy.jsonl", MMLU),
                    }
                ]
            ),
            "--data.init_args.replay",
            "[]",
        ],
        ("task 'mmlu'", "also training", "allow_overlap"),
    ),
    # --- checkpoints
    Case(
        "ckpt_missing",
        arg("--ckpt_path", "/no/such/last.ckpt"),
        ("/no/such/last.ckpt", "does not exist"),
    ),
    Case(
        "ckpt_empty", ckpt(lambda tmp, run: write(tmp, "empty.ckpt", b"")), ("empty.ckpt", "empty")
    ),
    Case("ckpt_truncated", ckpt(truncated_ckpt), ("cut.ckpt", "truncated")),
    Case(
        "ckpt_garbage",
        ckpt(lambda tmp, run: write(tmp, "junk.ckpt", b"\x00junk" * 100)),
        ("junk.ckpt", "cannot be read"),
    ),
    Case("ckpt_corrupted", ckpt(corrupted_ckpt), ("flipped.ckpt", "corrupted", "CRC-32")),
    Case("ckpt_foreign", ckpt(foreign_ckpt), ("foreign.ckpt", "not a medmoe training checkpoint")),
    Case(
        "resume_other_adapter",
        ckpt(
            lambda tmp, run: str(last(run)),
            "--config",
            str(ROOT / "configs" / "baselines" / "lora.yaml"),
        ),
        ("MoELoRAConfig adapter", "LoRA", "last.ckpt"),
    ),
    Case(
        "resume_other_ranks",
        ckpt(lambda tmp, run: str(last(run)), f"{ADAPTER}n_max", "3"),
        ("adapter key n_max", "4", "3"),
    ),
    Case(
        "resume_other_lr",
        ckpt(lambda tmp, run: str(last(run)), "--model.init_args.learning_rate", "1e-5"),
        ("learning_rate", "1e-05", "LoadAdapterWeights"),
    ),
    Case(
        "run_dir_taken",
        lambda tmp, run: [
            "--trainer.logger.init_args.save_dir",
            str(run.parents[1]),
            "--trainer.logger.init_args.version",
            "0",
        ],
        ("already holds another run's files", "--overwrite"),
    ),
    Case("adapter_truncated", load_weights(cut=True), ("adapter_model.safetensors", "truncated")),
    Case(
        "load_weights_and_ckpt",
        lambda tmp, run: [*load_weights(cut=False)(tmp, run), "--ckpt_path", str(last(run))],
        ("LoadAdapterWeights", "--ckpt_path"),
    ),
    # --- medmoe predict
    Case(
        "predict_no_weights",
        arg(),
        ("exactly one of --ckpt_path or --adapter_dir",),
        command="predict",
    ),
    Case(
        "predict_unknown_task",
        lambda tmp, run: ["--adapter_dir", str(run / "adapter"), "--task", "mmlu"],
        ("--task 'mmlu'", "its tasks"),
        command="predict",
    ),
    Case(
        "predict_bad_prompts",
        lambda tmp, run: [
            "--adapter_dir",
            str(run / "adapter"),
            "--prompts",
            write(tmp, "p.jsonl", '{"prompt": ""}\n'),
        ],
        ("p.jsonl, line 1", "'prompt'"),
        command="predict",
    ),
    Case(
        "predict_score_generation",
        lambda tmp, run: [
            "--adapter_dir",
            str(run / "adapter"),
            "--task",
            "gsm8k",
            "--limit",
            "1",
            "--mode",
            "score",
        ],
        ("--mode score", "'gsm8k'"),
        command="predict",
    ),
    Case(
        "predict_truncated_adapter",
        lambda tmp, run: ["--adapter_dir", adapter_copy(tmp, run, cut=True)],
        ("adapter_model.safetensors", "truncated"),
        command="predict",
    ),
    Case(
        "predict_truncated_adapter_config",
        lambda tmp, run: ["--adapter_dir", adapter_config_cut(tmp, run)],
        ("adapter_config.json", "truncated"),
        command="predict",
    ),
    # --- a fault while training: exit 1, no traceback
    Case(
        "nan_loss",
        arg("--model.init_args.learning_rate", "1e30", "--trainer.gradient_clip_val", "null"),
        ("training loss is", "last good checkpoint"),
        code=1,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_names_the_fault(case, trained, tmp_path, capsys, monkeypatch, request):
    before = _digest(trained)
    extra = case.setup(tmp_path, monkeypatch, request) if case.setup else ()
    args = [
        case.command,
        *case.base,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--trainer.max_steps",
        "3",
        *case.args(tmp_path, trained),
    ]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exit_.value.code == case.code, err[-3000:]
    final = lines[-1]
    assert final.startswith("medmoe: error: "), err[-3000:]
    for name in (*case.names, *extra):
        assert name in final, (name, final)
    assert "Traceback" not in err and "Namespace(" not in err
    assert _digest(trained) == before  # nothing earlier lost or rewritten
    TIMES.append((case.id, seconds, final))


@pytest.mark.parametrize("case_id", ["run_dir_parent_is_a_file", "run_dir_read_only"])
def test_an_unwritable_run_directory_is_refused_before_anything_loads(
    case_id, tmp_path, capsys, monkeypatch, request
):
    """The config alone refutes it: no tokenizer, data or base model is loaded first."""
    import medmoe.data.datamodule as datamodule
    import medmoe.model as model

    case = next(c for c in CASES if c.id == case_id)
    case.setup(tmp_path, monkeypatch, request)
    loaded = []
    for module, name in ((datamodule, "load_tokenizer"), (model, "load_base_model")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module,
            name,
            lambda *a, _real=real, _name=name, **k: loaded.append(_name) or _real(*a, **k),
        )
    with pytest.raises(SystemExit) as exit_:
        main([case.command, *case.base, *case.args(tmp_path, tmp_path)])
    final = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and all(name in final for name in case.names), final
    assert loaded == []


def test_zz_time_to_error_table(capsys):
    """The time from ``main()`` to each case's error (in-process: the imports are paid once,
    by the first case and the conftest's trained run), printed as a table."""
    if not TIMES:
        pytest.skip("no bad-input case ran")
    with capsys.disabled():
        print(f"\n{len(TIMES)} bad-input cases, seconds from main() to the error:")
        for case, seconds, final in TIMES:
            print(f"{case:34s} {seconds:6.2f}  {final[:150]}")
