"""Sharded training (FSDP2's ``fully_shard``) of a model with tied adapters.

FSDP shards the parameters of each wrapped block and gathers them around that block's forward. A tied ``A`` and
``B`` are used by every block, so they belong to none: sharded with the first block that owns them, the next
block finds them resharded (torch 2.13 fails with "Invariant encountered: value was None"). The adapter is
small, a few megabytes even for a 70B model, so the sound layout is data parallelism for the adapter and FSDP
for the base model:

    adapter = set(tied_lora_parameters(model))
    for block in model.model.layers:
        fully_shard(block, ignored_params=adapter)
    fully_shard(model, ignored_params=adapter)
    ...
    loss.backward()
    sync_tied_lora_grads(model)        # average the adapter's gradients across ranks, then step

Ignored parameters are left whole on every rank, where they are: move the model to its GPU first. The config's
``modules_to_save`` (an ``lm_head`` trained in full) are the base model's own modules: sharded with it, FSDP reduces
their gradients and casts them under its ``MixedPrecisionPolicy``, but ``save_tied_lora`` then refuses their
shards. Added to ``ignored_params`` they are left whole (on every rank, with their optimizer state, and outside
the mixed-precision policy), ``sync_tied_lora_grads`` averages them with the adapter, and the adapter saves.
(DDP needs none of this: it averages every gradient itself; adapt the model before wrapping it in DDP.)
"""

from __future__ import annotations

import torch
from torch import nn

from tied_lora_kernels.model import _adapter_params, _refuse_parametrized, _require_layers, _unwrapped
from tied_lora_kernels.targets import _saved_ids

__all__ = ["tied_lora_parameters", "sync_tied_lora_grads"]


def tied_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter (``A``, ``B``, ``u``, ``v``; trained or frozen) once, in the order of
    ``model.named_parameters()``, which is the same on every rank."""
    model = _unwrapped(model)
    layers = _require_layers(model)
    _refuse_parametrized(layers)
    ids = _adapter_params(layers)
    return [p for p in model.parameters() if id(p) in ids]


@torch.no_grad()
def sync_tied_lora_grads(model: nn.Module, group=None) -> None:
    """Average the trained adapter parameters' gradients across ``group`` (default: every rank), in one
    all-reduce: call it after the backward of the last micro-batch, before the optimizer step. The trained
    parameters of the ``modules_to_save`` that are left whole on each rank (in ``ignored_params``) are averaged
    with them; those FSDP shards (DTensors) are FSDP's to reduce. Buffers (a BatchNorm's running statistics in a
    saved module) are left as they are on each rank: DDP would broadcast rank 0's.

    A gradient that is ``None`` on this rank takes part as zeros; a parameter whose gradient is ``None`` on every
    rank keeps ``None`` (so the optimizer skips it, as it would without sharding). Gradients are summed in
    float32 (float64 if one of the parameters is float64) and divided by the group's size, as FSDP averages the sharded
    gradients.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sync_tied_lora_grads needs an initialised torch.distributed process group")
    if group is not None and dist.get_rank(group) < 0:  # (torch would skip the all-reduce, and divide by -1)
        raise ValueError(
            "this rank is not in the group given to sync_tied_lora_grads: call it on that group's ranks only"
        )
    from torch.distributed.tensor import DTensor

    model = _unwrapped(model)
    layers = _require_layers(model)
    _refuse_parametrized(layers)
    adapter = _adapter_params(layers)
    saved = _saved_ids(model)  # (a modules_to_save parameter left whole: averaged too)
    trained = [p for p in model.parameters() if p.requires_grad and (id(p) in adapter or id(p) in saved)]
    if any(isinstance(p, DTensor) for p in trained if id(p) in adapter):
        raise ValueError(
            "the adapter's parameters are sharded (DTensors): pass set(tied_lora_parameters(model)) as "
            "ignored_params to every fully_shard call, so that each rank holds the whole adapter"
        )
    params = [p for p in trained if not isinstance(p, DTensor)]  # (saved modules' shards: FSDP reduces them)
    if not params:
        return
    device = params[0].device
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    # [flattened gradients | one has-a-gradient flag per parameter], so one collective carries both
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device, dtype) for p in params]
        + [torch.tensor([float(p.grad is not None) for p in params], device=device, dtype=dtype)]
    )
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    grads = flat[: -len(params)].split([p.numel() for p in params])
    for p, grad, flag in zip(params, grads, flat[-len(params) :].tolist(), strict=True):
        if flag == 0.0:
            continue
        grad = grad.view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = grad.to(p.device)
        else:
            p.grad.copy_(grad)
