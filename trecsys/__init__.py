"""trecsys: transfer learning for recommendation, from source pretraining to batch recommendation.

The Python API (`trecsys.load_run`, `trecsys.Run`) lives in trecsys/api.py and loads on first use, so
`import trecsys` and `trec --help` stay light.
"""

import os

# Idle OpenMP threads sleep instead of spinning. torch's OpenMP runtime reads this once, when torch
# is first imported, so it is set here, before any trecsys module imports torch; a value you set is
# kept. Spinning threads fight other work for the cores: on a 2-core machine under load ~15, the
# demo's `trec pretrain-source -c configs/demo.yaml pretrain.train.epochs=3` with TRECSYS_THREADS=2
# took 3.9x the wall time (4.2x the CPU) of TRECSYS_THREADS=1; passive, 0.83x the wall time and the
# same CPU seconds (alternating runs, medians).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["Run", "__version__", "load_run"]


def __getattr__(name: str):
    if name in ("Run", "load_run"):
        from trecsys import api

        return getattr(api, name)
    raise AttributeError(f"module 'trecsys' has no attribute {name!r}")
