"""model.seen_bias: a learned score offset for the items a user has already read, in the losses (exact
against a brute-force softmax), in ranking (ModelScorer), in checkpoints, and learned from data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trecsys.config import ModelConfig
from trecsys.model.checkpoint import load_checkpoint, save_checkpoint
from trecsys.model.seqrec import SEEN_SCALE, SeqRecModel
from trecsys.prepared.tables import DomainRange
from trecsys.rank.scorers import ModelScorer
from trecsys.train.losses import (
    chunked_cross_entropy,
    proposal_log_q,
    sampled_softmax_loss,
    softmax_over_candidates,
    window_seen,
)
from trecsys.train.windows import first_seen, training_windows, window_tensors

TEXT_DIM, N_ITEMS, L, D = 12, 30, 6, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0, **overrides) -> SeqRecModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"d_model": D, "n_layers": 1, "n_heads": 2, "max_seq_len": L, "dropout": 0.0,
                         "n_experts": 2, **overrides})
    model = SeqRecModel(cfg, TEXT_DIM, N_ITEMS)
    model.set_item_text(F.normalize(torch.randn(N_ITEMS, TEXT_DIM, generator=torch.Generator().manual_seed(1)), dim=-1))
    return model


def test_first_seen_marks_each_item_once_inside_the_catalogue():
    # Catalogue [10, 20): 5 is another domain's item, -1 padding, 12 repeats.
    inputs = torch.tensor([[-1, -1, 12, 5, 13, 12], [11, 11, 11, 19, 20, 10]])
    assert first_seen(inputs, 10, 20).tolist() == [[-1, -1, 2, -1, 3, -1], [1, -1, -1, 9, -1, 0]]


def window_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, N_ITEMS, (4, L), generator=g)
    inputs[0, :2] = -1  # padding
    inputs[1, 3] = inputs[1, 1]  # a repeat inside the window
    targets = torch.randint(0, N_ITEMS, (4, L), generator=g)
    targets[0, :2] = -1
    targets[2, 4] = inputs[2, 1]  # a target the state has already read
    targets[3, 2] = inputs[3, 5]  # ... and one it reads only later: not seen yet
    states = torch.randn(4, L, D, generator=g)
    reps = torch.randn(N_ITEMS, D, generator=g)
    return inputs, targets, states, reps


def brute_force(states, targets, reps, inputs, offset):
    """Each labelled state's cross-entropy over the catalogue, `offset` added to the items it has read."""
    losses = []
    for b in range(states.shape[0]):
        for t in range(states.shape[1]):
            if targets[b, t] < 0:
                continue
            logits = reps @ states[b, t]
            read = torch.zeros(N_ITEMS, dtype=torch.bool)
            history = inputs[b, :t + 1]
            read[history[history >= 0]] = True
            logits = logits + offset * read
            losses.append(torch.logsumexp(logits, 0) - logits[targets[b, t]])
    return torch.stack(losses).mean()


@pytest.mark.parametrize("bias", [-1.7, 0.0, 0.9])
@pytest.mark.parametrize("chunk", [1000, 7])
def test_chunked_cross_entropy_with_seen_offset_is_exact(bias, chunk):
    inputs, targets, states0, reps0 = window_case()
    score = make_model().score

    def run(fn):
        states, reps = states0.clone().requires_grad_(), reps0.clone().requires_grad_()
        offset = torch.tensor(bias, requires_grad=True)
        loss = fn(states, reps, offset)
        loss.backward()
        return loss, states.grad, reps.grad, offset.grad

    expected = run(lambda s, r, o: brute_force(s, targets, r, inputs, o))
    got = run(lambda s, r, o: chunked_cross_entropy(s, targets, r, score, chunk, first_seen(inputs), o))
    for e, g in zip(expected, got, strict=True):
        assert torch.allclose(e, g, atol=1e-5), (e, g)
    # Every item once as a negative with log count 0: the candidates' softmax is the same loss.
    read = window_seen(states0, targets, first_seen(inputs), reps0[first_seen(inputs).clamp(min=0)], score)
    every = softmax_over_candidates(states0, targets, reps0, score, torch.arange(N_ITEMS), torch.zeros(N_ITEMS),
                                    read, torch.tensor(bias))
    assert torch.allclose(every, expected[0], atol=1e-5)


def test_sampled_softmax_with_seen_offset_converges_to_the_full_loss():
    inputs, targets, states, reps = window_case(seed=1)
    states, reps = states * 0.3, reps * 0.3
    score = make_model().score
    offset = torch.tensor(2.0)
    full = brute_force(states, targets, reps, inputs, offset)
    assert abs(brute_force(states, targets, reps, inputs, 0.0) - full) > 0.2  # the offset matters here
    for power in (0.0, 1.0):
        log_q = proposal_log_q(np.arange(N_ITEMS) ** 2, power=power)
        sampled = sampled_softmax_loss(states, targets, reps.__getitem__, score, 50_000, log_q,
                                       torch.Generator().manual_seed(5), seen=first_seen(inputs), offset=offset)
        assert abs(sampled.item() - full.item()) < 0.03, power


def test_model_scorer_adds_the_offset_to_each_seen_item_once():
    model = make_model().eval()
    with torch.no_grad():
        model.seen_bias.fill_(-0.25)
    domain = DomainRange("d", "target", 5, 25)  # the catalogue is items 5..24
    histories = [np.array([8, 9, 8, 2, 6]), np.array([], dtype=np.int64), np.array([24, 30 - 1, 5])]
    scorer = ModelScorer(model, histories, domain, model.item_text.numpy(), torch.device("cpu"))
    rows = torch.tensor([2, 0, 1])
    with torch.no_grad():
        plain = model.score(scorer.states[rows], scorer.reps[3:20])
    got = scorer.score_chunk(rows, 3, 20)
    expected = plain.clone()
    expected[0, 24 - 5 - 3] += -0.25 * SEEN_SCALE  # item 5 (local 0) is outside the chunk [3, 20)
    # 8 counted once; 2 is another domain's item, 6 (local 1) outside the chunk
    expected[1, [8 - 5 - 3, 9 - 5 - 3]] += -0.25 * SEEN_SCALE
    assert torch.equal(got, expected)
    out = torch.empty(3, 17)
    scorer.score_into(rows, 3, 20, out)
    assert torch.equal(out, got)


def test_a_checkpoint_from_before_seen_bias_loads_without_it(tmp_path):
    old = make_model(seen_bias=False)
    save_checkpoint(old, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["seen_bias"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = load_checkpoint(tmp_path)
    assert info.model.seen_bias is False and model.seen_offset() is None
    new = make_model()
    save_checkpoint(new, tmp_path / "new")
    assert load_checkpoint(tmp_path / "new")[0].seen_offset() is not None


@pytest.mark.parametrize("comes_back", [False, True])
def test_the_offset_learns_whether_users_come_back(comes_back):
    """Users who never return to an item teach a negative offset; users who mostly do, a positive one."""
    rng = np.random.default_rng(0)
    sequences = []
    for _ in range(80):
        walk = list(rng.permutation(N_ITEMS)[:4])
        for _ in range(8):
            walk.append(walk[-3] if comes_back and rng.random() < 0.7 else
                        int(rng.choice([i for i in range(N_ITEMS) if i not in walk] or [0])))
        sequences.append(np.array(walk))
    inputs, labels = window_tensors(training_windows(sequences, L)[0])
    model = make_model(seed=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(30):
        loss = chunked_cross_entropy(model.encode(inputs), labels, model.item_reps(0, N_ITEMS), model.score,
                                     seen=first_seen(inputs), offset=model.seen_offset())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = float(model.seen_offset().detach())
    assert (learned > 1.0) if comes_back else (learned < -1.0), learned
