"""RecBole 1.2.1's SASRec on ml-100k, timed per training epoch: the other side of `bench_ml100k.py`.

Runs in RecBole's own virtual environment (it pins numpy 1.23 and friends; see
../shared/design/PERFORMANCE.md), never imports trecsys, and prints one JSON line. Settings are
RecBole's SASRec defaults with the protocol of the comparison: leave-one-out by time, full ranking,
CE loss, 2 blocks × 64 dims × 2 heads, 50 items of history, batch 2048.

    RECBOLE_PYTHON scripts/recbole_sasrec.py DATA_PATH EPOCHS WORK_DIR

DATA_PATH holds `ml-100k/ml-100k.inter`. EPOCHS 1 times one epoch; more trains with RecBole's
validation-based early stopping (patience 10) and reports its test NDCG@10 and Recall@10.
"""

import json
import os
import sys
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's checkpoints pickle its Config

import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402

data_path, epochs, work_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
config = Config(model="SASRec", dataset="ml-100k", config_dict={
    "data_path": data_path, "checkpoint_dir": work_dir, "epochs": epochs, "stopping_step": 10,
    "train_batch_size": 2048, "eval_batch_size": 4096, "loss_type": "CE", "train_neg_sample_args": None,
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

result = {"threads": torch.get_num_threads(), "training_sequences": len(train.dataset)}
if epochs == 1:
    started = time.perf_counter()
    trainer._train_epoch(train, 0, show_progress=False)
    result["s_per_epoch"] = time.perf_counter() - started
    result["epochs"] = 1
else:
    started = time.perf_counter()
    trainer.fit(train, valid, saved=True, show_progress=False)
    result["train_s"] = time.perf_counter() - started
    result["epochs"] = len(trainer.train_loss_dict)
    test_result = trainer.evaluate(test, load_best_model=True, show_progress=False)
    result["test_ndcg@10"] = float(test_result["ndcg@10"])
    result["test_recall@10"] = float(test_result["recall@10"])
print(json.dumps(result))
