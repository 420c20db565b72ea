"""FSDP2 (``fully_shard``) over a model whose adapters are tied across its blocks: the adapters are left out of
the sharding (``tied_lora_parameters``) and their gradients averaged (``sync_tied_lora_grads``). On CPU, with
gloo process groups."""

from __future__ import annotations

import pytest
import torch

from tests.models import randomise_adapters, tiny_llama
from tied_lora_kernels import QKV, TiedLoRAConfig, apply_tied_lora
from tied_lora_kernels.distributed import sync_tied_lora_grads, tied_lora_parameters

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)


def _model():
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    return model.train()


def _sharded(model):
    adapter = set(tied_lora_parameters(model))
    for block in model.model.layers:
        fsdp.fully_shard(block, ignored_params=adapter)
    fsdp.fully_shard(model, ignored_params=adapter)
    return model


def _adapter_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_tied_lora_parameters_lists_each_adapter_tensor_once():
    model = _model()
    params = tied_lora_parameters(model)
    assert len({id(p) for p in params}) == len(params)
    # tied A and B once for the q/k/v group and once for o_proj, per-layer u and v
    assert len(params) == 2 * 2 + 2 * (2 + 3 + 1)  # pairs + per layer: u (qkv, o) and v (q, k, v, o)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_fully_shard_per_block_with_the_adapter_replicated(process_group):
    """One rank: FSDP's forward and every adapter gradient equal the unsharded model's, twice in a row."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    plain = _model()
    plain(ids, labels=ids).loss.backward()
    want = _adapter_grads(plain)

    sharded = _sharded(_model())
    for step in range(2):
        for p in tied_lora_parameters(sharded):
            p.grad = None
        loss = sharded(ids, labels=ids).loss
        torch.testing.assert_close(loss, plain(ids, labels=ids).loss, rtol=1e-6, atol=0)
        loss.backward()
        sync_tied_lora_grads(sharded)
        got = _adapter_grads(sharded)
        assert got.keys() == want.keys()
        for n in got:
            where = f"step {step} {n}"
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m, w=where: f"{w}: {m}")
    # a gradient that no rank has stays None (the optimizer skips it, as without sharding)
    u = sharded.model.layers[0].self_attn.o_proj.lora_u
    u.grad = None
    sync_tied_lora_grads(sharded)
    assert u.grad is None


def _two_ranks(rank, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(rank))  # each rank its batch
        model = _sharded(_model())
        model(ids, labels=ids).loss.backward()
        o_proj_u = model.model.layers[1].self_attn.o_proj.lora_u
        if rank == 1:
            o_proj_u.grad = None  # a gradient missing on one rank takes part as zeros
        sync_tied_lora_grads(model)
        torch.save(_adapter_grads(model), f"{out}.{rank}")
        sub = dist.new_group([0])  # (every rank takes part in making it)
        if rank == 1:  # not in it: refused, gradients untouched (torch skips the all-reduce; they were divided by -1)
            before = _adapter_grads(model)
            try:
                sync_tied_lora_grads(model, group=sub)
                refused = ""
            except ValueError as e:
                refused = str(e)
            same = all(torch.equal(t, before[n]) for n, t in _adapter_grads(model).items())
            torch.save((refused, same), f"{out}.refused")
        dist.barrier()  # neither rank tears gloo down while the other may still be finishing the all-reduce
    finally:
        dist.destroy_process_group()


def test_two_ranks_average_the_adapter_gradients(tmp_path):
    """Two ranks, two batches: each rank ends with the mean of the two unsharded gradients. A rank outside the
    group it is given is refused by name, its gradients left as they were."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'pg'}", str(tmp_path / "grads")), nprocs=2)
    per_batch = []
    for rank in range(2):
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(rank))
        model = _model()
        model(ids, labels=ids).loss.backward()
        per_batch.append(_adapter_grads(model))
    per_batch[1]["model.layers.1.self_attn.o_proj.lora_scale.u"] = torch.zeros(4)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads.{rank}")
        for n, grad in got.items():
            want = (per_batch[0][n] + per_batch[1][n]) / 2
            where = f"rank {rank} {n}"
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7, msg=lambda m, w=where: f"{w}: {m}")
    refused, same = torch.load(tmp_path / "grads.refused")
    assert "this rank is not in the group given to sync_tied_lora_grads" in refused and same


def test_sync_refuses_a_sharded_adapter(process_group):
    model = _model()
    fsdp.fully_shard(model)  # the adapter sharded with the rest: its gradients are FSDP's to reduce
    with pytest.raises(ValueError, match="pass set\\(tied_lora_parameters\\(model\\)\\) as ignored_params"):
        sync_tied_lora_grads(model)


def test_sync_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        sync_tied_lora_grads(_model())
