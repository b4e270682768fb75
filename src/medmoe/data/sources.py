"""Load a task's records from a source: a hub id, a local file or directory, or ``toy``.

Source specs:

- ``None``: the task's default hub id (:attr:`Task.hub_id` with :attr:`Task.hub_config`).
- ``"toy"``: the toy clinic's generator (:func:`medmoe.data.toy_clinic.toy_records`), splits
  ``train`` (also under the task's train split name), ``validation`` and ``test``.
- an existing local path, loaded through ``datasets`` (``json`` / ``csv`` / ``parquet``):

  * a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) holds one split: the split asked
    for, except that splits the task carves (:class:`medmoe.data.tasks.Carve`) are carved from
    it as from the hub's (a single MIMIC-III export or ``pqa_labeled`` copy gives disjoint
    train / validation / test; a MedQA file asked for ``validation`` gives 5% of it and
    ``train`` the rest, asked for ``test`` all of it);
  * a directory holds one file (or ``NAME-*`` shards) per split, named after it
    (``train.jsonl``, ``validation.csv``, ``test-00000.parquet``), or is a ``save_to_disk``
    copy of the hub dataset; splits it lacks are carved as the task says
    (:class:`medmoe.data.tasks.Carve`).
- anything else: a hub id, ``datasets.load_dataset(hub_id, config, split=...)``.

Every record is checked on load, nothing is skipped: a missing file names the path and the
task; a missing field names the field, the file and the line (the 1-based record number);
a bad value names the value and what would be accepted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmoe.data.tasks import RecordError, Task, get_task

Record = dict[str, Any]
BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TOY = "toy"


def load_records(
    task: Task | str,
    source: str | None = None,
    split: str = "train",
    field_map: Mapping[str, str] | None = None,
) -> list[Record]:
    """The validated records of ``task``'s ``split`` from ``source`` (see the module docs).

    ``field_map`` renames upstream fields to the task's schema (``{"note": "text"}``); without
    it, the task's own map for the source applies (e.g. the clinical stand-in's).
    """
    task = get_task(task) if isinstance(task, str) else task
    if source == TOY:
        from medmoe.data.toy_clinic import toy_records

        return toy_records(task.name, "train" if split == task.train_split else split)
    source = source or task.hub_id
    if source is None:
        raise ValueError(f"task {task.name!r} has no default source; pass a local path")
    fields = dict(field_map if field_map is not None else task.field_maps.get(source, {}))
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(task, path, split, fields)
    if path.suffix in BUILDERS or source.startswith((".", "/", "~")) or source.endswith("/"):
        raise FileNotFoundError(f"dataset file {source} for task {task.name!r} does not exist")
    return _load_hub(task, source, split, fields)


def _load_local(task: Task, path: Path, split: str, fields: dict[str, str]) -> list[Record]:
    if path.is_file():
        return _one_split(task, _load_file(task, path, fields), split)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _load_saved(task, path, split, fields)
    by_split = _split_files(path)
    if not by_split:
        raise FileNotFoundError(
            f"directory {path} for task {task.name!r} holds no data files named after a split "
            f"(e.g. {split}.jsonl); supported: {', '.join(BUILDERS)}"
        )
    upstream, part = task.resolve_split(split, sorted(by_split))
    records = [r for f in by_split[upstream] for r in _load_file(task, f, fields)]
    return _carve(task, records, part)


def _split_files(directory: Path) -> dict[str, list[Path]]:
    """Data files grouped by split: ``NAME.ext`` or ``NAME-anything.ext`` belongs to NAME."""
    out: dict[str, list[Path]] = {}
    for f in sorted(directory.iterdir()):
        if f.is_file() and f.suffix in BUILDERS:
            out.setdefault(f.stem.split("-")[0], []).append(f)
    return out


def _load_file(task: Task, path: Path, fields: dict[str, str]) -> list[Record]:
    import datasets

    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise ValueError(
            f"dataset file {path} for task {task.name!r} has an unsupported type; "
            f"supported: {', '.join(BUILDERS)}"
        )
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several types
        raise ValueError(f"could not read {path} for task {task.name!r}: {err}") from err
    lines = _jsonl_line_numbers(path) if path.suffix == ".jsonl" else None
    return _validate(task, ds.to_list(), str(path), fields, lines)


def _load_saved(task: Task, path: Path, split: str, fields: dict[str, str]) -> list[Record]:
    """A ``save_to_disk`` directory: a DatasetDict (splits carved as usual) or one Dataset."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.Dataset):
        return _one_split(task, _validate(task, saved.to_list(), str(path), fields, None), split)
    upstream, part = task.resolve_split(split, list(saved))
    rows = saved[upstream].to_list()
    return _carve(task, _validate(task, rows, f"{path}:{upstream}", fields, None), part)


def _jsonl_line_numbers(path: Path) -> list[int]:
    with path.open("rb") as fh:
        return [i for i, line in enumerate(fh, start=1) if line.strip()]


def _load_hub(task: Task, hub_id: str, split: str, fields: dict[str, str]) -> list[Record]:
    import datasets

    config = task.hub_config if hub_id == task.hub_id else None
    upstream, part = task.resolve_split(split, task.splits if hub_id == task.hub_id else [split])
    try:
        ds = datasets.load_dataset(hub_id, config, split=upstream)
    except Exception as err:
        raise ValueError(
            f"could not load {hub_id!r} (config {config}, split {upstream}) for task "
            f"{task.name!r}: it is no local path and the hub failed ({err}); on an offline "
            "machine pass a local file or directory as the source"
        ) from err
    where = f"{hub_id}" + (f"[{config}]" if config else "") + f":{upstream}"
    return _carve(task, _validate(task, ds.to_list(), where, fields, None), part)


def _validate(
    task: Task, rows: list[Record], where: str, fields: dict[str, str], lines: list[int] | None
) -> list[Record]:
    """Rename, normalise and check every row; raise naming the field, file and line."""
    records = []
    for i, row in enumerate(rows):
        record = dict(task.normalize({fields.get(k, k): v for k, v in row.items()}))
        try:
            task.validate(record)
        except RecordError as err:
            line = lines[i] if lines is not None and i < len(lines) else i + 1
            raise ValueError(f"{where}, line {line}: {err} (task {task.name!r})") from None
        records.append(record)
    return records


def _one_split(task: Task, records: list[Record], split: str) -> list[Record]:
    """Records of a source with a single split: carved if the task carves ``split``."""
    carve = task.carve
    carved = carve is not None and (split in carve.parts or split == carve.source)
    return _carve(task, records, split if carved else None)


def _carve(task: Task, records: list[Record], part: str | None) -> list[Record]:
    if part is None or task.carve is None:
        return records
    return [records[i] for i in task.carve.indices(len(records), part)]
