"""Search: the protocol's queries from category paths, the fusion of lexical and semantic matches, that a
user's history reorders only the relevant items, the mix chosen on validation, and the CLI paths
(`trec recommend --query` in both modes, `trec evaluate` with evaluate.task: search)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml
from conftest import tiny_config
from test_recommend import fake_encoder, save_model  # noqa: F401 - fake_encoder is a fixture

from trecsys.artifacts import read_json, write_manifest, write_parquet
from trecsys.config import load_config
from trecsys.errors import DataError
from trecsys.prepared.tables import load_prepared
from trecsys.rank import search as S
from trecsys.rank import search_protocol as P
from trecsys.rank.metrics import ranking_metrics
from trecsys.rank.report import SearchContext, read_context


def test_category_query_keeps_each_word_once_without_stop_words():
    assert S.category_query("Grocery & Gourmet Food > Snacks > Chips & Crisps > Chips") == \
        "grocery gourmet food snacks chips crisps"
    assert S.category_query("Office Products > Office & School Supplies > Paper > Copy & Printer Paper") == \
        "office products school supplies paper copy printer"
    assert S.category_query("Home and Kitchen, Tools of the Trade") == "home kitchen tools trade"
    assert S.category_query("") == "" and S.category_query(None) == ""


def test_lexical_match_is_bm25_with_stemming():
    index = S.SearchIndex(["Whole Bean Coffee", "Dark Chocolate Chips", "Green Tea Bags", ""], np.eye(4, 8))
    scores = index.lexical.scores(["coffee beans", "the of", "chocolate chip"])
    assert scores.shape == (3, 4)
    assert scores[0, 0] > 0 and (scores[0, 1:] == 0).all()  # "beans" finds "Bean"
    assert (scores[1] == 0).all()  # only stop words: no match
    assert scores[2, 1] > 0 and scores[2, [0, 2, 3]].sum() == 0


def _index_with_vectors() -> tuple[S.SearchIndex, np.ndarray]:
    """Four items: 0 and 1 share the query's words; items 1 and 2 are near the query's vector."""
    docs = ["dark chocolate chips", "dark chocolate bar", "cocoa nibs", "green tea"]
    vectors = np.array([[0.0, 1, 0], [0.8, 0.6, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    return S.SearchIndex(docs, vectors), np.array([[1.0, 0.0, 0.0]], dtype=np.float32)


def test_relevance_fuses_lexical_and_semantic_matches():
    index, query = _index_with_vectors()
    lexical, semantic = index.parts(["dark chocolate"], query)
    assert lexical.min() == 0 and lexical.max() == 1 and semantic.min() == 0 and semantic.max() == 1

    def order(weight):
        return torch.argsort(S.relevance(lexical, semantic, weight)[0], descending=True, stable=True).tolist()

    assert order(1.0)[:2] == [0, 1] and order(1.0)[2:] == [2, 3]  # words only: the two with "dark chocolate"
    assert order(0.0)[:2] == [2, 1]  # vectors only: cocoa nibs first
    assert order(0.5)[0] == 1  # both: the item that matches the words and the vector
    fused = S.relevance(lexical, semantic, 0.5)
    assert float(fused.max()) == 1.0 and float(fused.min()) == 0.0


def test_personalisation_reorders_only_the_relevant_items():
    gen = torch.Generator().manual_seed(0)
    n = 300
    lexical = torch.rand(4, n, generator=gen) * (torch.rand(4, n, generator=gen) < 0.2)
    semantic = torch.rand(4, n, generator=gen)
    alone = S.search_scores(lexical, semantic, None, S.Mix(0.5, 0.7, 0.0), max_candidates=25)
    relevance_order = torch.argsort(alone, dim=1, descending=True, stable=True)
    for seed in range(3):
        personal = torch.randn(4, n, generator=torch.Generator().manual_seed(seed + 1))
        for mix in (S.Mix(0.5, 0.7, 0.5), S.Mix(0.5, 0.7, 1.0), S.Mix(0.5, 0.5, 0.2)):
            scores = S.search_scores(lexical, semantic, personal, mix, max_candidates=25)
            order = torch.argsort(scores, dim=1, descending=True, stable=True)
            rel = S.relevance(lexical, semantic, mix.lexical)
            for row in range(4):
                cut = torch.topk(rel[row], 25).values[-1]
                relevant = set(torch.nonzero((rel[row] >= mix.threshold) & (rel[row] >= cut)).flatten().tolist())
                m = len(relevant)
                assert 0 < m <= 25
                # The relevant items come first, whoever the user is; the rest keep the relevance order.
                assert set(order[row, :m].tolist()) == relevant
                assert order[row, m:].tolist() == [i for i in relevance_order[row].tolist() if i not in relevant]
                if mix.personal == 1.0:  # among them, the user's order
                    mine = sorted(relevant, key=lambda i: -float(personal[row, i]))
                    assert order[row, :m].tolist() == mine
    # A different user reorders the same relevant items.
    a = S.search_scores(lexical, semantic, torch.randn(4, n), S.Mix(0.5, 0.7, 1.0), 25)
    b = S.search_scores(lexical, semantic, -torch.randn(4, n), S.Mix(0.5, 0.7, 1.0), 25)
    assert not torch.equal(a.argsort(dim=1), b.argsort(dim=1))


def test_the_mix_is_chosen_where_it_ranks_the_held_out_items_best():
    index, query = _index_with_vectors()
    lexical, semantic = index.parts(["dark chocolate"] * 2, np.repeat(query, 2, axis=0))
    personal = torch.tensor([[0.0, 1.0, 5.0, 9.0], [1.0, 0.0, 5.0, 9.0]])
    # The users bought items 1 and 0: the ones they score highest among the word matches.
    block = S.Block(lexical, semantic, {"me": personal}, [np.array([1]), np.array([0])], None)
    grids = {"relevance": S.mix_grid(1.0, None, None, with_personal=False),
             "me": S.mix_grid(1.0, None, None, with_personal=True)}
    chosen = S.choose_mixes([block], grids, max_candidates=10, k=1)
    assert chosen["relevance"][1] == 0.5  # words alone tie items 0 and 1: one of the two users is right
    mix, ndcg = chosen["me"]
    assert ndcg == 1.0 and mix.personal > 0 and mix.threshold >= 0.5  # 2 and 3 must not become candidates
    _, top = S.search_topk(lexical, semantic, personal, mix, 10, k=4)
    assert top[:, :2].tolist() == [[1, 0], [0, 1]]
    assert ranking_metrics(top.numpy(), block.targets, [1])["ndcg@1"].tolist() == [1.0, 1.0]


def test_dark_chocolate_ranks_the_dark_chocolate_products_first_on_the_demo_shop():
    """The demo's Food catalogue with the real text encoder: every mix validation may choose."""
    from trecsys.ingest.embed import embed_texts
    from trecsys.ingest.synthetic import generate_domains

    cfg = load_config("configs/demo.yaml", [])
    items = generate_domains(cfg)["Food"].items
    items = items.assign(text=items["title"])
    vectors, _ = embed_texts(items["text"].tolist(), cfg.embedding, progress=False)
    index = S.SearchIndex(S.search_documents(items, cfg.search.fields), vectors)
    query = "dark chocolate"
    wanted = set(np.flatnonzero(items["title"].str.contains("Dark Chocolate").to_numpy()).tolist())
    assert len(wanted) >= 3
    lexical, semantic = index.parts([query], embed_texts([query], cfg.embedding, progress=False)[0])
    users = torch.randn(3, len(items), generator=torch.Generator().manual_seed(0))
    for weight in S.LEXICAL_GRID:
        # With a user: thresholds of 0.7 and up (0.9 for the encoder alone). Lower ones let the "Dark
        # Roast" creamer (one word and a nearby vector) in among the candidates, where a coffee lover's
        # history would lift it: what validation weighs when it chooses the threshold.
        thresholds = [t for t in S.THRESHOLD_GRID if t >= (0.7 if weight > 0 else 0.9)]
        with_users = [(users[u:u + 1], S.Mix(weight, t, w)) for u in range(3) for t in thresholds for w in (0.4, 1.0)]
        for personal, mix in [(None, S.Mix(weight, 0.5, 0.0)), *with_users]:
            _, top = S.search_topk(lexical, semantic, personal, mix, 200, k=len(wanted))
            assert set(top[0].tolist()) == wanted, (mix, items["title"].iloc[top[0].numpy()].tolist())


# ---------------------------------------------------------------------------------------------
# The protocol and the CLI on the tiny run


GROUPS = ("apples", "bread", "cheese", "dates", "eggs", "figs", "grapes", "honey")


def add_categories(run_dir):
    """Give the tiny run's items a category path: items in groups of 4 ("Food > Apples", ...)."""
    folder = run_dir / "prepared"
    items = pd.read_parquet(folder / "items.parquet")
    local = items["item_idx"] - items.groupby("domain")["item_idx"].transform("min")
    items["category"] = items["domain"] + " > " + (local // 4).map(lambda g: GROUPS[g % len(GROUPS)].title())
    write_parquet(pa.Table.from_pandas(items, preserve_index=False), folder / "items.parquet")
    manifest = read_json(folder / "manifest.json")
    generated = {"trecsys_version", "stage", "created_at", "host", "config", "inputs", "outputs"}
    write_manifest(folder, "prepare", manifest["config"], [], {k: v for k, v in manifest.items() if k not in generated})
    return items


def test_protocol_rows_query_each_held_out_purchase_by_its_category(tiny_prepared):
    with pytest.raises(DataError, match=r"items\.parquet: the items of domain 'Food' have no category column"):
        P.protocol_rows(load_prepared(tiny_prepared), "test")
    items = add_categories(tiny_prepared)
    prepared = load_prepared(tiny_prepared)
    rows = P.protocol_rows(prepared, "test")
    food = items[items["domain"] == "Food"].reset_index(drop=True)
    inter = prepared.interactions[prepared.interactions["domain"] == "Food"]
    test = inter[inter["split"] == "test"]
    assert len(rows.queries) == len(test) and rows.n_without_category == 0
    start = int(food["item_idx"].min())
    for query, target, history, user in zip(rows.queries, rows.targets, rows.exclude, rows.user_idx, strict=True):
        assert query == S.category_query(food["category"].iloc[int(target[0])])
        mine = inter[inter["user_idx"] == user]
        assert int(target[0]) + start == int(mine.loc[mine["split"] == "test", "item_idx"].iloc[0])
        assert sorted(history.tolist()) == sorted((mine.loc[mine["split"] != "test", "item_idx"] - start).tolist())


@pytest.fixture
def search_run(tiny_prepared):
    add_categories(tiny_prepared)
    save_model(tiny_prepared / "finetune", tiny_prepared)
    return tiny_prepared


def _config(run_dir, overrides=()):
    path = tiny_config(run_dir, run_dir.parent / "search.yaml")
    data = yaml.safe_load(path.read_text())
    data["recommend"] = {"k": 5}
    data["evaluate"] = {"ks": [5, 10], "bootstrap": 50}
    path.write_text(yaml.safe_dump(data))
    return load_config(path, list(overrides))


@pytest.mark.usefixtures("fake_encoder")
def test_recommend_search_mode_ranks_matches_and_keeps_the_user(search_run, capsys):
    from trecsys.stages import recommend as stage

    cfg = _config(search_run, ["search.lexical_weight=1.0"])
    out = stage.run(cfg, query=["cheese", "dates"], user="u1")
    recs = pd.read_parquet(out.parquet)
    assert list(recs.columns) == ["query", "user_id", "rank", "item_id", "score"]
    assert (recs["user_id"] == "u1").all() and recs.groupby("query").size().tolist() == [5, 5]
    inter = pd.read_parquet(search_run / "prepared" / "interactions.parquet")
    seen = set(inter.loc[(inter["user_id"] == "u1") & (inter["domain"] == "Food"), "item_idx"] - 54)
    for query, group in recs.groupby("query"):
        local = [int(i[1:]) for i in group.sort_values("rank")["item_id"]]
        g = GROUPS.index(query)
        in_group = [i for i in range(4 * g, 4 * g + 4) if i not in seen]
        assert in_group and set(local[:len(in_group)]) == set(in_group)
        assert not set(local) & seen
    printed = capsys.readouterr().out
    assert "queries/s" in printed and "p95" in printed
    manifest = read_json(out.manifest)
    assert manifest["context"]["query_mode"] == "search" and "latency_p50_s" in manifest["context"]
    # Diversity re-ranks within the list: the same matches lead, in another order when λ = 1.
    varied = pd.read_parquet(stage.run(_config(search_run, ["search.lexical_weight=1.0", "recommend.diversity=1.0"]),
                                       query=["cheese"], user="u1", output=str(search_run / "v.parquet")).parquet)
    plain = recs[recs["query"] == "cheese"].sort_values("rank")["item_id"].tolist()
    assert varied["item_id"].iloc[0] == plain[0] and len(varied) == 5


@pytest.mark.usefixtures("fake_encoder")
def test_evaluate_search_task_reports_the_model_beside_the_floors(search_run):
    from trecsys.stages import evaluate

    evaluate.run(_config(search_run, ["evaluate.task=search"]))
    metrics = pd.read_parquet(search_run / "eval_search" / "metrics.parquet")
    runs = list(dict.fromkeys(metrics["run"]))
    assert runs == ["finetune + relevance", "relevance + popularity", "relevance (bm25 + encoder)", "bm25",
                    "text encoder"]
    assert set(metrics["metric"]) >= {"ndcg", "recall", "mrr"}
    comparison = pd.read_parquet(search_run / "eval_search" / "comparison.parquet")
    assert set(comparison["reference"]) == {"finetune + relevance"}
    report = (search_run / "eval_search" / "report.md").read_text()
    assert "category path" in report and "lexical_weight=" in report
    assert not (search_run / "eval").exists()  # the recommendation evaluation is left alone
    manifest = read_json(search_run / "eval_search" / "manifest.json")
    context = read_context(manifest, search_run / "eval_search" / "manifest.json")
    assert isinstance(context, SearchContext) and context.to_json() == manifest["context"]
    assert list(manifest["context"])[:5] == ["task", "run_dir", "target", "split", "n_users"]
    assert context.n_queries == context.n_users and "finetune + relevance" in context.mixes
