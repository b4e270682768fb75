"""The ``medmoe`` command: a LightningCLI with fit / validate / test / predict."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from medmoe.data import MultiTaskDataModule
from medmoe.model import MedMoEModule


class MedMoECLI(LightningCLI):
    """LightningCLI in subclass mode; the data's vocabulary and task list feed the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments(
            "data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate"
        )
        parser.link_arguments(
            "data.task_names", "model.init_args.task_names", apply_on="instantiate"
        )


def run_cli(args: list[str] | None = None) -> MedMoECLI:
    """Run ``medmoe`` with ``args`` (default: the command line) and return the CLI object."""
    return MedMoECLI(
        MedMoEModule,
        MultiTaskDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``medmoe`` and ``python -m medmoe`` (exit status 0 on success)."""
    run_cli(args)
