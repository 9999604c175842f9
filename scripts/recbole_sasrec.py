"""RecBole 1.2.1's SASRec on one dataset: the anchor of `bench_ml100k.py` and `bench_quality.py`.

Runs in RecBole's own virtual environment (it pins numpy 1.23 and friends; see
../shared/design/PERFORMANCE.md), never imports trecsys, and prints one JSON line. Settings are
RecBole's SASRec defaults with the protocol of the comparison: leave-one-out by time (the last item
is test, the one before valid), full ranking, CE loss, 2 blocks × 64 dims × 2 heads, 50 items of
history, batch 2048.

    RECBOLE_PYTHON scripts/recbole_sasrec.py DATA_PATH EPOCHS WORK_DIR [--dataset ml-100k] [--lists OUT.json]
                                             [--threads N] [--resume-dir DIR --budget-s SECONDS]

DATA_PATH holds `<dataset>/<dataset>.inter`. Trains with RecBole's validation-based early stopping
(patience 10) within EPOCHS and reports, per epoch, the wall and CPU seconds of its training pass and
of its validation and the validation NDCG@10 (`per_epoch`); what one epoch feeds the network
(`train_sequences` padded prefixes, `train_positions` = the cells of its item-sequence tensor,
padding included, `train_items` without it, `train_labels` one per prefix); and test NDCG@10 and
Recall@10 of the best-validation model under both rules: `seen_ranked` (RecBole's own sequential
evaluation: items the user already has are ranked like any other) and `exclude_seen` (those items masked, trecsys's default). --lists writes
each test user's top-50 items under both rules ({rule: {user token: [item tokens]}}), so the caller
can compute every metric, interval and paired difference with its own code.

RecBole trains on every prefix, so its converged schedule takes hours on a 2-core machine (longer
than one working session). With --resume-dir the run survives being stopped: after every validated
epoch the trainer's whole state (weights, optimizer, early-stopping counters, the per-epoch record
and every random generator, the training loader's shuffle included) goes to DIR/resume.pt, and the
best model's checkpoint lives in DIR too; the next run with the same DIR continues from the epoch
after. --budget-s ends this process after the first epoch that finishes past that many seconds and
prints the record with `"complete": false`; a run that stops early (patience) or reaches EPOCHS prints
`"complete": true` and the test numbers. Epoch seconds exclude the process start-ups either way.
"""

import argparse
import json
import math
import os
import random
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's checkpoints pickle its Config

import numpy as np  # noqa: E402
import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("data_path")
parser.add_argument("epochs", type=int)
parser.add_argument("work_dir")
parser.add_argument("--dataset", default="ml-100k")
parser.add_argument("--lists", default=None)
parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); the caller sets "
                    "OMP_NUM_THREADS and friends to the same number before this process starts")
parser.add_argument("--resume-dir", default=None, help="keep the training state here after every epoch, and "
                    "continue from it when it is there (see the module docstring)")
parser.add_argument("--budget-s", type=float, default=0.0, help="with --resume-dir: stop after the first epoch "
                    "that ends past this many seconds of this process (0: no limit)")
args = parser.parse_args()
if args.budget_s and not args.resume_dir:
    parser.error("--budget-s needs --resume-dir (a stopped run must be able to continue)")
if args.threads > 0:
    torch.set_num_threads(args.threads)

config = Config(model="SASRec", dataset=args.dataset, config_dict={
    "data_path": args.data_path, "checkpoint_dir": args.resume_dir or args.work_dir, "epochs": args.epochs, "stopping_step": 10,
    "train_batch_size": 2048, "eval_batch_size": 4096, "loss_type": "CE", "train_neg_sample_args": None,
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
    "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 50,
    "device": "cpu", "use_gpu": False, "show_progress": False, "seed": 0, "reproducibility": True,
})
init_seed(config["seed"], config["reproducibility"])
dataset = create_dataset(config)
train, valid, test = data_preparation(config, dataset)
model = get_model(config["model"])(config, train.dataset).to(config["device"])
# One of RecBole's model files switches autograd anomaly detection on at import: it costs ~40%.
torch.autograd.set_detect_anomaly(False)
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

# What one epoch feeds the network: every (history -> next item) pair as its own prefix, left in a
# (sequences, MAX_ITEM_LIST_LENGTH) tensor; SASRec runs its blocks over every cell of it.
item_seq = train.dataset.inter_feat[model.ITEM_SEQ]
result = {"threads": torch.get_num_threads(), "training_sequences": len(train.dataset),
          "train_sequences": int(item_seq.shape[0]), "train_positions": int(item_seq.numel()),
          "train_items": int(train.dataset.inter_feat[model.ITEM_SEQ_LEN].sum()),
          "train_labels": int(item_seq.shape[0])}
per_epoch = []


def timed(name, method):
    """Wrap a trainer method: its wall and CPU seconds go into this epoch's record."""

    def wrapper(*a, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        out = method(*a, **kw)
        if name == "train":
            per_epoch.append({})
        per_epoch[-1].update({f"{name}_s": time.perf_counter() - wall, f"{name}_cpu_s": time.process_time() - cpu})
        if name == "valid":
            per_epoch[-1]["valid_ndcg@10"] = float(out[0])  # (valid score = NDCG@10, all metrics)
        return out

    return wrapper


trainer._train_epoch = timed("train", trainer._train_epoch)
trainer._valid_epoch = timed("valid", trainer._valid_epoch)

def test_lists(k=50):
    """Each test user's top-k under both rules, from the best model's full-sort scores. A user's
    history (exclude_seen) is every item of theirs but the held-out test one, in full, not only the
    50 the model reads. The held-out item is the one RecBole's test row holds, not "the last by
    timestamp": ml-100k users rate many films in the same second, and the last of a tie sorted by
    (time, item) was often not the item RecBole held out, which masked the target itself."""
    uid, iid = dataset.uid_field, dataset.iid_field
    users = dataset.inter_feat[uid].numpy()
    items = dataset.inter_feat[iid].numpy()
    items_of = {}
    for u, i in zip(users, items, strict=True):
        items_of.setdefault(int(u), set()).add(int(i))
    model.eval()
    lists = {"seen_ranked": {}, "exclude_seen": {}}
    hits = {"seen_ranked": [], "exclude_seen": []}
    with torch.no_grad():
        for interaction, _, _, _ in test:
            scores = model.full_sort_predict(interaction.to(config["device"])).view(len(interaction), -1)
            scores[:, 0] = -math.inf  # RecBole's padding item
            batch_users = interaction[uid].tolist()
            targets = interaction[iid].tolist()
            for rule in lists:
                ranked = scores.clone()
                if rule == "exclude_seen":
                    for row, (u, target) in enumerate(zip(batch_users, targets, strict=True)):
                        ranked[row, list(items_of[u] - {target})] = -math.inf
                top = torch.topk(ranked, min(k, ranked.shape[1] - 1), dim=1).indices.tolist()
                for u, target, row in zip(batch_users, targets, top, strict=True):
                    lists[rule][dataset.id2token(uid, u)] = [str(x) for x in dataset.id2token(iid, row)]
                    rank = row.index(target) if target in row[:10] else None
                    hits[rule].append((rank is not None, 0.0 if rank is None else 1.0 / math.log2(rank + 2)))
    for rule, rows in hits.items():
        result[f"{rule}.test_recall@10"] = sum(h for h, _ in rows) / len(rows)
        result[f"{rule}.test_ndcg@10"] = sum(g for _, g in rows) / len(rows)
    result["test_users"] = len(hits["seen_ranked"])
    return lists


class OutOfBudget(Exception):
    """This process's --budget-s is spent; the state of the last epoch is in --resume-dir."""


RESUME = os.path.join(args.resume_dir, "resume.pt") if args.resume_dir else None
started = time.perf_counter()


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "loader": train.generator.get_state(),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "numpy_pos": int(np.random.get_state()[2]), "python": list(random.getstate()[1])}


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    train.generator.set_state(state["loader"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def keep_state(epoch_idx, valid_score):
    """fit's end-of-epoch callback: everything the next process needs to carry on from here."""
    # fit ends after this epoch anyway: the last one, or early stopping's patience is used up.
    finished = epoch_idx + 1 >= trainer.epochs or trainer.cur_step > trainer.stopping_step
    # Plain floats: RecBole keeps numpy scalars, which a weights-only load refuses.
    state = {"epoch": epoch_idx, "cur_step": int(trainer.cur_step), "best_valid_score": float(trainer.best_valid_score),
             "best_valid_result": {k: float(v) for k, v in (trainer.best_valid_result or {}).items()},
             "best_file": trainer.saved_model_file,
             "model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "per_epoch": json.dumps(per_epoch), "rng": rng_states(), "finished": finished}
    torch.save(state, RESUME + ".tmp")
    os.replace(RESUME + ".tmp", RESUME)  # a process stopped mid-write leaves the previous epoch's state
    if args.budget_s and not finished and time.perf_counter() - started > args.budget_s:
        raise OutOfBudget


DONE = os.path.join(args.resume_dir, "complete.json") if args.resume_dir else None
if DONE and os.path.exists(DONE):
    raise SystemExit(f"{DONE}: this --resume-dir holds a finished run; give another folder (or delete this one)")
if RESUME and os.path.exists(RESUME):
    # Written by keep_state above (tensors, numbers, strings and lists only): weights_only suffices.
    state = torch.load(RESUME, weights_only=True)
    model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.start_epoch, trainer.cur_step = state["epoch"] + 1, state["cur_step"]
    trainer.best_valid_score, trainer.best_valid_result = state["best_valid_score"], state["best_valid_result"]
    trainer.saved_model_file = state["best_file"]
    per_epoch.extend(json.loads(state["per_epoch"]))
    set_rng_states(state["rng"])
    result["resumed_from_epoch"] = state["epoch"] + 1

try:
    # A state that says the training had finished (the process stopped before its test): only the test
    # is left; fit would otherwise save the last weights over the best model's file.
    if not (RESUME and os.path.exists(RESUME) and state["finished"]):
        trainer.fit(train, valid, saved=True, show_progress=False, callback_fn=keep_state if RESUME else None)
    result["complete"] = True
except OutOfBudget:
    result["complete"] = False
result["train_s"] = time.perf_counter() - started  # everything fit did in this process: epochs, validations, checkpoints
result["epochs"] = len(per_epoch)
if not result["complete"]:
    scores = [e["valid_ndcg@10"] for e in per_epoch]
    result.update(per_epoch=per_epoch, best_epoch=scores.index(max(scores)) + 1, best_valid_ndcg=max(scores))
    print(json.dumps(result))
    raise SystemExit(0)
result["per_epoch"] = per_epoch
result["s_per_epoch"] = sum(e["train_s"] for e in per_epoch) / len(per_epoch)  # the training passes alone
own = trainer.evaluate(test, load_best_model=True, show_progress=False)
result["recbole_own.test_ndcg@10"] = float(own["ndcg@10"])  # RecBole's evaluator (seen items ranked)
lists = test_lists()
if DONE:
    with open(DONE, "w") as f:
        json.dump(result, f)
if args.lists:
    with open(args.lists, "w") as f:
        json.dump(lists, f)
print(json.dumps(result))
