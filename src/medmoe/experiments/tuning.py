"""Learning rates chosen on the validation split, never on test (a grid's ``tune:`` section).

Syntax (:mod:`medmoe.experiments.grid`)::

    tune:
      seeds: [100, 101, 102]       # tuning seeds: every point of a tuned method trains on each
      eval: {limit: 200}           # on top of the grid's eval settings; the split is always
                                   #   validation (any other is refused)
      learning_rate:               # method -> model.init_args.learning_rate values to try
        full_finetune: [1.0e-4, 3.0e-4, 1.0e-3]
      router_learning_rate:        # method -> model.init_args.router_learning_rate values
        med_moe_lora: [3.0e-3, 1.0e-2]

A method's points are every (learning rate, router rate) pair of its lists (a missing list: the
method's configured value). Each point trains once per tuning seed, in
``<out>/tune/<method>/<point>/seed_<s>`` (``<point>``: ``lr_<v>``, ``rlr_<v>`` or
``lr_<v>-rlr_<w>``), with the method's own config (capacity matching included) and is scored on
the **validation** split only. Selection: the point with the highest validation medical
average (the mean over the domain tasks, in %) averaged over the tuning seeds; equal means go
to the smaller learning rate, then the smaller router rate. A tuning run's ``results.json``
must record the validation split (:func:`validation_average` refuses any other), so a test
score can never choose a rate. The reporting seeds of the method, and of its single-task and
replay-sweep variants, then train at the chosen point. The runner runs the tuning runs first,
resolves the choices, then the reporting runs; the choices and every point's validation scores
go into ``<out>/tuning.json`` and the "Learning rate selection" table of ``tables.md``.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmoe.data.tasks import DOMAIN_TASK_NAMES
from medmoe.experiments.grid import LR_KEY, ROUTER_LR_KEY, TUNE_DIR, TUNE_SPLIT, Tune
from medmoe.experiments.worker import read_json_cache, read_results, write_json

__all__ = [
    "TUNING_FILE",
    "Choice",
    "Point",
    "TuningIncomplete",
    "choose",
    "points",
    "read_choices",
    "select",
    "tuning_run_dir",
    "validation_average",
    "write_choices",
]

TUNING_FILE = "tuning.json"


class TuningIncomplete(RuntimeError):
    """A tuned method whose tuning runs have not all finished: no rate can be chosen yet."""


@dataclass(frozen=True, order=True)
class Point:
    """One tried setting: ``None`` = the method's configured value. Ordered by rate (the
    tie-break order: smaller learning rate, then smaller router rate)."""

    learning_rate: float | None = None
    router_learning_rate: float | None = None

    @property
    def name(self) -> str:
        parts = []
        if self.learning_rate is not None:
            parts.append(f"lr_{self.learning_rate:g}")
        if self.router_learning_rate is not None:
            parts.append(f"rlr_{self.router_learning_rate:g}")
        return "-".join(parts) or "default"

    @property
    def overrides(self) -> dict[str, float]:
        """The dotted ``medmoe fit`` keys of this point."""
        values = {}
        if self.learning_rate is not None:
            values[LR_KEY] = self.learning_rate
        if self.router_learning_rate is not None:
            values[ROUTER_LR_KEY] = self.router_learning_rate
        return values

    def _key(self) -> tuple[float, float]:
        return (self.learning_rate or 0.0, self.router_learning_rate or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "learning_rate": self.learning_rate,
            "router_learning_rate": self.router_learning_rate,
        }


def points(tune: Tune, method: str) -> list[Point]:
    """The points of ``method`` (empty: not tuned), in tie-break order."""
    rates = tune.learning_rate.get(method)
    routers = tune.router_learning_rate.get(method)
    if rates is None and routers is None:
        return []
    pairs = itertools.product(rates or (None,), routers or (None,))
    return sorted((Point(lr, rlr) for lr, rlr in pairs), key=Point._key)


def tuning_run_dir(out_dir: str | Path, method: str, point: Point, seed: int) -> Path:
    return Path(out_dir) / TUNE_DIR / method / point.name / f"seed_{seed}"


def validation_average(results: Mapping[str, Any]) -> float | None:
    """The validation medical average (%) of a tuning run's results; ValueError when the run
    was scored on any split but validation."""
    split = (results.get("eval") or {}).get("split")
    if split != TUNE_SPLIT:
        raise ValueError(
            f"tuning run {results.get('method')!r} seed {results.get('seed')} was scored on "
            f"split {split!r}: rates are chosen on {TUNE_SPLIT!r} only"
        )
    scores = results.get("scores") or {}
    values = [100.0 * scores[t] for t in DOMAIN_TASK_NAMES if t in scores]
    return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class Choice:
    """A tuned method's chosen point and the validation scores it was chosen on.

    ``scores``: point name -> ``{"point", "per_seed": {seed: average}, "mean"}``.
    """

    method: str
    point: Point
    seeds: tuple[int, ...]
    scores: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def overrides(self) -> dict[str, float]:
        return self.point.overrides

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "chosen": self.point.to_dict(),
            "chosen_name": self.point.name,
            "seeds": list(self.seeds),
            "split": TUNE_SPLIT,
            "scores": {k: dict(v) for k, v in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Choice:
        return cls(
            method=values["method"],
            point=Point(**values["chosen"]),
            seeds=tuple(values.get("seeds") or ()),
            scores=values.get("scores") or {},
        )


def select(
    method: str, scored: Mapping[Point, Mapping[int, float | None]], seeds: Sequence[int]
) -> Choice:
    """The point with the best mean validation medical average over ``seeds`` (ties: the
    smaller learning rate, then the smaller router rate). Every point needs a score for every
    seed, else :class:`TuningIncomplete` names what is missing."""
    if not scored:
        raise TuningIncomplete(f"{method}: no tuning points")
    missing = [
        f"{point.name} seed {s}"
        for point in sorted(scored, key=Point._key)
        for s in seeds
        if scored[point].get(s) is None
    ]
    if missing:
        raise TuningIncomplete(f"{method}: no validation score for {', '.join(missing)}")
    means = {p: statistics.fmean(float(scored[p][s]) for s in seeds) for p in scored}
    best = min(means, key=lambda p: (-means[p], p._key()))
    table = {
        p.name: {
            **p.to_dict(),
            "per_seed": {str(s): scored[p][s] for s in seeds},
            "mean": means[p],
        }
        for p in sorted(scored, key=Point._key)
    }
    return Choice(method, best, tuple(seeds), table)


def choose(tune: Tune, method: str, out_dir: str | Path) -> Choice:
    """Read ``method``'s tuning results under ``out_dir`` and :func:`select` its point."""
    scored: dict[Point, dict[int, float | None]] = {}
    for point in points(tune, method):
        scored[point] = {}
        for seed in tune.seeds:
            results = read_results(tuning_run_dir(out_dir, method, point, seed))
            scored[point][seed] = None if results is None else validation_average(results)
    return select(method, scored, tune.seeds)


def write_choices(out_dir: str | Path, choices: Mapping[str, Choice]) -> Path:
    """``<out>/tuning.json``: method -> :meth:`Choice.to_dict` (other methods' entries kept)."""
    path = Path(out_dir) / TUNING_FILE
    values = read_choices(out_dir)
    values.update({name: choice.to_dict() for name, choice in choices.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, values)


def read_choices(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``<out>/tuning.json`` (empty: no choice recorded yet)."""
    return read_json_cache(Path(out_dir) / TUNING_FILE)
