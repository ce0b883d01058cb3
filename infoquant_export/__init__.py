"""infoquant-export: rotation-based W4A4KV4 LLM quantization, from fake-quant reference to deployment."""

__version__ = "0.1.0"
