"""Apply a transform schema to a canonical model: RMSNorm fusion, offline folds (float64) and online ops.

Folding follows the layout in ``docs/numerics.md`` section 1 (row-vector activations, ``y = x @ W^T``):
input side ``W <- W @ R``; output side ``W <- R^T @ W`` and ``b <- b @ R``; the embedding rows ``E <- E @ R``.
Every product is computed in float64 from the current float32 weights and cast back once.
"""

from __future__ import annotations

import torch

from infoquant_export.models.model import CausalLM, DecoderLayer, OnlineRotation
from infoquant_export.transforms.hadamard import block_hadamard_matrix, hadamard_matrix, randomized_hadamard_matrix
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


def psot_schema(hidden: int, head_dim: int, intermediate: int, num_blocks: int = 1) -> TransformSchema:
    """InfoQuant's rotations: learned per-layer residual bases Q1 (attention) / Q4 (MLP) with online block-diagonal
    basis changes between them, learned per-KV-head Q2 on V/o_proj, a block-Hadamard final basis, and the same
    online q/k and down_proj Hadamards as :func:`hadamard_schema`. Matrices come from PSOT or an import."""
    return TransformSchema(fused_norms=True, rotations=[
        Rotation("Q1", "learned", hidden, "residual_attn", "offline", num_blocks=num_blocks, matrix="psot.Q1",
                 folds=[Fold("embed", "output"), *(Fold(r, "input") for r in ("q", "k", "v")),
                        Fold("down", "output")]),
        Rotation("Q4", "learned", hidden, "residual_mlp", "offline", num_blocks=num_blocks, matrix="psot.Q4",
                 folds=[Fold("o", "output"), Fold("gate", "input"), Fold("up", "input")]),
        Rotation("final", "hadamard", hidden, "residual_final", "offline", num_blocks=num_blocks,
                 folds=[Fold("down", "output"), Fold("lm_head", "input")]),
        Rotation("Q2", "learned", head_dim, "attention_value", "offline", matrix="psot.Q2",
                 folds=[Fold("v", "output"), Fold("o", "input")]),
        Rotation("R3", "hadamard", head_dim, "qk_post_rope", "online"),
        Rotation("R4", "hadamard", intermediate, "down_proj_input", "online", folds=[Fold("down", "input")]),
        Rotation("attn_to_mlp", "learned", hidden, "residual_attn_to_mlp", "online", num_blocks=num_blocks,
                 matrix="psot.attn_to_mlp"),
        Rotation("mlp_to_attn", "learned", hidden, "residual_mlp_to_attn", "online", num_blocks=num_blocks,
                 matrix="psot.mlp_to_attn"),
    ])


def psot_matrices(q1: list[torch.Tensor], q2: list[torch.Tensor], q4: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learned tensors of :func:`psot_schema` (float32), including the derived online basis changes
    ``Q1_l,b^T Q4_l,b`` and ``Q4_l,b^T Q1_{l+1},b`` (last layer: the schema's block-Hadamard final basis),
    computed in float64.

    Transposes are used as inverses, as the reference does (imported matrices are only nearly orthogonal)."""
    out: dict[str, torch.Tensor] = {}
    num_layers = len(q1)
    final_block = hadamard_matrix(q1[0].shape[-1], torch.float64)
    for i in range(num_layers):
        a, m = q1[i].double(), q4[i].double()
        nxt = q1[i + 1].double() if i + 1 < num_layers else final_block.expand_as(m)
        out[f"psot.Q1.{i}"], out[f"psot.Q2.{i}"], out[f"psot.Q4.{i}"] = q1[i].float(), q2[i].float(), q4[i].float()
        out[f"psot.attn_to_mlp.{i}"] = (a.transpose(-1, -2) @ m).float()
        out[f"psot.mlp_to_attn.{i}"] = (m.transpose(-1, -2) @ nxt).float()
    return {k: v.contiguous() for k, v in out.items()}


def rotation_blocks(rotation: Rotation, layer: int | None = None,
                    matrices: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The blocks [num_blocks, n, n] (float64) of ``rotation`` (at ``layer`` for learned ones)."""
    if rotation.kind == "learned":
        key = f"{rotation.matrix}.{layer}"
        if matrices is None or key not in matrices:
            raise KeyError(f"rotation {rotation.name}: learned matrix {key} is missing")
        return matrices[key].double()
    dense, n = rotation_matrix(rotation), rotation.block_size
    return torch.stack([dense[b * n:(b + 1) * n, b * n:(b + 1) * n] for b in range(rotation.num_blocks)])


def rotation_matrix(rotation: Rotation, layer: int | None = None,
                    matrices: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The dense float64 matrix of a rotation (block-diagonal when ``num_blocks > 1``)."""
    if rotation.kind == "hadamard":
        return block_hadamard_matrix(rotation.size, rotation.num_blocks, dtype=torch.float64)
    if rotation.kind == "randomized_hadamard":
        return randomized_hadamard_matrix(rotation.size, rotation.seed, rotation.num_blocks, dtype=torch.float64)
    if rotation.kind == "identity":
        return torch.eye(rotation.size, dtype=torch.float64)
    return torch.block_diag(*rotation_blocks(rotation, layer, matrices))


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


@torch.no_grad()
def center_embedding(model: CausalLM) -> None:
    """Mean-centre every embedding row over the hidden dim (float64, cast once): the QuaRot/InfoQuant step that the
    infoquant-reference profile reproduces. It changes an RMSNorm model's function."""
    e = model.embed.weight.double()
    model.embed.weight.copy_(e - e.mean(dim=-1, keepdim=True))


@torch.no_grad()
def round_weights(model: CausalLM, dtype: torch.dtype = torch.float16) -> None:
    """Round every float weight (linears, embedding, LM head, norms) to ``dtype`` values, kept in float32 (the
    reference stores its model in float16 after loading, fusion and every fold)."""
    for p in model.parameters():
        p.copy_(p.to(dtype).to(p.dtype))


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
    """Fold per-head rotations ``r`` [heads, d, d] into V's output rows (side ``output``) or o_proj's input columns
    (side ``input``)."""
    w = linear.weight
    if side == "output":
        heads = w.double().reshape(-1, head_dim, w.shape[1])
        w.copy_((r.transpose(-1, -2) @ heads).reshape(w.shape))
        if linear.bias is not None:
            b = linear.bias.double().reshape(-1, 1, head_dim)
            linear.bias.copy_((b @ r).reshape(-1))
    else:
        heads = w.double().reshape(w.shape[0], -1, head_dim).transpose(0, 1)  # [heads, out, d]
        w.copy_((heads @ r).transpose(0, 1).reshape(w.shape))


def _fold_targets(model: CausalLM, rotation: Rotation, fold: Fold, layer: int | None) -> list[torch.nn.Module]:
    """The modules that absorb ``fold`` of ``rotation`` (its layer-``layer`` instance; None = a global rotation)."""
    if fold.role == "lm_head":
        return [model.lm_head]
    if fold.role == "embed":
        return [model.embed] if layer in (None, 0) else []
    if rotation.site == "residual_final":
        return [model.layers[-1].linear(fold.role)]
    if layer is None:
        return [lay.linear(fold.role) for lay in model.layers]
    if rotation.site == "residual_attn" and fold.role == "down":  # the writer of layer l's stream is layer l-1
        return [model.layers[layer - 1].down] if layer > 0 else []
    return [model.layers[layer].linear(fold.role)]


def _per_layer(rotation: Rotation) -> bool:
    return rotation.kind == "learned" or rotation.site not in ("residual", "residual_final")


@torch.no_grad()
def fold_rotation(model: CausalLM, rotation: Rotation, matrices: dict[str, torch.Tensor] | None = None) -> None:
    """Fold one rotation into the weights its schema entry lists (each layer's instance for per-layer sites)."""
    cfg = model.cfg
    for layer in range(len(model.layers)) if _per_layer(rotation) else [None]:
        if layer is not None and rotation.layers is not None and layer not in rotation.layers:
            continue
        if rotation.site == "attention_value":
            blocks = rotation_blocks(rotation, layer, matrices)
            if rotation.kind != "learned":
                blocks = blocks.expand(cfg.num_kv_heads, -1, -1)
            for fold in rotation.folds:
                per_head = blocks if fold.role == "v" else blocks.repeat_interleave(
                    cfg.num_heads // cfg.num_kv_heads, dim=0)
                _fold_per_head(model.layers[layer].linear(fold.role), per_head, fold.side, cfg.head_dim)
            continue
        r = rotation_matrix(rotation, layer, matrices)
        for fold in rotation.folds:
            for target in _fold_targets(model, rotation, fold, layer):
                if isinstance(target, torch.nn.Embedding):
                    target.weight.copy_(target.weight.double() @ r)
                else:
                    _fold_linear(target, r, fold.side)


def attach_online(model: CausalLM, rotation: Rotation, matrices: dict[str, torch.Tensor] | None = None) -> None:
    """Install the runtime op of an online rotation at its site."""
    for i, layer in enumerate(model.layers):
        if rotation.layers is not None and i not in rotation.layers:
            continue
        if rotation.kind == "hadamard":
            op = OnlineRotation(rotation.num_blocks)
        else:
            op = OnlineRotation(rotation.num_blocks, rotation_blocks(rotation, i, matrices).float())
        attribute = ONLINE_ATTRIBUTES.get(rotation.site, rotation.site)
        setattr(layer, attribute, op.to(model.device))


def apply_transforms(model: CausalLM, schema: TransformSchema, matrices: dict[str, torch.Tensor] | None = None,
                     fuse: bool = True, round_to: torch.dtype | None = None) -> CausalLM:
    """Apply ``schema`` in place: fuse norms (unless already done), fold offline rotations and folds of online ones,
    attach online ops. ``matrices`` holds the learned ones (``{matrix}.{layer}``). ``round_to`` (infoquant-reference:
    float16) rounds the weights after the fusion and after each rotation's folds."""
    for rotation in schema.rotations:
        rotation.validate()
    if schema.fused_norms and fuse:
        fuse_norms(model)
        if round_to is not None:
            round_weights(model, round_to)
    for rotation in schema.rotations:
        fold_rotation(model, rotation, matrices)
        if round_to is not None:
            round_weights(model, round_to)
        if rotation.mode == "online":
            attach_online(model, rotation, matrices)
    return model


def attach_online_ops(model: CausalLM, schema: TransformSchema,
                      matrices: dict[str, torch.Tensor] | None = None) -> CausalLM:
    """Only install the online ops (for a model whose weights already carry the folds, e.g. a loaded artifact)."""
    for rotation in schema.online():
        attach_online(model, rotation, matrices)
    return model
