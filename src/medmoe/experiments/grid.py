"""Experiment grids: a base config, named methods (lists of config fragments), seeds, overrides.

A grid is a YAML file (see ``configs/experiments/``)::

    name: toy_full                       # optional; default: the file's stem
    base: configs/demo.yaml              # a path or a list of paths, the first --config(s)
    seeds: [0, 1, 2]
    overrides:                           # dotted CLI keys for every run (and the base model)
      trainer.max_steps: 300
    eval:                                # how trained runs are scored (EvalSettings)
      split: test
      limit: 200
    table3: {lower: "Lower Layers (L1-2)", higher: "Higher Layers (L3-4)"}
    methods:
      - name: lora                       # [A-Za-z0-9_.-], the run directory's name
        label: Standard LoRA (r = 16)    # row label in the tables; default: name
        configs: [configs/baselines/lora.yaml]   # fragments after base; [] = base as is
        overrides: {}                    # dotted keys for this method only
        tables: [1, 2, 4]                # the paper tables the method appears in
        allocation: {lower: "N = 4", higher: "N = 4"}  # Table 3 cells (with 3 in tables)
    replay_sweep:                        # forgetting vs replay: more runs of these methods
      methods: [lora]                    #   -> method "lora-replay0.05" (family "lora")
      ratios: [0.0, 0.05]                # besides the grid's own ratio (the method's own row)
    single_task:                         # interference: one run per domain task, alone
      methods: [lora]                    #   -> "lora-single-medqa", ... (family "lora")
      overrides: {data.init_args.batch_size: 11}  # the per-task budget
    quick:                               # --quick: a tiny version for tests and smoke runs
      methods: [lora, med_moe_lora]
      seeds: [0]
      overrides: {trainer.max_steps: 3}
      eval: {limit: 4}

Capacity matching (:mod:`~medmoe.experiments.capacity`): a method may size its adapter so its
parameter count matches another method's, on the real model the run builds::

      - name: lora_matched
        configs: [configs/baselines/lora.yaml]
        match:
          method: med_moe_lora               # the target: another method of this grid
          count: trainable                   # trainable | active (Table 4's two counts)
          search: r                          # optional: the knob(s) searched (default by
                                             #   adapter: LoRA/multi-LoRA r, equal-rank MoE
                                             #   expert_rank, other MoE rank_scale); a list
                                             #   searches their product
          range: {r: [1, 256]}               # optional: each knob's inclusive search range
          tolerance: 0.03                    # optional: |count / target - 1| allowed (3%)

The runner picks the closest count before any run starts (a :class:`GridError` naming the
closest achievable counts when none is within the tolerance) and appends the chosen adapter
keys to the method's overrides (its single-task / replay variants inherit them).

Learning rates chosen on validation (:mod:`~medmoe.experiments.tuning`)::

    tune:
      seeds: [100, 101, 102]             # tuning seeds (runs <out>/tune/<method>/<point>/seed_<s>)
      eval: {limit: 200}                 # the grid's eval settings on top; split: validation
      learning_rate:                     # method -> the model.init_args.learning_rate values
        full_finetune: [1.0e-4, 3.0e-4, 1.0e-3]
        lora: [1.0e-3, 3.0e-3, 1.0e-2]
      router_learning_rate:              # method -> model.init_args.router_learning_rate values
        med_moe_lora: [3.0e-3, 1.0e-2]   #   (with learning_rate too: every pair is a point)

Each tuned method trains every point on every tuning seed, scored on the validation split
only; the point with the best mean validation medical average is chosen (ties: the smaller
learning rate, then the smaller router rate) and the reporting seeds train at it. Generated
variants (single-task, replay sweep) of a tuned method use its choice.

Relative paths resolve against the current directory first, then against the grid file's
folder and each of its parents, so a grid under ``configs/experiments/`` finds
``configs/demo.yaml`` from the repository root or from anywhere inside it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medmoe.data.tasks import DOMAIN_TASK_NAMES, GENERAL_TASK_NAMES

__all__ = [
    "BASE_RUN",
    "EvalSettings",
    "Grid",
    "GridError",
    "Match",
    "Method",
    "Tune",
    "cli_override",
    "load_grid",
]

BASE_RUN = "base"  # reserved name: the base model's own scores
PAPER_TABLES = (1, 2, 3, 4)
DEFAULT_TABLES = (1, 2, 4)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_GRID_KEYS = {"name", "description", "base", "seeds", "overrides", "eval", "table3", "methods"}
_GRID_KEYS |= {"quick", "replay_sweep", "single_task", "tune"}
_METHOD_KEYS = {"name", "label", "configs", "overrides", "tables", "allocation", "match"}
_MATCH_KEYS = {"method", "count", "search", "range", "tolerance"}
_TUNE_KEYS = {"seeds", "eval", "learning_rate", "router_learning_rate"}
COUNT_KINDS = ("trainable", "active")
MATCH_TOLERANCE = 0.03  # |count / target - 1| a matched method may be off by
TUNE_DIR = "tune"  # reserved name: <out>/tune/<method>/<point>/seed_<s> holds the tuning runs
TUNE_SPLIT = "validation"  # the only split tuning runs are scored on
LR_KEY = "model.init_args.learning_rate"
ROUTER_LR_KEY = "model.init_args.router_learning_rate"
_QUICK_KEYS = {"methods", "seeds", "overrides", "eval"}
_SWEEP_KEYS = {"methods", "ratios"}
_SINGLE_KEYS = {"methods", "overrides"}
REPLAY_KEY = "data.init_args.replay_ratio"
TASKS_KEY = "data.init_args.tasks"


class GridError(ValueError):
    """A grid file that cannot be run: unknown keys, bad values, unknown method names."""


@dataclass(frozen=True)
class EvalSettings:
    """How each trained run (and the base model) is scored, through
    :class:`medmoe.callbacks.scoring.TaskScorer` (the evaluation callbacks' scorer).

    Attributes:
        split: the split whose fixed subset is scored (the paper's tables: ``test``).
        limit: examples per task (the first ``limit`` of a fixed shuffle); ``None`` = all.
        batch_size: evaluation batch size.
        max_new_tokens: generation budget (GSM8K, Clinical-Sum).
        shots: few-shot demonstrations from the training split's fixed subset.
        tasks: tasks scored; those the data lacks are skipped.
    """

    split: str = "test"
    limit: int | None = 200
    batch_size: int = 64
    max_new_tokens: int = 32
    shots: int = 0
    tasks: tuple[str, ...] = (*DOMAIN_TASK_NAMES, *GENERAL_TASK_NAMES)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(str(t) for t in self.tasks))
        if self.limit is not None and self.limit < 1:
            raise GridError(f"eval.limit must be >= 1 or null, got {self.limit}")
        if self.batch_size < 1 or self.max_new_tokens < 1 or self.shots < 0:
            raise GridError(
                "eval.batch_size and eval.max_new_tokens must be >= 1 and eval.shots >= 0, got "
                f"{self.batch_size}, {self.max_new_tokens}, {self.shots}"
            )

    def replace(self, values: Mapping[str, Any]) -> EvalSettings:
        known = {f.name for f in dataclasses.fields(self)}
        _check_keys(values, known, "eval")
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["tasks"] = list(self.tasks)
        return values


@dataclass(frozen=True)
class Match:
    """A method's ``match:``: size its adapter so that its ``count`` parameters come closest to
    those of method ``target`` (see :mod:`medmoe.experiments.capacity`).

    Attributes:
        target: the name of the method whose count is matched (a method of the grid's own).
        count: ``"trainable"`` or ``"active"`` (:func:`medmoe.adapters.parameter_counts`).
        search: the knobs searched (empty: the adapter's default knob).
        range: knob -> inclusive ``(low, high)`` search range (absent: the knob's default).
        tolerance: the largest ``|count / target count - 1|`` accepted.
        target_method: the target's :class:`Method` (kept so a selection without it still
            resolves).
    """

    target: str
    count: str = "trainable"
    search: tuple[str, ...] = ()
    range: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    tolerance: float = MATCH_TOLERANCE
    target_method: Method | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.target,
            "count": self.count,
            "search": list(self.search),
            "range": {k: list(v) for k, v in sorted(self.range.items())},
            "tolerance": self.tolerance,
        }


@dataclass(frozen=True)
class Tune:
    """The grid's ``tune:`` section: learning rates chosen on the validation split.

    Attributes:
        seeds: the tuning seeds (every point of a tuned method trains on each).
        eval: how tuning runs are scored; its split is always ``validation``.
        learning_rate: method -> the ``model.init_args.learning_rate`` values swept.
        router_learning_rate: method -> the ``model.init_args.router_learning_rate`` values.
    """

    seeds: tuple[int, ...]
    eval: EvalSettings
    learning_rate: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    router_learning_rate: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The tuned methods, in the order the section names them."""
        return list(dict.fromkeys([*self.learning_rate, *self.router_learning_rate]))


@dataclass(frozen=True)
class Method:
    """One row of the grid: a name, its config fragments and where it is reported.

    Runs generated by the grid's ``replay_sweep`` and ``single_task`` sections are methods too:
    ``family`` names the method they vary, ``replay_ratio`` is the ratio a sweep run trains
    with (``None``: the grid's own), ``single_task`` the one domain task a single-task run
    trains on (``None``: all of them). Generated runs appear in none of Tables 1-4.
    """

    name: str
    label: str
    configs: tuple[Path, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    tables: tuple[int, ...] = DEFAULT_TABLES
    allocation: Mapping[str, str] | None = None
    family: str = ""
    replay_ratio: float | None = None
    single_task: str | None = None
    match: Match | None = None

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", self.name)

    @property
    def generated(self) -> bool:
        """True for a replay-sweep or single-task variant of another method."""
        return self.family != self.name


@dataclass(frozen=True)
class Grid:
    """A parsed grid (see the module docstring for the file format)."""

    path: Path
    name: str
    base: tuple[Path, ...]
    seeds: tuple[int, ...]
    methods: tuple[Method, ...]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    eval: EvalSettings = field(default_factory=EvalSettings)
    table3: Mapping[str, str] = field(
        default_factory=lambda: {"lower": "Lower Layers", "higher": "Higher Layers"}
    )
    description: str = ""
    quick_spec: Mapping[str, Any] | None = None
    replay_ratio: float | None = None
    tune: Tune | None = None

    def family(self, name: str) -> list[Method]:
        """The method ``name`` and its generated variants (replay sweep, single-task runs)."""
        return [m for m in self.methods if m.family == name]

    @property
    def method_names(self) -> list[str]:
        return [m.name for m in self.methods]

    def method(self, name: str) -> Method:
        for method in self.methods:
            if method.name == name:
                return method
        raise GridError(
            f"unknown method {name!r} in grid {self.path}; it defines: "
            f"{', '.join(self.method_names)}"
        )

    def select(
        self, methods: Iterable[str] | None = None, seeds: Iterable[int] | None = None
    ) -> Grid:
        """The grid restricted to ``methods`` (in the given order) and/or ``seeds``."""
        chosen = self.methods if methods is None else tuple(self.method(m) for m in methods)
        if not chosen:
            raise GridError("no methods selected")
        seeds = self.seeds if seeds is None else tuple(int(s) for s in seeds)
        if not seeds:
            raise GridError("no seeds selected")
        return dataclasses.replace(self, methods=chosen, seeds=seeds)

    def quick(self) -> Grid:
        """The grid's ``quick:`` variant: its methods (default: the first two), its seeds
        (default: the first), its overrides on top of the grid's, its eval settings."""
        spec = dict(self.quick_spec or {})
        names = spec.get("methods") or self.method_names[:2]
        seeds = spec.get("seeds") or self.seeds[:1]
        grid = self.select(names, seeds)
        quick_eval = spec.get("eval") or {}
        tune = self.tune
        if tune is not None:  # one tuning seed, the quick eval settings on top
            tune = dataclasses.replace(
                tune,
                seeds=tune.seeds[:1],
                eval=tune.eval.replace({**quick_eval, "split": TUNE_SPLIT}),
            )
        return dataclasses.replace(
            grid,
            name=f"{self.name}-quick",
            overrides={**self.overrides, **dict(spec.get("overrides") or {})},
            eval=self.eval.replace(quick_eval),
            tune=tune,
        )

    def with_overrides(self, overrides: Mapping[str, Any]) -> Grid:
        return dataclasses.replace(self, overrides={**self.overrides, **overrides})


def cli_override(key: str, value: Any) -> str:
    """``--key=value`` for ``medmoe.cli.main``: strings verbatim, anything else as JSON (YAML)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"--{key}={text}"


def _check_keys(values: Mapping[str, Any], known: set[str], where: str) -> None:
    if not isinstance(values, Mapping):
        raise GridError(f"{where} must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise GridError(f"unknown key(s) {unknown} in {where}; accepted: {sorted(known)}")


def _overrides(values: Any, where: str) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise GridError(f"{where} must map dotted keys to values, got {type(values).__name__}")
    bad = [k for k in values if not isinstance(k, str) or not k or k.startswith("-")]
    if bad:
        raise GridError(f"{where}: keys must be dotted names such as trainer.max_steps, got {bad}")
    return dict(values)


def resolve_path(path: str | Path, grid_path: Path) -> Path:
    """An existing file: ``path`` itself, or relative to the cwd, the grid's folder or a parent."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
        raise FileNotFoundError(f"config file {candidate} (named in grid {grid_path}) not found")
    tried = [Path.cwd() / candidate]
    tried += [folder / candidate for folder in (grid_path.parent, *grid_path.parent.parents)]
    for option in tried:
        if option.is_file():
            return option.resolve()
    raise FileNotFoundError(
        f"config file {str(path)!r} (named in grid {grid_path}) not found; looked in the "
        f"current directory and in {grid_path.parent} and its parents"
    )


def _paths(values: Any, grid_path: Path, where: str) -> tuple[Path, ...]:
    if values is None:
        return ()
    if isinstance(values, (str, Path)):
        values = [values]
    if not isinstance(values, Sequence):
        raise GridError(f"{where} must be a path or a list of paths, got {values!r}")
    return tuple(resolve_path(v, grid_path) for v in values)


def _method(entry: Any, grid_path: Path, index: int) -> Method:
    if isinstance(entry, str):
        entry = {"name": entry}
    where = f"methods[{index}]"
    _check_keys(entry, _METHOD_KEYS, where)
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name == BASE_RUN:
        raise GridError(
            f"{where}.name must match [A-Za-z0-9_.-]+ and not be {BASE_RUN!r}, got {name!r}"
        )
    tables = tuple(int(t) for t in entry.get("tables", DEFAULT_TABLES))
    if any(t not in PAPER_TABLES for t in tables):
        raise GridError(f"{where}.tables must be a subset of {list(PAPER_TABLES)}, got {tables}")
    allocation = entry.get("allocation")
    if allocation is not None:
        _check_keys(allocation, {"lower", "higher"}, f"{where}.allocation")
        allocation = {k: str(v) for k, v in allocation.items()}
    return Method(
        name=name,
        label=str(entry.get("label") or name),
        configs=_paths(entry.get("configs"), grid_path, f"{where}.configs"),
        overrides=_overrides(entry.get("overrides"), f"{where}.overrides"),
        tables=tables,
        allocation=allocation,
        match=None if entry.get("match") is None else _match(entry["match"], f"{where}.match"),
    )


def _match(spec: Any, where: str) -> Match:
    """``match: {method, count, search, range, tolerance}`` (the target checked later)."""
    _check_keys(spec, _MATCH_KEYS, where)
    target = spec.get("method")
    if not isinstance(target, str) or not target:
        raise GridError(f"{where}.method must name the method whose count is matched")
    count = spec.get("count", "trainable")
    if count not in COUNT_KINDS:
        raise GridError(f"{where}.count must be one of {list(COUNT_KINDS)}, got {count!r}")
    search = spec.get("search") or ()
    search = (search,) if isinstance(search, str) else tuple(search)
    if any(not isinstance(k, str) for k in search) or len(set(search)) != len(search):
        raise GridError(f"{where}.search must name distinct knobs, got {list(search)}")
    ranges: dict[str, tuple[int, int]] = {}
    for knob, bounds in (spec.get("range") or {}).items():
        if (
            not isinstance(bounds, Sequence)
            or len(bounds) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
            or not 1 <= bounds[0] <= bounds[1]
        ):
            raise GridError(
                f"{where}.range.{knob} must be [low, high], integers with 1 <= low <= high, "
                f"got {bounds!r}"
            )
        ranges[str(knob)] = (int(bounds[0]), int(bounds[1]))
    if search and set(ranges) - set(search):
        raise GridError(
            f"{where}.range names knob(s) {sorted(set(ranges) - set(search))} that "
            f"{where}.search does not list ({list(search)})"
        )
    tolerance = spec.get("tolerance", MATCH_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance <= 0:
        raise GridError(f"{where}.tolerance must be a number > 0, got {tolerance!r}")
    return Match(target, count, search, ranges, float(tolerance))


def _link_matches(methods: Sequence[Method]) -> tuple[Method, ...]:
    """Each ``match`` with its target's :class:`Method`; a target must be another method of
    the grid's own that matches nothing itself."""
    by_name = {m.name: m for m in methods}
    linked = []
    for method in methods:
        match = method.match
        if match is not None:
            target = by_name.get(match.target)
            where = f"method {method.name!r}: match.method"
            if target is None or target.generated:
                raise GridError(
                    f"{where} names {match.target!r}, not a method of this grid; defined: "
                    f"{[m.name for m in methods if not m.generated]}"
                )
            if target.name == method.name or target.match is not None:
                raise GridError(
                    f"{where} names {match.target!r}, which "
                    + ("is the method itself" if target.name == method.name else "is matched too")
                    + ": the target must be sized by its own config"
                )
            method = dataclasses.replace(
                method, match=dataclasses.replace(match, target_method=target)
            )
        linked.append(method)
    return tuple(linked)


def _rates(values: Any, methods: Sequence[Method], where: str) -> dict[str, tuple[float, ...]]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise GridError(f"{where} must map method names to lists of rates, got {values!r}")
    own = [m.name for m in methods if not m.generated]
    rates = {}
    for name, listed in values.items():
        if name not in own:
            raise GridError(f"{where} names unknown method {name!r}; defined: {own}")
        if isinstance(listed, (int, float)):
            listed = [listed]
        try:
            floats = tuple(float(v) for v in listed)
        except (TypeError, ValueError):
            floats = ()
        if not floats or any(not v > 0 for v in floats) or len(set(floats)) != len(floats):
            raise GridError(f"{where}.{name} must list distinct rates > 0, got {listed!r}")
        rates[str(name)] = floats
    return rates


def _tune(spec: Any, methods: Sequence[Method], settings: EvalSettings, where: str) -> Tune:
    """``tune: {seeds, eval, learning_rate, router_learning_rate}``."""
    _check_keys(spec, _TUNE_KEYS, where)
    seeds = tuple(int(s) for s in spec.get("seeds") or ())
    if not seeds or len(set(seeds)) != len(seeds):
        raise GridError(f"{where}.seeds must be a non-empty list of distinct integers")
    values = dict(spec.get("eval") or {})
    if values.get("split", TUNE_SPLIT) != TUNE_SPLIT:
        raise GridError(
            f"{where}.eval.split must be {TUNE_SPLIT!r} (rates are chosen on validation, never "
            f"on test), got {values['split']!r}"
        )
    values["split"] = TUNE_SPLIT
    tune = Tune(
        seeds=seeds,
        eval=settings.replace(values),
        learning_rate=_rates(spec.get("learning_rate"), methods, f"{where}.learning_rate"),
        router_learning_rate=_rates(
            spec.get("router_learning_rate"), methods, f"{where}.router_learning_rate"
        ),
    )
    if not tune.methods:
        raise GridError(f"{where} sweeps nothing: give learning_rate and/or router_learning_rate")
    return tune


def _base_values(base: Sequence[Path]) -> dict[str, Any]:
    """The data module's ``init_args`` of the base config(s), later files winning key by key."""
    merged: dict[str, Any] = {}
    for path in base:
        values = yaml.safe_load(path.read_text()) or {}
        merged.update(((values.get("data") or {}).get("init_args")) or {})
    return merged


def _named_methods(spec: Any, methods: Sequence[Method], where: str) -> list[Method]:
    """The methods a generating section's ``methods:`` list names, in its order."""
    by_name = {m.name: m for m in methods}
    unknown = [n for n in spec.get("methods") or [] if n not in by_name]
    if unknown:
        raise GridError(
            f"{where}.methods names unknown method {unknown[0]!r}; defined: {list(by_name)}"
        )
    return [by_name[n] for n in spec.get("methods") or []]


def _replay_sweep(
    spec: Any, methods: Sequence[Method], own_ratio: float | None, where: str
) -> list[Method]:
    """``replay_sweep: {methods, ratios}``: each method again at each replay ratio."""
    _check_keys(spec, _SWEEP_KEYS, where)
    ratios = [float(r) for r in spec.get("ratios") or []]
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios) or len(set(ratios)) != len(ratios):
        raise GridError(f"{where}.ratios must list distinct ratios in [0, 1), got {ratios}")
    if own_ratio is not None and own_ratio in ratios:
        raise GridError(
            f"{where}.ratios repeats the grid's own replay ratio {own_ratio:g}: that run is "
            "each method's own row; list only the other ratios"
        )
    generated = []
    for method in _named_methods(spec, methods, where):
        name = method.name
        for ratio in ratios:
            generated.append(
                dataclasses.replace(
                    method,
                    name=f"{name}-replay{ratio:g}",
                    label=f"{method.label}, replay {ratio:g}",
                    overrides={**method.overrides, REPLAY_KEY: ratio},
                    tables=(),
                    allocation=None,
                    family=name,
                    replay_ratio=ratio,
                )
            )
    return generated


def _single_task(
    spec: Any, methods: Sequence[Method], task_entries: Sequence[Any], where: str
) -> list[Method]:
    """``single_task: {methods, overrides}``: each method once per domain task, that task
    alone, with ``overrides`` (the per-task budget, e.g. the batch size times the task's share
    of the joint run's domain samples) on top of the method's own."""
    _check_keys(spec, _SINGLE_KEYS, where)
    budget = _overrides(spec.get("overrides"), f"{where}.overrides")
    if not budget:
        raise GridError(
            f"{where}.overrides must set the per-task budget (for example "
            "data.init_args.batch_size: the joint batch x the task's share), got nothing"
        )
    entries = [e if isinstance(e, Mapping) else {"name": e} for e in task_entries]
    if not entries:
        raise GridError(f"{where}: the base config lists no data.init_args.tasks to split")
    generated = []
    for method in _named_methods(spec, methods, where):
        name = method.name
        for entry in entries:
            task = str(entry["name"])
            generated.append(
                dataclasses.replace(
                    method,
                    name=f"{name}-single-{task}",
                    label=f"{method.label}, {task} alone",
                    overrides={**method.overrides, TASKS_KEY: [dict(entry)], **budget},
                    tables=(),
                    allocation=None,
                    family=name,
                    single_task=task,
                )
            )
    return generated


def load_grid(path: str | Path) -> Grid:
    """Parse and check a grid file; every config it names must exist."""
    grid_path = Path(path).expanduser()
    if not grid_path.is_file():
        raise FileNotFoundError(f"grid file {grid_path} not found")
    grid_path = grid_path.resolve()
    values = yaml.safe_load(grid_path.read_text()) or {}
    _check_keys(values, _GRID_KEYS, str(grid_path))
    if "base" not in values:
        raise GridError(f"{grid_path}: 'base' (the base config path) is required")
    entries = values.get("methods") or []
    if not entries:
        raise GridError(f"{grid_path}: 'methods' must list at least one method")
    methods = tuple(_method(e, grid_path, i) for i, e in enumerate(entries))
    base = _paths(values["base"], grid_path, "base")
    overrides = _overrides(values.get("overrides"), "overrides")
    data_values = _base_values(base)
    own_ratio = overrides.get(REPLAY_KEY, data_values.get("replay_ratio"))
    own_ratio = None if own_ratio is None else float(own_ratio)
    if values.get("replay_sweep") is not None:
        methods += tuple(_replay_sweep(values["replay_sweep"], methods, own_ratio, "replay_sweep"))
    if values.get("single_task") is not None:
        tasks = overrides.get(TASKS_KEY, data_values.get("tasks") or [])
        methods += tuple(_single_task(values["single_task"], methods, tasks, "single_task"))
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GridError(f"{grid_path}: duplicate method name(s) {duplicates}")
    if TUNE_DIR in names:
        raise GridError(f"{grid_path}: {TUNE_DIR!r} is reserved (the tuning runs' folder)")
    methods = _link_matches(methods)
    seeds = tuple(int(s) for s in values.get("seeds", [0]))
    if not seeds or len(set(seeds)) != len(seeds):
        raise GridError(f"{grid_path}: seeds must be a non-empty list of distinct integers")
    quick = values.get("quick")
    if quick is not None:
        _check_keys(quick, _QUICK_KEYS, f"{grid_path}: quick")
        for name in quick.get("methods") or []:
            if name not in names:
                raise GridError(
                    f"{grid_path}: quick.methods names unknown method {name!r}; the grid "
                    f"defines: {', '.join(names)}"
                )
        quick = dict(quick)
        quick["overrides"] = _overrides(quick.get("overrides"), "quick.overrides")
    table3 = {"lower": "Lower Layers", "higher": "Higher Layers"}
    if values.get("table3") is not None:
        _check_keys(values["table3"], {"lower", "higher"}, "table3")
        table3.update({k: str(v) for k, v in values["table3"].items()})
    settings = EvalSettings().replace(values.get("eval") or {})
    tune = None
    if values.get("tune") is not None:
        tune = _tune(values["tune"], methods, settings, "tune")
    return Grid(
        path=grid_path,
        name=str(values.get("name") or grid_path.stem),
        base=base,
        seeds=seeds,
        methods=methods,
        overrides=overrides,
        eval=settings,
        table3=table3,
        description=str(values.get("description") or ""),
        quick_spec=quick,
        replay_ratio=own_ratio,
        tune=tune,
    )
