"""Safe loading and validation of the rotation and clip files written by the InfoQuant reference code.

Formats (LLIKKE/InfoQuant):

* PSOT writes one file per decoder layer, ``{exp_dir}/Q/{model_name}_layer_{i}_Q.pth``, holding
  ``{"Q1": ParameterList[nb x (d, d)], "Q2": ParameterList[kv_heads x (head_dim, head_dim)],
  "Q4": ParameterList[nb x (d, d)]}`` (``hidden = nb * d``; one ``hidden x hidden`` block when the reference ran
  with ``block_diag < 0``). The entries are float32 ``nn.Parameter`` with ``requires_grad=True``, saved on
  ``cuda:0``. ``model_name`` is the basename of the reference's model path, so it is inferred from the file names.
* LAC writes ``{exp_dir}/clip_parameters.pth`` = ``{layer (int): OrderedDict{name: fp16 (or bf16) tensor}}`` with
  names relative to the decoder layer (see :func:`clip_parameter_shapes`). The values are logits ``c``; the reference
  applies ``alpha = 0.5 * (1 + sigmoid(c))`` in float16 (:func:`reference_clip_factor`).

Why loading is safe: the files are pickles of module objects (``nn.ParameterList``), which the reference reads with
``torch.load(weights_only=False)``, i.e. by executing whatever the pickle says. Here a file must be a torch zip
archive (anything else is refused before unpickling); its ``data.pkl`` is first disassembled statically with
``pickletools`` (which executes nothing) and every global it names must be on :data:`ALLOWED_GLOBALS`; only then is it
read with ``torch.load(weights_only=True, map_location="cpu")``, whose restricted unpickler additionally allows just
``nn.ParameterList`` (plus torch's tensor defaults). No tensor is ever created on a GPU.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from infoquant_export.errors import UserError

# Every global a PSOT/LAC file may name: ParameterList, Parameter and the minimal set unpickling them needs.
ALLOWED_GLOBALS = frozenset({
    "torch.nn.modules.container.ParameterList",  # the Q1/Q2/Q4 containers
    "torch.nn.parameter.Parameter",
    "torch._utils._rebuild_parameter",  # nn.Parameter.__reduce_ex__ (no extra state)
    "torch._utils._rebuild_parameter_with_state",  # nn.Parameter.__reduce_ex__ (with extra state)
    "torch._utils._rebuild_tensor_v2",  # plain dense tensors
    "collections.OrderedDict",  # Module._parameters / hooks dicts, LAC per-layer dicts, Parameter hooks
    "builtins.set",  # Module._non_persistent_buffers_set
    "torch.FloatStorage", "torch.HalfStorage", "torch.BFloat16Storage", "torch.DoubleStorage",  # dtype tags only
})
Q_FILE_PATTERN = re.compile(r"^(?P<model>.*)_layer_(?P<layer>\d+)_Q\.pth$")
Q_KEYS = ("Q1", "Q2", "Q4")
CLIP_FILE = "clip_parameters.pth"


@dataclass
class ReferenceRotations:
    """Validated reference PSOT rotations (float32, CPU) and optional LAC clip logits."""

    model_name: str
    q1: list[torch.Tensor]  # per layer: [nb, d, d] float32
    q2: list[torch.Tensor]  # per layer: [kv_heads, head_dim, head_dim] float32
    q4: list[torch.Tensor]  # per layer: [nb, d, d] float32
    clips: dict[int, dict[str, torch.Tensor]] | None  # clip_parameters.pth logits as float32 (None when absent)

    @property
    def num_blocks(self) -> int:
        """Number of diagonal blocks of Q1/Q4 (``hidden = num_blocks * d``)."""
        return int(self.q1[0].shape[0])


def reference_clip_factor(logit: torch.Tensor) -> torch.Tensor:
    """alpha = 0.5 * fp16(1 + fp16(sigmoid(fp16(c)))) as float32, exactly as the reference rounds it."""
    s = torch.sigmoid(logit.to(torch.float16))
    t = torch.ones((), dtype=torch.float16) + s  # float16 add, rounded to float16
    return 0.5 * t.to(torch.float32)


def clip_parameter_shapes(num_heads: int, num_kv_heads: int) -> dict[str, tuple[int, ...]]:
    """Allowed LAC clip names (relative to the decoder layer) and their shapes."""
    quantizers = {f"self_attn.{p}_proj.quantizer": (1,) for p in ("q", "k", "v")}
    quantizers["self_attn.v_proj.out_quantizer"] = (num_kv_heads, 1)  # unused by the reference
    quantizers["self_attn.o_proj.quantizer"] = (num_heads, 1)
    quantizers.update({f"mlp.{p}_proj.quantizer": (1,) for p in ("gate", "up", "down")})
    return {f"{q}.clip_factor_a_{end}": shape for q, shape in quantizers.items() for end in ("max", "min")}


def _pickle_globals(data: bytes, path: Path) -> list[str]:
    """Globals named by a pickle, found by disassembly only (nothing is executed)."""
    names: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                module = "builtins" if module == "__builtin__" else module
                names.append(f"{module}.{name}")
            elif op.name == "STACK_GLOBAL":
                names.append("<STACK_GLOBAL: name computed at load time>")
    except Exception as err:  # malformed opcode stream
        raise UserError(f"{path}: data.pkl is not a valid pickle ({err})",
                        "the file is corrupt or truncated; copy it again from the reference run") from err
    return names


def _torch_load_reason(err: Exception) -> str:
    """The specific reason from a torch.load error, without torch's advice to retry with weights_only=False."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    reason = next((line for line in lines if "GLOBAL" in line or "WeightsUnpickler error" in line), lines[0])
    reason = reason.split("WeightsUnpickler error:", 1)[-1].split(" Please use ", 1)[0]
    reason = reason.split("(Could this error message be improved?", 1)[0].strip()
    return reason[:300]


def safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True, map_location='cpu', and an explicit allow-list (nn.ParameterList,
    nn.Parameter, and only the minimal extra globals unpickling a ParameterList needs). Anything else -> UserError."""
    path = Path(path)
    fix_regen = "regenerate it with the InfoQuant reference code (torch.save)"
    if not path.is_file():
        raise UserError(f"{path}: file not found", "check the path")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a torch zip archive (or truncated); it was not unpickled", fix_regen)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            bad_member = archive.testzip()  # CRC of every member: torch.load itself does not check storage bytes
            data = archive.read(pickles[0]) if len(pickles) == 1 else b""
    except Exception as err:  # bad CRC, truncated member, unsupported compression
        raise UserError(f"{path}: unreadable zip archive ({err})",
                        f"the file is corrupt or truncated; {fix_regen}") from err
    if bad_member is not None:
        raise UserError(f"{path}: member {bad_member} fails its CRC check", f"the file is corrupt; {fix_regen}")
    if len(pickles) != 1:
        raise UserError(f"{path}: zip archive without exactly one <name>/data.pkl (found {len(pickles)})",
                        f"this is not a torch.save file; {fix_regen}")
    disallowed = sorted(set(_pickle_globals(data, path)) - ALLOWED_GLOBALS)
    if disallowed:
        raise UserError(f"{path}: the pickle references disallowed global {disallowed[0]!r}"
                        + (f" (and {len(disallowed) - 1} more)" if len(disallowed) > 1 else "")
                        + "; it was not executed (file refused before unpickling)",
                        f"only ParameterList/Parameter/tensor files are accepted; {fix_regen}")
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is not None:
            with safe_globals([nn.ParameterList]):
                return torch.load(path, map_location="cpu", weights_only=True)
        torch.serialization.add_safe_globals([nn.ParameterList])  # torch < 2.5
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # restricted unpickler refusal, truncated records, bad storages
        detail = _torch_load_reason(err)
        raise UserError(f"{path}: torch.load(weights_only=True) refused or failed: {detail}",
                        f"nothing unsafe was executed; {fix_regen}") from err


def resolve_dirs(directory: str | Path) -> tuple[Path, Path]:
    """(directory holding the Q files, exp dir where clip_parameters.pth may live)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"reference rotation directory {directory} does not exist or is not a directory",
                        "pass the InfoQuant exp dir (containing Q/) or its Q/ directory")
    if (directory / "Q").is_dir():
        return directory / "Q", directory
    return directory, directory.parent if directory.name == "Q" else directory


def _find_q_files(q_dir: Path, num_layers: int) -> tuple[str, list[Path]]:
    """The consistent model-name prefix and the per-layer Q file paths, in layer order."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(q_dir.iterdir()):
        match = Q_FILE_PATTERN.match(path.name)
        if match and path.is_file():
            layer = int(match["layer"])
            per_model = found.setdefault(match["model"], {})
            if layer in per_model:
                raise UserError(f"{q_dir}: two files for layer {layer}: {per_model[layer].name}, {path.name}",
                                "keep one file per layer")
            per_model[layer] = path
    if not found:
        raise UserError(f"{q_dir}: no *_layer_<i>_Q.pth files", "pass the InfoQuant exp dir (containing Q/)")
    if len(found) > 1:
        raise UserError(f"{q_dir}: Q files of several models (prefixes {sorted(found)})",
                        "keep only one model's *_layer_<i>_Q.pth files in the directory")
    (model_name, files), = found.items()
    n_files = max(files) + 1
    if n_files > num_layers:
        raise UserError(f"rotation files for another model: {q_dir} has files up to layer {n_files - 1} "
                        f"({n_files} layers) but the model has {num_layers} layers",
                        "use the rotations trained for this model")
    missing = [i for i in range(num_layers) if i not in files]
    if missing:
        raise UserError(f"{q_dir}: missing {model_name}_layer_{missing[0]}_Q.pth ({len(missing)} of {num_layers} "
                        f"layers missing, first: layer {missing[0]})",
                        "copy all layer files of the reference run (did PSOT finish?)")
    return model_name, [files[i] for i in range(num_layers)]


def _stack_blocks(value: Any, where: str) -> torch.Tensor:
    """A ParameterList (or list/tuple of tensors, or a 3-D tensor) as a contiguous [n, d, d] float32 CPU tensor."""
    if isinstance(value, nn.ParameterList):  # read _parameters directly: robust to ParameterList versions
        params = value.__dict__.get("_parameters")
        if not isinstance(params, Mapping) or not all(str(k).isdigit() for k in params):
            raise UserError(f"{where} is a malformed ParameterList", "use the *_Q.pth files written by the reference")
        items = [params[k] for k in sorted(params, key=int)]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, torch.Tensor) and value.dim() == 3:
        items = list(value.unbind(0))
    else:
        raise UserError(f"{where} is a {type(value).__name__}, expected an nn.ParameterList of square matrices",
                        "use the *_Q.pth files written by the reference PSOT stage")
    if not items:
        raise UserError(f"{where} is empty", "use the *_Q.pth files written by the reference PSOT stage")
    for b, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or not item.is_floating_point():
            kind = f"{item.dtype} tensor" if isinstance(item, torch.Tensor) else type(item).__name__
            raise UserError(f"{where} block {b} is a {kind}, expected a floating-point matrix",
                            "use the *_Q.pth files written by the reference PSOT stage")
        if item.dim() != 2 or item.shape[0] != item.shape[1] or item.shape != items[0].shape:
            raise UserError(f"{where} block {b} has shape {tuple(item.shape)}, expected square blocks of one size "
                            f"(block 0: {tuple(items[0].shape)})", "use the *_Q.pth files written by the reference")
    return torch.stack([item.detach().to("cpu", torch.float32) for item in items]).contiguous()


def _check_finite_orthogonal(q: torch.Tensor, where: str, tol: float) -> None:
    """Refuse NaN/Inf and blocks with max |Q^T Q - I| > tol (float32 product, float64 recheck on failure)."""
    bad = ~torch.isfinite(q)
    if bad.any():
        block = int(bad.flatten(1).any(1).nonzero()[0])
        raise UserError(f"{where} block {block} has {int(bad[block].sum())} NaN/Inf entries",
                        "the PSOT run diverged; retrain the rotations")
    eye = torch.eye(q.shape[-1], dtype=torch.float32)
    errors = (q.mT @ q - eye).abs().amax(dim=(-2, -1))
    for block in (errors > tol).nonzero().flatten().tolist():
        qd = q[block].double()
        err = float((qd.T @ qd - torch.eye(q.shape[-1], dtype=torch.float64)).abs().max())
        if err > tol:
            raise UserError(f"{where} block {block} is not orthogonal: max |Q^T Q - I| = {err:.3g} > tolerance "
                            f"{tol:g}", "check the file, or raise orthogonality_tol if the reference run is trusted")


def _load_layer(path: Path, layer: int, *, hidden_size: int, num_kv_heads: int, head_dim: int,
                tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q1, Q2, Q4 of one layer file, shape-checked against the model, finite and orthogonal."""
    obj = safe_torch_load(path)
    fix = "use the *_Q.pth files written by the reference PSOT stage"
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} (layer {layer}) holds a {type(obj).__name__}, expected a dict with Q1, Q2, Q4", fix)
    missing = [k for k in Q_KEYS if k not in obj]
    extra = sorted(str(k) for k in obj if k not in Q_KEYS)
    if missing or extra:
        raise UserError(f"{path} (layer {layer}): keys {sorted(map(str, obj))}, expected exactly {list(Q_KEYS)} "
                        f"(missing {missing}, unexpected {extra})", fix)
    q1, q2, q4 = (_stack_blocks(obj[k], f"{path.name} layer {layer} {k}") for k in Q_KEYS)
    for key, q in (("Q1", q1), ("Q4", q4)):
        nb, d = int(q.shape[0]), int(q.shape[-1])
        if nb * d != hidden_size:
            raise UserError(f"{path.name} layer {layer} {key}: {nb} blocks of {d}x{d} cover {nb * d} dims but the "
                            f"model's hidden size is {hidden_size}", "use the rotations trained for this model")
    if q1.shape != q4.shape:
        raise UserError(f"{path.name} layer {layer}: Q1 has {q1.shape[0]} blocks of {q1.shape[-1]} but Q4 has "
                        f"{q4.shape[0]} blocks of {q4.shape[-1]}", fix)
    if q2.shape[0] != num_kv_heads or q2.shape[-1] != head_dim:
        raise UserError(f"{path.name} layer {layer} Q2: {q2.shape[0]} blocks of {q2.shape[-1]}x{q2.shape[-1]}, "
                        f"expected {num_kv_heads} KV heads of head_dim {head_dim}",
                        "use the rotations trained for this model")
    for key, q in zip(Q_KEYS, (q1, q2, q4), strict=True):
        _check_finite_orthogonal(q, f"{path.name} layer {layer} {key}", tol)
    return q1, q2, q4


def _load_clips(path: Path, *, num_layers: int, num_heads: int,
                num_kv_heads: int) -> dict[int, dict[str, torch.Tensor]]:
    """clip_parameters.pth as {layer: {name: float32 logits}}, names/shapes/values checked."""
    obj = safe_torch_load(path)
    fix = "use the clip_parameters.pth written by the reference LAC stage for this model"
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{path}: expected a non-empty dict {{layer: {{name: tensor}}}}, got "
                        f"{type(obj).__name__}{' (empty)' if isinstance(obj, Mapping) else ''}", fix)
    shapes = clip_parameter_shapes(num_heads, num_kv_heads)
    clips: dict[int, dict[str, torch.Tensor]] = {}
    for layer, entries in obj.items():
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise UserError(f"{path}: layer key {layer!r} is a {type(layer).__name__}, expected an int", fix)
        if not 0 <= layer < num_layers:
            raise UserError(f"{path}: clip parameters for layer {layer} but the model has {num_layers} layers "
                            f"(0..{num_layers - 1})", fix)
        if not isinstance(entries, Mapping) or not entries:
            got = "an empty dict" if isinstance(entries, Mapping) else f"a {type(entries).__name__}"
            raise UserError(f"{path} layer {layer}: {got}, expected a non-empty dict of tensors", fix)
        layer_clips: dict[str, torch.Tensor] = {}
        for name, value in entries.items():
            where = f"{path} layer {layer} {name!r}"
            if name not in shapes:
                raise UserError(f"{where}: unknown clip parameter name (known: *.quantizer.clip_factor_a_max/min of "
                                "self_attn.{q,k,v,o}_proj, self_attn.v_proj.out_quantizer, mlp.{gate,up,down}_proj)",
                                fix)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                kind = f"{value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
                raise UserError(f"{where}: is a {kind}, expected a floating-point tensor", fix)
            if tuple(value.shape) != shapes[name]:
                raise UserError(f"{where}: shape {tuple(value.shape)}, expected {shapes[name]}", fix)
            if not torch.isfinite(value).all():
                raise UserError(f"{where}: {int((~torch.isfinite(value)).sum())} NaN/Inf values",
                                "the LAC run diverged; retrain the clip factors")
            layer_clips[name] = value.detach().to("cpu", torch.float32)
        for name in layer_clips:
            other = name[:-3] + ("min" if name.endswith("max") else "max")
            if other not in layer_clips:
                raise UserError(f"{path} layer {layer}: {name!r} without {other!r}", fix)
        clips[layer] = layer_clips
    missing = [i for i in range(num_layers) if i not in clips]
    if missing:
        raise UserError(f"{path}: clip parameters for {len(clips)} of {num_layers} layers (first missing: layer "
                        f"{missing[0]})", "LAC writes the file after each layer: let it finish, or drop the file")
    return dict(sorted(clips.items()))


def load_reference_rotations(directory: str | Path, *, num_layers: int, hidden_size: int, num_heads: int,
                             num_kv_heads: int, head_dim: int, num_blocks: int | None = None,
                             orthogonality_tol: float = 1e-3) -> ReferenceRotations:
    """Load and validate the reference PSOT rotations (and LAC clips when ``clip_parameters.pth`` exists).

    ``directory`` is the reference exp dir (containing ``Q/``) or the ``Q/`` directory itself; the clip file is
    looked up in the exp dir. ``num_blocks=None`` infers the block count from the files (one value for all layers);
    otherwise the files must match it. Raises :class:`UserError` on any inconsistency.
    """
    q_dir, exp_dir = resolve_dirs(directory)
    model_name, paths = _find_q_files(q_dir, num_layers)
    q1s: list[torch.Tensor] = []
    q2s: list[torch.Tensor] = []
    q4s: list[torch.Tensor] = []
    for layer, path in enumerate(paths):
        q1, q2, q4 = _load_layer(path, layer, hidden_size=hidden_size, num_kv_heads=num_kv_heads,
                                 head_dim=head_dim, tol=orthogonality_tol)
        nb = int(q1.shape[0])
        if num_blocks is not None and nb != num_blocks:
            raise UserError(f"{path.name} layer {layer}: Q1/Q4 have {nb} blocks of {q1.shape[-1]} but {num_blocks} "
                            f"blocks were requested", f"request {nb} blocks, or use rotations trained with "
                            f"{num_blocks} blocks")
        if q1s and nb != q1s[0].shape[0]:
            raise UserError(f"{path.name} layer {layer}: Q1/Q4 have {nb} blocks but layer 0 has {q1s[0].shape[0]}",
                            "use the files of one reference run (one block_diag setting)")
        q1s.append(q1)
        q2s.append(q2)
        q4s.append(q4)
    clip_path = exp_dir / CLIP_FILE
    clips = None
    if clip_path.exists():
        clips = _load_clips(clip_path, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads)
    return ReferenceRotations(model_name=model_name, q1=q1s, q2=q2s, q4=q4s, clips=clips)
