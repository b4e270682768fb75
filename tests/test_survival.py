"""Runs that survive: signals, rolling atomic checkpoints, honest resume, the run-directory guard."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
TINY = ROOT / "tests" / "configs" / "tiny_fit.yaml"


def fit_args(save_dir: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(DEMO),
        "--config",
        str(TINY),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *extra,
    ]


def run_dir(save_dir: Path, version: int = 0) -> Path:
    return save_dir / "demo" / f"version_{version}"


def adapter_tensors(save_dir: Path, version: int = 0) -> dict[str, torch.Tensor]:
    return load_file(run_dir(save_dir, version) / "adapter" / "adapter_model.safetensors")


def run_main(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exit_:
        return 0 if exit_.code is None else int(exit_.code)
    return 0


@pytest.mark.slow
def test_sigterm_saves_exits_143_and_resume_is_bit_identical(tmp_path):
    steps = "60"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "medmoe", *fit_args(interrupted, "--trainer.max_steps", steps)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = run_dir(interrupted) / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the first rolling checkpoint (step 5) shows that training runs
    assert last.exists(), "no rolling checkpoint before the signal"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    final_line = stderr.strip().splitlines()[-1]
    assert "SIGTERM stopped the run at global step" in final_line and str(last) in final_line
    stopped_at = torch.load(last, weights_only=True)["global_step"]
    assert 5 <= stopped_at < int(steps)
    assert not (run_dir(interrupted) / "adapter").exists()  # the run did not finish
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # one rolling file

    # resume (in-process: same code, no second interpreter start) and an uninterrupted run
    torch.set_num_threads(1)
    resumed = tmp_path / "resumed"
    assert run_main(fit_args(resumed, "--trainer.max_steps", steps, "--ckpt_path", str(last))) == 0
    whole = tmp_path / "whole"
    assert run_main(fit_args(whole, "--trainer.max_steps", steps)) == 0
    got, want = adapter_tensors(resumed), adapter_tensors(whole)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


# --- atomic writes --------------------------------------------------------------------------


def test_lightning_default_stages_checkpoints_outside_the_target_directory(tmp_path, monkeypatch):
    """The finding: fsspec's transaction writes to the system temp dir and *moves* the file,
    which is a non-atomic copy when that dir is another file system; ours stages beside it."""
    import tempfile

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from medmoe.callbacks import AtomicCheckpointIO

    staged: list[Path] = []
    real_mkstemp = tempfile.mkstemp

    def recording_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        staged.append(Path(name).parent)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    target = tmp_path / "run" / "last.ckpt"
    TorchCheckpointIO().save_checkpoint({"a": torch.ones(2)}, target)
    assert staged and staged[-1] != target.parent
    AtomicCheckpointIO().save_checkpoint({"a": torch.ones(2)}, target)
    assert staged[-1] == target.parent
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))


def test_a_failed_write_keeps_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    from medmoe.callbacks.checkpoint import atomic_torch_save

    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": torch.tensor(1)}, target)
    before = target.read_bytes()
    real_save = torch.save

    def dies_half_way(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    # one line naming the file and what went wrong (medmoe.atomic.AtomicWriteError, an OSError)
    with pytest.raises(OSError, match=r"cannot save .*last\.ckpt: no space left on device"):
        atomic_torch_save({"step": torch.tensor(2)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert int(torch.load(target, weights_only=True)["step"]) == 1


# --- rolling checkpoint, NaN stop, schedule on resume ----------------------------------------


def test_nan_stop_keeps_the_last_rolling_checkpoint(tmp_path):
    from lightning.pytorch import seed_everything
    from test_training import _data, _module, _trainer

    from medmoe.callbacks import ResumableCheckpoint

    seed_everything(0)
    data = _data()
    module = _module(data)
    original = module.compute_losses

    def poisoned(batch):
        losses = original(batch)
        if module.global_step == 5:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    module.compute_losses = poisoned
    checkpoint = ResumableCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    with pytest.raises(FloatingPointError, match="training loss is nan at global step 5"):
        _trainer(tmp_path, 8, [checkpoint]).fit(module, datamodule=data)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 4  # the last rolling save, nothing written at the fault
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_last_ckpt_holds_the_final_step_and_a_longer_resume_continues_the_schedule(tmp_path):
    from lightning.pytorch import Callback, seed_everything
    from test_training import _data, _module, _trainer

    from medmoe.callbacks import ResumableCheckpoint

    class FirstLr(Callback):
        lr: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.lr is None:
                self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    seed_everything(0)
    data = _data()
    ckpt = ResumableCheckpoint(dirpath=tmp_path / "a", every_n_train_steps=4)
    _trainer(tmp_path, 5, [ckpt]).fit(_module(data, warmup_ratio=0.0), datamodule=data)
    last = tmp_path / "a" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5  # not 4: the end is saved

    seed_everything(0)
    data = _data()
    first = FirstLr()
    ckpt = ResumableCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=4)
    trainer = _trainer(tmp_path, 8, [ckpt, first])
    trainer.fit(_module(data, warmup_ratio=0.0), datamodule=data, ckpt_path=last)
    # the 5-step cosine ended at lr 0; the rebuilt 8-step one gives lr * cos-decay at step 5
    import math

    expected = 1e-2 * 0.5 * (1 + math.cos(math.pi * 5 / 8))
    assert first.lr == pytest.approx(expected, rel=1e-6)


# --- the CLI's own output ---------------------------------------------------------------------


def test_help_has_no_optimizer_or_lr_scheduler_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--trainer.max_steps" in out and "--overwrite" in out
    assert "--optimizer" not in out and "--lr_scheduler" not in out


@pytest.mark.slow
def test_print_config_is_valid_yaml_under_deepspeed():
    import yaml

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    ds = ROOT / "configs" / "multi_gpu" / "deepspeed_zero2.yaml"
    args = ["fit", "--config", str(DEMO), "--config", str(ds), "--print_config"]
    done = subprocess.run(
        [sys.executable, "-m", "medmoe", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load(done.stdout)  # the finding: a DeepSpeed log line opened stdout
    assert config["trainer"]["strategy"]["class_path"].endswith("DeepSpeedStrategy")


def test_sigint_is_a_graceful_stop_with_a_checkpoint(tmp_path):
    from lightning.pytorch import Callback, seed_everything
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from test_training import _data, _module, _trainer

    from medmoe.callbacks import ResumableCheckpoint

    class CtrlC(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)  # a real signal, mid-epoch

    seed_everything(0)
    data = _data()
    ckpt = ResumableCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SIGTERMException):
        _trainer(tmp_path, 8, [ckpt, CtrlC()]).fit(_module(data), datamodule=data)
    assert ckpt.interrupted_by == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert 3 <= saved["global_step"] <= 4  # stopped at the next step boundary


def test_toy_tokenizer_warns_when_it_cannot_read_real_text():
    from medmoe.data import MultiTaskDataModule, TaskConfig

    fixtures = ROOT / "tests" / "fixtures"
    tasks = [TaskConfig("medqa", source=str(fixtures / "medqa.jsonl"))]
    data = MultiTaskDataModule(tasks=tasks, replay=[], tokenizer="toy", max_length=512)
    with pytest.warns(
        UserWarning, match=r"maps \d+% of task 'medqa'.s tokens to <unk> \(warned above 1%\)"
    ):
        data.setup("fit")
    byte = MultiTaskDataModule(tasks=tasks, replay=[], tokenizer="byte", max_length=512)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        byte._encode("medqa", byte.eval_records.records("medqa", "train"))  # bytes cover any text


def test_overlapping_evaluation_is_refused_or_warned_when_allowed(tmp_path):
    from medmoe.data import MultiTaskDataModule, TaskConfig

    mmlu = ROOT / "tests" / "fixtures" / "mmlu.jsonl"
    copy = tmp_path / "mmlu_eval.jsonl"
    shutil.copy(mmlu, copy)
    task = dict(name="mmlu", source=str(mmlu), eval_source=str(copy))
    data = MultiTaskDataModule(
        tasks=[TaskConfig(**task)], replay=[], tokenizer="byte", max_length=512
    )
    with pytest.raises(ValueError, match="5 of 5 validation records are also training"):
        data.setup("fit")
    allowed = MultiTaskDataModule(
        tasks=[TaskConfig(**task, allow_overlap=True)], replay=[], tokenizer="byte", max_length=512
    )
    with pytest.warns(UserWarning, match="CONTAMINATED EVALUATION"):
        allowed.setup("fit")
    # one file alone is carved: no overlap, no warning
    single = MultiTaskDataModule(
        tasks=[TaskConfig("mmlu", source=str(mmlu))], replay=[], tokenizer="byte", max_length=512
    )
    single.setup("fit")


# --- one writer per run directory ---------------------------------------------------------


@pytest.mark.slow
def test_a_second_fit_into_a_running_fits_directory_is_refused_naming_it(tmp_path, capsys):
    """Two real ``medmoe fit`` processes: the second (a resume of the first's ``last.ckpt``, as
    a user who thinks the first died would start) is refused naming the first's process id,
    before it writes anything, and the first trains on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    version = ("--trainer.logger.init_args.version", "0")
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medmoe",
            *fit_args(tmp_path, *version, "--trainer.max_steps", "400"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        last = run_dir(tmp_path) / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 120
        while not last.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert last.exists(), "the first fit wrote no checkpoint"
        files = sorted(p.name for p in run_dir(tmp_path).iterdir())
        torch.set_num_threads(1)
        capsys.readouterr()
        code = run_main(fit_args(tmp_path, *version, "--ckpt_path", str(last)))
        final = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2, final
        assert f"in use by process {first.pid}" in final and str(run_dir(tmp_path)) in final
        assert first.poll() is None  # the first fit trains on
        assert sorted(p.name for p in run_dir(tmp_path).iterdir()) == files
    finally:
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=60)
    assert first.returncode == 143, stderr[-2000:]
