"""Readers: every format from tiny files written here, plain and gzip; bad input → DataError."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trecsys.config import ColumnConfig, DomainConfig
from trecsys.errors import ConfigError, DataError
from trecsys.ingest.readers import read_domain

SHARED_DATA = Path(os.environ.get("TRECSYS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def write(path: Path, text: str, gz: bool = False) -> str:
    """Write `text` to `path` (gzip-compressed with `.gz` appended when `gz`); return the file name."""
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        path.write_text(text, encoding="utf-8")
    return path.name


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def read(tmp_path: Path, on_bad_rows: str = "error", **domain):
    return read_domain("shop", DomainConfig(**domain), tmp_path, on_bad_rows)


def rows(frame: pd.DataFrame) -> list[tuple]:
    """Frame rows as plain tuples (NaN → None) for exact comparison."""
    return [tuple(None if isinstance(v, float) and np.isnan(v) else v for v in row)
            for row in frame.itertuples(index=False)]


def check_contract(raw) -> None:
    inter = raw.interactions
    assert list(inter.columns[:4]) == ["user_id", "item_id", "timestamp", "rating"]
    assert pd.api.types.is_string_dtype(inter["user_id"]) and pd.api.types.is_string_dtype(inter["item_id"])
    # Times at full precision (float64); positions and generated times are whole numbers (int64).
    assert inter["timestamp"].dtype in (np.float64, np.int64) and inter["rating"].dtype == np.float64
    assert raw.items.columns[0] == "item_id" and raw.items["item_id"].is_unique
    for column in raw.items.columns:
        assert pd.api.types.is_string_dtype(raw.items[column]) and not raw.items[column].isna().any()


# ---------------------------------------------------------------------------------------------
# Amazon


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2014_reviews_and_literal_meta(tmp_path, gz):
    reviews = write(tmp_path / "reviews.json", jsonl([
        {"reviewerID": "U1", "asin": "A1", "overall": 5.0, "unixReviewTime": 1400000000, "reviewText": "x"},
        {"reviewerID": "U1", "asin": "A2", "overall": 3.0, "unixReviewTime": 1400000100},
        {"reviewerID": "U2", "asin": "A1", "overall": 4.0, "unixReviewTime": 1300000000},
    ]), gz)
    # The 2014 metadata is Python literals, not JSON.
    meta = write(tmp_path / "meta.json", "\n".join([
        "{'asin': 'A0', 'title': 'Not reviewed'}",
        "{'asin': 'A1', 'title': 'Pens &amp; Pencils', 'brand': 'Bic', 'price': 4.5, "
        "'categories': [['Office'], ['Office', 'Writing', 'Pens']], 'description': 'Blue  ink.'}",
        "{'asin': 'A2', 'title': \"Kid's <b>glue</b>\", 'categories': [['Office', 'Glue']]}",
        "{'asin': 'A1', 'title': 'A repeated line is ignored'}",
    ]) + "\n", gz)
    raw = read(tmp_path, format="amazon2014", interactions=reviews, items=meta)
    check_contract(raw)
    assert rows(raw.interactions) == [("U1", "A1", 1400000000, 5.0), ("U1", "A2", 1400000100, 3.0),
                                      ("U2", "A1", 1300000000, 4.0)]
    assert list(raw.items.columns) == ["item_id", "title", "brand", "category", "description", "price"]
    assert rows(raw.items) == [
        ("A1", "Pens & Pencils", "Bic", "Office > Writing > Pens", "Blue ink.", "4.50"),
        ("A2", "Kid's glue", "", "Office > Glue", "", ""),
    ]
    assert raw.files == [str(tmp_path / reviews), str(tmp_path / meta)]
    assert not raw.order_only and "split" not in raw.interactions


def test_amazon2018_meta_lists_and_prices(tmp_path):
    reviews = write(tmp_path / "r.json", jsonl([
        {"reviewerID": "U1", "asin": "B1", "overall": 4.0, "unixReviewTime": 1500000000},
        {"reviewerID": "U1", "asin": "B2", "overall": 2.0, "unixReviewTime": 1500000001},
    ]))
    meta = write(tmp_path / "m.json", jsonl([
        {"asin": "B1", "title": "Kettle", "brand": "Acme", "category": ["Home", "Kitchen"],
         "description": ["Boils water.", "Fast."], "price": "$12.99"},
        {"asin": "B2", "title": "Mug", "category": [], "price": ".a-box{color:#fff}"},
    ]))
    raw = read(tmp_path, format="amazon2018", interactions=reviews, items=meta)
    check_contract(raw)
    assert rows(raw.items) == [("B1", "Kettle", "Acme", "Home, Kitchen", "Boils water. Fast.", "$12.99"),
                               ("B2", "Mug", "", "", "", "")]


def test_amazon2023_ms_timestamps_parent_asin(tmp_path):
    reviews = write(tmp_path / "r.jsonl", jsonl([
        {"user_id": "AE1", "asin": "C1v", "parent_asin": "C1", "rating": 5.0, "timestamp": 1588615855070},
        {"user_id": "AE1", "asin": "C2", "parent_asin": "C2", "rating": 1.0, "timestamp": 1588615856000},
    ]))
    meta = write(tmp_path / "m.jsonl", jsonl([
        {"parent_asin": "C1", "title": "Lamp", "store": "Lux", "categories": ["Home", "Lighting"],
         "features": ["LED", "Dimmable"], "description": ["A lamp."], "price": 19.0},
        {"parent_asin": "C2", "title": "Bulb", "store": None, "categories": [], "features": [],
         "description": [], "price": None},
    ]), gz=True)
    raw = read(tmp_path, format="amazon2023", interactions=reviews, items=meta)
    check_contract(raw)
    # Milliseconds kept: fractions of a second order events (prepare stores whole seconds, in that order).
    assert rows(raw.interactions) == [("AE1", "C1", 1588615855.07, 5.0), ("AE1", "C2", 1588615856, 1.0)]
    assert list(raw.items.columns) == ["item_id", "title", "brand", "category", "features", "description", "price"]
    assert rows(raw.items) == [("C1", "Lamp", "Lux", "Home, Lighting", "LED Dimmable", "A lamp.", "19.00"),
                               ("C2", "Bulb", "", "", "", "", "")]


def test_amazon_fast_path_and_line_loop_agree(tmp_path):
    records = [{"reviewerID": f"U{i % 7}", "asin": f"B{i % 5}", "overall": float(i % 5 + 1),
                "unixReviewTime": 1_400_000_000 + i} for i in range(50)]
    records[3].pop("overall")
    write(tmp_path / "r.json", jsonl(records))
    # The same reviews as Python literals: only the line loop (with literal_eval) reads these.
    write(tmp_path / "r.py", "".join(repr(r) + "\n" for r in records))
    fast = read(tmp_path, format="amazon2014", interactions="r.json").interactions
    loop = read(tmp_path, format="amazon2014", interactions="r.py").interactions
    pd.testing.assert_frame_equal(fast, loop)
    assert len(fast) == 50 and fast["rating"].isna().sum() == 1


META_2023_TRICKY = [
    {"parent_asin": "M1", "title": "  Salt &amp; Pepper\u2003Mill ", "store": "A & B", "categories": ["Home & Kitchen", None, "  "],
     "features": ["<b>Bold</b> claim", "x\ty"], "description": None, "price": 3},
    {"parent_asin": "M2", "title": "Plain", "store": None, "categories": [], "price": None},
    {"parent_asin": "M3", "title": "a\x1cb\u00a0c  d", "store": "S\u3000T", "categories": ["One"],
     "features": ["", " f "], "description": ["first.", "second."], "price": 2.005},
    {"parent_asin": "M1", "title": "a later line for M1 is ignored"},
    {"parent_asin": "M4", "title": "not reviewed", "store": "Q"},
    {"parent_asin": "M5", "title": "R&D &#x27;quoted&#x27; &copy", "details": {"nested": [1, {"a": 2}]},
     "images": [{"large": "x"}], "features": ["&lt;i&gt;"], "price": 1e10},
]


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2023_meta_arrow_path_matches_the_line_loop(tmp_path, gz, monkeypatch):
    """Arrow's block parse with column-wise cleaning gives the line loop's table exactly (HTML
    entities and tags, Unicode spaces, nulls, empty lists, repeated ids, prices); a line Arrow refuses
    (a number as a title) sends the whole file to the loop, with the same result."""
    from trecsys.ingest import amazon
    from trecsys.ingest.inputs import BadRows

    wanted = {"M1", "M2", "M3", "M5", "M9"}
    for name, records in (("ok", META_2023_TRICKY), ("odd", [*META_2023_TRICKY, {"parent_asin": "M9", "title": 7}])):
        path = tmp_path / write(tmp_path / f"{name}.jsonl", jsonl(records), gz=gz)
        fast = amazon._meta_with_arrow(path, wanted)
        if name == "odd":
            assert fast is None
        with monkeypatch.context() as patch:
            patch.setattr(amazon, "_meta_with_arrow", lambda *_: None)
            loop = amazon.read_meta(path, "amazon2023", wanted, BadRows("error"))
        table = amazon.read_meta(path, "amazon2023", wanted, BadRows("error"))
        pd.testing.assert_frame_equal(table, loop)
    ok = amazon._meta_with_arrow(tmp_path / (f"ok.jsonl{'.gz' if gz else ''}"), wanted)
    assert rows(ok)[:3] == [
        ("M1", "Salt & Pepper Mill", "A & B", "Home & Kitchen", "Bold claim x y", "", "3.00"),
        ("M2", "Plain", "", "", "", "", ""),
        ("M3", "a b c d", "S T", "One", "f", "first. second.", "2.00"),
    ]
    assert rows(ok)[3] == ("M5", "R&D 'quoted' ©", "", "", "", "", "10000000000.00")  # &lt;i&gt; is a tag once unescaped


def test_amazon_without_meta_keeps_item_ids(tmp_path):
    reviews = write(tmp_path / "r.json", jsonl([
        {"reviewerID": "U1", "asin": "B2", "overall": 4.0, "unixReviewTime": 1},
        {"reviewerID": "U2", "asin": "B1", "overall": 4.0, "unixReviewTime": 2},
        {"reviewerID": "U2", "asin": "B2", "unixReviewTime": 3},
    ]))
    raw = read(tmp_path, format="amazon2018", interactions=reviews)
    assert rows(raw.items) == [("B2",), ("B1",)]
    assert raw.interactions["rating"].isna().tolist() == [False, False, True]


def test_malformed_json_line_error_and_skip(tmp_path):
    reviews = write(tmp_path / "r.json", "\n".join([
        json.dumps({"reviewerID": "U1", "asin": "B1", "overall": 4.0, "unixReviewTime": 10}),
        '{"reviewerID": "U1", "asin": ',
        json.dumps({"reviewerID": "U1", "asin": "B2", "overall": 4.0, "unixReviewTime": "soon"}),
        json.dumps({"asin": "B3", "overall": 4.0, "unixReviewTime": 12}),
        json.dumps({"reviewerID": "U2", "asin": "B1", "overall": 4.0, "unixReviewTime": -5}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"reviewerID": "U2", "asin": "B3", "overall": 1.0, "unixReviewTime": 13}),
    ]) + "\n")
    with pytest.raises(DataError, match=r"r\.json:2: malformed JSON: "):
        read(tmp_path, format="amazon2018", interactions=reviews)
    raw = read(tmp_path, "skip", format="amazon2018", interactions=reviews)
    assert rows(raw.interactions) == [("U1", "B1", 10, 4.0), ("U2", "B3", 13, 1.0)]
    assert raw.skipped_rows == 5
    assert len(raw.skipped_examples) == 5
    examples = "\n".join(raw.skipped_examples)
    for expected in ("r.json:2: malformed JSON", "r.json:3: field 'unixReviewTime': 'soon' is not a number",
                     "r.json:4: missing field 'reviewerID'", "r.json:5: field 'unixReviewTime': -5 is negative",
                     "r.json:6: expected a JSON object, got list"):
        assert expected in examples


def test_truncated_gzip_names_file_and_line(tmp_path):
    records = [{"reviewerID": f"U{i}", "asin": "B1", "overall": 4.0, "unixReviewTime": i} for i in range(3000)]
    blob = gzip.compress(jsonl(records).encode())
    (tmp_path / "r.json.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"r\.json\.gz: truncated or corrupt gzip file after line \d+"):
        read(tmp_path, format="amazon2018", interactions="r.json.gz")


# ---------------------------------------------------------------------------------------------
# RecBole atomic files

OFFICE_INTER = (
    "user_id:token\titem_id:token\ttimestamp:float\torigin_split:token\n"
    "u1\tI1\t970185600\ttrain\n"
    "u1\tI2\t1381190400\tdev\n"
    "u1\tI3\t1394582400.5\ttest\n"
    "u2\tI1\t5\ttrain\n"
)
OFFICE_ITEM = "item_id:token\ttitle:token_seq\tbrand:token\tprice:float\nI1\tHP 12C Calculator\tHP\t9.5\nI2\tStapler\t\t\nI3\t\"Quoted\" pen\tBic\t1\n"


@pytest.mark.parametrize("gz", [False, True])
def test_recbole_timestamp_and_origin_split(tmp_path, gz):
    inter = write(tmp_path / "Office.inter", OFFICE_INTER, gz)
    item = write(tmp_path / "Office.item", OFFICE_ITEM, gz)
    raw = read(tmp_path, format="recbole", interactions=inter, items=item)
    check_contract(raw)
    assert rows(raw.interactions) == [("u1", "I1", 970185600, None, "train"), ("u1", "I2", 1381190400, None, "valid"),
                                      ("u1", "I3", 1394582400.5, None, "test"), ("u2", "I1", 5, None, "train")]
    assert rows(raw.items) == [("I1", "HP 12C Calculator", "HP", "9.5"), ("I2", "Stapler", "", ""),
                               ("I3", '"Quoted" pen', "Bic", "1")]
    assert not raw.order_only


def test_recbole_position_is_an_order(tmp_path):
    inter = write(tmp_path / "Food.inter", "user_id:token\titem_id:token\tposition:float\trating:float\n"
                  "a\tX\t0\t4\na\tY\t1\t\nb\tY\t0\t2.5\n")
    raw = read(tmp_path, format="recbole", interactions=inter)
    assert raw.order_only
    assert rows(raw.interactions) == [("a", "X", 0, 4.0), ("a", "Y", 1, None), ("b", "Y", 0, 2.5)]
    assert "split" not in raw.interactions


@pytest.mark.parametrize("header, message", [
    ("user_id:token\titem_id\ttimestamp:float", r"header field 2 'item_id' is not name:type"),
    ("user_id:token\titem_id:text\ttimestamp:float", r"unknown type 'text'"),
    ("user_id:token\titem_id:token\titem_id:token\ttimestamp:float", r"names field 'item_id' twice"),
    ("uid:token\titem_id:token\ttimestamp:float", r"header has no 'user_id' field"),
    ("user_id:token\titem_id:token\trating:float", r"neither a timestamp nor a position"),
    ("user_id:token\titem_id_list:token_seq\titem_id:token", r"format: recbole_split"),
])
def test_recbole_header_validation(tmp_path, header, message):
    inter = write(tmp_path / "x.inter", header + "\nu\ti\t1\n")
    with pytest.raises(DataError, match=r"x\.inter:1: .*" + message):
        read(tmp_path, format="recbole", interactions=inter)


def test_recbole_bad_rows_name_line_and_column(tmp_path):
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\torigin_split:token\n"
                  "u\ti1\t1\ttrain\n"
                  "\n"
                  "u\ti2\tabc\ttrain\n"
                  "u\ti3\t2\ttrain\textra\n"
                  "u\t\t3\ttrain\n"
                  "u\ti4\t-1\ttrain\n"
                  "u\ti5\tNaN\ttrain\n"
                  "u\ti6\t4\tholdout\n"
                  "u\ti7\t5\ttest\n")
    with pytest.raises(DataError, match=r"x\.inter:4: column 'timestamp': 'abc' is not a number"):
        read(tmp_path, format="recbole", interactions=inter)
    raw = read(tmp_path, "skip", format="recbole", interactions=inter)
    assert rows(raw.interactions) == [("u", "i1", 1, None, "train"), ("u", "i7", 5, None, "test")]
    assert raw.skipped_rows == 6
    assert raw.skipped_examples == [
        f"{tmp_path / inter}:4: column 'timestamp': 'abc' is not a number",
        f"{tmp_path / inter}:5: expected 4 fields, saw 5 (a field holds the separator?)",
        f"{tmp_path / inter}:6: missing value in column 'item_id'",
        f"{tmp_path / inter}:7: column 'timestamp': '-1' is negative",
        f"{tmp_path / inter}:8: column 'timestamp': 'NaN' is not a number",
    ]


def test_recbole_too_many_fields_is_an_error_with_its_line(tmp_path):
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\tposition:float\nu\ti\t0\nu\tj\t1\t9\n")
    with pytest.raises(DataError, match=r"x\.inter:3: expected 3 fields, saw 4"):
        read(tmp_path, format="recbole", interactions=inter)


def test_truncated_gzip_tsv(tmp_path):
    body = "user_id:token\titem_id:token\tposition:float\n" + "".join(f"u{i}\ti{i}\t0\n" for i in range(20000))
    blob = gzip.compress(body.encode())
    (tmp_path / "x.inter.gz").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(DataError, match=r"x\.inter\.gz: truncated or corrupt gzip file"):
        read(tmp_path, format="recbole", interactions="x.inter.gz")


@pytest.mark.parametrize("text", ["", "user_id:token\titem_id:token\tposition:float\n"])
def test_empty_files(tmp_path, text):
    (tmp_path / "x.inter").write_text(text)
    with pytest.raises(DataError, match=r"x\.inter: (file is empty|no interactions)"):
        read(tmp_path, format="recbole", interactions="x.inter")


def test_empty_gzip_file(tmp_path):
    (tmp_path / "x.inter.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=r"x\.inter\.gz: file is empty"):
        read(tmp_path, format="recbole", interactions="x.inter.gz")


def test_missing_file_names_path_and_key(tmp_path):
    with pytest.raises(DataError) as info:
        read(tmp_path, format="recbole", interactions="nope/x.inter")
    assert str(info.value) == f"{tmp_path / 'nope' / 'x.inter'}: file not found (data.domains.shop.interactions)"
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\tposition:float\nu\ti\t0\n")
    with pytest.raises(DataError, match=r"x\.item: file not found \(data\.domains\.shop\.items\)"):
        read(tmp_path, format="recbole", interactions=inter, items="x.item")
    with pytest.raises(DataError, match=r"x\.user: file not found \(data\.domains\.shop\.users\)"):
        read(tmp_path, format="recbole", interactions=inter, users="x.user")


def test_absolute_paths_and_synthetic(tmp_path):
    inter = write(tmp_path / "x.inter", "user_id:token\titem_id:token\tposition:float\nu\ti\t0\n")
    raw = read_domain("d", DomainConfig(format="recbole", interactions=str(tmp_path / inter)), Path("/elsewhere"),
                      "error")
    assert len(raw.interactions) == 1
    with pytest.raises(ConfigError, match=r"data\.domains\.d\.format: 'synthetic' domains are generated"):
        read_domain("d", DomainConfig(format="synthetic"), tmp_path, "error")


# ---------------------------------------------------------------------------------------------
# Pre-split RecBole benchmarks (UniSRec layout)


def write_unisrec(folder: Path, sequences: dict[str, list[str]], max_history: int, gz: bool = False) -> None:
    """The UniSRec writer: train rows longest history first, histories cut to `max_history`."""
    folder.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    train, valid, test = [header], [header], [header]
    for user, seq in sequences.items():
        body = seq[:-2]
        for target_idx in range(1, len(body)):
            train.append(f"{user}\t{' '.join(body[:-target_idx][-max_history:])}\t{body[-target_idx]}\n")
        valid.append(f"{user}\t{' '.join(body[-max_history:])}\t{seq[-2]}\n")
        test.append(f"{user}\t{' '.join(seq[:-1][-max_history:])}\t{seq[-1]}\n")
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        write(folder / f"Sci.{split}.inter", "".join(lines), gz)


@pytest.mark.parametrize("gz", [False, True])
def test_recbole_split_rebuilds_sequences(tmp_path, gz):
    sequences = {"0": ["1", "2", "3", "4", "5", "6", "7"], "1": ["3", "1", "2"], "2": ["7", "6", "5", "4"]}
    write_unisrec(tmp_path / "Sci", sequences, max_history=3, gz=gz)
    write(tmp_path / "Sci" / "Sci.text", "item_id:token\ttext:token_seq\n" + "".join(
        f"{i}\titem {i}\n" for i in range(1, 8)))
    raw = read(tmp_path, format="recbole_split", interactions="Sci/Sci", items="Sci/Sci.text")
    check_contract(raw)
    assert raw.order_only
    got = {u: list(g["item_id"]) for u, g in raw.interactions.groupby("user_id", sort=False)}
    assert got == sequences
    user0 = raw.interactions[raw.interactions["user_id"] == "0"]
    assert user0["timestamp"].tolist() == list(range(7))
    assert user0["split"].tolist() == ["train"] * 5 + ["valid", "test"]
    assert raw.interactions[raw.interactions["user_id"] == "1"]["split"].tolist() == ["train", "valid", "test"]
    assert rows(raw.items)[:2] == [("1", "item 1"), ("2", "item 2")]


def test_recbole_split_maps_indices_back_and_reads_headerless_text(tmp_path):
    write_unisrec(tmp_path, {"0": ["0", "1", "2", "1"], "1": ["2", "0", "1"]}, max_history=50)
    write(tmp_path / "Sci.item2index", "B00A\t0\nB00B\t1\nB00C\t2\n")
    write(tmp_path / "Sci.user2index", "AUSER\t0\nBUSER\t1\n")
    write(tmp_path / "Sci.text", "B00A\tAlpha widget\nB00B\tBeta\tgizmo\nB00C\tGamma\n")
    raw = read(tmp_path, "skip", format="recbole_split", interactions="Sci", items="Sci.text")
    assert rows(raw.interactions) == [
        ("AUSER", "B00A", 0, None, "train"), ("AUSER", "B00B", 1, None, "train"),
        ("AUSER", "B00C", 2, None, "valid"), ("AUSER", "B00B", 3, None, "test"),
        ("BUSER", "B00C", 0, None, "train"), ("BUSER", "B00A", 1, None, "valid"),
        ("BUSER", "B00B", 2, None, "test"),
    ]
    # Line 2 has a TAB inside the text: a bad row, counted under skip.
    assert rows(raw.items) == [("B00A", "Alpha widget"), ("B00C", "Gamma")]
    assert raw.skipped_rows == 1 and raw.skipped_examples[0].endswith("Sci.text:2: expected 2 fields, saw 3 "
                                                                       "(a field holds the separator?)")
    assert str(tmp_path / "Sci.item2index") in raw.files


def test_recbole_split_inconsistent_history(tmp_path):
    write_unisrec(tmp_path, {"0": ["1", "2", "3", "4", "5"]}, max_history=50)
    text = (tmp_path / "Sci.valid.inter").read_text().replace("1 2 3", "1 9 3")
    (tmp_path / "Sci.valid.inter").write_text(text)
    with pytest.raises(DataError, match=r"Sci\.valid\.inter:2: the history of user '0' is not the end"):
        read(tmp_path, format="recbole_split", interactions="Sci")
    with pytest.raises(DataError, match=r"Sci\.nope\.train\.inter: file not found .*prefix"):
        read(tmp_path, format="recbole_split", interactions="Sci.nope")


# ---------------------------------------------------------------------------------------------
# Generic CSV / TSV / Parquet


@pytest.mark.parametrize("gz", [False, True])
def test_csv_column_mapping(tmp_path, gz):
    inter = write(tmp_path / "events.csv", "uid,sku,ts,stars,extra\n7,S1,100,5,x\n7,S2,200,,y\n8,S1,150,3.5,z\n", gz)
    items = write(tmp_path / "products.csv", 'sku,title,price\nS1,"Pan, non-stick",10\nS2,"Lid ""glass""",\n', gz)
    columns = ColumnConfig(user="uid", item="sku", time="ts", rating="stars")
    raw = read(tmp_path, format="csv", interactions=inter, items=items, columns=columns)
    check_contract(raw)
    assert rows(raw.interactions) == [("7", "S1", 100, 5.0), ("7", "S2", 200, None), ("8", "S1", 150, 3.5)]
    assert rows(raw.items) == [("S1", "Pan, non-stick", "10"), ("S2", 'Lid "glass"', "")]
    assert not raw.order_only


def test_tsv_with_split_column_and_iso_dates(tmp_path):
    inter = write(tmp_path / "e.tsv", "user\titem\twhen\tfold\n"
                  "a\tx\t2020-01-01\ttrain\na\ty\t2020-01-02T00:00:10Z\tvalid\na\tz\t2020-01-03\tTEST\n")
    columns = ColumnConfig(user="user", item="item", time="when", split="fold")
    raw = read(tmp_path, format="tsv", interactions=inter, columns=columns)
    assert rows(raw.interactions) == [("a", "x", 1577836800, None, "train"), ("a", "y", 1577923210, None, "valid"),
                                      ("a", "z", 1578009600, None, "test")]


def test_csv_errors(tmp_path):
    columns = ColumnConfig(user="uid", item="sku", time="ts")
    inter = write(tmp_path / "e.csv", "uid,sku,when\n1,a,3\n")
    with pytest.raises(DataError, match=r"e\.csv: has no column 'ts' \(data\.domains\.shop\.columns\.time\)"):
        read(tmp_path, format="csv", interactions=inter, columns=columns)
    inter = write(tmp_path / "e.csv", "uid,sku,ts,sku\n1,a,3,b\n")
    with pytest.raises(DataError, match=r"e\.csv:1: header names column 'sku' twice"):
        read(tmp_path, format="csv", interactions=inter, columns=columns)
    inter = write(tmp_path / "e.csv", "uid,sku,ts\n1,a,3\n1,b,later\n")
    with pytest.raises(DataError, match=r"e\.csv:3: column 'ts': 'later' is not a number"):
        read(tmp_path, format="csv", interactions=inter, columns=columns)
    inter = write(tmp_path / "e.csv", "uid,sku,ts,r\n1,a,3,good\n")
    with pytest.raises(DataError, match=r"e\.csv:2: column 'r': 'good' is not a number"):
        read(tmp_path, format="csv", interactions=inter, columns=ColumnConfig(user="uid", item="sku", time="ts",
                                                                               rating="r"))
    inter = write(tmp_path / "e.csv", "uid,sku,ts\n1,a,3\n")
    items = write(tmp_path / "i.csv", "id,title\na,A\n")
    with pytest.raises(DataError, match=r"i\.csv: has no column 'sku' \(data\.domains\.shop\.columns\.item"):
        read(tmp_path, format="csv", interactions=inter, items=items, columns=columns)


def test_csv_byte_order_mark_and_encoding(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffuser_id,item_id,timestamp\n1,a,3\n".encode())
    raw = read(tmp_path, format="csv", interactions="bom.csv")
    assert rows(raw.interactions) == [("1", "a", 3, None)]
    (tmp_path / "latin.csv").write_bytes("user_id,item_id,timestamp\n1,caf\xe9,3\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.csv: not UTF-8 text .*re-save the file as UTF-8"):
        read(tmp_path, format="csv", interactions="latin.csv")


def test_long_bad_values_are_cut_short(tmp_path):
    inter = write(tmp_path / "e.csv", "user_id,item_id,timestamp\n1,a," + "x" * 500 + "\n")
    with pytest.raises(DataError) as info:
        read(tmp_path, format="csv", interactions=inter)
    assert "'xxx" in str(info.value) and len(str(info.value)) < len(str(tmp_path)) + 200


def test_parquet_typed_columns(tmp_path):
    pq.write_table(pa.table({
        "user": pa.array([1, 1, 2], pa.int64()),
        "item": ["p", "q", "p"],
        "at": pa.array([0, 86400, 3600], pa.timestamp("s")),
        "score": [1.0, None, 3.0],
    }), tmp_path / "e.parquet")
    pq.write_table(pa.table({"item": ["p", "q"], "title": ["Pot", None], "tags": [["a", "b"], []],
                             "price": [2.5, None]}), tmp_path / "i.parquet")
    columns = ColumnConfig(user="user", item="item", time="at", rating="score")
    raw = read(tmp_path, format="parquet", interactions="e.parquet", items="i.parquet", columns=columns)
    check_contract(raw)
    assert rows(raw.interactions) == [("1", "p", 0, 1.0), ("1", "q", 86400, None), ("2", "p", 3600, 3.0)]
    assert rows(raw.items) == [("p", "Pot", "a, b", "2.5"), ("q", "", "", "")]


def test_parquet_bad_rows_are_named_by_row(tmp_path):
    pq.write_table(pa.table({"user_id": ["a", None, "b"], "item_id": ["x", "y", "z"],
                             "timestamp": [1.0, 2.0, float("nan")]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match=r"e\.parquet row 2: missing value in column 'user_id'"):
        read(tmp_path, format="parquet", interactions="e.parquet")
    raw = read(tmp_path, "skip", format="parquet", interactions="e.parquet")
    assert rows(raw.interactions) == [("a", "x", 1, None)] and raw.skipped_rows == 2
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: unreadable Parquet"):
        read(tmp_path, format="parquet", interactions="bad.parquet")


def test_everything_skipped_is_an_error(tmp_path):
    inter = write(tmp_path / "e.csv", "user_id,item_id,timestamp\n1,a,x\n")
    with pytest.raises(DataError, match=r"e\.csv: no interactions after skipping 1 bad rows"):
        read(tmp_path, "skip", format="csv", interactions=inter)


# ---------------------------------------------------------------------------------------------
# The shared real data (skipped where it is absent)


@pytest.mark.shared_data
def test_shared_real_files():
    food = SHARED_DATA / "amazon_food_kitchen" / "Food"
    office = SHARED_DATA / "amazon2014_office"
    if not (food / "Food.inter.gz").is_file() or not (office / "Office.inter.gz").is_file():
        pytest.skip(f"shared data not found under {SHARED_DATA}")
    raw = read_domain("Food", DomainConfig(format="recbole", interactions="Food/Food.inter.gz",
                                           items="Food/Food.item.gz", users="Food/Food.user.gz"),
                      food.parent, "error")
    inter = raw.interactions
    assert (len(inter), inter["user_id"].nunique(), inter["item_id"].nunique()) == (98316, 14870, 8661)
    assert raw.order_only and len(raw.items) == 8661 and raw.skipped_rows == 0
    check_contract(raw)
    start = time.perf_counter()
    raw = read_domain("Office", DomainConfig(format="recbole", interactions="Office.inter.gz",
                                             items="Office.item.gz"), office, "error")
    inter = raw.interactions
    assert (len(inter), inter["user_id"].nunique(), inter["item_id"].nunique()) == (53258, 4905, 2420)
    assert inter["split"].value_counts().to_dict() == {"train": 43448, "valid": 4905, "test": 4905}
    assert not raw.order_only and list(raw.items.columns) == ["item_id", "text"]
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("gz", [False, True])
def test_line_blocks_yield_whole_lines_whatever_the_block_size(tmp_path, gz):
    """Blocks end at line ends; a line longer than the block grows it; the last line needs no newline."""
    from trecsys.ingest.inputs import line_blocks

    lines = [b"x" * n for n in (3, 40, 1, 0, 17, 5)]
    text = b"\n".join(lines)  # no final newline
    path = tmp_path / "f.txt"
    path.write_bytes(gzip.compress(text) if gz else text)
    for size in (4, 8, 64, 1 << 20):
        blocks = list(line_blocks(path, size))
        assert b"".join(blocks) == text
        assert all(b.endswith(b"\n") for b in blocks[:-1])
