"""Backends run a prepared batch on a device: ``torch`` (PyTorch) and ``onnx`` (ONNX Runtime)."""
