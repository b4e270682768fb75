"""The multi-GPU configs on CPU: med.yaml's DeepSpeed block and the configs/multi_gpu fragments.

Every config is parsed by the CLI's own parser (``medmoe fit ... --print_config``), which
validates each key against the classes' signatures, and the strategy block is instantiated
as a ``DeepSpeedStrategy`` (constructing it needs deepspeed but no GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from medmoe.cli import main

ROOT = Path(__file__).resolve().parents[1]
MED = ROOT / "configs" / "med.yaml"
FRAGMENTS = ROOT / "configs" / "multi_gpu"
GLOBAL_BATCH = 128  # the paper's (Sec. 4.1)
DEEPSPEED = "medmoe.strategies.DeepSpeedStrategy"
DDP = "lightning.pytorch.strategies.DDPStrategy"

_PRINTED: dict[tuple[Path, ...], dict] = {}


def printed_config(capsys, *configs: Path) -> dict:
    """The config the CLI would run, as ``--print_config`` prints it (cached per stack)."""
    if configs not in _PRINTED:
        args = ["fit"]
        for config in configs:
            args += ["--config", str(config)]
        capsys.readouterr()
        argv, sys.argv = sys.argv, ["medmoe"]  # LightningCLI warns about pytest's own argv
        try:
            with pytest.raises(SystemExit) as exit_info:
                main([*args, "--print_config"])
        finally:
            sys.argv = argv
        assert exit_info.value.code in (0, None)
        out = capsys.readouterr().out
        # deepspeed may log to stdout on import; the config starts at Lightning's header line
        start = out.find("# lightning.pytorch==")
        _PRINTED[configs] = yaml.safe_load(out[start:] if start >= 0 else out)
    return _PRINTED[configs]


def global_batch(config: dict) -> int:
    trainer = config["trainer"]
    return (
        int(trainer["devices"])
        * int(trainer.get("num_nodes") or 1)
        * int(config["data"]["init_args"]["batch_size"])
        * int(trainer.get("accumulate_grad_batches") or 1)
    )


STACKS = {
    "med": (MED,),
    "med+ddp": (MED, FRAGMENTS / "ddp.yaml"),
    "med+deepspeed_zero2": (MED, FRAGMENTS / "deepspeed_zero2.yaml"),
    "med+fsdp2": (MED, FRAGMENTS / "fsdp2.yaml"),
}


@pytest.mark.parametrize("stack", list(STACKS))
def test_configs_parse_with_the_cli_and_keep_the_global_batch_at_128(capsys, stack):
    config = printed_config(capsys, *STACKS[stack])
    trainer = config["trainer"]
    assert trainer["precision"] == "bf16-mixed"
    assert global_batch(config) == GLOBAL_BATCH, (
        f"{stack}: devices {trainer['devices']} x nodes {trainer['num_nodes']} x batch "
        f"{config['data']['init_args']['batch_size']} x accumulate "
        f"{trainer['accumulate_grad_batches']} != {GLOBAL_BATCH}"
    )
    expected = {"med+ddp": DDP, "med+fsdp2": "medmoe.strategies.FSDP2Strategy"}
    assert trainer["strategy"]["class_path"] == expected.get(stack, DEEPSPEED)


def test_med_yaml_global_batch_comment_matches_its_values():
    text = MED.read_text()
    assert "global batch = " in text and "= 128" in text  # the comment beside the values
    raw = yaml.safe_load(text)
    assert global_batch(raw) == GLOBAL_BATCH


@pytest.mark.parametrize("stack", ["med", "med+deepspeed_zero2"])
def test_deepspeed_block_instantiates_zero2_with_adapter_only_checkpoints(capsys, stack):
    pytest.importorskip("deepspeed")
    from medmoe.strategies import DeepSpeedStrategy

    # the init_args the YAML files give (later configs override earlier ones)
    init_args: dict = {}
    for path in STACKS[stack]:
        strategy = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("strategy")
        if strategy:
            assert strategy["class_path"] == DEEPSPEED
            init_args.update(strategy.get("init_args") or {})
    strategy = DeepSpeedStrategy(**init_args)  # no CUDA needed to construct it

    zero = strategy.config["zero_optimization"]
    # gradients accumulate and are reduced in fp32 under bf16 (the routers' and tau's too)
    assert strategy.config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert strategy.config["communication_data_type"] == "fp32"
    assert zero["stage"] == 2 and not strategy.zero_stage_3
    assert strategy.exclude_frozen_parameters is True
    printed = printed_config(capsys, *STACKS[stack])["trainer"]["strategy"]["init_args"]
    assert printed["stage"] == 2 and printed["exclude_frozen_parameters"] is True
    if stack == "med":  # the paper's ZeRO-Offload
        assert zero["offload_optimizer"]["device"] == "cpu"
        assert printed["offload_optimizer"] is True
    else:
        assert "offload_optimizer" not in zero


@pytest.mark.parametrize(
    "stack",
    ["med", "med+deepspeed_zero2"],
)
def test_deepspeed_gets_the_micro_batch_from_the_config(capsys, stack):
    # With logging_batch_size_per_gpu: "auto", DeepSpeedStrategy reads
    # train_dataloader().batch_sampler.batch_size; medmoe's training stream (StreamLoader,
    # batch_size=None) has batch_sampler None, so setup would fail with an AttributeError.
    config = printed_config(capsys, *STACKS[stack])
    init_args = config["trainer"]["strategy"]["init_args"]
    assert init_args["logging_batch_size_per_gpu"] == config["data"]["init_args"]["batch_size"]


def test_ddp_fragment_trains_fp32_adapters_under_bf16_autocast(capsys):
    config = printed_config(capsys, *STACKS["med+ddp"])
    assert config["model"]["init_args"]["torch_dtype"] == "float32"
    assert config["trainer"]["strategy"]["init_args"]["find_unused_parameters"] is False
    # the DeepSpeed-only keys of med.yaml do not leak into the DDP strategy
    assert "stage" not in config["trainer"]["strategy"]["init_args"]


@pytest.mark.parametrize("fragment", sorted(p.name for p in FRAGMENTS.glob("*.yaml")))
def test_fragments_state_the_global_batch_they_configure(fragment):
    text = (FRAGMENTS / fragment).read_text()
    raw = yaml.safe_load(text)
    trainer = raw["trainer"]
    product = int(trainer["devices"]) * int(trainer["num_nodes"]) * 4
    product *= int(trainer["accumulate_grad_batches"])
    assert product == GLOBAL_BATCH
    assert "devices x num_nodes x data.batch_size x accumulate_grad_batches" in text
    assert f"medmoe fit --config configs/med.yaml --config configs/multi_gpu/{fragment}" in text
