"""SyncBatchNorm across 2 processes (gloo, CPU): fused modules in SyncBN mode match one
process running plain BatchNorm on the whole batch (which is what SyncBatchNorm computes):
outputs, input gradients, DDP-averaged weight gradients and running statistics."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import aspp_fused
import aspp_fused.nn as ann
from conftest import BACKENDS, assert_close_rel, randomize_bn

WORLD = 2
PER_RANK = 3  # 6 images in all: the pooling BN is well conditioned (see test_modules.SHAPES)


def _make_twin(kind):
    torch.manual_seed(0)
    if kind == "aspp":
        twin = ann.ASPP(8, [2, 5], out_channels=6)
    else:
        twin = ann.SeparableASPP(8, 6, [2, 5])
    twin.project[3].p = 0.0  # dropout masks differ per process; BN is what is tested here
    return randomize_bn(twin)


def _worker(rank, kind, backend, init_file, x, g, out_dir):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD)
    try:
        twin = nn.SyncBatchNorm.convert_sync_batchnorm(_make_twin(kind))
        fused = aspp_fused.convert(twin, backend=backend).train()
        xs = x.chunk(WORLD)[rank].clone().requires_grad_(True)
        y = fused(xs)
        y.backward(g.chunk(WORLD)[rank])
        # What DDP's reducer does: average the gradients over ranks. (DDP itself refuses to
        # wrap a module holding SyncBatchNorm layers unless it lives on a GPU.)
        for p in fused.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        torch.save({"y": y.detach(), "gx": xs.grad,
                    "grads": {n: p.grad for n, p in fused.named_parameters()},
                    "buffers": dict(fused.named_buffers())}, os.path.join(out_dir, "%d.pt" % rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["aspp", "sep_aspp"])
def test_syncbn_ddp_matches_full_batch(tmp_path, kind, backend):
    x = torch.randn(WORLD * PER_RANK, 8, 7, 9)
    g = torch.randn(WORLD * PER_RANK, 6, 7, 9)
    mp.start_processes(_worker, args=(kind, backend, str(tmp_path / "init"), x, g, str(tmp_path)), nprocs=WORLD,
                       join=True, start_method="spawn")
    results = [torch.load(str(tmp_path / ("%d.pt" % r))) for r in range(WORLD)]

    ref = _make_twin(kind).double().train()
    x64 = x.double().requires_grad_(True)
    y_ref = ref(x64)
    y_ref.backward(g.double())
    assert_close_rel(torch.cat([r["y"] for r in results]), y_ref, 1e-5, "output")
    assert_close_rel(torch.cat([r["gx"] for r in results]), x64.grad, 1e-5, "input grad")
    for name, p in ref.named_parameters():
        # DDP averages the ranks' gradients; the full-batch loss is their sum.
        for r in results:
            assert_close_rel(r["grads"][name] * WORLD, p.grad, 1e-5, "grad of " + name)
    for name, b in ref.named_buffers():
        for r in results:
            if b.is_floating_point():
                assert_close_rel(r["buffers"][name], b, 1e-5, name)
            else:
                assert torch.equal(r["buffers"][name], b), name
