"""The embedded default data: a deterministic multi-domain shop whose users carry tastes across domains.

Every user likes a few *themes* (camping, baking, ...), shops in time-ordered sessions within one
theme, sometimes follows a complementary item (a camping stove, then freeze-dried meals), and stays
with one *brand* per theme in every domain (the coffee brand whose grinder they bought is the one
whose beans they buy). Titles name the theme only sometimes (a theme word in 40% of them; the
product noun says it less directly) and the brand almost always, and a brand sells in every domain:
how much the brand matters, and how to read it from a title, is learnt from the large source
domain's many sequences and carries over through the shared brand names, while the small target
alone teaches it poorly. That is what makes transfer pay: the target is a new shop where most users
(90%) are cold, with 1–3 target purchases, next to a source where they have about ten each.
Popularity is Zipf-like, and some target items are cold (released late, bought only as a user's last
or second-last target interaction, i.e. only in valid/test under leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from trecsys.config import ExperimentConfig
from trecsys.errors import ConfigError
from trecsys.ingest.raw import RawDomain
from trecsys.ingest.synthetic_vocab import DOMAIN_VOCABULARIES, THEMES, DomainVocabulary

# Shape of the shop. These are fixed so the demo is the same everywhere; only sizes are config keys.
TARGET_HISTORY_RATIO = 0.5  # target histories are about half as long as source ones
TARGET_USER_WEIGHT = 0.3  # a single-domain user is in the target this much as often as in a source
COLD_USER_FRACTION = 0.9  # target users with only 1-3 target interactions
COLD_ITEM_FRACTION = 0.06  # target items released late
COLD_ITEM_RELEASE = 0.85  # release time of cold items, as a fraction of the time span
COLD_ITEM_PICK = 0.4  # chance that an eligible (late, held-out) target slot buys a cold item
FOLLOW_COMPLEMENT = 0.2  # chance that the next item in a session is a complement of the previous one
BRAND_LOYALTY = 0.9  # chance that a purchase in a theme is from the user's brand of that theme (if any is left)
EXPLORE = 0.15  # chance that a session's theme is a random one rather than a favourite
ZIPF_EXPONENT = 1.1
# How often a title names its theme through a theme word or a theme brand (the text-borne signal):
# the theme word only sometimes, so the text alone does not say everything.
THEME_WORD_CHANCE = 0.4
THEME_BRAND_CHANCE = 0.9
START_UNIX_S = 1_672_531_200  # 2023-01-01 UTC
SPAN_S = 365 * 86_400
MAX_HISTORY = 60


@dataclass
class _Catalog:
    """One synthetic domain's items and the sampling tables built from them."""

    name: str
    item_ids: list[str]
    theme: np.ndarray  # theme index per item
    popularity: np.ndarray
    cold: np.ndarray  # bool per item
    items: pd.DataFrame
    warm_by_theme: dict[int, np.ndarray]
    cold_by_theme: dict[int, np.ndarray]
    warm_all: np.ndarray
    brand: np.ndarray  # brand name per item


def vocabulary_for(name: str) -> DomainVocabulary:
    """The built-in vocabulary of a synthetic domain: its name must be one of the known ones."""
    if name not in DOMAIN_VOCABULARIES:
        known = ", ".join(DOMAIN_VOCABULARIES)
        raise ConfigError(
            f"data.domains.{name}: format synthetic has no vocabulary for a domain named {name!r}; "
            f"name synthetic domains one of: {known}"
        )
    return DOMAIN_VOCABULARIES[name]


def generate_domains(cfg: ExperimentConfig) -> dict[str, RawDomain]:
    """Generate every domain whose format is `synthetic`, seeded by `cfg.seed`."""
    return _generate(cfg)[0]


def _generate(cfg: ExperimentConfig) -> tuple[dict[str, RawDomain], dict[str, set[str]]]:
    """The domains, and the ids of each domain's cold (late-release) items for the tests."""
    names = [name for name, domain in cfg.data.domains.items() if domain.format == "synthetic"]
    if not names:
        return {}, {}
    _check_sizes(cfg)
    vocabularies = [vocabulary_for(name) for name in names]
    rng = np.random.default_rng(cfg.seed)
    theme_names = list(THEMES)
    catalogs = [
        _make_catalog(name, vocab, theme_names, cfg.data.synthetic.n_items_per_domain,
                      is_target=(name == cfg.data.target and len(names) > 1), rng=rng)
        for name, vocab in zip(names, vocabularies, strict=True)
    ]
    complements = _make_complements(catalogs, rng)
    target = names.index(cfg.data.target) if cfg.data.target in names and len(names) > 1 else None
    rows: list[list[tuple]] = [[] for _ in names]
    n_users = cfg.data.synthetic.n_users
    memberships = _memberships(n_users, len(names), target, cfg.data.synthetic.overlap_fraction, rng)
    for user, domains in enumerate(memberships):
        _simulate_user(f"u{user:05d}", domains, catalogs, complements, target, cfg, rng, rows)
    domains = {
        catalog.name: RawDomain(
            name=catalog.name,
            interactions=pd.DataFrame(
                {
                    "user_id": pd.Series([r[0] for r in domain_rows], dtype=str),
                    "item_id": pd.Series([r[1] for r in domain_rows], dtype=str),
                    "timestamp": np.array([r[2] for r in domain_rows], dtype=np.int64),
                    "rating": np.array([r[3] for r in domain_rows], dtype=np.float64),
                }
            ),
            items=catalog.items,
        )
        for catalog, domain_rows in zip(catalogs, rows, strict=True)
    }
    cold = {c.name: {c.item_ids[i] for i in np.flatnonzero(c.cold)} for c in catalogs}
    return domains, cold


def _check_sizes(cfg: ExperimentConfig) -> None:
    syn = cfg.data.synthetic
    if syn.n_users < 10:
        raise ConfigError(f"data.synthetic.n_users must be at least 10, got {syn.n_users}")
    if syn.n_items_per_domain < 2 * len(THEMES):
        raise ConfigError(
            f"data.synthetic.n_items_per_domain must be at least {2 * len(THEMES)} "
            f"(two items per theme), got {syn.n_items_per_domain}"
        )
    if not 0.0 <= syn.overlap_fraction <= 1.0:
        raise ConfigError(f"data.synthetic.overlap_fraction must be in [0, 1], got {syn.overlap_fraction}")
    if syn.mean_history < 4.0:
        raise ConfigError(f"data.synthetic.mean_history must be at least 4, got {syn.mean_history}")


# ---------------------------------------------------------------------------------------------
# Items


def _make_catalog(name: str, vocab: DomainVocabulary, theme_names: list[str], n_items: int,
                  is_target: bool, rng: np.random.Generator) -> _Catalog:
    sold = [t for t in theme_names if t in vocab.products]
    share = np.array([len(vocab.products[t]) for t in sold], dtype=float)
    item_theme_names = rng.choice(sold, size=n_items, p=share / share.sum())
    titles: set[str] = set()
    records = []
    prefix = name[:3].upper()
    for k, theme_name in enumerate(item_theme_names):
        theme = THEMES[theme_name]
        for _ in range(50):  # redraw the rare duplicate title
            noun, category = vocab.products[theme_name][rng.integers(len(vocab.products[theme_name]))]
            brand = _pick(rng, theme.brands if rng.random() < THEME_BRAND_CHANCE else vocab.brands)
            attribute = _pick(rng, theme.words if rng.random() < THEME_WORD_CHANCE else vocab.attributes)
            if attribute.lower() in noun.lower():
                attribute = ""
            title = " ".join(part for part in (brand, attribute, noun) if part) + f", {_pick(rng, vocab.sizes)}"
            if title not in titles:
                break
        titles.add(title)
        low, high = vocab.price_range
        price = np.floor(np.exp(rng.uniform(np.log(low), np.log(high)))) + 0.99
        records.append((f"{prefix}{k:05d}", title, brand, category, f"{price:.2f}"))
    items = pd.DataFrame(records, columns=["item_id", "title", "brand", "category", "price"], dtype=str)
    theme = np.array([theme_names.index(t) for t in item_theme_names])
    popularity = 1.0 / (rng.permutation(n_items) + 1.0) ** ZIPF_EXPONENT
    cold = np.zeros(n_items, dtype=bool)
    if is_target:
        cold[rng.choice(n_items, size=max(1, round(COLD_ITEM_FRACTION * n_items)), replace=False)] = True
    warm_by_theme = {t: np.flatnonzero((theme == t) & ~cold) for t in np.unique(theme)}
    cold_by_theme = {t: np.flatnonzero((theme == t) & cold) for t in np.unique(theme)}
    return _Catalog(name, items["item_id"].tolist(), theme, popularity, cold, items,
                    {t: v for t, v in warm_by_theme.items() if len(v)},
                    {t: v for t, v in cold_by_theme.items() if len(v)}, np.flatnonzero(~cold),
                    items["brand"].to_numpy())


def _shares(n: int) -> np.ndarray:
    """Zipf-like shares of n ranked options."""
    weights = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    return weights / weights.sum()


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[rng.integers(len(options))]


def _make_complements(catalogs: list[_Catalog], rng: np.random.Generator) -> list[list[list[np.ndarray]]]:
    """complements[d][i][e]: two popular same-theme items of domain e that go with item i of domain d."""
    out = []
    for catalog in catalogs:
        per_item = []
        for i in range(len(catalog.item_ids)):
            per_domain = []
            for other in catalogs:
                pool = other.warm_by_theme.get(int(catalog.theme[i]), np.empty(0, dtype=int))
                pool = pool[pool != i] if other is catalog else pool
                if len(pool) == 0:
                    per_domain.append(pool)
                    continue
                weights = other.popularity[pool] / other.popularity[pool].sum()
                per_domain.append(rng.choice(pool, size=min(2, len(pool)), replace=False, p=weights))
            per_item.append(per_domain)
        out.append(per_item)
    return out


# ---------------------------------------------------------------------------------------------
# Users


def _memberships(n_users: int, n_domains: int, target: int | None, overlap_fraction: float,
                 rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The domains each user shops in: overlap users in all, the rest in one (the target less often)."""
    if n_domains == 1:
        return [(0,)] * n_users
    weights = np.array([TARGET_USER_WEIGHT if d == target else 1.0 for d in range(n_domains)])
    overlapping = rng.random(n_users) < overlap_fraction
    single = rng.choice(n_domains, size=n_users, p=weights / weights.sum())
    return [tuple(range(n_domains)) if both else (int(d),) for both, d in zip(overlapping, single, strict=True)]


def _history_length(rng: np.random.Generator, mean: float, minimum: int) -> int:
    """minimum + a geometric tail, so the mean is `mean` and a few users have long histories."""
    extra = max(mean - minimum, 0.0)
    return int(min(minimum + rng.geometric(1.0 / (extra + 1.0)) - 1, MAX_HISTORY))


def _simulate_user(user_id: str, domains: tuple[int, ...], catalogs: list[_Catalog],
                   complements: list[list[list[np.ndarray]]], target: int | None, cfg: ExperimentConfig,
                   rng: np.random.Generator, rows: list[list[tuple]]) -> None:
    mean = cfg.data.synthetic.mean_history
    counts = {}
    for d in domains:
        if d == target:
            cold_user = rng.random() < COLD_USER_FRACTION
            counts[d] = int(rng.integers(1, 4)) if cold_user else _history_length(
                rng, max(mean * TARGET_HISTORY_RATIO, 4.0), 4)
        else:
            counts[d] = _history_length(rng, mean, 3)
    slots = rng.permutation(np.repeat(list(counts), list(counts.values())))
    times = _timeline(len(slots), rng)

    n_themes = len(THEMES)
    favourites = rng.choice(n_themes, size=rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]), replace=False)
    taste = rng.dirichlet(np.full(len(favourites), 2.0))
    # The user's brand of each theme: brands have market shares like items, the first one leading.
    brand_of = [theme.brands[rng.choice(len(theme.brands), p=_shares(len(theme.brands)))]
                for theme in THEMES.values()]
    # The last two target slots are the user's valid and test interactions under leave-one-out;
    # only those may buy a cold item (for a user with 2 target interactions only the last).
    target_slots = np.flatnonzero(slots == target) if target is not None else np.empty(0, dtype=int)
    held_out = set(target_slots[-2:].tolist()) if len(target_slots) >= 3 else set(target_slots[-1:].tolist())
    if len(target_slots) < 2:
        held_out = set()
    release_s = START_UNIX_S + COLD_ITEM_RELEASE * SPAN_S

    seen: dict[int, set[int]] = {d: set() for d in domains}
    previous: tuple[int, int] | None = None
    theme = 0
    for position, (d, (timestamp, new_session)) in enumerate(zip(slots, times, strict=True)):
        d = int(d)
        if new_session:
            previous = None
            theme = int(rng.integers(n_themes) if rng.random() < EXPLORE else rng.choice(favourites, p=taste))
        catalog = catalogs[d]
        item = None
        if position in held_out and timestamp >= release_s and rng.random() < COLD_ITEM_PICK:
            item = _sample(catalog.cold_by_theme.get(theme), catalog, seen[d], rng)
        if item is None and previous is not None and rng.random() < FOLLOW_COMPLEMENT:
            options = [i for i in complements[previous[0]][previous[1]][d] if i not in seen[d]]
            item = int(options[rng.integers(len(options))]) if options else None
        if item is None and theme in catalog.warm_by_theme and rng.random() < BRAND_LOYALTY:
            pool = catalog.warm_by_theme[theme]
            item = _sample(pool[catalog.brand[pool] == brand_of[theme]], catalog, seen[d], rng)
        if item is None:
            item = _sample(catalog.warm_by_theme.get(theme), catalog, seen[d], rng)
        if item is None:
            item = _sample(catalog.warm_all, catalog, seen[d], rng)
        if item is None:  # the user has bought every item of the domain
            continue
        seen[d].add(item)
        previous = (d, item)
        rating = float(rng.choice([1, 2, 3, 4, 5], p=[0.03, 0.05, 0.12, 0.3, 0.5]))
        rows[d].append((user_id, catalog.item_ids[item], timestamp, rating))


def _sample(pool: np.ndarray | None, catalog: _Catalog, seen: set[int], rng: np.random.Generator) -> int | None:
    """A popularity-weighted draw from `pool` among items the user has not bought yet."""
    if pool is None or len(pool) == 0:
        return None
    if seen:
        pool = pool[~np.isin(pool, list(seen))]
        if len(pool) == 0:
            return None
    weights = catalog.popularity[pool]
    return int(pool[rng.choice(len(pool), p=weights / weights.sum())])


def _timeline(n: int, rng: np.random.Generator) -> list[tuple[int, bool]]:
    """(timestamp, starts a session) for n interactions: sessions of 1-4 items spread over the
    user's active period, which ends near the end of the log so held-out interactions are late."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(1 + rng.poisson(1.0), 4)))
    sizes[-1] -= sum(sizes) - n
    start = rng.uniform(0.0, 0.6) * SPAN_S
    end = rng.uniform(0.92, 1.0) * SPAN_S
    session_starts = np.sort(rng.uniform(start, end, size=len(sizes)))
    session_starts[-1] = end - 3600.0  # the last session is near the end of the user's activity
    out = []
    for session_start, size in zip(session_starts, sizes, strict=True):
        offsets = np.cumsum(rng.uniform(120, 900, size=size)) - 120
        out.extend((START_UNIX_S + int(session_start + o), k == 0) for k, o in enumerate(offsets))
    # Sorting keeps time order even if a late session started before the previous one finished.
    out.sort(key=lambda pair: pair[0])
    return out
