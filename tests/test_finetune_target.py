"""`trec finetune-target` end to end on the tiny prepared folder, through the CLI (seconds each)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import pretrained_tiny_run, tiny_config, write_tiny_prepared
from safetensors.torch import load_file
from typer.testing import CliRunner

from trecsys.artifacts import read_parquet, stage_output, write_manifest, write_parquet
from trecsys.cli import app
from trecsys.model.checkpoint import load_checkpoint
from trecsys.prepared.context import histories_for, target_sequences
from trecsys.prepared.sequences import write_sequences
from trecsys.prepared.tables import load_prepared
from trecsys.rank.metrics import full_ranking_topk
from trecsys.rank.rankers import Ranker, make_scorer
from trecsys.rank.scorers import to_local
from trecsys.rank.validation import EvalCase, make_ranker
from trecsys.stages.evaluate import eval_users, ranking_inputs
from trecsys.train.engine import LOG, read_log
from trecsys.train.windows import history_batch

runner = CliRunner()
FINETUNE = {"epochs": 3, "batch_size": 16, "lr": 0.01, "patience": 0}


def trec(*args: str):
    return runner.invoke(app, list(args))


def finetune_config(run_dir: Path, path: Path, **finetune) -> Path:
    return tiny_config(run_dir, path, {"finetune": {"train": dict(FINETUNE), **finetune}}, epochs=2)


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """A tiny run with prepared/ and pretrain/; tests copy it so each writes its own finetune/."""
    return pretrained_tiny_run(tmp_path_factory.mktemp("pretrained"), finetune_config)


@pytest.fixture
def run_copy(pretrained_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained_run, run_dir)  # copy2 keeps mtimes: the manifests still verify
    return run_dir


def test_full_finetune_with_source_context_writes_the_checkpoint_and_manifest(run_copy, tmp_path):
    cfg = finetune_config(run_copy, tmp_path / "cfg.yaml", strategy="full", history="all_domains", item_ids=True,
                          l2sp=0.001, new_params_lr_scale=5.0, train_fraction=0.5)
    result = trec("finetune-target", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    out = run_copy / "finetune"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "train_log.jsonl",
                                               "config.yaml", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetune-target" and manifest["strategy"] == manifest["chosen"] == "full"
    assert manifest["history"] == "all_domains" and manifest["train_fraction"] == 0.5
    full = manifest["candidates"]["full"]
    assert full["n_trainable"] == full["n_parameters"] == manifest["n_parameters"]
    assert manifest["n_train_users"] == int(np.ceil(0.5 * 52))
    assert manifest["metrics"] == max((r["valid"] for r in read_log(out / LOG)), key=lambda v: v["ndcg@10"])
    model, info = load_checkpoint(out)
    assert model.item_id is not None and info.extra["history"] == "all_domains"
    assert info.extra["strategy"] == "full" and info.extra["init_from"] == str(run_copy / "pretrain")
    assert not (run_copy / ".finetune.work").exists()
    # `trec evaluate` gives this model the histories it was trained with: source items included.
    prepared = load_prepared(run_copy)
    users = eval_users(prepared, "test")
    scorer = make_scorer(Ranker("finetune", out), ranking_inputs(prepared, users, torch.device("cpu"), 64, 4096))
    mixed = histories_for(prepared, "all_domains", "test", users.user_idx)
    assert sum(map(len, mixed)) > sum(map(len, users.histories_global))
    model.set_item_text(torch.from_numpy(prepared.embeddings))
    with torch.no_grad():
        expected = model.eval().user_state(history_batch(mixed, model.config.max_seq_len))
    assert torch.allclose(scorer.states, expected, atol=1e-5)
    result = trec("evaluate", "-c", str(cfg), "evaluate.bootstrap=0", "evaluate.ks=[5, 10]")
    assert result.exit_code == 0, result.output


def test_auto_keeps_every_candidate_and_the_adaptor_leaves_the_sequence_tower_as_pretrained(run_copy, tmp_path):
    cfg = finetune_config(run_copy, tmp_path / "cfg.yaml", strategy="auto", candidates=["adaptor", "zero_shot"])
    result = trec("finetune-target", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "adaptor" in result.output and "zero_shot" in result.output and "test is never read" in result.output
    # Every training line names its candidate (on stderr, with the progress bars).
    steps = re.findall(r"(\S*) ?step \d+: train loss", result.stderr)
    assert steps and set(steps) == {"adaptor:"}
    assert re.search(r"adaptor: epoch 1/3", result.stderr)
    out = run_copy / "finetune"
    manifest = json.loads((out / "manifest.json").read_text())
    scores = {name: c["valid"]["ndcg@10"] for name, c in manifest["candidates"].items()}
    assert manifest["chosen"] == max(scores, key=scores.get)
    assert manifest["candidates"]["zero_shot"]["n_trainable"] == 0
    assert manifest["candidates"]["zero_shot"]["stopped"] == "not_trained"
    assert 0 < manifest["candidates"]["adaptor"]["n_trainable"] < manifest["candidates"]["adaptor"]["n_parameters"]
    pretrained = load_file(str(run_copy / "pretrain" / "model.safetensors"))
    for name in ("adaptor", "zero_shot"):
        tuned = load_file(str(out / "candidates" / name / "model.safetensors"))
        frozen = [k for k in tuned if k.startswith("blocks.") and ".norm" not in k] + ["position.weight"]
        assert all(torch.equal(tuned[k], pretrained[k]) for k in frozen)
        moved = [k for k in tuned if not torch.equal(tuned[k], pretrained[k])]
        assert (name == "zero_shot") == (moved == [])
        assert all(k.startswith(("adaptor.", "item_norm.", "final_norm.")) or ".norm" in k or k == "seen_bias"
                   for k in moved)


def rewrite_test_items(src: Path, dst: Path, new_items: dict[int, int]) -> None:
    """A copy of src/prepared whose target test items are `new_items` {user_idx: item_idx}."""
    prepared = src / "prepared"
    interactions = read_parquet(prepared / "interactions.parquet").to_pandas()
    rows = (interactions["domain"] == "Food") & (interactions["split"] == "test")
    interactions.loc[rows, "item_idx"] = interactions.loc[rows, "user_idx"].map(new_items).astype(np.int32)
    old = json.loads((prepared / "manifest.json").read_text())
    with stage_output(dst / "prepared") as tmp:
        for name in ("items.parquet", "item_embeddings.parquet"):
            shutil.copy2(prepared / name, tmp / name)
        table = pa.Table.from_pandas(interactions, preserve_index=False)
        write_parquet(table, tmp / "interactions.parquet")
        write_sequences(tmp, table, {n: (d["item_start"], d["item_stop"]) for n, d in old["domains"].items()},
                        old["source"], old["target"], old["n_items"])
        keep = ("seed", "domains", "source", "target", "encoder", "n_users", "n_items")
        write_manifest(tmp, "prepare", {}, inputs=[], extra={k: old[k] for k in keep})


def candidate_test_scores(run_dir: Path, strategies: list[str]) -> dict[str, float]:
    prepared = load_prepared(run_dir)
    seqs = target_sequences(prepared, "target")
    rank = make_ranker([EvalCase("Food", seqs.domain, seqs.histories["test"], seqs.targets["test"])],
                       prepared.embeddings, 64, torch.device("cpu"))
    out = {}
    for name in strategies:
        model, _ = load_checkpoint(run_dir / "finetune" / "candidates" / name)
        model.set_item_text(torch.from_numpy(prepared.embeddings))
        with torch.no_grad():
            out[name] = rank(model.eval())["ndcg@10"]
    return out


def test_auto_chooses_on_validation_even_when_test_says_otherwise(tmp_path):
    """Run auto, then rewrite every test item to the item the valid-loser ranks first: the loser
    becomes best on test, yet auto on the rewritten data keeps the same valid-chosen model."""
    strategies = ["scratch", "id_only"]
    first = tmp_path / "a"
    write_tiny_prepared(first)
    cfg = finetune_config(first, tmp_path / "a.yaml", strategy="auto", candidates=strategies)
    assert trec("finetune-target", "-c", str(cfg)).exit_code == 0
    manifest = json.loads((first / "finetune" / "manifest.json").read_text())
    valid = {s: manifest["candidates"][s]["valid"]["ndcg@10"] for s in strategies}
    chosen = manifest["chosen"]
    assert valid[chosen] > min(valid.values())
    loser = next(s for s in strategies if s != chosen)

    prepared = load_prepared(first)
    seqs = target_sequences(prepared, "target")
    domain = seqs.domain
    users = [u for u, t in enumerate(seqs.targets["test"]) if len(t)]
    model, _ = load_checkpoint(first / "finetune" / "candidates" / loser)
    model.set_item_text(torch.from_numpy(prepared.embeddings))
    with torch.no_grad():
        seq = history_batch([seqs.histories["test"][u] for u in users], model.config.max_seq_len)
        states, reps = model.eval().user_state(seq), model.item_reps(domain.item_start, domain.item_stop)
        _, top = full_ranking_topk(lambda r, a, b: model.score(states[r], reps[a:b]), len(users), domain.n_items,
                                   k=1, exclude=to_local([seqs.histories["test"][u] for u in users], domain))
    new_items = {int(seqs.user_idx[u]): int(top[i, 0]) + domain.item_start for i, u in enumerate(users)}

    second = tmp_path / "b"
    rewrite_test_items(first, second, new_items)
    cfg = finetune_config(second, tmp_path / "b.yaml", strategy="auto", candidates=strategies)
    assert trec("finetune-target", "-c", str(cfg)).exit_code == 0
    rerun = json.loads((second / "finetune" / "manifest.json").read_text())
    assert {s: rerun["candidates"][s]["valid"]["ndcg@10"] for s in strategies} == valid  # test never read
    assert rerun["chosen"] == chosen
    test = candidate_test_scores(second, strategies)
    assert test[loser] == pytest.approx(1.0) and test[loser] > test[chosen]  # valid and test disagree


def test_resume_after_max_steps_finishes_like_an_uninterrupted_run(run_copy, tmp_path):
    cfg = finetune_config(run_copy, tmp_path / "cfg.yaml", strategy="auto", candidates=["full", "scratch"])
    assert trec("finetune-target", "-c", str(cfg)).exit_code == 0
    whole = json.loads((run_copy / "finetune" / "manifest.json").read_text())["candidates"]
    cut = trec("finetune-target", "-c", str(cfg), "finetune.train.max_steps=5")
    assert cut.exit_code == 0 and (run_copy / ".finetune.work" / "full" / "last").is_dir()
    resumed = trec("finetune-target", "-c", str(cfg), "--resume")
    assert resumed.exit_code == 0, resumed.output
    again = json.loads((run_copy / "finetune" / "manifest.json").read_text())["candidates"]
    assert {s: c["valid"] for s, c in again.items()} == {s: c["valid"] for s, c in whole.items()}


def test_bad_input_is_one_line_naming_the_key(run_copy, tmp_path):
    cfg = finetune_config(run_copy, tmp_path / "cfg.yaml", strategy="full")
    cases = [
        (["finetune.init_from=distill"], "'finetune.init_from'", "trec distill"),
        ([f"finetune.init_from={tmp_path / 'nowhere'}"], "'finetune.init_from'", "no checkpoint"),
        (["finetune.train_fraction=0"], "'finetune.train_fraction'", "(0, 1]"),
        (["finetune.train_fraction=1.5"], "'finetune.train_fraction'", "(0, 1]"),
        (["finetune.candidates=[full, magic]"], "'finetune.candidates[1]'", "magic"),
        (["data.target=Toys"], "'data.target' on the command line", "is not a domain of data.domains"),
        # Books cannot be the target while it is a source; once it is not, the prepared data disagrees.
        (["data.target=Books", "data.source=[Games]"], "'data.source'", "re-run `trec prepare`"),
    ]
    for overrides, key, what in cases:
        result = trec("finetune-target", "-c", str(cfg), *overrides)
        assert result.exit_code == 2, (overrides, result.output)
        message = result.output.strip()
        assert "\n" not in message and key in message and what in message, message
    # A checkpoint trained on another prepared run: same shapes, different prepared manifest.
    other = tmp_path / "other"
    write_tiny_prepared(other, seed=1)
    result = trec("finetune-target", "-c", str(finetune_config(other, tmp_path / "o.yaml", strategy="full")),
                  f"finetune.init_from={run_copy / 'pretrain'}")
    assert result.exit_code == 2 and "'finetune.init_from'" in result.output
    assert "trained on other prepared data" in result.output
    # scratch borrows only the architecture, but an existing incompatible checkpoint is still refused.
    result = trec("finetune-target", "-c", str(tmp_path / "o.yaml"), f"finetune.init_from={run_copy / 'pretrain'}",
                  "finetune.strategy=scratch")
    assert result.exit_code == 2 and "trained on other prepared data" in result.output


def test_scratch_alone_needs_no_pretrained_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    cfg = finetune_config(run_dir, tmp_path / "cfg.yaml", strategy="scratch")
    result = trec("finetune-target", "-c", str(cfg))
    assert result.exit_code == 0, result.output
    assert "architecture from config key 'model'" in result.output
    result = trec("finetune-target", "-c", str(cfg), "finetune.strategy=full")
    assert result.exit_code == 2 and "'finetune.init_from'" in result.output and "trec pretrain-source" in result.output
