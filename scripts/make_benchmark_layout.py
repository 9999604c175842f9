"""Write the demo shop in the layout of published cross-domain benchmarks, for configs/benchmark_layout.yaml.

    python scripts/make_benchmark_layout.py [--out runs/benchmark_layout_data]

One interaction file (`all.csv`: user, item, position, group) holds each user's mixed Kitchen+Food
history in order; one item file (`items.csv`: item, title, category) tells the domains apart by
`category`; users are in train / valid / test groups (80/10/10, seeded). This is the shape the config
reads with `columns.domain` + `select` and `split: users`; point it at a real benchmark converted to
these columns (or name its own columns in `data.domains.<name>.columns`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from trecsys.config import load_config
from trecsys.ingest.synthetic import generate_domains

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmark_layout_data"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(REPO / "configs" / "demo.yaml", [])
    domains = generate_domains(cfg)
    rows = pd.concat([d.interactions.assign(category=name) for name, d in domains.items()], ignore_index=True)
    rows = rows.sort_values(["user_id", "timestamp"], kind="stable")
    rows["position"] = rows.groupby("user_id").cumcount()
    users = rows["user_id"].unique()
    group = np.random.default_rng(cfg.seed).choice(["train", "valid", "test"], size=len(users), p=[0.8, 0.1, 0.1])
    rows["group"] = rows["user_id"].map(dict(zip(users, group, strict=True)))
    rows.rename(columns={"user_id": "user", "item_id": "item"})[["user", "item", "position", "group"]].to_csv(
        out / "all.csv", index=False)
    items = pd.concat([d.items.assign(category=name) for name, d in domains.items()], ignore_index=True)
    items.rename(columns={"item_id": "item"})[["item", "title", "category"]].to_csv(out / "items.csv", index=False)
    print(f"wrote {out}/all.csv ({len(rows):,} rows, {len(users):,} users) and {out}/items.csv ({len(items):,} items)")


if __name__ == "__main__":
    main()
