"""Backends that run an exported model (ONNX Runtime today; TensorRT later)."""
