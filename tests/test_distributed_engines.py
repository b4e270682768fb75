"""medmoe's DeepSpeed and FSDP2 strategies on real engines: 2 CPU processes, gloo (DeepSpeed's CPU
accelerator; FSDP2 through Lightning's ModelParallelStrategy).

Each run is ``tests/distributed_run.py`` (or the ``medmoe`` CLI with the rehearsal fragment) in a
subprocess, so ``deepspeed.initialize``, ZeRO-2's gradient partitioning and reduction,
``fully_shard``'s all-gathers and reduce-scatters, their checkpoints and Lightning's launcher
really run. The equivalence rows compare, on the same seeds and data, ZeRO-2 and FSDP2 against
Lightning's DDP and against one process with twice the accumulation.

Tolerances (measured on the 2-core CPU machine, with margin):
- fp32 ZeRO-2 and FSDP2 vs DDP vs one process: per-step losses and logged gradient norms to 1e-6
  relative, final adapter tensors to 1e-6 absolute (measured: ZeRO-2 8e-8, FSDP2 8e-8, one
  process 2.3e-7);
- ZeRO-Offload with DeepSpeed's CPU Adam vs ZeRO-2 with torch's AdamW: 1e-6 / 1e-5 (3.7e-6);
- bf16-mixed vs fp32, ZeRO-2 and FSDP2 alike: losses 1e-3 and gradient norms 1e-2 relative
  (1.3e-4, 2e-3); the final
  adapter tensors differ from fp32 by at most 15% of how far training moved them, in norm
  (measured 7.4% after 3 Adam steps at lr 1e-2: Adam turns tiny gradient differences into full steps).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import distributed_run  # noqa: E402
from conftest import process_alive  # noqa: E402

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "distributed_run.py"
WORLD = 2
STEP = ("--max-steps", "3", "--accumulate", "2", "--clip", "1.0", "--precision", "32-true")


def _env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _launch(out: Path, *args: str, devices: int = WORLD, timeout: float = 600):
    """Run the driver; returns the finished process (stdout + stderr in ``.stdout``)."""
    command = [sys.executable, str(SCRIPT), str(out), "--devices", str(devices), *args]
    return subprocess.run(
        command, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _run(out: Path, *args: str, devices: int = WORLD, timeout: float = 600) -> list[dict]:
    result = _launch(out, *args, devices=devices, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def _step_losses(ranks: list[dict]) -> dict[int, float]:
    """The token-mean task loss of every optimizer step, over all micro-batches and ranks.

    A micro-batch's logged loss is its step-token objective over ``accumulate`` (Lightning's
    division), ``sum(token losses) * world / step tokens``: summed over the step's micro-batches
    of every rank and divided by the world size it is the step's token mean.
    """
    sums: dict[int, float] = defaultdict(float)
    for record in ranks:
        for step, loss in record["losses"]:
            sums[step] += loss / len(ranks)
    return dict(sorted(sums.items()))


def _grad_norms(out: Path) -> list[float]:
    import csv

    with open(out / "log" / "version_0" / "metrics.csv") as fh:
        return [float(r["train/grad_norm"]) for r in csv.DictReader(fh) if r["train/grad_norm"]]


def _assert_close(got: dict | list, want: dict | list, rtol: float) -> None:
    assert len(got) == len(want) and len(want) > 0
    if isinstance(got, dict):
        assert list(got) == list(want)
        got, want = list(got.values()), list(want.values())
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=rtol)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    root = tmp_path_factory.mktemp("ds_equivalence")
    runs = {}
    for name, args, devices in (
        ("ddp", ("--strategy", "ddp"), WORLD),
        ("zero2", ("--strategy", "deepspeed"), WORLD),
        ("fsdp2", ("--strategy", "fsdp2"), WORLD),
        ("single", ("--accumulate", "4"), 1),
    ):
        out = root / name
        runs[name] = (out, _run(out, *STEP, *args, devices=devices))
    return runs


def test_deepspeed_initialize_crashes_on_a_0dim_parameter_and_runs_the_moe_lora_layer(tmp_path):
    """The finding behind the fix: DeepSpeed byte-views every parameter when it broadcasts the
    model, which a 0-dim tensor (``log_tau`` until it became [1]) cannot do."""
    script = tmp_path / "init.py"
    script.write_text(
        "import sys, torch, deepspeed\n"
        "from torch import nn\n"
        "from medmoe.adapters.moe_lora import MoELoRALinear\n"
        "layer = MoELoRALinear(nn.Linear(8, 8), [2, 2])\n"
        "if sys.argv[1] == 'scalar':\n"
        "    layer.log_tau = nn.Parameter(layer.log_tau.detach().reshape(()))\n"
        "deepspeed.init_distributed('gloo')\n"
        "trained = [p for p in layer.parameters() if p.requires_grad]\n"
        # torch's AdamW as the client optimizer, as Lightning passes it: a config "optimizer"
        # would make DeepSpeed JIT-compile its fused Adam, minutes of g++ unrelated to the finding
        "deepspeed.initialize(model=layer, optimizer=torch.optim.AdamW(trained, lr=1e-3),"
        " config={'train_micro_batch_size_per_gpu': 1, 'zero_allow_untested_optimizer': True,"
        " 'zero_optimization': {'stage': 2}})\n"
        "print('initialized', tuple(layer.log_tau.shape))\n"
    )
    single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    results = {
        # a fresh port each: the crashed run's store and shared-memory names are keyed on it
        kind: subprocess.run(
            [sys.executable, str(script), kind],
            env={**_env(), **single},
            capture_output=True,
            text=True,
            timeout=600,  # a loaded 2-core machine
        )
        for kind in ("scalar", "layer")
    }
    assert results["scalar"].returncode != 0
    assert "cannot be 0" in results["scalar"].stderr  # "self.dim() cannot be 0 to view ..."
    assert results["layer"].returncode == 0, results["layer"].stderr[-2000:]
    assert "initialized (1,)" in results["layer"].stdout


@pytest.mark.parametrize("engine", ["zero2", "fsdp2"])
def test_engine_equals_ddp_and_one_process_with_twice_the_accumulation(runs, engine):
    ddp, sharded, single = (runs[k][1] for k in ("ddp", engine, "single"))
    losses = _step_losses(ddp)
    assert sorted(losses) == [1, 2, 3]
    _assert_close(_step_losses(sharded), losses, 1e-6)
    _assert_close(_step_losses(single), losses, 1e-6)
    # the logged gradient norm (before clipping at 1.0) of every step: the loss is scaled for
    # accumulation once (a second division would give half of it)
    norms = _grad_norms(runs["ddp"][0])
    assert len(norms) == 3
    _assert_close(_grad_norms(runs[engine][0]), norms, 1e-6)
    _assert_close(_grad_norms(runs["single"][0]), norms, 1e-6)
    for other in (sharded, single):
        for name, tensor in ddp[0]["final"].items():
            torch.testing.assert_close(other[0]["final"][name], tensor, rtol=0, atol=1e-6)
    # every rank ends with the same whole adapter
    for name, tensor in sharded[0]["final"].items():
        assert torch.equal(sharded[1]["final"][name], tensor), name


def test_zero_offload_with_cpu_adam_equals_zero2_with_adamw(runs, tmp_path):
    # the first use compiles DeepSpeed's CPU Adam with g++ (~2 min on 2 cores, then cached)
    offload = _run(tmp_path, *STEP, "--strategy", "deepspeed", "--offload", timeout=600)
    zero2_out, zero2 = runs["zero2"]
    _assert_close(_step_losses(offload), _step_losses(zero2), 1e-6)
    _assert_close(_grad_norms(tmp_path), _grad_norms(zero2_out), 1e-6)
    for name, tensor in zero2[0]["final"].items():
        torch.testing.assert_close(offload[0]["final"][name], tensor, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("engine", "strategy"), [("zero2", "deepspeed"), ("fsdp2", "fsdp2")])
def test_bf16_mixed_keeps_the_adapter_in_fp32_and_follows_the_fp32_run(
    runs, tmp_path, engine, strategy
):
    args = [a if a != "32-true" else "bf16-mixed" for a in STEP]
    bf16 = _run(tmp_path, *args, "--strategy", strategy)
    fp32_out, fp32 = runs[engine]
    # autocast, not DeepSpeed's bf16 or an FSDP2 param_dtype: factors, routers, log tau stay fp32
    assert {str(d) for d in bf16[0]["dtypes"].values()} == {"torch.float32"}
    _assert_close(_step_losses(bf16), _step_losses(fp32), 1e-3)
    _assert_close(_grad_norms(tmp_path), _grad_norms(fp32_out), 1e-2)
    initial = torch.load(fp32_out / "init.pt", weights_only=False)
    moved = sum((fp32[0]["final"][n] - initial[n].float()).norm() ** 2 for n in initial) ** 0.5
    apart = sum((bf16[0]["final"][n] - fp32[0]["final"][n]).norm() ** 2 for n in initial) ** 0.5
    assert apart < 0.15 * moved  # measured 7.4%: Adam normalises tiny gradients to full steps


CHECKPOINTED = ("--max-steps", "4", "--dropout", "0.2", "--precision", "32-true")


@pytest.fixture(scope="module", params=["deepspeed", "fsdp2"])
def checkpointed(request, tmp_path_factory) -> tuple[str, Path, list[dict]]:
    out = tmp_path_factory.mktemp(f"{request.param}_checkpointed")
    args = (*CHECKPOINTED, "--checkpoint-every", "2", "--strategy", request.param)
    return request.param, out, _run(out, *args)


def _adapter_bytes() -> tuple[int, int]:
    """fp32 bytes of the driver's frozen base and of its adapter."""
    module = distributed_run.make_module(distributed_run.make_data(), ortho=False, dropout=0.0)
    module.configure_model()
    frozen = sum(p.numel() * 4 for p in module.model.parameters() if not p.requires_grad)
    adapter = sum(p.numel() * 4 for p in module.model.parameters() if p.requires_grad)
    return frozen, adapter


def test_the_checkpoint_holds_the_adapter_and_optimizer_shards_only(checkpointed):
    engine, out, _ = checkpointed
    checkpoint = out / "ckpt" / "epoch=0-step=4.ckpt"
    assert checkpoint.is_symlink()  # published whole (medmoe.strategies.publish_directory)
    frozen, adapter = _adapter_bytes()
    if engine == "fsdp2":
        from torch.distributed.checkpoint import FileSystemReader

        files = sorted(p.name for p in checkpoint.iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
        module = distributed_run.make_module(distributed_run.make_data(), False, 0.0)
        module.configure_model()
        keep = module.trainable_state_keys()
        stored = FileSystemReader(str(checkpoint)).read_metadata().storage_data
        model_items = [
            (i.fqn, info.length) for i, info in stored.items() if i.fqn[:11] == "state_dict."
        ]
        # the adapter's tensors only, each written whole across the ranks' files; every item is
        # its tensor's bytes plus torch.save's framing (< 2 KiB); no key of the frozen base
        assert {fqn[len("state_dict.") :] for fqn, _ in model_items} == keep
        assert sum(length for _, length in model_items) < adapter + 2048 * len(model_items)
        return
    files = {p.name: p.stat().st_size for p in (checkpoint / "checkpoint").iterdir()}
    assert sorted(files) == [
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # module states: the fp32 adapter plus Lightning's state, never the frozen base
    assert adapter < files["mp_rank_00_model_states.pt"] < adapter + min(frozen, 200_000)
    # each optimizer shard: half of (fp32 master + Adam's two moments) of the adapter
    for rank in range(WORLD):
        shard = files[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        assert shard < 3 * adapter / WORLD + 100_000


def test_zero_to_adapter_gives_an_adapter_load_adapted_reproduces(checkpointed, tmp_path):
    from medmoe.adapters import load_adapter
    from medmoe.zero_to_adapter import main as zero_to_adapter

    _, out, ranks = checkpointed  # one converter for both engines' checkpoints
    assert zero_to_adapter([str(out / "ckpt" / "epoch=0-step=4.ckpt"), str(tmp_path)]) == 0
    torch.manual_seed(0)
    module = distributed_run.make_module(distributed_run.make_data(), ortho=False, dropout=0.2)
    module.configure_model()  # the same seeded tiny base the run started from
    base = module.model
    initial = torch.load(out / "init.pt", weights_only=False)
    frozen = {n: p for n, p in base.named_parameters() if not p.requires_grad}
    assert frozen and not set(frozen) & set(initial)
    load_adapter(base, tmp_path)
    base.eval()
    batch = ranks[0]["batches"][0]
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, torch.load(out / "logits.pt"), rtol=0, atol=1e-5)


def test_resume_from_a_checkpoint_continues_the_uninterrupted_run(checkpointed, tmp_path):
    engine, out, uninterrupted = checkpointed
    step2 = str(out / "ckpt" / "epoch=0-step=2.ckpt")
    resumed = _run(tmp_path, *CHECKPOINTED, "--strategy", engine, "--resume", step2)
    for rank in range(WORLD):
        full, again = dict(uninterrupted[rank]["losses"]), dict(resumed[rank]["losses"])
        assert sorted(again) == [3, 4]
        # the data position and this rank's dropout stream continue where they stopped
        assert torch.equal(
            resumed[rank]["batches"][0]["input_ids"], uninterrupted[rank]["batches"][2]["input_ids"]
        )
        for step in (3, 4):
            assert again[step] == pytest.approx(full[step], rel=1e-6), (rank, step)
        for name, tensor in uninterrupted[rank]["final"].items():
            torch.testing.assert_close(resumed[rank]["final"][name], tensor, rtol=0, atol=1e-6)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path):
    from medmoe.zero_to_adapter import main as zero_to_adapter

    args = ("--strategy", "deepspeed", "--precision", "32-true", "--max-steps", "4")
    result = _launch(tmp_path, *args, "--rolling-every", "2", "--kill-during-save", "2")
    assert result.returncode != 0  # rank 0 was killed in its second save (step 4)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink() and (last / "latest").read_text() == "checkpoint"
    states = torch.load(
        last / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu"
    )
    assert states["global_step"] == 2  # the first save's checkpoint, complete
    assert zero_to_adapter([str(last), str(tmp_path / "adapter")]) == 0


def _one_line_reason(output: str, expected: str) -> None:
    lines = [line for line in output.splitlines() if expected in line]
    assert lines, output[-3000:]


@pytest.mark.parametrize(
    ("fault", "expected"),
    [("--nan-at", "training loss is"), ("--fail-at", "is malformed (planted fault)")],
)
def test_a_fault_on_one_rank_ends_both_ranks_within_60_s(tmp_path, fault, expected):
    args = ("--strategy", "deepspeed", "--precision", "32-true", "--max-steps", "6")
    start = time.monotonic()
    result = _launch(tmp_path, *args, fault, "1:2", timeout=600)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 60, elapsed
    _one_line_reason(result.stdout + result.stderr, expected)
    if fault == "--nan-at":
        # rank 0 stops on its own check, at the same step, not by losing its peer: the reduced
        # check that also ends an NCCL run (whose collectives would wait 30 minutes instead)
        _one_line_reason(result.stdout + result.stderr, "[rank0]: FloatingPointError: another rank")
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()


def test_ortho_lora_is_refused_under_deepspeed_naming_why(tmp_path):
    result = _launch(tmp_path, "--strategy", "deepspeed", "--precision", "32-true", "--ortho")
    assert result.returncode != 0
    _one_line_reason(
        result.stdout + result.stderr, "gradient_projection='ortho' does not work under the"
    )


@pytest.mark.parametrize("method", ["multi_lora", "full"])
def test_multi_lora_and_full_fine_tuning_train_under_zero2(tmp_path, method):
    ranks = _run(tmp_path, "--strategy", "deepspeed", "--precision", "32-true", "--method", method)
    assert sorted(_step_losses(ranks)) == [1]
    for name, tensor in ranks[0]["final"].items():
        assert torch.equal(ranks[1]["final"][name], tensor), name


# --------------------------------------------------------------------------- the CLI rehearsal
STACKS = {
    "deepspeed": ("configs/med.yaml", "configs/rehearsal/cpu.yaml"),
    "fsdp2": ("configs/med.yaml", "configs/multi_gpu/fsdp2.yaml", "configs/rehearsal/cpu.yaml"),
}


def _cli(tmp_path: Path, stack: str, *args: str, **popen) -> subprocess.Popen:
    configs = [word for config in STACKS[stack] for word in ("--config", config)]
    command = [sys.executable, "-m", "medmoe", "fit", *configs, *args]
    command += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    return subprocess.Popen(command, env=_env(), cwd=ROOT, text=True, **popen)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


def _checkpoint_step(checkpoint: Path) -> int:
    """The global step a DeepSpeed or sharded (FSDP2) checkpoint directory was written at."""
    lightning_state = checkpoint / "meta.pt"
    if not lightning_state.is_file():
        lightning_state = checkpoint / "checkpoint" / "mp_rank_00_model_states.pt"
    return torch.load(lightning_state, weights_only=False, map_location="cpu")["global_step"]


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_sigterm_to_the_launcher_leaves_a_resumable_checkpoint_and_exit_143(tmp_path, stack):
    with open(tmp_path / "run.log", "w") as log:
        process = _cli(
            tmp_path, stack, "--trainer.max_steps", "400", stdout=log, stderr=subprocess.STDOUT
        )
    version = tmp_path / "rehearsal" / "version_0"
    last = version / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 400
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the first rolling checkpoint (step 8) is written
    assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    ranks = [process.pid, *_children(process.pid)]
    process.send_signal(signal.SIGTERM)
    start = time.monotonic()
    assert process.wait(timeout=60) == 143
    while any(process_alive(pid) for pid in ranks) and time.monotonic() - start < 60:
        time.sleep(0.5)
    assert not any(process_alive(pid) for pid in ranks), "a rank outlived the launcher by 60 s"
    stopped_at = _checkpoint_step(last)
    assert 8 <= stopped_at < 400
    # the checkpoint resumes: two more steps to the end
    with open(tmp_path / "resume.log", "w") as log:
        resumed = _cli(
            tmp_path,
            stack,
            "--trainer.max_steps",
            str(stopped_at + 2),
            "--ckpt_path",
            str(last),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    # the resumed run (a new log version) ends by exporting the adapter
    assert list((tmp_path / "rehearsal").glob("version_*/adapter/adapter_model.safetensors"))
