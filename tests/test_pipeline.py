"""`trec run`: stages in order, skipped when up to date, re-run after a config or upstream change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import fake_embed_texts
from typer.testing import CliRunner

from trecsys import pipeline
from trecsys.artifacts import run_lock
from trecsys.cli import app
from trecsys.config import load_config
from trecsys.errors import ConfigError
from trecsys.stages import evaluate

# The stages this test drives; the training stages are left out so the test stays fast.
STAGES = "prepare,evaluate,recommend"


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    from trecsys.stages import prepare

    monkeypatch.setattr(prepare, "embed_texts", fake_embed_texts)
    data = {
        "run_dir": str(tmp_path / "run"),
        "data": {"domains": {"Kitchen": {"format": "synthetic"}, "Food": {"format": "synthetic"}},
                 "source": ["Kitchen"], "target": "Food",
                 "synthetic": {"n_users": 150, "n_items_per_domain": 60}},
        "embedding": {"cache_dir": str(tmp_path / "cache")},
        "evaluate": {"bootstrap": 20, "ks": [5, 10]},
        # No trained model in this test: recommend ranks by popularity.
        "recommend": {"fusion": [{"model": "popularity"}]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(config: Path, *overrides: str, **options) -> dict[str, tuple[str, str]]:
    outcomes = pipeline.run(load_config(config, list(overrides)), stages=options.pop("stages", STAGES), **options)
    return {o.stage: (o.action, o.reason) for o in outcomes}


@pytest.mark.slow
def test_up_to_date_stages_are_skipped_and_changes_rerun_what_depends_on_them(config, capsys):
    first = run(config, show=1)
    assert {s: a for s, (a, _) in first.items()} == {"prepare": "ran", "evaluate": "ran", "recommend": "ran"}
    assert all(reason.startswith("no output yet") for _, reason in first.values())
    printed = capsys.readouterr()
    # Results on stdout, progress on stderr; the evaluation table once (evaluate printed it), and the
    # run ends with one example list with item titles.
    assert printed.out.count("evaluate: target 'Food'") == 1 and "ndcg@10" in printed.out
    assert "run: evaluate: running" in printed.err and "run: evaluate" not in printed.out
    tail = printed.out.split("run: summary", 1)[1]
    assert "evaluate: target 'Food'" not in tail
    assert "example recommendations" in tail and tail.count("user ") == 1
    assert re.search(r"\n +1\. \S.* \[FOO\d+\]  -?\d", tail)  # rank, title, [item id], score

    assert run(config, show=1) == {s: ("skipped", "up to date") for s in first}
    # Nothing ran: the table comes from the evaluation on disk, once.
    tail = capsys.readouterr().out.split("run: summary", 1)[1]
    assert tail.count("evaluate: target 'Food'") == 1 and "popularity" in tail and "example recommendations" in tail

    again = run(config, "evaluate.ks=[5, 20]")
    assert again["prepare"] == again["recommend"] == ("skipped", "up to date")
    assert again["evaluate"] == ("ran", "config changed: evaluate.ks [5, 10] → [5, 20]")

    again = run(config, "evaluate.ks=[5, 20]", "data.synthetic.n_users=160")
    assert again["prepare"] == ("ran", "config changed: data.synthetic.n_users 150 → 160")
    assert again["evaluate"] == again["recommend"] == ("ran", "the output of prepare changed")

    # A stage re-run by hand with another config is seen through its own manifest.
    cfg = load_config(config, ["evaluate.ks=[5]", "data.synthetic.n_users=160"])
    evaluate.run(cfg)
    again = run(config, "evaluate.ks=[5, 20]", "data.synthetic.n_users=160")
    assert again["evaluate"][1] == "config changed: evaluate.ks [5] → [5, 20]"
    assert again["prepare"] == again["recommend"] == ("skipped", "up to date")

    # Re-run by hand with the pipeline's own config: up to date, through the inputs (with sha256)
    # that its manifest records; stale once one of those inputs changes.
    cfg = load_config(config, ["evaluate.ks=[5, 20]", "data.synthetic.n_users=160"])
    evaluate.run(cfg)
    again = run(config, "evaluate.ks=[5, 20]", "data.synthetic.n_users=160")
    assert again["evaluate"] == ("skipped", "up to date")
    items = Path(cfg.run_dir) / "prepared" / "items.parquet"
    saved = items.read_bytes()
    items.write_bytes(saved + b"x")
    assert pipeline.staleness(pipeline.BY_NAME["evaluate"], cfg, None) == f"input {items} changed"
    items.write_bytes(saved)

    # Outputs changed behind the manifest's back, and --force.
    metrics = Path(cfg.run_dir) / "eval" / "metrics.parquet"
    metrics.write_bytes(metrics.read_bytes() + b"x")
    again = run(config, "evaluate.ks=[5, 20]", "data.synthetic.n_users=160")
    assert again["evaluate"][0] == "ran" and again["evaluate"][1].startswith("its outputs changed")
    forced = run(config, "evaluate.ks=[5, 20]", "data.synthetic.n_users=160", force=True)
    assert forced == {s: ("ran", "--force") for s in first}


def test_bad_stage_names_and_a_busy_run_dir(config):
    with pytest.raises(ConfigError, match=r"--stages: unknown stage 'prepar'; choose from prepare,pretrain-source"):
        run(config, stages="prepar,evaluate")
    run_dir = Path(load_config(config).run_dir)
    with run_lock(run_dir / "pipeline.json"):
        result = CliRunner().invoke(app, ["run", "-c", str(config), "--stages", STAGES])
    assert result.exit_code == 3 and "locked by another trecsys run" in result.stderr


def test_cli_runs_the_pipeline_and_reports_failures(config):
    result = CliRunner().invoke(app, ["run", "-c", str(config), "--stages", STAGES, "--show", "0"])
    assert result.exit_code == 0, result.output
    assert "run: summary" in result.stdout and re.search(r"recommend\s+ran\s+no output yet", result.stdout)
    result = CliRunner().invoke(app, ["run", "-c", str(config), "--stages", STAGES, "recommend.fusion=[]"])
    assert result.exit_code == 2
    assert "run: recommend: failed" in result.stderr and "has no trained model" in result.stderr
