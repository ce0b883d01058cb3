"""Quantization configuration: what the user asked for, validated once, saved with every artifact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from infoquant_export.errors import UserError
from infoquant_export.numerics import DEFAULT as DEFAULT_NUMERICS
from infoquant_export.numerics import NumericsProfile, get_profile

VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
ROTATIONS = ("none", "hadamard", "psot")  # or "infoquant:DIR" (import the reference code's rotation files)
IMPORT_PREFIX = "infoquant:"
PRESETS = ("reference", "cpu")
WEIGHT_METHODS = ("rtn", "gptq")


@dataclass
class CalibrationConfig:
    """Token windows used for GPTQ Hessians."""

    corpus: str = "default"
    num_windows: int = 64
    seq_len: int = 512
    seed: int = 0


@dataclass
class PsotConfig:
    """PSOT hyper-parameters; defaults are the InfoQuant reference's (``scripts/get_matrix.sh``)."""

    num_windows: int = 128
    seq_len: int = 2048
    epochs: int = 15
    lr: float = 2.0  # the same for the three stages (Q1, Q2, Q4)
    lr_end_factor: float = 0.01  # linear decay of the lr over the epochs
    batch_size: int = 4  # windows per Cayley step
    temperature: float = 2.0
    aug_weight: float = 30.0  # cost weight of outlier tokens
    aug_start: int = 2  # layers below this weight every token as an outlier
    eta_m: int = 10  # samples used to choose the outlier threshold
    k_max: int = 50
    k_tol: float = 0.02
    max_outlier_fraction: float = 0.4
    rotation_mean: bool = True  # mean-centre each block / head before the cost
    cayley: str = "exact"  # exact | iterative (the reference's 5 fixed-point iterations)
    memory_budget_mb: float = 4096  # captured activations above this spill to memory-mapped files


@dataclass
class LacConfig:
    """Learned activation clipping; defaults are the reference's (``scripts/eval_lac.sh``)."""

    enabled: bool = False
    num_windows: int | None = None  # first N calibration windows (None = all)
    epochs: int = 5
    lr: float = 0.05
    weight_decay: float = 0.01
    batch_size: int = 4
    warmup_steps: int = 16
    min_lr_ratio: float = 1e-3


PRESET_VALUES: dict[str, dict[str, Any]] = {
    # the reference's settings: 128 windows of 2048 tokens everywhere (a GPU job)
    "reference": {"calibration": {"num_windows": 128, "seq_len": 2048}, "psot": {}, "lac": {}},
    # practical on a 2-core CPU for a ~100M-parameter model (see BENCHMARKS.md)
    "cpu": {"calibration": {"num_windows": 64, "seq_len": 512},
            "psot": {"num_windows": 32, "seq_len": 512},
            "lac": {"num_windows": 32, "epochs": 4, "batch_size": 2, "warmup_steps": 4}},
}


@dataclass
class QuantConfig:
    """W/A/KV bit widths and how weights and activations are quantized (see docs/numerics.md)."""

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int = 4
    weights: str = "gptq"  # rtn | gptq
    rotation: str = "hadamard"  # none | hadamard | psot | infoquant:DIR
    rotation_blocks: int = 1  # block-diagonal split of the residual-stream rotation (1 = full)
    rotation_seed: int = 0
    w_clip_search: bool = True  # per-channel MSE clip search for weight scales
    a_clip_ratio: float = 0.9
    kv_clip_ratio: float = 0.95
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    numerics: str = DEFAULT_NUMERICS  # infoquant-export | infoquant-reference (see infoquant_export/numerics.py)
    clips_from: str | None = None  # activation clips imported from the reference's clip_parameters.pth (this path)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    psot: PsotConfig = field(default_factory=PsotConfig)
    lac: LacConfig = field(default_factory=LacConfig)

    @property
    def profile(self) -> NumericsProfile:
        return get_profile(self.numerics)

    @property
    def has_clips(self) -> bool:
        """Per-quantizer clip factors are stored in the artifact (learned by LAC or imported)."""
        return self.lac.enabled or self.clips_from is not None

    @property
    def learned_rotation(self) -> bool:
        return self.rotation == "psot" or self.rotation.startswith(IMPORT_PREFIX)

    def validate(self) -> QuantConfig:
        for name in ("w_bits", "a_bits", "kv_bits"):
            value = getattr(self, name)
            if value not in VALID_BITS:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"invalid {flag} {value}", f"use one of {', '.join(map(str, VALID_BITS))} (16 = off)")
        if self.weights not in WEIGHT_METHODS:
            raise UserError(f"invalid --weights {self.weights!r}", f"use one of {', '.join(WEIGHT_METHODS)}")
        if self.rotation not in ROTATIONS and not (self.rotation.startswith(IMPORT_PREFIX)
                                                   and len(self.rotation) > len(IMPORT_PREFIX)):
            raise UserError(f"invalid --rotation {self.rotation!r}",
                            f"use one of {', '.join(ROTATIONS)} or infoquant:DIR")
        if self.psot.cayley not in ("exact", "iterative"):
            raise UserError(f"invalid PSOT cayley mode {self.psot.cayley!r}", "use exact or iterative")
        for name in ("num_windows", "seq_len", "epochs", "batch_size", "eta_m", "k_max"):
            if getattr(self.psot, name) < 1:
                raise UserError(f"invalid --psot-{name.replace('_', '-')} {getattr(self.psot, name)}",
                                "use a positive integer")
        for name in ("epochs", "batch_size"):
            if getattr(self.lac, name) < 1:
                raise UserError(f"invalid --lac-{name.replace('_', '-')} {getattr(self.lac, name)}",
                                "use a positive integer")
        if self.lac.enabled and self.a_bits >= 16:
            raise UserError("--lac learns activation clipping but --a-bits is 16", "drop --lac or quantize activations")
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise UserError(f"invalid --{name.replace('_', '-')} {value}", "use a value in (0, 1]")
        if self.profile.weight_grid == "reference" and 7 < self.w_bits < 16:
            raise UserError(f"--numerics {self.numerics} stores weight codes in [-2^b, 2^b - 1] as int8, which "
                            f"--w-bits {self.w_bits} does not fit", "use --w-bits 7 or less (or 16)")
        if self.rotation_blocks < 1:
            raise UserError(f"invalid --rotation-blocks {self.rotation_blocks}", "use 1, 2 or 4")
        return self

    def label(self) -> str:
        """Short name like ``W4A4KV4-hadamard-gptq``."""
        rotation = "infoquant" if self.rotation.startswith(IMPORT_PREFIX) else self.rotation
        label = f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}-{rotation}" + ("-lac" if self.lac.enabled else "") + \
            f"-{self.weights}"
        return label if self.numerics == DEFAULT_NUMERICS else f"{label}-{self.numerics}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        data = dict(data)
        calibration = CalibrationConfig(**data.pop("calibration", {}))
        psot = PsotConfig(**data.pop("psot", {}))
        lac = LacConfig(**data.pop("lac", {}))
        return cls(**data, calibration=calibration, psot=psot, lac=lac)
