"""The quantized artifact directory: everything export needs, so it never redoes calibration.

Layout (format version 1)::

    DIR/config.json        model config, quant config, source, format version, tensor summary
    DIR/transforms.json    the transform schema (versioned)
    DIR/model.safetensors  weights: 4-bit codes packed two per byte (``*.qweight`` uint8, low nibble first) or
                           int8 codes for other widths, per-output-channel float32 ``*.scale`` [out, 1],
                           float32 embedding / LM head / norms / biases / RoPE inv_freq, learned rotation matrices
                           (``psot.*.{layer}``), LAC clip factors (``layers.{i}.{site}.clip`` = [max, min], or
                           [2, heads] for the per-head o_proj input of the infoquant-reference profile)
    DIR/report/            what quantize measured (``psot.json`` / ``psot.png``, when PSOT ran)
    DIR/tokenizer/         the model's tokenizer and chat template (``save_pretrained``)

Loading rebuilds the fake-quant model with the same arithmetic (``codes * scale``), so logits are bit-identical.
Nothing here is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from infoquant_export import __version__
from infoquant_export.config import QuantConfig
from infoquant_export.errors import UserError
from infoquant_export.models.model import LINEAR_ROLES, CausalLM, ModelConfig, activation_sites
from infoquant_export.numerics import DEFAULT as DEFAULT_NUMERICS
from infoquant_export.numerics import PROFILES
from infoquant_export.quant.calibrate import attach_integer_weights, configure_activation_quant
from infoquant_export.quant.primitives import pack_int4, unpack_int4
from infoquant_export.quant.weights import QuantizedWeight
from infoquant_export.transforms.rotate import attach_online_ops
from infoquant_export.transforms.schema import TransformSchema

FORMAT = "infoquant-export/quantized-model"
FORMAT_VERSION = 1
FIX_NOT_ARTIFACT = "pass a directory written by `infoquant-export quantize`"


@dataclass
class Artifact:
    """A loaded artifact: the fake-quant model ready to run, and what produced it."""

    model: CausalLM
    tokenizer: Any
    quant: QuantConfig
    schema: TransformSchema
    source: dict[str, Any]
    weights: dict[str, QuantizedWeight]


def _tensors(model: CausalLM, weights: dict[str, QuantizedWeight], matrices: dict[str, torch.Tensor],
             clip_sites: tuple[str, ...]) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {
        "embed.weight": model.embed.weight, "lm_head.weight": model.lm_head.weight,
        "norm": model.norm, "inv_freq": model.inv_freq, **matrices,
    }
    for i, layer in enumerate(model.layers):
        t[f"layers.{i}.input_norm"] = layer.input_norm
        t[f"layers.{i}.post_norm"] = layer.post_norm
        for site in clip_sites:
            t[f"layers.{i}.{site}.clip"] = getattr(layer, site).clip_tensor()
        for role in LINEAR_ROLES:
            key, linear = f"layers.{i}.{role}", layer.linear(role)
            qw = weights.get(key)
            if qw is None:
                t[f"{key}.weight"] = linear.weight
            else:
                t[f"{key}.qweight"] = pack_int4(qw.codes) if qw.bits == 4 else qw.codes
                t[f"{key}.scale"] = qw.scale
            if linear.bias is not None:
                t[f"{key}.bias"] = linear.bias
    return {k: v.detach().contiguous().cpu() for k, v in t.items()}


def save_artifact(directory: Path, model: CausalLM, tokenizer: Any, quant: QuantConfig, schema: TransformSchema,
                  source: dict[str, Any], weights: dict[str, QuantizedWeight],
                  matrices: dict[str, torch.Tensor] | None = None) -> None:
    """Write the artifact into ``directory`` (an empty directory; callers make it atomic). ``matrices`` are the
    schema's learned rotations; LAC clip factors (``layers.{i}.{site}.clip`` = [max, min]) when LAC is on."""
    tensors = _tensors(model, weights, matrices or {}, activation_sites(quant.profile) if quant.has_clips else ())
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": FORMAT})
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "infoquant_export_version": __version__,
        "model": model.cfg.to_dict(), "quant": quant.to_dict(), "source": source,
        "biases": {role: model.layers[0].linear(role).bias is not None for role in LINEAR_ROLES},
        "weight_bits": {k: w.bits for k, w in weights.items()},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "transforms.json").write_text(schema.to_json())
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / "tokenizer"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}", FIX_NOT_ARTIFACT) from err


def is_artifact(path: str | Path) -> bool:
    """An artifact directory, not a Hugging Face one (both hold config.json and model.safetensors; only an artifact
    has the transform schema)."""
    return all((Path(path) / name).is_file() for name in ("config.json", "model.safetensors", "transforms.json"))


@dataclass
class Manifest:
    """The validated JSON side of an artifact (no tensors loaded)."""

    directory: Path
    config: dict[str, Any]
    model: ModelConfig
    quant: QuantConfig
    schema: TransformSchema

    @property
    def weights_path(self) -> Path:
        return self.directory / "model.safetensors"

    @property
    def biases(self) -> dict[str, bool]:
        return self.config["biases"]

    @property
    def weight_bits(self) -> dict[str, int]:
        return self.config["weight_bits"]


def read_manifest(directory: str | Path) -> Manifest:
    """Validate an artifact directory's format version, config and transform schema."""
    directory = Path(directory)
    if not is_artifact(directory):
        raise UserError(f"{directory} is not a quantized artifact (no config.json/model.safetensors)",
                        FIX_NOT_ARTIFACT)
    config = _read_json(directory / "config.json")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{directory} has format {config.get('format')} v{config.get('format_version')}",
                        f"this build reads {FORMAT} v{FORMAT_VERSION}; re-run quantize")
    numerics = config.get("quant", {}).get("numerics", DEFAULT_NUMERICS)
    if numerics not in PROFILES:
        raise UserError(f"{directory} was written with numerics profile {numerics!r}, unknown to this build",
                        f"use a build that knows it, or re-run quantize (profiles: {', '.join(PROFILES)})")
    try:
        schema = TransformSchema.from_dict(_read_json(directory / "transforms.json"))
        return Manifest(directory, config, ModelConfig.from_dict(config["model"]),
                        QuantConfig.from_dict(config["quant"]), schema)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"corrupt artifact {directory}: {err}", "re-run quantize with this version") from err


def require_exportable(manifest: Manifest) -> None:
    """Refuse (one line) an artifact whose numerics profile has no ONNX mapping."""
    if not manifest.quant.profile.exportable:
        raise UserError(f"{manifest.directory} uses --numerics {manifest.quant.numerics}, which ONNX export does not "
                        "implement (5-bit signed weight codes, float16 per-head o_proj quantizer with zero points "
                        "outside [0, 15], float16 rounding points)", "re-quantize with --numerics infoquant-export "
                        "to export; evaluate this artifact with `infoquant-export eval`")


def load_artifact(directory: str | Path, device: str = "cpu", with_tokenizer: bool = True) -> Artifact:
    """Rebuild the fake-quant model of an artifact directory."""
    manifest = read_manifest(directory)
    directory, config, cfg, quant, schema = (manifest.directory, manifest.config, manifest.model, manifest.quant,
                                             manifest.schema)
    try:
        tensors = load_file(str(manifest.weights_path))
    except (OSError, ValueError) as err:
        raise UserError(f"corrupt artifact {directory}: {err}", "re-run quantize") from err
    missing = [k for k in expected_tensor_keys(manifest) if k not in tensors]
    if missing:
        raise UserError(f"artifact {directory} lacks tensor {missing[0]!r} ({len(missing)} missing)",
                        "re-run quantize; the weights file is incomplete")
    biases = config["biases"]
    model = CausalLM(cfg, tensors["inv_freq"], qkv_bias=biases["q"], o_bias=biases["o"], mlp_bias=biases["down"])
    weights: dict[str, QuantizedWeight] = {}
    with torch.no_grad():
        model.embed.weight.copy_(tensors["embed.weight"])
        model.lm_head.weight.copy_(tensors["lm_head.weight"])
        model.norm.copy_(tensors["norm"])
        for i, layer in enumerate(model.layers):
            layer.input_norm.copy_(tensors[f"layers.{i}.input_norm"])
            layer.post_norm.copy_(tensors[f"layers.{i}.post_norm"])
            for role in LINEAR_ROLES:
                key, linear = f"layers.{i}.{role}", layer.linear(role)
                if f"{key}.qweight" in tensors:
                    bits = config["weight_bits"][key]
                    codes = tensors[f"{key}.qweight"]
                    codes = unpack_int4(codes) if bits == 4 else codes
                    weights[key] = QuantizedWeight(codes, tensors[f"{key}.scale"], bits)
                    linear.weight.copy_(weights[key].dequantize())
                else:
                    linear.weight.copy_(tensors[f"{key}.weight"])
                if linear.bias is not None:
                    linear.bias.copy_(tensors[f"{key}.bias"])
    configure_activation_quant(model, quant)
    if quant.has_clips:
        for i, layer in enumerate(model.layers):
            for site in activation_sites(quant.profile):
                getattr(layer, site).set_clips(tensors[f"layers.{i}.{site}.clip"])
    attach_integer_weights(model, weights)
    attach_online_ops(model, schema, {k: tensors[k] for k in schema.matrix_keys(cfg.num_layers)})
    tokenizer = None
    if with_tokenizer and (directory / "tokenizer").is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory / "tokenizer"))
    return Artifact(model.to(device).eval(), tokenizer, quant, schema, config.get("source", {}), weights)


def expected_tensor_keys(manifest: Manifest) -> list[str]:
    """Every tensor key the artifact's config promises."""
    keys = ["embed.weight", "lm_head.weight", "norm", "inv_freq"]
    keys += manifest.schema.matrix_keys(manifest.model.num_layers)
    for i in range(manifest.model.num_layers):
        keys += [f"layers.{i}.input_norm", f"layers.{i}.post_norm"]
        if manifest.quant.has_clips:
            keys += [f"layers.{i}.{site}.clip" for site in activation_sites(manifest.quant.profile)]
        for role in LINEAR_ROLES:
            key = f"layers.{i}.{role}"
            keys += [f"{key}.qweight", f"{key}.scale"] if key in manifest.weight_bits else [f"{key}.weight"]
            if manifest.biases[role]:
                keys.append(f"{key}.bias")
    return keys

