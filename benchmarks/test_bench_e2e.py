"""End-to-end training step of a small random-weight LlamaForCausalLM: Tied-LoRA TL6 vs PEFT LoRA vs VeRA.

Every provider adapts q_proj, k_proj and v_proj at the same rank (TL6: q, k, v of a layer share A and u,
as in the paper's fused-QKV setup, A and B tied across layers). One step = forward with labels, backward,
AdamW step, zero_grad. Recorded: step time, trainable parameters, bytes saved for backward by the forward
(activations only) and, on CUDA, the peak memory of a step above the model, gradients and optimizer state.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import providers, timing
from benchmarks.conftest import DEVICE

pytestmark = [pytest.mark.e2e] + ([pytest.mark.gpu] if DEVICE.type == "cuda" else [])

RANK = 8
# (model size, batch, sequence, dtype) per device: CPU small enough for a few seconds per provider
SETUP = {
    "cpu": (dict(hidden_size=256, intermediate_size=688, num_attention_heads=8), 2, 128, torch.float32),
    "cuda": (dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16), 4, 1024, torch.bfloat16),
}
E2E_PROVIDERS = ("tl6-torch", "tl6-triton", "peft-lora", "peft-vera")


def _model(dtype: torch.dtype):
    transformers = pytest.importorskip("transformers")
    size, _, _, _ = SETUP[DEVICE.type]
    heads = size["num_attention_heads"]
    config = transformers.LlamaConfig(
        **size,
        num_hidden_layers=4,
        num_key_value_heads=heads // 4,  # GQA, like LLaMA-3
        vocab_size=8192 if DEVICE.type == "cpu" else 32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):  # initialise on the device: seconds saved per model on a GPU machine
        return transformers.LlamaForCausalLM(config).to(dtype)


def _adapt(provider: str, model):
    targets = ["q_proj", "k_proj", "v_proj"]
    if provider.startswith("tl6"):
        from tied_lora_kernels import TiedLoRAConfig, apply_tied_lora

        backend = provider.removeprefix("tl6-")
        return apply_tied_lora(model, TiedLoRAConfig(rank=RANK, preset="tl6", backend=backend))
    import peft

    if provider == "peft-lora":
        config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, lora_dropout=0.0)
    else:
        config = peft.VeraConfig(r=RANK, target_modules=targets, vera_dropout=0.0)
    return peft.get_peft_model(model, config)


def _train_step(provider: str, batch: int, seq: int, dtype: torch.dtype):
    """(model, trainable, step, ids) for one provider: a fresh model, AdamW, random tokens."""
    model = _adapt(provider, _model(dtype))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen, device=DEVICE)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, trainable, step, ids


@pytest.mark.parametrize("provider", E2E_PROVIDERS)
def test_train_step(benchmark, provider: str):
    if provider.startswith("peft"):
        reason = providers.unavailable(provider, DEVICE)
    else:
        reason = providers.unavailable("triton", DEVICE) if provider == "tl6-triton" else None
    if reason:
        pytest.skip(reason)
    _, batch, seq, dtype = SETUP[DEVICE.type]
    model, trainable, step, ids = _train_step(provider, batch, seq, dtype)
    frozen = list(model.parameters()) + list(model.buffers())
    saved = timing.saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, exclude=frozen)
    cfg = model.config
    benchmark.group = f"e2e llama {cfg.hidden_size}x{cfg.num_hidden_layers} {str(dtype).removeprefix('torch.')}"
    paired = None
    if DEVICE.type == "cpu" and not benchmark.disabled and providers.unavailable("peft-lora", DEVICE) is None:
        paired = (None, _train_step("peft-lora", batch, seq, dtype)[2])  # PEFT LoRA, round by round
    # CPU steps are long and the machine may be shared: 25 paired rounds (about 8 s per provider)
    how, reference = timing.run(benchmark, step, None, DEVICE, paired=paired, target_s=4.0 if paired else None)
    peak = timing.cuda_peak_bytes(step, None, DEVICE)

    benchmark.extra_info.update(
        kind="e2e",
        provider=provider,
        shape=f"llama-h{cfg.hidden_size}-L{cfg.num_hidden_layers}-kv{cfg.num_key_value_heads}",
        tokens=batch * seq,
        batch=batch,
        seq=seq,
        rank=RANK,
        mode="train-step",
        dtype=str(dtype).removeprefix("torch."),
        trainable_params=sum(p.numel() for p in trainable),
        saved_bytes=saved,
        peak_bytes=peak,
        timing=how,
        paired_reference="peft-lora" if reference else None,
        paired_reference_s=reference,
        **timing.device_info(DEVICE.type),
    )
