"""The model family, its losses, training windows and checkpoints, on tiny random data (seconds)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trecsys.config import ExperimentConfig, ModelConfig, build
from trecsys.errors import ArtifactError, ConfigError
from trecsys.model.checkpoint import load_checkpoint, save_checkpoint, save_weights
from trecsys.model.seqrec import SeqRecModel
from trecsys.train.losses import (
    chunked_cross_entropy,
    proposal_log_q,
    sampled_softmax_loss,
    softmax_over_candidates,
)
from trecsys.train.windows import (
    history_batch,
    label_counts,
    training_windows,
    trim_left_padding,
    window_tensors,
)

TEXT_DIM, N_ITEMS, L = 24, 40, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(**overrides) -> ModelConfig:
    base = dict(d_model=16, n_layers=2, n_heads=2, max_seq_len=L, dropout=0.0, n_experts=3)
    return ModelConfig(**{**base, **overrides})


def make_model(seed: int = 0, n_items: int = N_ITEMS, **overrides) -> SeqRecModel:
    torch.manual_seed(seed)
    model = SeqRecModel(small_config(**overrides), TEXT_DIM, n_items)
    model.set_item_text(F.normalize(torch.randn(n_items, TEXT_DIM, generator=torch.Generator().manual_seed(1)), dim=-1))
    return model.eval()


def random_seq(batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, N_ITEMS, (batch, L), generator=g)
    seq[1, :3] = -1  # a left-padded row
    seq[2, :-1] = -1  # a single-item row
    return seq


# ---------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_validation():
    cfg = ModelConfig()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len, cfg.adaptor) == (64, 2, 2, 50, "moe")
    data = {"domains": {"a": {"format": "synthetic"}}, "target": "a"}
    built = build(ExperimentConfig, {"data": data, "model": {"adaptor": "mlp", "score": "cosine"}})
    assert built.model.adaptor == "mlp" and built.model.score == "cosine"
    with pytest.raises(ConfigError, match=r"model\.item_text"):
        build(ExperimentConfig, {"data": data, "model": {"item_text": False, "item_ids": False}})
    with pytest.raises(ConfigError, match=r"model\.n_heads"):
        build(ExperimentConfig, {"data": data, "model": {"d_model": 10, "n_heads": 3}})
    with pytest.raises(ConfigError, match=r"model\.adaptor"):
        build(ExperimentConfig, {"data": data, "model": {"adaptor": "lstm"}})


# ---------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("adaptor", ["moe", "mlp", "linear"])
def test_shapes_for_each_adaptor(adaptor):
    model = make_model(adaptor=adaptor)
    seq = random_seq()
    states = model.encode(seq)
    assert states.shape == (4, L, 16)
    assert model.user_state(seq).shape == (4, 16)
    reps = model.item_reps(5, 25)
    assert reps.shape == (20, 16)
    assert model.score(model.user_state(seq), reps).shape == (4, 20)
    assert torch.isfinite(states).all()
    # Padded positions are zeros; real positions are not.
    assert (states[1, :3] == 0).all() and (states[1, 3:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_user_state_is_the_last_state_bit_for_bit(n_layers):
    # user_state runs the last block for the last position only; rankings rely on it giving the
    # very same floats as the whole encoding (the tie rule orders equal scores by index).
    model = make_model(n_layers=n_layers).eval()
    seq = random_seq(batch=64, seed=1)
    seq[5] = -1  # a user without history
    with torch.no_grad():
        assert torch.equal(model.user_state(seq), model.encode(seq)[:, -1])
        table = model.item_reps(0, N_ITEMS)  # row i = item i: the ranking's precomputed tower
        assert torch.equal(model.user_state(seq, table), model.encode(seq, table)[:, -1])
        # Nor does a user's state depend on the batch it is encoded in (a shard's last one may hold one user).
        states = model.user_state(seq)
        for size in (1, 2, 3, 5):
            assert torch.equal(model.user_state(seq[:size]), states[:size]), size


def test_no_future_leakage():
    model = make_model()
    seq = random_seq()
    before = model.encode(seq)
    for t in range(L - 1):
        changed = seq.clone()
        changed[:, t + 1] = (changed[:, t + 1].clamp(min=0) + 7) % N_ITEMS
        after = model.encode(changed)
        assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-6), f"state at {t} saw item {t + 1}"
        assert not torch.allclose(before[0, t + 1], after[0, t + 1])


def test_padding_is_inert():
    model = make_model()
    items = torch.tensor([3, 9, 1, 30, 12])
    padded_a = torch.cat([torch.full((3,), -1), items])[None]  # (1, 8)
    padded_b = torch.cat([torch.full((1,), -1), items, torch.tensor([0, 0])])[None]  # other padding, later items
    state_a = model.encode(padded_a)[0, 3:]
    state_b = model.encode(padded_b)[0, 1:6]
    assert torch.allclose(state_a, state_b, atol=1e-6)
    # No history: a finite, zero state, so every item scores 0.
    empty = model.user_state(torch.full((2, L), -1))
    assert torch.isfinite(empty).all() and (empty == 0).all()


def test_text_model_is_inductive_and_id_model_has_a_table():
    text_only = make_model()
    assert not any("item_id" in name for name, _ in text_only.named_parameters())
    # A catalogue it never saw (other size, other items) is rankable from text alone.
    new_text = F.normalize(torch.randn(13, TEXT_DIM), dim=-1)
    text_only.set_item_text(new_text)
    scores = text_only.score(text_only.user_state(torch.tensor([[-1] * (L - 2) + [0, 5]])), text_only.item_reps(0, 13))
    assert scores.shape == (1, 13) and torch.isfinite(scores).all() and scores.std() > 0

    with_ids = make_model(item_ids=True)
    assert with_ids.item_id.weight.shape == (N_ITEMS + 1, 16)  # row 0: no ID
    with pytest.raises(ArtifactError, match="ID table"):
        with_ids.set_item_text(new_text)
    ids_only = SeqRecModel(small_config(item_text=False, item_ids=True), TEXT_DIM, N_ITEMS)
    assert ids_only.adaptor is None and ids_only.item_reps(0, N_ITEMS).shape == (N_ITEMS, 16)
    with pytest.raises(ArtifactError, match="encoder"):
        text_only.set_item_text(torch.randn(N_ITEMS, TEXT_DIM + 1))


def test_the_id_table_covers_the_trained_items_and_the_others_get_their_text():
    seen = [3, 4, 7]
    torch.manual_seed(0)
    model = SeqRecModel(small_config(item_ids=True), TEXT_DIM, N_ITEMS, id_items=seen).eval()
    text = F.normalize(torch.randn(N_ITEMS, TEXT_DIM), dim=-1)
    model.set_item_text(text)
    assert model.item_id.weight.shape == (len(seen) + 1, 16)
    assert model.id_items().tolist() == seen
    with torch.no_grad():
        model.item_id.weight[1:] = 1.0  # make the IDs matter
        by_text = model.item_norm(model.adaptor(text))
        reps = model.item_reps(0, N_ITEMS)
    unseen = [i for i in range(N_ITEMS) if i not in seen]
    assert torch.allclose(reps[unseen], by_text[unseen])  # their text representation, no ID
    assert not torch.allclose(reps[seen], by_text[seen])
    counts = model.parameter_counts()
    assert counts["ids"] == (len(seen) + 1) * 16 and sum(counts.values()) == model.num_parameters()
    assert counts["text"] == sum(p.numel() for p in model.adaptor.parameters())

    ids_only = SeqRecModel(small_config(item_text=False, item_ids=True), TEXT_DIM, N_ITEMS, id_items=seen)
    assert ids_only.items_without_representation(0, N_ITEMS) == N_ITEMS - len(seen)
    assert ids_only.items_without_representation(3, 5) == 0 and model.items_without_representation(0, N_ITEMS) == 0


def test_checkpoints_keep_the_id_rows_and_old_full_tables_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    model = SeqRecModel(small_config(item_ids=True), TEXT_DIM, N_ITEMS, id_items=[1, 5, 6])
    save_checkpoint(model, tmp_path / "new", extra={})
    loaded, info = load_checkpoint(tmp_path / "new")
    assert info.n_id_items == 3 and loaded.id_items().tolist() == [1, 5, 6]
    assert torch.equal(loaded.item_id.weight, model.item_id.weight)
    # A checkpoint written before id_row: an ID row for every item, no zero row.
    tensors = load_file(str(tmp_path / "new" / "model.safetensors"))
    del tensors["id_row"]
    tensors["item_id.weight"] = torch.randn(N_ITEMS, 16)
    (tmp_path / "old").mkdir()
    save_file(tensors, str(tmp_path / "old" / "model.safetensors"))
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    del config["n_id_items"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    old, _ = load_checkpoint(tmp_path / "old")
    assert old.id_items().tolist() == list(range(N_ITEMS))
    assert torch.equal(old.item_id.weight[old.id_row], tensors["item_id.weight"])


def test_cosine_score_uses_temperature():
    model = make_model(score="cosine", temperature=0.5)
    states, reps = torch.randn(3, 16), torch.randn(5, 16)
    expected = F.normalize(states, dim=-1) @ F.normalize(reps, dim=-1).T / 0.5
    assert torch.allclose(model.score(states, reps), expected, atol=1e-6)
    assert model.num_parameters() > model.num_parameters(trainable_only=True) - 1
    for p in model.adaptor.parameters():
        p.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) < model.num_parameters()


# ---------------------------------------------------------------------------------------------
# Losses


def _full_ce(states, targets, reps, score_fn):
    keep = targets >= 0
    return F.cross_entropy(score_fn(states[keep], reps), targets[keep])


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_chunked_cross_entropy_equals_full(score):
    model = make_model(score=score)
    g = torch.Generator().manual_seed(3)
    states0, reps0 = torch.randn(30, 16, generator=g), torch.randn(N_ITEMS, 16, generator=g)
    targets = torch.randint(0, N_ITEMS, (30,), generator=g)
    targets[::7] = -1  # ignored rows
    ref_states, ref_reps = states0.clone().requires_grad_(), reps0.clone().requires_grad_()
    reference = _full_ce(ref_states, targets, ref_reps, model.score)
    reference.backward()
    for chunk in (1, 7, 16, N_ITEMS - 1, N_ITEMS, 1000):
        states, reps = states0.clone().requires_grad_(), reps0.clone().requires_grad_()
        loss = chunked_cross_entropy(states, targets, reps, model.score, chunk_size=chunk)
        loss.backward()
        assert torch.allclose(loss, reference, atol=1e-5), chunk
        assert torch.allclose(states.grad, ref_states.grad, atol=1e-6), chunk
        assert torch.allclose(reps.grad, ref_reps.grad, atol=1e-6), chunk


def test_chunked_cross_entropy_never_scores_more_than_a_chunk():
    model = make_model()
    widths = []

    def recording_score(states, reps):
        widths.append(reps.shape[-2])
        return model.score(states, reps)

    states = torch.randn(30, 16, requires_grad=True)
    reps = torch.randn(N_ITEMS, 16, requires_grad=True)
    chunked_cross_entropy(states, torch.randint(0, N_ITEMS, (30,)), reps, recording_score, chunk_size=8).backward()
    # Forward and backward each visit all 5 chunks; the target scores are (N, 1) pairs.
    assert max(widths) <= 8 and sum(w for w in widths if w > 1) == 2 * N_ITEMS


def test_sampled_softmax_limits():
    model = make_model()
    g = torch.Generator().manual_seed(4)
    states, reps = torch.randn(20, 16, generator=g) * 0.3, torch.randn(N_ITEMS, 16, generator=g) * 0.3
    # Scores that grow with the item index, like the skewed proposal below: the case logQ is for.
    states[:, 0] += 1.0
    reps[:, 0] += torch.linspace(-1.5, 1.5, N_ITEMS)
    targets = torch.randint(0, N_ITEMS, (20,), generator=g)
    full = _full_ce(states, targets, reps, model.score)
    # Every item once as a negative, log expected count 0: exactly the full cross-entropy.
    every = softmax_over_candidates(states, targets, reps, model.score, torch.arange(N_ITEMS), torch.zeros(N_ITEMS))
    assert torch.allclose(every, full, atol=1e-5)
    # Many samples from a uniform or a skewed proposal: the logQ correction makes both converge to it.
    for power in (0.0, 1.0):
        log_q = proposal_log_q(np.arange(N_ITEMS) ** 2, power=power)
        sampled = sampled_softmax_loss(states, targets, reps.__getitem__, model.score, 50_000, log_q, torch.Generator().manual_seed(5))
        assert abs(sampled.item() - full.item()) < 0.02, power
    # Without the correction a skewed proposal is badly biased: the test above can fail.
    log_q = proposal_log_q(np.arange(N_ITEMS) ** 2, power=1.0)
    negatives = torch.multinomial(log_q.exp(), 50_000, replacement=True, generator=torch.Generator().manual_seed(5))
    uncorrected = softmax_over_candidates(states, targets, reps, model.score, negatives,
                                          torch.full((50_000,), np.log(50_000 / N_ITEMS)))
    assert abs(uncorrected.item() - full.item()) > 0.05


def tiny_sequences(n_users: int = 60, seed: int = 0) -> list[np.ndarray]:
    """Users walk the catalogue in steps of +1 or +2: the next item is predictable from the last."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        start, length = rng.integers(0, N_ITEMS), rng.integers(3, 20)
        out.append((start + np.cumsum(rng.integers(1, 3, size=length))) % N_ITEMS)
    return out


@pytest.mark.parametrize("loss_name", ["full", "sampled"])
def test_loss_decreases_on_tiny_data(loss_name):
    model = make_model(seed=2, dropout=0.1).train()
    inputs, labels = window_tensors(training_windows(tiny_sequences(), L)[0])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    log_q, gen = proposal_log_q(np.zeros(N_ITEMS)), torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        states = model.encode(inputs)
        if loss_name == "full":
            loss = chunked_cross_entropy(states, labels, model.item_reps(0, N_ITEMS), model.score, chunk_size=16)
        else:
            loss = sampled_softmax_loss(states, labels, model.item_reps_at, model.score, 16, log_q, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


# ---------------------------------------------------------------------------------------------
# Windows and history batches


def test_windows_keep_every_pair_once():
    max_len = 4
    sequences = [np.arange(100, 100 + n) for n in (0, 1, 2, 4, 5, 6, 9, 13)]
    windows, new = training_windows(sequences, max_len)
    assert (new == max_len).sum() >= len(new) - 6  # non-overlapping: all labels new but each user's first window
    assert windows.shape[1] == max_len + 1 and windows.dtype == np.int64
    inputs, labels = (t.numpy() for t in window_tensors(windows))
    assert (labels[inputs < 0] == -1).all()  # a user's first item has no history: never a label
    seen = []
    for w_in, w_lab in zip(inputs, labels, strict=True):
        real = w_in[w_in >= 0]
        assert (np.diff(real) == 1).all() and (w_in[: max_len - len(real)] == -1).all()  # left-padded runs
        for t in np.flatnonzero(w_lab >= 0):
            history = w_in[: t + 1]
            history = history[history >= 0]
            assert history[-1] == w_lab[t] - 1  # the history ends right before its label
            seen.append(int(w_lab[t]))
    expected = [int(i) for s in sequences if len(s) >= 2 for i in s[1:]]
    assert sorted(seen) == sorted(expected)  # each (history -> next) pair exactly once
    # The latest items of a user form a full window.
    assert (windows[np.flatnonzero(windows[:, -1] == 112)[0]] == np.arange(108, 113)).all()
    assert training_windows([np.arange(1)], 4)[0].shape == (0, 5)


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_overlapping_windows_give_each_label_its_history_once(stride):
    """Every (history -> next) pair is trained exactly once, and the label at sequence position p
    reads min(p, max_seq_len - stride + 1) items of history at least: all of min(p, max_seq_len) at stride 1."""
    max_len = 4
    sequences = [np.arange(1000 * u, 1000 * u + n) for u, n in enumerate((0, 1, 2, 4, 5, 6, 9, 13))]
    windows, new = training_windows(sequences, max_len, stride)
    inputs, labels = (t.numpy() for t in window_tensors(windows, new=new))
    assert (label_counts(windows, new=new) == (labels >= 0).sum(axis=1)).all()
    histories = {}
    for w_in, w_lab in zip(inputs, labels, strict=True):
        for t in np.flatnonzero(w_lab >= 0):
            history = w_in[: t + 1]
            history = history[history >= 0]
            assert history[-1] == w_lab[t] - 1
            assert w_lab[t] not in histories  # each label once
            histories[int(w_lab[t])] = len(history)
    expected = {int(i): p for s in sequences if len(s) >= 2 for p, i in enumerate(s) if p >= 1}
    assert set(histories) == set(expected)
    for label, position in expected.items():
        assert histories[label] >= min(position, max_len - stride + 1)
        if stride == 1:
            assert histories[label] == min(position, max_len)
    # Left-trimming a batch (as training does) keeps the same labels.
    trimmed = trim_left_padding(torch.from_numpy(windows[-3:]))
    assert torch.equal(window_tensors(trimmed, new=new[-3:])[1][:, -trimmed.shape[1] + 1:],
                       window_tensors(windows[-3:], new=new[-3:])[1][:, -trimmed.shape[1] + 1:])
    with pytest.raises(ValueError):
        training_windows(sequences, max_len, max_len + 1)


def test_window_tensors_and_history_batch():
    windows = np.array([[-1, -1, 12, 13, 14]])
    inputs, labels = window_tensors(windows, item_start=10)
    assert inputs.tolist() == [[-1, -1, 12, 13]] and labels.tolist() == [[-1, -1, 3, 4]]
    batch = history_batch([np.arange(10), np.array([], dtype=np.int64), np.array([7, 8])], 4)
    assert batch.dtype == torch.long
    assert batch.tolist() == [[6, 7, 8, 9], [-1, -1, -1, -1], [-1, -1, 7, 8]]


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip(tmp_path):
    model = make_model(item_ids=True, adaptor="mlp", score="cosine")
    save_checkpoint(model, tmp_path / "ckpt", extra={"stage": "pretrain-source", "prepared": "abc"})
    loaded, info = load_checkpoint(tmp_path / "ckpt")
    assert info.extra == {"stage": "pretrain-source", "prepared": "abc"}
    assert info.n_items == N_ITEMS and info.text_dim == TEXT_DIM
    assert loaded.config == model.config
    assert "item_text" not in loaded.state_dict()  # text embeddings stay out of the checkpoint
    loaded.set_item_text(model.item_text)
    loaded.eval()
    seq = random_seq()
    assert torch.equal(loaded.encode(seq), model.encode(seq))
    assert torch.equal(loaded.item_reps(0, N_ITEMS), model.item_reps(0, N_ITEMS))


def test_saving_the_same_model_twice_writes_the_same_bytes(tmp_path):
    """The weights' sha256 is the checkpoint's fingerprint (stage manifests, exact resume): safetensors
    wrote its metadata in a random order per call (a Rust HashMap), so equal weights hashed apart."""
    from safetensors import safe_open

    model = make_model(item_ids=True)
    save_checkpoint(model, tmp_path / "first")
    first = (tmp_path / "first" / "model.safetensors").read_bytes()
    metadata = {f"key{i}": str(i) for i in range(6)}  # 720 orders: a random one would not repeat
    save_weights(model, tmp_path, "meta.safetensors", metadata)
    for i in range(8):
        save_checkpoint(model, tmp_path / "again")
        assert (tmp_path / "again" / "model.safetensors").read_bytes() == first, f"save {i + 2} differs"
        save_weights(model, tmp_path, "meta2.safetensors", dict(reversed(metadata.items())))
        assert (tmp_path / "meta2.safetensors").read_bytes() == (tmp_path / "meta.safetensors").read_bytes()
    with safe_open(str(tmp_path / "meta.safetensors"), "pt") as f:  # still a valid file, metadata kept
        assert f.metadata() == metadata and set(f.keys()) == set(model.state_dict())
    loaded, _ = load_checkpoint(tmp_path / "again")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_bad_checkpoints_raise_artifact_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    folder = tmp_path / "ckpt"
    save_checkpoint(make_model(), folder, extra={})
    weights = folder / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"model\.safetensors.*truncated or corrupt"):
        load_checkpoint(folder)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="truncated or corrupt"):
        load_checkpoint(folder)

    weights.write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["d_model"] = 32  # the weights are for 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"has shape .* describes"):
        load_checkpoint(folder)
    config["model"]["d_model"], config["model"]["adaptor"] = 16, "linear"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="missing tensors"):
        load_checkpoint(folder)
    config["model"]["adaptor"], config["model"]["bogus"] = "moe", 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"model\.bogus"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="config.json"):
        load_checkpoint(folder)
    weights.unlink()
    (folder / "config.json").write_text(json.dumps({**config, "model": dataclasses.asdict(small_config())}))
    with pytest.raises(ArtifactError, match="missing checkpoint weights"):
        load_checkpoint(folder)


def test_sampled_loss_runs_the_item_tower_on_its_candidates_only():
    model = make_model(seed=3).eval()
    inputs, labels = window_tensors(training_windows(tiny_sequences(), L)[0])
    states, reps = model.encode(inputs), model.item_reps(0, N_ITEMS)
    log_q = proposal_log_q(np.arange(N_ITEMS), power=0.75)
    asked = []

    def reps_of(items):
        asked.append(items)
        return model.item_reps_at(items)

    lazy = sampled_softmax_loss(states, labels, reps_of, model.score, 8, log_q, torch.Generator().manual_seed(1))
    whole = sampled_softmax_loss(states, labels, reps.__getitem__, model.score, 8, log_q, torch.Generator().manual_seed(1))
    assert torch.allclose(lazy, whole, atol=1e-6)
    (items,) = asked
    assert len(torch.unique(items)) == len(items)
    assert set(items.tolist()) >= set(labels[labels >= 0].tolist())
    assert len(items) <= len(torch.unique(labels[labels >= 0])) + 8
