"""trecsys.rank.metrics and trecsys.rank.scorers against plain one-user-at-a-time references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import ndcg_score

from trecsys.errors import ConfigError
from trecsys.rank import metrics as M
from trecsys.rank.scorers import ItemKNNScorer, PopularityScorer

# ---------------------------------------------------------------------------------------------
# References: one user at a time, plain Python


def reference_topk(row: list[float], k: int, excluded: set[int]) -> list[int]:
    def key(i: int) -> tuple[float, int]:
        s = row[i]
        if math.isnan(s) or i in excluded:
            s = -math.inf
        return (-s, i)

    return sorted(range(len(row)), key=key)[:k]


def reference_metrics(ranked: list[int], targets: list[int], k: int) -> dict[str, float]:
    relevant = set(targets)
    top = ranked[:k]
    hit_ranks = [r for r, item in enumerate(top) if item in relevant]
    dcg = sum(1.0 / math.log2(r + 2) for r in hit_ranks)
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), k)))
    return {
        "recall": len(hit_ranks) / len(relevant),
        "hit": float(bool(hit_ranks)),
        "ndcg": dcg / idcg,
        "mrr": 1.0 / (hit_ranks[0] + 1) if hit_ranks else 0.0,
        "precision": len(hit_ranks) / k,
    }


def random_case(seed: int, n_users: int = 23, n_items: int = 37, tie_levels: int = 5, nan_fraction: float = 0.05,
                max_excluded: int = 8, inf_fraction: float = 0.01):
    """Scores with many ties (few distinct levels, ±0.0), some NaN and ±inf; random exclusions and targets."""
    rng = np.random.default_rng(seed)
    scores = (rng.integers(0, tie_levels, size=(n_users, n_items)) - tie_levels // 2).astype(np.float32)
    scores[scores == 0] = np.where(rng.random((scores == 0).sum()) < 0.5, -0.0, 0.0)  # equal, not identical
    if tie_levels > 1000:
        scores += rng.random(scores.shape).astype(np.float32)  # practically no ties
    scores[rng.random(scores.shape) < inf_fraction] = np.inf
    scores[rng.random(scores.shape) < inf_fraction] = -np.inf
    scores[rng.random(scores.shape) < nan_fraction] = np.nan
    exclude = [rng.choice(n_items, size=rng.integers(0, max_excluded), replace=False) for _ in range(n_users)]
    targets = [rng.choice(n_items, size=rng.integers(1, 6), replace=True) for _ in range(n_users)]
    return torch.from_numpy(scores), exclude, targets


def rank(scores: torch.Tensor, k: int, exclude, user_batch: int = 7, item_chunk: int = 5, into: bool = False):
    """full_ranking_topk over a score matrix; `into`: each block written into the ranking's buffer."""
    def score_into(rows, a, b, out):
        out.copy_(scores[rows][:, a:b])

    return M.full_ranking_topk(lambda rows, a, b: scores[rows][:, a:b], scores.shape[0], scores.shape[1], k,
                               exclude=exclude, user_batch=user_batch, item_chunk=item_chunk,
                               score_into=score_into if into else None)


# ---------------------------------------------------------------------------------------------
# Ranking and accuracy


CASES = [dict(), dict(tie_levels=2), dict(tie_levels=10_000), dict(nan_fraction=0.3, max_excluded=20)]


@pytest.mark.parametrize("seed,case", [(s, c) for s in range(3) for c in range(len(CASES))])
def test_topk_and_metrics_match_reference(seed, case):
    scores, exclude, targets = random_case(seed, **CASES[case])
    ks = [1, 3, 10, 20]  # K=20 is beyond every user's number of relevant items
    _, topk = rank(scores, max(ks), exclude)
    got = M.ranking_metrics(topk, targets, ks)
    for u in range(scores.shape[0]):
        ranked = reference_topk(scores[u].tolist(), max(ks), set(exclude[u].tolist()))
        assert topk[u].tolist() == ranked
        for k in ks:
            for name, value in reference_metrics(ranked, targets[u].tolist(), k).items():
                assert got[f"{name}@{k}"][u] == pytest.approx(value, abs=1e-12), (u, name, k)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_chunk_topk_alone_matches_reference_and_leaves_its_input(case):
    scores, _, _ = random_case(5, **CASES[case])
    before = scores.clone()
    values, index = M.chunk_topk(scores, 12, offset=100)
    assert torch.equal(scores.isnan(), before.isnan()) and torch.equal(scores.nan_to_num(), before.nan_to_num())
    for u in range(scores.shape[0]):
        assert (index[u] - 100).tolist() == reference_topk(scores[u].tolist(), 12, set())


def test_excluded_items_rank_last_only_when_needed():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0]])
    _, topk = rank(scores, 3, [np.array([0, 2])], item_chunk=2)
    assert topk.tolist() == [[1, 3, 0]]  # the third place must be an excluded item: the lower index


@pytest.mark.parametrize("into", [False, True])
@pytest.mark.parametrize("user_batch,item_chunk", [(1, 1), (2, 3), (5, 8), (100, 1000), (23, 37)])
def test_results_identical_for_any_chunk_size(user_batch, item_chunk, into):
    scores, exclude, _ = random_case(11, tie_levels=3)
    reference_values, reference_index = rank(scores, 15, exclude, user_batch=40, item_chunk=40)
    values, index = rank(scores, 15, exclude, user_batch=user_batch, item_chunk=item_chunk, into=into)
    assert torch.equal(index, reference_index)
    assert torch.equal(values, reference_values)


def whole_catalogue_topk(scores: torch.Tensor, k: int, exclude) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranking before blocks: one exact top-k over each user's whole masked row."""
    masked = scores.clone()
    for u, items in enumerate(exclude or []):
        masked[u, torch.from_numpy(np.asarray(items, dtype=np.int64))] = -torch.inf
    return M.chunk_topk(masked, k)


def test_running_topk_on_a_hand_example_with_ties_at_the_kth_place():
    # Item chunks of 2: [0, 1] [2, 3] [4, 5]. User 0's second place (3.0, item 1) is tied by items 3
    # and 5 in later chunks: the lower index keeps it. User 1: NaN and an excluded 9.0 never enter,
    # and a later tie at the top goes after the earlier item.
    scores = torch.tensor([[5.0, 3.0, 1.0, 3.0, 2.0, 3.0],
                           [1.0, float("nan"), 2.0, 9.0, 2.0, 0.0]])
    values, index = rank(scores, 2, [np.array([], dtype=np.int64), np.array([3])], user_batch=2, item_chunk=2)
    assert index.tolist() == [[0, 1], [2, 4]]
    assert values.tolist() == [[5.0, 3.0], [2.0, 2.0]]


def rising(n_users: int, n_items: int, seed: int) -> torch.Tensor:
    """Scores that grow along the catalogue: every block beats the lists so far (the plain path)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((np.arange(n_items)[None, :] // 3 + rng.integers(0, 2, size=(n_users, n_items)))
                            .astype(np.float32))


@pytest.mark.parametrize("case", [dict(tie_levels=3), dict(tie_levels=50), dict(tie_levels=10_000),
                                  dict(tie_levels=50, nan_fraction=0.0, inf_fraction=0.0),
                                  dict(tie_levels=10_000, nan_fraction=0.0, inf_fraction=0.0),
                                  dict(nan_fraction=0.3, max_excluded=300), "rising", "some rising"])
@pytest.mark.parametrize("k,user_batch,item_chunk", [(1, 64, 4096), (10, 16, 300), (10, 50, 128), (25, 7, 77),
                                                     (10, 16, 1000), (3, 50, 700), (100, 33, 1000),
                                                     (1200, 64, 256)])
@pytest.mark.parametrize("into", [False, True])
def test_running_topk_equals_whole_catalogue_topk(case, k, user_batch, item_chunk, into):
    """Blocks of many segments (a first block of at least k segments takes the bound from its
    segment maxima; chunks that end inside a segment are padded when written into the ranking's
    buffer), with ties (few levels, ±0.0), NaN, ±inf and exclusions: the same values and items, in
    the same order, as one exact top-k over each whole row."""
    if case == "rising":
        scores, exclude = rising(50, 1100, seed=k), None
    elif case == "some rising":  # a block's rows split: many items enter some, few the others
        scores, exclude, _ = random_case(k, n_users=50, n_items=1100, tie_levels=10_000, nan_fraction=0.0,
                                         inf_fraction=0.0)
        scores[::3] = rising(50, 1100, seed=k)[::3] / 10
        scores[1::3, :400] = 1e6  # ... or many tie at the top of the first block: the index order decides
    else:
        scores, exclude, _ = random_case(k, n_users=50, n_items=1100, **case)
    values, index = rank(scores, k, exclude, user_batch=user_batch, item_chunk=item_chunk, into=into)
    reference_values, reference_index = whole_catalogue_topk(scores, k, exclude)
    assert torch.equal(index, reference_index)
    assert torch.equal(values.nan_to_num(), reference_values.nan_to_num())
    for u in (0, 17, 49):
        assert index[u].tolist() == reference_topk(scores[u].tolist(), k, set((exclude or {})[u].tolist())
                                                   if exclude else set())


def test_ndcg_agrees_with_sklearn_for_one_relevant_item_without_ties():
    rng = np.random.default_rng(3)
    n_users, n_items = 50, 60
    scores = rng.normal(size=(n_users, n_items))
    target = rng.integers(0, n_items, size=n_users)
    truth = np.zeros_like(scores)
    truth[np.arange(n_users), target] = 1.0
    _, topk = rank(torch.from_numpy(scores), 20, None, user_batch=16, item_chunk=13)
    for k in (1, 5, 10, 20):
        ours = M.ranking_metrics(topk, [np.array([t]) for t in target], [k])[f"ndcg@{k}"]
        assert ours.mean() == pytest.approx(ndcg_score(truth, scores, k=k), abs=1e-12)


def test_users_without_targets_get_nan_and_repeated_targets_count_once():
    topk = torch.tensor([[0, 1, 2], [2, 1, 0]])
    got = M.ranking_metrics(topk, [np.array([], dtype=np.int64), np.array([1, 1])], [3])
    assert math.isnan(got["recall@3"][0])
    assert got["recall@3"][1] == 1.0
    assert got["mrr@3"][1] == 0.5


def test_k_beyond_the_catalogue_is_a_config_error():
    assert M.check_ks([20, 5, 10, 5], 30) == [5, 10, 20]
    with pytest.raises(ConfigError, match=r"evaluate\.ks.*K=50.*30 items"):
        M.check_ks([5, 50], 30)
    with pytest.raises(ConfigError, match=r"evaluate\.ks"):
        M.check_ks([0, 5], 30)


# ---------------------------------------------------------------------------------------------
# Beyond accuracy


def test_coverage_diversity_and_popularity_match_reference():
    rng = np.random.default_rng(5)
    n_items, dim = 30, 6
    topk = np.stack([rng.choice(n_items, size=8, replace=False) for _ in range(12)])
    emb = rng.normal(size=(n_items, dim)).astype(np.float32)
    emb[4] = 0.0  # an item without text: cosine 0 with everything
    counts = rng.integers(0, 5, size=n_items)

    coverage = M.catalogue_coverage(topk, n_items, [1, 8])
    assert coverage["coverage@8"] == len({int(i) for row in topk for i in row}) / n_items
    assert coverage["coverage@1"] == len({int(row[0]) for row in topk}) / n_items

    def cos(a, b):
        na, nb = np.linalg.norm(emb[a]), np.linalg.norm(emb[b])
        return 0.0 if na == 0 or nb == 0 else float(emb[a] @ emb[b] / (na * nb))

    diversity = M.intra_list_diversity(topk, emb, [1, 2, 8], user_batch=5)
    assert "diversity@1" not in diversity
    for u, row in enumerate(topk):
        for k in (2, 8):
            pairs = [(a, b) for i, a in enumerate(row[:k]) for b in row[:k][i + 1:]]
            expected = sum(1 - cos(a, b) for a, b in pairs) / len(pairs)
            assert diversity[f"diversity@{k}"][u] == pytest.approx(expected, abs=1e-6)

    percentile = M.popularity_percentile(counts)
    assert np.allclose(percentile, 100 * (rankdata(counts) - 1) / (n_items - 1))
    popularity = M.average_popularity(topk, percentile, [3])
    assert np.allclose(popularity["popularity@3"], [percentile[row[:3]].mean() for row in topk])


# ---------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_is_seeded_and_equals_explicit_resampling():
    rng = np.random.default_rng(0)
    values = rng.random((40, 3))
    samples = M.bootstrap_means(values, 200, seed=7)
    assert np.array_equal(samples, M.bootstrap_means(values, 200, seed=7))
    assert not np.array_equal(samples, M.bootstrap_means(values, 200, seed=8))
    draws = np.random.default_rng(7).integers(0, 40, size=(200, 40))  # one block at this size
    assert np.allclose(samples, values[draws].mean(axis=1))


def test_bootstrap_interval_contains_the_point_estimate():
    rng = np.random.default_rng(1)
    for n in (5, 50, 500):
        values = (rng.random((n, 2)) < 0.3).astype(float)
        low, high = M.percentile_interval(M.bootstrap_means(values, 500, seed=0))
        point = values.mean(axis=0)
        assert np.all(low <= point) and np.all(point <= high)
        assert np.all(high - low > 0)


def test_paired_p_value():
    rng = np.random.default_rng(4)
    a = rng.random(300)
    same = M.bootstrap_means(np.column_stack([a, a]), 500, seed=0)
    assert M.paired_p_value(same[:, 1] - same[:, 0], np.array([0.0]))[0] == 1.0
    better = np.clip(a + 0.2, 0, None)
    samples = M.bootstrap_means(np.column_stack([a, better]), 500, seed=0)
    p = M.paired_p_value(samples[:, 1] - samples[:, 0], np.array([better.mean() - a.mean()]))[0]
    assert p < 0.01
    noisy = a + rng.normal(0, 0.5, size=300) * 0.01
    samples = M.bootstrap_means(np.column_stack([a, noisy]), 500, seed=0)
    assert M.paired_p_value(samples[:, 1] - samples[:, 0], np.array([noisy.mean() - a.mean()]))[0] > 0.05


# ---------------------------------------------------------------------------------------------
# Baseline scorers


def test_item_knn_on_a_hand_example():
    # Item columns of the binary user × item matrix: item0 {u0, u1}, item1 {u0, u1, u2}, item2 {u1, u2}.
    train = [np.array([0, 1]), np.array([0, 1, 2, 2]), np.array([1, 2])]  # a repeat counts once
    knn = ItemKNNScorer(train, histories=[np.array([0]), np.array([0, 2]), np.array([], dtype=np.int64)],
                        n_items=4)
    c01, c02, c12 = 2 / math.sqrt(6), 1 / 2, 2 / math.sqrt(6)
    scores = knn.score_chunk(torch.arange(3), 0, 4)
    expected = [[0.0, c01, c02, 0.0], [c02, c01 + c12, c02, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(knn.score_chunk(torch.tensor([1]), 1, 3), torch.tensor([expected[1][1:3]]), atol=1e-6)
    _, topk = M.full_ranking_topk(knn.score_chunk, 3, 4, 2, exclude=[np.array([0]), np.array([0, 2]),
                                                                       np.array([], dtype=np.int64)], item_chunk=3)
    assert topk.tolist() == [[1, 2], [1, 3], [0, 1]]


def test_item_knn_in_column_blocks_gives_the_same_scores(monkeypatch):
    """The similarity built a few columns at a time (memory near the matrix itself) scores exactly as
    one product of the whole catalogue, for item chunks that cut across the blocks."""
    rng = np.random.default_rng(3)
    n_items = 23
    train = [rng.choice(n_items, size=rng.integers(1, 9)) for _ in range(40)]
    histories = [rng.choice(n_items, size=rng.integers(0, 6)) for _ in range(12)]
    whole = ItemKNNScorer(train, histories, n_items)
    monkeypatch.setattr(ItemKNNScorer, "block_items", 5)
    blocked = ItemKNNScorer(train, histories, n_items)
    assert len(blocked.blocks) == 5 and len(whole.blocks) == 1
    assert blocked.n_similarities == whole.n_similarities
    users = torch.arange(len(histories))
    for start, stop in [(0, n_items), (3, 12), (4, 5), (9, 23)]:
        assert torch.equal(blocked.score_chunk(users, start, stop), whole.score_chunk(users, start, stop))
    assert (blocked.score_chunk(users, 0, n_items)[:, :] >= 0).all()
    diagonal = sum(block.diagonal(k=-begin).sum() for begin, block in blocked.blocks)
    assert diagonal == 0  # no item is its own neighbour


def test_popularity_ranks_by_train_counts_with_index_ties():
    pop = PopularityScorer([np.array([3, 1]), np.array([3, 1, 2])], n_items=5)
    _, topk = M.full_ranking_topk(pop.score_chunk, 2, 5, 5, exclude=[np.array([3]), np.array([], dtype=np.int64)],
                                  item_chunk=2)
    assert topk.tolist() == [[1, 2, 0, 4, 3], [1, 3, 2, 0, 4]]


def test_model_scorer_states_equal_the_model_on_each_history(monkeypatch):
    """The item tower computed once for every history item (in chunks), histories holding items of
    other domains too: the same states and scores as the model run on each history directly."""
    from trecsys.config import ModelConfig
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import DomainRange
    from trecsys.rank import scorers
    from trecsys.train.windows import history_batch

    monkeypatch.setattr(scorers, "TOWER_CHUNK", 7)
    rng = np.random.default_rng(0)
    n_items, text_dim = 60, 16
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(max_seq_len=8), text_dim, n_items).eval()
    text = rng.standard_normal((n_items, text_dim)).astype(np.float32)
    domain = DomainRange("target", "target", 20, 50)
    histories = [rng.choice(n_items, size=rng.integers(0, 12)) for _ in range(30)]  # some beyond max_seq_len
    scorer = scorers.ModelScorer(model, histories, domain, text, torch.device("cpu"), user_batch=4)
    with torch.no_grad():
        states = torch.cat([model.user_state(history_batch([h], 8)) for h in histories])
        reps = model.item_reps(domain.item_start, domain.item_stop)
    assert torch.allclose(scorer.states, states, atol=1e-5)
    assert torch.allclose(scorer.score_chunk(torch.arange(30), 0, 30), states @ reps.T, atol=1e-5)


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_model_scorer_writes_the_same_scores_into_a_buffer(score):
    """score_into (what evaluate ranks a model with) gives score_chunk's floats bit for bit, also
    into a view narrower than its rows (the ranking's last chunk, padded to whole segments)."""
    from trecsys.config import ModelConfig
    from trecsys.model.seqrec import SeqRecModel
    from trecsys.prepared.tables import DomainRange
    from trecsys.rank import scorers

    rng = np.random.default_rng(1)
    n_items, text_dim = 90, 16
    torch.manual_seed(0)
    model = SeqRecModel(ModelConfig(max_seq_len=8, score=score), text_dim, n_items).eval()
    text = rng.standard_normal((n_items, text_dim)).astype(np.float32)
    histories = [rng.choice(n_items, size=rng.integers(0, 12)) for _ in range(20)]
    scorer = scorers.ModelScorer(model, histories, DomainRange("target", "target", 0, n_items), text,
                                 torch.device("cpu"))
    rows = torch.arange(3, 17)
    block = torch.full((len(rows), 64), torch.nan)
    scorer.score_into(rows, 40, 90, block[:, :50])
    assert torch.equal(block[:, :50], scorer.score_chunk(rows, 40, 90))
    _, expected = M.full_ranking_topk(scorer.score_chunk, 20, n_items, 5, item_chunk=64)
    _, got = M.full_ranking_topk(scorer.score_chunk, 20, n_items, 5, item_chunk=64, score_into=scorer.score_into)
    assert torch.equal(got, expected)
