"""Model-level behaviour: apply, the paper's parameter counts, zero start, real tying, tied gradients summed
across layers, merge/unmerge/unload, targets, disabling, hooks, and the errors a user can run into (saving and
loading: ``test_save_load.py``; Hugging Face training: ``test_hf_integration.py``)."""

from __future__ import annotations

import importlib
import pickle
import warnings

import pytest
import torch
import transformers
from torch import nn
from torch.nn.utils import prune

from tests.helpers import assert_close_to_reference, cpu_triton
from tests.models import CONFIGS, Toy, randomise_adapters, tiny_llama
from tied_lora_kernels import (
    ALL_LINEAR,
    QKV,
    TiedLoRAConfig,
    TiedLoRALinear,
    TiedLoRAShared,
    apply_tied_lora,
    count_parameters,
    disable_tied_lora,
    export_peft_lora,
    load_peft_adapter,
    load_tied_lora,
    merge_tied_lora,
    reference,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_state_dict,
    unload_tied_lora,
    unmerge_tied_lora,
)

# ---------------------------------------------------------------------------------------------------------
# the paper's numbers (docs/design.md §1), counted on meta-device models built from the real configs


def _llama2_7b():
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def test_paper_numbers_llama2_7b_qkv_grouped():
    counts = {
        preset: count_parameters(apply_tied_lora(_llama2_7b(), TiedLoRAConfig(rank=8, preset=preset))).trainable
        for preset in ("lora", "tl5", "tl6", "vera")
    }
    assert counts == {"lora": 4_194_304, "tl5": 131_072, "tl6": 524_544, "vera": 393_472}
    assert round(100 * counts["tl6"] / counts["lora"], 1) == 12.5
    peft_lora = count_parameters(apply_tied_lora(_llama2_7b(), TiedLoRAConfig(rank=8, preset="lora", groups=())))
    assert peft_lora.trainable == 6_291_456  # PEFT's LoRA on q, k, v: a pair per projection (README)
    assert round(100 * counts["tl6"] / peft_lora.trainable, 1) == 8.3


def test_paper_numbers_gpt_2b_fused_qkv():
    """GPT-2B's shape (24 layers, d = 2048) with one fused QKV linear per layer, as in the paper."""
    config = transformers.GPTNeoXConfig(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=5440, vocab_size=256000
    )

    def count(preset):
        with torch.device("meta"):
            model = transformers.GPTNeoXForCausalLM(config)
        cfg = TiedLoRAConfig(rank=8, preset=preset, target_modules=["query_key_value"], groups=())
        return count_parameters(apply_tied_lora(model, cfg)).trainable

    lora, tl6 = count("lora"), count("tl6")
    assert lora == 24 * (8 * 2048 + 3 * 2048 * 8)
    assert tl6 == 8 * 2048 + 3 * 2048 * 8 + 24 * (8 + 3 * 2048)
    assert round(100 * tl6 / lora, 2) == 13.55


# ---------------------------------------------------------------------------------------------------------
# zero start, tying


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_start_every_configuration(name):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        apply_tied_lora(model, TiedLoRAConfig(rank=4, target_modules=QKV + ("o_proj", "down_proj"), **CONFIGS[name]))
        after = model(ids).logits
    assert torch.equal(before, after)


def test_apply_freezes_base_and_trains_only_the_adapter():
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".shared." in n or ".lora_" in n for n in trainable)


def test_tying_is_real():
    model = apply_tied_lora(Toy(layers=4), TiedLoRAConfig(rank=4, preset="tl6"))
    layers = tied_lora_layers(model)
    q = [m for n, m in layers.items() if n.endswith("q_proj")]
    k = [m for n, m in layers.items() if n.endswith("k_proj")]
    assert len({id(m.shared) for m in layers.values()}) == 1  # q, k, v of every layer: one A, one stacked B
    assert all(m.shared.A.data_ptr() == q[0].shared.A.data_ptr() for m in layers.values())
    assert q[0].b_rows == (0, 24) and k[0].b_rows == (24, 40)
    assert all(a.lora_u is b.lora_u for a, b in zip(q, k, strict=True))  # u shared within a layer's group
    assert len({id(m.lora_u) for m in q}) == 4  # ... and per layer

    randomise_adapters(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    adapter_tensors = len(opt.param_groups[0]["params"])
    assert adapter_tensors == 2 + 4 * (1 + 3)  # A, B + per layer (u + three v)
    model(torch.randn(3, 24)).sum().backward()
    before = q[0].shared.A.detach().clone()
    opt.step()
    assert not torch.equal(before, q[3].shared.A)  # one step, one tensor, seen by every layer
    model.double()
    assert all(m.shared.A is q[0].shared.A and m.shared.A.dtype == torch.float64 for m in layers.values())


def test_functional_call_with_untied_weights_leaves_the_model_intact():
    # every layer of a tie group registers one TiedLoRAShared module; torch.func.functional_call's default
    # tie_weights=True then restores the wrong tensors (pytorch#164759), so docs/api.md says tie_weights=False:
    # one name per tied tensor computes with it in every layer, and the model keeps its parameters
    from torch.func import functional_call

    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, preset="tl6"))
    randomise_adapters(model)
    before = dict(model.named_parameters())
    params = {k: v.detach() * (2 if k.endswith("shared.A") else 1) for k, v in before.items()}
    x = torch.randn(3, 24)
    out = functional_call(model, params, (x,), tie_weights=False)
    assert dict(model.named_parameters()) == before and all(type(p) is nn.Parameter for p in before.values())
    with torch.no_grad():
        for name, p in model.named_parameters():  # (each tensor once)
            if name.endswith("shared.A"):
                p.mul_(2)
        assert torch.equal(out, model(x))


def test_tie_off_gives_one_pair_per_layer_and_group():
    model = apply_tied_lora(Toy(layers=3), TiedLoRAConfig(rank=4, preset="lora", target_modules=QKV + ("o_proj",)))
    shared = {id(m.shared) for m in tied_lora_layers(model).values()}
    assert len(shared) == 3 * 2  # per layer: the qkv group and o_proj


# ---------------------------------------------------------------------------------------------------------
# gradients of the torch path equal autograd on the float64 reference, tied ones summed across layers


def _reference_forward(self, x):
    return reference.tied_lora_forward(
        x, self.weight, self.bias, self.shared.A, self.lora_B, self.lora_u, self.lora_v, self.scale, upcast=True
    )


def _plain_forward(self, x):
    return reference.tied_lora_forward(
        x, self.weight, self.bias, self.shared.A, self.lora_B, self.lora_u, self.lora_v, self.scale
    )


# every configuration on the torch backend; the presets and an untied one on the triton kernels (the CPU
# interpreter without a GPU): grouped q/k/v reading rows of one B, tied A and B summed over layers
_BACKEND_CASES = [(name, "torch") for name in CONFIGS] + [
    pytest.param(name, "triton", marks=cpu_triton) for name in ("lora", "tl5", "tl6", "vera", "untied_ABuv")
]


@pytest.mark.parametrize("name,backend", _BACKEND_CASES)
def test_gradients_match_float64_reference(name, backend, monkeypatch):
    config = TiedLoRAConfig(rank=4, alpha=2.0, target_modules=QKV + ("o_proj",), backend=backend, **CONFIGS[name])
    model = apply_tied_lora(Toy(), config)
    randomise_adapters(model)
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2))

    def grads(forward=None):
        model.zero_grad()
        if forward is not None:
            monkeypatch.setattr(TiedLoRALinear, "forward", forward)
        y = model(x)
        monkeypatch.undo()
        (y.double() * torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64)).sum().backward()
        return y, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    y, got = grads()
    y64, want = grads(_reference_forward)
    yb, base = grads(_plain_forward)
    assert_close_to_reference(y, y64, yb, "y")
    assert got.keys() == want.keys() and got
    for n in got:
        assert_close_to_reference(got[n], want[n], base[n], f"grad {n}")


# ---------------------------------------------------------------------------------------------------------
# merge, unload, targets


def test_merge_unmerge_unload_model():
    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    x = torch.randn(4, 24)
    base_weight = model.layers[0].q_proj.weight.detach().clone()
    y = model(x)
    merge_tied_lora(model)
    with torch.no_grad():  # (a training forward of merged layers warns)
        assert_close_to_reference(model(x), y.double(), None, "merged")
    with pytest.raises(RuntimeError, match="already merged"):
        merge_tied_lora(model)
    unmerge_tied_lora(model)
    torch.testing.assert_close(model.layers[0].q_proj.weight, base_weight, rtol=0, atol=1e-6)
    merge_tied_lora(model)
    merged_weight = model.layers[0].q_proj.weight.detach().clone()
    merge_tied_lora(model, unload=True)  # merged already: unloaded as it is, not merged twice
    assert torch.equal(model.layers[0].q_proj.weight, merged_weight)
    assert not tied_lora_layers(model) and type(model.layers[0].q_proj) is nn.Linear
    assert_close_to_reference(model(x), y.double(), None, "unloaded")
    assert b"tied_lora_kernels" not in pickle.dumps(model)  # plain again: no load hook of ours left


def test_merge_copies_each_tied_tensor_once():
    """merge keeps a copy of the factors it merged, for unmerge; merge_tied_lora copies a tensor its layers share (a
    tied A and B, a group's u) once for all of them, not once per layer (11x the adapter's own size at LLaMA-2-7B,
    all-linear, r = 8): the copies take what the adapter takes. Unmerge still takes out the ΔW merged after the
    shared pair changed."""
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules="all-linear"))
    randomise_adapters(model)
    layers = tied_lora_layers(model)
    adapter = sum(t.numel() * t.element_size() for t in tied_lora_state_dict(model).values())
    weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    deltas = {name: layer.delta_weight().detach() for name, layer in layers.items()}
    merge_tied_lora(model)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for layer in layers.values() for t in layer._merged_factors if t is not None}  # fmt: skip
    assert sum(storages.values()) == adapter, (sum(storages.values()), adapter)
    with torch.no_grad():
        for shared in {id(layer.shared): layer.shared for layer in layers.values()}.values():
            shared.A.add_(1.0)  # (trained through layers merged; unmerge takes out what merge put in)
    unmerge_tied_lora(model)
    for name, layer in layers.items():
        atol = 4 * torch.finfo(torch.float32).eps * (weights[name].abs().max().item() + deltas[name].abs().max().item())
        torch.testing.assert_close(layer.weight, weights[name], rtol=0, atol=atol, msg=name)


def test_merge_of_factors_a_parametrization_computes_merges_each_layer_s_own():
    """A factor computed at each access (a parametrization on the pair) is a new tensor each time: merge_tied_lora's
    shared copies must not hand one layer's copy to another whose temporary got the freed one's id (B merged as A:
    off by 19, or a shape error)."""
    import torch.nn.utils.parametrize as parametrize

    class Twice(nn.Module):
        def forward(self, t):
            return t * 2.0

    for d, R in ((8, 8), (24, 4)):
        model = nn.Sequential(nn.Linear(d, d), nn.Linear(d, d))
        model = apply_tied_lora(model, TiedLoRAConfig(rank=R, preset="lora", target_modules=["0", "1"]))
        randomise_adapters(model)
        for layer in tied_lora_layers(model).values():
            parametrize.register_parametrization(layer.shared, "A", Twice())
            parametrize.register_parametrization(layer.shared, "B", Twice())
        x = torch.randn(3, d, generator=torch.Generator().manual_seed(d))
        with torch.no_grad():
            y = model(x)
            merge_tied_lora(model)
            torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_unload_without_merging_gives_the_base_model_back():
    """PEFT's unload(): plain nn.Linear layers holding the base weights as they were (bit for bit the base model),
    the same parameter objects; merged layers are refused."""
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = tiny_llama()(ids).logits
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    weight = model.model.layers[0].self_attn.q_proj.weight
    merge_tied_lora(model)
    with pytest.raises(RuntimeError, match="are merged: unmerge_tied_lora"):
        unload_tied_lora(model)
    unmerge_tied_lora(model)
    assert unload_tied_lora(model) is model and not tied_lora_layers(model)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear and q.weight is weight and not hasattr(model, "tied_lora_config")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)  # unmerge rounds in float32
    fresh = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    randomise_adapters(fresh)
    unload_tied_lora(torch.compile(fresh))  # through the wrapper (nothing is traced)
    assert not tied_lora_layers(fresh) and not hasattr(fresh, "tied_lora_config")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)  # never merged: bit for bit
    # plain again: its load hook is gone too, so it pickles (torch.save) without this library
    assert b"tied_lora_kernels" not in pickle.dumps(model) and b"tied_lora_kernels" not in pickle.dumps(fresh)


@pytest.mark.parametrize("spelling", ["all-linear", "ALL-LINEAR"])
def test_all_linear_targets_every_linear_but_the_output_layer(tmp_path, spelling):
    """PEFT's shorthand: every nn.Linear except lm_head (tied to the embeddings or not); ties per role and shape."""
    for tied_embeddings in (False, True):
        model = tiny_llama(tie_word_embeddings=tied_embeddings)
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        apply_tied_lora(model, TiedLoRAConfig(rank=4, target_modules=spelling))
        assert set(tied_lora_layers(model)) == linears - {"lm_head"}
        assert model.tied_lora_config.target_modules == ALL_LINEAR
        # q/k/v grouped, then o, gate, up and down: one tied pair each across the two decoder layers
        assert len({id(layer.shared) for layer in tied_lora_layers(model).values()}) == 5
    randomise_adapters(model)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    save_tied_lora(model, tmp_path)
    fresh = load_tied_lora(tiny_llama(tie_word_embeddings=True), tmp_path)
    assert fresh.tied_lora_config.target_modules == ALL_LINEAR
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    # a plain module has no output layer to leave out: every linear is adapted
    toy = apply_tied_lora(Toy(), TiedLoRAConfig(rank=2, target_modules=ALL_LINEAR))
    assert set(tied_lora_layers(toy)) == {n for n, m in Toy().named_modules() if isinstance(m, nn.Linear)}


def test_a_regular_expression_string_targets_as_in_peft(tmp_path):
    """A target_modules string with regular-expression characters is PEFT's full-match regex; it is saved as
    such, and the file loads onto a bare model."""
    config = TiedLoRAConfig(rank=4, target_modules=r".*\.(q_proj|v_proj)", groups=())
    model = apply_tied_lora(tiny_llama(), config)
    assert sorted(tied_lora_layers(model)) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert config.to_dict()["target_modules"] == r".*\.(q_proj|v_proj)"
    save_tied_lora(model, tmp_path)
    assert sorted(tied_lora_layers(load_tied_lora(tiny_llama(), tmp_path))) == sorted(tied_lora_layers(model))
    with pytest.raises(ValueError, match="is not a regular expression"):
        TiedLoRAConfig(target_modules="(q_proj")
    with pytest.raises(ValueError, match="a string is a module name unless it holds regular-expression characters"):
        apply_tied_lora(tiny_llama(), TiedLoRAConfig(target_modules="model.q_proj"))


def test_all_linear_leaves_out_classification_heads_and_linear_subclasses():
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, num_labels=2, pad_token_id=0)  # fmt: skip
    classifier = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**shape))
    apply_tied_lora(classifier, TiedLoRAConfig(rank=4, target_modules=ALL_LINEAR))  # score: [2, 32]
    assert "score" not in tied_lora_layers(classifier) and len(tied_lora_layers(classifier)) == 14
    # MultiheadAttention's out_proj is a Linear subclass that its parent never calls: adapting it would do nothing
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    apply_tied_lora(model, TiedLoRAConfig(rank=2, target_modules=ALL_LINEAR))
    assert set(tied_lora_layers(model)) == {"1"}


def test_all_linear_adapts_a_layer_narrower_than_the_rank():
    """A question-answering head (hidden -> 2; not a classification head, so "all-linear" takes it, as PEFT's does)
    gets a pair at rank 8 as PEFT would give it one; the model trains it, and computes what its merged weights do."""
    shape = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(**shape)).double().eval()
    apply_tied_lora(model, TiedLoRAConfig(rank=8, target_modules=ALL_LINEAR, dtype=torch.float64))
    head = tied_lora_layers(model)["qa_outputs"]
    assert head.shared.A.shape == (8, 32) and head.lora_B.shape == (2, 8)
    randomise_adapters(model)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    (out.start_logits.sum() + out.end_logits.square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (head.shared.A, head.shared.B, head.lora_v))
    with torch.no_grad():
        merged = model(ids)
        merge_tied_lora(model)
        torch.testing.assert_close(model(ids).start_logits, merged.start_logits, rtol=1e-12, atol=1e-12)


def test_falcon_adapts_trains_merges_and_goes_to_peft_and_back(tmp_path):
    """Falcon's linears are transformers' FalconLinear (bias added apart, see test_modules): "all-linear" adapts all
    four kinds; the adapted model computes what its merged weights do and what PEFT computes with the exported
    adapter, a PEFT LoRA loads onto it, and unloading or merging with unload gives FalconLinear layers back. Disabled,
    it computes FalconLinear's own product-then-bias bit for bit (biases made non-zero so that the order shows)."""
    peft = pytest.importorskip("peft")
    falcon_linear = pytest.importorskip("transformers.models.falcon.modeling_falcon").FalconLinear

    def falcon():
        torch.manual_seed(0)
        shape = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, bias=True)
        model = transformers.FalconForCausalLM(transformers.FalconConfig(**shape)).double().eval()
        with torch.no_grad():  # (biases start at zero: a bias added in the product's place would go unseen)
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_()
        return model

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    model = apply_tied_lora(falcon(), TiedLoRAConfig(rank=4, target_modules=ALL_LINEAR, dtype=torch.float64))
    roles = {name.rpartition(".")[2] for name in tied_lora_layers(model)}
    assert roles == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"} and len(tied_lora_layers(model)) == 8
    assert torch.equal(model(ids).logits, falcon()(ids).logits)
    randomise_adapters(model)
    expected = model(ids).logits
    expected.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    export_peft_lora(model, tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(falcon(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, expected, rtol=1e-12, atol=1e-12)
        lora = peft.get_peft_model(falcon(), peft.LoraConfig(r=4, target_modules=["dense"], init_lora_weights=False))
        lora.save_pretrained(tmp_path / "lora")
        loaded = load_peft_adapter(falcon(), tmp_path / "lora")
        torch.testing.assert_close(loaded(ids).logits, lora(ids).logits, rtol=1e-12, atol=1e-12)

        with disable_tied_lora(model):  # FalconLinear's own computation, bit for bit; merged, its merged weights'
            assert torch.equal(model(ids).logits, falcon()(ids).logits)
        merge_tied_lora(model)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-12, atol=1e-12)
        unmerge_tied_lora(model)
        merge_tied_lora(model, unload=True)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-12, atol=1e-12)
    kinds = {type(m) for name, m in model.named_modules() if "dense" in name or "query_key_value" in name}
    assert kinds == {falcon_linear}
    assert {type(m) for m in unload_tied_lora(loaded).modules() if isinstance(m, nn.Linear)} == {
        falcon_linear,
        nn.Linear,  # lm_head
    }


def test_layers_whose_weight_the_model_reads_itself_are_left_out_or_refused():
    """WavLM's attention hands q/k/v/out_proj's weights to F.multi_head_attention_forward, Mamba's mixer multiplies by
    dt_proj.weight (and gives x_proj's and out_proj's to its CUDA kernels when training): an adapter there would do
    nothing. "all-linear" leaves them out, and every layer it adapts gets a gradient; naming one is refused."""
    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
                 conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4)  # fmt: skip
    wavlm = transformers.WavLMModel(transformers.WavLMConfig(**shape))
    mamba = transformers.MambaForCausalLM(
        transformers.MambaConfig(vocab_size=50, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)
    )
    with pytest.raises(ValueError, match=r"'encoder.layers.0.attention.k_proj': its parent WavLMAttention reads k_p"):
        apply_tied_lora(wavlm, TiedLoRAConfig(rank=4))
    with pytest.raises(ValueError, match=r"'backbone.layers.0.mixer.dt_proj': its parent MambaMixer reads dt_proj"):
        apply_tied_lora(mamba, TiedLoRAConfig(rank=4, target_modules=["in_proj", "dt_proj"]))
    inputs = {wavlm: dict(input_values=torch.randn(1, 400)), mamba: dict(input_ids=torch.randint(0, 50, (1, 7)))}
    for model, expected in (
        (wavlm, {"intermediate_dense", "output_dense", "projection", "gru_rel_pos_linear"}),
        (mamba, {"in_proj"}),
    ):
        apply_tied_lora(model, TiedLoRAConfig(rank=4, target_modules=ALL_LINEAR))
        assert {name.rpartition(".")[2] for name in tied_lora_layers(model)} == expected
        randomise_adapters(model)
        out = model(**inputs[model])
        (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().sum().backward()
        assert all(layer.lora_v.grad is not None for layer in tied_lora_layers(model).values())


# reads of a linear's weight that the scan below finds and that leave the adapter in use on every path a model takes
# by default (each checked by reading the code): a dtype check beside a call (T5's family), an in-place clamp before
# the call (Gemma-3n's prediction_coefs), a path behind a config option off by default (BLOOM's pretraining_tp,
# the Gemma-4 assistants' use_ordered_embeddings: docs/guide.md, Layers a model does not call) or never taken (DeBERTa's
# z_steps is 0), the Mamba mixers' weight initialisation
_READS_THAT_KEEP_THE_ADAPTER = {
    "BloomAttention": {"dense"},
    "BloomMLP": {"dense_4h_to_h"},
    "DisentangledSelfAttention": {"in_proj"},
    "Gemma3nTextAltUp": {"prediction_coefs"},
    "Gemma4AssistantForCausalLM": {"lm_head"},
    "Gemma4UnifiedAssistantForCausalLM": {"lm_head"},
}


def _weight_reads(source: str) -> set[tuple[str, str]]:
    """``(class, attribute)`` for each ``self.<attribute>.weight`` used as a value (not its dtype, device or shape,
    nor in ``isinstance``) in a method of a class that builds ``self.<attribute>`` as a linear, outside the
    initialisation methods; also ``<argument>.weight`` in a method that the class calls with ``self.<attribute>``
    as that argument (LayoutLMv3's relative-position lookup)."""
    import ast
    import re

    if not re.search(r"\w\.weight\b(?!\.(dtype|device|shape)\b)", source):
        return set()
    found, tree = set(), ast.parse(source)
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        linears = {
            t.attr
            for node in ast.walk(cls)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "attr", getattr(node.value.func, "id", "")) in ("Linear", "Conv1D")
            for t in node.targets
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
        }  # fmt: skip
        methods = [n for n in cls.body if isinstance(n, ast.FunctionDef)]
        for method in methods:
            if method.name == "__init__" or "init" in method.name and "weight" in method.name:
                continue
            arguments = [a.arg for a in method.args.args]
            parent = {child: node for node in ast.walk(method) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(method):
                owner = getattr(node, "value", None)
                if not (isinstance(node, ast.Attribute) and node.attr == "weight"):
                    continue
                up = parent.get(node)
                if isinstance(up, ast.Attribute) and up.attr in ("dtype", "device", "shape"):
                    continue
                if isinstance(up, ast.Call) and getattr(up.func, "id", "") == "isinstance":
                    continue
                if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self":
                    if owner.attr in linears:
                        found.add((cls.name, owner.attr))
                elif isinstance(owner, ast.Name) and owner.id in arguments[1:]:  # a linear handed to the method
                    position = arguments.index(owner.id) - 1  # (after self)
                    for call in ast.walk(cls):
                        if (
                            isinstance(call, ast.Call) and getattr(call.func, "attr", "") == method.name
                            and len(call.args) > position and isinstance(call.args[position], ast.Attribute)
                            and call.args[position].attr in linears
                        ):  # fmt: skip
                            found.add((cls.name, call.args[position].attr))
    return found


def test_every_linear_whose_weight_transformers_reads_itself_is_listed():
    """The installed transformers' modeling code, scanned for reads of a linear's weight by the module that holds
    it: each is in ``_WEIGHT_READ_BY_PARENT`` (an adapter there would be skipped) or checked by hand to keep the
    adapter in use (``_READS_THAT_KEEP_THE_ADAPTER``). The list was made for transformers 5.24 and 5.25; a later
    version may add reads, which this test names when run against it (it is skipped there, not failed: CI
    installs the newest transformers)."""
    import pathlib

    from tied_lora_kernels.targets import _WEIGHT_READ_BY_PARENT

    if not transformers.__version__.startswith(("5.24.", "5.25.")):
        pytest.skip(f"the list was made for transformers 5.24 and 5.25, this is {transformers.__version__}")
    root = pathlib.Path(transformers.__file__).parent / "models"
    reads = {}
    for path in sorted(root.glob("*/modeling_*.py")):
        for kind, attribute in _weight_reads(path.read_text(encoding="utf-8")):
            reads.setdefault((kind, attribute), path.relative_to(root))
    listed = {(k, a) for k, attrs in _WEIGHT_READ_BY_PARENT.items() for a in attrs}
    listed |= {(k, a) for k, attrs in _READS_THAT_KEEP_THE_ADAPTER.items() for a in attrs}
    assert len(reads) > 30  # (the scan sees them: Mamba's, WavLM's, T5's dtype checks, ...)
    unlisted = {f"{k}.{a} ({path})" for (k, a), path in reads.items() if (k, a) not in listed}
    assert not unlisted, f"linears whose weight transformers reads itself, not listed: {sorted(unlisted)}"


def test_all_linear_leaves_out_the_x_vector_and_mobilebert_weights_read_by_their_parent():
    """Wav2Vec2ForXVector's TDNN layers hand ``kernel.weight`` to ``F.conv1d`` and MobileBERT's LM head multiplies by
    ``dense.weight``: "all-linear" leaves them out (an adapter there got no gradient, yet merging folded it in),
    naming one is refused, and every layer it adapts gets a gradient."""
    torch.manual_seed(0)
    xvector = transformers.Wav2Vec2ForXVector(
        transformers.Wav2Vec2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, conv_dim=(16, 16),
            conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4,
            tdnn_dim=(16, 16, 24), tdnn_kernel=(3, 1, 1), tdnn_dilation=(1, 1, 1), xvector_output_dim=8,
        )
    )  # fmt: skip
    mobilebert = transformers.MobileBertForMaskedLM(
        transformers.MobileBertConfig(
            vocab_size=97, hidden_size=32, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
            intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_feedforward_networks=1,
            max_position_embeddings=64,
        )
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"'tdnn.0.kernel': its parent TDNNLayer reads kernel.weight itself"):
        apply_tied_lora(xvector, TiedLoRAConfig(rank=4, target_modules=["kernel"]))
    with pytest.raises(ValueError, match=r"'cls.predictions.dense': its parent MobileBertLMPredictionHead reads"):
        apply_tied_lora(mobilebert, TiedLoRAConfig(rank=4, target_modules=["predictions.dense"]))
    inputs = {
        xvector: (dict(input_values=torch.randn(2, 800)), lambda out: out.embeddings),
        mobilebert: (dict(input_ids=torch.randint(0, 97, (2, 7))), lambda out: out.logits),
    }
    for model, (kwargs, output) in inputs.items():
        apply_tied_lora(model, TiedLoRAConfig(rank=4, target_modules=ALL_LINEAR))
        adapted = tied_lora_layers(model)
        assert adapted and not any(name.endswith(("kernel", "predictions.dense")) for name in adapted)
        randomise_adapters(model)
        output(model(**kwargs)).square().sum().backward()
        assert all(layer.lora_v.grad is not None for layer in adapted.values())


def test_falcon_mamba_x_proj_and_out_proj_follow_the_installed_transformers(monkeypatch):
    """Falcon-Mamba's mixer hands x_proj's and out_proj's weights to its fused training kernel (mamba_inner_fn) in
    transformers up to 5.24; 5.25 removed that path and calls the layers. They are left out only where the module
    has the function; dt_proj (a matmul by its weight) always is."""
    torch.manual_seed(0)
    shape = dict(vocab_size=50, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2)
    module = importlib.import_module(transformers.FalconMambaForCausalLM.__module__)
    with_fused = hasattr(module, "mamba_inner_fn")
    for fused in (False, True):
        with monkeypatch.context() as patch:
            if fused and not with_fused:  # as in transformers 5.24 and older
                patch.setattr(module, "mamba_inner_fn", lambda *args, **kwargs: None, raising=False)
            elif not fused and with_fused:  # as in 5.25 and newer
                patch.delattr(module, "mamba_inner_fn")
            model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**shape))
            apply_tied_lora(model, TiedLoRAConfig(rank=4, target_modules=ALL_LINEAR))
            adapted = {name.rpartition(".")[2] for name in tied_lora_layers(model)}
            assert adapted == ({"in_proj"} if fused else {"in_proj", "x_proj", "out_proj"})
            with pytest.raises(ValueError, match=r"mixer.dt_proj': its parent FalconMambaMixer reads dt_proj"):
                apply_tied_lora(transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**shape)),
                                TiedLoRAConfig(rank=4, target_modules=["dt_proj"]))  # fmt: skip
        if not fused and not with_fused:  # the layers the mixer calls train (where it has no fused path at all)
            randomise_adapters(model)
            model(input_ids=torch.randint(0, 50, (1, 7))).logits.square().sum().backward()
            assert all(layer.lora_v.grad.abs().sum() > 0 for layer in tied_lora_layers(model).values())


def test_all_linear_leaves_out_linears_whose_weight_is_tied_to_another_module():
    """Zamba2's hybrid layers share one transformer block through tied weights (distinct modules, one parameter):
    "all-linear" leaves those linears out (an adapter on each would merge into the one weight) instead of refusing
    the model; naming one is refused, as any tied weight is."""
    torch.manual_seed(0)
    shape = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, layers_block_type=["hybrid", "mamba", "hybrid"],
                 mamba_d_state=4, n_mamba_heads=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=48,
                 use_mamba_kernels=False, chunk_size=8, adapter_rank=4, num_mem_blocks=1)  # fmt: skip
    model = transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**shape))
    with pytest.raises(ValueError, match=r"shared_transformer.self_attn.q_proj.weight is shared with .*tied weights"):
        apply_tied_lora(model, TiedLoRAConfig(rank=4, target_modules=["q_proj"], groups=()))
    apply_tied_lora(model, TiedLoRAConfig(rank=4, target_modules=ALL_LINEAR))
    names = set(tied_lora_layers(model))
    assert names and not any("shared_transformer" in n for n in names)
    assert {n.rpartition(".")[2] for n in names} == {"in_proj", "linear"}  # (the mixers' out_proj: the table above)


def test_ties_join_the_same_role_across_layers_only():
    """Layers whose names differ only in their indices share a pair; a same-named, same-shaped layer elsewhere
    (BERT's pooler.dense beside attention.output.dense) gets its own."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.ModuleDict({"dense": nn.Linear(8, 8)}) for _ in range(3))
            self.pooler = nn.ModuleDict({"dense": nn.Linear(8, 8)})

    model = apply_tied_lora(Model(), TiedLoRAConfig(rank=2, target_modules=("dense",), groups=()))
    shared = {name: id(layer.shared) for name, layer in tied_lora_layers(model).items()}
    assert shared["layers.0.dense"] == shared["layers.1.dense"] == shared["layers.2.dense"] != shared["pooler.dense"]

    # layers that are themselves ModuleList elements (experts.0, experts.1, ...) are one role; the positions of a
    # Sequential are not
    experts = nn.Module()
    experts.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
    experts.head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    apply_tied_lora(experts, TiedLoRAConfig(rank=2, target_modules="all-linear", groups=(), tie=True))
    assert len({id(experts.experts[i].shared) for i in range(3)}) == 1
    assert experts.head[0].shared is not experts.head[2].shared is not experts.experts[0].shared


def test_merge_and_unmerge_check_every_layer_before_touching_any():
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    layers = list(tied_lora_layers(model).values())
    layers[3].merge()
    with pytest.raises(RuntimeError, match="is already merged"):
        merge_tied_lora(model)
    with pytest.raises(RuntimeError, match="cannot unmerge layers that are not merged"):
        unmerge_tied_lora(model)
    assert [layer.merged for layer in layers] == [i == 3 for i in range(len(layers))]
    layers[3].unmerge()
    with disable_tied_lora(model), pytest.raises(RuntimeError, match="disabled"):
        merge_tied_lora(model)
    assert not any(layer.merged for layer in layers)


# ---------------------------------------------------------------------------------------------------------
# configuration errors


@pytest.mark.parametrize(
    ("model_dtype", "adapter_dtype", "runs"),
    [
        (torch.float32, torch.bfloat16, False),
        (torch.float32, torch.float64, False),
        (torch.bfloat16, torch.float16, False),
        (torch.bfloat16, torch.bfloat16, True),
        (torch.bfloat16, torch.float32, True),
        (torch.float64, torch.float64, True),
    ],
)
def test_adapters_of_a_dtype_that_cannot_run_beside_the_layer_are_refused_up_front(model_dtype, adapter_dtype, runs):
    """Adapters in another 16- or 64-bit dtype than the layer computes in would fail at every forward
    ("adapters must be float32 or x's dtype"): ``apply_tied_lora`` refuses them before touching the model."""
    model = Toy().to(model_dtype)
    config = TiedLoRAConfig(rank=4, dtype=adapter_dtype)
    if runs:
        apply_tied_lora(model, config)
        model(torch.randn(2, 24, dtype=model_dtype))
        return
    with pytest.raises(TypeError, match=f"computes in {model_dtype} and the adapters would be {adapter_dtype}"):
        apply_tied_lora(model, config)
    assert not tied_lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_config_errors():
    with pytest.raises(ValueError, match="preset must be one of"):
        TiedLoRAConfig(preset="tl9")
    with pytest.raises(ValueError, match="preset must be one of"):
        TiedLoRAConfig(preset=["tl6"])  # (not a TypeError from hashing it)
    with pytest.raises(ValueError, match="rank must be positive"):
        TiedLoRAConfig(rank=0)
    with pytest.raises(TypeError, match="rank must be an int"):  # as TiedLoRAShared says it
        TiedLoRAConfig(rank=2.0)
    with pytest.raises(ValueError, match="trains none"):
        TiedLoRAConfig(preset="vera", train_u=False, train_v=False)
    with pytest.raises(ValueError, match="one group only"):
        TiedLoRAConfig(groups=[("q_proj", "k_proj"), ("k_proj", "v_proj")])
    with pytest.raises(TypeError, match="floating-point"):
        TiedLoRAConfig(dtype=torch.int8)
    with pytest.raises(TypeError, match=r"floating-point torch.dtype or its name \('bfloat16'"):
        TiedLoRAConfig(dtype="bf16")  # (the error says what names it takes)
    # a dtype's name, as the saved JSON writes it
    assert TiedLoRAConfig(dtype="bfloat16").dtype is TiedLoRAConfig(dtype="torch.bfloat16").dtype is torch.bfloat16
    with pytest.raises(TypeError, match="floating-point"):
        TiedLoRAConfig(dtype="foo")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        TiedLoRAConfig(alpha=0)
    with pytest.raises(ValueError, match="u_init must be a finite"):
        TiedLoRAConfig(u_init=float("nan"))
    with pytest.raises(ValueError, match="alpha must be a positive"):
        TiedLoRAConfig(alpha=10**400)  # (an int beyond any float: not an OverflowError)
    with pytest.raises(ValueError, match="u_init must be a finite"):
        TiedLoRAConfig(u_init=10**400)
    with pytest.raises(TypeError, match="groups must be a sequence of tuples"):
        TiedLoRAConfig(groups=QKV)
    with pytest.raises(TypeError, match="train_A must be True, False or None"):
        TiedLoRAConfig(train_A="no")
    with pytest.raises(TypeError, match="tie must be True, False or None"):
        TiedLoRAConfig(tie=1)  # 1 == True, but not a bool
    with pytest.raises(TypeError, match="seed must be an int"):
        TiedLoRAConfig(seed="x")
    with pytest.raises(TypeError, match="target_modules must be names or a callable"):
        TiedLoRAConfig(target_modules=[1, 2])
    for name in ("target_modules", "groups", "modules_to_save"):
        with pytest.raises(TypeError, match=f"{name} must be a sequence"):
            TiedLoRAConfig(**{name: None})
    with pytest.raises(TypeError, match="groups must be a sequence"):
        TiedLoRAConfig(groups=3)
    assert TiedLoRAConfig(groups=(g for g in [QKV])).groups == (QKV,)  # a generator is read once, not used up
    with pytest.raises(ValueError, match="alpha / rank must be within float32's range"):
        TiedLoRAConfig(rank=1, alpha=1e39)  # (finite as a Python float, inf as the float32 scale)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        TiedLoRAConfig(backend="cuda")
    with pytest.raises(ValueError, match="target_modules is empty"):
        TiedLoRAConfig(target_modules=[])
    with pytest.raises(ValueError, match=r"a group needs at least two target names, got \('q_proj',\)"):
        TiedLoRAConfig(groups=[("q_proj",)])
    with pytest.raises(ValueError, match=r"init must be one of \('gaussian', 'kaiming'\), got 'xavier'"):
        TiedLoRAConfig(init="xavier")


def test_a_field_set_after_construction_is_checked_and_resolved_again(tmp_path):
    """``config.train_v = False`` (or ``preset = "vera"``) after construction takes effect in what ``apply_tied_lora``
    builds, as ``to_dict`` (the saved file) records it: the model saves and loads. An invalid value is refused with
    the constructor's error and leaves the config as it was."""
    config = TiedLoRAConfig(rank=4)
    config.train_v = False
    assert config == TiedLoRAConfig(rank=4, train_v=False)
    assert config.resolved == TiedLoRAConfig(rank=4, train_v=False).resolved
    model = apply_tied_lora(tiny_llama(), config)
    layer = tied_lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.lora_v is None  # frozen at one, not stored: the config's zero start moved to B
    save_tied_lora(model, tmp_path)
    assert set(tied_lora_state_dict(load_tied_lora(tiny_llama(), tmp_path))) == set(tied_lora_state_dict(model))
    config.preset = "vera"
    assert config.resolved == TiedLoRAConfig(rank=4, preset="vera", train_v=False).resolved
    config.target_modules = "q_proj"
    assert config.target_modules == ("q_proj",)  # normalised as by the constructor
    with pytest.raises(ValueError, match="rank must be positive"):
        config.rank = 0
    with pytest.raises(ValueError, match="trains none"):
        config.train_u = False
    assert config == TiedLoRAConfig(rank=4, preset="vera", train_v=False, target_modules="q_proj")
    assert config.resolved["train_u"] and not config.resolved["train_v"]
    # an adapted model keeps a copy: the config changed and applied again elsewhere leaves it as it was adapted
    config = TiedLoRAConfig(rank=4)
    model = apply_tied_lora(tiny_llama(), config)
    config.train_v = False
    assert model.tied_lora_config == TiedLoRAConfig(rank=4) and model.tied_lora_config.resolved["train_v"]
    save_tied_lora(model, tmp_path / "first")
    assert set(tied_lora_state_dict(load_tied_lora(tiny_llama(), tmp_path / "first"))) == set(
        tied_lora_state_dict(model)
    )


def test_triton_above_its_largest_rank_is_refused_when_built():
    # at construction, not at the first forward; "auto" (the torch path above it) and "torch" take any rank
    from tied_lora_kernels.kernels import configs

    R = configs.MAX_RANK + 1
    match = rf"backend='triton' supports ranks up to {configs.MAX_RANK}, got rank {R}"
    with pytest.raises(ValueError, match=match):
        TiedLoRAConfig(rank=R, backend="triton")
    with pytest.raises(ValueError, match=match):
        TiedLoRALinear.from_linear(nn.Linear(8, 8), rank=R, backend="triton")
    for backend in ("auto", "torch"):
        assert TiedLoRAConfig(rank=R, backend=backend).rank == R
        assert TiedLoRALinear.from_linear(nn.Linear(8, 8), rank=R, backend=backend).rank == R
    assert TiedLoRAConfig(rank=configs.MAX_RANK, backend="triton").rank == configs.MAX_RANK


def test_a_target_name_that_matches_nothing_warns_when_others_match():
    model = Toy()
    with pytest.warns(UserWarning, match=r"target_modules \['v_prj', 'layers.7.q_proj'\] matched no module"):
        apply_tied_lora(model, TiedLoRAConfig(target_modules=["q_proj", "v_prj", "layers.0.k_proj", "layers.7.q_proj"]))
    assert sorted(tied_lora_layers(model)) == sorted(["layers.0.k_proj", *(f"layers.{i}.q_proj" for i in range(3))])
    # warned before the model is touched: with warnings as errors the call leaves it as it was
    model = Toy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"target_modules \['v_prj'\]"):
            apply_tied_lora(model, TiedLoRAConfig(target_modules=["q_proj", "v_prj"]))
    assert not tied_lora_layers(model) and all(p.requires_grad for p in model.parameters())
    # the default names on a model without one of them: the warning says they are the default's
    qv = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8)})
    with pytest.warns(UserWarning, match=r"target_modules \(TiedLoRAConfig's default\) \['k_proj'\]"):
        apply_tied_lora(qv, TiedLoRAConfig(rank=2))
    # a group set by hand with a name matching nothing (its other member then has a pair of its own) warns too; the
    # default q/k/v group on a model without k_proj does not (other architectures)
    with pytest.warns(UserWarning, match=r"groups: \['zz_proj'\] of \('q_proj', 'zz_proj'\) matched no module"):
        apply_tied_lora(Toy(), TiedLoRAConfig(target_modules=["q_proj", "o_proj"], groups=[("q_proj", "zz_proj")]))
    # every name matching, a regex, "all-linear" or a callable: no warning
    configs_without = [
        TiedLoRAConfig(target_modules=["q_proj", "layers.1.v_proj"]),
        TiedLoRAConfig(target_modules=r".*\.(q|v)_proj"),
        TiedLoRAConfig(target_modules="all-linear"),
        TiedLoRAConfig(target_modules=lambda module, name: name.endswith("o_proj")),
    ]
    for config in configs_without:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            apply_tied_lora(Toy(), config)


def test_a_peft_recipes_expert_names_on_fused_moe_experts_say_what_the_experts_are():
    """transformers 5's MoE blocks hold their experts as 3-D parameters (``experts.gate_up_proj``, ...), not linears:
    a PEFT recipe's gate/up/down names then adapt nothing, and the warning (or, with no other name, the error) says
    that the experts are fused parameters Tied-LoRA cannot adapt, not only that a name may be misspelt."""
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                 head_dim=8)  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**shape))
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    match = (
        r"\['gate_proj', 'up_proj', 'down_proj'\] matched no module .* The model's MoE experts are fused 3-D "
        r"parameters \(\['model.layers.0.mlp.experts.gate_up_proj', 'model.layers.0.mlp.experts.down_proj'\]\.\.\.\), "
        "not linear layers: Tied-LoRA cannot adapt them"
    )
    with pytest.warns(UserWarning, match=match):
        apply_tied_lora(model, TiedLoRAConfig(rank=2, target_modules=names))
    assert {name.rpartition(".")[2] for name in tied_lora_layers(model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    match = r"matched no nn.Linear .*; MoE experts fused into 3-D parameters \(\['model.layers.0.mlp.experts.gate_up"
    with pytest.raises(ValueError, match=match):
        apply_tied_lora(transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**shape)),
                        TiedLoRAConfig(rank=2, target_modules=["down_proj"]))  # fmt: skip
    with warnings.catch_warnings():  # a model without fused experts: the warning says nothing of them
        warnings.simplefilter("always")
        with pytest.warns(UserWarning) as record:
            apply_tied_lora(Toy(), TiedLoRAConfig(target_modules=["q_proj", "v_prj"]))
    assert "MoE" not in str(record[0].message)


def test_apply_errors():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_tied_lora(Toy(), TiedLoRAConfig(target_modules=["query_key_value"]))

    def nothing(module, name):
        return False

    with pytest.raises(ValueError, match="target_modules=the callable 'nothing' matched no nn.Linear"):
        apply_tied_lora(Toy(), TiedLoRAConfig(target_modules=nothing))
    with pytest.raises(TypeError, match="only nn.Linear"):
        apply_tied_lora(nn.ModuleDict({"q_proj": nn.Conv1d(4, 4, 1)}), TiedLoRAConfig(target_modules=["q_proj"]))

    class Router(nn.Linear):  # as Llama 4's: "all-linear" leaves it out, and the error says why
        pass

    with pytest.raises(ValueError, match=r"subclasses of nn.Linear cannot be adapted: \['q_proj \(Router\)'\]"):
        apply_tied_lora(nn.ModuleDict({"q_proj": Router(4, 4)}), TiedLoRAConfig(target_modules=ALL_LINEAR))
    # one A is every member's: a group of layers with different inputs is named with their widths
    mlp = TiedLoRAConfig(target_modules=["gate_proj", "down_proj"], groups=[("gate_proj", "down_proj")])
    named = r"grouped layers \['model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.down_proj'\] must share in_features"
    with pytest.raises(ValueError, match=named + r", got \[32, 64\]"):
        apply_tied_lora(tiny_llama(), mlp)
    with pytest.raises(ValueError, match="the model itself matched"):
        apply_tied_lora(nn.Linear(8, 8), TiedLoRAConfig(target_modules=lambda m, name: isinstance(m, nn.Linear)))
    model = apply_tied_lora(Toy(), TiedLoRAConfig())
    with pytest.raises(RuntimeError, match="already has Tied-LoRA adapters"):
        apply_tied_lora(model, TiedLoRAConfig())
    # pruning added after adapting computes v_proj's weight: merging would lose ΔW, unloading could not hand the
    # parameter back; every layer is checked before any is touched, and the error names the layer
    pruned = apply_tied_lora(Toy(), TiedLoRAConfig())
    prune.l1_unstructured(pruned.layers[2].v_proj, "weight", amount=0.5)
    layers = tied_lora_layers(pruned)
    for unload in (False, True):
        with pytest.raises(RuntimeError, match=r"layers\.2\.v_proj: .*weight is computed .*before you merge"):
            merge_tied_lora(pruned, unload=unload)
    assert not any(layer.merged for layer in layers.values())
    with pytest.raises(RuntimeError, match=r"layers\.2\.v_proj: .*weight is computed .*before you unload it"):
        unload_tied_lora(pruned)
    assert tied_lora_layers(pruned) == layers
    for layer in layers.values():
        if layer is not layers["layers.2.v_proj"]:
            layer.merge()
    layers["layers.2.v_proj"].merged = True  # (as if merged before the pruning)
    for call, what in ((unmerge_tied_lora, "unmerge"), (lambda m: merge_tied_lora(m, unload=True), "unload it")):
        with pytest.raises(RuntimeError, match=rf"layers\.2\.v_proj: .*weight is computed .*before you {what}"):
            call(pruned)
        assert tied_lora_layers(pruned) == layers and all(layer.merged for layer in layers.values())
    with pytest.raises(ValueError, match="no Tied-LoRA adapters"):
        merge_tied_lora(Toy())


def test_a_peft_model_is_refused():
    # "all-linear" would adapt PEFT's base layers and its lora_A / lora_B alike, and freeze PEFT's adapter; the
    # PeftModel is refused, and so is the model inside it, which holds PEFT's layers
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(Toy(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for model, match in (
        (wrapped, r"the model is a PEFT model or adapter layer \(peft\.peft_model\.PeftModel\)"),
        (wrapped.base_model.model, r"'layers\.0\.q_proj' is a PEFT model or adapter layer \(peft\.tuners\.lora"),
    ):
        for targets in (ALL_LINEAR, ["q_proj"]):
            with pytest.raises(ValueError, match=match):
                apply_tied_lora(model, TiedLoRAConfig(target_modules=targets))
    assert not tied_lora_layers(wrapped)
    assert wrapped.base_model.model.layers[0].q_proj.lora_A["default"].weight.requires_grad  # PEFT's, untouched


def test_a_warning_made_an_error_while_layers_are_built_leaves_the_model_as_it_was():
    """A start from which nothing trains warns as each layer is built (u at 0 beside the trained v at 0): with warnings
    as errors the call fails there, and the model is put back (its layers, requires_grad flags, no config)."""
    model = Toy()
    before = {name: module for name, module in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="u and v start at zero: .* so it never trains"):
            apply_tied_lora(model, TiedLoRAConfig(u_init=0.0))
    assert dict(model.named_modules()) == before and not hasattr(model, "tied_lora_config")
    assert all(p.requires_grad for p in model.parameters())
    assert tied_lora_layers(apply_tied_lora(model, TiedLoRAConfig()))  # (and it can be adapted)


def test_what_is_not_a_model_or_a_config_is_refused_by_name():
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        apply_tied_lora("Qwen/Qwen2.5-0.5B", TiedLoRAConfig())
    with pytest.raises(TypeError, match="config must be a TiedLoRAConfig, got dict"):
        apply_tied_lora(Toy(), {"rank": 4})


def test_callable_targets_and_quick_start_flow(tmp_path):
    """The README's quick start: adapt a Hugging Face model, train, save, load, merge."""
    model = tiny_llama().train()
    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules=lambda m, name: name.endswith(("q_proj", "v_proj")))
    apply_tied_lora(model, config)
    assert len(tied_lora_layers(model)) == 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    save_tied_lora(model, tmp_path)
    restored = load_tied_lora(tiny_llama(), tmp_path)
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(restored(ids).logits, expected)
        merge_tied_lora(restored)
        assert_close_to_reference(restored(ids).logits, expected.double(), None, "merged logits")


def test_unloaded_model_saves_with_hugging_face(tmp_path):
    """A merged and unloaded model is a plain Hugging Face model again (save_pretrained refuses the adapted
    one: tied tensors appear under several names in its state dict — save the adapter with save_tied_lora)."""
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    randomise_adapters(model)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
    merge_tied_lora(model, unload=True)
    model.save_pretrained(tmp_path)
    restored = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_close_to_reference(restored(ids).logits, expected.double(), None, "exported logits")


def test_failed_apply_leaves_the_model_untouched():
    """A check that fails for the last layer only (16-bit adapters beside the one float32 o_proj) fails before any
    layer is replaced."""
    model = Toy(d=16, kv=4).half()
    model.layers[-1].o_proj.float()
    with pytest.raises(TypeError, match="o_proj computes in torch.float32 and the adapters would be torch.float16"):
        apply_tied_lora(model, TiedLoRAConfig(rank=8, target_modules=QKV + ("o_proj",), dtype=torch.float16))
    assert not tied_lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_tied_embedding_weight_is_refused():
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight is shared with"):
        apply_tied_lora(model, TiedLoRAConfig(target_modules=["lm_head"], groups=()))


def test_unload_on_a_model_adapted_by_hand():
    from tied_lora_kernels import TiedLoRAShared

    shared = TiedLoRAShared(8, 8, 2)
    model = nn.Sequential(TiedLoRALinear(8, 8, shared=shared), TiedLoRALinear(8, 8, shared=shared))
    merge_tied_lora(model, unload=True)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]


def test_autocast_on_a_float32_model():
    """fp32 weights under bf16 autocast: o_proj and down_proj receive bf16 activations from autocast ops."""
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules=QKV + ("o_proj", "down_proj")))
    randomise_adapters(model)
    ids = torch.randint(0, 97, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids).logits
    with torch.no_grad():
        expected = model(ids).logits
    assert logits.isfinite().all()
    assert (logits.float() - expected).abs().max() <= 0.05 * expected.abs().max()


# ---------------------------------------------------------------------------------------------------------
# disabling the adapter (a DPO reference model), hooks


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=cpu_triton)])
def test_disable_gives_the_base_model_bit_for_bit(backend):
    base = tiny_llama()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = base(ids).logits
    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",), backend=backend)
    model = apply_tied_lora(base, config)
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(ids).logits
    assert not torch.equal(adapted, expected)  # the adapter changes the output, so the checks below can fail

    with disable_tied_lora(model) as same:
        assert same is model
        assert torch.equal(model(ids).logits, expected)
        assert not model(ids).logits.requires_grad  # the adapter takes no part in the graph (base frozen)
        with disable_tied_lora(model):  # nested: the outer block still disables on the inner one's exit
            pass
        assert torch.equal(model(ids).logits, expected)
        assert "disabled=True" in repr(model.model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, adapted)
    with pytest.raises(KeyError), disable_tied_lora(model):
        raise KeyError("the state comes back on an exception too")
    assert not any(layer.disabled for layer in tied_lora_layers(model).values())


def test_disable_refuses_merged_adapters():
    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    with pytest.raises(ValueError, match="no Tied-LoRA adapters"), disable_tied_lora(Toy()):
        pass
    merge_tied_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_tied_lora"), disable_tied_lora(model):
        pass
    assert not any(layer.disabled for layer in tied_lora_layers(model).values())
    layer = model.layers[0].q_proj
    layer.disabled = True  # set by hand on a merged layer: its weight no longer is the base weight
    with pytest.raises(RuntimeError, match="disabled but merged"):
        layer(torch.randn(2, 24))


def test_disable_under_torch_compile():
    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, preset="tl6"))
    randomise_adapters(model)
    x = torch.randn(3, 24)
    with torch.no_grad():
        adapted = model(x)
        with disable_tied_lora(model):
            plain = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(x), adapted)
        with disable_tied_lora(model):  # the flag is guarded: the graph is traced again, not reused
            assert torch.equal(compiled(x), plain)
        assert torch.equal(compiled(x), adapted)


def test_hooks_on_a_target_carry_over():
    """Forward and backward hooks registered on a linear before it is adapted keep firing on the adapted layer
    (and after unload), and their handles still remove them; accelerate's offloading hooks are refused."""
    model = Toy()
    q = model.layers[0].q_proj
    seen = []
    pre = q.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__)))
    post = q.register_forward_hook(lambda m, args, out: seen.append(("post", out.detach().clone())))
    q.register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", type(m).__name__)))
    apply_tied_lora(model, TiedLoRAConfig(rank=4))
    randomise_adapters(model)
    adapted = model.layers[0].q_proj
    x = torch.randn(3, 24, requires_grad=True)
    model(x).sum().backward()
    assert [s[0] for s in seen] == ["pre", "post", "backward"] and seen[0][1] == "TiedLoRALinear"
    assert torch.equal(seen[1][1], adapted(x).detach())  # the hook saw the adapted layer's output
    pre.remove(), post.remove()
    q.register_forward_hook(lambda *args: seen.append(("discarded",)))  # moved, not shared: q has none now
    seen.clear()
    model.eval()
    merge_tied_lora(model, unload=True)
    assert not model.layers[0].q_proj.training  # the unloaded layer keeps the mode
    model(x).sum().backward()
    assert [s[0] for s in seen] == ["backward"]

    offloaded = Toy()
    offloaded.layers[1].k_proj._hf_hook = object()  # what accelerate's dispatch leaves on an offloaded layer
    with pytest.raises(ValueError, match="accelerate hook"):
        apply_tied_lora(offloaded, TiedLoRAConfig(rank=4))
    assert not tied_lora_layers(offloaded)
    pruned = Toy()
    prune.l1_unstructured(pruned.layers[0].v_proj, "weight", amount=0.5)
    with pytest.raises(ValueError, match="computes its weight in a forward pre-hook"):
        apply_tied_lora(pruned, TiedLoRAConfig(rank=4))
    assert not tied_lora_layers(pruned)
    with pytest.raises(ValueError, match="computes its weight in a forward pre-hook"):
        TiedLoRALinear.from_linear(pruned.layers[0].v_proj, TiedLoRAShared(24, 16, 4))
    normed = Toy()  # a parametrization (torch.nn.utils.parametrizations) makes the layer a ParametrizedLinear
    torch.nn.utils.parametrizations.weight_norm(normed.layers[0].v_proj)
    with pytest.raises(
        TypeError, match=r"'layers.0.v_proj' has a parametrization of weight \(weight norm.*remove it first"
    ):
        apply_tied_lora(normed, TiedLoRAConfig(rank=4))
    assert not tied_lora_layers(normed)


def test_untied_pairs_of_one_shape_start_from_different_draws():
    """Each pair apply_tied_lora makes gets its own seed (config.seed, +1, ...): untied layers of one shape do not
    start from the same A and B, and the same config draws the same values again."""
    config = TiedLoRAConfig(rank=4, preset="tl6", tie=False, groups=(), target_modules=("q_proj",))
    model = apply_tied_lora(Toy(), config)
    first, second = model.layers[0].q_proj.shared, model.layers[1].q_proj.shared
    assert first is not second and not torch.equal(first.A, second.A) and not torch.equal(first.B, second.B)
    again = apply_tied_lora(Toy(), config)
    assert torch.equal(again.layers[1].q_proj.shared.A, second.A)


def test_a_regular_expression_is_full_matched_and_a_name_matches_whole_parts():
    """A regex target must match a module's whole qualified name (PEFT's re.fullmatch), not a part of it; a plain
    name matches a whole name or a ``.name`` suffix, never the tail of a longer name."""
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules=r"self_attn\.(q_proj|v_proj)", groups=()))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.out_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    model = apply_tied_lora(Model(), TiedLoRAConfig(rank=2, target_modules=("proj",), groups=()))
    assert set(tied_lora_layers(model)) == {"proj"}


def test_grouped_layers_take_their_rows_of_b_in_group_order():
    """A group's rows of B follow the group's order (q, k, v), not the order the parent defines its layers in."""

    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.v_proj, self.k_proj, self.q_proj = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 6)

    model = apply_tied_lora(Reversed(), TiedLoRAConfig(rank=2, target_modules=QKV))
    assert (model.q_proj.b_rows, model.k_proj.b_rows, model.v_proj.b_rows) == ((0, 6), (6, 10), (10, 14))
    assert model.k_proj.lora_u is model.q_proj.lora_u


@pytest.mark.parametrize(
    "preset,zero,u_init",
    [("lora", "B", 1.0), ("tl5", "B", 1.0), ("tl6", "v", 1.0), ("vera", "v", 0.1)],
)
def test_presets_start_as_their_sources_do(preset, zero, u_init):
    """Which factor is the zero start and where u starts, per preset (the table in config.py): LoRA's B = 0 beside
    a drawn A (PEFT's init), a trained v = 0 otherwise, and VeRA's u = 0.1 (VeRA's d_initial)."""
    layer = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, preset=preset)).layers[0].q_proj
    factors = {"A": layer.shared.A, "B": layer.shared.B, "v": layer.lora_v}
    assert torch.count_nonzero(factors[zero]) == 0
    assert all(torch.count_nonzero(t) == t.numel() for k, t in factors.items() if k != zero and t is not None)
    u = layer.lora_u if layer.lora_u is not None else torch.ones(4)
    assert torch.all(u == torch.tensor(u_init, dtype=u.dtype))


def test_tied_layers_on_several_devices_are_refused():
    """Layers that would share one pair but live on different devices (here cpu and meta) are refused before the
    model is touched: one pair can live on one device only. Untied, they apply."""
    model = Toy()
    model.layers[1].to("meta")
    with pytest.raises(ValueError, match=r"live on several devices \(cpu and meta; .*device_map=.*tie=False"):
        apply_tied_lora(model, TiedLoRAConfig(rank=4))
    assert not tied_lora_layers(model)
    apply_tied_lora(model, TiedLoRAConfig(rank=4, tie=False))  # the way out the message names: a pair per layer
    assert {layer.shared.A.device.type for layer in tied_lora_layers(model).values()} == {"cpu", "meta"}


def test_init_weights_after_apply_leaves_the_model_alone():
    """transformers marks initialised modules (``_is_hf_initialized``) so that ``init_weights()`` skips them:
    the adapted layers keep the mark of the linears they replace (their base weights are not drawn again), and
    ``to_base`` gives it back."""
    model = tiny_llama()
    apply_tied_lora(model, TiedLoRAConfig(rank=4, preset="tl6"))
    randomise_adapters(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model.init_weights()
    assert [n for n, p in model.named_parameters() if not torch.equal(p, before[n])] == []
    merge_tied_lora(model, unload=True)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj._is_hf_initialized


def test_all_linear_leaves_out_the_linears_inside_a_classification_head():
    # a head made of several layers (RoBERTa's classifier: dense, then out_proj) is left out whole, as PEFT leaves
    # it out with task_type="SEQ_CLS" (catches: only a module named exactly as the head left out)
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(16, 16)
            self.classifier = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))

        def forward(self, h):
            return self.classifier(self.body(h))

    model = apply_tied_lora(Classifier(), TiedLoRAConfig(rank=2, target_modules=ALL_LINEAR))
    assert set(tied_lora_layers(model)) == {"body"}


class MambaMixer(nn.Module):  # a model's own class that happens to share a name with transformers' mixer
    def __init__(self):
        super().__init__()
        self.in_proj, self.out_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, h):
        return self.out_proj(torch.relu(self.in_proj(h)))


def test_a_models_own_class_named_as_a_transformers_mixer_is_adapted():
    # _WEIGHT_READ_BY_PARENT names transformers' classes: a model's own MambaMixer calls its out_proj and is adapted,
    # by name and by "all-linear" (catches: the transformers-module check dropped)
    for targets in (["out_proj"], ALL_LINEAR):
        model = apply_tied_lora(nn.Sequential(MambaMixer()), TiedLoRAConfig(rank=2, target_modules=targets))
        assert "0.out_proj" in tied_lora_layers(model)


def test_modules_to_save_naming_a_target_itself_is_refused():
    # a target trained in full and adapted at once: refused as a module holding targets is (catches: the
    # "t == name" half of the check dropped)
    with pytest.raises(ValueError, match="is or holds adapted targets"):
        apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, modules_to_save=("layers.0.q_proj",)))


def test_unmerge_takes_out_the_merged_delta_after_v_changed():
    # merge_tied_lora keeps a copy of each layer's v too (its own, never shared): unmerge is exact whatever v became
    # since, as after reset_adapter() or a load of the factors (catches: v kept as a view of the live parameter)
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules="all-linear"))
    randomise_adapters(model)
    layers = tied_lora_layers(model)
    assert all(layer.lora_v is not None for layer in layers.values())
    weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    deltas = {name: layer.delta_weight().detach() for name, layer in layers.items()}
    merge_tied_lora(model)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_v.add_(1.0)
    unmerge_tied_lora(model)
    for name, layer in layers.items():
        atol = 4 * torch.finfo(torch.float32).eps * (weights[name].abs().max().item() + deltas[name].abs().max().item())
        torch.testing.assert_close(layer.weight, weights[name], rtol=0, atol=atol, msg=name)
