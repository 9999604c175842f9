"""trecsys: transfer learning for recommendation, from source pretraining to batch recommendation."""

__version__ = "0.1.0"
