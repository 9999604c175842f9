"""Plots a person can read: every candidate's learning curve, series told apart by colour and line
style, labelled axes, and the legend beside the plots rather than over the data."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from trecsys.artifacts import write_manifest
from trecsys.model.manifests import FinetuneManifest
from trecsys.rank import report

STRATEGIES = ("full", "adaptor", "zero_shot", "scratch", "id_only")


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions would save, kept open for inspection."""
    kept = []
    monkeypatch.setattr(report, "_save", lambda fig, plt, path: (fig.canvas.draw(), kept.append(fig)))
    return kept


def _write_log(path: Path, steps: int, scale: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "epoch": s / steps, "loss": scale / s, "lr": 1e-3, "sequences_per_s": 100.0,
              "valid": {"ndcg@10": 0.1 * scale * s / steps, "recall@10": 0.2 * s / steps,
                        "Kitchen/ndcg@10": 0.1}} for s in range(1, steps + 1)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _legend_is_outside(fig) -> bool:
    renderer = fig.canvas.get_renderer()
    right = max(ax.get_window_extent(renderer).x1 for ax in fig.axes if ax.get_visible())
    return all(legend.get_window_extent(renderer).x0 >= right for legend in fig.legends) and fig.legends


def test_learning_curves_show_every_candidate_distinctly_with_labels_and_an_outside_legend(tmp_path, figures):
    run = tmp_path / "demo"
    _write_log(run / "pretrain" / "train_log.jsonl", 8, 5.0)
    _write_log(run / "distill" / "train_log.jsonl", 8, 3.0)
    for i, strategy in enumerate(STRATEGIES):
        _write_log(run / "finetune" / "candidates" / strategy / "train_log.jsonl", 6, 1.0 + i)
    _write_log(run / "finetune" / "train_log.jsonl", 6, 9.0)  # the kept copy: not drawn twice
    write_manifest(run / "finetune", "finetune-target", {}, [], FinetuneManifest(
        seed=0, target="Food", strategy="auto", chosen="adaptor", chosen_by="valid ndcg@10", metrics={},
        candidates={}, init_from=None, history="target", train_fraction=1.0, n_train_users=0, n_parameters=0,
        n_trainable=0, timings_s={}).to_json())

    logs = report.training_logs([run])
    assert list(logs) == ["demo/pretrain", "demo/distill", "demo/finetune/adaptor (kept)", "demo/finetune/full",
                          "demo/finetune/id_only", "demo/finetune/scratch", "demo/finetune/zero_shot"]
    assert report.plot_learning_curves(logs, tmp_path / "curves.png")
    fig = figures[0]
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "validation ndcg@10 (seen items excluded)",
                                                 "validation recall@10 (seen items excluded)"]
    for ax in fig.axes:
        assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel()
        styles = [(line.get_color(), line.get_linestyle()) for line in ax.get_lines()]
        assert len(styles) == len(logs) and len(set(styles)) == len(styles)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(logs)
    assert _legend_is_outside(fig)


def test_twenty_series_never_share_colour_and_line_style():
    styles = [report.series_style(n) for n in range(20)]
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 20


def test_metric_and_slice_plots_label_axes_and_keep_the_legend_off_the_data(tmp_path, figures):
    runs = [f"finetune/{s}" for s in STRATEGIES] + ["popularity", "item-knn", "distill/student"]
    rows = [(run, "test", slice_, metric, k, 0.1 + 0.01 * i + 0.001 * k, 0.05, 0.3, 100)
            for i, run in enumerate(runs) for slice_ in ("all", "history:0-3") for metric in ("ndcg", "recall")
            for k in (5, 10, 20)]
    metrics = pd.DataFrame(rows, columns=["run", "split", "slice", "metric", "k", "value", "ci_low", "ci_high",
                                          "n_users"])
    assert report.plot_metric_curves(metrics, tmp_path / "m.png")
    assert report.plot_slices(metrics, tmp_path / "s.png", 10)
    curves, slices = figures
    for ax in curves.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
        styles = [(line.get_color(), line.get_linestyle()) for line in ax.get_lines()]
        assert len(styles) == len(runs) and len(set(styles)) == len(runs)
    bars = slices.axes[0]
    assert bars.get_xlabel() and bars.get_ylabel() == "ndcg@10"
    looks = {(c.patches[0].get_facecolor(), c.patches[0].get_hatch()) for c in bars.containers if hasattr(c, "patches")}
    assert len(looks) == len(runs)
    assert _legend_is_outside(curves) and _legend_is_outside(slices)
