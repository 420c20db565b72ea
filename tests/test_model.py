"""Model-level behaviour: apply, the paper's parameter counts, zero start, real tying, tied gradients summed
across layers, merge/unmerge, save/load, and the errors a user can run into."""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers
from torch import nn
from torch.nn.utils import prune

from tests.helpers import assert_close_to_reference, cpu_triton
from tied_lora_kernels import (
    ALL_LINEAR,
    QKV,
    TiedLoRAConfig,
    TiedLoRALinear,
    TiedLoRAShared,
    apply_tied_lora,
    count_parameters,
    disable_tied_lora,
    load_tied_lora,
    merge_tied_lora,
    reference,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_state_dict,
    unload_tied_lora,
    unmerge_tied_lora,
)

# every configuration: the four presets, and every combination of tying × trained factors (30 of them)
CONFIGS = {name: dict(preset=name) for name in ("lora", "tl5", "tl6", "vera")}
for tie, flags in itertools.product((True, False), itertools.product((True, False), repeat=4)):
    if any(flags):
        name = ("tied_" if tie else "untied_") + "".join(k for k, f in zip("ABuv", flags, strict=True) if f)
        CONFIGS[name] = dict(tie=tie, **{f"train_{k}": f for k, f in zip("ABuv", flags, strict=True)})


class Block(nn.Module):
    def __init__(self, d, kv):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, kv), nn.Linear(d, kv)
        self.o_proj = nn.Linear(kv, d, bias=False)

    def forward(self, h):
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        return h + self.o_proj(torch.tanh(q[..., : k.shape[-1]]) * k + v)


class Toy(nn.Module):
    """A few attention-shaped blocks (GQA: k/v narrower than q), so groups and ties are exercised."""

    def __init__(self, d=24, kv=16, layers=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(d, kv) for _ in range(layers))

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return h


def randomise_adapters(model, seed=1):
    """Give every adapter factor non-zero values (a zero start hides gradient bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tied_lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def tiny_llama(seed=0, **kw):
    torch.manual_seed(seed)
    shape = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=64,
    )
    config = transformers.LlamaConfig(**{**shape, **kw})
    return transformers.LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------------------
# the paper's numbers (design.md §1), counted on meta-device models built from the real configs


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
# merge, save, load


def test_merge_unmerge_unload_model():
    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    x = torch.randn(4, 24)
    base_weight = model.layers[0].q_proj.weight.detach().clone()
    y = model(x)
    merge_tied_lora(model)
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


def test_save_load_bit_for_bit(tmp_path):
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    save_tied_lora(model, tmp_path)

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    shared_keys = [k for k in saved if ".shared." in k]
    assert len(shared_keys) == 2 * 2  # qkv pair + o_proj pair, each stored once for both layers
    fresh = tiny_llama()
    load_tied_lora(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    adapted = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",)))
    load_tied_lora(adapted, tmp_path)
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, expected)


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
    apply_tied_lora(classifier, TiedLoRAConfig(rank=4, target_modules=ALL_LINEAR))  # score: [2, 32], below rank
    assert "score" not in tied_lora_layers(classifier) and len(tied_lora_layers(classifier)) == 14
    # MultiheadAttention's out_proj is a Linear subclass that its parent never calls: adapting it would do nothing
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    apply_tied_lora(model, TiedLoRAConfig(rank=2, target_modules=ALL_LINEAR))
    assert set(tied_lora_layers(model)) == {"1"}


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


def test_load_builds_the_ties_the_file_records(tmp_path):
    """The file's layout says which layers share a pair: a file whose ties differ from the current rule (say,
    saved before the rule changed) still loads into a bare model, with its own ties."""
    import json

    from safetensors.torch import load_file, save_file

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList(nn.ModuleDict({"dense": nn.Linear(8, 8)}) for _ in range(2))
            self.pooler = nn.ModuleDict({"dense": nn.Linear(8, 8)})

        def forward(self, h):
            for layer in self.layers:
                h = torch.tanh(layer["dense"](h))
            return self.pooler["dense"](h)

    model = apply_tied_lora(Model(), TiedLoRAConfig(rank=2, target_modules=("dense",), groups=()))
    randomise_adapters(model)
    save_tied_lora(model, tmp_path)
    # rewrite the file as if the pooler had shared the layers' pair
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    state = load_file(tmp_path / "adapter_model.safetensors")
    ours = meta["layout"]["pooler.dense"]["shared"]
    meta["layout"]["pooler.dense"]["shared"] = meta["layout"]["layers.0.dense"]["shared"]
    for key in [k for k in state if k.startswith(ours + ".")]:
        del state[key], meta["tensors"][key]
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))

    fresh = load_tied_lora(Model(), tmp_path)
    shared = {name: layer.shared for name, layer in tied_lora_layers(fresh).items()}
    assert shared["pooler.dense"] is shared["layers.0.dense"] is shared["layers.1.dense"]
    with torch.no_grad():  # the same model as the original with the pooler reading the layers' pair
        model.pooler["dense"].shared = model.layers[0]["dense"].shared
        h = torch.randn(3, 8)
        assert torch.equal(fresh(h), model(h))


def _classifier(head_seed=None):
    """A tiny Llama classifier; ``head_seed`` redraws its head alone (a fresh head on the same base)."""
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=97, num_labels=3, pad_token_id=0)  # fmt: skip
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**shape)).eval()
    if head_seed is not None:
        head = model.score.weight
        with torch.no_grad():
            head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(head_seed)))
    return model


def test_modules_to_save_train_in_full_and_travel_with_the_adapter(tmp_path):
    """A new classification head (PEFT's ``modules_to_save``): trainable, saved and loaded with the adapter,
    exported as PEFT writes it."""
    peft = pytest.importorskip("peft")
    from tied_lora_kernels import export_peft_lora

    ids = torch.randint(1, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    model = apply_tied_lora(_classifier(), TiedLoRAConfig(rank=4, modules_to_save=("score",)))
    assert model.score.weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed" in n or "norm" in n)
    model(ids).logits.sum().backward()
    assert model.score.weight.grad is not None
    with torch.no_grad():
        randomise_adapters(model)  # the head included: it is in the adapter's state
        expected = model(ids).logits
    assert "score.weight" in tied_lora_state_dict(model)
    save_tied_lora(model, tmp_path / "ours")
    fresh = load_tied_lora(_classifier(head_seed=1), tmp_path / "ours")  # another head: loaded over
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    assert fresh.score.weight.requires_grad

    export_peft_lora(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(_classifier(head_seed=1), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=1e-5, atol=1e-6)

    with pytest.warns(UserWarning, match=r"modules_to_save \['score'\] keep their trained values"):
        with disable_tied_lora(model):
            pass

    with pytest.raises(ValueError, match="'nope' matches no module"):
        apply_tied_lora(_classifier(), TiedLoRAConfig(rank=4, modules_to_save=("nope",)))
    with pytest.raises(ValueError, match="is or holds adapted targets"):
        apply_tied_lora(_classifier(), TiedLoRAConfig(rank=4, modules_to_save=("self_attn",)))
    with pytest.raises(TypeError, match="modules_to_save must be module names"):
        TiedLoRAConfig(modules_to_save=(3,))


def test_a_bf16_head_beside_float32_adapters_saves_and_loads(tmp_path):
    model = _classifier().to(torch.bfloat16)
    apply_tied_lora(model, TiedLoRAConfig(rank=4, modules_to_save="score"))  # adapters: float32 masters
    save_tied_lora(model, tmp_path)
    fresh = load_tied_lora(_classifier().to(torch.bfloat16), tmp_path)
    assert (
        fresh.score.weight.dtype == torch.bfloat16
        and fresh.model.layers[0].self_attn.q_proj.shared.A.dtype == torch.float32
    )
    assert torch.equal(fresh.score.weight, model.score.weight)


def test_load_errors(tmp_path):
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    save_tied_lora(model, tmp_path)
    with pytest.raises(ValueError, match="saved for"):
        load_tied_lora(tiny_llama(hidden_act="silu", head_dim=16), tmp_path)  # q_proj is [64, 32] here
    other_rank = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=2, preset="tl6"))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_tied_lora(other_rank, tmp_path)
    other_preset = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="vera"))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_tied_lora(other_preset, tmp_path)
    other_alpha = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", alpha=8))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_tied_lora(other_alpha, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# configuration errors


def test_config_errors():
    with pytest.raises(ValueError, match="preset must be one of"):
        TiedLoRAConfig(preset="tl9")
    with pytest.raises(ValueError, match="rank must be a positive int"):
        TiedLoRAConfig(rank=0)
    with pytest.raises(ValueError, match="trains none"):
        TiedLoRAConfig(preset="vera", train_u=False, train_v=False)
    with pytest.raises(ValueError, match="one group only"):
        TiedLoRAConfig(groups=[("q_proj", "k_proj"), ("k_proj", "v_proj")])
    with pytest.raises(TypeError, match="floating-point"):
        TiedLoRAConfig(dtype=torch.int8)
    with pytest.raises(TypeError, match="floating-point"):
        TiedLoRAConfig(dtype="foo")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        TiedLoRAConfig(alpha=0)
    with pytest.raises(ValueError, match="u_init must be a finite"):
        TiedLoRAConfig(u_init=float("nan"))
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


def test_apply_errors():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_tied_lora(Toy(), TiedLoRAConfig(target_modules=["query_key_value"]))

    def nothing(module, name):
        return False

    with pytest.raises(ValueError, match="target_modules=the callable 'nothing' matched no nn.Linear"):
        apply_tied_lora(Toy(), TiedLoRAConfig(target_modules=nothing))
    with pytest.raises(TypeError, match="only nn.Linear"):
        apply_tied_lora(nn.ModuleDict({"q_proj": nn.Conv1d(4, 4, 1)}), TiedLoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="exceeds min"):
        apply_tied_lora(Toy(d=8, kv=4), TiedLoRAConfig(rank=6, groups=(), target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="the model itself matched"):
        apply_tied_lora(nn.Linear(8, 8), TiedLoRAConfig(target_modules=lambda m, name: isinstance(m, nn.Linear)))
    model = apply_tied_lora(Toy(), TiedLoRAConfig())
    with pytest.raises(RuntimeError, match="already has Tied-LoRA adapters"):
        apply_tied_lora(model, TiedLoRAConfig())
    with pytest.raises(ValueError, match="no Tied-LoRA adapters"):
        merge_tied_lora(Toy())


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
    """A rank too large for one grouped projection (k/v are 4 wide) fails before any layer is replaced."""
    model = Toy(d=16, kv=4)
    with pytest.raises(ValueError, match="k_proj: rank 8 exceeds"):
        apply_tied_lora(model, TiedLoRAConfig(rank=8, target_modules=QKV + ("o_proj",)))
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


def test_load_refuses_other_layouts(tmp_path):
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    save_tied_lora(model, tmp_path)
    for config in (TiedLoRAConfig(rank=4, groups=()), TiedLoRAConfig(rank=4, tie=False)):
        with pytest.raises(ValueError, match="does not fit this model"):
            load_tied_lora(apply_tied_lora(tiny_llama(), config), tmp_path)
    deeper = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="its targets also match"):
        load_tied_lora(deeper, tmp_path)
    assert not tied_lora_layers(deeper)  # left as it was
    with torch.device("meta"):
        on_meta = tiny_llama()
    with pytest.raises(ValueError, match="meta device"):
        load_tied_lora(on_meta, tmp_path)
    bf16 = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="would round it"):
        load_tied_lora(bf16, tmp_path)
    merged = merge_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)))
    with pytest.raises(RuntimeError, match="merged"):
        load_tied_lora(merged, tmp_path)


def test_load_refuses_a_file_that_lost_a_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)), tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state.pop(next(k for k in state if k.endswith("lora_v")))
    save_file(state, tmp_path / "adapter_model.safetensors")
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="adapter tensors differ"):
        load_tied_lora(fresh, tmp_path)
    assert not tied_lora_layers(fresh)


def test_load_backend_override(tmp_path):
    save_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, backend="triton")), tmp_path)
    model = load_tied_lora(tiny_llama(), tmp_path, backend="torch")
    assert {layer.backend for layer in tied_lora_layers(model).values()} == {"torch"}
    assert count_parameters(model).trainable > 0  # training continues by default
    frozen = load_tied_lora(tiny_llama(), tmp_path, trainable=False)  # PEFT's is_trainable=False
    assert count_parameters(frozen).trainable == 0
    with pytest.raises(TypeError, match="trainable must be True, False or None"):
        load_tied_lora(tiny_llama(), tmp_path, trainable="no")
    load_tied_lora(frozen, tmp_path)  # None: an adapted model keeps its flags
    assert count_parameters(frozen).trainable == 0
    load_tied_lora(frozen, tmp_path, trainable=True)  # the config's trained factors train again
    assert count_parameters(frozen).trainable == count_parameters(model).trainable


# ---------------------------------------------------------------------------------------------------------
# disabling the adapter (a DPO reference model), Hugging Face activation checkpointing


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


def enable_checkpointing(model, reentrant: bool) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant:
        model.enable_input_require_grads()  # transformers 5 did it already; 4.x did not
    assert model.model.gradient_checkpointing


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=cpu_triton)])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hugging_face_gradient_checkpointing(reentrant, backend):
    """Hugging Face activation checkpointing recomputes each decoder layer in backward: the tied A (summed over
    both layers and q/k/v) and every other adapter gradient equal the run without it. Non-reentrant: the hook
    on the shared A fires once per backward. Reentrant: once per checkpointed layer, autograd's rule for any
    parameter that several checkpointed segments use (each runs its own backward; the torch path is the
    same). Reentrant checkpointing needs inputs that require grad: transformers 5 arranges that itself, 4.x
    needs ``enable_input_require_grads()``, as with PEFT."""
    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",), backend=backend)
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    model.train()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    A = model.model.layers[0].self_attn.q_proj.shared.A
    fired = []
    A.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))

    def grads():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = grads()
    enable_checkpointing(model, reentrant)
    # below: the same products summed in another order (up to 3e-6 relative seen), not bit for bit
    fired.clear()
    got = grads()
    assert got.keys() == want.keys() and got
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    assert len(fired) == (len(model.model.layers) if reentrant else 1)
    assert torch.equal(fired[-1], got[next(n for n in got if n.endswith("shared.A"))])


@cpu_triton
def test_hugging_face_generate_with_the_kv_cache():
    """Greedy generation, each new token a decode step of M = batch rows through every adapted layer: the triton
    path (its decode configs) gives the torch path's scores and tokens, with the cache or without it (every
    step a prefill), and the merged model gives the same tokens."""
    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules="all-linear", backend="torch")
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(5))
    settings = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)

    def generate(backend, **kwargs):
        for layer in tied_lora_layers(model).values():
            layer.backend = backend
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, **settings, **kwargs)
        return out.sequences, torch.stack(out.scores)

    tokens, scores = generate("torch")
    base_tokens, _ = generate("torch", use_cache=False)
    assert torch.equal(base_tokens, tokens)
    for use_cache in (True, False):
        got_tokens, got_scores = generate("triton", use_cache=use_cache)
        assert torch.equal(got_tokens, tokens)
        torch.testing.assert_close(got_scores, scores, rtol=1e-5, atol=1e-5)
    with disable_tied_lora(model):
        assert not torch.equal(generate("torch")[1], scores)  # the adapter changes what is generated
    merge_tied_lora(model)
    assert torch.equal(generate("torch")[0], tokens)


def test_ddp_with_tied_adapters_and_checkpointing(process_group):
    """DDP over a model whose A and B are tied across layers: gradients equal the plain run's, also under
    non-reentrant checkpointing. Reentrant checkpointing fires a tied parameter's hook once per layer, which
    DDP refuses by default and accepts with ``static_graph=True`` (what the README says)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))

    def run(reentrant=None, static_graph=False, ddp=True):
        model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",)))
        randomise_adapters(model)
        model.train()
        if reentrant is not None:
            enable_checkpointing(model, reentrant)
        wrapped = DDP(model, static_graph=static_graph) if ddp else model
        for _ in range(2):  # DDP's reducer checks the hooks on every backward
            wrapped(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want = run(ddp=False)
    for kwargs in (dict(), dict(reentrant=False), dict(reentrant=True, static_graph=True)):
        got = run(**kwargs)
        assert got.keys() == want.keys()
        for n in got:
            message = f"{kwargs} {n}"
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m, s=message: f"{s}: {m}")
    with pytest.raises(RuntimeError, match="mark a variable ready only once"):
        run(reentrant=True)


def test_save_after_conversion_freeze_and_wrappers(tmp_path):
    """An adapter saved after ``model.to(bf16)`` loads into a bare bf16 model (the file records the dtype its
    tensors have); a model frozen for inference loads it and keeps its flags; ``torch.compile``'s and DDP's
    wrappers add no prefix to the file's names and are looked through on load."""
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(6))
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    model.to(torch.bfloat16)
    with torch.no_grad():
        expected = model(ids).logits
    save_tied_lora(torch.compile(model), tmp_path)  # traces nothing: the wrapper is only looked through
    assert not any(k.startswith("_orig_mod") for k in load_file_keys(tmp_path))
    fresh = load_tied_lora(tiny_llama().to(torch.bfloat16), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)

    config = TiedLoRAConfig(rank=4, target_modules=QKV + ("o_proj",), dtype=torch.bfloat16)
    frozen = apply_tied_lora(tiny_llama().to(torch.bfloat16), config)
    frozen.requires_grad_(False)
    load_tied_lora(torch.compile(frozen), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert torch.equal(frozen(ids).logits, expected)


def test_a_16_bit_adapter_file_loads_into_a_float32_model_as_float32(tmp_path):
    """An adapter saved after ``model.to(bf16)`` loads into a float32 model as float32 adapters holding exactly
    the saved values (bf16 adapters cannot run beside float32 activations), bare or already adapted; a float32
    file into bf16 adapters would round and is still refused."""
    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",))
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    model.to(torch.bfloat16)
    save_tied_lora(model, tmp_path)
    saved = tied_lora_state_dict(model)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(6))
    for target in (tiny_llama(), apply_tied_lora(tiny_llama(), config)):
        fresh = load_tied_lora(target, tmp_path)
        state = tied_lora_state_dict(fresh)
        assert {t.dtype for t in state.values()} == {torch.float32}
        assert all(torch.equal(state[k], saved[k].float()) for k in saved)
        with torch.no_grad():
            fresh(ids)  # runs
    save_tied_lora(fresh, tmp_path / "f32")
    with pytest.raises(TypeError, match="loading would round it"):
        load_tied_lora(model, tmp_path / "f32")


def load_file_keys(directory):
    from safetensors.torch import load_file

    return list(load_file(directory / "adapter_model.safetensors"))


def test_load_names_a_missing_module(tmp_path):
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules=("q_proj",), groups=()))
    save_tied_lora(model, tmp_path)
    other = tiny_llama()
    other.model.layers[1].self_attn.q_proj = nn.Identity()
    with pytest.raises(ValueError, match="module there is Identity, not nn.Linear"):
        load_tied_lora(other, tmp_path)
    del other.model.layers[1].self_attn.q_proj
    with pytest.raises(ValueError, match="no module of that name"):
        load_tied_lora(other, tmp_path)


def test_save_pretrained_stores_each_tied_tensor_once_and_strict_loading_takes_it(tmp_path):
    """save_pretrained (Trainer's checkpoints) stores a tensor that layers share once instead of refusing it;
    load_state_dict, strict, restores it through that one name (also from a module above the adapted one),
    and a tensor missing under all of its names is still reported missing."""
    from safetensors.torch import load_file

    config = TiedLoRAConfig(rank=4, groups=(("q_proj", "k_proj", "v_proj"),))
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    aliases = [k for k in state if k.endswith((".shared.A", ".shared.B", ".lora_scale.u"))]
    assert len(aliases) == 4  # attention's A and B, each layer's group u (the mlp is not adapted)
    other = apply_tied_lora(tiny_llama(seed=3), config)
    other.load_state_dict(state)  # strict
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)
    wrapper = nn.ModuleDict({"inner": apply_tied_lora(tiny_llama(seed=3), config)})
    wrapper.load_state_dict({f"inner.{k}": v for k, v in state.items()})  # strict, hook one module down
    with torch.no_grad():
        assert torch.equal(wrapper["inner"](ids).logits, model(ids).logits)
    a = next(k for k in aliases if k.endswith("shared.A"))
    missing = other.load_state_dict({k: v for k, v in state.items() if k != a}, strict=False).missing_keys
    A = other.get_parameter(a)
    assert sorted(missing) == sorted(k for k, p in other.named_parameters(remove_duplicate=False) if p is A)
    assert len(missing) == 6  # every name of that A: 3 projections x 2 layers

    # names of one tied tensor with different values (saved with other ties) would each overwrite it: refused
    full = {k: v.clone() for k, v in model.state_dict().items()}
    full["model.layers.0.self_attn.k_proj.shared.A"] += 1
    with pytest.raises(RuntimeError, match="one tied tensor in this model, but the state dict holds different"):
        other.load_state_dict(full)
    # each adapted model fills in its own names only: beside an untied one, a missing key stays missing
    pair = nn.ModuleDict({"untied": apply_tied_lora(Toy(), TiedLoRAConfig(rank=2, tie=False, groups=()))})
    pair["tied"] = apply_tied_lora(Toy(), TiedLoRAConfig(rank=2))
    saved = pair.state_dict()
    del saved["untied.layers.1.q_proj.shared.A"]
    missing = pair.load_state_dict(saved, strict=False).missing_keys
    assert missing == ["untied.layers.1.q_proj.shared.A"]


def test_hugging_face_trainer_checkpoints_resume_and_carry_the_adapter(tmp_path):
    """Trainer's own checkpoints save an adapted model and resume it: training 4 steps in one go, or 2 steps
    then resuming from checkpoint-2 on a fresh model, ends with the same adapter. The callback puts the adapter
    into each checkpoint, saves every few steps when asked and at the end; all reload exactly."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import SaveTiedLoRACallback

    config = TiedLoRAConfig(rank=4, groups=(("q_proj", "k_proj", "v_proj"),))
    ids = torch.randint(0, 97, (8, 9), generator=torch.Generator().manual_seed(7))
    data = [{"input_ids": row, "labels": row} for row in ids]
    kwargs = dict(max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True, learning_rate=1e-2)

    def trainer(model, out, **more):
        args = transformers.TrainingArguments(str(tmp_path / out), **kwargs, **more)
        return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[SaveTiedLoRACallback(3)])

    whole = apply_tied_lora(tiny_llama(), config)
    trainer(whole, "whole", save_strategy="steps", save_steps=2).train()
    listed = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert listed == ["adapter-3", "adapter-final", "checkpoint-2", "checkpoint-4"]
    for name in ("checkpoint-2", "checkpoint-4"):
        assert {"model.safetensors", "optimizer.pt", "tied_lora"} <= {
            p.name for p in (tmp_path / "whole" / name).iterdir()
        }
    # the checkpoint still loads as a plain Hugging Face model (the adapter's files sit in their own folder)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "whole/checkpoint-4")

    resumed = apply_tied_lora(tiny_llama(), config)
    trainer(resumed, "resumed", save_strategy="no").train(resume_from_checkpoint=str(tmp_path / "whole/checkpoint-2"))
    theirs = tied_lora_state_dict(resumed)
    for name, tensor in tied_lora_state_dict(whole).items():
        assert torch.equal(theirs[name], tensor), name
    untrained = tied_lora_state_dict(apply_tied_lora(tiny_llama(), config))
    assert all(not torch.equal(theirs[name], tensor) for name, tensor in untrained.items())  # every tensor trained
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["adapter-3", "adapter-final"]

    whole.eval()
    with torch.no_grad():
        assert torch.equal(plain.eval()(ids).logits, tiny_llama()(ids).logits)  # the frozen base
    for name in ("whole/checkpoint-4/tied_lora", "whole/adapter-final"):
        fresh = load_tied_lora(tiny_llama(), tmp_path / name)
        with torch.no_grad():
            assert torch.equal(fresh(ids).logits, whole(ids).logits)
    with pytest.raises(ValueError, match="positive int"):
        SaveTiedLoRACallback(0)
    # a model that is not a PreTrainedModel is saved as a plain state dict, which refuses tied tensors: refused
    # before the first step rather than at the first checkpoint
    args = transformers.TrainingArguments(str(tmp_path / "toy"), **kwargs, save_strategy="steps", save_steps=2)
    toy = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    with pytest.raises(ValueError, match="not a PreTrainedModel"):
        transformers.Trainer(model=toy, args=args, train_dataset=data, callbacks=[SaveTiedLoRACallback()]).train()


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
