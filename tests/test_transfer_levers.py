"""The transfer levers of UniSRec (Hou et al., KDD 2022): the contrastive pretraining objectives
(`pretrain.seq_item_weight`, `pretrain.seq_seq_weight`) and the adaptor re-fit at fine-tuning
(`finetune.adaptor_init`), on tiny data (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, write_tiny_prepared
from test_transfer import N_ITEMS, TEXT, TEXT_DIM, base_config, pretrained
from typer.testing import CliRunner

from trecsys.cli import app
from trecsys.config import PretrainConfig, build
from trecsys.errors import ConfigError
from trecsys.model.seqrec import PAD, SeqRecModel
from trecsys.model.strategies import build_candidate
from trecsys.train.contrastive import contrastive_loss, drop_items
from trecsys.train.losses import info_nce
from trecsys.train.windows import window_tensors

runner = CliRunner()


# --- the contrastive objectives ---------------------------------------------------------------


def test_info_nce_is_cross_entropy_over_in_batch_cosines_and_skips_marked_pairs():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.1
    assert torch.allclose(info_nce(q, k, 0.1), F.cross_entropy(logits, torch.arange(5)))
    same = torch.zeros(5, 5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # rows 0 and 1 share a next item: not each other's negative
    expected = torch.stack([torch.logsumexp(logits[i, [j for j in range(5) if not same[i, j]]], 0) - logits[i, i]
                            for i in range(5)]).mean()
    assert torch.allclose(info_nce(q, k, 0.1, same), expected)
    # Scale-free (cosine): only directions matter.
    assert torch.allclose(info_nce(3 * q, 0.5 * k, 0.1), info_nce(q, k, 0.1))


def test_drop_items_pads_history_items_only_and_never_the_last():
    torch.manual_seed(0)
    inputs = torch.tensor([[PAD, PAD, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10]])
    out = drop_items(inputs, 0.9)
    assert (out[:, -1] == inputs[:, -1]).all()
    assert ((out == inputs) | (out == PAD)).all() and (out[0, :2] == PAD).all()
    assert (out == PAD).sum() > (inputs == PAD).sum()
    assert torch.equal(drop_items(inputs, 0.0), inputs)


def windows(seed: int = 0, n: int = 8):
    return window_tensors(np.random.default_rng(seed).integers(0, N_ITEMS, size=(n, 7)))


@pytest.mark.parametrize("which", ["seq_item", "seq_seq"])
def test_each_contrastive_term_is_finite_and_trains_both_towers(which):
    model = pretrained()
    model.train()
    inputs, labels = windows()
    cfg = PretrainConfig(**{f"{which}_weight": 1.0}, contrastive_temperature=0.1)
    loss = contrastive_loss(model, inputs, model.encode(inputs), labels, 0, cfg)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["adaptor.weight"].abs().sum() > 0 and grads["blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_contrastive_loss_is_the_weighted_sum_and_zero_when_off():
    model = pretrained()
    model.eval()  # no dropout: the terms are deterministic but for the seq-seq augmentation
    inputs, labels = windows()
    states = model.encode(inputs)
    zero = contrastive_loss(model, inputs, states, labels, 0, PretrainConfig())
    assert zero.item() == 0.0
    si = contrastive_loss(model, inputs, states, labels, 0, PretrainConfig(seq_item_weight=1.0))
    si2 = contrastive_loss(model, inputs, states, labels, 0, PretrainConfig(seq_item_weight=2.0))
    assert torch.allclose(si2, 2 * si)
    # No augmentation (eval mode, no item drop): a view equals its window, the easiest positive.
    ss = contrastive_loss(model, inputs, states, labels, 0, PretrainConfig(seq_seq_weight=1.0, item_drop=0.0))
    last = labels[:, -1]
    same = last[:, None] == last[None, :]
    assert torch.allclose(ss, info_nce(states[:, -1], states[:, -1], 0.07, same), atol=1e-6)
    # Fewer than two labelled windows: nothing to contrast.
    one = labels.clone()
    one[1:, -1] = -1
    assert contrastive_loss(model, inputs, states, one, 0, PretrainConfig(seq_item_weight=1.0)).item() == 0.0


def test_pretrain_source_with_the_contrastive_objectives_runs_and_records_them(tmp_path):
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    cfg = tiny_config(run_dir, tmp_path / "cfg.yaml")
    result = runner.invoke(app, ["pretrain-source", "-c", str(cfg), "pretrain.seq_item_weight=0.5",
                                 "pretrain.seq_seq_weight=0.1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "pretrain" / "manifest.json").read_text())
    assert manifest["config"]["pretrain"]["seq_item_weight"] == 0.5
    assert manifest["config"]["pretrain"]["seq_seq_weight"] == 0.1


@pytest.mark.parametrize(("key", "value"), [("seq_item_weight", -1.0), ("seq_seq_weight", -0.1),
                                            ("contrastive_temperature", 0.0), ("item_drop", 1.0),
                                            ("text_drop", -0.1)])
def test_contrastive_keys_are_checked(key, value):
    with pytest.raises(ConfigError, match=f"pretrain.{key}"):
        build(PretrainConfig, {key: value}, prefix="pretrain.")


# --- the adaptor re-fit at fine-tuning --------------------------------------------------------

TARGET = slice(20, 30)  # the target catalogue's rows of TEXT


def candidate(adaptor_init: str, strategy: str = "full", init: SeqRecModel | None = None):
    init = init or pretrained()
    return init, build_candidate(strategy, init, init.config, TEXT, N_ITEMS, item_ids=False, seed=0,
                                 adaptor_init=adaptor_init, target_text=TEXT[TARGET])


def test_whiten_centres_every_expert_on_the_target_catalogue_and_keeps_the_rest():
    init, cand = candidate("whiten")
    model = cand.model
    mean = TEXT[TARGET].mean(0)
    assert torch.allclose(model.adaptor.bias, mean.expand(2, TEXT_DIM))
    # (x - b_k) W_k: the target's mean text vector maps to zero in every expert.
    assert torch.allclose(model.adaptor(mean[None]), torch.zeros(1, 8), atol=1e-6)
    for name, value in init.state_dict().items():
        if name != "adaptor.bias":
            assert torch.equal(model.state_dict()[name], value), name
    # Transferred, so L2-SP pulls toward the re-fitted biases, not the source's.
    assert "adaptor.bias" not in cand.new_params and torch.equal(cand.anchors["adaptor.bias"], model.adaptor.bias)


def test_reinit_starts_the_adaptor_as_scratch_does_and_transfers_the_sequence_tower():
    init, cand = candidate("reinit")
    scratch = build_candidate("scratch", init, init.config, TEXT, N_ITEMS, item_ids=False, seed=0)
    model = cand.model
    for name, value in model.state_dict().items():
        source = scratch.model if name.startswith("adaptor.") else init
        assert torch.equal(value, source.state_dict()[name]), name
    assert {n for n in cand.new_params} == {n for n, _ in model.named_parameters() if n.startswith("adaptor.")}
    assert not any(n.startswith("adaptor.") for n in cand.anchors)


def test_keep_is_the_default_and_zero_shot_always_keeps_the_adaptor():
    init, keep = candidate("keep")
    default = build_candidate("full", init, init.config, TEXT, N_ITEMS, item_ids=False, seed=0)
    assert all(torch.equal(v, default.model.state_dict()[k]) for k, v in keep.model.state_dict().items())
    _, zero = candidate("whiten", "zero_shot", init)
    assert torch.equal(zero.model.adaptor.bias, init.adaptor.bias)


def test_whiten_needs_the_moe_adaptor():
    torch.manual_seed(0)
    init = SeqRecModel(base_config(adaptor="linear"), TEXT_DIM, N_ITEMS)
    init.set_item_text(TEXT)
    with pytest.raises(ConfigError, match="finetune.adaptor_init"):
        candidate("whiten", init=init)


def test_finetune_target_applies_adaptor_init_from_the_config(tmp_path):
    run_dir = tmp_path / "run"
    write_tiny_prepared(run_dir)
    cfg = tiny_config(run_dir, tmp_path / "cfg.yaml")
    assert runner.invoke(app, ["pretrain-source", "-c", str(cfg)]).exit_code == 0
    result = runner.invoke(app, ["finetune-target", "-c", str(cfg), "finetune.strategy=full",
                                 "finetune.adaptor_init=whiten", "finetune.train.epochs=1"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "finetune" / "manifest.json").read_text())
    assert manifest["config"]["finetune"]["adaptor_init"] == "whiten"
    bad = runner.invoke(app, ["finetune-target", "-c", str(cfg), "finetune.adaptor_init=centre"])
    assert bad.exit_code != 0 and "finetune.adaptor_init" in bad.output
