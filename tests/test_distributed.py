"""Scale-out on accelerate: two CPU processes (gloo) with batch b train like one process with
batch 2b, evaluate on shards that add up to the whole held-out set, and resume exactly; mixed
precision and gradient checkpointing."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from kmerge.checkpointing import read_state
from kmerge.cli import main
from kmerge.training import train
from tests import kmerge_process
from tests.kmerge_process import assert_same_weights, records
from tests.test_training import small_run


def train_args(base, out, batch: int, *extra) -> list[str]:
    """12 examples: 3 steps an epoch either way, so 4 steps cross an epoch; 7 held-out
    examples, which two processes split 4 + 3."""
    argv = [
        "train", "--base-model", base, "--k", "4", "--steps", "4", "--batch-size", batch,
        "--n-train", "12", "--n-eval", "7", "--eval-every", "2", "--log-every", "1",
        "--lr", "1e-2", "--warmup-steps", "1", "--save-every", "2", "--keep-checkpoints", "2",
        "--output-dir", out, *extra,
    ]  # fmt: skip
    return [str(a) for a in argv]


def test_two_processes_train_like_one_with_twice_the_batch(tiny_dir, tmp_path):
    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "two.log"
    status = kmerge_process.run(train_args(tiny_dir, two, 2, "--num-processes", "2"), log)
    assert status == 0, log.read_text()[-3000:]
    main(train_args(tiny_dir, one, 4))

    losses_one, losses_two = records(one, "loss"), records(two, "loss")
    assert [r["step"] for r in losses_two] == [1, 2, 3, 4]
    for a, b in zip(losses_one, losses_two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)  # one schedule step per step
    evals_one, evals_two = records(one, "eval_accuracy"), records(two, "eval_accuracy")
    assert evals_two == evals_one and len(evals_two) == 2
    summaries = [line for line in log.read_text().splitlines() if line.startswith('{"task"')]
    assert len(summaries) == 1  # reported by the main process only
    assert json.loads(summaries[0])["final_eval"]["n"] == 7  # both shards gathered

    # Every process saved its own RNG states; resuming both from step 2 ends where they did.
    step2 = two / "checkpoints" / "step-00000002"
    assert {p.name for p in step2.glob("random_states_*")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert read_state(step2)["run"]["processes"] == 2
    shutil.copytree(two / "checkpoint", tmp_path / "uninterrupted")
    shutil.rmtree(two / "checkpoints" / "step-00000004")
    argv = train_args(tiny_dir, two, 2, "--num-processes", "2", "--resume")
    assert kmerge_process.run(argv, log) == 0, log.read_text()[-3000:]
    assert_same_weights(tmp_path / "uninterrupted", two / "checkpoint")
    assert records(two, "loss") == losses_two


@pytest.mark.parametrize(
    "name, kind",
    [("ddp", DistributedType.MULTI_GPU), ("deepspeed_zero2", DistributedType.DEEPSPEED)],
)
def test_example_accelerate_configs_load(name, kind):
    """accelerate reads them as they are (it refuses unknown keys); ddp.yaml was also run here,
    on CPU processes (docs/distributed.md)."""
    path = Path(__file__).parents[1] / "examples" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == kind and config.num_processes >= 2


def test_bf16_mixed_precision_trains_and_is_recorded(tiny_dir, tmp_path):
    """On the CPU, the one device here: each process can set its precision only once, so it
    runs in a process of its own."""
    out, log = tmp_path / "run", tmp_path / "run.log"
    argv = train_args(tiny_dir, out, 4, "--mixed-precision", "bf16")
    assert kmerge_process.run(argv, log) == 0, log.read_text()[-3000:]
    assert all(math.isfinite(r["loss"]) for r in records(out, "loss"))
    state = read_state(out / "checkpoints" / "step-00000004")
    assert state["run"]["mixed_precision"] == "bf16"


def train_counting_layer_calls(model, cfg) -> tuple[list[torch.Tensor], int]:
    """Train; return the trained weights and how often the first layer's MLP ran in training
    mode (evaluation runs it too, in eval mode). The MLP's forward is wrapped: module hooks do
    not run when checkpointing recomputes it."""
    mlp, calls = model.lm.model.layers[0].mlp, [0]
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += mlp.training
        return forward(*args, **kwargs)

    mlp.forward = counted
    train(cfg, model=model)
    return [p.detach().clone() for p in model.trainable_parameters()], calls[0]


def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tiny_model, tmp_path):
    runs = [
        train_counting_layer_calls(
            tiny_model(4), small_run(tmp_path, steps=2, output_dir=None, gradient_checkpointing=on)
        )
        for on in (False, True)
    ]
    (plain, plain_calls), (recomputed, recomputed_calls) = runs
    assert (plain_calls, recomputed_calls) == (2, 4)  # each forward pass runs again in backward
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
