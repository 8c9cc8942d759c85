"""Export any model of the zoo to ONNX, checked against PyTorch, into a model repository.

    >>> from vfm.models.export import export_model
    >>> result = export_model("efficientnet_lite0", "model_repository")
    >>> result.config["parity"]["logits_max_abs_diff"]

- ``repository``: the repository layout, ``find_export`` and ``export_model`` (write into a
  hidden folder, check parity, publish by rename).
- ``common``: the exporter call, graph files, parity tolerances and checks every family shares.
- ``classify``, ``detect``, ``mtcnn``, ``sam``: one exporter per family, each tracing the module
  the family's PyTorch network call runs, so the graph computes what that call computes.
- ``quantize``: int8 and float16 variants (``NAME.int8``, ``NAME.float16``), published only when
  they keep the float32 answers on real photos.
- ``cli``: ``vfm export NAME``.

This package imports the families (to trace their networks); no family imports it.
"""
from .common import DEFAULT_OPSET, ExportError, ParityError, Tolerance
from .repository import (ExportNotFound, ExportResult, ExportStale, default_tolerance, export_model, find_export,
                         folder_name, model_folder, repository_root)
from .quantize import QuantizationRefused, VariantOptions, variant_of

__all__ = ["DEFAULT_OPSET", "ExportError", "ExportNotFound", "ExportResult", "ExportStale", "ParityError",
           "QuantizationRefused", "VariantOptions", "variant_of",
           "Tolerance", "default_tolerance", "export_model", "find_export", "folder_name", "model_folder",
           "repository_root"]
