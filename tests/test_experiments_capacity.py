"""Capacity matching (``match:``): counts on the real toy model against hand-computed ones, the
3% rule, the search's tie-break, the cache, the plan and the report's table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from medmoe.experiments import GridError, load_grid, plan_runs
from medmoe.experiments.capacity import (
    CAPACITY_FILE,
    ModelCounter,
    match_method,
    resolve_matches,
)
from medmoe.experiments.report import capacity_table, collect

ROOT = Path(__file__).resolve().parents[1]
LORA = str(ROOT / "configs/baselines/lora.yaml")
MULTI = str(ROOT / "configs/baselines/multi_lora.yaml")
VANILLA = str(ROOT / "configs/baselines/vanilla_moe_lora.yaml")
ADAPTER = "model.init_args.adapter.init_args"


def toy_dims() -> tuple[int, int, int]:
    """hidden, intermediate and layer count of the shipped toy base, from its config file."""
    from medmoe.assets import toy_base_path

    config = json.loads((Path(toy_base_path()) / "config.json").read_text())
    return config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]


def per_rank() -> int:
    """One LoRA rank on Linear(in, out) costs in + out: summed over the 7 Llama projections."""
    h, i, layers = toy_dims()
    return layers * (4 * (h + h) + 2 * (h + i) + (i + h))


def med_moe_count() -> int:
    """demo.yaml's Med-MoE-LoRA by hand: eq 2 (n 2..8, gamma 1) experts per layer, ranks
    cycling over [2, 4, 8], a router row (d_in) per expert and one log tau per adapted layer."""
    h, i, layers = toy_dims()
    rank_cost = per_rank() // layers
    inputs = 6 * h + i  # d_in summed over the 7 projections of a layer
    total = 0
    for layer in range(1, layers + 1):
        experts = 2 + (6 * layer) // layers
        ranks = sum([2, 4, 8][e % 3] for e in range(experts))
        total += ranks * rank_cost + experts * inputs + 7
    return total


def write_grid(folder: Path, methods: list, **values) -> Path:
    grid = {
        "base": str(ROOT / "configs" / "demo.yaml"),
        "seeds": [0, 1],
        "overrides": {"trainer.max_steps": 30},
        "methods": methods,
        **values,
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


LORA4 = {
    "name": "lora",
    "configs": [LORA],
    "overrides": {f"{ADAPTER}.r": 4, f"{ADAPTER}.lora_alpha": 8.0},
}


def test_matched_lora_rank_on_the_toy_base_equals_the_hand_count(tmp_path: Path) -> None:
    methods = [
        {"name": "med_moe_lora"},
        {"name": "lora_matched", "configs": [LORA], "match": {"method": "med_moe_lora"}},
        {"name": "multi_matched", "configs": [MULTI], "match": {"method": "med_moe_lora"}},
        LORA4,
        {"name": "lora_to_lora4", "configs": [LORA], "match": {"method": "lora"}},
    ]
    grid = load_grid(write_grid(tmp_path, methods))
    found = resolve_matches(grid, tmp_path / "out")
    target = med_moe_count()
    assert target == 231452  # the count demo.yaml's Med-MoE-LoRA trains
    lora = found["lora_matched"]
    best = min(range(1, 100), key=lambda r: abs(r * per_rank() / target - 1))
    assert lora.knobs == {"r": best} and best == 27
    assert lora.count == best * per_rank() and lora.target_count == target
    assert lora.changes == {"r": 27, "lora_alpha": 54.0}  # alpha / r = 2 kept
    assert abs(lora.ratio - 1) <= 0.03
    multi = found["multi_matched"]  # 3 task adapters of rank r
    best = min(range(1, 100), key=lambda r: abs(3 * r * per_rank() / target - 1))
    assert multi.knobs == {"r": best} and multi.count == 3 * best * per_rank()
    exact = found["lora_to_lora4"]  # a count the rank hits exactly
    assert exact.knobs == {"r": 4} and exact.count == exact.target_count == 4 * per_rank()
    assert exact.ratio == 1.0


def test_nothing_within_three_percent_is_a_grid_error_naming_the_closest(tmp_path: Path) -> None:
    # 8 top-2 experts of one rank: count(r) = 8 r per_rank + routers; r = 2 and 3 bracket the
    # target at 0.74x and 1.04x, so the expert rank alone cannot match Med-MoE-LoRA
    h, i, layers = toy_dims()
    routers = layers * 8 * (6 * h + i)
    below, above = 8 * 2 * per_rank() + routers, 8 * 3 * per_rank() + routers
    methods = [
        {"name": "med_moe_lora"},
        {
            "name": "vanilla_matched",
            "configs": [VANILLA],
            "match": {"method": "med_moe_lora", "search": "expert_rank"},
        },
    ]
    grid = load_grid(write_grid(tmp_path, methods))
    with pytest.raises(GridError) as error:
        resolve_matches(grid, tmp_path / "out")
    message = str(error.value)
    assert "'vanilla_matched'" in message and "within 3%" in message
    assert f"{below}" in message and f"{above}" in message and "231452" in message
    assert not (tmp_path / "out" / CAPACITY_FILE).exists()  # refused: nothing recorded
    # the expert count moves instead: 6 experts of rank 4 come within 1%
    methods[1]["match"]["search"] = "num_experts"
    methods[1]["overrides"] = {f"{ADAPTER}.expert_rank": 4, f"{ADAPTER}.allowed_ranks": [4]}
    grid = load_grid(write_grid(tmp_path, methods))
    vanilla = resolve_matches(grid, tmp_path / "out")["vanilla_matched"]
    assert vanilla.knobs == {"num_experts": 6}
    assert vanilla.count == 6 * (4 * per_rank() + layers * (6 * h + i))


def test_med_moe_lora_shrunk_to_lora_r4(tmp_path: Path) -> None:
    methods = [
        LORA4,
        {
            "name": "med_small",
            "match": {"method": "lora", "search": ["num_experts", "rank_scale"]},
        },
    ]
    grid = load_grid(write_grid(tmp_path, methods))
    small = resolve_matches(grid, tmp_path / "out")["med_small"]
    # 2 experts per layer (1 base + 1 specialist) of ranks 1 and 2 (allowed [1, 2, 4])
    h, i, layers = toy_dims()
    expected = layers * ((1 + 2) * (per_rank() // layers) + 2 * (6 * h + i) + 7)
    assert small.knobs == {"num_experts": 2, "rank_scale": 1}
    assert small.changes["allowed_ranks"] == [1, 2, 4] and small.changes["n_max"] == 2
    assert small.count == expected and small.target_count == 4 * per_rank()


class LinearCounter:
    """A stand-in for :class:`ModelCounter`: ``count`` = ``per`` x r (+ nothing else)."""

    per = 97
    calls: list = []

    def __init__(self, args) -> None:
        self.args = list(args)
        self.builds = 0
        lora = any(a.endswith("lora.yaml") for a in self.args)
        self.adapter = Adapter() if lora else Adapter(r=10, lora_alpha=20.0)
        self.target = not lora

    def count(self, changes=None):
        self.builds += 1
        LinearCounter.calls.append(dict(changes or {}))
        adapter = dataclasses.replace(self.adapter, **dict(changes or {}))
        value = 1000 if self.target and not changes else self.per * adapter.r
        return Counts(value, value)


@dataclasses.dataclass
class Adapter:
    r: int = 16
    lora_alpha: float = 32.0


@dataclasses.dataclass
class Counts:
    trainable: int
    active: float


@pytest.mark.parametrize(
    ("per", "tolerance", "ok", "chosen"),
    [
        (97, 0.03, True, 10),  # 970 = 0.97x: exactly 3% off is accepted
        (103, 0.03, True, 10),  # 1030 = 1.03x
        (96, 0.03, False, None),  # 960 (4% under) and 1056 (r = 11, 5.6% over): refused
        (104, 0.03, False, None),  # 1040 and 936: nothing within 3%, yet ...
        (104, 0.05, True, 10),  # ... a looser tolerance accepts 1040
    ],
)
def test_three_percent_rule_on_a_linear_count(
    tmp_path: Path, per: int, tolerance: float, ok: bool, chosen: int | None
) -> None:
    LinearCounter.per = per
    methods = [
        {"name": "target"},
        {
            "name": "m",
            "configs": [LORA],
            "match": {"method": "target", "tolerance": tolerance, "range": {"r": [1, 64]}},
        },
    ]
    methods[1]["match"]["search"] = "r"
    grid = load_grid(write_grid(tmp_path, methods))
    if not ok:
        with pytest.raises(GridError, match="'m'.*within"):
            match_method(grid, grid.method("m"), counter=LinearCounter)
        return
    matched = match_method(grid, grid.method("m"), counter=LinearCounter)
    assert matched.knobs == {"r": chosen} and matched.count == per * chosen
    assert matched.changes == {"r": chosen, "lora_alpha": 2.0 * chosen}


def test_ties_go_to_the_smaller_value(tmp_path: Path) -> None:
    LinearCounter.per = 200  # r = 5 -> 1000 exactly; then 4 -> 800, 6 -> 1200
    methods = [{"name": "target"}, {"name": "m", "configs": [LORA], "match": {"method": "target"}}]
    grid = load_grid(write_grid(tmp_path, methods))
    assert match_method(grid, grid.method("m"), counter=LinearCounter).knobs == {"r": 5}

    class Plateau(LinearCounter):  # every r in 3..9 gives the same count: the smallest wins
        def count(self, changes=None):
            counts = super().count(changes)
            if changes and 3 <= changes["r"] <= 9:
                return Counts(1000, 1000)
            return counts

    assert match_method(grid, grid.method("m"), counter=Plateau).knobs == {"r": 3}


def test_choice_is_cached_and_recomputed_when_the_config_changes(tmp_path: Path) -> None:
    LinearCounter.per = 100
    methods = [{"name": "target"}, {"name": "m", "configs": [LORA], "match": {"method": "target"}}]
    grid = load_grid(write_grid(tmp_path, methods))
    out = tmp_path / "out"
    first = resolve_matches(grid, out, counter=LinearCounter)["m"]
    assert first.knobs == {"r": 10}
    saved = json.loads((out / CAPACITY_FILE).read_text())
    assert saved["m"]["matched"]["count"] == 1000 and saved["m"]["fingerprint"]

    class Refuses(LinearCounter):
        def __init__(self, args) -> None:
            raise AssertionError("a cached choice must not build models again")

    assert resolve_matches(grid, out, counter=Refuses)["m"] == first
    methods[1]["overrides"] = {"model.init_args.learning_rate": 0.01}  # another config
    grid = load_grid(write_grid(tmp_path, methods))
    with pytest.raises(AssertionError, match="must not build"):
        resolve_matches(grid, out, counter=Refuses)


def test_plan_carries_the_matched_size_to_every_seed_and_variant(tmp_path: Path) -> None:
    LinearCounter.per = 100
    methods = [
        {"name": "target"},
        {"name": "m", "configs": [LORA], "match": {"method": "target"}},
    ]
    single = {"methods": ["m"], "overrides": {"data.init_args.batch_size": 11}}
    grid = load_grid(write_grid(tmp_path, methods, single_task=single))
    out = tmp_path / "out"
    resolve_matches(grid, out, counter=LinearCounter)  # cached: plan_runs reads it
    specs = [s for s in plan_runs(grid, out) if s.method.startswith("m")]
    assert len(specs) == 2 * 4  # m and its 3 single-task variants, 2 seeds
    for spec in specs:
        assert f"--{ADAPTER}.r=10" in spec.cli_args
        assert f"--{ADAPTER}.lora_alpha=20.0" in spec.cli_args
    # the matched keys come after the method's own overrides: they win
    args = specs[0].cli_args
    assert args.index(f"--{ADAPTER}.r=10") > args.index("--trainer.max_steps=30")

    table = capacity_table(collect(grid, out))
    assert table is not None and table.title == "Capacity matching"
    row = table.rows[0]
    assert row[:3] == ("m", "target", "trainable") and row[3].startswith("r = 10")
    assert row[4:] == (1000.0, 1000.0, 1.0)


def test_match_errors_are_clear(tmp_path: Path) -> None:
    cases = [
        ({"method": "nope"}, "not a method of this grid"),
        ({"method": "m"}, "the method itself"),
        ({"method": "target", "count": "all"}, "count must be one of"),
        ({"method": "target", "range": {"r": [0, 4]}}, "range.r"),
        ({"method": "target", "search": "r", "range": {"n": [1, 2]}}, "does not list"),
        ({"method": "target", "colour": 1}, "unknown key"),
    ]
    for spec, message in cases:
        methods = [{"name": "target"}, {"name": "m", "configs": [LORA], "match": spec}]
        with pytest.raises(GridError, match=message):
            load_grid(write_grid(tmp_path, methods))
    methods = [{"name": "target"}, {"name": "m", "configs": [LORA], "match": {"method": "target"}}]
    methods[1]["match"]["search"] = "warp"
    grid = load_grid(write_grid(tmp_path, methods))
    with pytest.raises(GridError, match="unknown knob 'warp'"):
        match_method(grid, grid.method("m"), counter=LinearCounter)
    fft = {"name": "fft", "configs": [str(ROOT / "configs/baselines/full_finetune.yaml")]}
    fft["match"] = {"method": "target"}
    grid = load_grid(write_grid(tmp_path, [{"name": "target"}, fft]))
    with pytest.raises(GridError, match="cannot be matched"):
        match_method(grid, grid.method("fft"))


def test_model_counter_counts_the_run_model() -> None:
    args = ["--config", str(ROOT / "configs/demo.yaml"), "--config", LORA]
    counter = ModelCounter([*args, f"--{ADAPTER}.r=2"])
    assert counter.count().trainable == 2 * per_rank()
    assert counter.count({"r": 5, "lora_alpha": 10.0}).trainable == 5 * per_rank()


def test_an_unmatchable_grid_ends_the_runner_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GridError of a match found while planning is the user's grid at fault: one line on
    stderr and exit 2, as the runner's other grid errors (not a traceback and exit 1)."""
    from medmoe.experiments.cli import main

    methods = [
        {"name": "med_moe_lora"},
        {
            "name": "vanilla_matched",  # the expert rank alone cannot come within 3%
            "configs": [VANILLA],
            "match": {"method": "med_moe_lora", "search": "expert_rank"},
        },
    ]
    grid = write_grid(tmp_path, methods)
    assert main([str(grid), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'vanilla_matched'" in err[0]
    assert "within 3%" in err[0]
