"""FSDP2 (``fully_shard``) over a model whose adapters are tied across its blocks: the adapters are left out of
the sharding (``tied_lora_parameters``) and their gradients averaged (``sync_tied_lora_grads``). On CPU, with
gloo process groups."""

from __future__ import annotations

import datetime
import os
import time
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from tests.models import randomise_adapters, tiny_llama
from tied_lora_kernels import (
    QKV,
    TiedLoRAConfig,
    apply_tied_lora,
    load_tied_lora,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_state_dict,
)
from tied_lora_kernels.distributed import sync_tied_lora_grads, tied_lora_parameters

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)


def _model(saved=()):
    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",), modules_to_save=saved)
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    return model.train()


def _sharded(model):
    """docs/guide.md's layout: the adapter left whole on every rank, and a head trained in full (``modules_to_save``)
    with it, where the model has one."""
    adapter = set(tied_lora_parameters(model))
    if model.lm_head.weight.requires_grad:
        adapter |= set(model.lm_head.parameters())
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
    # modules_to_save are the base model's own: sharded with it unless the caller leaves them whole too
    model = _model(saved=("lm_head",))
    with_head = tied_lora_parameters(model)
    assert len(with_head) == len(params) and all(p is not model.lm_head.weight for p in with_head)


def test_fully_shard_per_block_with_the_adapter_replicated(process_group, tmp_path):
    """One rank: FSDP's forward and every adapter gradient (with a head trained in full, ``modules_to_save``, left
    whole beside the adapter) equal the unsharded model's, twice in a row; the adapter saves and loads."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    plain = _model(saved=("lm_head",))
    plain(ids, labels=ids).loss.backward()
    want = _adapter_grads(plain)

    sharded = _sharded(_model(saved=("lm_head",)))
    for step in range(2):
        for p in sharded.parameters():
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
    # every rank holds the adapter and the head whole: saving works, and the file loads into a bare model
    save_tied_lora(sharded, tmp_path)
    loaded = tied_lora_state_dict(load_tied_lora(tiny_llama(), tmp_path))
    for name, tensor in tied_lora_state_dict(sharded).items():
        assert torch.equal(loaded[name], tensor), name


def test_a_sharded_adapter_is_refused_by_name(process_group, tmp_path):
    """FSDP without ignored_params shards the adapter and the head into DTensors: saving, exporting and loading
    refuse them by name (they crashed in safetensors or torch)."""
    from tied_lora_kernels import export_peft_lora

    model = _model(saved=("lm_head",))
    save_tied_lora(model, tmp_path / "whole")
    fsdp.fully_shard(model)
    message = "are sharded \\(DTensors: each rank holds a shard\\)"
    for call in (
        lambda: save_tied_lora(model, tmp_path / "sharded"),
        lambda: export_peft_lora(model, tmp_path / "peft"),
        lambda: load_tied_lora(model, tmp_path / "whole"),
        lambda: tied_lora_state_dict(model),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="load the adapter into the model before fully_shard"):
        load_tied_lora(model, tmp_path / "whole")
    # gather=True gathers the shards (one rank: its shard is the whole tensor; two ranks below)
    whole = tied_lora_state_dict(_model(saved=("lm_head",)))
    gathered = tied_lora_state_dict(model, gather=True)
    assert gathered.keys() == whole.keys()
    assert all(type(t) is torch.Tensor and torch.equal(t, whole[n]) for n, t in gathered.items())
    # the adapter whole, the head sharded with the base (FSDP reduces its gradients): trains, saves nothing
    model = _model(saved=("lm_head",))
    adapter = set(tied_lora_parameters(model))
    fsdp.fully_shard(model, ignored_params=adapter)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    model(ids, labels=ids).loss.backward()
    sync_tied_lora_grads(model)  # (the adapter's; the head's DTensor gradient is FSDP's, left alone)
    with pytest.raises(ValueError, match="\\['lm_head.weight'\\] are sharded"):
        save_tied_lora(model, tmp_path / "sharded")


def test_adapting_a_sharded_model_is_refused(process_group, tmp_path):
    """A model FSDP2 already sharded is refused by apply_tied_lora and by load_tied_lora of a bare model (the adapted
    layers' forward failed, mixing the sharded base weights with the new plain adapter), left as it was."""
    from tied_lora_kernels import load_peft_adapter

    save_tied_lora(_model(), tmp_path)
    model = tiny_llama()
    fsdp.fully_shard(model)
    message = "are sharded \\(DTensors: fully_shard or tensor parallelism\\): adapt \\(or load the adapter into\\)"
    for call in (
        lambda: apply_tied_lora(model, TiedLoRAConfig(rank=4)),
        lambda: load_tied_lora(model, tmp_path),
        lambda: load_peft_adapter(model, tmp_path / "absent"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert not tied_lora_layers(model)
    with pytest.raises(TypeError, match="gather must be True or False"):
        tied_lora_state_dict(_model(), gather=1)


def test_adapting_inside_ddp_is_refused(process_group, tmp_path):
    """DDP takes the parameters it averages when it is built: an adapter created inside it would train apart on
    each rank. Adapting or loading into a bare model inside DDP is refused, the model left bare; loading into a model
    adapted before wrapping works."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    save_tied_lora(model, tmp_path)
    bare = tiny_llama()
    wrapped = DDP(bare)
    with pytest.raises(ValueError, match="wrapped in DistributedDataParallel"):
        apply_tied_lora(wrapped, TiedLoRAConfig(rank=4))
    with pytest.raises(ValueError, match="wrapped in DistributedDataParallel"):
        load_tied_lora(wrapped, tmp_path)
    with pytest.raises(ValueError, match="'inner' is wrapped in DistributedDataParallel"):
        apply_tied_lora(torch.nn.ModuleDict({"inner": wrapped}), TiedLoRAConfig(rank=4))
    assert not tied_lora_layers(bare) and all(p.requires_grad for p in bare.parameters())
    adapted = DDP(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",))))
    load_tied_lora(adapted, tmp_path)
    for name, tensor in tied_lora_state_dict(model).items():
        assert torch.equal(tied_lora_state_dict(adapted)[name], tensor), name


def _two_ranks(rank, init, out):
    import torch.distributed as dist

    # a rank that fails leaves the other in a collective: a timeout ends it (and the test) instead of gloo's 30 min
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(rank))  # each rank its batch
        model = _sharded(_model(saved=("lm_head",)))
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


def _two_ranks_save(rank, init, out):
    import safetensors.torch
    import torch.distributed as dist

    from tied_lora_kernels import export_peft_lora
    from tied_lora_kernels.hf import SaveTiedLoRACallback

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        model = _model(saved=("lm_head",))
        fsdp.fully_shard(model)  # every tensor sharded over the two ranks: lm_head's 97 rows as 49 and 48
        assert model.lm_head.weight.to_local().shape[0] == (49, 48)[rank]
        save_tied_lora(model, f"{out}/tied{rank}", gather=True)  # every rank calls; rank 0 alone writes
        export_peft_lora(model, f"{out}/peft{rank}", gather=True)
        with warnings.catch_warnings(record=True) as caught:  # a warning about the model: once, from the writer
            warnings.simplefilter("always")
            export_peft_lora(model.model, f"{out}/headless{rank}", gather=True)
        warned = [str(w.message)[:40] for w in caught]
        # Trainer calls its callbacks on every process: the main one writes
        args = SimpleNamespace(output_dir=f"{out}/callback{rank}")
        state = SimpleNamespace(global_step=3, is_world_process_zero=rank == 0)
        SaveTiedLoRACallback().on_train_end(args, state, None, model=model)
        # rank 0 slow to write, then failing: no rank returns before the files are there, and a failure reaches all
        real, seen = safetensors.torch.save_file, {}

        def slow(*args, **kwargs):
            time.sleep(1.0)
            real(*args, **kwargs)

        def full(*args, **kwargs):
            raise OSError("No space left on device")

        def by_callback(model, directory, gather):  # Trainer's path: every process calls, the main one writes
            done = SimpleNamespace(output_dir=os.path.dirname(directory))
            SaveTiedLoRACallback._save(done, state, model, os.path.basename(directory))

        for kind, save in (("tied", save_tied_lora), ("peft", export_peft_lora), ("callback", by_callback)):
            with mock.patch("safetensors.torch.save_file", slow):
                save(model, f"{out}/{kind}-shared", gather=True)
                seen[kind] = sorted(os.listdir(f"{out}/{kind}-shared")) if os.path.isdir(f"{out}/{kind}-shared") else []
            with mock.patch("safetensors.torch.save_file", full):
                try:
                    save(model, f"{out}/{kind}-full", gather=True)
                    seen[f"{kind}-full"] = None
                except Exception as e:  # noqa: BLE001 (checked by the test)
                    seen[f"{kind}-full"] = f"{type(e).__name__}: {e}"
        seen["warned"] = warned
        torch.save(seen, f"{out}/seen.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_save_sharded_tensors_gathered(tmp_path):
    """FSDP2 shards the adapter and a head trained in full: ``gather=True`` saves and exports them whole, every rank
    calling and rank 0 alone writing, the same files as the unsharded model's; so does ``SaveTiedLoRACallback``.
    Every rank returns once rank 0 has written (the files are there, however slow the writing), and each raises
    when rank 0 failed to write; the callback's saves too."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tied_lora_kernels import export_peft_lora

    mp.spawn(_two_ranks_save, args=(f"file://{tmp_path / 'pg'}", str(tmp_path)), nprocs=2)
    assert not any((tmp_path / f"{kind}1").exists() for kind in ("tied", "peft", "callback"))
    whole = _model(saved=("lm_head",))
    want = tied_lora_state_dict(whole)
    for saved in (tmp_path / "tied0", tmp_path / "callback0" / "adapter-final"):  # (SaveTiedLoRACallback's)
        loaded = tied_lora_state_dict(load_tied_lora(tiny_llama(), saved))
        assert loaded.keys() == want.keys() and all(torch.equal(loaded[n], t) for n, t in want.items()), saved
    export_peft_lora(whole, tmp_path / "peft-whole")
    got, want = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft0", "peft-whole"))
    assert got.keys() == want.keys() and all(torch.equal(got[n], t) for n, t in want.items())
    assert (tmp_path / "peft0" / "adapter_config.json").read_text() == (
        tmp_path / "peft-whole" / "adapter_config.json"
    ).read_text()
    for rank in range(2):
        seen = torch.load(tmp_path / f"seen.{rank}")
        assert seen["warned"] == ["export_peft_lora: this LlamaModel has no"] * (rank == 0), (rank, seen)
        for kind in ("tied", "peft", "callback"):
            assert seen[kind] == ["adapter_config.json", "adapter_model.safetensors"], (rank, seen)
            want = "OSError: No space left on device"
            if rank == 1:
                want = f"RuntimeError: rank 0 failed to write '{tmp_path}/{kind}-full': {want}"
            assert seen[f"{kind}-full"] == want, (rank, seen)


def test_two_ranks_average_the_adapter_gradients(tmp_path):
    """Two ranks, two batches: each rank ends with the mean of the two unsharded gradients (the head trained in full
    with the adapter's, ``modules_to_save``). A rank outside the
    group it is given is refused by name, its gradients left as they were."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(f"file://{tmp_path / 'pg'}", str(tmp_path / "grads")), nprocs=2)
    per_batch = []
    for rank in range(2):
        ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(rank))
        model = _model(saved=("lm_head",))
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


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_dtensor_inputs_run_the_torch_path_under_auto(process_group, monkeypatch, compiled):
    """DTensors (tensor parallelism) have no plain memory for the fused kernels: "auto", which picks triton on a GPU,
    runs the torch path on them, also under torch.compile (which traces the check; the custom op has no sharding
    rule), and backend="triton" refuses them by name."""
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor

    from tied_lora_kernels import functional
    from tied_lora_kernels.functional import tied_lora_linear

    g = torch.Generator().manual_seed(0)
    plain = [torch.randn(*shape, generator=g) for shape in [(5, 16), (12, 16), (12,), (4, 16), (12, 4), (4,), (12,)]]
    mesh = DeviceMesh("cpu", [0])
    inputs = [distribute_tensor(t, mesh, [Replicate()]) for t in plain]
    with pytest.raises(TypeError, match="x is a torch.distributed.tensor.DTensor .*backend='torch' or 'auto'"):
        tied_lora_linear(*inputs, 0.5, backend="triton")
    monkeypatch.setattr(functional, "resolve_backend", lambda backend, x, rank=1: "triton")  # (what a GPU gives)
    run = torch.compile(tied_lora_linear, backend="eager") if compiled else tied_lora_linear
    y = run(*inputs, 0.5, backend="auto")
    torch.testing.assert_close(y.full_tensor(), tied_lora_linear(*plain, 0.5, backend="torch"), rtol=1e-6, atol=1e-6)
