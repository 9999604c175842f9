"""The `trec` front door: resolved configs, one-line errors and documented exit codes."""

from __future__ import annotations

import subprocess
import sys

import yaml
from typer.testing import CliRunner

from trecsys.cli import app

runner = CliRunner()

CONFIG = """
run_dir: runs/cli
data:
  target: Food
  domains:
    Food: {format: csv, interactions: f.csv}
"""


def _config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG)
    return path


def test_print_config_shows_resolved_values_with_overrides(tmp_path):
    result = runner.invoke(app, ["prepare", "-c", str(_config(tmp_path)), "seed=7", "--print-config"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["seed"] == 7
    assert resolved["data"]["domains"]["Food"]["columns"]["item"] == "item_id"
    assert resolved["embedding"]["encoder"]


def test_config_error_is_one_line_with_exit_code_2(tmp_path):
    result = runner.invoke(app, ["prepare", "-c", str(_config(tmp_path)), "data.min_user_interaction=2"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unknown config key 'data.min_user_interaction'")
    assert "Traceback" not in result.output


def test_missing_config_file(tmp_path):
    result = runner.invoke(app, ["evaluate", "-c", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "config file not found" in result.stderr


def test_help_lists_every_stage_and_exit_codes():
    result = subprocess.run([sys.executable, "-m", "trecsys", "--help"], capture_output=True, text=True,
                            check=True)
    for stage in ("prepare", "pretrain-source", "distill", "finetune-target", "evaluate", "recommend"):
        assert stage in result.stdout
    assert "Exit codes" in result.stdout
