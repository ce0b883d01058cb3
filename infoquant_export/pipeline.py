"""The quantize stage as explicit steps: load -> transform -> calibrate/quantize -> save. Also eval helpers."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infoquant_export.artifact import is_artifact, load_artifact, save_artifact
from infoquant_export.config import IMPORT_PREFIX, QuantConfig
from infoquant_export.data import corpus
from infoquant_export.errors import UserError
from infoquant_export.fsutil import atomic_output_dir
from infoquant_export.models.loading import load_model
from infoquant_export.models.model import CausalLM
from infoquant_export.psot.report import summarize, write_report
from infoquant_export.psot.run import run_psot
from infoquant_export.quant.calibrate import QuantizedWeights, quantize_model
from infoquant_export.transforms.hadamard import hadamard_factors
from infoquant_export.transforms.rotate import (
    apply_transforms,
    center_embedding,
    fuse_norms,
    hadamard_schema,
    psot_matrices,
    psot_schema,
    round_weights,
)
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
    if cfg.learned_rotation:
        schema = psot_schema(c.hidden_size, c.head_dim, c.intermediate_size, cfg.rotation_blocks)
    else:
        schema = hadamard_schema(c.hidden_size, c.head_dim, c.intermediate_size, cfg.rotation_blocks,
                                 cfg.rotation_seed)
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
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # psot / import / lac summaries and stage seconds


def _calibration_windows(tokenizer: Any, cfg: QuantConfig, num: int, seq_len: int) -> torch.Tensor:
    tokens = corpus.tokenize(tokenizer, corpus.load_text(cfg.calibration.corpus, "calibration"))
    return corpus.calibration_windows(tokens, num, seq_len, cfg.calibration.seed)


@dataclass
class ImportedRotations:
    matrices: dict[str, torch.Tensor]
    info: dict[str, Any]
    clips: dict[int, dict[str, torch.Tensor]] | None  # clip_parameters.pth logits, to apply (else None)
    clips_path: str | None


def import_rotations(directory: str, model: CausalLM, cfg: QuantConfig, num_blocks: int | None) -> ImportedRotations:
    """Matrices of ``psot_schema`` from the InfoQuant reference code's files (``Q/*_layer_<i>_Q.pth``); sets
    ``cfg.rotation_blocks`` to the files' block count (``num_blocks``, when given, must match it). The reference's
    ``clip_parameters.pth`` is returned for application only under the infoquant-reference profile without --lac."""
    from infoquant_export.transforms.infoquant_import import CLIP_FILE, load_reference_rotations, resolve_dirs

    c = model.cfg
    ref = load_reference_rotations(directory, num_layers=c.num_layers, hidden_size=c.hidden_size,
                                   num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                   num_blocks=num_blocks)
    cfg.rotation_blocks = ref.num_blocks
    apply = ref.clips is not None and cfg.profile.separate_input_quantizers and not cfg.lac.enabled
    if ref.clips is None:
        note = None
    elif apply:
        note = "applied (--numerics infoquant-reference)"
    elif cfg.lac.enabled:
        note = "not applied: --lac learns the clips"
    else:
        note = ("not applied: the reference's clip factors belong to its quantizer layout (separate q/k/v and "
                "gate/up quantizers, per-head o_proj); use --numerics infoquant-reference to apply them, or --lac")
    info = {"directory": directory, "model_name": ref.model_name, "num_blocks": ref.num_blocks,
            "clip_parameters": note}
    clips_path = str(resolve_dirs(directory)[1] / CLIP_FILE) if apply else None
    return ImportedRotations(psot_matrices(ref.q1, ref.q2, ref.q4), info, ref.clips if apply else None, clips_path)


def prepare_numerics(model: CausalLM, cfg: QuantConfig) -> None:
    """Put a freshly loaded model under the config's numerics profile: infoquant-reference rounds the weights to
    float16 (its model dtype) and mean-centres the embedding rows; the default changes nothing."""
    profile = cfg.profile
    model.set_numerics(profile)
    if profile.fp16_rounding:
        round_weights(model)
    if profile.center_embedding:
        center_embedding(model)
        if profile.fp16_rounding:
            round_weights(model)


def _round_basis_changes(matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference stores its online residual basis changes in float16."""
    online = ("psot.attn_to_mlp.", "psot.mlp_to_attn.")
    return {k: v.half().float() if k.startswith(online) else v for k, v in matrices.items()}


def quantize(model_spec: str, cfg: QuantConfig, device: str = "cpu", progress: bool = True,
             import_blocks: int | None = None) -> QuantizedModel:
    """Load, transform and quantize a model in memory (no files written). ``import_blocks``: the block count an
    ``infoquant:DIR`` import must have (None = take the files')."""
    cfg.validate()
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(model_spec)
    model = loaded.model.to(device)
    matrices: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {"seconds": seconds}
    imported = None
    if cfg.rotation.startswith(IMPORT_PREFIX):
        imported = import_rotations(cfg.rotation[len(IMPORT_PREFIX):], model, cfg, import_blocks)
        matrices, report["import"] = imported.matrices, imported.info
    schema = build_schema(model, cfg)
    seconds["load"] = time.perf_counter() - start
    prepare_numerics(model, cfg)
    round_to = torch.float16 if cfg.profile.fp16_rounding else None
    if cfg.learned_rotation:
        fuse_norms(model)
        if round_to is not None:
            round_weights(model, round_to)
    if cfg.rotation == "psot":
        start = time.perf_counter()
        windows = _calibration_windows(loaded.tokenizer, cfg, cfg.psot.num_windows, cfg.psot.seq_len)
        matrices, report["psot"] = run_psot(model, windows, cfg, progress)
        seconds["psot"] = time.perf_counter() - start
    if round_to is not None:
        matrices = _round_basis_changes(matrices)
    start = time.perf_counter()
    apply_transforms(model, schema, matrices, fuse=not cfg.learned_rotation, round_to=round_to)
    seconds["fold"] = time.perf_counter() - start
    windows = None
    if cfg.w_bits < 16 and (cfg.weights == "gptq" or cfg.lac.enabled):
        c = cfg.calibration
        windows = _calibration_windows(loaded.tokenizer, cfg, c.num_windows, c.seq_len)
    start = time.perf_counter()
    weights = quantize_model(model, cfg, windows, progress=progress, report=report)
    seconds["weights" + ("+lac" if cfg.lac.enabled else "")] = time.perf_counter() - start
    if imported is not None and imported.clips is not None:
        from infoquant_export.quant.reference_clips import apply_reference_clips

        report["import"]["clip_counts"] = apply_reference_clips(model, imported.clips)
        cfg.clips_from = imported.clips_path
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return QuantizedModel(model, loaded.tokenizer, schema, weights, loaded.source, matrices, report)


def quantize_to_dir(model_spec: str, cfg: QuantConfig, out: str | Path, device: str = "cpu",
                    progress: bool = True, import_blocks: int | None = None) -> dict[str, Any]:
    """Quantize and write the artifact atomically; returns a summary with wall time and peak memory."""
    out = Path(out)
    if out.exists():
        raise UserError(f"output directory {out} already exists", "choose a new --out path or remove it first")
    start = time.perf_counter()
    result = quantize(model_spec, cfg, device, progress, import_blocks)
    with atomic_output_dir(out) as tmp:
        save_artifact(tmp, result.model, result.tokenizer, cfg, result.schema, result.source, result.weights,
                      result.matrices)
        write_quantize_report(tmp / "report", result.report)
    summary: dict[str, Any] = {"out": str(out), "config": cfg.label(), "model": result.source.get("name"),
                               "wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb(),
                               "stage_seconds": result.report["seconds"]}
    if "psot" in result.report:
        summary["psot_report"] = str(out / "report" / "psot.json")
        summary["psot_effect"] = {  # mean over layers, before (Hadamard) -> after (PSOT)
            name: {stat: [round(v["before"][stat], 4), round(v["after"][stat], 4)]
                   for stat in ("code_entropy_bits", "mse", "range_mean")}
            for name, v in summarize(result.report["psot"]).items()}
    return summary


def write_quantize_report(directory: Path, report: dict[str, Any]) -> None:
    """``quantize.json`` (stage seconds, LAC, import) and, after PSOT, ``psot.json`` + ``psot.png``."""
    directory.mkdir()
    rest = {k: v for k, v in report.items() if k != "psot"}
    (directory / "quantize.json").write_text(json.dumps(rest, indent=2))
    if "psot" in report:
        write_report(report["psot"], directory / "psot.json", directory / "psot.png")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def load_for_eval(target: str, device: str, kernels: str = "off", kernel_dtype: str = "float16",
                  decode_attention: str | None = None,
                  cuda_graphs: bool | None = None) -> tuple[CausalLM, Any, str]:
    """A runnable model from an artifact directory or a model spec (full precision); with its tokenizer and label.

    ``kernels``: ``auto`` runs a W4A4KV4 artifact through the GPU kernels (:class:`KernelCausalLM`) on a CUDA device
    and keeps the fake-quant model otherwise; ``on`` requires the kernels; ``off`` is the fake-quant model.
    ``decode_attention``: the kernel model's decode attention kernel, ``tc`` / ``cc`` / ``ccs`` / ``mma`` (None: the
    default).
    ``cuda_graphs``: whether its decode steps replay CUDA graphs on a GPU (None: ``$INFOQUANT_CUDA_GRAPHS`` or on).
    """
    if not is_artifact(target):
        loaded = load_model(target)
        return loaded.model.to(device), loaded.tokenizer, "FP"
    if kernels != "off":
        import infoquant_export.kernels  # noqa: F401  (selects Triton's interpreter on a CPU before triton loads)
    art = load_artifact(target, device)
    label = art.quant.label()
    if kernels == "off":
        return art.model, art.tokenizer, label
    from infoquant_export.kernels import kernels_available

    if kernels == "auto" and not kernels_available(device):
        return art.model, art.tokenizer, label
    from infoquant_export.kernels.model import KernelCausalLM

    try:
        model = KernelCausalLM(art.model, getattr(torch, kernel_dtype), decode_attention=decode_attention,
                               cuda_graphs=cuda_graphs)
    except UserError:
        if kernels == "on":
            raise
        return art.model, art.tokenizer, label  # auto: e.g. not W4A4KV4, the fake-quant model runs it
    extra = f", decode attention {decode_attention}" if decode_attention else ""
    if model.device.type == "cuda" and not model.cuda_graphs:
        extra += ", no CUDA graphs"
    return model, art.tokenizer, f"{label} [kernels, {kernel_dtype}{extra}]"


def evaluate(model: CausalLM, tokenizer: Any, source: str = "default", seq_len: int = 512,
             max_windows: int | None = None, batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` on the evaluation split of ``source``."""
    from infoquant_export.eval.perplexity import perplexity

    tokens = corpus.tokenize(tokenizer, corpus.load_text(source, "evaluation"))
    windows = corpus.eval_windows(tokens, seq_len, max_windows)
    result = perplexity(model, windows, batch_size, progress)
    return {**result, "corpus": corpus.corpus_name(source)}
