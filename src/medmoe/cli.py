"""The ``medmoe`` command: a LightningCLI with fit / validate / test / predict.

Exit status: 0 success; 2 a bad input (config value, file, checkpoint; the last stderr line
names it); 1 a fault while running (e.g. a NaN loss) or an unexpected error (with its
traceback); 143 / 130 stopped by SIGTERM / SIGINT after writing ``last.ckpt`` (requeue and
resume with ``--ckpt_path <run>/checkpoints/last.ckpt``).

``--debug`` (or ``MEDMOE_DEBUG=1``) shows the full traceback of input errors too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path
from typing import Literal

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medmoe.data import MultiTaskDataModule
from medmoe.errors import (
    describe_parser_error,
    describe_union_error,
    describe_user_error,
    read_checkpoint,
    short_reason,
)
from medmoe.model import MedMoEModule

EXIT_INPUT_ERROR = 2
COMMANDS = ("fit", "validate", "test", "predict")  # and "harness" (medmoe.eval.harness_cli)
DEBUG_FLAG = "--debug"


class MedMoECLI(LightningCLI):
    """LightningCLI in subclass mode; the data's vocabulary and task list feed the model.

    Unlike LightningCLI, ``--ckpt_path`` never replaces the model arguments given on the
    command line with the checkpoint's: the checkpoint is read once here (a truncated or foreign
    file is reported naming its path) and :meth:`MedMoEModule.on_load_checkpoint` refuses a
    resume whose adapter or hyper-parameters differ from the checkpoint's.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            "data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.task_names", "model.init_args.task_names", apply_on="instantiate"
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="fit into a run directory that already holds another run's files",
        )

    def _parse_ckpt_path(self) -> None:
        """Check that ``ckpt_path`` is a readable checkpoint; do not merge its hyper-parameters."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if ckpt_path:
            read_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        """Refuse an unwritable run directory from the config alone, before the tokenizer, the
        data or the model are loaded (:meth:`before_fit` checks the logger's own directory)."""
        if self.subcommand != "fit" or os.environ.get("LOCAL_RANK", "0") != "0":
            return
        for directory in _configured_log_dirs(self.config.fit.trainer):
            _check_writable(directory)

    def before_fit(self) -> None:
        self._guard_run_directory()
        self._lock_run_directory()
        _count_steps_in_the_progress_bar(self.trainer)

    def _lock_run_directory(self) -> None:
        """Refuse a run directory that cannot be written, and one another live ``medmoe fit``
        holds (:class:`~medmoe.run_lock.RunDirectoryLock`, naming its process id); rank zero
        holds the lock for the fit (released in :meth:`_run_subcommand`, however it ends)."""
        from medmoe.run_lock import RunDirectoryBusy, RunDirectoryLock

        if os.environ.get("LOCAL_RANK", "0") != "0" or self.trainer.global_rank != 0:
            return
        if self.trainer.logger is None or self.trainer.log_dir is None:
            return
        log_dir = Path(self.trainer.log_dir)
        _check_writable(log_dir)
        lock = RunDirectoryLock(log_dir)
        try:
            lock.acquire()
        except RunDirectoryBusy as err:
            if _lock_holder(lock.path) == os.getpid():
                return  # the experiment runner holds it for this process (an inherited lock)
            raise FileExistsError(str(err)) from None
        except OSError as err:
            raise NotADirectoryError(
                f"run directory {log_dir} cannot be written ({short_reason(err)})"
            ) from None
        self._run_lock = lock

    def after_fit(self) -> None:
        from medmoe.callbacks.checkpoint import ResumableCheckpoint
        from medmoe.callbacks.export import AdapterExport
        from medmoe.callbacks.progress import fit_summary

        trainer = self.trainer
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        if trainer.global_rank != 0:
            return
        adapter = next(
            (c.saved_to for c in trainer.callbacks if isinstance(c, AdapterExport)), None
        )
        checkpoint = next(
            (c.last_model_path for c in trainer.callbacks if isinstance(c, ResumableCheckpoint)),
            None,
        )
        print(fit_summary(trainer, log_dir, adapter, checkpoint), flush=True)

    def _guard_run_directory(self) -> None:
        """Refuse a log directory that already holds files, unless resuming there or told to."""
        config = self.config[self.subcommand]
        if config.get("overwrite") or os.environ.get("LOCAL_RANK", "0") != "0":
            return
        if self.trainer.global_rank != 0 or self.trainer.logger is None:
            return
        log_dir = Path(self.trainer.log_dir)
        if not log_dir.is_dir():
            return
        existing = sorted(p.name for p in log_dir.iterdir() if _is_run_output(p.name))
        if not existing:
            return  # empty, or only files a launcher put there (the experiment runner's)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and log_dir.resolve() in Path(ckpt_path).resolve().parents:
            return  # resuming in the run's own directory
        raise FileExistsError(
            f"run directory {log_dir} already holds another run's files ({', '.join(existing[:4])}"
            f"{', ...' if len(existing) > 4 else ''}); choose another trainer.logger.init_args."
            "version (or name), resume with --ckpt_path pointing into it, or pass --overwrite true"
        )

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            # imported here: medmoe.callbacks pulls in every callback (plotting included)
            from medmoe.callbacks.checkpoint import EXIT_CODES, ResumableCheckpoint

            checkpoints = [c for c in self.trainer.callbacks if isinstance(c, ResumableCheckpoint)]
            by = next((c.interrupted_by for c in checkpoints if c.interrupted_by), "SIGTERM")
            path = next((c.last_model_path for c in checkpoints if c.last_model_path), None)
            step = self.trainer.global_step
            if path:
                message = f"resume with --ckpt_path {path}"
            else:
                message = "no checkpoint was written: add a ResumableCheckpoint callback"
            sys.stderr.write(f"medmoe: {by} stopped the run at global step {step}; {message}\n")
            raise SystemExit(EXIT_CODES.get(by, 1)) from None
        finally:
            lock = getattr(self, "_run_lock", None)
            if lock is not None:
                self._run_lock = None
                lock.release()


def _lock_holder(path: Path) -> int | None:
    """The process id a run directory's lock file names (the runner names its worker)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _configured_log_dirs(trainer) -> list[Path]:
    """The directories the configured loggers write under, as far as the config says.

    ``trainer``: the parsed ``trainer`` section. A logger given by class path contributes its
    ``save_dir`` (then ``name`` and ``version`` where given, as TensorBoardLogger and CSVLogger
    lay them out); ``logger: true`` (or unset) Lightning's default ``lightning_logs`` under
    ``default_root_dir``; ``logger: false`` nothing.
    """
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    loggers = trainer.get("logger")
    if loggers is None or loggers is True:
        return [root / "lightning_logs"]
    if loggers is False:
        return []
    found = []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if not init_args or not init_args.get("save_dir"):
            continue  # a logger instance, or one whose directory only it knows
        directory = Path(str(init_args["save_dir"]))
        name, version = init_args.get("name"), init_args.get("version")
        if name:
            directory /= str(name)
            if version is not None:
                directory /= version if isinstance(version, str) else f"version_{version}"
        found.append(directory)
    return found


def _check_writable(directory: Path) -> None:
    """NotADirectoryError naming ``directory`` when it (or, not made yet, its nearest existing
    parent) is no writable directory: refused before the fit writes anything."""
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(
            f"run directory {directory} cannot be created: {existing} is a file, not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NotADirectoryError(
            f"run directory {directory} is not writable ({existing} is read-only for this user); "
            "choose another trainer.logger.init_args.save_dir"
        )


def _count_steps_in_the_progress_bar(trainer) -> None:
    """Lightning's rich bar (batches of an "Epoch 0/-2") -> :class:`StepProgressBar` (steps)."""
    from lightning.pytorch.callbacks import RichProgressBar

    from medmoe.callbacks.progress import StepProgressBar

    for index, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[index] = StepProgressBar()


class PredictCLI(MedMoECLI):
    """``medmoe predict``: the config's model and data, and the options of :mod:`medmoe.predict`."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(
            MedMoEModule,
            MultiTaskDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False},
            run=False,
            args=args,
        )

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="a fit's .ckpt")
        parser.add_argument(
            "--adapter_dir", type=str | None, default=None, help="an AdapterExport directory"
        )
        parser.add_argument(
            "--task", type=str | None, default=None, help="one task of the data; null = all"
        )
        parser.add_argument("--split", type=str, default="test", help="split the records come from")
        parser.add_argument(
            "--limit", type=int | None, default=None, help="records per task (fixed subset)"
        )
        parser.add_argument(
            "--prompts", type=str | None, default=None, help="JSONL of {'prompt': ...} lines"
        )
        parser.add_argument("--output", type=str, default="predictions.jsonl", help="JSONL output")
        parser.add_argument(
            "--mode", type=Literal["generate", "score"], default="generate", help="generate|score"
        )
        parser.add_argument("--max_new_tokens", type=int, default=32, help="generation budget")
        parser.add_argument(
            "--stop", type=list[str], default=["\n\n"], help="strings that end a generation"
        )
        parser.add_argument("--batch_size", type=int, default=16, help="prompts per forward")


RUN_OUTPUTS = ("config.yaml", "hparams.yaml", "checkpoints", "adapter", "tables")


def _is_run_output(name: str) -> bool:
    """Whether a file in a log directory is what a fit writes (config, events, checkpoints)."""
    return name in RUN_OUTPUTS or name.startswith("events.out.tfevents")


def run_cli(args: list[str] | None = None) -> MedMoECLI:
    """Run ``medmoe`` with ``args`` (default: the command line) and return the CLI object."""
    return MedMoECLI(
        MedMoEModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},  # the run-directory guard runs before
        auto_configure_optimizers=False,  # MedMoEModule.configure_optimizers is the one policy
        parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in COMMANDS}},
        args=args,
    )


# Library messages a medmoe user cannot act on, silenced (only these):
# - Lightning 2.6's own use of a deprecated torch pytree API;
# - Lightning's caution about IterableDataset.__len__ under several loader workers: medmoe's
#   training stream splits its batches over workers itself (medmoe.data.stream), so its length
#   is exact;
# - Lightning's advertisement of its cloud logger.
IGNORED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Your `IterableDataset` has `__len__` defined",
)
IGNORED_INFO = ("💡 Tip: For seamless cloud logging",)


class _DropInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(IGNORED_INFO)


def _quiet_library_notices() -> None:
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropInfo())


class _StderrFilter(logging.Filter):
    """Writes a logger's records to stderr instead of its handlers (DeepSpeed logs to stdout)."""

    def filter(self, record: logging.LogRecord) -> bool:
        sys.stderr.write(f"[{record.levelname}] {record.getMessage()}\n")
        return False


def main(args: list[str] | None = None) -> None:
    """Entry point of ``medmoe`` and ``python -m medmoe`` (exit status: see the module docs)."""
    given = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_FLAG in given or os.environ.get("MEDMOE_DEBUG", "") not in ("", "0")
    if args is None:
        sys.argv = [sys.argv[0], *(a for a in given if a != DEBUG_FLAG)]
    else:
        args = [a for a in given if a != DEBUG_FLAG]
    logging.getLogger("DeepSpeed").addFilter(_StderrFilter())  # keep stdout for --print_config
    _quiet_library_notices()
    try:
        if given[:1] == ["predict"]:
            from medmoe.predict import predict_main

            predict_main(PredictCLI(args=[a for a in given[1:] if a != DEBUG_FLAG]))
        elif given[:1] == ["harness"]:
            from medmoe.eval.harness_cli import harness_main

            raise SystemExit(harness_main([a for a in given[1:] if a != DEBUG_FLAG]))
        else:
            run_cli(args)
    except ArgumentError as err:  # jsonargparse: a bad key, type or value in the config
        if debug:
            raise
        sys.stderr.write(f"medmoe: error: {describe_parser_error(str(err))}\n")
        raise SystemExit(EXIT_INPUT_ERROR) from None
    except Exception as err:
        described = None if debug else describe_user_error(err)
        union = None if debug or described else describe_union_error(err)
        if union is not None:
            described = union, EXIT_INPUT_ERROR
        if described is None:
            raise
        message, code = described
        sys.stderr.write(f"medmoe: error: {message}\n")
        raise SystemExit(code) from None
