"""The config schema: inheritance, dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from trecsys.config import ExperimentConfig, apply_overrides, load_config, to_yaml
from trecsys.errors import ConfigError

BASE = """
run_dir: runs/base
seed: 3
data:
  root: data
  target: Food
  source: [Kitchen]
  min_user_interactions: 2
  domains:
    Kitchen: {format: recbole, interactions: k.inter}
    Food: {format: recbole, interactions: f.inter}
"""


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(BASE)
    return path


def test_load_builds_typed_sections(base_file):
    cfg = load_config(base_file)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.seed == 3
    assert cfg.data.domains["Food"].format == "recbole"
    assert cfg.data.domains["Food"].columns.user == "user_id"  # nested default
    assert cfg.data.split == "leave_one_out"


def test_inheritance_merges_mappings_and_replaces_lists(tmp_path, base_file):
    child = tmp_path / "child.yaml"
    child.write_text("inherit: base.yaml\nrun_dir: runs/child\ndata:\n  source: []\n  min_item_interactions: 4\n")
    cfg = load_config(child)
    assert cfg.run_dir == "runs/child"
    assert cfg.data.source == []
    assert cfg.data.min_item_interactions == 4
    assert cfg.data.min_user_interactions == 2  # kept from the base
    assert set(cfg.data.domains) == {"Kitchen", "Food"}


def test_inheritance_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_dotted_overrides_parse_yaml_values(base_file):
    cfg = load_config(base_file, ["data.min_user_interactions=5", "run_dir=runs/x",
                                  "data.source=[Kitchen, Food]", "data.rating_threshold=null",
                                  "data.domains.Food.columns.time=position"])
    assert cfg.data.min_user_interactions == 5
    assert cfg.run_dir == "runs/x"
    assert cfg.data.source == ["Kitchen", "Food"]
    assert cfg.data.rating_threshold is None
    assert cfg.data.domains["Food"].columns.time == "position"


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["data.root"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.min_user_interaction=3", "unknown config key 'data.min_user_interaction'.*did you mean 'data.min_user_interactions'"),
        ("min_user_interactions=3", "unknown config key 'min_user_interactions'.*did you mean 'data.min_user_interactions'"),
        ("data.min_user_interactions=three", "config key 'data.min_user_interactions'.*expected int, got str"),
        ("data.min_user_interactions=true", "expected int, got bool"),
        ("data.split=random", "config key 'data.split'.*'random' is not one of"),
        ("data.domains.Food.format=xml", "config key 'data.domains.Food.format'"),
        ("data.source=Kitchen", "config key 'data.source'.*expected a list"),
        ("data.domains.Food.colums.user=u", "unknown config key 'data.domains.Food.colums'.*did you mean 'data.domains.Food.columns'"),
    ],
)
def test_bad_values_name_the_key(base_file, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(base_file, [override])


def test_missing_required_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  domains: {}\n")
    with pytest.raises(ConfigError, match="missing required config value 'data.target'"):
        load_config(path)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("data:\n  domains:\n    Food: {format: csv}\n    Food: {format: tsv}\n  target: Food\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:4.*duplicate key 'Food'"):
        load_config(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_resolved_config_round_trips(base_file):
    cfg = load_config(base_file, ["seed=11"])
    dumped = yaml.safe_load(to_yaml(cfg))
    assert dumped["seed"] == 11
    rebuilt_path = base_file.with_name("resolved.yaml")
    rebuilt_path.write_text(to_yaml(cfg))
    assert load_config(rebuilt_path) == cfg
