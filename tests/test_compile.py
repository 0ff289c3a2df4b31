"""torch.compile(fullgraph=True) traces the fused modules (fake kernels + autograd registered), on
every backend (Triton: interpreted on CPU)."""
import copy
import os

import pytest
import torch

import aspp_fused.nn as ann
from aspp_fused import _extension
from conftest import ALL_BACKENDS, DEV, assert_close_rel, randomize_bn


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_compile_fullgraph_eval_inductor(backend):
    torch._dynamo.reset()
    m = randomize_bn(ann.FusedASPP(8, [2, 12], out_channels=6, backend=backend)).to(DEV).eval()
    x = torch.randn(2, 8, 7, 9, device=DEV)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        assert_close_rel(compiled(x), m(x), 1e-5, "compiled eval output")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("module", ["aspp", "sep_aspp"])
def test_compile_fullgraph_train_step(backend, module):
    """Forward + backward in training (batch stats, running-stat updates) under aot_autograd."""
    torch._dynamo.reset()
    if module == "aspp":
        m = ann.FusedASPP(8, [2, 12], out_channels=6, backend=backend)
    else:
        m = ann.FusedSeparableASPP(8, 6, [2, 12], backend=backend)
    m = randomize_bn(m).to(DEV).train()
    m.project[3].p = 0.0  # dropout RNG differs between compiled and eager graphs
    eager = copy.deepcopy(m)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 8, 7, 9, device=DEV, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_c = compiled(x)
    y_e = eager(x2)
    assert_close_rel(y_c, y_e, 1e-5, "compiled train output")
    g = torch.randn_like(y_e)
    y_c.backward(g)
    y_e.backward(g)
    assert_close_rel(x.grad, x2.grad, 1e-5, "input grad")
    for (name, p), p_e in zip(m.named_parameters(), eager.parameters()):
        assert_close_rel(p.grad, p_e.grad, 1e-5, "grad of " + name)
    for (name, b), b_e in zip(m.named_buffers(), eager.buffers()):
        assert torch.allclose(b.double(), b_e.double(), rtol=1e-5, atol=1e-7), name


def test_compile_triton_with_tma_weight_tiles(monkeypatch):
    """The Triton forward with its weight tiles by TMA (tensor descriptors; forced on here, under the
    interpreter without a GPU) traces and runs under torch.compile(fullgraph=True) like eager."""
    pytest.importorskip("triton")
    from aspp_fused.kernels import atrous_conv as KA

    made = []
    real = KA.weight_descriptor
    monkeypatch.setattr(KA, "weight_descriptor", lambda w, rows: made.append(real(w, rows)) or made[-1])
    monkeypatch.setenv("ASPP_FUSED_TRITON_TMA", "1")
    torch._dynamo.reset()
    m = randomize_bn(ann.FusedASPP(8, [2, 12], out_channels=8, backend="triton")).to(DEV).eval()
    x = torch.randn(2, 8, 7, 9, device=DEV)
    with torch.no_grad():
        want = m(x)
        assert made and all(d is not None for d in made), "the descriptor path did not run"
        assert_close_rel(torch.compile(m, fullgraph=True)(x), want, 1e-5, "compiled eval output")


_CACHE_RUN = r"""
import sys
import torch
import aspp_fused
from aspp_fused import _autograd
from torch._dynamo.utils import counters

if sys.argv[1] == "changed":  # stands for a release whose formulas differ: its own digest
    torch._inductor.config.unsafe_marked_cacheable_functions = {_autograd.CACHE_KEY_ENTRY: "another release"}
w = torch.randn(4, 4, 3, 3, requires_grad=True)
f = torch.compile(lambda x: aspp_fused.ops.atrous_conv(x, [w], [2], torch.ones(4), torch.zeros(4), None, False, 1)[0])
f(torch.randn(2, 4, 8, 8)).sum().backward()
print("hits", counters["aot_autograd"]["autograd_cache_hit"])
"""


@pytest.mark.skipif(not _extension.cpp_available(), reason="aspp_fused._C not built")
def test_compile_caches_are_keyed_by_the_backward_formulas(tmp_path):
    """torch.compile's on-disk caches key a custom op by name only: a backward compiled under other
    formulas must not be served (aspp_fused/_autograd.py ties the keys to a digest of the formulas)."""
    import subprocess
    import sys

    from aspp_fused import _autograd

    marked = torch._inductor.config.unsafe_marked_cacheable_functions
    assert marked[_autograd.CACHE_KEY_ENTRY] == _autograd.formulas_digest()
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))

    def hits(which):
        r = subprocess.run([sys.executable, "-c", _CACHE_RUN, which], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split("hits")[-1])

    assert hits("same") == 0  # the first compile fills the cache
    assert hits("same") == 1  # the same formulas: served from it
    assert hits("changed") == 0  # other formulas: compiled afresh
