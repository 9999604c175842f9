"""Transfer building blocks on tiny data: what each strategy trains, L2-SP, the chunked KD loss,
few-shot user subsets and source-domain context (seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trecsys.config import ExperimentConfig, ModelConfig, TrainConfig, build
from trecsys.errors import ConfigError
from trecsys.model.seqrec import SeqRecModel
from trecsys.model.strategies import STRATEGIES, build_candidate, l2sp_penalty
from trecsys.prepared.context import subset_users, target_sequences
from trecsys.prepared.tables import load_prepared
from trecsys.train.engine import make_optimizer
from trecsys.train.losses import chunked_cross_entropy, chunked_kd_loss
from trecsys.train.windows import training_windows, window_tensors

TEXT_DIM, N_ITEMS, L = 12, 30, 6
TEXT = F.normalize(torch.randn(N_ITEMS, TEXT_DIM, generator=torch.Generator().manual_seed(1)), dim=-1)


def base_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(d_model=8, n_layers=1, n_heads=2, max_seq_len=L, dropout=0.0, n_experts=2),
                          **overrides})


def pretrained(seed: int = 3) -> SeqRecModel:
    torch.manual_seed(seed)
    model = SeqRecModel(base_config(), TEXT_DIM, N_ITEMS)
    model.set_item_text(TEXT)
    return model


def one_step(model: SeqRecModel) -> None:
    """One AdamW step (weight decay on) of the next-item loss on random windows."""
    windows = np.random.default_rng(0).integers(0, N_ITEMS, size=(8, L + 1))
    inputs, labels = window_tensors(windows)
    opt = make_optimizer(model, TrainConfig(lr=0.05, weight_decay=0.1), torch.device("cpu"))
    model.train()
    loss = chunked_cross_entropy(model.encode(inputs), labels, model.item_reps(0, N_ITEMS), model.score)
    loss.backward()
    opt.step()


def changed(before: dict, model: SeqRecModel) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


SEQUENCE_TOWER = ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.0.weight",
                  "blocks.0.mlp.2.bias", "position.weight")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_trains_exactly_what_it_says(strategy):
    init = pretrained()
    cand = build_candidate(strategy, init, init.config, TEXT, N_ITEMS, item_ids=False, seed=0)
    model = cand.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {n for n, _ in model.named_parameters()}
    init_state = init.state_dict()
    if strategy == "zero_shot":
        assert trainable == set() and not cand.strategy.trains and cand.n_trainable() == 0
    elif strategy == "full":
        assert trainable == names
    elif strategy == "adaptor":
        assert trainable == {n for n in names if n.startswith(("adaptor.", "item_norm.")) or ".norm" in n
                             or n.startswith("final_norm.") or n == "seen_bias"}
        assert not trainable & set(SEQUENCE_TOWER)
        assert cand.n_trainable() < model.num_parameters() / 2
    elif strategy == "scratch":
        assert trainable == names and model.config == init.config
        assert not torch.equal(model.blocks[0].attn.qkv.weight, init.blocks[0].attn.qkv.weight)
    else:  # id_only: an ID table instead of the text adaptor
        assert model.adaptor is None and model.item_id is not None and trainable == names
    if cand.strategy.transfers:  # starts from the transferred weights
        assert all(torch.equal(p, init_state[n]) for n, p in model.state_dict().items())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if cand.strategy.trains:
        one_step(model)
    moved = changed(before, model)
    assert moved <= trainable  # frozen tensors never change, weight decay included
    if strategy in ("full", "scratch", "id_only"):
        assert set(SEQUENCE_TOWER) & names <= moved
    if strategy == "adaptor":
        assert {"adaptor.weight", "item_norm.weight", "blocks.0.norm1.weight"} <= moved


def test_item_ids_are_new_parameters_with_their_own_lr_and_no_l2sp_anchor():
    init = pretrained()
    cand = build_candidate("full", init, init.config, TEXT, N_ITEMS, item_ids=True, seed=0)
    assert cand.new_params == ["item_id.weight"] and cand.model.item_id is not None
    assert "item_id.weight" not in cand.anchors and "adaptor.weight" in cand.anchors
    opt = make_optimizer(cand.model, TrainConfig(lr=0.01), torch.device("cpu"), cand.lr_scales(10.0))
    scales = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scales[id(cand.model.item_id.weight)] == 10.0 and scales[id(cand.model.adaptor.weight)] == 1.0
    assert cand.lr_scales(1.0) == {}
    zero = build_candidate("zero_shot", init, init.config, TEXT, N_ITEMS, item_ids=True, seed=0)
    assert zero.model.item_id is None  # nothing would train them


def test_l2sp_is_zero_at_the_transferred_weights_and_pulls_back_toward_them():
    init = pretrained()
    cand = build_candidate("full", init, init.config, TEXT, N_ITEMS, item_ids=False, seed=0)
    model = cand.model
    assert l2sp_penalty(model, cand.anchors, 0.5).item() == 0.0
    with torch.no_grad():
        model.adaptor.weight.add_(0.1)
    penalty = l2sp_penalty(model, cand.anchors, 0.5)
    assert penalty.item() == pytest.approx(0.5 * 0.01 * model.adaptor.weight.numel(), rel=1e-4)
    penalty.backward()
    assert torch.allclose(model.adaptor.weight.grad, torch.full_like(model.adaptor.weight, 0.5 * 2 * 0.1))


# ---------------------------------------------------------------------------------------------
# Chunked KD loss


def dot(a, b):
    return a @ b.mT


def test_kd_loss_equals_a_hand_computed_value_and_is_zero_for_the_teacher_itself():
    # One position, three items, 1-d states: student logits [2, 0, -2], teacher logits [0, 1, 3].
    student_state, items = torch.tensor([[1.0]]), torch.tensor([[2.0], [0.0], [-2.0]])
    teacher_state, teacher_items = torch.tensor([[1.0]]), torch.tensor([[0.0], [1.0], [3.0]])
    T = 2.0
    p = np.exp(np.array([0, 1, 3]) / T)
    p /= p.sum()
    q = np.exp(np.array([2, 0, -2]) / T)
    q /= q.sum()
    expected = T * T * float((p * np.log(p / q)).sum())
    mask = torch.tensor([True])
    got = chunked_kd_loss(student_state, items, dot, teacher_state, teacher_items, dot, mask, T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert chunked_kd_loss(student_state, items, dot, teacher_state, teacher_items, dot, mask, T, 2).item() == \
        pytest.approx(expected, rel=1e-6)
    for chunk in (8192, 2):
        same = chunked_kd_loss(teacher_state, teacher_items, dot, teacher_state, teacher_items, dot, mask, T, chunk)
        assert same.item() == 0.0


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_chunked_kd_equals_unchunked_in_value_and_gradient(score):
    g = torch.Generator().manual_seed(0)
    student = SeqRecModel(base_config(score=score), TEXT_DIM, N_ITEMS)
    teacher = SeqRecModel(base_config(d_model=12, score=score), TEXT_DIM, N_ITEMS)
    states = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    reps = torch.randn(N_ITEMS, 8, generator=g, requires_grad=True)
    t_states, t_reps = torch.randn(3, 5, 12, generator=g), torch.randn(N_ITEMS, 12, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.3
    results = []
    for chunk in (N_ITEMS, 7, 1):
        loss = chunked_kd_loss(states, reps, student.score, t_states, t_reps, teacher.score, mask, 1.7, chunk)
        results.append((loss.detach(), *torch.autograd.grad(loss, [states, reps])))
    reference = F.kl_div(torch.log_softmax(student.score(states[mask], reps) / 1.7, -1),
                         torch.log_softmax(teacher.score(t_states[mask], t_reps) / 1.7, -1),
                         log_target=True, reduction="batchmean") * 1.7 ** 2
    assert results[0][0].item() == pytest.approx(reference.item(), rel=1e-5)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert chunked_kd_loss(states, reps, dot, t_states[..., :8], t_reps[:, :8], dot,
                           torch.zeros(3, 5, dtype=torch.bool)).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Few-shot subsets and source-domain context


def test_train_fraction_subsets_users_deterministically_and_nested():
    users = np.arange(100, 300)
    tenth, half = subset_users(users, 0.1, seed=0), subset_users(users, 0.5, seed=0)
    assert len(tenth) == 20 and len(half) == 100 and set(tenth) <= set(half) <= set(users)
    assert np.array_equal(tenth, subset_users(users, 0.1, seed=0)) and np.all(np.diff(tenth) > 0)
    assert not np.array_equal(tenth, subset_users(users, 0.1, seed=1))
    assert np.array_equal(subset_users(users, 1.0, seed=5), users)
    data = {"data": {"domains": {"A": {"format": "synthetic"}}, "target": "A"}}
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=r"'finetune.train_fraction'.*\(0, 1\]"):
            build(ExperimentConfig, {**data, "finetune": {"train_fraction": bad}})


def test_all_domains_history_reads_source_items_but_predicts_only_target_items(tiny_prepared):
    prepared = load_prepared(tiny_prepared)
    target_only, mixed = target_sequences(prepared, "target"), target_sequences(prepared, "all_domains")
    domain = mixed.domain
    assert np.array_equal(target_only.user_idx, mixed.user_idx)
    in_target = lambda s: (s >= domain.item_start) & (s < domain.item_stop)  # noqa: E731
    assert all(in_target(s).all() for s in target_only.train)
    assert sum((~in_target(s)).sum() for s in mixed.train) > 0  # source items are there as context
    for u in range(len(mixed.user_idx)):  # the same target items in the same order
        assert np.array_equal(mixed.train[u][in_target(mixed.train[u])], target_only.train[u])
    windows, _ = training_windows(mixed.train, 6)
    inputs, labels = window_tensors(windows, domain.item_start, domain.item_stop)
    kept = labels[labels >= 0] + domain.item_start
    assert len(kept) and in_target(kept.numpy()).all()
    assert (~in_target(inputs[inputs >= 0].numpy())).any()
    # Histories: what came before the held-out item in prepared order, never a held-out target item.
    rows = prepared.interactions
    for u, user in enumerate(mixed.user_idx):
        mine = rows[rows["user_idx"] == user]
        for split, visible in (("valid", {"train"}), ("test", {"train", "valid"})):
            if not len(mixed.targets[split][u]):
                continue
            when = mine.loc[(mine["domain"] == "Food") & (mine["split"] == split), "timestamp"].min()
            before = mine[(mine["timestamp"] < when) & ((mine["domain"] != "Food") | mine["split"].isin(visible))]
            assert np.array_equal(mixed.histories[split][u], before["item_idx"].to_numpy())
            assert np.array_equal(target_only.histories[split][u][-1:],
                                  mixed.histories[split][u][in_target(mixed.histories[split][u])][-1:])
    assert np.mean([len(h) for h in mixed.histories["test"]]) > np.mean([len(h) for h in target_only.histories["test"]])
