"""Load a task's records from a source: a hub id, a local file or directory, or ``toy``.

Source specs:

- ``None``: the task's default hub id (:attr:`Task.hub_id` with :attr:`Task.hub_config`).
- ``"toy"``: the toy clinic's generator (:func:`medmoe.data.toy_clinic.toy_records`), splits
  ``train`` (also under the task's train split name), ``validation`` and ``test``.
- an existing local path, loaded through ``datasets`` (``json`` / ``csv`` / ``parquet``):

  * a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``) is one pool of records, carved
    into *disjoint* ``test``, ``validation`` and training parts by a fixed seeded permutation
    (:func:`file_carve`: the task's own carve fractions where it has them, e.g. PubMedQA's
    50% test / 10% validation, otherwise 10% test and 5% validation; the rest is the training
    split, asked for by its name or ``train``). The same file and task always give the same
    parts. ``whole_file=True`` returns every record instead (the DataModule asks for that when
    a task's ``eval_source`` is a file of its own, so train and evaluation files are used
    whole). Other split names (MMLU's ``dev``) need a directory;
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

from medmoe.data.tasks import Carve, RecordError, Task, get_task

Record = dict[str, Any]
BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TOY = "toy"


def load_records(
    task: Task | str,
    source: str | None = None,
    split: str = "train",
    field_map: Mapping[str, str] | None = None,
    whole_file: bool = False,
) -> list[Record]:
    """The validated records of ``task``'s ``split`` from ``source`` (see the module docs).

    ``field_map`` renames upstream fields to the task's schema (``{"note": "text"}``); without
    it, the task's own map for the source applies (e.g. the clinical stand-in's). Each of its
    keys must be a field of the source. ``whole_file``: a single local file gives all its
    records, not the ``split`` part carved from it.
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
        return _load_local(task, path, split, fields, whole_file)
    if path.suffix in BUILDERS or source.startswith((".", "/", "~")) or source.endswith("/"):
        raise FileNotFoundError(f"dataset file {source} for task {task.name!r} does not exist")
    return _load_hub(task, source, split, fields)


def _load_local(
    task: Task, path: Path, split: str, fields: dict[str, str], whole_file: bool = False
) -> list[Record]:
    if path.is_file():
        records = _load_file(task, path, fields)
        return records if whole_file else _one_split(task, records, split, str(path))
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _load_saved(task, path, split, fields, whole_file)
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
    if path.stat().st_size == 0:
        raise ValueError(f"dataset file {path} for task {task.name!r} is empty (0 bytes)")
    lines = _jsonl_line_numbers(path, task) if path.suffix == ".jsonl" else None
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several types
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"could not read {path} for task {task.name!r}: {reason}") from err
    return _validate(task, ds.to_list(), str(path), fields, lines)


def _load_saved(
    task: Task, path: Path, split: str, fields: dict[str, str], whole_file: bool = False
) -> list[Record]:
    """A ``save_to_disk`` directory: a DatasetDict (splits carved as usual) or one Dataset."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.Dataset):
        records = _validate(task, saved.to_list(), str(path), fields, None)
        return records if whole_file else _one_split(task, records, split, str(path))
    upstream, part = task.resolve_split(split, list(saved))
    rows = saved[upstream].to_list()
    return _carve(task, _validate(task, rows, f"{path}:{upstream}", fields, None), part)


def _jsonl_line_numbers(path: Path, task: Task) -> list[int]:
    """1-based numbers of the non-blank lines; ValueError naming the first line that is no
    JSON object, or saying the file has no records."""
    import json

    numbers = []
    with path.open("rb") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                raise ValueError(
                    f"{path}, line {i}: not valid JSON ({err.args[0] if err.args else err}); "
                    f"each line must be one JSON object (task {task.name!r})"
                ) from None
            if not isinstance(value, dict):
                raise ValueError(
                    f"{path}, line {i}: a JSON {type(value).__name__}, expected one JSON object "
                    f"per line (task {task.name!r})"
                )
            numbers.append(i)
    if not numbers:
        raise ValueError(f"dataset file {path} for task {task.name!r} is empty (no JSON lines)")
    return numbers


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
    if not rows:
        raise ValueError(f"{where} holds no records (it is empty) for task {task.name!r}")
    upstream = set().union(*(row.keys() for row in rows[:100]))
    unknown = sorted(set(fields) - upstream)
    if unknown:
        raise ValueError(
            f"field_map key(s) {unknown} of task {task.name!r} are not fields of {where}; "
            f"its fields: {sorted(upstream)}"
        )
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


FILE_TEST_FRACTION = 0.1
FILE_VALIDATION_FRACTION = 0.05


def file_carve(task: Task) -> Carve:
    """How a single file is carved for ``task``: disjoint ``test`` / ``validation`` / training.

    The task's own fractions where its carve names the split (PubMedQA: 50% test, 10%
    validation), else :data:`FILE_TEST_FRACTION` / :data:`FILE_VALIDATION_FRACTION`; the rest is
    ``task.train_split``.
    """
    fractions = dict(task.carve.fractions) if task.carve is not None else {}
    fractions.setdefault("test", FILE_TEST_FRACTION)
    fractions.setdefault("validation", FILE_VALIDATION_FRACTION)
    seed = task.carve.seed if task.carve is not None else 0
    return Carve(task.train_split, tuple(fractions.items()), seed)


def carved_sizes(task: Task, n: int) -> dict[str, int]:
    """Records per part when a single file of ``n`` records is carved for ``task``."""
    carve = file_carve(task)
    return {part: len(carve.indices(n, part)) for part in (*carve.parts, carve.source)}


def _one_split(task: Task, records: list[Record], split: str, where: str) -> list[Record]:
    """The ``split`` part of a single-file source (:func:`file_carve`; disjoint parts)."""
    carve = file_carve(task)
    part = carve.source if split in ("train", task.train_split) else split
    if part != carve.source and part not in carve.parts:
        raise ValueError(
            f"{where} is a single file, carved into {', '.join([*carve.parts, carve.source])} "
            f"for task {task.name!r}; split {split!r} needs a directory holding {split}.jsonl"
        )
    return [records[i] for i in carve.indices(len(records), part)]


def _carve(task: Task, records: list[Record], part: str | None) -> list[Record]:
    if part is None or task.carve is None:
        return records
    return [records[i] for i in task.carve.indices(len(records), part)]
