"""What is measured: the standard cases, and how each provider runs them.

A case builds its reference twin (plain PyTorch, aspp_fused.nn or torchvision) in one of two
size profiles: ``gpu`` (docs/DESIGN.md's sizes: batch 16, C=2048, 256 out) and ``cpu`` (scaled down
so that the whole suite runs in a few minutes on a small CPU machine: batch 2, C=512, same
spatial sizes and rates, so the padding geometry is the same as on the GPU). Every provider
starts from a deep copy of the same twin, with the same randomised weights and BN statistics.
"""
import contextlib
import copy
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

import aspp_fused
from aspp_fused import _extension
from aspp_fused import nn as ann

PROVIDERS = ("eager", "eager_cl", "compile", "fused_torch", "fused_torch_regions", "compile_fused_torch",
             "fused_triton", "fused_cpp", "fused_cpp_tiles")
BASELINE = "eager_cl"  # speedups are reported against channels_last eager PyTorch (cudnn.benchmark on GPU)

Shape = Tuple[int, int, int]  # (C, H, W) of one sample
InputSpec = Union[Shape, Dict[str, Shape]]


class Skip(Exception):
    """A provider (or case) that cannot run here; the message says why."""


@dataclass
class Case:
    name: str
    title: str
    build: Callable[[str], Tuple[nn.Module, InputSpec]]  # size profile -> (twin, per-sample input shape)
    batch: Dict[str, int]
    fused: Optional[type] = None  # fused head class; None: aspp_fused.convert (whole models)
    standard: bool = True  # in the default suite
    notes: Dict[str, str] = field(default_factory=dict)  # size profile -> remark for the report


def _channels(size: str) -> int:
    return 2048 if size == "gpu" else 512


def _aspp_v3(rates, hw):
    def build(size):
        c = _channels(size)
        return ann.ASPP(c, rates, 256), (c, hw, hw)
    return build


def _aspp_v2(size):
    c = _channels(size)
    return ann.ASPPv2(c, 21, (6, 12, 18, 24)), (c, 65, 65)


def _sep_aspp(size):
    c = _channels(size)
    return ann.SeparableASPP(c, 256, (6, 12, 18)), (c, 33, 33)


def _lraspp(size):
    # MobileNetV3-Large's LR-ASPP: 960 channels at OS16 (33x33 for a 513 input), 40 at OS8.
    return ann.LRASPPHead(40, 960, 21, 128), {"low": (40, 65, 65), "high": (960, 33, 33)}


def import_torchvision_segmentation():
    """torchvision's segmentation models, or raise Skip with the reason."""
    if "torchvision" not in sys.modules and not torch.version.cuda:
        # torchvision publishes CUDA builds only; on a CPU build of torch its compiled ops do not
        # load, and `import torchvision` dies registering their meta kernels
        # (torchvision/_meta_registrations.py: "operator torchvision::nms does not exist").
        # The segmentation models are pure Python and never call those ops, so an empty
        # stand-in for that module is enough (as in tests/conftest.py).
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision.models.segmentation as seg
    except Exception as exc:  # not installed, or a build that does not match this torch
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise Skip("torchvision not usable: %s: %s" % (type(exc).__name__, first))
    return seg


def _deeplabv3_resnet101(size):
    seg = import_torchvision_segmentation()
    # OS8 (torchvision dilates layer3 and layer4), DeepLabHead with rates 12/24/36. A 513 input
    # gives 65x65 features (the head of aspp_v3_os8). On CPU 193 -> 25x25 features, where rate 36
    # reaches past the map (its 3x3 degenerates to the centre tap, as the fused path exploits):
    # ~0.6 s per forward of 2 images on 2 cores, so the suite stays within a few minutes.
    model = seg.deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=21)
    hw = 513 if size == "gpu" else 193
    return model, (3, hw, hw)


def _own_forward_deeplab(size):
    from benchmarks.own_forward_deeplab import OwnForwardDeepLab

    c = _channels(size)
    return OwnForwardDeepLab(c), (c, 33, 33)


def _tiny(size):
    return ann.ASPP(16, (2, 4, 6), 8), (16, 9, 9)


CASES: Dict[str, Case] = {c.name: c for c in [
    Case("aspp_v3_os16", "ASPP v3, OS16: 33x33, rates 6/12/18, 256 out", _aspp_v3((6, 12, 18), 33),
         {"gpu": 16, "cpu": 2}, ann.FusedASPP),
    Case("aspp_v3_os8", "ASPP v3, OS8: 65x65, rates 12/24/36, 256 out", _aspp_v3((12, 24, 36), 65),
         {"gpu": 16, "cpu": 2}, ann.FusedASPP),
    Case("aspp_v2_os8", "ASPP v2, OS8: 65x65, rates 6/12/18/24, 21 classes, sum", _aspp_v2,
         {"gpu": 16, "cpu": 2}, ann.FusedASPPv2),
    Case("sep_aspp_os16", "ASPP v3+ (separable), OS16: 33x33, rates 6/12/18, 256 out", _sep_aspp,
         {"gpu": 16, "cpu": 2}, ann.FusedSeparableASPP),
    Case("lraspp", "LR-ASPP: high 960 ch at 33x33, low 40 ch at 65x65, inter 128, 21 classes", _lraspp,
         {"gpu": 16, "cpu": 2}, ann.FusedLRASPPHead),
    Case("deeplabv3_resnet101_os8", "torchvision deeplabv3_resnet101 (OS8, 21 classes), end to end; "
         "converted with aspp_fused.convert", _deeplabv3_resnet101, {"gpu": 16, "cpu": 2},
         notes={"gpu": "513x513 images", "cpu": "193x193 images (25x25 features)"}),
    Case("own_forward_deeplab_os16", "user-style DeepLab v3 head (ASPP in the model's own forward, attribute "
         "branches, align_corners=True pooling), 33x33, rates 6/12/18, 21 classes; converted with aspp_fused.convert",
         _own_forward_deeplab, {"gpu": 16, "cpu": 2}),
    Case("tiny", "smoke test: ASPP 16 -> 8 ch, 9x9, rates 2/4/6", _tiny, {"gpu": 2, "cpu": 2}, ann.FusedASPP,
         standard=False),
]}

STANDARD = [name for name, c in CASES.items() if c.standard]


def channel_count(spec: InputSpec) -> str:
    """'2048x33x33' or 'high 960x33x33, low 40x65x65' (for the report)."""
    if isinstance(spec, dict):
        return ", ".join("%s %s" % (k, "x".join(map(str, v))) for k, v in spec.items())
    return "x".join(map(str, spec))


# --------------------------------------------------------------------------- the twin and its inputs


def randomize_bn(module: nn.Module, conv_bias: bool = False) -> nn.Module:
    """Non-trivial BN statistics and affine parameters: fresh ones (0 / 1) would make the
    folded BN an identity, and a ReLU after a zero-mean conv would let half the work vanish.
    ``conv_bias``: a value in every conv bias too (v2 classifiers start at zero). One loop in
    module order: tests' values come from this draw order."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            elif conv_bias and isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return module


def build_twin(case: Case, size: str, device, dtype) -> Tuple[nn.Module, InputSpec]:
    """The reference module, seeded, BN randomised, on ``device`` in ``dtype`` (NCHW)."""
    torch.manual_seed(0)
    twin, spec = case.build(size)
    randomize_bn(twin)
    return twin.to(device=device, dtype=dtype), spec


def make_inputs(spec: InputSpec, batch: int, count: int, device, dtype, channels_last: bool,
                requires_grad: bool = False) -> List:
    """``count`` distinct inputs (same seeds for every provider), NCHW or channels_last."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def one(shape, seed):
        full = (batch,) + tuple(shape)
        if torch.device(device).type == "meta":  # shapes only (MAC counting)
            return torch.empty(full, device="meta", dtype=dtype)
        gen = torch.Generator(device=device).manual_seed(seed)
        t = torch.randn(full, generator=gen, device=device, dtype=dtype)
        return t.contiguous(memory_format=fmt).requires_grad_(requires_grad)

    out = []
    for i in range(count):
        if isinstance(spec, dict):
            out.append({k: one(s, 1000 * i + j) for j, (k, s) in enumerate(sorted(spec.items()))})
        else:
            out.append(one(spec, 1000 * i))
    return out


def input_bytes(spec: InputSpec, batch: int, dtype) -> int:
    shapes = spec.values() if isinstance(spec, dict) else [spec]
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(batch * c * h * w for c, h, w in shapes) * elem


def meta_macs(case: Case, size: str, batch: int):
    """(dense MACs, executed MACs, output shape, input spec) of one forward, counted on the
    meta device (shapes only: free even for ResNet-101)."""
    from benchmarks.harness import count_macs

    with torch.device("meta"):
        torch.manual_seed(0)
        twin, spec = case.build(size)
        inputs = make_inputs(spec, batch, 1, "meta", torch.float32, False)[0]
    dense, executed, out = count_macs(twin.eval(), inputs)
    out = out["out"] if isinstance(out, dict) else out
    return dense, executed, tuple(out.shape), spec


# --------------------------------------------------------------------------- providers


@dataclass
class Provider:
    name: str
    module: nn.Module
    channels_last: bool
    cudnn_benchmark: bool
    before_step: Optional[Callable[[], None]] = None  # outside the timed region
    note: str = ""


# torch.compile modes that capture CUDA graphs (on CUDA tensors).
GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _compile_note(device, mode: str = "default") -> str:
    graphs = device.type == "cuda" and mode in GRAPH_MODES
    return "torch.compile(mode=%r)%s" % (mode, "; CUDA graphs" if graphs else "; no CUDA graphs")


def _compiled(name: str, module: nn.Module, device: torch.device, compile_mode: str, note: str) -> Provider:
    compiled = torch.compile(module, mode=None if compile_mode == "default" else compile_mode)
    # Modes with CUDA graphs: a new step must be announced or the previous step's outputs
    # (graph-owned memory) count as still in use.
    before = torch.compiler.cudagraph_mark_step_begin if device.type == "cuda" and compile_mode in GRAPH_MODES else None
    return Provider(name, compiled, True, True, before, note=note)


@contextlib.contextmanager
def env_set(name: str, value: str):
    """os.environ[name] = value for the block, then as it was (set or unset)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


class _Within(nn.Module):
    """Runs ``inner`` inside ``context()`` (a provider's switch: the torch backend's region plan,
    the CUDA kernels' tile plan)."""

    def __init__(self, inner: nn.Module, context):
        super().__init__()
        self.inner = inner
        self.context = context

    def forward(self, *args, **kwargs):
        with self.context():
            return self.inner(*args, **kwargs)


def with_torch_regions(module: nn.Module) -> nn.Module:
    """``module`` with the torch backend's region plan on (fused_torch_regions)."""
    from aspp_fused import torch_backend

    return _Within(module, lambda: torch_backend.regions("1"))


def with_cuda_tile_plan(module: nn.Module) -> nn.Module:
    """``module`` with the CUDA kernels on the tile plan (fused_cpp_tiles; ASPP_FUSED_CUDA_REGIONS is
    read by the CUDA glue on every call)."""
    return _Within(module, lambda: env_set("ASPP_FUSED_CUDA_REGIONS", "0"))


def make_provider(name: str, case: Case, twin: nn.Module, device: torch.device,
                  compile_mode: str = "default") -> Provider:
    """Provider ``name`` for ``twin`` (already on device, dtype, train/eval). Raises Skip(reason).

    ``compile_mode``: torch.compile's mode for the ``compile`` provider. "default" compiles in
    seconds; "max-autotune" takes minutes (a GPU check cannot afford it)."""
    cuda = device.type == "cuda"
    if name == "eager":
        # Out-of-the-box PyTorch: NCHW, cudnn.benchmark left at its default (off).
        return Provider(name, copy.deepcopy(twin), False, False)
    cl = copy.deepcopy(twin).to(memory_format=torch.channels_last)
    if name == "eager_cl":
        return Provider(name, cl, True, True, note="channels_last, cudnn.benchmark" if cuda else "channels_last")
    if name == "compile":
        return _compiled(name, cl, device, compile_mode, _compile_note(device, compile_mode))
    if name == "fused_torch_regions":
        # fused_torch with its exact-region convs on (ASPP_FUSED_TORCH_REGIONS=cuda): what the region
        # plan gains or loses against one padded cuDNN conv per branch, for a GPU run to decide.
        if not cuda:
            raise Skip("the torch backend's region plan is for CUDA tensors (measured 5x slower on CPU, "
                       "see torch_backend.REGIONS)")
        fused = make_provider("fused_torch", case, twin, device, compile_mode)
        return Provider(name, with_torch_regions(fused.module), True, True, note=fused.note + "; region plan on")
    if name == "fused_cpp_tiles":
        # fused_cpp with the CUDA concat forward on the per-tile tap plan: what the exact-region
        # plan (the default) gains against it, for a GPU run to say.
        if not cuda:
            raise Skip("the tile / region choice is the CUDA kernels' (the CPU kernels tile their own way)")
        fused = make_provider("fused_cpp", case, twin, device, compile_mode)
        return Provider(name, with_cuda_tile_plan(fused.module), True, True, note=fused.note + "; tile plan")
    if name == "compile_fused_torch":
        # What a user who converts and then compiles runs: torch.compile of the converted model.
        fused = make_provider("fused_torch", case, twin, device, compile_mode)
        return _compiled(name, fused.module, device, compile_mode,
                         "torch.compile(%s); %s" % (fused.note, _compile_note(device, compile_mode)))
    if name.startswith("fused_"):
        backend = name[len("fused_"):]
        if backend == "triton" and not cuda:
            raise Skip("the Triton kernels run on CUDA tensors; on CPU only under the Triton interpreter "
                       "(TRITON_INTERPRET=1), a correctness tool, not something to time")
        if backend == "cpp":
            if not _extension.cpp_available():
                raise Skip("aspp_fused._C not loaded: %s" % _extension.LOAD_ERROR)
            if cuda and not _extension.cuda_kernels_built():
                raise Skip("cpp CUDA kernels not built (aspp_fused._C has its CPU kernels only)")
        try:
            if case.fused is not None:
                fused = case.fused.from_module(cl, backend=backend)
            else:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fused = aspp_fused.convert(cl, backend=backend)
                if not aspp_fused.list_fused(fused):
                    why = "; ".join(str(w.message) for w in caught) or "no recognised head"
                    raise Skip("aspp_fused.convert found nothing to fuse: %s" % why)
        except NotImplementedError as exc:  # a backend this version does not have
            raise Skip(str(exc).split(";")[0])
        note = "%s.from_module(channels_last twin, backend=%r)" % (type(fused).__name__, backend) \
            if case.fused is not None else "aspp_fused.convert(channels_last model, backend=%r)" % backend
        if backend == "cpp" and not cuda:
            note += "; csrc/cpu readable loops"
        return Provider(name, fused, True, True, note=note)
    raise ValueError("unknown provider %r (known: %s)" % (name, ", ".join(PROVIDERS)))


def make_step(provider: Provider, mode: str, inputs: List, base_grad: Optional[torch.Tensor]):
    """(prepare(i), step(i)): prepare runs outside the timed region, step is what is timed.

    infer: eval module under torch.inference_mode. train: forward, then backward of a fixed
    random gradient of the output (the same values for every provider, in the layout of the
    provider's own output, so no provider pays a layout copy the others do not). Gradients are
    reset to None before each step, so every step allocates and writes them afresh.
    """
    module = provider.module
    params = [p for p in module.parameters() if p.requires_grad]

    def leaves(x):
        return list(x.values()) if isinstance(x, dict) else [x]

    def prepare(i):
        if provider.before_step is not None:
            provider.before_step()
        if mode == "train":
            for p in params:
                p.grad = None
            for t in leaves(inputs[i]):
                t.grad = None

    if mode == "infer":
        def step(i):
            with torch.inference_mode():
                module(inputs[i])
        return prepare, step

    grads = {}

    def step(i):
        out = module(inputs[i])
        out = out["out"] if isinstance(out, dict) else out
        g = grads.get("g")
        if g is None:  # first call (warm-up): the fixed gradient in this output's layout
            g = grads["g"] = torch.empty_like(out).copy_(base_grad)
        out.backward(g)

    return prepare, step
