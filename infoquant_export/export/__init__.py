"""ONNX export: the quantized artifact as one ONNX graph with explicit Q/DQ and ``infoquant`` custom nodes."""
