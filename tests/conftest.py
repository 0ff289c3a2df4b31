# Triton reads TRITON_INTERPRET when a kernel is defined, so without a GPU it must be set before
# aspp_fused.kernels is first imported: the Triton backend's tests then run interpreted on CPU.
import copy
import os
import sys
import threading
import types

import torch as _torch

if not _torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import aspp_fused
from aspp_fused import _extension

CUDA = torch.cuda.is_available()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (norm-relative; 0 for two empty tensors)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.numel() == 0:
        return 0.0
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_close_rel(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, "%s: relative error %.3g > %.3g" % (what, err, tol)


def assert_grads_close(actual, expected, tol, what=""):
    """{name: gradient} against {name: reference gradient}, each norm-relative; a reference that
    is zero in exact arithmetic (below 1e-12 of the largest gradient: e.g. a bias that a training
    BN downstream removes) only asks the other side to be rounding noise too."""
    scale = max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        if g.abs().max().item() < 1e-12 * scale:
            assert actual[name].abs().max().item() < 1e-12 * scale, "%s grad of %s" % (what, name)
        else:
            assert_close_rel(actual[name], g, tol, "%s grad of %s" % (what, name))


def run_in_threads(fn, n):
    """fn(i) for i < n, in n threads released together (a barrier); their results in order, or
    the first error raised in any of them."""
    results, errors, gate = [None] * n, [], threading.Barrier(n)

    def one(i):
        try:
            gate.wait()
            results[i] = fn(i)
        except BaseException as exc:  # raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def check_compiled_intermediate_weights(backend, device, tol):
    """Two atrous_conv calls in one compiled graph whose weights are intermediates (w * 2):
    inductor reuses the first one's buffer, the same tensor object and storage, for the second
    one's weight, with no counter bump; a packing cache that kept it served the first packing to
    the second op (391 off). The compiled model must match the eager one on every call."""
    from aspp_fused import functional as AF

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = torch.nn.Parameter(torch.randn(4, 4, 3, 3, device=device))
            self.w2 = torch.nn.Parameter(torch.randn(4, 4, 3, 3, device=device))

        def forward(self, x):
            y = AF.atrous_conv(x, [self.w1 * 2], [2], None, None, act="none", backend=backend)[0]
            return AF.atrous_conv(y, [self.w2 * 2], [2], None, None, act="none", backend=backend)[0]

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Two()
    x = torch.randn(1, 4, 7, 7, device=device)
    with torch.no_grad():
        want = m(x)
        compiled = torch.compile(m, fullgraph=True)
        for i in range(3):
            assert_close_rel(compiled(x), want, tol, "compiled call %d" % i)


def map_tensors(args, fn):
    """An op's argument list with fn applied to every tensor (lists of tensors included), the
    rest as is."""
    def one(t):
        return fn(t) if isinstance(t, torch.Tensor) else t

    return [[one(t) for t in a] if isinstance(a, list) else one(a) for a in args]


def tensors_of(args):
    """Every tensor of an op's argument list, in order (lists of tensors flattened)."""
    out = []
    for a in args:
        out += [t for t in (a if isinstance(a, list) else [a]) if isinstance(t, torch.Tensor)]
    return out


def cpp_backend_params():
    """The compiled backend is tested whenever it loads; CI requires it to load (see
    test_extension.py), so a broken build fails there instead of silently skipping."""
    return [pytest.param("cpp", marks=pytest.mark.skipif(not _extension.cpp_available(),
                                                         reason="aspp_fused._C not built: %s" % _extension.LOAD_ERROR))]


BACKENDS = ["torch"] + cpp_backend_params()


def triton_unavailable():
    """Why the Triton backend cannot run here (None when it can): compiled on a GPU, interpreted on
    CPU (TRITON_INTERPRET=1, set above)."""
    try:
        import triton  # noqa: F401  (importable?)
    except Exception as exc:  # pragma: no cover - depends on the environment
        return "triton not importable (%s: %s)" % (type(exc).__name__, exc)
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "neither CUDA nor TRITON_INTERPRET=1"


_TRITON_WHY = triton_unavailable()
# A test of the Triton backend's own machinery (not a case every backend meets).
needs_triton = pytest.mark.skipif(_TRITON_WHY is not None, reason=str(_TRITON_WHY))


def triton_backend_param():
    """The Triton backend as a ``backend`` parameter, skipped where it cannot run."""
    return pytest.param("triton", marks=[] if _TRITON_WHY is None else pytest.mark.skip(reason=_TRITON_WHY))


# Every backend of the fused modules, Triton included (interpreted on CPU: small cases only).
ALL_BACKENDS = BACKENDS + [triton_backend_param()]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is a folder of the repository, not part of the installed package
    sys.path.insert(0, ROOT)
from benchmarks.cases import randomize_bn  # noqa: E402,F401  (one statement for tests and benchmarks)


def _input_leaves(inp):
    return list(inp.values()) if isinstance(inp, dict) else [inp]


def _clone_inputs(inp):
    if isinstance(inp, dict):
        return {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inp.items()}
    return inp.detach().clone().requires_grad_(inp.requires_grad)


def _double_inputs(inp):
    if isinstance(inp, dict):
        return {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inp.items()}
    return inp.detach().double().requires_grad_(inp.requires_grad)


def compare_with_twin(ref, fused, inp, train, tol=1e-5):
    """A fused module (fp32) against its twin ``ref`` run in float64, to ``tol`` (docs/DESIGN.md,
    tolerance rule): output (shape, dtype, the input's memory format), and in training the input
    and parameter gradients; running statistics and num_batches_tracked. ``inp``: a tensor or a
    dict of them (the model's inputs). The fp32 twin's running statistics follow the float64 run.

    float64 is the yardstick because some quantities are ill-conditioned in fp32 for
    PyTorch itself (e.g. the pooling-branch weight grad in training: a sum of BN-backward
    terms that cancel), so fp32-vs-fp32 differences would measure PyTorch's error too.
    """
    ref64 = copy.deepcopy(ref).double()
    inp64 = _double_inputs(inp)
    inp_f = _clone_inputs(inp)
    fused.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same dropout masks on all sides
    y_ref32 = ref(_clone_inputs(inp))
    torch.manual_seed(123)
    y_ref = ref64(inp64)
    torch.manual_seed(123)
    y = fused(inp_f)
    assert y.shape == y_ref32.shape and y.dtype == y_ref32.dtype
    # Fused outputs keep the input's memory format (the twins' depends on their internals).
    x0 = inp["low"] if isinstance(inp, dict) else inp
    if x0.is_contiguous(memory_format=torch.channels_last) and not x0.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    assert_close_rel(y, y_ref, tol, "output")
    if train:
        g = torch.randn(y.shape, dtype=torch.float64, device=y_ref.device)
        y_ref.backward(g)
        y.backward(g.float())
        for a, b in zip(_input_leaves(inp_f), _input_leaves(inp64)):
            if b.requires_grad:
                assert_close_rel(a.grad, b.grad, tol, "input grad")
        ref_params = dict(ref64.named_parameters())
        for name, p in fused.named_parameters():
            assert_close_rel(p.grad, ref_params[name].grad, tol, "grad of " + name)
    ref_buffers = dict(ref64.named_buffers())
    for name, b in fused.named_buffers():
        if b.is_floating_point():
            assert_close_rel(b, ref_buffers[name], tol, name)
        else:
            assert torch.equal(b, ref_buffers[name]), name
    # Keep the fp32 twin's running stats in step with the fused module's for the next call.
    ref.load_state_dict(ref64.float().state_dict())


@pytest.fixture
def no_tf32():
    """fp32 parity is to 1e-5: the kernels follow cudnn.allow_tf32 (as PyTorch's convolutions), so
    tests of the exact fp32 path switch it off (``pytestmark = pytest.mark.usefixtures("no_tf32")``)."""
    prev = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture(scope="session")
def torchvision_models():
    """torchvision's segmentation models, or skip when torchvision is not installed.

    torchvision ships only CUDA wheels; its compiled ops do not load against a CPU torch, and
    `import torchvision` fails while registering their meta kernels. The model code we test is
    pure Python, so an empty stand-in for torchvision._meta_registrations is enough to import it.
    """
    try:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
        import torchvision.models.segmentation as seg
    except Exception as exc:  # not installed, or an incompatible build
        pytest.skip("torchvision not usable: %s" % exc)
    return seg


@pytest.fixture(scope="session")
def smp():
    """segmentation_models_pytorch, or skip. It imports torchvision (through timm): same
    stand-in for torchvision's compiled-op registrations as in ``torchvision_models``."""
    try:
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
        import segmentation_models_pytorch
    except Exception as exc:
        pytest.skip("segmentation_models_pytorch not usable: %s" % exc)
    return segmentation_models_pytorch


# `slow` tests (the full-count fuzz, tests/test_fuzz.py) run only with --run-slow (`make fuzz`);
# otherwise they are deselected, so CI's plain `pytest -q` stays bounded.
def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]
