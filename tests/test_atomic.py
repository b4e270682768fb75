"""Saves that cannot destroy what they replace: results.json and the grid's report on a full disk."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

import medmoe.atomic as atomic
from medmoe.atomic import AtomicWriteError, atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def full_disk_after(monkeypatch: pytest.MonkeyPatch, room: int) -> list[int]:
    """Make every atomic write hit a full disk once ``room`` bytes (over all writes) are used:
    short writes up to the room left, then ENOSPC, as the kernel does. Returns the byte count."""
    used = [0]

    def write(fd: int, data) -> int:
        left = room - used[0]
        if left <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, bytes(data[:left]))
        used[0] += written
        return written

    monkeypatch.setattr(atomic, "_write", write)
    return used


def test_replaces_whole_and_keeps_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "table.csv"
    atomic_write_text(target, "a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~atomic._UMASK  # as open() creates
    target.chmod(0o640)
    atomic_write_bytes(target, b"x" * 100_000)
    assert target.read_bytes() == b"x" * 100_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.csv"]


@pytest.mark.parametrize("room", [0, 5, 4096])
def test_a_full_disk_keeps_the_previous_file_and_names_path_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, room: int
) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, '{"old": true}\n')
    full_disk_after(monkeypatch, room)
    new = "y" * 10_000
    with pytest.raises(AtomicWriteError) as caught:
        atomic_write_text(target, new)
    message = str(caught.value)
    assert "\n" not in message
    assert str(target) in message and "no space left on device" in message
    assert "10000 bytes" in message and "previous file is unchanged" in message
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left


def test_a_full_disk_on_a_first_save_leaves_no_file(tmp_path, monkeypatch) -> None:
    full_disk_after(monkeypatch, 3)
    with pytest.raises(AtomicWriteError, match="no file was written"):
        atomic_write_text(tmp_path / "new.md", "hello world")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    target = tmp_path / "claims.md"
    atomic_write_text(target, "kept")
    monkeypatch.setattr(atomic, "_write", failing)
    with pytest.raises(AtomicWriteError, match=rf"cannot save {target}: Input/output error"):
        atomic_write_text(target, "lost")
    assert target.read_text() == "kept"


def test_results_json_survives_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    from medmoe.experiments.worker import read_results, write_json

    write_json(tmp_path / "results.json", {"scores": {"medqa": 0.5}})
    full_disk_after(monkeypatch, 8)
    with pytest.raises(AtomicWriteError, match="results.json: no space left on device"):
        write_json(tmp_path / "results.json", {"scores": {"medqa": 0.75}, "more": "x" * 100})
    assert read_results(tmp_path) == {"scores": {"medqa": 0.5}}


def test_the_report_survives_a_full_disk_part_way(tmp_path: Path, monkeypatch) -> None:
    """A full disk while the report is rewritten: every file stays its previous whole self
    (the ones written before the disk filled are already the new ones, also whole)."""
    from test_experiments import _fake_results, write_grid

    from medmoe.experiments import load_grid, write_report
    from medmoe.experiments.worker import write_json

    grid = load_grid(write_grid(tmp_path))
    out = tmp_path / "out"
    base = {"pubmedqa": 0.5, "medqa": 0.25, "clinical_sum": 0.0, "mmlu": 0.6, "gsm8k": 0.4}
    write_json(out / "base" / "results.json", _fake_results("base", None, base, 5, 5))
    run = out / "med_moe_lora" / "seed_0" / "results.json"
    write_json(run, _fake_results("med_moe_lora", 0, base, 2_000_000, 500_000.0))
    first = {path: path.read_bytes() for path in write_report(grid, out)}
    names = [path.name for path in first]
    assert names[:2] == ["tables.md", "table1_medical.csv"]

    better = {k: v + 0.25 for k, v in base.items()}
    write_json(run, _fake_results("med_moe_lora", 0, better, 2_000_000, 500_000.0))
    rehearsal = tmp_path / "rehearsal"  # the new tables.md's size: the disk fills 10 bytes on
    shutil.copytree(out, rehearsal)
    write_report(grid, rehearsal)
    used = full_disk_after(monkeypatch, len((rehearsal / "tables.md").read_bytes()) + 10)
    with pytest.raises(AtomicWriteError) as caught:
        write_report(grid, out)
    assert str(out / "table1_medical.csv") in str(caught.value)  # the second file filled it
    assert used[0] > 0
    assert (out / "tables.md").read_bytes() != first[out / "tables.md"]  # the new one, whole
    for path, content in list(first.items())[1:]:
        assert path.read_bytes() == content, path.name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
