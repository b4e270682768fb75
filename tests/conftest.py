"""Shared fixtures: a tiny Llama that needs no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

# One thread: on the shared 2-core machines small matmuls stall with two.
torch.set_num_threads(1)


def process_alive(pid: int) -> bool:
    """Whether any thread of process ``pid`` still runs (Linux ``/proc``).

    A leader shown as a zombie is not enough: its other threads may still be exiting, and the
    files the process holds (a run directory's lock) stay open until the last of them ends. An
    exited process whose parent has not reaped it yet counts as gone.
    """
    tasks = Path(f"/proc/{pid}/task")
    try:
        threads = [t for t in tasks.iterdir() if t.name.isdigit()]
    except OSError:
        return False
    for thread in threads:
        try:
            state = (thread / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # it ended while being read
        if state not in ("Z", "X"):
            return True
    return False


# LlamaConfig keyword arguments of the tiny Llama (also MedMoEModule's ``tiny_llama``)
TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


# ``MedMoEModule(tiny_llama=...)`` keyword arguments: the vocabulary comes from the data
MODULE_TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    values = {**TINY_LLAMA, **overrides}
    return LlamaConfig(**values)


def make_tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def token_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, 96, (3, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # a right-padded row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A finished 5-step `medmoe fit` of the toy base: <run>/{checkpoints/last.ckpt, adapter/}."""
    from pathlib import Path

    from medmoe.cli import main

    root = Path(__file__).resolve().parents[1]
    save_dir = tmp_path_factory.mktemp("trained")
    main(
        [
            "fit",
            "--config",
            str(root / "configs" / "demo.yaml"),
            "--config",
            str(root / "tests" / "configs" / "tiny_fit.yaml"),
            "--model.init_args.tiny_llama",
            "null",
            "--model.init_args.model_name_or_path",
            "toy",
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            "--trainer.max_steps",
            "5",
        ]
    )
    run = save_dir / "demo" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "adapter").is_dir()
    return run
