"""Scale-out on accelerate: two CPU processes (gloo) with batch b train like one process with
batch 2b, evaluate on shards that add up to the whole held-out set, and resume exactly, with
replicated (DDP) and with sharded (FSDP2) weights; mixed precision and gradient
checkpointing."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from kmerge import distributed
from kmerge.checkpointing import read_state
from kmerge.cli import main
from kmerge.distributed import check_sharding, resolve_mixed_precision
from kmerge.errors import KMergeConfigError
from kmerge.evaluation import merge_shards, shard_indices
from kmerge.modeling import KMergeModel
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


EXAMPLES = Path(__file__).parents[1] / "examples" / "accelerate"


def test_fsdp_two_processes_train_like_one_and_export_the_trained_model(tiny_dir, tmp_path):
    """examples/accelerate/fsdp.yaml as it is, on two CPU processes (tests/fsdp_cpu.py: torch's
    FSDP2 over gloo, which accelerate only sets up on GPUs). Each process holds half of every
    weight, so evaluation (7 examples: shards of 4 and 3 + 1 repeat) runs in lockstep."""
    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "two.log"
    launch = [
        "accelerate.commands.launch", "--config_file", EXAMPLES / "fsdp.yaml",
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
        "-m", "tests.fsdp_cpu",
    ]  # fmt: skip
    status = kmerge_process.run(train_args(tiny_dir, two, 2), log, module=launch)
    assert status == 0, log.read_text()[-3000:]
    main(train_args(tiny_dir, one, 4))

    losses_two = records(two, "loss")
    for a, b in zip(records(one, "loss"), losses_two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)
    assert records(two, "eval_accuracy") == records(one, "eval_accuracy")
    step4 = two / "checkpoints" / "step-00000004"
    assert (step4 / "pytorch_model_fsdp_0").is_dir()  # the shards accelerate restores
    assert_same_weights(step4 / "model", two / "checkpoint")  # both gathered from the shards

    # The export is the trained model: it loads and gives one process's loss.
    prompts, answers = ["a tree: 1 -> 2, 2 -> 3. Root?", "x y z w v u"], ["1", "u"]
    losses = [
        KMergeModel.from_pretrained(run / "checkpoint")(prompts, answers).loss.item()
        for run in (one, two)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)

    # Resuming from the step-2 shards ends with exactly the uninterrupted weights.
    shutil.copytree(two / "checkpoint", tmp_path / "uninterrupted")
    shutil.rmtree(step4)
    status = kmerge_process.run(train_args(tiny_dir, two, 2, "--resume"), log, module=launch)
    assert status == 0, log.read_text()[-3000:]
    assert_same_weights(tmp_path / "uninterrupted", two / "checkpoint")
    assert records(two, "loss") == losses_two


def test_padded_shards_gather_to_the_single_process_result():
    """Uneven shards are padded to one length (every process runs the same batches) and the
    repeats are dropped when the records are gathered."""
    for n, processes in [(7, 3), (8, 3), (9, 3), (2, 3), (5, 1)]:
        records_of = {i: {"example": i} for i in range(n)}
        shards = [shard_indices(n, rank, processes) for rank in range(processes)]
        assert len({len(shard) for shard in shards}) == 1
        gathered = [(i, records_of[i]) for shard in shards for i in shard]  # in rank order
        assert merge_shards(gathered) == [records_of[i] for i in range(n)]
    assert shard_indices(7, 1, 3) == [3, 4, 4]


@pytest.mark.parametrize(
    "fsdp_version, zero_stage, refused",
    [(1, None, "FSDP version 1 is not supported"), (None, 3, "DeepSpeed ZeRO-3 is not supported")],
)
def test_unsupported_sharding_is_refused(fsdp_version, zero_stage, refused):
    fsdp = SimpleNamespace(fsdp_version=fsdp_version) if fsdp_version else None
    deepspeed = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    kind = DistributedType.FSDP if fsdp else DistributedType.DEEPSPEED
    accelerator = SimpleNamespace(
        distributed_type=kind, state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=deepspeed)
    )
    with pytest.raises(KMergeConfigError, match=refused):
        check_sharding(accelerator)


@pytest.mark.parametrize(
    "name, kind",
    [
        ("ddp", DistributedType.MULTI_GPU),
        ("fsdp", DistributedType.FSDP),
        ("deepspeed_zero2", DistributedType.DEEPSPEED),
    ],
)
def test_example_accelerate_configs_load(name, kind):
    """accelerate reads them as they are (it refuses unknown keys); ddp.yaml and fsdp.yaml were
    also run here, on CPU processes (docs/distributed.md)."""
    path = EXAMPLES / f"{name}.yaml"
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


CPU_BF16 = [(True, False, "bf16"), (False, True, "bf16"), (False, False, "no")]


@pytest.mark.parametrize("avx512_bf16, amx, expected", CPU_BF16)
def test_auto_precision_is_bf16_only_on_a_cpu_that_has_it(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "gpu_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_mixed_precision("auto") == expected
    assert [resolve_mixed_precision(p) for p in ("no", None)] == ["no", None]
    # An explicit bf16 is kept either way, with a warning only where it would be emulated.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_mixed_precision("bf16") == "bf16"
    warned = [w for w in caught if "without native bf16" in str(w.message)]
    assert len(warned) == (0 if expected == "bf16" else 1)


def test_bf16_reaches_the_distillers_forward_passes(tiny_dir, tmp_path):
    """With a teacher the trainer calls the unwrapped model, whose forward accelerate does not
    wrap in autocast: the first step's losses (same weights, same batch) must still come out
    of bf16 arithmetic, near the fp32 ones but not equal to them."""
    first = {}
    for precision in ("no", "bf16"):
        out, log = tmp_path / precision, tmp_path / f"{precision}.log"
        extra = ("--teacher", "base", "--distill-prompt-weight", "1", "--mixed-precision")
        argv = train_args(tiny_dir, out, 4, *extra, precision)
        assert kmerge_process.run(argv, log) == 0, log.read_text()[-3000:]
        first[precision] = records(out, "loss")[0]
    for key in ("loss", "distill_prompt"):
        fp32, bf16 = first["no"][key], first["bf16"][key]
        assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05), (key, fp32, bf16)


def test_distillation_on_two_processes_trains_like_gradient_accumulation_in_one(tiny_dir, tmp_path):
    """The distiller calls the unwrapped model, so DDP does not sync its gradients; the trainer
    averages them itself, match-only warm-up steps (layers without gradients) included. Two
    processes with batch 2 see the micro-batches one process sees with batch 2 and two
    accumulation steps, and must take the same steps."""
    extra = ("--teacher", "base", "--distill-prompt-weight", "1", "--distill-prompt-layers", "1",
             "--distill-match-warmup", "0.5", "--encoder-lr", "3e-3")  # fmt: skip
    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "two.log"
    status = kmerge_process.run(train_args(tiny_dir, two, 2, *extra, "--num-processes", "2"), log)
    assert status == 0, log.read_text()[-3000:]
    main(train_args(tiny_dir, one, 2, *extra, "--grad-accum", "2"))

    def steps(run: Path) -> list[dict]:
        rows = records(run, "lr")
        return [{k: v for k, v in r.items() if k != "teacher_seconds"} for r in rows]

    first, second = steps(one), steps(two)
    assert [("match_loss" in r, "loss" in r) for r in second] == [(True, False)] * 2 + [
        (False, True)
    ] * 2  # two match-only steps, then two task steps
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-5, abs=1e-7)
            assert b[key] == expected, (a["step"], key)
    weights_one = kmerge_process.trainable_weights(one / "checkpoint")
    weights_two = kmerge_process.trainable_weights(two / "checkpoint")
    for name, w in weights_one.items():
        assert torch.allclose(weights_two[name], w, rtol=1e-4, atol=1e-6), name


def test_distillation_is_refused_where_the_engine_owns_the_gradients(tiny_dir, tmp_path):
    launch = [
        "accelerate.commands.launch", "--config_file", EXAMPLES / "fsdp.yaml",
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
        "-m", "tests.fsdp_cpu",
    ]  # fmt: skip
    log = tmp_path / "fsdp.log"
    argv = train_args(tiny_dir, tmp_path / "out", 2, "--teacher", "base")
    assert kmerge_process.run(argv, log, module=launch) != 0
    assert "distillation (a teacher) trains in one process or on replicated weights" in (
        log.read_text()
    )


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
