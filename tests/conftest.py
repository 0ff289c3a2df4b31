# Triton reads TRITON_INTERPRET when a kernel is defined, so without a GPU it must be set before
# aspp_fused.kernels is first imported: the Triton backend's tests then run interpreted on CPU.
import os
import sys
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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_bn(module: torch.nn.Module, gen=None):
    """Non-trivial BN running stats and affine parameters (fresh ones are 0/1: too easy)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    return module


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
