"""RecBole 1.2.1's full-sort evaluation of SASRec on the Kitchen catalogue: the other side of
`bench_eval.py --recbole-python`. Runs in RecBole's own virtual environment, never imports trecsys,
and prints one JSON line.

    RECBOLE_PYTHON scripts/recbole_fullsort.py KITCHEN_DIR WORK_DIR THREADS

KITCHEN_DIR holds RecBole atomic files `Kitchen.inter.gz` (user_id, item_id, position). The model is
untrained (the cost of ranking does not depend on the weights) and sized like trecsys's default:
2 blocks, 64 dims, 2 heads, 50 items of history. The test split is RecBole's leave-one-out by
`position`; its rule scores every item, the user's history included. Timed: `trainer.evaluate` on
the test split (user encoding, scores over the catalogue, top-K, NDCG/Recall), with RecBole's
default eval_batch_size (4096 users per batch). Peak memory is the process's (ru_maxrss).
"""

import gzip
import json
import os
import resource
import shutil
import sys
import time

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # RecBole's checkpoints pickle its Config

import torch  # noqa: E402
from recbole.config import Config  # noqa: E402
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_seed  # noqa: E402

kitchen_dir, work_dir, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
os.makedirs(os.path.join(work_dir, "Kitchen"), exist_ok=True)
with gzip.open(os.path.join(kitchen_dir, "Kitchen.inter.gz"), "rb") as src, \
        open(os.path.join(work_dir, "Kitchen", "Kitchen.inter"), "wb") as dst:
    shutil.copyfileobj(src, dst)

config = Config(model="SASRec", dataset="Kitchen", config_dict={
    "data_path": work_dir, "checkpoint_dir": work_dir, "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
    "TIME_FIELD": "position", "load_col": {"inter": ["user_id", "item_id", "position"]},
    "loss_type": "CE", "train_neg_sample_args": None,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Recall", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
    "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 50,
    "device": "cpu", "use_gpu": False, "show_progress": False, "seed": 0, "reproducibility": True,
})
init_seed(config["seed"], config["reproducibility"])
dataset = create_dataset(config)
train, valid, test = data_preparation(config, dataset)
model = get_model(config["model"])(config, train.dataset).to(config["device"])
torch.autograd.set_detect_anomaly(False)  # one of RecBole's model files switches it on at import
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started, cpu = time.perf_counter(), time.process_time()
result = trainer.evaluate(test, load_best_model=False, show_progress=False)
seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
users = len(test.dataset)
print(json.dumps({
    "users": users, "items": dataset.item_num - 1, "threads": torch.get_num_threads(),
    "seconds": seconds, "cpu_seconds": cpu_seconds, "users_per_s": users / seconds,
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    "peak_rss_before_eval_gib": rss_before / 2**30, "ndcg@10": float(result["ndcg@10"]),
}))
