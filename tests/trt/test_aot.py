"""The ahead-of-time plugin path's kernel (``tensorrt.plugin`` itself cannot be installed here; see
infoquant_export/trt/plugins/aot.py): same bits as the runtime kernels, and PTX whose parameter list is the one
TensorRT's AOT launcher passes (input, output), which ptxas assembles."""

import os
import re
import subprocess
import sys

import pytest
import torch

from infoquant_export.kernels import kernel_module, ops, rows


@pytest.mark.parametrize("size,blocks", [(256, 2), (1024, 1)])
def test_aot_hadamard_kernel_bit_identical(size, blocks):
    x = torch.randn(7, size) * 3
    y = torch.empty_like(x)
    p = size // blocks
    kernel_module("aot_kernels").hadamard_rows_aot_kernel[(7,)](x, y, NB=blocks, P=p, LOG2P=p.bit_length() - 1,
                                                                INV_SQRT=rows._inv_sqrt(p))
    assert torch.equal(y, ops.hadamard(x, blocks))  # measured: bit-identical


def test_aot_ptx_has_tensorrt_parameter_list():
    code = """
import re, subprocess, tempfile, os
from infoquant_export.kernels.aot import hadamard_rows_ptx
from triton.backends.nvidia.compiler import get_ptxas
name, ptx, warps, shared = hadamard_rows_ptx(4096, 1, 89)
params = re.search(r'\\.entry\\s+\\w+\\s*\\((.*?)\\)', ptx, re.S).group(1).count('.param')
d = tempfile.mkdtemp(); open(d + '/k.ptx', 'w').write(ptx)
r = subprocess.run([get_ptxas(89).path, '-arch=sm_89', d + '/k.ptx', '-o', d + '/k.cubin'], capture_output=True)
print(name, params, r.returncode, os.path.getsize(d + '/k.cubin'))
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    name, params, rc, cubin = out.stdout.split()[-4:]
    assert name == "hadamard_rows_aot_kernel" and params == "2"  # x, y (Triton's two scratch pointers dropped)
    assert rc == "0" and int(cubin) > 10_000  # measured: 50,912-byte cubin for sm_89


def test_strip_keeps_used_parameters():
    from infoquant_export.kernels.aot import strip_unused_params

    ptx = ".entry k(\n .param .u64 k_param_0,\n .param .u64 k_param_1\n)\n{ ld.param.u64 %rd1, [k_param_1]; }"
    stripped, dropped = strip_unused_params(ptx)
    assert dropped == 0 and "k_param_0" in stripped  # a parameter before a used one stays
    assert re.search(r"k_param_1\s*\)", stripped)
