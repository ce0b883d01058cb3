"""Reference InfoQuant rotation/clip files load exactly, on CPU, and hostile or inconsistent files are refused."""

from __future__ import annotations

import io
import math
import os
import pathlib
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from infoquant_export.errors import UserError
from infoquant_export.transforms.infoquant_import import (
    clip_parameter_shapes,
    load_reference_rotations,
    reference_clip_factor,
    safe_torch_load,
)

LAYERS, HIDDEN, NB, HEADS, KV, HEAD_DIM = 2, 64, 2, 4, 2, 16
MODEL = dict(num_layers=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, num_kv_heads=KV, head_dim=HEAD_DIM)
NAME = "Llama-2-7b-hf"


def random_orthogonal(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """[count, n, n] float32 orthogonal matrices (QR of Gaussian matrices in float64)."""
    q, r = torch.linalg.qr(torch.randn(count, n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).float()


def save_layer(path: Path, q1: torch.Tensor, q2: torch.Tensor, q4: torch.Tensor) -> None:
    """torch.save exactly as the reference PSOT stage: ParameterLists of requires_grad=True Parameters."""
    torch.save({key: nn.ParameterList([nn.Parameter(b.clone()) for b in q]) for key, q in
                (("Q1", q1), ("Q2", q2), ("Q4", q4))}, path)


def write_reference(exp_dir: Path, *, layers: int = LAYERS, nb: int = NB, model_name: str = NAME,
                    seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Write ``{exp_dir}/Q/{model_name}_layer_{i}_Q.pth`` for ``layers`` layers; returns the stacked matrices."""
    gen = torch.Generator().manual_seed(seed)
    (exp_dir / "Q").mkdir(parents=True, exist_ok=True)
    out: dict[str, list[torch.Tensor]] = {"q1": [], "q2": [], "q4": []}
    for i in range(layers):
        q1, q2, q4 = (random_orthogonal(HIDDEN // nb, nb, gen), random_orthogonal(HEAD_DIM, KV, gen),
                      random_orthogonal(HIDDEN // nb, nb, gen))
        save_layer(exp_dir / "Q" / f"{model_name}_layer_{i}_Q.pth", q1, q2, q4)
        for key, q in (("q1", q1), ("q2", q2), ("q4", q4)):
            out[key].append(q)
    return out


def clip_logits(layers: int = LAYERS) -> dict[int, OrderedDict[str, torch.Tensor]]:
    """A clip_parameters.pth payload: fp16 logits in the reference names and shapes."""
    gen = torch.Generator().manual_seed(1)
    return {i: OrderedDict((name, (torch.randn(shape, generator=gen) + 4).half())
                           for name, shape in clip_parameter_shapes(HEADS, KV).items()) for i in range(layers)}


def test_round_trip_is_exact_and_accepts_exp_dir_or_q_dir(tmp_path):
    ref = write_reference(tmp_path)
    for directory in (tmp_path, tmp_path / "Q"):
        rot = load_reference_rotations(directory, **MODEL)
        assert rot.model_name == NAME and rot.num_blocks == NB and rot.clips is None
        for key in ("q1", "q2", "q4"):
            for got, want in zip(getattr(rot, key), ref[key], strict=True):
                assert got.dtype == torch.float32 and got.device.type == "cpu" and not got.requires_grad
                assert torch.equal(got, want)
        assert rot.q1[0].shape == (NB, HIDDEN // NB, HIDDEN // NB) and rot.q2[1].shape == (KV, HEAD_DIM, HEAD_DIM)
    assert load_reference_rotations(tmp_path, num_blocks=NB, **MODEL).num_blocks == NB


def test_file_saved_on_cuda_loads_on_cpu(tmp_path, monkeypatch):
    ref = write_reference(tmp_path)
    path = tmp_path / "Q" / f"{NAME}_layer_1_Q.pth"
    with monkeypatch.context() as patch:  # record the storages as the reference does: location 'cuda:0'
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_layer(path, ref["q1"][1], ref["q2"][1], ref["q4"][1])
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert b"cuda:0" in data and b"'cpu'" not in data and b"cpu" not in data
    loaded = safe_torch_load(path)
    assert isinstance(loaded["Q1"], nn.ParameterList) and loaded["Q1"][0].device.type == "cpu"
    rot = load_reference_rotations(tmp_path, **MODEL)
    assert torch.equal(rot.q4[1], ref["q4"][1]) and rot.q4[1].device.type == "cpu"


class _ShellPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _TouchPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.mark.parametrize("payload", [_ShellPayload, _TouchPayload])
@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_hostile_pickle_is_refused_without_being_executed(tmp_path, payload, container):
    write_reference(tmp_path)
    marker = tmp_path / "pwned"
    path = tmp_path / "Q" / f"{NAME}_layer_0_Q.pth"
    evil = {"Q1": payload(marker), "Q2": [], "Q4": []}
    if container == "torch_zip":
        torch.save(evil, path)
        assert zipfile.is_zipfile(path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UserError) as err:
        safe_torch_load(path)
    with pytest.raises(UserError) as err_dir:
        load_reference_rotations(tmp_path, **MODEL)
    assert not marker.exists()
    for msg in (str(err.value), str(err_dir.value)):
        assert str(path) in msg and "\n" not in msg
        if container == "torch_zip":  # names the refused global and says it did not run
            assert "disallowed global" in msg and "not executed" in msg
            assert ("system" if payload is _ShellPayload else "getattr") in msg
        else:
            assert "not a torch zip archive" in msg and "not unpickled" in msg
    if payload is _TouchPayload and container == "plain_pickle":  # control: the payload is live when unpickled
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_weights_only_unpickler_still_refuses_when_the_static_scan_is_bypassed(tmp_path, monkeypatch):
    import infoquant_export.transforms.infoquant_import as mod

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"Q1": _ShellPayload(marker)}, path)
    monkeypatch.setattr(mod, "ALLOWED_GLOBALS", mod.ALLOWED_GLOBALS | {f"{os.system.__module__}.system"})
    with pytest.raises(UserError, match=r"torch\.load\(weights_only=True\) refused or failed: .*system"):
        safe_torch_load(path)
    assert not marker.exists()


def test_wrong_layer_count(tmp_path):
    write_reference(tmp_path, layers=3)
    with pytest.raises(UserError, match=r"another model.*layer 2 \(3 layers\).*model has 2 layers"):
        load_reference_rotations(tmp_path, **MODEL)
    with pytest.raises(UserError, match=r"missing Llama-2-7b-hf_layer_3_Q\.pth"):
        load_reference_rotations(tmp_path, **{**MODEL, "num_layers": 4})


def test_wrong_block_count(tmp_path):
    ref = write_reference(tmp_path)
    with pytest.raises(UserError, match=r"layer 0: Q1/Q4 have 2 blocks of 32 but 4 blocks were requested"):
        load_reference_rotations(tmp_path, num_blocks=4, **MODEL)
    gen = torch.Generator().manual_seed(5)
    save_layer(tmp_path / "Q" / f"{NAME}_layer_1_Q.pth", random_orthogonal(16, 4, gen), ref["q2"][1],
               random_orthogonal(16, 4, gen))
    with pytest.raises(UserError, match=r"layer 1: Q1/Q4 have 4 blocks but layer 0 has 2"):
        load_reference_rotations(tmp_path, **MODEL)
    save_layer(tmp_path / "Q" / f"{NAME}_layer_1_Q.pth", random_orthogonal(16, 2, gen), ref["q2"][1],
               random_orthogonal(16, 2, gen))
    with pytest.raises(UserError, match=r"layer 1 Q1: 2 blocks of 16x16 cover 32 dims .* hidden size is 64"):
        load_reference_rotations(tmp_path, **MODEL)


def test_non_orthogonal_block_reports_layer_and_error(tmp_path):
    ref = write_reference(tmp_path)
    q4 = ref["q4"][1].clone()
    q4[1, 3, 5] += 0.01
    save_layer(tmp_path / "Q" / f"{NAME}_layer_1_Q.pth", ref["q1"][1], ref["q2"][1], q4)
    blk = q4[1].double()
    measured = float((blk.T @ blk - torch.eye(32, dtype=torch.float64)).abs().max())
    assert 0.005 < measured < 0.03  # measured 0.0062 (about 2 * 0.01 * |Q[3, 5]| + 1e-4)
    with pytest.raises(UserError) as err:
        load_reference_rotations(tmp_path, **MODEL)
    assert f"layer 1 Q4 block 1 is not orthogonal: max |Q^T Q - I| = {measured:.3g} > tolerance 0.001" in str(err.value)
    rot = load_reference_rotations(tmp_path, orthogonality_tol=0.05, **MODEL)  # a looser tolerance accepts it
    assert torch.equal(rot.q4[1], q4)


def test_nan_is_refused(tmp_path):
    ref = write_reference(tmp_path)
    q2 = ref["q2"][0].clone()
    q2[1, 0, 0] = math.nan
    save_layer(tmp_path / "Q" / f"{NAME}_layer_0_Q.pth", ref["q1"][0], q2, ref["q4"][0])
    with pytest.raises(UserError, match=r"layer 0 Q2 block 1 has 1 NaN/Inf entries"):
        load_reference_rotations(tmp_path, **MODEL)


def _flip_storage_byte(path: Path) -> None:
    """Corrupt one byte of the first tensor's storage inside the zip (the zip structure stays valid)."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(next(n for n in archive.namelist() if n.endswith("/data/0")))
    data = bytearray(path.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF  # past the local header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,match", [
    (_flip_storage_byte, r"member .*/data/0 fails its CRC check"),
    (lambda p: p.unlink(), r"no \*_layer_<i>_Q\.pth files"),
    (lambda p: p.with_name("Other-Model_layer_1_Q.pth").write_bytes(p.read_bytes()), r"several models"),
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), r"not a torch zip archive \(or truncated\)"),
    (lambda p: torch.save({"Q1": [], "Q2": []}, p), r"missing \['Q4'\]"),
    (lambda p: torch.save({"Q1": torch.eye(4), "Q2": [], "Q4": []}, p), r"Q1 is a Tensor, expected an nn\.Param"),
])
def test_malformed_directory_or_file(tmp_path, damage, match):
    write_reference(tmp_path, layers=1)
    damage(tmp_path / "Q" / f"{NAME}_layer_0_Q.pth")
    with pytest.raises(UserError, match=match):
        load_reference_rotations(tmp_path, **{**MODEL, "num_layers": 1})


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match=r"does not exist"):
        load_reference_rotations(tmp_path / "nope", **MODEL)


def test_clip_file_round_trip_and_reference_clip_factor(tmp_path):
    write_reference(tmp_path)
    logits = clip_logits()
    logits[1]["mlp.up_proj.quantizer.clip_factor_a_max"] = torch.tensor([2.1972], dtype=torch.float16)
    torch.save(logits, tmp_path / "clip_parameters.pth")
    for directory in (tmp_path, tmp_path / "Q"):  # the Q/ dir finds the clip file in its exp dir
        clips = load_reference_rotations(directory, **MODEL).clips
        assert clips is not None and sorted(clips) == [0, 1]
        for i in range(LAYERS):
            assert clips[i].keys() == logits[i].keys()
            for name, value in clips[i].items():
                assert value.dtype == torch.float32 and torch.equal(value, logits[i][name].float())
    # By hand: fp16(2.1972) = 2.197265625; sigmoid = 0.900004 -> fp16 0.89990234375; 1 + s = 1.89990234375 is a
    # tie between fp16 neighbours 1.8994140625 and 1.900390625 -> round to even 1.900390625; alpha = 0.9501953125.
    alpha = reference_clip_factor(clips[1]["mlp.up_proj.quantizer.clip_factor_a_max"])
    assert alpha.dtype == torch.float32 and alpha.item() == 0.9501953125
    assert abs(alpha.item() - 0.5 * (1 + 0.9)) < 3e-4  # measured 1.95e-4 from fp16 rounding
    assert reference_clip_factor(torch.tensor([0.0, -20.0, 20.0])).tolist() == [0.75, 0.5, 1.0]  # fp16 saturates


@pytest.mark.parametrize("edit,match", [
    (lambda c: c[0].__setitem__("self_attn.k_proj.quantizer.clip_factor_b_max", torch.zeros(1).half()),
     r"layer 0 'self_attn\.k_proj\.quantizer\.clip_factor_b_max': unknown clip parameter name"),
    (lambda c: c[1].__setitem__("self_attn.o_proj.quantizer.clip_factor_a_min", torch.zeros(KV, 1).half()),
     r"layer 1 'self_attn\.o_proj\.quantizer\.clip_factor_a_min': shape \(2, 1\), expected \(4, 1\)"),
    (lambda c: c[0].__setitem__("mlp.down_proj.quantizer.clip_factor_a_max", torch.tensor([math.inf]).half()),
     r"'mlp\.down_proj\.quantizer\.clip_factor_a_max': 1 NaN/Inf values"),
    (lambda c: c.__setitem__(2, c[0]), r"clip parameters for layer 2 but the model has 2 layers"),
    (lambda c: c.pop(1), r"clip parameters for 1 of 2 layers \(first missing: layer 1\)"),
    (lambda c: c[1].clear(), r"layer 1: an empty dict"),
    (lambda c: c[0].pop("mlp.gate_proj.quantizer.clip_factor_a_min"), r"without 'mlp\.gate_proj"),
])
def test_bad_clip_file(tmp_path, edit, match):
    write_reference(tmp_path)
    logits = clip_logits()
    edit(logits)
    torch.save(logits, tmp_path / "clip_parameters.pth")
    with pytest.raises(UserError, match=match):
        load_reference_rotations(tmp_path, **MODEL)


def test_safe_load_refuses_non_allow_listed_but_harmless_globals(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"dev": torch.device("cpu"), "t": torch.zeros(2, dtype=torch.int64)}, path)
    with pytest.raises(UserError, match=r"disallowed global 'torch\.LongStorage' \(and 1 more\).*not executed"):
        safe_torch_load(path)
    buf = io.BytesIO()
    torch.save(OrderedDict(a=torch.ones(3).half()), buf)
    path.write_bytes(buf.getvalue())
    assert torch.equal(safe_torch_load(path)["a"], torch.ones(3).half())
