"""Saves of the fit's own files that cannot destroy what they replace: ``last.ckpt``
(``atomic_torch_save`` / ``AtomicCheckpointIO``) and the adapter directory (MoE-LoRA's
``write_adapter_files``, peft LoRA's and full fine-tuning's ``save_pretrained``).

Injected faults: a full disk after N bytes (the raw write of :mod:`medmoe.atomic`, or the
library's own safetensors writer for ``save_pretrained``) and a kill -9 of a subprocess stopped
in the middle of a save. Each time the previous file or directory stays complete and loadable,
and a full disk gives one line naming the path and the bytes needed.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from test_atomic import full_disk_after

import medmoe.atomic as atomic
from medmoe.adapters import MoELoRAConfig, apply_moe_lora, load_adapter, save_adapter
from medmoe.adapters.full import FullFineTune
from medmoe.adapters.lora import LoRA
from medmoe.adapters.state import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict
from medmoe.atomic import AtomicWriteError
from medmoe.callbacks.checkpoint import AtomicCheckpointIO, atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(allowed_ranks=[2, 4, 8], layer_ranges={"1-2": 2, "3-4": 4}, dropout=0.0)


def hidden_leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def checkpoint(value: float, size: int = 50_000) -> dict:
    return {"state_dict": {"w": torch.full((size,), value)}, "global_step": int(value)}


def serialized_size(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def assert_one_line(error: BaseException, path: Path, size: int | None) -> None:
    message = str(error)
    assert "\n" not in message
    assert str(path) in message and "no space left on device" in message, message
    if size is not None:
        assert f"its {size} bytes" in message, message
    assert "unchanged" in message


# --- full disk: last.ckpt -------------------------------------------------------------------


@pytest.mark.parametrize("room", [0, 1000, 150_000])
@pytest.mark.parametrize("via", ["atomic_torch_save", "AtomicCheckpointIO"])
def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int, via: str
) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save(checkpoint(1.0), path)
    before = path.read_bytes()
    full_disk_after(monkeypatch, room)
    new = checkpoint(2.0)
    with pytest.raises(AtomicWriteError) as caught:
        if via == "atomic_torch_save":
            atomic_torch_save(new, path)
        else:
            AtomicCheckpointIO().save_checkpoint(new, path)
    assert_one_line(caught.value, path, serialized_size(new))
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert hidden_leftovers(path.parent) == []


def test_a_full_disk_during_the_first_checkpoint_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    full_disk_after(monkeypatch, 100)
    with pytest.raises(AtomicWriteError, match="no file was written"):
        atomic_torch_save(checkpoint(1.0), path)
    assert list(tmp_path.iterdir()) == []


# --- full disk: the adapter directory -------------------------------------------------------


def moe_lora_model(seed: int = 0):
    model = make_tiny_llama(seed)
    apply_moe_lora(model, MoELoRAConfig(**SMALL))
    return model


def perturb(model) -> None:
    with torch.no_grad():
        for tensor in adapter_state_dict(model).values():
            tensor.add_(0.25)


def loaded_adapter(directory: Path) -> dict[str, torch.Tensor]:
    fresh = moe_lora_model(seed=3)
    load_adapter(fresh, directory)
    return {k: v.detach().clone() for k, v in adapter_state_dict(fresh).items()}


@pytest.mark.parametrize("room", [0, 200, 20_000])
def test_a_full_disk_during_an_adapter_save_keeps_the_previous_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    model = moe_lora_model()
    target = save_adapter(model, tmp_path / "adapter")
    saved = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    perturb(model)
    full_disk_after(monkeypatch, room)
    with pytest.raises(AtomicWriteError) as caught:
        save_adapter(model, target)
    assert_one_line(caught.value, target, None)
    needed = int(str(caught.value).split("for its ")[1].split()[0])
    assert needed >= sum(len(b) for b in files.values()) - 64  # the new files' whole size
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    loaded = loaded_adapter(target)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert hidden_leftovers(tmp_path) == []


def fail_library_writes_after(monkeypatch, module: str, room: int) -> None:
    """The library's safetensors writer (``safe_save_file`` of ``module``) writes ``room`` bytes
    of its file and then fails with ENOSPC, as a full disk does."""

    def save(tensors, filename, metadata=None):
        from safetensors.torch import save

        Path(filename).write_bytes(save(tensors, metadata=metadata)[:room])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(f"{module}.safe_save_file", save)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_full_disk_during_save_pretrained_keeps_the_previous_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    spec = LoRA(r=4) if method == "lora" else FullFineTune()
    model = spec.apply(make_tiny_llama())
    target = spec.save(model, tmp_path / "adapter")
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        for tensor in spec.adapter_tensors(model).values():
            tensor.add_(0.5)
    module = "peft.peft_model" if method == "lora" else "transformers.modeling_utils"
    fail_library_writes_after(monkeypatch, module, 300)
    with pytest.raises(AtomicWriteError) as caught:
        spec.save(model, target)
    expected = sum(t.nbytes for t in spec.adapter_tensors(model).values())
    if method == "full":
        expected = sum(t.nbytes for t in model.state_dict().values())
    assert_one_line(caught.value, target, expected)
    assert "directory is unchanged" in str(caught.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    monkeypatch.undo()
    fresh = spec.apply(make_tiny_llama(seed=4))
    spec.load(fresh, target)  # loadable: every tensor there, by name and shape
    assert hidden_leftovers(tmp_path) == []


def test_a_directory_save_replaces_the_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with atomic.atomic_directory(target) as staging:
        (staging / "a").write_text("1")
        (staging / "stale").write_text("x")
    with atomic.atomic_directory(target) as staging:
        (staging / "a").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    assert (target / "a").read_text() == "2"
    assert hidden_leftovers(tmp_path) == []


def test_a_kill_between_the_fallback_renames_is_repaired_by_the_next_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without renameat2 the previous directory is renamed aside first; a kill right then
    leaves it as ``.<name>.old``, which the next save restores before it writes."""
    target = tmp_path / "adapter"
    with atomic.atomic_directory(target) as staging:
        (staging / "a").write_text("1")
    target.rename(tmp_path / ".adapter.old")  # what a kill between the two renames leaves
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    with pytest.raises(AtomicWriteError), atomic.atomic_directory(target) as staging:
        raise OSError(errno.ENOSPC, "full")
    assert (target / "a").read_text() == "1"
    with atomic.atomic_directory(target) as staging:
        (staging / "a").write_text("2")
    assert (target / "a").read_text() == "2"
    assert hidden_leftovers(tmp_path) == []


# --- kill -9 in the middle of a save --------------------------------------------------------

STALL = textwrap.dedent(
    """
    import os, sys, time
    import medmoe.atomic as atomic

    written = [0]

    def write(fd, data):  # write the first 64 KiB, then announce it and stall
        if written[0] >= 65536:
            print("midway", flush=True)
            time.sleep(120)
        n = os.write(fd, bytes(data[: 65536 - written[0] or 1]))
        written[0] += n
        return n

    atomic._write = write
    """
)

KILL_CHECKPOINT = """
import torch
from medmoe.callbacks.checkpoint import atomic_torch_save
atomic_torch_save({"state_dict": {"w": torch.full((1_000_000,), 2.0)}, "global_step": 2},
                  sys.argv[1])
"""

KILL_ADAPTER = """
import torch
from medmoe.adapters.state import write_adapter_files
write_adapter_files(sys.argv[1], {"w": torch.full((1_000_000,), 2.0)}, {"step": 2})
"""


def kill_midway(script: str, target: Path) -> None:
    """Run ``script`` (it saves ``target`` and stalls midway), kill -9 it once it says so."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(
        [sys.executable, "-c", STALL + script, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.strip() == "midway", process.stderr.read()[-2000:]
        assert any(p.name.startswith(f".{target.name}.") for p in target.parent.iterdir())
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def test_a_kill_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save(checkpoint(1.0, size=1_000_000), path)
    before = path.read_bytes()
    started = time.monotonic()
    kill_midway(KILL_CHECKPOINT, path)
    assert time.monotonic() - started < 60
    assert path.read_bytes() == before
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(10**6))
    assert hidden_leftovers(tmp_path)  # the killed save's temporary file
    atomic_torch_save(checkpoint(3.0), path)  # the next save goes through and removes it
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert hidden_leftovers(tmp_path) == []


def test_a_kill_during_an_adapter_save_keeps_the_previous_adapter(tmp_path: Path) -> None:
    model = moe_lora_model()
    target = save_adapter(model, tmp_path / "adapter")
    saved = {k: v.detach().clone() for k, v in adapter_state_dict(model).items()}
    files = {p.name: p.read_bytes() for p in target.iterdir()}
    assert sorted(files) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    kill_midway(KILL_ADAPTER, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    loaded = loaded_adapter(target)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert hidden_leftovers(tmp_path)  # the killed save's staging folder
    save_adapter(model, target)  # the next save goes through and removes it
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files
    assert hidden_leftovers(tmp_path) == []


def test_a_live_writers_temporary_files_are_left_alone(tmp_path: Path) -> None:
    """Only leftovers of writers no longer running are removed, whoever else saves beside."""
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead = int(gone.stdout)
    target = tmp_path / "results.json"
    mine = tmp_path / f".results.json.{os.getpid()}.abc.tmp"  # a save under way in this process
    orphan = tmp_path / f".results.json.{dead}.abc.tmp"
    other = tmp_path / f".other.json.{dead}.abc.tmp"  # another target's: not this save's
    for path in (mine, orphan, other):
        path.write_text("partial")
    atomic.atomic_write_text(target, "{}")
    assert hidden_leftovers(tmp_path) == sorted([mine.name, other.name])


def test_a_kill_before_the_symlink_swap_is_cleaned_by_the_next_publish(tmp_path: Path) -> None:
    """DeepSpeed/FSDP2 checkpoints: a numbered directory no symlink names goes."""
    from medmoe.strategies import publish_directory

    target = tmp_path / "last.ckpt"
    for step in (1, 2):
        staging = tmp_path / ".last.ckpt.saving"
        staging.mkdir()
        (staging / "step").write_text(str(step))
        if step == 2:
            (tmp_path / ".last.ckpt.7").mkdir()  # renamed, then killed before the swap
        publish_directory(staging, target)
    assert (target / "step").read_text() == "2"
    assert hidden_leftovers(tmp_path) == [os.readlink(target)]
