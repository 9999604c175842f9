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
                                  "data.source=[Kitchen]", "data.target=Food", "data.rating_threshold=null",
                                  "data.domains.Food.columns.time=position"])
    assert cfg.data.min_user_interactions == 5
    assert cfg.run_dir == "runs/x"
    assert cfg.data.source == ["Kitchen"]
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


def test_yaml_values_follow_the_core_schema(tmp_path):
    """YAML 1.2 core schema: `3e-4` is a float, only true/false are booleans (a bool key still takes
    yes/no/on/off), and a string that looks like another type in YAML 1.1 prints quoted."""
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  domains:\n    'NO': {format: synthetic}\n    yes: {format: synthetic}\n"
                    "  target: NO\n  source: [yes]\npretrain:\n  train: {lr: 3e-4, weight_decay: 1E-2}\n"
                    "evaluate: {exclude_seen: No}\nrecommend: {exclude_seen: ON}\nseed: 010\n")
    cfg = load_config(path, ["finetune.train.lr=1e-3", "distill.kd_ratio=5e-1", "model.item_ids=yes"])
    assert cfg.pretrain.train.lr == 3e-4 and cfg.pretrain.train.weight_decay == 0.01
    assert cfg.finetune.train.lr == 1e-3 and cfg.distill.kd_ratio == 0.5
    assert cfg.data.target == "NO" and cfg.data.source == ["yes"] and set(cfg.data.domains) == {"NO", "yes"}
    assert cfg.evaluate.exclude_seen is False and cfg.recommend.exclude_seen is True and cfg.model.item_ids is True
    assert cfg.seed == 10  # not YAML 1.1's octal 8
    assert load_config(path, ["data.target=yes", "data.source=[NO]"]).data.target == "yes"
    printed = to_yaml(cfg)
    assert "target: 'NO'" in printed and yaml.safe_load(printed)["data"]["target"] == "NO"
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    assert load_config(again) == cfg
    with pytest.raises(ConfigError, match=r"'evaluate.exclude_seen'.*expected bool, got str 'maybe'"):
        load_config(path, ["evaluate.exclude_seen=maybe"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.train.lr=fast", "config key 'pretrain.train.lr' on the command line \\(pretrain.train.lr=fast\\): expected float"),
        ("data.min_user_interaction=3", "unknown config key 'data.min_user_interaction' on the command line \\(data.min_user_interaction=3\\)"),
        ("pretrain.train={lr: -1}", "config key 'pretrain.train.lr' on the command line \\(pretrain.train={lr: -1}\\): must be > 0"),
        ("model.n_heads=3", "config key 'model.n_heads' on the command line \\(model.n_heads=3\\): 3 heads do not divide"),
        ("data.source=[Kitchen, 3]", "config key 'data.source\\[1\\]' on the command line"),
    ],
)
def test_errors_in_overrides_name_the_command_line_not_the_file(base_file, override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(base_file, ["seed=1", override])
    assert str(base_file) not in str(caught.value)


def test_errors_in_the_file_still_name_the_file(base_file):
    base_file.write_text(BASE + "pretrain: {train: {lr: fast}}\n")
    with pytest.raises(ConfigError, match=f"'pretrain.train.lr' in {base_file}: expected float"):
        load_config(base_file, ["pretrain.train.epochs=2"])
