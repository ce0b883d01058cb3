"""The quantize stage as explicit steps: load -> transform -> calibrate/quantize -> save. Also eval helpers."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from infoquant_export.artifact import is_artifact, load_artifact, save_artifact
from infoquant_export.config import QuantConfig
from infoquant_export.data import corpus
from infoquant_export.errors import UserError
from infoquant_export.fsutil import atomic_output_dir
from infoquant_export.models.loading import load_model
from infoquant_export.models.model import CausalLM
from infoquant_export.quant.calibrate import QuantizedWeights, quantize_model
from infoquant_export.transforms.hadamard import hadamard_factors
from infoquant_export.transforms.rotate import apply_transforms, hadamard_schema
from infoquant_export.transforms.schema import TransformSchema


def resolve_device(name: str) -> str:
    """``auto`` -> cuda when available, else cpu; a clear error for an unavailable cuda."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} requested but no CUDA GPU is visible", "use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"invalid --device {name!r}", "use auto, cpu or cuda[:N]")
    return name


def build_schema(model: CausalLM, cfg: QuantConfig) -> TransformSchema:
    """The transform schema for ``cfg.rotation``; checks every Hadamard size before any heavy work."""
    if cfg.rotation == "none":
        return TransformSchema()
    c = model.cfg
    if c.hidden_size % cfg.rotation_blocks:
        raise UserError(f"hidden size {c.hidden_size} is not divisible into {cfg.rotation_blocks} rotation blocks",
                        "choose --rotation-blocks that divides the hidden size")
    schema = hadamard_schema(c.hidden_size, c.head_dim, c.intermediate_size, cfg.rotation_blocks, cfg.rotation_seed)
    for rotation in schema.rotations:
        hadamard_factors(rotation.block_size)
    return schema


@dataclass
class QuantizedModel:
    model: CausalLM
    tokenizer: Any
    schema: TransformSchema
    weights: QuantizedWeights
    source: dict[str, Any]


def quantize(model_spec: str, cfg: QuantConfig, device: str = "cpu", progress: bool = True) -> QuantizedModel:
    """Load, transform and quantize a model in memory (no files written)."""
    cfg.validate()
    loaded = load_model(model_spec)
    model = loaded.model.to(device)
    schema = build_schema(model, cfg)
    apply_transforms(model, schema)
    windows = None
    if cfg.weights == "gptq" and cfg.w_bits < 16:
        c = cfg.calibration
        tokens = corpus.tokenize(loaded.tokenizer, corpus.load_text(c.corpus, "calibration"))
        windows = corpus.calibration_windows(tokens, c.num_windows, c.seq_len, c.seed)
    weights = quantize_model(model, cfg, windows, progress=progress)
    return QuantizedModel(model, loaded.tokenizer, schema, weights, loaded.source)


def quantize_to_dir(model_spec: str, cfg: QuantConfig, out: str | Path, device: str = "cpu",
                    progress: bool = True) -> dict[str, Any]:
    """Quantize and write the artifact atomically; returns a summary with wall time and peak memory."""
    out = Path(out)
    if out.exists():
        raise UserError(f"output directory {out} already exists", "choose a new --out path or remove it first")
    start = time.perf_counter()
    result = quantize(model_spec, cfg, device, progress)
    with atomic_output_dir(out) as tmp:
        save_artifact(tmp, result.model, result.tokenizer, cfg, result.schema, result.source, result.weights)
    return {"out": str(out), "config": cfg.label(), "model": result.source.get("name"),
            "wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def load_for_eval(target: str, device: str) -> tuple[CausalLM, Any, str]:
    """A runnable model from an artifact directory or a model spec (full precision); with its tokenizer and label."""
    if is_artifact(target):
        art = load_artifact(target, device)
        return art.model, art.tokenizer, art.quant.label()
    loaded = load_model(target)
    return loaded.model.to(device), loaded.tokenizer, "FP"


def evaluate(model: CausalLM, tokenizer: Any, source: str = "default", seq_len: int = 512,
             max_windows: int | None = None, batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` on the evaluation split of ``source``."""
    from infoquant_export.eval.perplexity import perplexity

    tokens = corpus.tokenize(tokenizer, corpus.load_text(source, "evaluation"))
    windows = corpus.eval_windows(tokens, seq_len, max_windows)
    result = perplexity(model, windows, batch_size, progress)
    return {**result, "corpus": corpus.corpus_name(source)}
