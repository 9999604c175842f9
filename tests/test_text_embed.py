"""Item text composition and text embeddings: template edge cases, batching invariance, the cache."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from trecsys.artifacts import parquet_metadata
from trecsys.config import EmbeddingConfig
from trecsys.errors import ConfigError, InterruptedRun
from trecsys.ingest import embed
from trecsys.ingest.embed import ENCODER_INFO_KEY, embed_texts, encode, load_encoder
from trecsys.ingest.text import compose_text

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: correctness only, one thread is quickest

TEMPLATE = "{title}. {brand}. {category}"
TEXTS = [
    "Stainless steel chef knife, 8 inch",
    "kettle",
    "Organic green tea with jasmine flowers, 100 bags, loose leaf blend from Fujian province",
    "A",
    "Cast iron skillet pre-seasoned 12 inch with helper handle",
    "",
    "Bamboo cutting board",
]


def items(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


# ---------------------------------------------------------------------------------------------
# compose_text


def test_all_fields_present():
    table = items(title=["Chef knife"], brand=["Zwilling"], category=["Kitchen"])
    assert compose_text(table, TEMPLATE, 400).tolist() == ["Chef knife. Zwilling. Kitchen"]


@pytest.mark.parametrize(
    "title, brand, category, expected",
    [
        ("Knife", None, "Kitchen", "Knife. Kitchen"),
        ("Knife", np.nan, np.nan, "Knife"),
        (None, "Zwilling", "Kitchen", "Zwilling. Kitchen"),
        ("", "  ", "Kitchen", "Kitchen"),
        ("Knife", "Zwilling", "", "Knife. Zwilling"),
        (np.nan, None, "", ""),
    ],
)
def test_missing_fields_drop_with_their_separator(title, brand, category, expected):
    table = items(title=[title], brand=[brand], category=[category])
    assert compose_text(table, TEMPLATE, 400).tolist() == [expected]


def test_whitespace_is_collapsed_and_punctuation_not_doubled():
    table = items(title=["  Tea\tkettle \n 2 L  "], brand=["Acme Inc."], category=["Kitchen"])
    assert compose_text(table, "{title}.  {brand}. {category}.", 400).tolist() == [
        "Tea kettle 2 L. Acme Inc. Kitchen."
    ]


def test_prefix_and_ending_and_numbers():
    table = items(title=["Kettle", None, "Kettle", None], price=[12.5, np.nan, np.nan, 3.0])
    assert compose_text(table, "Item: {title}, price {price}.", 400).tolist() == [
        "Item: Kettle, price 12.5.",
        "",
        "Item: Kettle.",
        # the label belongs to the separator after {title}, so it goes with the missing title
        "Item: 3.0.",
    ]


def test_index_and_order_preserved():
    table = pd.DataFrame({"title": ["b", "a", "c"]}, index=[10, 5, 7])
    out = compose_text(table, "{title}", 400)
    assert out.index.tolist() == [10, 5, 7]
    assert out.tolist() == ["b", "a", "c"]


@pytest.mark.parametrize(
    "text, cap, expected",
    [
        ("hello wonderful world", 15, "hello wonderful"),
        ("hello wonderful world", 16, "hello wonderful"),
        ("hello wonderful world", 14, "hello"),
        ("hello, wonderful world", 14, "hello"),
        ("supercalifragilistic word", 5, "super"),
        ("short", 400, "short"),
    ],
)
def test_cap_at_word_boundary(text, cap, expected):
    out = compose_text(items(title=[text]), "{title}", cap).iloc[0]
    assert out == expected
    assert len(out) <= cap


def test_empty_table_and_pandas_string_dtype():
    empty = pd.DataFrame({"title": pd.Series([], dtype=object)})
    assert compose_text(empty, "{title}", 400).tolist() == []
    strings = pd.DataFrame({"title": pd.Series(["Kettle", None], dtype="string")})
    assert compose_text(strings, "{title}.", 400).tolist() == ["Kettle.", ""]


def test_unknown_field_is_a_config_error_naming_key_and_columns():
    table = items(title=["Knife"], brand=["Zwilling"])
    with pytest.raises(ConfigError) as err:
        compose_text(table, "{title}. {colour}", 400)
    message = str(err.value)
    assert "data.text_template" in message and "colour" in message and "title, brand" in message
    assert "\n" not in message


@pytest.mark.parametrize("template", ["no fields at all", "{title:>10}", "{title!r}", "{}", "{title"])
def test_bad_templates_are_config_errors(template):
    with pytest.raises(ConfigError, match="data.text_template"):
        compose_text(items(title=["x"]), template, 400)


def test_bad_cap_is_a_config_error():
    with pytest.raises(ConfigError, match="data.max_text_chars"):
        compose_text(items(title=["x"]), "{title}", 0)


# ---------------------------------------------------------------------------------------------
# Embeddings (the real default encoder, loaded once per process)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(embed.DEFAULT_ENCODER, torch.device("cpu"), 128)


@pytest.fixture
def cfg(tmp_path):
    return EmbeddingConfig(cache_dir=str(tmp_path / "cache"), batch_size=4)


@pytest.fixture
def count_encoded(monkeypatch):
    """Every text that reaches the model, call by call."""
    calls: list[list[str]] = []
    real = embed.encode

    def counting(enc, texts, batch_size, progress=True, bar=None):
        calls.append(list(texts))
        return real(enc, texts, batch_size, progress, bar)

    monkeypatch.setattr(embed, "encode", counting)
    return calls


def test_embeddings_are_unit_norm_and_described(cfg):
    vectors, info = embed_texts(TEXTS, cfg, progress=False)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert info["name"] == embed.DEFAULT_ENCODER and info["pooling"] == "mean"
    assert info["dim"] == 384 and info["max_length"] == 128
    assert len(info["revision"]) == 16 and int(info["revision"], 16) >= 0
    # related texts are closer than unrelated ones: the encoder is really loaded, not random
    knife, kettle, tea, skillet = vectors[0], vectors[1], vectors[2], vectors[4]
    assert knife @ skillet > knife @ tea
    assert kettle @ tea > 0


def test_short_name_is_the_default(encoder):
    assert (
        load_encoder("all-MiniLM-L6-v2", torch.device("cpu"), 128).info["revision"]
        == encoder.info["revision"]
    )


def test_encoding_is_deterministic(encoder):
    first = encode(encoder, TEXTS, batch_size=3, progress=False)
    second = encode(encoder, TEXTS, batch_size=3, progress=False)
    np.testing.assert_array_equal(first, second)


def test_batching_and_sorting_do_not_change_vectors(encoder):
    # batch_size=1: each text alone, in input order, with no padding at all
    alone = encode(encoder, TEXTS, batch_size=1, progress=False)
    for batch_size in (3, 128):
        batched = encode(encoder, TEXTS, batch_size=batch_size, progress=False)
        np.testing.assert_allclose(batched, alone, atol=1e-5)
    # the same texts in another input order come back in that order
    order = [3, 0, 6, 2, 5, 1, 4]
    shuffled = encode(encoder, [TEXTS[i] for i in order], batch_size=3, progress=False)
    np.testing.assert_allclose(shuffled, alone[order], atol=1e-5)


def test_token_cap_splits_long_batches():
    lengths = np.array([100, 90, 10, 10, 10, 10])
    order = np.argsort(-lengths, kind="stable")
    batches = [b.tolist() for b in embed._batches(order, lengths, batch_size=4, token_cap=200)]
    assert batches == [[0, 1], [2, 3, 4, 5]]
    assert [b.tolist() for b in embed._batches(order, lengths, 4, None)] == [[0, 1, 2, 3], [4, 5]]


def test_cache_returns_identical_vectors_and_embeds_nothing_twice(cfg, count_encoded):
    first, info = embed_texts(TEXTS, cfg, progress=False)
    assert count_encoded == [TEXTS]
    second, info2 = embed_texts(list(reversed(TEXTS)), cfg, progress=False)
    assert count_encoded == [TEXTS]  # nothing new reached the model
    np.testing.assert_array_equal(second, first[::-1])
    assert info2 == info
    # only the new text is embedded; the rest comes from the cache
    third, _ = embed_texts(["Copper saucepan", TEXTS[0]], cfg, progress=False)
    assert count_encoded[1:] == [["Copper saucepan"]]
    np.testing.assert_array_equal(third[1], first[0])
    shards = sorted(Path(cfg.cache_dir).rglob("shard-*.parquet"))
    assert len(shards) == 2
    assert ENCODER_INFO_KEY in parquet_metadata(shards[0])


def test_uncached_calls_read_and_write_no_shard(cfg, count_encoded):
    cached, _ = embed_texts(TEXTS[:1], cfg, progress=False)
    vectors, _ = embed_texts(TEXTS, cfg, progress=False, cache=False)  # search queries
    assert count_encoded == [TEXTS[:1], TEXTS]  # the cached text is encoded again, not read back
    np.testing.assert_allclose(vectors[0], cached[0], atol=1e-6)
    assert len(list(Path(cfg.cache_dir).rglob("shard-*.parquet"))) == 1


def test_duplicates_within_a_call_are_embedded_once(cfg, count_encoded):
    texts = ["kettle", "teapot", "kettle", "kettle", "teapot"]
    vectors, _ = embed_texts(texts, cfg, progress=False)
    assert count_encoded == [["kettle", "teapot"]]
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_array_equal(vectors[1], vectors[4])
    assert not np.allclose(vectors[0], vectors[1])


def test_empty_input(cfg):
    vectors, info = embed_texts([], cfg, progress=False)
    assert vectors.shape == (0, 384) and info["dim"] == 384


def test_cache_key_changes_with_encoder_and_max_length(cfg, tmp_path, count_encoded):
    embed_texts(TEXTS[:2], cfg, progress=False)
    cfg.max_length = 16
    embed_texts(TEXTS[:2], cfg, progress=False)
    assert len(count_encoded) == 2  # another max_length is another cache
    cfg.encoder = str(tiny_encoder(tmp_path / "tiny"))
    vectors, info = embed_texts(TEXTS[:2], cfg, progress=False)
    assert len(count_encoded) == 3 and vectors.shape == (2, 32) and info["path"].endswith("tiny")
    folders = sorted(p.name for p in Path(cfg.cache_dir).iterdir())
    assert len(folders) == 3 and len({f.split("-len")[0] for f in folders}) == 2


def tiny_encoder(folder):
    """A small random BERT with the default's tokenizer: a different encoder that loads in a blink."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    source, _ = embed._resolve_encoder(embed.DEFAULT_ENCODER)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(folder)
    return folder


def test_a_killed_run_keeps_its_finished_chunks_and_the_next_continues(cfg, count_encoded, monkeypatch):
    monkeypatch.setattr(embed, "CHUNK_TEXTS", 3)
    real = embed.encode

    def killed_on_the_third_chunk(enc, texts, batch_size, progress=True, bar=None):
        if len(count_encoded) == 2:  # two chunks done
            raise KeyboardInterrupt  # the process dies mid-chunk
        return real(enc, texts, batch_size, progress, bar)

    monkeypatch.setattr(embed, "encode", killed_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        embed_texts(TEXTS, cfg, progress=False)
    assert len(list(Path(cfg.cache_dir).rglob("shard-*.parquet"))) == 2  # one shard per finished chunk
    monkeypatch.setattr(embed, "encode", real)
    count_encoded.clear()
    vectors, _ = embed_texts(TEXTS, cfg, progress=False)
    assert count_encoded == [TEXTS[6:]]  # only what the killed run had not finished
    fresh = encode(embed.load_encoder(cfg.encoder, torch.device("cpu"), cfg.max_length), TEXTS, 4, progress=False)
    np.testing.assert_allclose(vectors, fresh, atol=1e-5)


def test_stop_request_ends_after_a_chunk_with_exit_130(cfg, count_encoded, monkeypatch):
    monkeypatch.setattr(embed, "CHUNK_TEXTS", 2)
    with pytest.raises(InterruptedRun, match="2 of 7 new item texts are cached") as caught:
        embed_texts(TEXTS, cfg, progress=False, stop=lambda: True)
    assert caught.value.exit_code == 130 and count_encoded == [TEXTS[:2]]
    embed_texts(TEXTS, cfg, progress=False, stop=lambda: False)
    assert count_encoded[1:] == [TEXTS[2:4], TEXTS[4:6], TEXTS[6:]]
    # the finished run merged its own chunks: the first run's shard and one more
    assert len(list(Path(cfg.cache_dir).rglob("shard-*.parquet"))) == 2


def test_corrupt_cache_shard_is_ignored_and_recomputed(cfg, count_encoded):
    first, _ = embed_texts(TEXTS, cfg, progress=False)
    (shard,) = Path(cfg.cache_dir).rglob("shard-*.parquet")
    shard.write_bytes(b"PAR1 this is not parquet")
    with pytest.warns(UserWarning, match="corrupt embedding cache shard"):
        again, _ = embed_texts(TEXTS, cfg, progress=False)
    assert len(count_encoded) == 2
    np.testing.assert_array_equal(again, first)
    assert shard.with_name(shard.name + ".corrupt").exists()
    # the recomputed shard serves the next call, without warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        embed_texts(TEXTS, cfg, progress=False)
    assert len(count_encoded) == 2


def test_shard_with_wrong_shape_is_ignored(cfg, count_encoded):
    import pyarrow as pa

    from trecsys.artifacts import write_parquet

    folder = embed._cache_folder(
        cfg, {**embed._load_model(cfg.encoder, "cpu").info, "max_length": cfg.max_length}
    )
    hashes = [embed.text_hash(t) for t in TEXTS[:2]]
    wrong = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * 8, np.float32)), 8)
    write_parquet(pa.table({"text_hash": hashes, "embedding": wrong}), folder / "shard-bad.parquet")
    with pytest.warns(UserWarning, match="expected fixed_size_list"):
        vectors, _ = embed_texts(TEXTS[:2], cfg, progress=False)
    assert count_encoded == [TEXTS[:2]]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_unwritable_cache_warns_but_embeds(cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg.cache_dir = str(blocker / "cache")
    with pytest.warns(UserWarning, match="could not write the embedding cache"):
        vectors, _ = embed_texts(TEXTS[:2], cfg, progress=False)
    assert vectors.shape == (2, 384)


def test_unknown_encoder_is_a_config_error(cfg, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg.encoder = "no-such-org/no-such-encoder"
    with pytest.raises(ConfigError, match=r"embedding\.encoder: cannot load .*no network\?"):
        embed_texts(["x"], cfg, progress=False)
    cfg.encoder = str(tmp_path)  # a folder, but not a model
    with pytest.raises(ConfigError, match=r"embedding\.encoder: .*must hold a Hugging Face model"):
        embed_texts(["x"], cfg, progress=False)


def test_bad_settings_are_config_errors(cfg):
    cfg.max_length = 1000
    with pytest.raises(ConfigError, match="embedding.max_length"):
        embed_texts(["x"], cfg, progress=False)
    with pytest.raises(ConfigError, match="device"):
        embed_texts(["x"], EmbeddingConfig(cache_dir=cfg.cache_dir), device="gpu0", progress=False)
