"""Amazon Reviews 2023-shaped files at any size, for `make bench-scale` (generated, not real data).

    python scripts/gen_amazon2023.py --out runs/bench_scale/data_1M --interactions 1000000

Writes, per category, `<Category>.jsonl` (reviews) and `meta_<Category>.jsonl` (metadata) with the
fields, id formats and value types of the 2023 dump (user_id "AE…" of 28 characters, parent_asin
"B0…" of 10, timestamps in ms, ratings 1-5 skewed to 5, metadata lists and nested details), plus
`generated.json` with the parameters and counts. What makes the files behave like the real ones
for prepare's costs:

- item popularity is Zipf-like (p ∝ 1 / (rank + 10)^1.05 within a category), so a few items carry
  much of the traffic and the k-core removes a long tail;
- user activity is heavy-tailed (p ∝ 1 / (rank + 3)^0.85 over one user pool shared by every
  category), so most users have one or two reviews, some hundreds, and users overlap across
  categories as they do in the dump;
- ~0.5% exact duplicate review lines, and ~25% more metadata lines than reviewed items (the dumps
  describe products nobody reviewed; prepare must skip them).

Rows are made in chunks of 1M, so memory stays flat in N. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

CATEGORIES = ("Home_and_Kitchen", "Grocery_and_Gourmet_Food", "Office_Products")
# Share of the reviews each category gets (the first is the largest, as Home & Kitchen is).
SHARES = (0.55, 0.30, 0.15)
REVIEWS_PER_ITEM = 15.0  # Amazon 2023 Home & Kitchen: 67M ratings / 3.7M items ≈ 18
REVIEWS_PER_USER = 4.0  # Amazon 2023 Home & Kitchen: 67M ratings / 23M users ≈ 3
ITEM_ALPHA, ITEM_SHIFT = 1.05, 10.0
USER_ALPHA, USER_SHIFT = 0.85, 3.0
RATING_P = (0.08, 0.05, 0.08, 0.17, 0.62)
DUPLICATE_FRACTION = 0.005
UNREVIEWED_META_FRACTION = 0.25
CHUNK = 1_000_000
T0_MS, T1_MS = 1_262_304_000_000, 1_694_000_000_000  # 2010-01-01 .. 2023-09

_B36 = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
ADJECTIVES = ("Stainless Steel", "Organic", "Premium", "Heavy Duty", "Compact", "Non-Stick", "Gourmet", "Classic",
              "Professional", "Eco-Friendly", "Vintage", "Portable", "Deluxe", "Natural", "Adjustable", "Ergonomic")
NOUNS = {
    "Home_and_Kitchen": ("Skillet", "Knife Set", "Cutting Board", "Blender", "Kettle", "Mixing Bowls", "Spatula",
                         "Dutch Oven", "Coffee Grinder", "Storage Containers", "Towels", "Baking Sheet"),
    "Grocery_and_Gourmet_Food": ("Green Tea", "Dark Chocolate", "Olive Oil", "Coffee Beans", "Pasta", "Hot Sauce",
                                 "Granola", "Honey", "Spice Blend", "Trail Mix", "Maple Syrup", "Rice"),
    "Office_Products": ("Notebook", "Gel Pens", "Stapler", "Desk Organizer", "Sticky Notes", "Binder",
                        "Label Maker", "File Folders", "Highlighters", "Planner", "Paper Clips", "Whiteboard"),
}
MAIN_CATEGORY = {"Home_and_Kitchen": "Amazon Home", "Grocery_and_Gourmet_Food": "Grocery",
                 "Office_Products": "Office Products"}
STORES = ("Hearthline", "NorthPeak", "Casa Verde", "Golden Crumb", "Roastworks", "Paperwise", "Kitchenary",
          "Leaf & Kettle", "Brightdesk", "Urban Pantry", "Solstice", "Maple & Co.")
WORDS = ("great", "works", "quality", "love", "price", "easy", "use", "would", "buy", "again", "perfect", "size",
         "taste", "fresh", "sturdy", "recommend", "product", "well", "made", "gift", "daily", "good", "value")


def base36(values: np.ndarray, width: int) -> np.ndarray:
    """Fixed-width base-36 strings of non-negative int64s (vectorised)."""
    digits = np.empty((len(values), width), dtype=np.uint8)
    rest = values.astype(np.int64).copy()
    for col in range(width - 1, -1, -1):
        digits[:, col] = _B36[rest % 36]
        rest //= 36
    return digits.view(f"S{width}").ravel().astype(str)


def spread(index: np.ndarray, capacity: int, width: int, salt: int) -> np.ndarray:
    """Distinct values in [0, 36**width) that look random: index i lands somewhere in its own slice
    of the space (capacity slices), so no two indices share a value."""
    slot = 36**width // capacity
    index = index.astype(np.int64)
    return index * slot + (index * 2_654_435_761 + salt) % slot


def user_ids(index: np.ndarray, n_users: int) -> np.ndarray:
    """'A' + 27 base-36 characters; the first 10 are distinct per index in [0, n_users)."""
    head = base36(spread(index, n_users, 10, 12_345), 10)
    tail = base36(spread(index % 10**6, 10**6, 12, 999), 12)
    rest = base36(spread(index % 10**4, 10**4, 5, 7), 5)
    return np.char.add(np.char.add(np.char.add("A", head), tail), rest)


def item_ids(index: np.ndarray, category: int, capacity: int, salt: int = 31_337) -> np.ndarray:
    """'B0' + 8 base-36 characters, distinct per (index < capacity, category) pair."""
    return np.char.add("B0", base36(spread(index * len(CATEGORIES) + category, capacity * len(CATEGORIES), 8, salt), 8))


def power_law_sampler(n: int, alpha: float, shift: float):
    weights = 1.0 / (np.arange(n, dtype=np.float64) + shift) ** alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]

    def sample(rng: np.random.Generator, size: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(size)), n - 1)

    return sample


def review_lines(rng: np.random.Generator, users: np.ndarray, items: np.ndarray, asins: np.ndarray) -> list[str]:
    n = len(users)
    ratings = rng.choice(5, size=n, p=RATING_P) + 1
    times = rng.integers(T0_MS, T1_MS, size=n)
    votes = rng.geometric(0.6, size=n) - 1
    verified = rng.random(n) < 0.9
    words = rng.integers(0, len(WORDS), size=(n, 8))
    out = []
    for i in range(n):
        w = words[i]
        title = f"{WORDS[w[0]].capitalize()} {WORDS[w[1]]}"
        text = f"{WORDS[w[2]].capitalize()} {WORDS[w[3]]} {WORDS[w[4]]}, {WORDS[w[5]]} {WORDS[w[6]]} {WORDS[w[7]]}."
        out.append(
            f'{{"rating": {ratings[i]}.0, "title": "{title}", "text": "{text}", "images": [], '
            f'"asin": "{asins[i]}", "parent_asin": "{items[i]}", "user_id": "{users[i]}", '
            f'"timestamp": {times[i]}, "helpful_vote": {votes[i]}, '
            f'"verified_purchase": {"true" if verified[i] else "false"}}}\n'
        )
    return out


def meta_line(rng: np.random.Generator, category: str, parent_asin: str) -> str:
    noun = NOUNS[category][rng.integers(len(NOUNS[category]))]
    adjective = ADJECTIVES[rng.integers(len(ADJECTIVES))]
    store = STORES[rng.integers(len(STORES))]
    size = int(rng.integers(1, 48))
    record = {
        "main_category": MAIN_CATEGORY[category],
        "title": f"{store} {adjective} {noun}, {size} Count",
        "average_rating": round(float(rng.uniform(2.5, 5.0)), 1),
        "rating_number": int(rng.geometric(0.01)),
        "features": [f"{adjective} design for everyday use", f"Includes {size} pieces"],
        "description": [f"The {adjective.lower()} {noun.lower()} from {store}."] if rng.random() < 0.7 else [],
        "price": round(float(rng.lognormal(3.0, 0.6)), 2) if rng.random() < 0.8 else None,
        "images": [{"thumb": f"https://example.invalid/{parent_asin}.jpg", "variant": "MAIN"}],
        "videos": [],
        "store": store,
        "categories": [category.replace("_and_", " & ").replace("_", " "), noun],
        "details": {"Brand": store, "Item Weight": f"{size * 0.1:.1f} ounces"},
        "parent_asin": parent_asin,
        "bought_together": None,
    }
    return json.dumps(record) + "\n"


def generate(out: Path, n_interactions: int, categories: tuple[str, ...], seed: int, compress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    shares = np.asarray(SHARES[:len(categories)] if len(categories) <= len(SHARES)
                        else [1.0] * len(categories), dtype=np.float64)
    shares /= shares.sum()
    per_category = np.floor(shares * n_interactions).astype(np.int64)
    per_category[0] += n_interactions - per_category.sum()
    n_users = max(10, int(n_interactions / REVIEWS_PER_USER))
    pick_user = power_law_sampler(n_users, USER_ALPHA, USER_SHIFT)
    # Popular users are not user 0, 1, 2 in every id: shuffle which index gets which activity rank.
    user_of_rank = np.random.default_rng([seed, 1]).permutation(n_users)
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1)) if compress \
        else (lambda p: open(p, "w", encoding="utf-8"))
    suffix = ".jsonl.gz" if compress else ".jsonl"
    info = {"interactions": int(n_interactions), "seed": seed, "users_in_pool": n_users, "categories": {}}
    for c, (category, n_rows) in enumerate(zip(categories, per_category, strict=True)):
        rng = np.random.default_rng([seed, 100 + c])
        n_items = max(10, int(n_rows / REVIEWS_PER_ITEM))
        pick_item = power_law_sampler(n_items, ITEM_ALPHA, ITEM_SHIFT)
        item_of_rank = rng.permutation(n_items)
        extra = int(n_items * UNREVIEWED_META_FRACTION)
        capacity = n_items + extra
        reviewed = np.zeros(n_items, dtype=bool)
        written = 0
        with opener(out / f"{category}{suffix}") as handle:
            while written < n_rows:
                size = int(min(CHUNK, n_rows - written))
                users = user_of_rank[pick_user(rng, size)]
                items = item_of_rank[pick_item(rng, size)]
                reviewed[items] = True
                parents = item_ids(items, c, capacity)
                # A review's asin is the parent or one of its variants.
                variant = rng.random(size) < 0.3
                asins = np.where(variant, item_ids(items, c, capacity, salt=4_242), parents)
                lines = review_lines(rng, user_ids(users, n_users), parents, asins)
                n_dup = int(size * DUPLICATE_FRACTION)
                if n_dup:
                    for i in rng.integers(0, size, size=n_dup):
                        lines.insert(int(i), lines[int(i)])
                handle.writelines(lines)
                written += size
        # Metadata: every reviewed item plus products nobody reviewed, in a shuffled order.
        described = np.concatenate([np.flatnonzero(reviewed), np.arange(n_items, n_items + extra)])
        described = described[rng.permutation(len(described))]
        with opener(out / f"meta_{category}{suffix}") as handle:
            for start in range(0, len(described), CHUNK):
                ids = item_ids(described[start:start + CHUNK], c, capacity)
                handle.writelines(meta_line(rng, category, str(a)) for a in ids)
        info["categories"][category] = {
            "reviews_file": f"{category}{suffix}", "meta_file": f"meta_{category}{suffix}",
            "reviews": int(n_rows), "duplicate_lines": int(n_rows // CHUNK * int(CHUNK * DUPLICATE_FRACTION)
                                                           + int((n_rows % CHUNK) * DUPLICATE_FRACTION)),
            "catalogue": n_items, "reviewed_items": int(reviewed.sum()), "meta_lines": len(described),
        }
    (out / "generated.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the files (created)")
    parser.add_argument("--interactions", type=float, default=1e6, help="review lines in all (1e6, 1e7, ...)")
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help=f"comma-separated; known word lists: {', '.join(CATEGORIES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gzip", action="store_true", help="write .jsonl.gz as the dump ships (slower)")
    args = parser.parse_args()
    categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    unknown = [c for c in categories if c not in NOUNS]
    if unknown:
        print(f"unknown categories {unknown}; known: {', '.join(NOUNS)}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    info = generate(Path(args.out), int(args.interactions), categories, args.seed, args.gzip)
    print(f"generated {info['interactions']:,} reviews in {len(categories)} categories under {args.out} "
          f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
