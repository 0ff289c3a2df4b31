"""The compiled extension: loads (CI builds it), registers every op, and its absence is graceful."""
import os
import subprocess
import sys

import pytest
import torch

from aspp_fused import _extension

OPS = ["atrous_conv", "tap_gemm", "epilogue_backward", "tap_wgrad", "separable_conv", "separable_gemm",
       "separable_gemm_backward"]


@pytest.mark.skipif(os.environ.get("ASPP_FUSED_ALLOW_NO_EXT") == "1", reason="ASPP_FUSED_ALLOW_NO_EXT=1")
def test_extension_loads():
    assert _extension.cpp_available(), "aspp_fused._C failed to load: %s" % _extension.LOAD_ERROR
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("aspp_fused::" + op, "CPU"), op


def test_import_without_extension_warns_once_and_torch_backend_works():
    # A fresh interpreter in which loading aspp_fused._C fails the way a broken build does.
    code = (
        "import sys, warnings\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'aspp_fused._C':\n"
        "            raise ImportError('undefined symbol: simulated broken build')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import aspp_fused, torch\n"
        "    import aspp_fused.ops, aspp_fused.functional\n"
        "msgs = [str(x.message) for x in w if 'aspp_fused._C' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'simulated broken build' in msgs[0], msgs\n"
        "m = aspp_fused.nn.FusedASPP(4, [2], out_channels=3, backend='torch').eval()\n"
        "assert m(torch.randn(2, 4, 5, 5)).shape == (2, 3, 5, 5)\n"
        "try:\n"
        "    aspp_fused.nn.FusedASPP(4, [2], out_channels=3, backend='cpp').eval()(torch.randn(2, 4, 5, 5))\n"
        "except RuntimeError as e:\n"
        "    assert 'failed to load' in str(e) and 'simulated broken build' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('cpp backend without the extension did not raise')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_info_runs():
    env = {k: v for k, v in os.environ.items() if k not in ("ASPP_FUSED_CUDA_REGIONS", "ASPP_FUSED_TRITON_TMA",
                                                           "ASPP_FUSED_TORCH_REGIONS", "ASPP_FUSED_ONEDNN")}
    out = subprocess.run([sys.executable, "-m", "aspp_fused.info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "backends:" in out.stdout and "torch" in out.stdout
    # the plan switches, with what each does on this machine
    for switch in ("ASPP_FUSED_CUDA_REGIONS=auto", "ASPP_FUSED_TRITON_TMA=auto", "ASPP_FUSED_TORCH_REGIONS=0",
                   "ASPP_FUSED_ONEDNN=1"):
        assert switch in out.stdout, out.stdout
