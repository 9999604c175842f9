"""The `trec` front door: resolved configs, one-line errors and documented exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evaluate", "device=gpu"], "config key 'device' on the command line (device=gpu): 'gpu' is not a device"),
        (["prepare", "data.target=Books"], "config key 'data.target' on the command line (data.target=Books): 'Books' is not a domain of data.domains (Food)"),
        (["recommend", "recommend.domain=Books"], "'recommend.domain' on the command line (recommend.domain=Books): 'Books' is not a domain"),
        (["evaluate", "--split", "train"], "option --split: expected 'valid' or 'test', got 'train'"),
    ],
)
def test_cross_field_mistakes_fail_at_config_time_before_torch_loads(tmp_path, args, message):
    stage, *rest = args
    code = ("import sys\nfrom trecsys.cli import main\n"
            f"sys.argv = ['trec', {stage!r}, '-c', {str(_config(tmp_path))!r}, *{rest!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["2", "False"]
    assert result.stderr.strip() == f"error: {message}" or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
