"""trecsys: transfer learning for recommendation, from source pretraining to batch recommendation.

The Python API (`trecsys.load_run`, `trecsys.Run`) lives in trecsys/api.py and loads on first use, so
`import trecsys` and `trec --help` stay light.
"""

__version__ = "0.1.0"
__all__ = ["Run", "__version__", "load_run"]


def __getattr__(name: str):
    if name in ("Run", "load_run"):
        from trecsys import api

        return getattr(api, name)
    raise AttributeError(f"module 'trecsys' has no attribute {name!r}")
