"""scripts/bench_quality.py's own logic: the RecBole export keeps the prepared split, RecBole's lists
map back to the catalogue, and the paired difference is kept − best other."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_tiny_prepared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import bench_quality as B  # noqa: E402

from trecsys.prepared.tables import load_prepared  # noqa: E402
from trecsys.stages.evaluate import eval_users  # noqa: E402


def test_recbole_export_holds_out_the_same_items_and_lists_map_back(tmp_path):
    write_tiny_prepared(tmp_path / "run")
    prepared = load_prepared(tmp_path / "run")
    B.export_for_recbole(prepared, tmp_path / "data", "bench")
    table = pd.read_csv(tmp_path / "data" / "bench" / "bench.inter", sep="\t", dtype=str)
    rows = prepared.interactions[prepared.interactions["domain"] == prepared.target]
    items = prepared.items.set_index("item_idx")["item_id"]
    for user, group in rows.groupby("user_id"):
        exported = table[table["user_id:token"] == str(user)]
        order = exported.sort_values("timestamp:float", key=lambda s: s.astype(int))["item_id:token"].tolist()
        # RecBole's leave-one-out by time: the last item is test, the one before valid.
        for split, position in (("test", -1), ("valid", -2)):
            held = group.loc[group["split"] == split, "item_idx"]
            if len(held) and len(order) >= -position:
                assert order[position] == str(items[held.iloc[0]])
    users = eval_users(prepared, "test")
    domain = prepared.domain(prepared.target)
    first = prepared.interactions.drop_duplicates("user_idx").set_index("user_idx")["user_id"].astype(str)
    target_ids = [str(items[domain.item_start + j]) for j in (3, 0, 7)]
    lists = {first[users.user_idx[0]]: target_ids}
    topk, missing = B.recbole_topk(lists, prepared, users, 5)
    assert topk[0].tolist() == [3, 0, 7, -1, -1] and missing == len(users.user_idx) - 1
    assert (topk[1:] == -1).all()


def test_paired_difference_is_kept_minus_the_best_other_row():
    rng = np.random.default_rng(0)
    base = rng.random(400)
    rows = {name: {key: np.clip(base + shift + 0.01 * rng.standard_normal(400), 0, 1) for key in B.SHOWN}
            for name, shift in (("a", 0.0), ("b", 0.05), ("kept", 0.2))}
    frame, paired = B.table_for_rule(rows, "kept", 200, 0)
    assert paired["best_other"] == "b" and paired["low"] > 0 and paired["delta"] > 0.1
    assert list(frame["row"]) == ["a", "b", "kept"]
    assert "met" in B.markdown(frame, paired, "t")
    # ... and the kept model against every other row, each with its own paired CI.
    assert list(paired["each"]) == ["b", "a"] and paired["each"]["a"]["delta"] > paired["each"]["b"]["delta"]
    assert paired["each"]["b"]["delta"] == paired["delta"]
    b = paired["each"]["b"]
    assert f"Kept − each other row: `b` {b['delta']:+.4f} [{b['low']:+.4f}, {b['high']:+.4f}]" in B.markdown(
        frame, paired, "t")
    # A row identical to the kept one on every user (fusion that kept its base alone) is skipped.
    rows["same as kept"] = {key: values.copy() for key, values in rows["kept"].items()}
    _, paired = B.table_for_rule(rows, "kept", 200, 0)
    assert paired["best_other"] == "b"


def test_set_overrides_reach_every_trec_command_of_their_dataset_only(tmp_path, monkeypatch):
    extra = B.dataset_overrides(["k2f:finetune.train.epochs=20", "k2f:data.source=[A,B]", "ml:seed=1"],
                                ["k2f", "ml"])
    assert extra == {"k2f": ["finetune.train.epochs=20", "data.source=[A,B]"], "ml": ["seed=1"]}
    for bad in ("k2f", "k2f:epochs", "other:seed=1"):
        with pytest.raises(ValueError, match="--set"):
            B.dataset_overrides([bad], ["k2f", "ml"])
    calls = []
    monkeypatch.setattr(B, "trec", lambda *args: calls.append(args) or 0.0)
    ds = B.Dataset("k2f", "configs/kitchen_to_food.yaml", ["full", "scratch"], ["data.root=X"], has_source=True,
                   extra=extra["k2f"])
    B.train(ds, tmp_path / "run", B.SCHEDULES["quick"], retrain=False)
    assert [c[0] for c in calls] == ["prepare", "pretrain-source", "finetune-target"]
    for call in calls:  # last, so that they win over the schedule's epochs
        assert list(call[-len(ds.extra):]) == ds.extra


def test_the_source_control_pretrains_on_the_target_alone_in_a_sibling_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(B, "trec", lambda *args: calls.append(args) or 1.0)
    ds = B.Dataset("k2f", "configs/kitchen_to_food.yaml", ["full", "scratch", "fusion"], ["data.root=X"],
                   has_source=True, extra=["pretrain.data=both"])
    run_dir, seconds = B.train_control(ds, tmp_path, B.SCHEDULES["full"], retrain=False)
    assert run_dir == tmp_path / "k2f.target_only"
    assert set(seconds) == {"control prepare", "control pretrain", "control finetune"}
    pretrain, finetune = calls[1], calls[2]
    assert f"run_dir={run_dir}" in pretrain and pretrain[-1] == "pretrain.data=target"  # wins over the lever's
    assert "finetune.candidates=[full]" in finetune
