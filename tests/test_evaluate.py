"""`trec evaluate` end to end on the tiny prepared run: files, schema, plots, errors, CLI options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import tiny_config, write_tiny_prepared
from typer.testing import CliRunner

from trecsys.artifacts import write_manifest, write_parquet
from trecsys.cli import app
from trecsys.config import load_config
from trecsys.errors import ArtifactError, ConfigError, DataError
from trecsys.model.manifests import FinetuneManifest
from trecsys.prepared.sequences import write_sequences
from trecsys.rank.report import EvalContext, read_context
from trecsys.stages import evaluate as stage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KS = [1, 5, 10]  # the tiny target catalogue has 16 items


def write_config(run_dir: Path, **evaluate) -> Path:
    """conftest's tiny_config with an `evaluate` section: fast bootstrap, cut-offs within 16 items."""
    return tiny_config(run_dir, run_dir.parent / f"{run_dir.name}.yaml",
                       {"seed": 3, "evaluate": {"bootstrap": 100, "ks": KS, **evaluate}})


def evaluate(run_dir: Path, **kwargs) -> pd.DataFrame:
    stage.run(load_config(write_config(run_dir)), **kwargs)
    return pd.read_parquet(run_dir / "eval" / "metrics.parquet")


def rewrite_prepared(run_dir: Path, name: str, change) -> None:
    """Apply `change` to one prepared table and re-write the manifest, as a re-run of prepare would."""
    folder = run_dir / "prepared"
    table = pa.Table.from_pandas(change(pd.read_parquet(folder / name)), preserve_index=False)
    write_parquet(table, folder / name)
    manifest = json.loads((folder / "manifest.json").read_text())
    if name == "interactions.parquet":  # prepare writes the same interactions as flat arrays too
        ranges = {n: (d["item_start"], d["item_stop"]) for n, d in manifest["domains"].items()}
        write_sequences(folder, table, ranges, manifest["source"], manifest["target"], manifest["n_items"])
    generated = {"trecsys_version", "stage", "created_at", "host", "config", "inputs", "outputs"}
    write_manifest(folder, "prepare", manifest["config"], manifest["inputs"],
                   {k: v for k, v in manifest.items() if k not in generated})


def expected_users(run_dir: Path) -> dict[str, int]:
    """Slice sizes computed straight from interactions.parquet, independently of trecsys."""
    rows = pd.read_parquet(run_dir / "prepared" / "interactions.parquet")
    food = rows[rows["domain"] == "Food"]
    users = food.loc[food["split"] == "test", "user_idx"].unique()
    train = food[food["split"] == "train"].groupby("user_idx").size().reindex(users, fill_value=0)
    in_source = np.isin(users, rows.loc[rows["domain"] != "Food", "user_idx"].unique())
    sizes = {"all": len(users), "source:shared": int(in_source.sum()), "source:target-only": int((~in_source).sum())}
    for lo, hi in ((0, 3), (4, 7), (8, 15)):
        member = train[train.between(lo, hi)]
        if len(member):  # named by the counts the slice's users really have
            low, high = member.min(), member.max()
            sizes[f"train items:{low}" if low == high else f"train items:{low}-{high}"] = len(member)
    return {name: n for name, n in sizes.items() if n}


def test_baselines_write_metrics_report_and_plots(tiny_prepared, capsys):
    metrics = evaluate(tiny_prepared)
    out = tiny_prepared / "eval"

    assert list(metrics.columns) == ["run", "split", "exclude_seen", "slice", "metric", "k", "value", "ci_low",
                                     "ci_high", "n_users"]
    assert metrics["exclude_seen"].all()
    assert set(metrics["run"]) == {"popularity", "item-knn"}
    assert set(metrics["split"]) == {"test"}
    assert set(metrics["k"]) == set(KS)
    sizes = metrics.drop_duplicates("slice").set_index("slice")["n_users"]
    for name, n in expected_users(tiny_prepared).items():
        assert sizes[name] == n, name
    assert not any(name.startswith("train items:") and int(name.split(":")[1].split("-")[0]) >= 16 for name in sizes.index)
    # (no user has 16 train items: empty slices are left out)
    assert sizes["target:warm"] + sizes.get("target:cold(<5)", 0) == sizes["all"]  # one test item each
    assert set(metrics["metric"]) == {"recall", "hit", "ndcg", "mrr", "precision", "coverage", "diversity",
                                      "popularity"}
    per_user = metrics[metrics["metric"] != "coverage"]
    assert (per_user["ci_low"] <= per_user["value"] + 1e-12).all()
    assert (per_user["value"] <= per_user["ci_high"] + 1e-12).all()
    assert (per_user["ci_low"] < per_user["ci_high"]).any()
    coverage = metrics[metrics["metric"] == "coverage"]
    assert set(coverage["slice"]) == {"all"} and coverage["ci_low"].isna().all()  # not a mean over users
    accuracy = metrics[metrics["metric"].isin(["recall", "hit", "ndcg", "mrr", "precision", "coverage"])]
    assert accuracy["value"].between(0, 1).all()
    comparison = pd.read_parquet(out / "comparison.parquet")
    assert set(comparison["run"]) == {"item-knn"} and set(comparison["reference"]) == {"popularity"}
    tested = comparison[comparison["metric"] != "coverage"]
    assert tested["p_value"].between(0, 1).all() and len(tested) > 100

    report = (out / "report.md").read_text()
    assert "**seen items excluded**" in report
    assert "## All users, K=10" in report and "| popularity |" in report and "## Slices" in report
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} == {"metrics_at_k.png", "slices.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        import matplotlib.image
        from PIL import Image

        assert matplotlib.image.imread(png).shape[2] in (3, 4)
        with Image.open(png) as image:
            image.verify()
        assert f"]({png.name})" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "evaluate" and {o["path"] for o in manifest["outputs"]} >= {"metrics.parquet", "report.md"}
    # Its context (report.EvalContext), keys in the order the file has always had, read back typed.
    assert list(manifest["context"]) == ["run_dir", "target", "split", "n_users", "n_items", "ks", "exclude_seen",
                                         "bootstrap", "seed", "cold_item_interactions", "history_buckets", "models",
                                         "seconds"]
    context = read_context(manifest, out / "manifest.json")
    assert isinstance(context, EvalContext) and context.to_json() == manifest["context"]
    assert context.n_users == sizes["all"] and context.ks == KS and set(context.seconds) == set(metrics["run"])
    manifest["context"].pop("seed")
    with pytest.raises(ArtifactError, match=r"manifest.json: malformed evaluate context .*seed"):
        read_context(manifest, out / "manifest.json")

    printed = capsys.readouterr()  # the table is the result (stdout), "wrote" a log line (stderr)
    assert "popularity" in printed.out and "ndcg@10" in printed.out and "wrote" in printed.err
    assert "seen items excluded" in printed.out


def test_same_seed_same_numbers_and_chunking_changes_nothing(tiny_prepared, tmp_path):
    first = evaluate(tiny_prepared)
    cfg = load_config(write_config(tiny_prepared), ["evaluate.user_batch=7", "evaluate.item_chunk=9"])
    stage.run(cfg)
    second = pd.read_parquet(tiny_prepared / "eval" / "metrics.parquet")
    pd.testing.assert_frame_equal(first, second)


def test_valid_split_uses_train_history(tiny_prepared):
    metrics = evaluate(tiny_prepared, split="valid")
    assert set(metrics["split"]) == {"valid"}


def test_learning_curves_and_fewshot_plots_when_their_inputs_exist(tiny_prepared):
    log = tiny_prepared / "pretrain" / "train_log.jsonl"
    log.parent.mkdir()
    lines = [{"step": s, "loss": 5.0 / (s + 1), "lr": 1e-3} for s in range(20)]
    lines += [{"epoch": 1, "step": 19, "valid_ndcg@10": 0.1}, "not json {"]
    log.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    fewshot = tiny_prepared / "fewshot" / "results.parquet"
    fewshot.parent.mkdir()
    pd.DataFrame({"train_fraction": [0.1, 0.5, 1.0] * 2, "strategy": ["full"] * 3 + ["scratch"] * 3,
                  "metric": "ndcg", "k": 10, "value": [0.1, 0.2, 0.25, 0.02, 0.1, 0.2]}).to_parquet(fewshot)
    evaluate(tiny_prepared)
    out = tiny_prepared / "eval"
    for name in ("learning_curves.png", "fewshot.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        assert f"]({name})" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# Bad input: one-line errors naming what differs


def test_k_beyond_catalogue_names_the_key(tiny_prepared):
    with pytest.raises(ConfigError, match=r"evaluate\.ks.*K=17.*16 items"):
        stage.run(load_config(write_config(tiny_prepared), ["evaluate.ks=[10, 17]"]))


def test_empty_split_is_a_data_error(tiny_prepared):
    rewrite_prepared(tiny_prepared, "interactions.parquet", lambda t: t.assign(split=t["split"].replace("test", "train")))
    with pytest.raises(DataError, match=r"interactions\.parquet.*test split of target domain 'Food'"):
        evaluate(tiny_prepared)


def test_compare_refuses_runs_on_other_prepared_data(tiny_prepared, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_prepared / "prepared", other / "prepared")
    rewrite_prepared(other, "items.parquet", lambda t: t.assign(title=t["title"] + " (v2)"))
    with pytest.raises(ArtifactError, match=r"other/prepared/items\.parquet \(sha256 .*differs from .*run/prepared/"
                                            r"items\.parquet.*compare runs prepared from the same data"):
        evaluate(tiny_prepared, compare=[str(other)])
    reshuffled = tmp_path / "reshuffled"
    write_tiny_prepared(reshuffled, seed=1)  # the same items, other users
    with pytest.raises(ArtifactError, match=r"reshuffled/prepared/interactions\.parquet .*differs"):
        evaluate(tiny_prepared, compare=[str(reshuffled)])
    same = tmp_path / "same"
    shutil.copytree(tiny_prepared / "prepared", same / "prepared")
    with pytest.raises(ArtifactError, match=r"has no model"):
        evaluate(tiny_prepared, compare=[str(same)])
    with pytest.raises(ArtifactError, match=r"not a run folder"):
        evaluate(tiny_prepared, compare=[str(tmp_path / "missing")])


def test_model_option_needs_a_checkpoint_folder(tiny_prepared):
    with pytest.raises(ArtifactError, match=r"--model .*model\.safetensors"):
        evaluate(tiny_prepared, model=str(tiny_prepared / "prepared"))


def test_bad_config_values_name_the_key(tiny_prepared):
    for override, key in (("evaluate.history_buckets=[4, 2]", "evaluate.history_buckets"),
                          ("evaluate.bootstrap=-1", "evaluate.bootstrap"),
                          ("evaluate.item_chunk=0", "evaluate.item_chunk")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            stage.run(load_config(write_config(tiny_prepared), [override]))
    with pytest.raises(ConfigError, match="--split"):
        evaluate(tiny_prepared, split="train")


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("args,expected", [
    (["--compare", "runs/a", "runs/b"], ["runs/a", "runs/b"]),
    (["--compare", "runs/a,runs/b"], ["runs/a,runs/b"]),
    (["--compare", "runs/a", "--compare", "runs/b", "seed=1"], ["runs/a", "runs/b"]),
])
def test_cli_passes_options_to_the_stage(tiny_prepared, monkeypatch, args, expected):
    seen = {}
    monkeypatch.setattr(stage, "run", lambda cfg, **options: seen.update(options, seed=cfg.seed))
    result = CliRunner().invoke(app, ["evaluate", "-c", str(write_config(tiny_prepared)), "--split", "valid", *args])
    assert result.exit_code == 0, result.output
    assert seen["compare"] == expected and seen["split"] == "valid" and seen["model"] is None
    assert seen["seed"] == (1 if "seed=1" in args else 3)
    assert stage._split_entries(seen["compare"]) == ["runs/a", "runs/b"]


def test_cli_errors_are_one_line_with_exit_code_2(tiny_prepared):
    result = CliRunner().invoke(app, ["evaluate", "-c", str(write_config(tiny_prepared)), "evaluate.ks=[17]"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "evaluate.ks" in lines[0]


def test_cli_runs_the_stage(tiny_prepared):
    result = CliRunner().invoke(app, ["evaluate", "-c", str(write_config(tiny_prepared)), "evaluate.ks=[2,5]"])
    assert result.exit_code == 0, result.output
    metrics = pd.read_parquet(tiny_prepared / "eval" / "metrics.parquet")
    assert set(metrics["k"]) == {2, 5}
    assert not np.isnan(metrics.loc[metrics["metric"] != "coverage", "ci_low"]).any()


# ---------------------------------------------------------------------------------------------
# With a model checkpoint (trecsys.model.seqrec)


def save_model(folder: Path, prepared_run: Path, seed: int = 0, n_items: int | None = None,
               text_dim: int | None = None) -> None:
    import torch

    from trecsys.config import ModelConfig
    from trecsys.model.checkpoint import save_checkpoint
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import load_prepared

    prepared = load_prepared(prepared_run)
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, max_seq_len=8, dropout=0.0, n_experts=2)
    model = SeqRecModel(cfg, text_dim or prepared.embeddings.shape[1], n_items or prepared.n_items)
    save_checkpoint(model, folder, extra={"stage": folder.name})


def test_model_scorer_matches_a_direct_forward_pass(tiny_prepared):
    import torch

    from trecsys.model.checkpoint import load_checkpoint
    from trecsys.prepared.tables import load_prepared
    from trecsys.rank.scorers import ModelScorer
    from trecsys.train.windows import history_batch

    save_model(tiny_prepared / "finetune", tiny_prepared)
    prepared = load_prepared(tiny_prepared)
    users = stage.eval_users(prepared, "test")
    domain = prepared.domain(prepared.target)
    model, _ = load_checkpoint(tiny_prepared / "finetune")
    scorer = ModelScorer(model, users.histories_global, domain, prepared.embeddings, torch.device("cpu"),
                         user_batch=7)
    model.set_item_text(torch.from_numpy(prepared.embeddings))
    with torch.no_grad():
        states = model.user_state(history_batch(users.histories_global[:5], 8))
        expected = model.score(states, model.item_reps(domain.item_start, domain.item_stop))
    got = scorer.score_chunk(torch.arange(5), 0, domain.n_items)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(scorer.score_chunk(torch.tensor([2, 3]), 10, 20), expected[2:4, 10:20], atol=1e-5)


def test_latest_model_is_evaluated_against_the_baselines(tiny_prepared):
    save_model(tiny_prepared / "pretrain", tiny_prepared)
    metrics = evaluate(tiny_prepared)
    assert list(dict.fromkeys(metrics["run"])) == ["pretrain (zero-shot)", "popularity", "item-knn"]
    save_model(tiny_prepared / "finetune", tiny_prepared, seed=1)
    metrics = evaluate(tiny_prepared)
    assert list(dict.fromkeys(metrics["run"])) == ["finetune", "popularity", "item-knn"]
    comparison = pd.read_parquet(tiny_prepared / "eval" / "comparison.parquet")
    assert set(comparison["reference"]) == {"finetune"} and set(comparison["run"]) == {"popularity", "item-knn"}
    manifest = json.loads((tiny_prepared / "eval" / "manifest.json").read_text())
    assert any(i["path"].endswith("finetune/model.safetensors") for i in manifest["inputs"])

    metrics = evaluate(tiny_prepared, model=str(tiny_prepared / "pretrain"))
    assert metrics["run"].iloc[0] == str(tiny_prepared / "pretrain")


def test_compare_runs_side_by_side_with_paired_p_values(tiny_prepared, tmp_path):
    save_model(tiny_prepared / "finetune", tiny_prepared, seed=0)
    other = tmp_path / "other"
    shutil.copytree(tiny_prepared / "prepared", other / "prepared")
    save_model(other / "distill", other, seed=1)
    metrics = evaluate(tiny_prepared, compare=[str(tiny_prepared), f"{other}/distill"])
    runs = list(dict.fromkeys(metrics["run"]))
    assert runs == [f"{tiny_prepared}/finetune", f"{other}/distill", "popularity", "item-knn"]
    comparison = pd.read_parquet(tiny_prepared / "eval" / "comparison.parquet")
    assert set(comparison["reference"]) == {runs[0]} and set(comparison["run"]) == set(runs[1:])
    # The same model twice: zero difference, p = 1, on every slice.
    evaluate(tiny_prepared, compare=[str(tiny_prepared), str(tiny_prepared / "finetune")])
    same = pd.read_parquet(tiny_prepared / "eval" / "comparison.parquet")
    same = same[same["run"] == f"{tiny_prepared}/finetune #2"]
    assert len(same) and (same["delta"] == 0).all()
    assert (same.loc[same["metric"] != "coverage", "p_value"] == 1).all()


def test_model_for_another_catalogue_is_refused(tiny_prepared):
    save_model(tiny_prepared / "finetune", tiny_prepared, n_items=71)
    with pytest.raises(ArtifactError, match=r"finetune/config\.json: .*n_items=71 .* 70 items"):
        evaluate(tiny_prepared)
    save_model(tiny_prepared / "finetune", tiny_prepared, text_dim=17)
    with pytest.raises(ArtifactError, match=r"finetune/config\.json: .*text_dim=17 .* 16 dimensions"):
        evaluate(tiny_prepared)


def test_popularity_without_exclusion_matches_a_count_by_hand(tiny_prepared, capsys):
    stage.run(load_config(write_config(tiny_prepared, exclude_seen=False)))
    metrics = pd.read_parquet(tiny_prepared / "eval" / "metrics.parquet")
    # The rule is stated in every output: each row, the report, the terminal table.
    assert not metrics["exclude_seen"].any()
    assert not pd.read_parquet(tiny_prepared / "eval" / "comparison.parquet")["exclude_seen"].any()
    assert "**seen items ranked (not excluded)**" in (tiny_prepared / "eval" / "report.md").read_text()
    assert "seen items ranked (not excluded)" in capsys.readouterr().out
    rows = pd.read_parquet(tiny_prepared / "prepared" / "interactions.parquet")
    food = rows[rows["domain"] == "Food"]
    counts = food.loc[food["split"] == "train", "item_idx"].value_counts()
    domain = json.loads((tiny_prepared / "prepared" / "manifest.json").read_text())["domains"]["Food"]
    ranked = sorted(range(domain["item_start"], domain["item_stop"]), key=lambda i: (-counts.get(i, 0), i))
    targets = food.loc[food["split"] == "test", "item_idx"]
    for k in KS:
        got = metrics.query("run == 'popularity' and slice == 'all' and metric == 'recall' and k == @k")["value"]
        assert got.item() == pytest.approx(targets.isin(ranked[:k]).mean())


def test_slices_on_a_hand_example():
    from trecsys.rank.evaluation import build_slices

    targets = [np.array([0]), np.array([1]), np.array([2, 0]), np.array([3])]
    counts = np.array([0, 3, 10, 5])  # item 0 never trained on, 1 cold, 2 and 3 warm (>= 5)
    slices = build_slices(targets, np.array([0, 4, 9, 20]), np.array([True, False, True, False]), counts,
                          [4, 8, 16], 5)
    users = {s.name: s.users.tolist() for s in slices}
    assert users == {"all": [0, 1, 2, 3], "train items:0": [0], "train items:4": [1], "train items:9": [2],
                     "train items:20": [3], "source:shared": [0, 2], "source:target-only": [1, 3],
                     "target:unseen": [0, 2], "target:cold(<5)": [0, 1, 2], "target:warm": [2, 3]}
    by_name = {s.name: s for s in slices}
    # Every user has at least 3 training items: the first slice says 3-5, not 0-3 ("the cold users").
    names = [s.name for s in build_slices(targets, np.array([3, 5, 9, 20]), None, counts, [6, 16], 5)]
    assert names[:3] == ["all", "train items:3-5", "train items:9"]
    assert [t.tolist() for t in by_name["target:unseen"].targets] == [[0], [0]]
    assert [t.tolist() for t in by_name["target:warm"].targets] == [[2], [3]]
    without_source = build_slices(targets, np.array([0, 4, 9, 20]), None, counts, [4, 8, 16], 5)
    assert not any(s.name.startswith("source:") for s in without_source)


def test_finetune_candidates_that_were_not_kept_are_evaluated_beside_it(tiny_prepared):
    for strategy, seed in (("full", 1), ("scratch", 2), ("id_only", 3)):
        save_model(tiny_prepared / "finetune" / "candidates" / strategy, tiny_prepared, seed=seed)
    save_model(tiny_prepared / "finetune", tiny_prepared, seed=1)
    write_manifest(tiny_prepared / "finetune", "finetune-target", {}, [], FinetuneManifest(
        seed=0, target="Food", strategy="auto", chosen="full", chosen_by="valid ndcg@10", metrics={}, candidates={},
        init_from=None, history="target", train_fraction=1.0, n_train_users=0, n_parameters=0, n_trainable=0,
        timings_s={}).to_json())
    metrics = evaluate(tiny_prepared)
    assert list(dict.fromkeys(metrics["run"])) == ["finetune/full (kept)", "finetune/id_only", "finetune/scratch",
                                                    "popularity", "item-knn"]
    ndcg = metrics[(metrics["metric"] == "ndcg") & (metrics["slice"] == "all")].groupby("run")["value"].apply(list)
    assert ndcg["finetune/scratch"] != ndcg["finetune/full (kept)"]  # other weights, other numbers

    stage.run(load_config(write_config(tiny_prepared, candidates=False)))
    metrics = pd.read_parquet(tiny_prepared / "eval" / "metrics.parquet")
    assert list(dict.fromkeys(metrics["run"])) == ["finetune/full (kept)", "popularity", "item-knn"]
