"""The kinds of head, loss and k-NN metric the head artifact knows.

Torch-free, so that a command-line parser (``vfm finetune train``) can offer them as choices
without loading torch; ``heads.py`` validates head.json against the same tuples.
"""
from __future__ import annotations

HEAD_TYPES = ("knn", "linear", "mlp")
LOSSES = ("ce", "hinge", "squared")
METRICS = ("cosine", "l2")
