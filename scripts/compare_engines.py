"""DuckDB vs Polars on prepare's interaction work, on generated Amazon-2023-shaped reviews.

    pip install duckdb polars      # duckdb is only needed here, not by trecsys
    python scripts/gen_amazon2023.py --out runs/bench_scale/data_1M --interactions 1e6
    python scripts/compare_engines.py runs/bench_scale/data_1M

The same steps in each engine, each engine in its own child process (wall, CPU, peak RSS from the
kernel's accounting of that child): read the reviews JSONL of every category (user, item, time,
rating), keep each row's input position, drop exact (user, item, time) duplicates, iterative 5-core
per category, leave-one-out labels per user by (time, input position), dense item ids per category
and user ids over all, and the rows in (user, time) order to a Parquet file. This is how the engine
of `data.engine` was chosen; the numbers print as `engine: wall_s cpu_s peak_rss_mib rows`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

K = 5


def run_duckdb(files: list[Path], out: Path) -> int:
    import duckdb

    con = duckdb.connect()
    con.execute("SET preserve_insertion_order = true")
    parts = []
    for d, path in enumerate(files):
        con.execute(f"""CREATE TABLE raw{d} AS SELECT user_id, parent_asin AS item_id,
            CAST(floor("timestamp" / 1000) AS BIGINT) AS ts, rating
            FROM read_json('{path}', format='newline_delimited',
                 columns={{'user_id': 'VARCHAR', 'parent_asin': 'VARCHAR', 'timestamp': 'DOUBLE', 'rating': 'DOUBLE'}})""")
        con.execute(f"""CREATE TABLE t{d} AS SELECT *, rowid AS pos FROM raw{d}
            QUALIFY row_number() OVER (PARTITION BY user_id, item_id, ts ORDER BY rowid) = 1""")
        while True:
            before = con.execute(f"SELECT count(*) FROM t{d}").fetchone()[0]
            con.execute(f"""CREATE OR REPLACE TABLE t{d} AS SELECT * FROM t{d}
                QUALIFY count(*) OVER (PARTITION BY user_id) >= {K} AND count(*) OVER (PARTITION BY item_id) >= {K}""")
            if con.execute(f"SELECT count(*) FROM t{d}").fetchone()[0] == before:
                break
        parts.append(f"SELECT *, {d} AS dom FROM t{d}")
    con.execute(f"CREATE TABLE a AS {' UNION ALL '.join(parts)}")
    con.execute("""CREATE TABLE items AS SELECT dom, item_id,
        (row_number() OVER (ORDER BY dom, item_id) - 1)::INTEGER AS item_idx FROM (SELECT DISTINCT dom, item_id FROM a)""")
    con.execute("""CREATE TABLE users AS SELECT user_id, (row_number() OVER (ORDER BY user_id) - 1)::INTEGER AS user_idx
        FROM (SELECT DISTINCT user_id FROM a)""")
    con.execute(f"""COPY (SELECT u.user_idx, a.user_id, i.item_idx, a.dom, a.ts, a.rating,
        CASE WHEN row_number() OVER w = count(*) OVER (PARTITION BY a.dom, a.user_id) AND count(*) OVER (PARTITION BY a.dom, a.user_id) >= 2 THEN 'test'
             WHEN row_number() OVER w = count(*) OVER (PARTITION BY a.dom, a.user_id) - 1 AND count(*) OVER (PARTITION BY a.dom, a.user_id) >= 3 THEN 'valid'
             ELSE 'train' END AS split
        FROM a JOIN users u USING (user_id) JOIN items i USING (dom, item_id)
        WINDOW w AS (PARTITION BY a.dom, a.user_id ORDER BY a.ts, a.pos)
        ORDER BY u.user_idx, a.ts, a.dom, a.pos) TO '{out}' (FORMAT parquet)""")
    return con.execute(f"SELECT count(*) FROM '{out}'").fetchone()[0]


def run_polars(files: list[Path], out: Path) -> int:
    import polars as pl

    frames = []
    for d, path in enumerate(files):
        frame = (pl.scan_ndjson(path, schema={"user_id": pl.String, "parent_asin": pl.String,
                                              "timestamp": pl.Float64, "rating": pl.Float64})
                 .select(pl.col("user_id"), pl.col("parent_asin").alias("item_id"),
                         (pl.col("timestamp") / 1000).floor().cast(pl.Int64).alias("ts"), pl.col("rating"))
                 .with_row_index("pos")
                 .unique(subset=["user_id", "item_id", "ts"], keep="first", maintain_order=True)
                 .collect())
        while True:
            kept = frame.filter((pl.len().over("user_id") >= K) & (pl.len().over("item_id") >= K))
            if kept.height == frame.height:
                break
            frame = kept
        frames.append(frame.with_columns(pl.lit(d, dtype=pl.Int32).alias("dom")))
    a = pl.concat(frames)
    items = (a.select("dom", "item_id").unique().sort("dom", "item_id")
             .with_row_index("item_idx").with_columns(pl.col("item_idx").cast(pl.Int32)))
    users = (a.select("user_id").unique().sort("user_id")
             .with_row_index("user_idx").with_columns(pl.col("user_idx").cast(pl.Int32)))
    a = (a.join(users, on="user_id").join(items, on=["dom", "item_id"])
         .sort("dom", "user_id", "ts", "pos")
         .with_columns(pl.int_range(pl.len()).over("dom", "user_id").alias("k"),
                       pl.len().over("dom", "user_id").alias("n")))
    split = (pl.when((pl.col("k") == pl.col("n") - 1) & (pl.col("n") >= 2)).then(pl.lit("test"))
             .when((pl.col("k") == pl.col("n") - 2) & (pl.col("n") >= 3)).then(pl.lit("valid"))
             .otherwise(pl.lit("train")))
    a = a.with_columns(split.alias("split")).sort("user_idx", "ts", "dom", "pos")
    a.select("user_idx", "user_id", "item_idx", "dom", "ts", "rating", "split").write_parquet(out)
    return a.height


def child(engine: str, files: list[Path]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = (run_duckdb if engine == "duckdb" else run_polars)(files, Path(tmp) / "out.parquet")
    print(json.dumps({"rows": rows}))


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--child":
        child(sys.argv[2], [Path(p) for p in sys.argv[3:]])
        return 0
    data = Path(sys.argv[1])
    info = json.loads((data / "generated.json").read_text())
    files = [str(data / c["reviews_file"]) for c in info["categories"].values()]
    print(f"reviews: {info['interactions']:,} in {len(files)} files; load average {os.getloadavg()[0]:.2f}; "
          f"{os.cpu_count()} CPUs; threads: each engine's default")
    for engine in ("duckdb", "polars"):
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", engine, *files], stdout=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        rows = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])["rows"] if status == 0 else -1
        print(f"{engine}: wall_s {time.perf_counter() - started:.1f} cpu_s {usage.ru_utime + usage.ru_stime:.1f} "
              f"peak_rss_mib {usage.ru_maxrss / 1024:.0f} rows {rows:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
