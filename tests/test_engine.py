"""The training engine: learning, exact resume, interruption, divergence, OOM, precision, DDP."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_training import ToyModel, toy_data, toy_fit, toy_loss, toy_validate, toy_windows

from trecsys.config import TrainConfig
from trecsys.errors import ArtifactError, DivergedError, InterruptedRun, OutOfMemoryError
from trecsys.model.checkpoint import WEIGHTS
from trecsys.train.engine import (
    LAST,
    LOG,
    STATE,
    Trainer,
    epoch_batches,
    lr_at,
    make_optimizer,
    read_log,
    shard,
)

REPO = Path(__file__).resolve().parents[1]


def small_cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, batch_size=16, lr=0.01, warmup_fraction=0.1, patience=0)
    base.update(kw)
    return TrainConfig(**base)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_epoch_batches_cover_each_example_once_from_one_group_and_repeat_by_seed():
    groups = np.array([0] * 37 + [1] * 20)
    members = [np.flatnonzero(groups == g) for g in (0, 1)]
    batches = epoch_batches(members, batch_size=8, seed=3, epoch=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(57))
    assert all(len(set(groups[b])) == 1 for b in batches)
    assert max(len(b) for b in batches) <= 8 and min(len(b) for b in batches) >= 6  # no tiny tail batch
    again = epoch_batches(members, batch_size=8, seed=3, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again, strict=True))
    other = epoch_batches(members, batch_size=8, seed=3, epoch=2)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other, strict=True))
    # A group smaller than processes x accumulation steps cannot feed every micro-batch: left out.
    assert len(epoch_batches([np.arange(3), np.arange(3, 40)], 8, 0, 0, min_size=4)) == 5


def test_shards_partition_the_global_batch_in_the_same_order_for_any_split():
    batch = np.arange(10)
    two_ranks = [m for r in range(2) for m in shard(batch, r, 2, 1)]
    two_accum = shard(batch, 0, 1, 2)
    assert [m.tolist() for m in two_ranks] == [m.tolist() for m in two_accum]
    assert np.array_equal(np.concatenate(two_ranks), batch)


def test_lr_warms_up_then_decays_by_cosine_to_the_floor():
    cfg = small_cfg(lr=1.0, warmup_fraction=0.1, min_lr_fraction=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = ToyModel()
    opt = make_optimizer(model, small_cfg(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert decayed == {id(model.head.weight)}
    assert opt.param_groups[1]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------
# Training


def test_loss_decreases_and_the_log_and_best_checkpoint_are_written(tmp_path):
    model, result = toy_fit(tmp_path, small_cfg(epochs=6))
    log = list(read_log(tmp_path / LOG))
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    assert log[-1]["valid"]["hit@10"] > 0.8
    assert {"step", "lr", "sequences_per_s", "elapsed_s"} <= log[0].keys()
    assert result.stopped == "completed" and result.steps == 6 * 6
    assert result.best_metrics["hit@10"] == max(r["valid"]["hit@10"] for r in log)
    assert (tmp_path / "best" / WEIGHTS).is_file()
    state = torch.load(tmp_path / LAST / STATE, weights_only=True)
    assert state["step"] == 36 and state["epoch"] == 6


def test_cpu_training_is_deterministic_given_the_seed(tmp_path):
    a, _ = toy_fit(tmp_path / "a", small_cfg(epochs=1))
    b, _ = toy_fit(tmp_path / "b", small_cfg(epochs=1))
    assert_same_weights(a, b)


def test_early_stopping_after_patience_validations_without_improvement(tmp_path):
    # lr so small the hit rate never moves: every validation after the first is "no better".
    _, result = toy_fit(tmp_path, small_cfg(epochs=10, lr=1e-9, patience=2))
    assert result.stopped == "early_stop"
    assert result.steps == 3 * 6 and result.best_step == 6


def test_resume_after_max_steps_gives_bit_identical_weights(tmp_path):
    full, _ = toy_fit(tmp_path / "full", small_cfg())
    _, cut = toy_fit(tmp_path / "cut", small_cfg(max_steps=8))  # mid-epoch 2
    assert cut.stopped == "max_steps" and cut.steps == 8
    resumed, result = toy_fit(tmp_path / "cut", small_cfg(), resume=True)
    assert result.steps == 18 and result.stopped == "completed"
    assert_same_weights(full, resumed)


def test_sigint_saves_last_and_resume_continues_exactly(tmp_path):
    full, _ = toy_fit(tmp_path / "full", small_cfg(), dropout=0.3)
    calls = {"n": 0}

    def interrupting_loss(model, batch):
        calls["n"] += 1
        if calls["n"] == 10:  # during step 10: the step must still finish before stopping
            os.kill(os.getpid(), signal.SIGINT)
        return toy_loss(model, batch)

    with pytest.raises(InterruptedRun, match="SIGINT after step 10") as exc:
        toy_fit(tmp_path / "cut", small_cfg(), dropout=0.3, loss_fn=interrupting_loss)
    assert exc.value.exit_code == 130
    assert torch.load(tmp_path / "cut" / LAST / STATE, weights_only=True)["step"] == 10
    resumed, _ = toy_fit(tmp_path / "cut", small_cfg(), dropout=0.3, resume=True)
    assert_same_weights(full, resumed)
    # Lines logged by the interrupted run after its checkpoint are not repeated.
    steps = [r["step"] for r in read_log(tmp_path / "cut" / LOG)]
    assert steps == sorted(set(steps))


def test_resume_refuses_a_changed_config_and_a_missing_state(tmp_path):
    toy_fit(tmp_path, small_cfg(max_steps=3))
    with pytest.raises(ArtifactError, match=r"'train\.lr' was 0\.01 there and is 0\.02 now"):
        toy_fit(tmp_path, small_cfg(lr=0.02), resume=True)
    with pytest.raises(ArtifactError, match="nothing to resume"):
        toy_fit(tmp_path / "empty", small_cfg(), resume=True)


def test_nan_loss_raises_diverged_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def exploding_loss(model, batch):
        calls["n"] += 1
        loss = toy_loss(model, batch)
        return loss * math.nan if calls["n"] >= 5 else loss

    with pytest.raises(DivergedError, match=r"diverged at step 5 \(lr [0-9.e-]+\).*last good checkpoint") as exc:
        toy_fit(tmp_path, small_cfg(checkpoint_every_steps=1), loss_fn=exploding_loss)
    assert exc.value.exit_code == 4
    assert torch.load(tmp_path / LAST / STATE, weights_only=True)["step"] == 4
    weights = load_file(str(tmp_path / LAST / WEIGHTS))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_out_of_memory_names_the_batch_size_key(tmp_path):
    def oom_loss(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

    with pytest.raises(OutOfMemoryError, match=r"lower 'train\.batch_size' \(now 16\)") as exc:
        toy_fit(tmp_path, small_cfg(), loss_fn=oom_loss)
    assert exc.value.exit_code == 5


def _devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_train(tmp_path, device, precision):
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    from trecsys.train.engine import Dist

    model, result = toy_fit(tmp_path, small_cfg(epochs=4, precision=precision),
                            dist=Dist(device=torch.device(device)))
    log = list(read_log(tmp_path / LOG))
    assert result.precision == precision
    assert all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["loss"] < log[0]["loss"]
    if precision == "fp16":  # the loss scale is saved for an exact resume
        assert torch.load(tmp_path / LAST / STATE, weights_only=True)["scaler"]["scale"] > 0


def test_batches_and_data_order_do_not_depend_on_the_micro_batch_split(tmp_path):
    # Same global batch, two accumulation steps: same loss trajectory as one step (float rounding aside).
    one, _ = toy_fit(tmp_path / "one", small_cfg(), dropout=0.0)
    two, _ = toy_fit(tmp_path / "two", small_cfg(grad_accum_steps=2), dropout=0.0)
    for (k, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), k


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    script = str(REPO / "tests" / "toy_training.py")
    one = tmp_path / "one"
    subprocess.run([sys.executable, script, str(one)], check=True, env=env, timeout=120)
    two = tmp_path / "two"
    # --standalone: torchrun picks a free port itself, so no other test or process can hold it.
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, str(two)], env=env, timeout=180, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    log_one, log_two = list(read_log(one / LOG)), list(read_log(two / LOG))
    assert len(log_one) == len(log_two) == 2
    for a, b in zip(log_one, log_two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    w1, w2 = load_file(str(one / WEIGHTS)), load_file(str(two / WEIGHTS))
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-5), k


# ---------------------------------------------------------------------------------------------
# The Trainer's parts, each alone


def toy_trainer(work_dir, **kw) -> Trainer:
    torch.manual_seed(0)
    return Trainer(ToyModel(0.0), toy_data(toy_windows()), toy_loss, toy_validate, small_cfg(**kw), work_dir,
                   seed=0, monitor="hit@10")


def test_trainer_step_moves_the_weights_by_one_scheduled_optimizer_step(tmp_path):
    trainer = toy_trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    batch = np.arange(16)
    result = trainer.step(batch)
    assert trainer.progress.step == 1 and result.n_terms == int(trainer.data.n_terms[batch].sum())
    assert result.lr == lr_at(0, trainer.total_steps, trainer.cfg) and not result.stop_now
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert trainer.window.terms == result.n_terms and trainer.window.loss == result.loss_sum
    assert not (tmp_path / LAST).exists() and not (tmp_path / LOG).exists()  # a step writes nothing


def test_trainer_validate_keeps_the_best_and_counts_validations_without_improvement(tmp_path):
    trainer = toy_trainer(tmp_path, patience=2)
    metrics, stop = trainer.validate()
    assert not stop and trainer.progress.best_metrics == metrics and (tmp_path / "best" / WEIGHTS).is_file()
    assert trainer.validate() == (metrics, False) and trainer.progress.bad_evals == 1  # the same weights
    assert trainer.validate()[1]  # patience 2 ran out
    assert trainer.model.training


def test_trainer_save_writes_a_last_checkpoint_that_a_new_trainer_resumes(tmp_path):
    trainer = toy_trainer(tmp_path)
    trainer.step(np.arange(16))
    trainer.save()
    assert (tmp_path / LAST / WEIGHTS).is_file() and (tmp_path / LAST / STATE).is_file()
    resumed = Trainer(ToyModel(0.0), trainer.data, toy_loss, toy_validate, trainer.cfg, tmp_path, seed=0,
                      monitor="hit@10", resume=True)
    assert resumed.progress.step == 1
    assert_same_weights(resumed.model, trainer.model)


def test_trainer_log_writes_one_line_for_the_steps_since_the_last_one(tmp_path):
    trainer = toy_trainer(tmp_path)
    first = trainer.step(np.arange(16))
    second = trainer.step(np.arange(16, 32))
    trainer.log({"hit@10": 0.5})
    (line,) = read_log(tmp_path / LOG)
    assert line["step"] == 2 and line["valid"] == {"hit@10": 0.5}
    assert line["loss"] == pytest.approx((first.loss_sum + second.loss_sum) / (first.n_terms + second.n_terms))
    assert trainer.window.terms == 0
