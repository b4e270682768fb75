"""Capacity matching: size a grid method's adapter so its parameter count matches another's.

A grid method with ``match: {method: <target>, count: trainable | active}`` (syntax:
:mod:`medmoe.experiments.grid`) gets the value of one adapter knob (or of a product of knobs)
whose count, on the real model the run builds, comes closest to the target method's count;
the closest must lie within ``tolerance`` (3%) of it, else :class:`GridError` names the method
and the closest counts on either side.

Counting is on the model of the run: the method's merged config (base config, its fragments,
the grid's and the method's overrides, the command line's ``--set``) is parsed by the ``medmoe``
CLI's own parser, its :class:`~medmoe.model.MedMoEModule` builds the base model on the CPU and
applies the adapter (``configure_model``), and :func:`medmoe.adapters.parameter_counts` counts
it. Nothing trains and no data is read.

Knobs (``search:``; the default depends on the adapter):

- ``r`` (peft LoRA, Ortho-LoRA, multi-LoRA; the default for them): the rank, with
  ``lora_alpha`` moved with it so ``alpha / r`` stays the method's.
- ``expert_rank`` (MoE-LoRA with ``rank_pattern: equal``, e.g. vanilla MoE-LoRA; its
  default): every expert's rank (``allowed_ranks: [value]``), the expert count kept.
- ``rank_scale`` (other MoE-LoRA configs, e.g. Med-MoE-LoRA; their default): the allowed ranks
  reduced by their greatest common divisor times the value (``[2, 4, 8]`` -> value 1:
  ``[1, 2, 4]``, 2: ``[2, 4, 8]``, 3: ``[3, 6, 12]``), so their ratios are kept exactly.
- ``num_experts`` (MoE-LoRA): the expert count: ``num_experts`` of a uniform allocation,
  ``n_max`` of an eq-2 or bottom-heavy one (``n_min`` lowered to it where larger).

Counts grow with every knob, so the last knob of ``search`` is bisected and the others are
walked upwards (stopping once their smallest count passes the target): a handful of model
builds per method. Values the adapter refuses (a layer without a specialist expert, say) are
skipped. The closest count wins; ties go to the smaller knob values, in ``search`` order.
The choice is cached in ``<out>/capacity.json`` under a fingerprint of everything it depends
on (the config files' text, the overrides, the match spec), so a resumed grid does not build
the models again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from medmoe.experiments.grid import Grid, GridError, Match, Method, cli_override
from medmoe.experiments.worker import read_json_cache, write_json

__all__ = [
    "ADAPTER_KEY",
    "CAPACITY_FILE",
    "KNOBS",
    "Candidate",
    "Matched",
    "ModelCounter",
    "default_knob",
    "match_method",
    "read_matches",
    "resolve_matches",
]

CAPACITY_FILE = "capacity.json"
ADAPTER_KEY = "model.init_args.adapter.init_args"  # dotted prefix of the adapter's fields


# ----------------------------------------------------------------- knobs
def _rank(adapter: Any, value: int) -> dict[str, Any]:
    ratio = float(adapter.lora_alpha) / float(adapter.r)
    return {"r": value, "lora_alpha": ratio * value}


def _expert_rank(adapter: Any, value: int) -> dict[str, Any]:
    return {"expert_rank": value, "allowed_ranks": [value]}


def _rank_scale(adapter: Any, value: int) -> dict[str, Any]:
    ranks = [int(r) for r in adapter.allowed_ranks]
    unit = math.gcd(*ranks)
    changes: dict[str, Any] = {"allowed_ranks": [r // unit * value for r in ranks]}
    if getattr(adapter, "expert_rank", None) is not None:
        changes["expert_rank"] = int(adapter.expert_rank) // unit * value
    return changes


def _num_experts(adapter: Any, value: int) -> dict[str, Any]:
    allocation = adapter.allocation
    if allocation == "uniform":
        return {"num_experts": value}
    if allocation in ("eq2", "bottom_heavy"):
        return {"n_max": value, "n_min": min(int(adapter.n_min), value)}
    raise GridError(
        f"knob num_experts sizes a uniform, eq2 or bottom_heavy allocation, not {allocation!r} "
        "(its layer ranges fix the counts): search rank_scale instead"
    )


@dataclass(frozen=True)
class Knob:
    """A searched adapter setting: ``changes(adapter, value)`` gives the adapter fields a value
    sets; ``fields`` are the fields the adapter must have; ``default_range`` is searched when
    the grid gives none."""

    name: str
    changes: Callable[[Any, int], dict[str, Any]]
    fields: tuple[str, ...]
    default_range: tuple[int, int]


KNOBS: dict[str, Knob] = {
    "r": Knob("r", _rank, ("r", "lora_alpha"), (1, 1024)),
    "expert_rank": Knob("expert_rank", _expert_rank, ("expert_rank", "allowed_ranks"), (1, 1024)),
    "rank_scale": Knob("rank_scale", _rank_scale, ("allowed_ranks",), (1, 64)),
    "num_experts": Knob("num_experts", _num_experts, ("num_experts", "n_max", "n_min"), (1, 64)),
}


def _has(adapter: Any, fields: Sequence[str]) -> bool:
    """Whether the adapter's fields (attributes of its description) include ``fields``."""
    return all(hasattr(adapter, f) for f in fields)


def default_knob(adapter: Any) -> str:
    """The knob searched when ``match.search`` is not given (see the module docstring)."""
    if _has(adapter, KNOBS["r"].fields):
        return "r"
    if _has(adapter, ("allowed_ranks", "rank_pattern")):
        return "expert_rank" if adapter.rank_pattern == "equal" else "rank_scale"
    raise GridError(
        f"{type(adapter).__name__} has no rank or expert count to size (full fine-tuning "
        "cannot be matched)"
    )


# ----------------------------------------------------------------- counting on the real model
@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The CLI's and transformers' start-up chatter off while the models are built."""
    sink = io.StringIO()
    with (
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


class ModelCounter:
    """The parameter counts of one method's model with adapter fields changed.

    ``args``: the ``medmoe`` arguments of the run without the subcommand, seed or logger
    (``--config`` files and dotted overrides). They are parsed once by the CLI's parser (the
    data module is built for its vocabulary and task names, which the model needs); each
    :meth:`count` builds a fresh module with the changed adapter and counts its model.
    """

    def __init__(self, args: Sequence[str]) -> None:
        from medmoe.cli import MedMoECLI
        from medmoe.data import MultiTaskDataModule
        from medmoe.model import MedMoEModule

        with _quiet():
            cli = MedMoECLI(
                MedMoEModule,
                MultiTaskDataModule,
                subclass_mode_model=True,
                subclass_mode_data=True,
                run=False,
                save_config_callback=None,
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
                args=[*args, "--trainer.logger=false"],
            )
        module = cli.model
        described = module.hparams["adapter"]  # {"class_path", "init_args"} of the config's
        path, _, name = str(described["class_path"]).rpartition(".")
        self.adapter_class = getattr(importlib.import_module(path), name)
        self.adapter_fields = dict(described["init_args"])
        self.module_class = type(module)
        accepted = inspect.signature(self.module_class).parameters
        self.kwargs = {k: v for k, v in module.hparams.items() if k in accepted and k != "adapter"}
        self.adapter = SimpleNamespace(**self.adapter_fields)  # what the knobs read
        self.builds = 0

    def count(self, changes: Mapping[str, Any] | None = None) -> Any:
        """:class:`~medmoe.adapters.ParameterCounts` of the model with the adapter's fields
        ``changes`` replaced; ValueError when the adapter refuses them."""
        from medmoe.adapters import parameter_counts

        adapter = self.adapter_class(**{**self.adapter_fields, **dict(changes or {})})
        with _quiet():
            module = self.module_class(**self.kwargs, adapter=adapter)
            module.configure_model()
            self.builds += 1
            return parameter_counts(module.model)


def _count_args(grid: Grid, method: Method, extra: Sequence[str]) -> list[str]:
    args: list[str] = []
    for config in (*grid.base, *method.configs):
        args += ["--config", str(config)]
    overrides = {**grid.overrides, **method.overrides}
    return args + [cli_override(k, v) for k, v in overrides.items()] + list(extra)


# ----------------------------------------------------------------- the search
@dataclass(frozen=True)
class Candidate:
    values: tuple[tuple[str, int], ...]  # (knob, value) in search order
    changes: Mapping[str, Any]
    count: float

    def describe(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.values)


@dataclass(frozen=True)
class Matched:
    """The outcome of a method's ``match``: what it was matched to, the knob values chosen,
    the adapter fields they set (``changes``) and the two counts."""

    method: str
    target: str
    count_kind: str
    knobs: Mapping[str, int]
    changes: Mapping[str, Any]
    count: float
    target_count: float
    tolerance: float
    builds: int = field(default=0, compare=False)  # models built (not saved)

    @property
    def ratio(self) -> float:
        return self.count / self.target_count

    @property
    def overrides(self) -> dict[str, Any]:
        """The dotted ``medmoe fit`` keys that size the method's adapter."""
        return {f"{ADAPTER_KEY}.{k}": v for k, v in self.changes.items()}

    def describe(self) -> str:
        """``r = 27 (r = 27, lora_alpha = 54.0)``: the knobs, then the fields they set."""
        knobs = ", ".join(f"{k} = {v}" for k, v in self.knobs.items())
        fields = ", ".join(f"{k} = {v}" for k, v in self.changes.items())
        return knobs if fields == knobs else f"{knobs} ({fields})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "count_kind": self.count_kind,
            "knobs": dict(self.knobs),
            "changes": dict(self.changes),
            "count": self.count,
            "target_count": self.target_count,
            "ratio": self.ratio,
            "tolerance": self.tolerance,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Matched:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _search(
    measure: Callable[[dict[str, int]], Candidate | None],
    knobs: Sequence[tuple[str, int, int]],
    target: float,
    fixed: dict[str, int] | None = None,
) -> list[Candidate]:
    """Candidates around ``target``: the last knob bisected, earlier ones walked upwards."""
    fixed = dict(fixed or {})
    (name, low, high), rest = knobs[0], knobs[1:]
    if rest:
        found: list[Candidate] = []
        for value in range(low, high + 1):
            inner = _search(measure, rest, target, {**fixed, name: value})
            found += inner
            if inner and min(c.count for c in inner) > target:
                break  # larger values only add parameters
        return found

    def at(value: int) -> Candidate | None:
        return measure({**fixed, name: value})

    first = low
    lowest = at(first)
    while lowest is None and first < high:  # values the adapter refuses (too few experts)
        first += 1
        lowest = at(first)
    if lowest is None:
        return []
    if lowest.count >= target:
        return [lowest]
    top = at(high)
    if top is None or top.count < target:
        return [c for c in (lowest, top) if c is not None]
    below, above = (first, lowest), (high, top)  # count(below) < target <= count(above)
    while above[0] - below[0] > 1:
        middle = (below[0] + above[0]) // 2
        candidate = at(middle)
        if candidate is None:  # refused in the middle: treat as below (rare)
            below = (middle, below[1])
        elif candidate.count < target:
            below = (middle, candidate)
        else:
            above = (middle, candidate)
    return [below[1], above[1]]


def _kind(counts: Any, kind: str) -> float:
    return float(getattr(counts, kind))


def match_method(
    grid: Grid,
    method: Method,
    extra: Sequence[str] = (),
    counter: Callable[[Sequence[str]], ModelCounter] = ModelCounter,
) -> Matched:
    """Resolve ``method.match`` on the real models (see the module docstring)."""
    match: Match | None = method.match
    if match is None:
        raise ValueError(f"method {method.name!r} has no match")
    target = match.target_method or grid.method(match.target)
    target_counter = counter(_count_args(grid, target, extra))
    target_count = _kind(target_counter.count(), match.count)
    own = counter(_count_args(grid, method, extra))
    names = match.search or (default_knob(own.adapter),)
    knobs = []
    for name in names:
        knob = KNOBS.get(name)
        if knob is None:
            raise GridError(
                f"method {method.name!r}: match.search names unknown knob {name!r}; "
                f"accepted: {sorted(KNOBS)}"
            )
        if not _has(own.adapter, knob.fields[:1]):
            raise GridError(
                f"method {method.name!r}: its adapter {type(own.adapter).__name__} has no "
                f"{knob.fields[0]!r}, so knob {name!r} cannot size it"
            )
        low, high = match.range.get(name, knob.default_range)
        knobs.append((name, low, high))

    def measure(values: dict[str, int]) -> Candidate | None:
        changes: dict[str, Any] = {}
        for name in names:
            changes.update(KNOBS[name].changes(own.adapter, values[name]))
        try:
            counts = own.count(changes)
        except ValueError:  # the adapter refuses these values
            return None
        ordered = tuple((name, values[name]) for name in names)
        return Candidate(ordered, changes, _kind(counts, match.count))

    found = _search(measure, knobs, target_count)
    if not found:
        raise GridError(
            f"method {method.name!r}: no value of {list(names)} in "
            f"{[(n, lo, hi) for n, lo, hi in knobs]} builds a model the adapter accepts"
        )
    best = min(
        found,
        key=lambda c: (abs(c.count / target_count - 1.0), tuple(v for _, v in c.values)),
    )
    if abs(best.count / target_count - 1.0) > match.tolerance + 1e-12:  # 3% is within 3%
        nearest = sorted(found, key=lambda c: abs(c.count / target_count - 1.0))[:2]
        closest = "; ".join(
            f"{c.describe()}: {c.count:.0f} ({c.count / target_count:.3f}x)"
            for c in sorted(nearest, key=lambda c: c.count)
        )
        raise GridError(
            f"method {method.name!r}: no {' x '.join(names)} in "
            + ", ".join(f"[{lo}, {hi}]" for _, lo, hi in knobs)
            + f" brings its {match.count} parameters within {match.tolerance:.0%} of "
            f"{target.name!r}'s {target_count:.0f}; closest: {closest}. Search another knob "
            "(match.search) or a wider range (match.range)"
        )
    return Matched(
        method=method.name,
        target=target.name,
        count_kind=match.count,
        knobs=dict(best.values),
        changes=dict(best.changes),
        count=best.count,
        target_count=target_count,
        tolerance=match.tolerance,
        builds=own.builds + target_counter.builds,
    )


# ----------------------------------------------------------------- the grid's matches, cached
def _fingerprint(grid: Grid, method: Method, extra: Sequence[str]) -> str:
    """A digest of everything a match depends on: both methods' config files (their text),
    overrides, the command line's extras and the match spec."""
    match = method.match
    assert match is not None
    target = match.target_method or grid.method(match.target)

    def side(m: Method) -> dict[str, Any]:
        files = [(str(p), Path(p).read_text()) for p in (*grid.base, *m.configs)]
        return {"files": files, "overrides": {**grid.overrides, **m.overrides}}

    values = {
        "method": side(method),
        "target": side(target),
        "extra": list(extra),
        "match": match.to_dict(),
    }
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_matches(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``<out>/capacity.json``: method -> ``{"fingerprint", "matched"}`` (empty: none)."""
    return read_json_cache(Path(out_dir) / CAPACITY_FILE)


def resolve_matches(
    grid: Grid,
    out_dir: str | Path | None = None,
    extra: Sequence[str] = (),
    write: bool = True,
    log: Callable[[str], None] | None = None,
    counter: Callable[[Sequence[str]], ModelCounter] = ModelCounter,
) -> dict[str, Matched]:
    """:class:`Matched` of every method of ``grid`` with a ``match``, by method name.

    A choice cached in ``<out_dir>/capacity.json`` under the same fingerprint is reused;
    new ones are added to it when ``write`` (entries of other methods are kept).
    Raises :class:`GridError` (before anything runs) when a match cannot be met.
    """
    cached = read_matches(out_dir) if out_dir is not None else {}
    resolved: dict[str, Matched] = {}
    changed = False
    for method in grid.methods:
        if method.match is None:
            continue
        key = _fingerprint(grid, method, extra)
        entry = cached.get(method.name)
        if isinstance(entry, dict) and entry.get("fingerprint") == key:
            resolved[method.name] = Matched.from_dict(entry["matched"])
            continue
        matched = match_method(grid, method, extra, counter)
        resolved[method.name] = matched
        cached[method.name] = {"fingerprint": key, "matched": matched.to_dict()}
        changed = True
        if log is not None:
            log(
                f"capacity: {method.name} -> {matched.describe()}: {matched.count:.0f} "
                f"{matched.count_kind} parameters, {matched.ratio:.3f}x {matched.target}'s "
                f"{matched.target_count:.0f}"
            )
    if write and changed and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / CAPACITY_FILE, cached)
    return resolved
