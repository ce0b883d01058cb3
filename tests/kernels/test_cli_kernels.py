"""``generate`` / ``eval --kernels``: the kernel model behind the CLI (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from infoquant_export.cli import main  # noqa: E402
from tests.kernels.conftest import INTERPRETER_WARNING  # noqa: E402

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNING)


def run(args: list[str], capsys) -> dict:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_generate_with_kernels_matches_fake_quant(tiny_artifact, capsys):
    base = ["generate", tiny_artifact, "--prompt", "The river", "--max-new-tokens", "6", "--json", "--device", "cpu"]
    ref = run([*base, "--kernels", "off"], capsys)
    fast = run([*base, "--kernels", "on", "--kernel-dtype", "float32"], capsys)
    assert "[kernels, float32]" in fast["config"] and "kernels" not in ref["config"]
    assert fast["tokens"] == ref["tokens"]  # float32 kernel model: same greedy tokens (measured: all 6 equal)
    for kernel in ("cc", "ccs"):  # the CUDA-core decode kernels too (measured: all 6 equal, both)
        cc = run([*base, "--kernels", "on", "--kernel-dtype", "float32", "--decode-attention", kernel], capsys)
        assert f"decode attention {kernel}" in cc["config"]
        assert cc["tokens"] == ref["tokens"], kernel


def test_eval_with_kernels_matches_fake_quant(tiny_artifact, capsys):
    base = ["eval", tiny_artifact, "--json", "--device", "cpu", "--seq-len", "32", "--max-windows", "2"]
    ref = run([*base, "--kernels", "off"], capsys)
    fast = run([*base, "--kernels", "on", "--kernel-dtype", "float32"], capsys)
    auto = run([*base, "--kernels", "auto"], capsys)  # no GPU: auto keeps the fake-quant model
    assert abs(fast["ppl"] / ref["ppl"] - 1) < 1e-4, (fast["ppl"], ref["ppl"])
    assert auto["ppl"] == ref["ppl"] and "kernels" not in auto["config"]


def test_kernels_on_refuses_a_non_w4a4kv4_artifact(tiny_artifact, capsys):
    from tests.kernels.conftest import requantize

    a8 = requantize(tiny_artifact, "a8-cli", a_bits=8)
    capsys.readouterr()  # drop the quantize progress output
    code = main(["generate", a8, "--prompt", "x", "--kernels", "on", "--device", "cpu"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "not a 4-bit quantizer" in last and "--kernels off" in last, last
