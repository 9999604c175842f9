"""Memory-mapped sequences (trecsys/prepared/sequences.py) against the list-based code they replaced:
the same per-user items for every split and history, the same training windows, and training that
reads them with np.load(mmap_mode="r")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config, write_tiny_prepared
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.errors import ArtifactError
from trecsys.model.seqrec import PAD
from trecsys.prepared import sequences as sequences_module
from trecsys.prepared.context import target_sequences
from trecsys.prepared.sequences import Ragged, concat_rows
from trecsys.prepared.tables import domain_split, load_prepared, seen_items
from trecsys.train.losses import proposal_log_q
from trecsys.train.next_item import domain_windows, window_train_data
from trecsys.train.windows import training_windows, window_index

# ---------------------------------------------------------------------------------------------
# The list-based reference: the code that built sequences from the interactions frame in memory
# before flat arrays (trecsys 0.x, domain_split and target_sequences), kept here as the oracle.


def reference_domain_split(interactions: pd.DataFrame, name: str) -> dict:
    rows = interactions[interactions["domain"] == name]
    users = rows["user_idx"].to_numpy()
    items = rows["item_idx"].to_numpy().astype(np.int64)
    split = rows["split"].to_numpy()
    user_idx, starts = np.unique(users, return_index=True)
    bounds = np.append(starts, len(users))
    out = {s: [] for s in ("train", "valid", "test", "input")}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        for s in out:
            out[s].append(items[lo:hi][split[lo:hi] == s])
    return {"user_idx": user_idx, **out}


def reference_all_domains(interactions: pd.DataFrame, domains: list[str], target_users: np.ndarray,
                          start: int, stop: int) -> dict:
    rows = interactions[interactions["domain"].isin(domains) & interactions["user_idx"].isin(target_users)]
    users = rows["user_idx"].to_numpy()
    items = rows["item_idx"].to_numpy().astype(np.int64)
    in_target = (items >= start) & (items < stop)
    kinds = rows["split"].to_numpy()
    out = {"train": [], "valid": [], "test": []}
    for lo, hi in zip(np.searchsorted(users, target_users), np.searchsorted(users, target_users, side="right"),
                      strict=True):
        seq, target, kind = items[lo:hi], in_target[lo:hi], kinds[lo:hi]
        train_positions = np.flatnonzero(target & (kind == "train"))
        if len(train_positions) == 0:
            out["train"].append(seq[:0])
        else:
            end = train_positions[-1] + 1
            out["train"].append(seq[:end][~(target[:end] & (kind[:end] != "train"))])
        for split, visible in (("valid", ("train", "input")), ("test", ("train", "input", "valid"))):
            held = np.flatnonzero(target & (kind == split))
            end = held[0] if len(held) else len(seq)
            out[split].append(seq[:end][~target[:end] | np.isin(kind[:end], visible)])
    return out


def reference_training_windows(sequences, max_seq_len, stride=None):
    stride = max_seq_len if stride is None else stride
    width = max_seq_len + 1
    kept = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) >= 2]
    if not kept:
        return np.full((0, width), PAD, dtype=np.int64), np.zeros(0, dtype=np.int64)
    lengths = np.array([len(s) for s in kept], dtype=np.int64)
    flat = np.concatenate(kept)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    per_user = (lengths - 2) // stride + 1
    user = np.repeat(np.arange(len(kept)), per_user)
    first_window = np.repeat(np.cumsum(per_user) - per_user, per_user)
    back = np.arange(len(user)) - first_window
    end = lengths[user] - back * stride
    columns = (starts[user] + end)[:, None] - width + np.arange(width)[None, :]
    inside = columns >= starts[user][:, None]
    new = np.minimum(stride, end - 1)
    return np.where(inside, flat[np.maximum(columns, 0)], PAD), new


def same_rows(ragged, lists) -> None:
    assert len(ragged) == len(lists)
    for got, want in zip(ragged, lists, strict=True):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------


def test_domain_split_from_arrays_equals_the_list_based_one(tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    assert isinstance(prepared.sequences.users, np.memmap)
    for name in prepared.domains:
        split = domain_split(prepared, name)
        want = reference_domain_split(prepared.interactions, name)
        np.testing.assert_array_equal(split.user_idx, want["user_idx"])
        assert isinstance(split.train.items, np.memmap) and split.train.items.dtype == np.int32
        for part in ("train", "valid", "test"):
            same_rows(getattr(split, part), want[part])
        assert split.input is None  # the fixture has no held-out users
        same_rows(split.history("test"), [np.concatenate([t, v]) for t, v in zip(want["train"], want["valid"],
                                                                                  strict=True)])


def test_target_histories_from_arrays_equal_the_list_based_ones(tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    food = prepared.domains["Food"]
    want = reference_all_domains(prepared.interactions, ["Books", "Games", "Food"],
                                 domain_split(prepared, "Food").user_idx, food.item_start, food.item_stop)
    seqs = target_sequences(prepared, "all_domains")
    same_rows(seqs.train, want["train"])
    for split in ("valid", "test"):
        same_rows(seqs.histories[split], want[split])
    # The source items really are there (interleaved context), not only the target's.
    assert any(((s < food.item_start) | (s >= food.item_stop)).any() for s in seqs.train)


def test_input_users_and_unusual_orders_match_the_reference(tmp_path):
    """Held-out users (split `input`), a source item after the target's held-out items, a user with
    no target training item: the vectorised writer against the per-user reference."""
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir, n_users=30)
    inter = pd.read_parquet(run_dir / "prepared" / "interactions.parquet")
    food = inter["domain"] == "Food"
    first_food_users = inter.loc[food, "user_idx"].unique()[:4]
    held = food & inter["user_idx"].isin(first_food_users[:2]) & (inter["split"] == "train")
    inter.loc[held, "split"] = "input"  # two held-out users: histories read input, never train
    no_train = food & (inter["user_idx"] == first_food_users[2]) & (inter["split"] == "train")
    inter = inter[~no_train].copy()  # a target user with held-out items and no training item
    # Domains interleaved at random in time (each domain's own order kept), so source items fall
    # between and after a user's target valid and test items.
    rng = np.random.default_rng(3)
    inter["key"] = rng.random(len(inter))
    inter["key"] = inter.groupby(["user_idx", "domain"])["key"].transform(lambda k: np.sort(k.to_numpy()))
    inter = inter.sort_values(["user_idx", "key"], kind="stable").drop(columns="key").reset_index(drop=True)
    import pyarrow as pa

    table = pa.Table.from_pandas(inter, preserve_index=False)
    ranges = {"Books": (0, 30), "Games": (30, 54), "Food": (54, 70)}
    out = tmp_path / "arrays"
    sequences_module.write_sequences(out, table, ranges, ["Books", "Games"], "Food", 70)
    store = sequences_module.Sequences(out)
    rows = store.rows(2)
    want = reference_domain_split(inter, "Food")
    np.testing.assert_array_equal(store.users[rows], want["user_idx"])
    for part in ("train", "valid", "test", "input"):
        same_rows(sequences_module.domain_rows(store.part(part), rows), want[part])
    context = reference_all_domains(inter, ["Books", "Games", "Food"], want["user_idx"], 54, 70)
    for split in ("train", "valid", "test"):
        same_rows(store.part(f"all_domains.{split}"), context[split])
    assert any(len(i) for i in want["input"])
    assert any(len(t) == 0 for t in context["train"])
    assert any(len(v) < len(t) for v, t in zip(context["valid"], context["test"], strict=True))
    # by_user: every user's items, all domains and splits, in the table's order
    by_user = store.part(sequences_module.BY_USER)
    assert len(by_user) == inter["user_idx"].max() + 1
    for user in range(len(by_user)):
        np.testing.assert_array_equal(by_user[user], inter.loc[inter["user_idx"] == user, "item_idx"].to_numpy())


def test_by_user_rows_follow_user_idx_when_the_table_is_not_sorted_by_user(tmp_path):
    import pyarrow as pa

    table = pa.table({"user_idx": pa.array([2, 0, 2, 0, 3], pa.int64()), "item_idx": pa.array([5, 1, 6, 2, 7], pa.int32()),
                      "domain": ["A"] * 5, "split": ["train"] * 5})
    sequences_module.write_sequences(tmp_path, table, {"A": (0, 8)}, [], "A", 8)
    by_user = sequences_module.Sequences(tmp_path).part(sequences_module.BY_USER)
    assert [by_user[u].tolist() for u in range(len(by_user))] == [[1, 2], [], [5, 6], [7]]


def test_windows_from_mmap_equal_the_previous_windows(tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    for name in prepared.domains:
        train = domain_split(prepared, name).train
        lists = list(train)
        for max_len, stride in ((3, None), (4, 1), (6, 2), (20, 20)):
            want, want_new = reference_training_windows(lists, max_len, stride)
            got, got_new = training_windows(train, max_len, stride)
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(got_new, want_new)
            index = window_index(train.take(np.arange(0, len(train), 2)), max_len, stride)  # a subset of users
            sub, sub_new = reference_training_windows(lists[::2], max_len, stride)
            np.testing.assert_array_equal(index.gather(np.arange(len(index))[::-1]), sub[::-1])
            np.testing.assert_array_equal(index.new, sub_new)


def test_training_batches_are_gathered_from_the_memory_map(tiny_prepared, monkeypatch):
    """window_train_data's batches equal rows of the materialised windows, and the items they are
    cut from are the np.load(mmap_mode='r') array prepare wrote."""
    from trecsys.config import TrainConfig

    loads = []
    real_load = np.load
    monkeypatch.setattr(sequences_module.np, "load", lambda *a, **k: loads.append(k.get("mmap_mode")) or real_load(*a, **k))
    prepared = load_prepared(tiny_prepared)
    split = domain_split(prepared, "Books")
    part = domain_windows(split.domain, split.train, 5, TrainConfig(window_stride=2), "cpu")
    assert loads and set(loads) == {"r"}
    assert isinstance(part.windows.items, np.memmap)
    want, want_new = reference_training_windows(list(split.train), 5, 2)
    data = window_train_data([part])
    batch = data.make_batch(np.array([3, 0, 7]))
    np.testing.assert_array_equal(batch["new"].numpy(), want_new[[3, 0, 7]])
    width = batch["windows"].shape[1]
    np.testing.assert_array_equal(batch["windows"].numpy(), want[[3, 0, 7]][:, -width:])
    np.testing.assert_array_equal(data.n_terms, part.label_counts())
    # loss: sampled's proposal counts the domain's training items as the concatenated lists did.
    sampled = domain_windows(split.domain, split.train, 5, TrainConfig(loss="sampled"), "cpu")
    flat = np.concatenate(list(split.train))
    counts = np.bincount(flat[(flat >= split.domain.item_start) & (flat < split.domain.item_stop)]
                         - split.domain.item_start, minlength=split.domain.n_items)
    assert torch.equal(sampled.log_q, proposal_log_q(counts))


def test_ragged_helpers():
    a = Ragged.from_lists([np.array([1, 2]), np.array([], dtype=np.int64), np.array([3])])
    b = Ragged.from_lists([np.array([9]), np.array([8, 7]), np.array([], dtype=np.int64)])
    same_rows(concat_rows(a, b), [[1, 2, 9], [8, 7], [3]])
    same_rows(a.take(np.array([2, 0])), [[3], [1, 2]])
    np.testing.assert_array_equal(a.take(np.array([2, 0])).flat(), [3, 1, 2])
    assert not Ragged.from_lists([np.array([], dtype=np.int64)]).any_items()
    # Passes over every item go a block of rows at a time, with the same result as all at once.
    rows = [np.array([5, 1, 5]), np.array([], dtype=np.int64), np.array([2]), np.array([7, 5])]
    many = Ragged.from_lists(rows)
    assert [len(block) for block in many.chunks(rows_per_chunk=2)] == [3, 3]
    np.testing.assert_array_equal(many.item_counts(1, 6), [1, 1, 0, 0, 3])
    np.testing.assert_array_equal(seen_items(many), [1, 2, 5, 7])
    np.testing.assert_array_equal(seen_items(many), seen_items(rows))


def test_old_prepared_folder_without_arrays_says_rerun_prepare(tmp_path, monkeypatch):
    """A prepared folder written before flat arrays (its manifest lists no sequences/): exit 2 and
    one line that says what to do."""
    import conftest

    run_dir = tmp_path / "run"
    monkeypatch.setattr(conftest, "write_sequences", lambda *args: None)
    conftest.write_tiny_prepared(run_dir)
    with pytest.raises(ArtifactError, match="predates this version's memory-mapped sequences: re-run `trec prepare`"):
        load_prepared(run_dir)
    config = tiny_config(run_dir, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(app, ["pretrain-source", "-c", str(config)])
    assert result.exit_code == 2
    assert "re-run `trec prepare`" in result.output and "sequences" in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
