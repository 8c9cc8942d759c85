"""Export classifiers (CNNs) and ViTs: one graph, preprocessed batch in, features/tokens and logits out.

The graph is the module the PyTorch backend calls (``features_and_logits_module``,
``tokens_module`` in the families), so it stops where the runner's own code starts: softmax/top-k,
pooling of ViT tokens and normalisation stay in the runner, the same for both backends.
The batch axis is dynamic; the spatial size is the preprocessing's fixed crop.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..images import preprocess_batch
from .common import FamilyExport, Parity, ParityError, Tolerance, export_graph, parity_images, parity_session

log = logging.getLogger(__name__)


def _parity_batches(spec: Any, seed: int) -> list[np.ndarray]:
    """Every parity image in one batch, then the first alone: the batch axis is dynamic both ways."""
    batch = preprocess_batch(parity_images(seed), spec.preprocess)
    return [batch, batch[:1]]


def _check_top1(parity: Parity, what: str, ort_logits: np.ndarray, torch_logits: np.ndarray) -> None:
    for row_ort, row_torch in zip(ort_logits, torch_logits):
        top = np.sort(row_torch)[::-1]
        # a near-tie may legitimately swap; past the logit tolerance it is a wrong graph
        tied = len(top) > 1 and top[0] - top[1] <= parity.tolerance.atol + parity.tolerance.rtol * abs(top[0])
        if int(np.argmax(row_ort)) != int(np.argmax(row_torch)) and not tied:
            raise ParityError(f"parity: the top-1 class of {what} differs between ONNX Runtime "
                              f"({int(np.argmax(row_ort))}) and PyTorch ({int(np.argmax(row_torch))}).")
        parity.count("top1_compared")


def export_classifier(runner: Any, folder: Path, opset: int, tolerance: Tolerance, external_data: bool | None,
                      seed: int) -> FamilyExport:
    """``Classifier`` -> ``model.onnx`` with outputs ``features`` [N, D] and ``logits`` [N, C]."""
    import torch

    module = runner.torch_module()
    example = torch.from_numpy(preprocess_batch(parity_images(seed + 1000, [(64, 80), (90, 60)]),
                                                runner.spec.preprocess))
    axes = {"input": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}}
    graph = export_graph(module, (example,), folder, "model", ["input"], ["features", "logits"], axes, opset,
                         external_data)
    session = parity_session(folder / graph.file)
    parity = Parity(tolerance)
    for batch in _parity_batches(runner.spec, seed):
        features, logits = session.run(["features", "logits"], {"input": batch})
        with torch.no_grad():
            ref_features, ref_logits = (t.numpy() for t in module(torch.from_numpy(batch)))
        parity.tensor("logits", logits, ref_logits)
        parity.tensor("features", features, ref_features)
        _check_top1(parity, "a parity image", logits, ref_logits)
    return FamilyExport(kind="classifier", graphs=[graph], parity=parity.to_json(),
                        runtime={"feature_dim": int(ref_features.shape[1]), "head_path": runner.head_path},
                        labels=list(runner.labels))


def export_vit(runner: Any, folder: Path, opset: int, tolerance: Tolerance, external_data: bool | None,
               seed: int) -> FamilyExport:
    """``ViTRunner`` -> ``model.onnx`` with ``tokens`` [N, 1+P, D] (+ ``logits`` [N, C] with a head).

    Pooling (cls / mean / cls+mean) is a load-time option of the runner, so it stays outside.
    """
    import torch

    module = runner.torch_module()
    classifier = bool(runner.has_classifier)
    outputs = ["tokens", "logits"] if classifier else ["tokens"]
    example = torch.from_numpy(preprocess_batch(parity_images(seed + 1000, [(64, 80), (90, 60)]),
                                                runner.spec.preprocess)).to(runner.networks["model"].dtype)
    axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    graph = export_graph(module, (example,), folder, "model", ["input"], outputs, axes, opset, external_data)
    session = parity_session(folder / graph.file)
    parity = Parity(tolerance)
    for batch in _parity_batches(runner.spec, seed):
        got = session.run(outputs, {"input": batch})
        with torch.no_grad():
            ref = module(torch.from_numpy(batch))
        ref = [t.float().numpy() for t in (ref if classifier else (ref,))]
        parity.tensor("tokens", got[0], ref[0])
        if classifier:
            parity.tensor("logits", got[1], ref[1])
            _check_top1(parity, "a parity image", got[1], ref[1])
    return FamilyExport(kind="vit", graphs=[graph], parity=parity.to_json(),
                        runtime={"hidden_size": int(runner.hidden_size), "has_classifier": classifier},
                        labels=list(runner.labels) if runner.labels else None)
