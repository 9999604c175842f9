"""`runtime.threads`: where the number comes from, that every pool gets it, and that stages record it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from threadpoolctl import threadpool_info

from trecsys import runtime
from trecsys.config import load_config
from trecsys.errors import ConfigError
from trecsys.stages import evaluate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_threads():
    """apply_threads changes process-wide state: put torch, the BLAS pools and the environment back."""
    before, environ = torch.get_num_threads(), {k: os.environ.get(k) for k in runtime.POOL_ENV}
    yield
    for key, value in environ.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    runtime.apply_threads(before)


def test_config_key_wins_over_env_which_wins_over_the_default(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    assert runtime.resolve_threads(0) == (2, "default")  # 8 usable cores shared by 4 ranks
    monkeypatch.setenv(runtime.THREADS_ENV, "3")
    assert runtime.resolve_threads(0) == (3, runtime.THREADS_ENV)
    assert runtime.resolve_threads(5) == (5, "runtime.threads")


def test_default_never_below_one_thread(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
    assert runtime.resolve_threads(0) == (1, "default")


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_env_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(runtime.THREADS_ENV, value)
    with pytest.raises(ConfigError, match=runtime.THREADS_ENV):
        runtime.resolve_threads(0)


def test_negative_config_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="runtime.threads"):
        load_config(tiny_config(tmp_path / "run", tmp_path / "cfg.yaml"), ["runtime.threads=-1"])


def test_apply_sets_torch_the_blas_pools_and_the_environment(restore_threads):
    applied = runtime.apply_threads(1)
    assert torch.get_num_threads() == 1 and applied.threads == 1 and applied.source == "runtime.threads"
    pools = threadpool_info()
    assert pools, "numpy's BLAS pool should be visible to threadpoolctl"
    assert all(pool["num_threads"] == 1 for pool in pools), pools
    assert all(os.environ[key] == "1" for key in runtime.POOL_ENV)
    assert runtime.thread_record()["threads"] == 1


def test_fresh_process_default_shares_the_cores_among_local_ranks():
    """The default in a new process (as under torchrun): intra- and inter-op pools and BLAS all get
    usable cores // LOCAL_WORLD_SIZE (inter-op can only be set before any parallel work)."""
    code = ("import json; from threadpoolctl import threadpool_info; import torch; from trecsys import runtime; "
            "t = runtime.apply_threads(0); "
            "print(json.dumps([t.threads, t.interop_threads, torch.get_num_interop_threads(), t.source, "
            "sorted({p['num_threads'] for p in threadpool_info()}), len(__import__('os').sched_getaffinity(0))]))")
    env = {k: v for k, v in os.environ.items() if k not in (runtime.THREADS_ENV, *runtime.POOL_ENV)}
    env.update(PYTHONPATH=str(REPO), LOCAL_WORLD_SIZE="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    threads, interop, torch_interop, source, pools, cpus = json.loads(out.stdout.strip().splitlines()[-1])
    expected = max(1, cpus // 2)
    assert (threads, interop, torch_interop, source, pools) == (expected, expected, expected, "default", [expected])


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_idle_threads_sleep_unless_told_otherwise(given):
    """OMP_WAIT_POLICY must be in the environment before torch loads its OpenMP runtime."""
    code = "import os, sys, trecsys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(PYTHONPATH=str(REPO), **({"OMP_WAIT_POLICY": given} if given else {}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [given or "PASSIVE", "False"]


def test_stage_prints_and_records_its_threads(tiny_prepared, capsys, restore_threads):
    cfg = load_config(tiny_config(tiny_prepared, tiny_prepared.parent / "cfg.yaml",
                                  {"evaluate": {"bootstrap": 10, "ks": [10]}}), ["runtime.threads=1"])
    evaluate.run(cfg)
    assert "; 1 CPU thread(s) (runtime.threads)" in capsys.readouterr().err  # a log line: stderr
    record = json.loads((tiny_prepared / "eval" / "manifest.json").read_text())["runtime"]
    assert record["threads"] == 1 and record["source"] == "runtime.threads"
    assert record["usable_cpus"] >= 1 and record["local_world_size"] == 1
    assert record["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY")
