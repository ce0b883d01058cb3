"""Quantization configuration: what the user asked for, validated once, saved with every artifact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from infoquant_export.errors import UserError

VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
ROTATIONS = ("none", "hadamard")
WEIGHT_METHODS = ("rtn", "gptq")


@dataclass
class CalibrationConfig:
    """Token windows used for GPTQ Hessians."""

    corpus: str = "default"
    num_windows: int = 64
    seq_len: int = 512
    seed: int = 0


@dataclass
class QuantConfig:
    """W/A/KV bit widths and how weights and activations are quantized (see docs/numerics.md)."""

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    weights: str = "gptq"  # rtn | gptq
    rotation: str = "hadamard"  # none | hadamard
    rotation_blocks: int = 1  # block-diagonal split of the residual-stream rotation (1 = full)
    rotation_seed: int = 0
    w_clip_search: bool = True  # per-channel MSE clip search for weight scales
    a_clip_ratio: float = 0.9
    kv_clip_ratio: float = 0.95
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def validate(self) -> QuantConfig:
        for name in ("w_bits", "a_bits", "kv_bits"):
            value = getattr(self, name)
            if value not in VALID_BITS:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"invalid {flag} {value}", f"use one of {', '.join(map(str, VALID_BITS))} (16 = off)")
        if self.weights not in WEIGHT_METHODS:
            raise UserError(f"invalid --weights {self.weights!r}", f"use one of {', '.join(WEIGHT_METHODS)}")
        if self.rotation not in ROTATIONS:
            raise UserError(f"invalid --rotation {self.rotation!r}", f"use one of {', '.join(ROTATIONS)}")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise UserError(f"invalid --{name.replace('_', '-')} {value}", "use a value in (0, 1]")
        if self.rotation_blocks < 1:
            raise UserError(f"invalid --rotation-blocks {self.rotation_blocks}", "use 1, 2 or 4")
        return self

    def label(self) -> str:
        """Short name like ``W4A4KV4-hadamard-gptq``."""
        return f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}-{self.rotation}-{self.weights}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        calibration = CalibrationConfig(**data.pop("calibration", {}))
        return cls(**data, calibration=calibration)
