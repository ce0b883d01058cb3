"""Apply a transform schema to a canonical model: RMSNorm fusion, offline folds (float64) and online ops.

Folding follows the layout in ``docs/numerics.md`` section 1 (row-vector activations, ``y = x @ W^T``):
input side ``W <- W @ R``; output side ``W <- R^T @ W`` and ``b <- b @ R``; the embedding rows ``E <- E @ R``.
Every product is computed in float64 from the current float32 weights and cast back once.
"""

from __future__ import annotations

import torch

from infoquant_export.models.model import CausalLM, DecoderLayer, OnlineRotation
from infoquant_export.transforms.hadamard import block_hadamard_matrix, randomized_hadamard_matrix
from infoquant_export.transforms.schema import Fold, Rotation, TransformSchema

RESIDUAL_INPUT_ROLES = ("q", "k", "v", "gate", "up")
RESIDUAL_OUTPUT_ROLES = ("o", "down")
ONLINE_ATTRIBUTES = {"qk_post_rope": "qk_rotation", "down_proj_input": "down_rotation"}  # DecoderLayer attributes


def hadamard_schema(hidden: int, head_dim: int, intermediate: int, num_blocks: int = 1,
                    seed: int = 0) -> TransformSchema:
    """QuaRot-style rotations: randomized Hadamard residual basis, per-head V/O Hadamard, online q/k and down
    Hadamards."""
    residual_folds = [Fold("embed", "output"), Fold("lm_head", "input")]
    residual_folds += [Fold(r, "input") for r in RESIDUAL_INPUT_ROLES]
    residual_folds += [Fold(r, "output") for r in RESIDUAL_OUTPUT_ROLES]
    return TransformSchema(fused_norms=True, rotations=[
        Rotation("R1", "randomized_hadamard", hidden, "residual", "offline", num_blocks=num_blocks, seed=seed,
                 folds=residual_folds),
        Rotation("R2", "hadamard", head_dim, "attention_value", "offline",
                 folds=[Fold("v", "output"), Fold("o", "input")]),
        Rotation("R3", "hadamard", head_dim, "qk_post_rope", "online"),
        Rotation("R4", "hadamard", intermediate, "down_proj_input", "online", folds=[Fold("down", "input")]),
    ])


def rotation_matrix(rotation: Rotation) -> torch.Tensor:
    """The dense float64 matrix of a non-learned rotation (block-diagonal when ``num_blocks > 1``)."""
    if rotation.kind == "hadamard":
        return block_hadamard_matrix(rotation.size, rotation.num_blocks, dtype=torch.float64)
    if rotation.kind == "randomized_hadamard":
        return randomized_hadamard_matrix(rotation.size, rotation.seed, rotation.num_blocks, dtype=torch.float64)
    if rotation.kind == "identity":
        return torch.eye(rotation.size, dtype=torch.float64)
    raise NotImplementedError(f"rotation {rotation.name}: learned matrices are folded by the PSOT stage")


@torch.no_grad()
def fuse_norms(model: CausalLM) -> None:
    """Fold every RMSNorm weight into the linears that consume it (float64) and set the norm weights to 1."""
    for layer in model.layers:
        _scale_inputs(layer, ("q", "k", "v"), layer.input_norm)
        _scale_inputs(layer, ("gate", "up"), layer.post_norm)
        layer.input_norm.fill_(1.0)
        layer.post_norm.fill_(1.0)
    model.lm_head.weight.copy_(model.lm_head.weight.double() * model.norm.double())
    model.norm.fill_(1.0)


def _scale_inputs(layer: DecoderLayer, roles: tuple[str, ...], gamma: torch.Tensor) -> None:
    for role in roles:
        w = layer.linear(role).weight
        w.copy_(w.double() * gamma.double())


def _fold_linear(linear: torch.nn.Linear, r: torch.Tensor, side: str) -> None:
    w = linear.weight
    if side == "input":
        w.copy_(w.double() @ r)
        return
    w.copy_(r.T @ w.double())
    if linear.bias is not None:
        linear.bias.copy_(linear.bias.double() @ r)


def _fold_per_head(linear: torch.nn.Linear, r: torch.Tensor, side: str, head_dim: int) -> None:
    """Fold a head_dim x head_dim rotation into every head: V output rows, or o_proj input columns."""
    w = linear.weight
    if side == "output":
        heads = w.double().reshape(-1, head_dim, w.shape[1])
        w.copy_((r.T @ heads).reshape(w.shape))
        if linear.bias is not None:
            linear.bias.copy_((linear.bias.double().reshape(-1, head_dim) @ r).reshape(-1))
    else:
        heads = w.double().reshape(w.shape[0], -1, head_dim)
        w.copy_((heads @ r).reshape(w.shape))


@torch.no_grad()
def fold_rotation(model: CausalLM, rotation: Rotation) -> None:
    """Fold one rotation into the weights its schema entry lists."""
    r = rotation_matrix(rotation)
    per_head = rotation.site == "attention_value"
    for fold in rotation.folds:
        if fold.role == "embed":
            model.embed.weight.copy_(model.embed.weight.double() @ r)
        elif fold.role == "lm_head":
            _fold_linear(model.lm_head, r, fold.side)
        else:
            for i, layer in enumerate(model.layers):
                if rotation.layers is not None and i not in rotation.layers:
                    continue
                if per_head:
                    _fold_per_head(layer.linear(fold.role), r, fold.side, model.cfg.head_dim)
                else:
                    _fold_linear(layer.linear(fold.role), r, fold.side)


def attach_online(model: CausalLM, rotation: Rotation) -> None:
    """Install the runtime op of an online rotation at its site."""
    for i, layer in enumerate(model.layers):
        if rotation.layers is not None and i not in rotation.layers:
            continue
        if rotation.kind == "hadamard":
            op = OnlineRotation(rotation.num_blocks)
        else:
            blocks = rotation_matrix(rotation).float()
            n = rotation.block_size
            op = OnlineRotation(rotation.num_blocks, torch.stack(
                [blocks[b * n:(b + 1) * n, b * n:(b + 1) * n] for b in range(rotation.num_blocks)]))
        attribute = ONLINE_ATTRIBUTES.get(rotation.site, rotation.site)
        setattr(layer, attribute, op.to(model.device))


def apply_transforms(model: CausalLM, schema: TransformSchema) -> CausalLM:
    """Apply ``schema`` in place: fuse norms, fold offline rotations and folds of online ones, attach online ops."""
    for rotation in schema.rotations:
        rotation.validate()
    if schema.fused_norms:
        fuse_norms(model)
    for rotation in schema.rotations:
        fold_rotation(model, rotation)
        if rotation.mode == "online":
            attach_online(model, rotation)
    return model


def attach_online_ops(model: CausalLM, schema: TransformSchema) -> CausalLM:
    """Only install the online ops (for a model whose weights already carry the folds, e.g. a loaded artifact)."""
    for rotation in schema.online():
        attach_online(model, rotation)
    return model
