"""What a person reads after `trec evaluate`: report.md tables, PNG plots and the terminal summary.

Plots: metric@K curves per run, slice bars, learning curves from the stages' train_log.jsonl, and the
few-shot curve when a few-shot study table (`<run_dir>/fewshot/results.parquet` with columns
train_fraction, strategy, metric, k, value) exists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from trecsys.artifacts import write_text
from trecsys.errors import ArtifactError
from trecsys.model.manifests import FinetuneManifest
from trecsys.stage_table import FINETUNE, TRAINING

CURVE_METRICS = ("recall", "ndcg", "mrr", "hit")
TABLE_METRICS = ("recall", "ndcg", "mrr", "hit", "precision", "coverage", "diversity", "popularity")
LOG_STAGES = tuple(s.folder for s in TRAINING)
FEWSHOT_TABLE = Path("fewshot") / "results.parquet"
# The x axis of a training log, in order of preference.
LOG_X_KEYS = ("step", "epoch", "iteration")
SKIPPED_LOG_KEYS = ("lr", "time", "seconds", "best_step")
# Learning-curve panels at most: the loss and the first few overall validation metrics.
MAX_CURVE_PANELS = 4


def protocol(exclude_seen: bool) -> str:
    """The evaluation rule in words, for every table and plot title: whether the items a user has
    already interacted with were removed from the ranking (trecsys's default) or ranked like any
    other (RecBole's sequential rule). The two give very different numbers."""
    return "seen items excluded" if exclude_seen else "seen items ranked (not excluded)"


def headline_k(ks: Sequence[int]) -> int:
    """The K the summaries show: 10 when evaluated, else the nearest."""
    return min(ks, key=lambda k: (abs(k - 10), k))


def _fmt(value: float, low: float, high: float) -> str:
    if math.isnan(value):
        return "–"
    if math.isnan(low):
        return f"{value:.4f}"
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"


def _fmt_short(value: float, digits: int = 4) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pivot(metrics: pd.DataFrame, slice_name: str, k: int) -> dict[tuple[str, str], pd.Series]:
    rows = metrics[(metrics["slice"] == slice_name) & (metrics["k"] == k)]
    return {(r.run, r.metric): r for r in rows.itertuples(index=False)}


# ---------------------------------------------------------------------------------------------
# What was evaluated: eval/manifest.json's `context`


@dataclass
class EvalContext:
    """`trec evaluate`'s context (eval/manifest.json `context`): what the tables describe. The terminal
    table, report.md and `trec run`'s closing summary read it."""

    run_dir: str
    target: str
    split: str
    n_users: int
    n_items: int
    ks: list[int]
    exclude_seen: bool
    bootstrap: int
    seed: int
    cold_item_interactions: int
    history_buckets: list[int]
    models: dict[str, str]  # run label -> checkpoint folder
    seconds: dict[str, float]  # run label -> seconds to rank and score it

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> EvalContext:
        return cls(**data)


@dataclass
class SearchContext:
    """The search task's context (evaluate.task: search, eval_search/manifest.json `context`): the
    fields of EvalContext the terminal table reads, and what the search protocol adds. Fields in
    the order the file has always had."""

    task: str  # "search"
    run_dir: str
    target: str
    split: str
    n_users: int
    n_queries: int
    n_distinct_queries: int
    n_without_category: int
    n_items: int
    ks: list[int]
    exclude_seen: bool
    bootstrap: int
    seed: int
    cold_item_interactions: int
    history_buckets: list[int]
    models: dict[str, str]
    mixes: dict[str, str]  # run label -> the lexical/personal mix chosen on validation
    valid_ndcg: dict[str, float]
    n_valid_queries: int
    fields: list[str]
    max_candidates: int
    seconds: float
    choose_seconds: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SearchContext:
        return cls(**data)


def read_context(manifest: dict, path: Path) -> EvalContext | SearchContext:
    """The `context` of the evaluate manifest at `path` (either task); a malformed one is refused
    naming the file."""
    data = manifest.get("context")
    kind = SearchContext if isinstance(data, dict) and data.get("task") == "search" else EvalContext
    try:
        return kind.from_json(data)
    except TypeError as exc:
        raise ArtifactError(f"{path}: malformed evaluate context ({exc}): re-run `trec evaluate` to rewrite it") from None


# ---------------------------------------------------------------------------------------------
# Terminal and Markdown


def terminal_table(metrics: pd.DataFrame, context: EvalContext | SearchContext) -> str:
    k = headline_k(context.ks)
    cells = _pivot(metrics, "all", k)
    runs = list(dict.fromkeys(metrics["run"]))
    columns = [m for m in ("recall", "ndcg", "mrr", "hit", "coverage") if (runs[0], m) in cells]
    ci = f"95% CI from {context.bootstrap} bootstrap resamples" if context.bootstrap else "no CIs"
    lines = [f"evaluate: target {context.target!r}, split {context.split}, {context.n_users} users, "
             f"{context.n_items} items, {protocol(context.exclude_seen)}, K={k} ({ci})"]
    width = max(len(r) for r in runs) + 2
    lines.append("run".ljust(width) + "".join(f"{m}@{k}".ljust(26) for m in columns))
    for run in runs:
        parts = [_fmt(cells[(run, m)].value, cells[(run, m)].ci_low, cells[(run, m)].ci_high).ljust(26)
                 for m in columns]
        lines.append(run.ljust(width) + "".join(parts))
    return "\n".join(lines)


def write_report(path: Path, metrics: pd.DataFrame, comparison: pd.DataFrame, context: EvalContext,
                 plots: list[str]) -> None:
    ks, k = context.ks, headline_k(context.ks)
    runs = list(dict.fromkeys(metrics["run"]))
    out = [
        f"# Evaluation: {context.run_dir}",
        "",
        f"Target domain **{context.target}**, split **{context.split}**: {context.n_users} users with "
        f"held-out items, full ranking of {context.n_items} items, "
        f"**{protocol(context.exclude_seen)}** (evaluate.exclude_seen: {str(context.exclude_seen).lower()}). "
        f"Intervals: 95% bootstrap over users ({context.bootstrap} resamples, seed {context.seed}).",
        "",
    ]
    if context.models:
        out += ["Models: " + "; ".join(f"`{label}` from `{folder}`" for label, folder in context.models.items()), ""]
    out += ["Baselines: `popularity` (training counts) and `item-knn` (cosine of item co-occurrence in "
            "training sequences).", ""]
    for kk in ks:
        cells = _pivot(metrics, "all", kk)
        header = ["run"] + [f"{m}@{kk}" for m in TABLE_METRICS if (runs[0], m) in cells]
        rows = [[run] + [_fmt(cells[(run, m)].value, cells[(run, m)].ci_low, cells[(run, m)].ci_high)
                         for m in TABLE_METRICS if (runs[0], m) in cells] for run in runs]
        out += [f"## All users, K={kk}", "", _markdown_table(header, rows), ""]
    if not comparison.empty:
        rows = comparison[(comparison["slice"] == "all") & (comparison["k"] == k)]
        table = [[r.run, f"{r.metric}@{r.k}", _fmt(r.delta, r.ci_low, r.ci_high), _fmt_short(r.p_value, 3)]
                 for r in rows.itertuples(index=False)]
        out += [f"## Paired comparison against `{runs[0]}` (all users, K={k})", "",
                "Difference of means with its 95% paired-bootstrap CI and two-sided p-value.", "",
                _markdown_table(["run", "metric", "delta [95% CI]", "p"], table), ""]
    out += [f"## Slices (NDCG@{k} and Recall@{k})", "",
            f"`train items:a-b` slices group users by their number of training interactions in the target, "
            f"from a to b (the smallest and largest count among the slice's users); "
            f"`source:shared` users also have interactions in a source domain; target slices keep only the "
            f"held-out items that had no (`unseen`) or fewer than {context.cold_item_interactions} (`cold`) "
            "training interactions.", ""]
    sliced = metrics[(metrics["k"] == k) & metrics["metric"].isin(["ndcg", "recall"])]
    header = ["slice", "users"] + [f"{run} {m}" for run in runs for m in ("ndcg", "recall")]
    table = []
    for slice_name, group in sliced.groupby("slice", sort=False):
        cells = {(r.run, r.metric): r for r in group.itertuples(index=False)}
        table.append([slice_name, str(group["n_users"].iloc[0])]
                     + [_fmt_short(cells[(run, m)].value) for run in runs for m in ("ndcg", "recall")])
    out += [_markdown_table(header, table), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    out += ["Tie rule: equal scores rank by the lower item index, so every number is reproducible. "
            f"Seconds per run: {', '.join(f'{r} {s}' for r, s in context.seconds.items())}.", ""]
    write_text(path, "\n".join(out))


# ---------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, the same on every machine
    import matplotlib.pyplot as plt

    return plt


# Series n gets colour n % 10 and line style n % 4 (and marker n % 5): the first 20 series differ in
# their (colour, style) pair, so two candidates never look alike, in colour or in greyscale.
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf")  # matplotlib's tab10
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v")
_HATCHES = ("", "//", "..", "xx")


def series_style(n: int) -> dict:
    return {"color": _COLOURS[n % len(_COLOURS)], "linestyle": _LINE_STYLES[n % len(_LINE_STYLES)],
            "marker": _MARKERS[n % len(_MARKERS)]}


def _legend_outside(fig, ax) -> None:
    """One legend right of the plots, so it never covers a curve; saved with bbox_inches='tight'."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plots(folder: Path, metrics: pd.DataFrame, run_dirs: Sequence[Path], ks: Sequence[int],
                exclude_seen: bool = True) -> list[str]:
    """Write the PNGs that have data; returns their file names. Metric plots name the rule in their title."""
    names = []
    rule = protocol(exclude_seen)
    if plot_metric_curves(metrics, folder / "metrics_at_k.png", rule):
        names.append("metrics_at_k.png")
    if plot_slices(metrics, folder / "slices.png", headline_k(ks), rule=rule):
        names.append("slices.png")
    if plot_learning_curves(training_logs(run_dirs), folder / "learning_curves.png"):
        names.append("learning_curves.png")
    tables = [d / FEWSHOT_TABLE for d in dict.fromkeys(run_dirs) if (d / FEWSHOT_TABLE).is_file()]
    if tables and plot_fewshot(pd.read_parquet(tables[0]), folder / "fewshot.png"):
        names.append("fewshot.png")
    return names


def training_logs(run_dirs: Sequence[Path]) -> dict[str, Path]:
    """Every training log of the runs, labelled `<run>/<stage>`; fine-tuning contributes each candidate
    (`<run>/finetune/<strategy>`, the kept one marked), not only the kept copy."""
    logs = {}
    for run_dir in dict.fromkeys(run_dirs):
        for stage in LOG_STAGES:
            folder = run_dir / stage
            candidates = sorted((folder / "candidates").glob("*/train_log.jsonl")) if stage == FINETUNE.folder else []
            if candidates:
                try:
                    kept = FinetuneManifest.read(folder).chosen
                except ArtifactError:  # no readable record: the curves are shown, none marked kept
                    kept = None
                for log in candidates:
                    strategy = log.parent.name
                    logs[f"{run_dir.name}/{stage}/{strategy}{' (kept)' if strategy == kept else ''}"] = log
            elif (folder / "train_log.jsonl").is_file():
                logs[f"{run_dir.name}/{stage}"] = folder / "train_log.jsonl"
    return logs


def plot_metric_curves(metrics: pd.DataFrame, path: Path, rule: str = "") -> bool:
    rows = metrics[(metrics["slice"] == "all") & metrics["metric"].isin(CURVE_METRICS)]
    if rows.empty:
        return False
    plt = _pyplot()
    shown = [m for m in CURVE_METRICS if m in set(rows["metric"])]
    runs = list(dict.fromkeys(rows["run"]))
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], shown, strict=True):
        for n, run in enumerate(runs):
            group = rows[(rows["metric"] == metric) & (rows["run"] == run)].sort_values("k")
            style = series_style(n)
            ax.plot(group["k"], group["value"], label=run, markersize=4, **style)
            ax.fill_between(group["k"], group["ci_low"], group["ci_high"], alpha=0.12, color=style["color"])
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(rows["k"])), labels=[str(k) for k in sorted(set(rows["k"]))])
        ax.xaxis.set_minor_locator(plt.NullLocator())  # no "3×10¹" labels between the Ks
        ax.set_xlabel("K (list length)")
        ax.set_ylabel(f"{metric}@K")
        ax.set_title(f"{metric}@K (95% CI shaded" + (f"; {rule})" if rule else ")"), fontsize=9)
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes[0][0])
    _save(fig, plt, path)
    return True


def plot_slices(metrics: pd.DataFrame, path: Path, k: int, metric: str = "ndcg", rule: str = "") -> bool:
    rows = metrics[(metrics["metric"] == metric) & (metrics["k"] == k)]
    if rows.empty:
        return False
    plt = _pyplot()
    slices = list(dict.fromkeys(rows["slice"]))
    runs = list(dict.fromkeys(rows["run"]))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(slices)), 3.8))
    for i, run in enumerate(runs):
        cells = rows[rows["run"] == run].set_index("slice").reindex(slices)
        x = [s + (i - (len(runs) - 1) / 2) * width for s in range(len(slices))]
        err_low = (cells["value"] - cells["ci_low"]).clip(lower=0).fillna(0)
        err_high = (cells["ci_high"] - cells["value"]).clip(lower=0).fillna(0)
        ax.bar(x, cells["value"], width, label=run, yerr=[err_low, err_high], capsize=2,
               color=_COLOURS[i % len(_COLOURS)], hatch=_HATCHES[i % len(_HATCHES)], edgecolor="white")
    n_users = rows.drop_duplicates("slice").set_index("slice")["n_users"]
    ax.set_xticks(range(len(slices)), labels=[f"{s}\n(n={n_users[s]})" for s in slices], rotation=30,
                  ha="right", fontsize=8)
    ax.set_xlabel("slice of the users (n = users in it)")
    ax.set_ylabel(f"{metric}@{k}")
    ax.set_title(f"{metric}@{k} by slice (95% CI" + (f"; {rule})" if rule else ")"), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(fig, ax)
    _save(fig, plt, path)
    return True


def read_train_log(path: Path) -> list[dict]:
    """The JSON lines of a training log; a torn last line (a killed run) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _x_key(records: list[dict]) -> str | None:
    return next((k for k in LOG_X_KEYS if any(k in r for r in records)), None)


def _curves(records: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """Every numeric field against the log's x axis (step, epoch, ... or the line number)."""
    x_key = _x_key(records)
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for i, record in enumerate(records):
        x = record.get(x_key, i) if x_key else i
        for key, value in _flatten(record).items():
            if key in LOG_X_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if key.endswith("_s") or key in SKIPPED_LOG_KEYS or not math.isfinite(value):
                continue  # timings, schedules and bookkeeping are not learning curves
            xs, ys = curves.setdefault(key, ([], []))
            xs.append(x)
            ys.append(value)
    return curves


def _flatten(record: dict, prefix: str = "") -> dict:
    """{"valid": {"ndcg@10": x}} -> {"valid/ndcg@10": x}: the engine logs validation metrics nested."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def plot_learning_curves(logs: dict[str, Path], path: Path) -> bool:
    """One panel per logged quantity (training loss first, then each overall validation metric; the
    per-domain ones are left out), one line per stage or fine-tuning candidate in the same colour and
    style on every panel, and one legend beside them."""
    records = {label: read_train_log(p) for label, p in logs.items()}
    series = {label: _curves(r) for label, r in records.items()}
    series = {label: c for label, c in series.items() if c}
    if not series:
        return False
    x_label = next((_x_key(records[label]) for label in series if _x_key(records[label])), None) or "log line"
    keys = list(dict.fromkeys(k for curves in series.values() for k in curves if k.count("/") < 2))
    keys = sorted(keys, key=lambda k: ("loss" not in k, keys.index(k)))[:MAX_CURVE_PANELS]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.8 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for n, (label, curves) in enumerate(series.items()):
            if key in curves:
                xs, ys = curves[key]
                ax.plot(xs, ys, label=label, markersize=3, markevery=max(1, len(xs) // 12), **series_style(n))
        ax.set_xlabel("optimizer step" if x_label == "step" else x_label)
        name = "training loss" if key == "loss" else key.replace("valid/", "validation ")
        ax.set_ylabel(name)
        # Validation during training always excludes the user's seen items (evaluate's default rule).
        ax.set_title(name if key == "loss" else f"{name} (seen items excluded)", fontsize=9)
        ax.grid(alpha=0.3)
    # Every label appears in the legend even when its log lacks the first panel's quantity.
    handles = [plt.Line2D([], [], label=label, **series_style(n)) for n, label in enumerate(series)]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    _save(fig, plt, path)
    return True


def plot_fewshot(table: pd.DataFrame, path: Path, metric: str = "ndcg", k: int = 10) -> bool:
    needed = {"train_fraction", "strategy", "metric", "k", "value"}
    if not needed <= set(table.columns):
        return False
    rows = table[(table["metric"] == metric) & (table["k"] == k)]
    if rows.empty:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for n, (strategy, group) in enumerate(rows.groupby("strategy", sort=False)):
        group = group.sort_values("train_fraction")
        ax.plot(group["train_fraction"], group["value"], label=str(strategy), **series_style(n))
    ax.set_xlabel("fraction of target training data")
    ax.set_ylabel(f"{metric}@{k}")
    rule = f" ({protocol(bool(rows['exclude_seen'].iloc[0]))})" if "exclude_seen" in rows.columns else ""
    ax.set_title(f"few-shot: transfer vs target data{rule}", fontsize=9)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    _save(fig, plt, path)
    return True
