"""The typed manifests other code reads by attribute: prepared/manifest.json (PreparedManifest) and
<run_dir>/pipeline.json (PipelineState) survive a round trip, and a malformed one is refused naming its
file (exit 2, ArtifactError)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trecsys.artifacts import read_manifest, write_manifest
from trecsys.errors import EXIT_BAD_INPUT, ArtifactError
from trecsys.pipeline import PipelineState, StageRecord
from trecsys.prepared.manifest import DomainRange, PreparedManifest
from trecsys.prepared.tables import load_prepared


def test_prepared_manifest_round_trips_and_types_what_stages_read(tiny_prepared):
    folder = tiny_prepared / "prepared"
    manifest = PreparedManifest.from_json(read_manifest(folder), folder / "manifest.json")
    assert PreparedManifest.from_json(json.loads(json.dumps(manifest.to_json())), folder) == manifest
    assert manifest.target == "Food" and manifest.encoder_name == manifest.encoder["name"]
    assert isinstance(manifest.ranges["Food"], DomainRange) and manifest.ranges["Food"].n_items > 0
    assert load_prepared(tiny_prepared).manifest == manifest


@pytest.mark.parametrize("change, named", [
    (lambda m: m.pop("target"), "target"),
    (lambda m: m.update(n_users="many"), "many"),
    (lambda m: m["domains"]["Food"].pop("item_stop"), "item_stop"),
    (lambda m: m.update(domains=[1, 2]), "items"),
])
def test_a_malformed_prepared_manifest_is_refused_naming_the_file(tiny_prepared, change, named):
    data = read_manifest(tiny_prepared / "prepared")
    change(data)
    path = Path("somewhere/prepared/manifest.json")
    with pytest.raises(ArtifactError, match=named) as caught:
        PreparedManifest.from_json(data, path)
    assert str(caught.value).startswith(f"{path}: not a prepared manifest")
    assert caught.value.exit_code == EXIT_BAD_INPUT


def test_pipeline_state_round_trips(tmp_path):
    state = PipelineState({"prepare": StageRecord("2026-12-02T00:00:00+0000", {}, "a" * 64),
                           "evaluate": StageRecord(None, {"prepare": "a" * 64, "distill": None}, None)})
    (tmp_path / "pipeline.json").write_text(json.dumps(state.to_json()))
    assert PipelineState.read(tmp_path) == state
    assert PipelineState.read(tmp_path / "nothing yet") == PipelineState()


@pytest.mark.parametrize("text, message", [
    ("[]", "not a trecsys pipeline record"),
    ('{"stages": {"prepare": 1}}', "malformed record of stage 'prepare'"),
    ('{"stages": {"prepare": {"upstream": {"x": 3}, "outputs": null}}}', "malformed record"),
])
def test_a_malformed_pipeline_state_is_refused_naming_the_file(tmp_path, text, message):
    (tmp_path / "pipeline.json").write_text(text)
    with pytest.raises(ArtifactError, match=message) as caught:
        PipelineState.read(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'pipeline.json'}: ")


def test_a_malformed_finetune_or_distill_record_is_refused_naming_the_file(tmp_path):
    from trecsys.model.manifests import DistillManifest, FinetuneManifest

    finetune = {"seed": 0, "target": "Food", "strategy": "auto", "chosen": "full", "chosen_by": "valid ndcg@10",
                "metrics": {}, "candidates": {"full": {"strategy": "full"}}, "init_from": "pretrain",
                "history": "target", "train_fraction": 1.0, "n_train_users": 1, "n_parameters": 1,
                "n_trainable": 1, "timings_s": {}, "n_trainable_by_part": {}}
    write_manifest(tmp_path / "finetune", "finetune-target", {}, [], finetune)
    with pytest.raises(ArtifactError, match="malformed finetune-target record") as caught:
        FinetuneManifest.read(tmp_path / "finetune")
    assert str(caught.value).startswith(f"{tmp_path / 'finetune' / 'manifest.json'}: ")

    distill = {name: None for name in DistillManifest.__dataclass_fields__}
    write_manifest(tmp_path / "distill", "distill", {}, [], {**distill, "unexpected": 1})
    assert DistillManifest.read(tmp_path / "distill").teacher is None  # every field there: read as written
    write_manifest(tmp_path / "distill", "distill", {}, [], {k: v for k, v in distill.items() if k != "teacher"})
    with pytest.raises(ArtifactError, match="no 'teacher'"):
        DistillManifest.read(tmp_path / "distill")
