"""Declarative, versioned transform schema saved with every artifact.

Every rotation states its kind, size, block structure, where it acts and its precision. A rotation is either
``offline`` (folded into weights, nothing runs at inference) or ``online`` (a runtime op on an activation; when the
op has an inverse it is folded into the consuming weights, listed in ``folds``). Later stages (PSOT, ONNX export,
TensorRT plugins) build their nodes from this schema, never from layer names.

Sites
- ``residual``: the residual-stream basis (hidden size). Offline.
- ``attention_value``: per KV head on the V projection output and the o_proj input (head size). Offline.
- ``qk_post_rope``: q and k after RoPE, per head (head size). Online, cancels inside q.k^T, no fold.
- ``down_proj_input``: the MLP activation before down_proj (intermediate size). Online, folded into down_proj.
- ``residual_attn`` / ``residual_mlp``: per-layer residual-stream bases (PSOT's Q1 / Q4): the stream entering layer
  l's attention block is in basis ``Q1_l``, the one entering its MLP in ``Q4_l``. Offline, learned, block-diagonal.
  For ``residual_attn`` the ``down`` output fold applies to layer l-1 (the writer of that stream) and the ``embed``
  fold to layer 0 only.
- ``residual_final``: the basis after the last layer (folded into the last ``down`` output and the LM head).
- ``residual_attn_to_mlp`` / ``residual_mlp_to_attn``: basis changes of the residual stream between blocks
  (``blockdiag(Q1_l,b^T Q4_l,b)`` and ``blockdiag(Q4_l,b^T Q1_{l+1},b)``; hidden size, block-diagonal, per layer,
  learned). Online: they run at inference on the residual stream; written by the PSOT stage.

Learned matrices live in the artifact's safetensors file as ``{matrix}.{layer}`` with shape ``[num_blocks, n, n]``
(``attention_value``: one block per KV head; every query head of a GQA group uses its KV head's block).

Hadamard rotations record the order ``K`` of their block's ``kron(H_K, H_p)`` (``hadamard_k``, version 3): an
artifact whose ``K`` is not the one this build constructs for that size (versions 1-2: Paley orders only, e.g.
11008 = 344 x 32 where this build uses the Williamson 172 x 64) is refused on load, since its folded weights would
not match the online transform.

Fold sides: ``input`` means W <- W @ R (the layer consumes rotated inputs), ``output`` means W <- R^T @ W and
b <- b @ R (the layer produces rotated outputs). For ``attention_value`` both apply per head.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # version 2 added the per-layer residual sites, 3 the Hadamard blocks' K
KINDS = ("hadamard", "randomized_hadamard", "learned", "identity")
HADAMARD_KINDS = ("hadamard", "randomized_hadamard")
MODES = ("offline", "online")
SITES = {
    "residual": "offline",
    "residual_attn": "offline",
    "residual_mlp": "offline",
    "residual_final": "offline",
    "attention_value": "offline",
    "qk_post_rope": "online",
    "down_proj_input": "online",
    "residual_attn_to_mlp": "online",
    "residual_mlp_to_attn": "online",
}
ROLES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "lm_head")
SIDES = ("input", "output")


@dataclass(frozen=True)
class Fold:
    """One weight that absorbs the rotation (or the inverse of an online one)."""

    role: str
    side: str


@dataclass
class Rotation:
    """One rotation of the schema (see the module docstring for sites and sides)."""

    name: str
    kind: str
    size: int
    site: str
    mode: str
    num_blocks: int = 1
    seed: int | None = None
    folds: list[Fold] = field(default_factory=list)
    layers: list[int] | None = None  # None = every layer
    precision: str = "float32"  # dtype of the online op; offline folds are always computed in float64
    fold_precision: str = "float64"
    matrix: str | None = None  # safetensors key prefix for learned matrices (one per layer/head)
    hadamard_k: int | None = field(default=None, compare=False)  # K of kron(H_K, H_p) (written by to_dict)

    @property
    def block_size(self) -> int:
        return self.size // self.num_blocks

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rotation {self.name}: unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.site not in SITES:
            raise ValueError(f"rotation {self.name}: unknown site {self.site!r}; expected one of {tuple(SITES)}")
        if self.mode != SITES[self.site]:
            raise ValueError(f"rotation {self.name}: site {self.site} is {SITES[self.site]}, not {self.mode}")
        if self.size % self.num_blocks:
            raise ValueError(f"rotation {self.name}: size {self.size} is not divisible by {self.num_blocks} blocks")
        if self.kind == "randomized_hadamard" and self.seed is None:
            raise ValueError(f"rotation {self.name}: randomized_hadamard needs a seed")
        if self.kind == "learned" and not self.matrix:
            raise ValueError(f"rotation {self.name}: learned rotations need a matrix key")
        for fold in self.folds:
            if fold.role not in ROLES or fold.side not in SIDES:
                raise ValueError(f"rotation {self.name}: bad fold {fold}")


@dataclass
class TransformSchema:
    """The ordered list of rotations applied to a model."""

    rotations: list[Rotation] = field(default_factory=list)
    fused_norms: bool = False
    version: int = SCHEMA_VERSION

    def find(self, site: str) -> Rotation | None:
        """The rotation acting at ``site``, or None."""
        matches = [r for r in self.rotations if r.site == site]
        return matches[0] if matches else None

    def online(self) -> list[Rotation]:
        return [r for r in self.rotations if r.mode == "online"]

    def matrix_keys(self, num_layers: int) -> list[str]:
        """Safetensors keys of every learned matrix."""
        return [f"{r.matrix}.{i}" for r in self.rotations if r.kind == "learned"
                for i in range(num_layers) if r.layers is None or i in r.layers]

    def to_dict(self) -> dict[str, Any]:
        rotations = []
        for r in self.rotations:
            k = _constructed_k(r.block_size) if r.kind in HADAMARD_KINDS else None
            rotations.append(dataclasses.asdict(dataclasses.replace(r, hadamard_k=k)))
        return {"version": SCHEMA_VERSION, "fused_norms": self.fused_norms, "rotations": rotations}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformSchema:
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"transform schema version {version} is not supported (this build reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
        rotations = []
        for raw in data["rotations"]:
            raw = dict(raw)
            raw["folds"] = [Fold(**f) for f in raw.get("folds", [])]
            rotation = Rotation(**raw)
            rotation.validate()
            _check_hadamard_k(rotation, version)
            rotations.append(rotation)
        return cls(rotations=rotations, fused_norms=bool(data.get("fused_norms", False)), version=version)


def _constructed_k(n: int, williamson: bool = True) -> int | None:
    """K of this build's Hadamard of size n (``williamson=False``: the Paley-only rule of versions 1-2), or None
    when no construction exists (later stages report that)."""
    from infoquant_export.transforms.hadamard import HadamardSizeError, hadamard_factors

    try:
        return hadamard_factors(n, williamson)[0]
    except HadamardSizeError:
        return None


def _check_hadamard_k(rotation: Rotation, version: int) -> None:
    """Refuse a Hadamard rotation built with another block K than this build constructs for its size."""
    if rotation.kind not in HADAMARD_KINDS:
        return
    n = rotation.block_size
    saved = rotation.hadamard_k if version >= 3 else _constructed_k(n, williamson=False)
    now = _constructed_k(n)
    if saved is not None and saved != now:
        raise ValueError(f"rotation {rotation.name}: its Hadamard of size {n} was built with K = {saved} "
                         f"(schema v{version}), this build constructs K = {now}")
