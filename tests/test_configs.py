"""Every YAML under configs/ parses through the `medmoe` CLI and selects the intended adapter.

Full configs (demo.yaml, med.yaml) parse alone; fragments (every other YAML under configs/ but
the runner's grids) parse alone and as every `medmoe fit` command their header gives (for the
baselines and ablations: stacked on demo.yaml, the baselines also on med.yaml). Baseline fragments must *replace* the
base config's adapter: jsonargparse keeps every init_args key of the earlier adapter that the new
class also accepts, so a fragment has to spell out all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import re
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml

from medmoe.cli import main
from medmoe.experiments import load_grid

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO = CONFIGS / "demo.yaml"
MED = CONFIGS / "med.yaml"
MOE = "medmoe.adapters.MoELoRAConfig"
BASELINES = {
    "full_finetune.yaml": "medmoe.adapters.baselines.FullFineTune",
    "lora.yaml": "medmoe.adapters.baselines.LoRA",
    "multi_lora.yaml": "medmoe.adapters.baselines.MultiLoRA",
    "vanilla_moe_lora.yaml": MOE,
    "ortho_lora.yaml": "medmoe.adapters.baselines.LoRA",
}
FULL = sorted(CONFIGS.glob("*.yaml"))
GRIDS = sorted(CONFIGS.glob("experiments/*.yaml"))  # runner grids, not CLI configs
# every other YAML under configs/ is a fragment layered on a full config
FRAGMENTS = sorted(p for p in CONFIGS.glob("*/**/*.yaml") if p.parent.name != "experiments")
METHOD_FRAGMENTS = [f for f in FRAGMENTS if f.parent.name in ("baselines", "ablations")]
# Keys a base config sets that the baselines' adapters also accept, set to odd values.
PERTURBED_BASE = """
model:
  class_path: medmoe.model.MedMoEModule
  init_args:
    lambda_kp: 0.7
    gradient_projection: ortho
    adapter:
      class_path: medmoe.adapters.MoELoRAConfig
      init_args:
        target_modules: [q_proj]
        dropout: 0.3
        allocation: bottom_heavy
        top_k: 3
        learn_tau: true
"""


def _name(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def print_config(*configs: Path) -> dict[str, Any]:
    """``medmoe fit --config ... --print_config`` as a dict (it must exit with status 0)."""
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    buffer = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["medmoe"]),
        contextlib.redirect_stdout(buffer),
        pytest.raises(SystemExit) as exit_info,
    ):
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), buffer.getvalue()[-2000:]
    lines = buffer.getvalue().splitlines()
    # libraries may print warnings before the YAML (DeepSpeed's accelerator probe)
    start = next(i for i, line in enumerate(lines) if re.match(r"^(#|[A-Za-z_]+:)", line))
    return yaml.safe_load("\n".join(lines[start:]))


def adapter_of(printed: dict[str, Any]) -> dict[str, Any]:
    return printed["model"]["init_args"]["adapter"]


def declared_adapter(fragment: Path) -> str | None:
    """The adapter class_path the fragment sets, if any."""
    model = (yaml.safe_load(fragment.read_text()) or {}).get("model") or {}
    return ((model.get("init_args") or {}).get("adapter") or {}).get("class_path")


def header_commands(fragment: Path) -> list[list[Path]]:
    """The --config lists of the `medmoe fit` commands in the fragment's opening comment
    (a command may continue on the next comment line after a backslash)."""
    text = []
    for line in fragment.read_text().splitlines():
        if not line.startswith("#"):
            break
        text.append(line.lstrip("#").strip())
    joined = "\n".join(text).replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        if line.startswith("medmoe fit"):
            words = line.split()
            configs = [ROOT / words[i + 1] for i, w in enumerate(words) if w == "--config"]
            commands.append(configs)
    return commands


def _leaves(tree: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """(path, value) of every leaf of a YAML tree; a mapping under layer_ranges is one leaf."""
    if isinstance(tree, dict) and prefix[-1:] != ("layer_ranges",):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, (*prefix, key))]
    return [(prefix, tree)]


def _at(tree: dict[str, Any], path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _same(a: Any, b: Any) -> bool:
    """``a`` (printed) holds what ``b`` (written) says; the printed mappings add defaults."""
    if isinstance(a, dict) and isinstance(b, dict):
        return all(key in a and _same(a[key], value) for key, value in b.items())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def assert_applied(printed: dict[str, Any], fragment: Path) -> None:
    """Every value the fragment sets is the value of the printed (merged) config."""
    for path, value in _leaves(yaml.safe_load(fragment.read_text())):
        assert _same(_at(printed, path), value), (fragment.name, path, _at(printed, path), value)


def test_the_expected_files_exist() -> None:
    assert {p.name for p in CONFIGS.glob("baselines/*.yaml")} == set(BASELINES)
    ablations = {p.stem for p in CONFIGS.glob("ablations/*.yaml")}
    assert {"alloc_uniform", "alloc_bottom_heavy", "alloc_asymmetric"} <= ablations
    assert {"tau_learned", "tau_fixed", "no_base_experts", "base_experts_kp"} <= ablations
    assert {"ranks_mixed", "ranks_equal"} <= ablations


@pytest.mark.parametrize("config", FULL, ids=_name)
def test_full_config_parses_alone(config: Path) -> None:
    printed = print_config(config)
    assert adapter_of(printed)["class_path"] == MOE
    assert printed["data"]["class_path"] == "medmoe.data.MultiTaskDataModule"


@pytest.mark.parametrize("fragment", METHOD_FRAGMENTS, ids=_name)
def test_fragment_opens_with_its_command_and_comments_every_key(fragment: Path) -> None:
    lines = fragment.read_text().splitlines()
    command = f"--config {fragment.relative_to(ROOT)}"
    assert lines[0].startswith("# "), "a fragment opens with a comment"
    assert any(line.startswith("#   medmoe fit") and command in line for line in lines)
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        # every key that carries a value is commented (section keys are self-explanatory)
        key, _, value = stripped.partition(":")
        if value.strip() and key not in ("class_path",):
            assert "#" in value, f"{fragment.name}: uncommented key {stripped!r}"


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=_name)
def test_fragment_parses_alone(fragment: Path) -> None:
    printed = print_config(fragment)
    if declared_adapter(fragment) is not None:
        assert adapter_of(printed)["class_path"] == declared_adapter(fragment)


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=_name)
def test_fragment_stacks_as_its_header_command_says(fragment: Path) -> None:
    """Every `medmoe fit --config ...` command the fragment opens with parses, applies the
    fragment's values and selects the intended adapter (the fragment's, else the base's)."""
    commands = header_commands(fragment)
    assert commands and all(c[-1] == fragment for c in commands), commands
    for configs in commands:
        printed = print_config(*configs)
        expected = declared_adapter(fragment)
        if fragment.parent.name == "baselines":
            assert expected == BASELINES[fragment.name]
        for earlier in reversed(configs[:-1]):
            expected = expected or declared_adapter(earlier)
        assert adapter_of(printed)["class_path"] == (expected or MOE)
        assert_applied(printed, fragment)


@pytest.mark.parametrize(
    "fragment", [f for f in FRAGMENTS if f.parent.name == "baselines"], ids=_name
)
def test_baseline_replaces_the_base_adapter(fragment: Path, tmp_path: Path) -> None:
    """Stacked on demo.yaml and a config whose adapter shares keys with the baseline's, the
    fragment's adapter is exactly its own: nothing of the earlier adapter leaks through."""
    perturbed = tmp_path / "perturbed.yaml"
    perturbed.write_text(PERTURBED_BASE)
    printed = print_config(DEMO, perturbed, fragment)
    adapter = adapter_of(printed)
    assert adapter["class_path"] == BASELINES[fragment.name]
    assert_applied(printed, fragment)
    # the fragment spells out every init_arg of its adapter class
    module, _, name = adapter["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    declared = yaml.safe_load(fragment.read_text())["model"]["init_args"]["adapter"]["init_args"]
    assert {f.name for f in dataclasses.fields(cls)} == set(declared)
    # and the routing / projection settings of the method, whatever the base had
    model = printed["model"]["init_args"]
    expected = "ortho" if fragment.name == "ortho_lora.yaml" else "none"
    assert model["gradient_projection"] == expected
    assert model["lambda_kp"] == 0.0


def test_table3_allocations_give_the_intended_counts() -> None:
    from medmoe.adapters import MoELoRAConfig

    expected = {"alloc_uniform": [4] * 4, "alloc_bottom_heavy": [8, 8, 2, 2]}
    expected["alloc_asymmetric"] = [2, 2, 8, 8]
    demo = yaml.safe_load(DEMO.read_text())["model"]["init_args"]["adapter"]["init_args"]
    for name, counts in expected.items():
        fragment = yaml.safe_load((CONFIGS / "ablations" / f"{name}.yaml").read_text())
        values = {**demo, **fragment["model"]["init_args"]["adapter"]["init_args"]}
        assert MoELoRAConfig(**values).layer_expert_counts(4) == counts, name


@pytest.mark.parametrize("grid", GRIDS, ids=_name)
def test_grid_files_load(grid: Path) -> None:
    loaded = load_grid(grid)
    assert loaded.methods and loaded.seeds
    for path in (*loaded.base, *(c for m in loaded.methods for c in m.configs)):
        assert path.is_file()
    assert loaded.quick().methods


def test_the_console_entry_point_exits_zero(tmp_path):
    import subprocess

    # the installed console script, which exits with what main() returns
    command = [str(Path(sys.executable).parent / "medmoe"), "fit", "--config", "configs/demo.yaml"]
    command += ["--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.logger=false"]
    command += ["--trainer.callbacks=[]", "--trainer.enable_checkpointing=false"]
    command += [f"--trainer.default_root_dir={tmp_path}"]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    assert done.returncode == 0, done.stderr[-2000:]


YAMLS = sorted([*CONFIGS.rglob("*.yaml"), *(ROOT / "callbacks").rglob("*.yaml")])


def uncommented_keys(path: Path) -> list[str]:
    """Keys with a value that carry no comment: neither at the end of their line nor in the
    comment of an enclosing section that names them (``methods:  # rows: name, label, ...``).
    ``class_path`` names itself; the lines of a multi-line string (``>-``) are its value."""
    sections: list[tuple[int, str]] = []  # (indent, comment) of the enclosing keys
    block_indent: int | None = None
    found = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" -"))
        if block_indent is not None and indent > block_indent:
            continue  # a line of a multi-line string
        block_indent = None
        body, _, comment = stripped.partition(" #")
        key, colon, value = body.lstrip("- ").partition(":")
        while sections and sections[-1][0] >= indent:
            sections.pop()
        if not colon:
            continue  # an item of a block list
        value = value.strip()
        if value in (">-", ">", "|", "|-"):
            block_indent = indent
        if not value:
            sections.append((indent, comment))
            continue
        named = any(re.search(rf"\b{re.escape(key)}\b", c) for _, c in sections)
        if not comment and key != "class_path" and not named:
            found.append(f"{path.name}:{number}: {stripped}")
    return found


def test_every_key_of_every_yaml_is_commented() -> None:
    assert len(YAMLS) > 20
    assert [k for path in YAMLS for k in uncommented_keys(path)] == []


def test_the_key_comment_check_finds_an_uncommented_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "a: 1  # fine\nrows:  # each: name\n  - name: x\n    other: 2\ntext: >-  # prose\n"
        "  words: with a colon\n"
    )
    assert uncommented_keys(path) == ["c.yaml:4: other: 2"]
