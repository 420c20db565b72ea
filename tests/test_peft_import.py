"""``load_peft_adapter``: a PEFT LoRA or VeRA adapter, loaded onto the bare base model, computes what PEFT computes
with it (float64, within 1e-12), trains, and round-trips through ``export_peft_lora``."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.models import tiny_llama
from tests.test_conv1d import tiny_gpt2
from tied_lora_kernels import (
    TiedLoRAConfig,
    apply_tied_lora,
    export_peft_lora,
    load_peft_adapter,
    load_tied_lora,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_state_dict,
)

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _peft_adapter(directory, config, base=tiny_llama, seed=1):
    """A PEFT adapter with every factor random (PEFT starts lora_B / lambda_b at zero), saved to ``directory``;
    returns the logits of ``PeftModel.from_pretrained`` on a fresh base, in float64."""
    model = peft.get_peft_model(base().double(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "vera_lambda", "modules_to_save")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    model.save_pretrained(directory)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(base().double(), directory).eval()(IDS).logits


def _round_trip(model, directory, base):
    """``save_tied_lora`` then ``load_tied_lora`` onto a fresh base: the logits it gives."""
    save_tied_lora(model, directory)
    with torch.no_grad():
        return load_tied_lora(base().double(), directory).eval()(IDS).logits


def _same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], modules_to_save=["lm_head"]),
        dict(r=3, lora_alpha=13, use_rslora=True, target_modules="all-linear", lora_dropout=0.1),
        dict(r=40, lora_alpha=16, target_modules=["q_proj", "down_proj"]),  # rank above the widths (32): as PEFT
    ],
    ids=["lora", "rslora_all_linear", "rank_above_width"],
)
def test_lora_computes_what_peft_computes(tmp_path, config):
    expected = _peft_adapter(tmp_path, peft.LoraConfig(**config))
    model = load_peft_adapter(tiny_llama().double(), tmp_path, backend="torch").eval()
    layers = tied_lora_layers(model)
    assert len({id(layer.shared) for layer in layers.values()}) == len(layers)  # one pair per layer: untied
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)  # PEFT's (to within one rounding)
    dropout = config.get("lora_dropout", 0.0)
    assert all(math.isclose(layer.scale, scaling, rel_tol=2e-16) for layer in layers.values())
    assert all(layer.lora_dropout == dropout for layer in layers.values())
    with torch.no_grad():
        _same(model(IDS).logits, expected)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(("shared.A", "shared.B")) or n.startswith("lm_head") for n in trained)
    assert ("lm_head.weight" in trained) == ("modules_to_save" in config)

    # saved and loaded as a Tied-LoRA adapter, and exported back to PEFT: the same logits
    _same(_round_trip(model, tmp_path / "tied", tiny_llama), expected)
    export_peft_lora(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp_path / "again").eval()
    with torch.no_grad():
        _same(again(IDS).logits, expected)


def test_vera_computes_what_peft_computes(tmp_path):
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])  # in 32 and 64: sliced A
    expected = _peft_adapter(tmp_path, config)
    model = load_peft_adapter(tiny_llama().double(), tmp_path, backend="torch").eval()
    layers = tied_lora_layers(model)
    assert len({id(layer.shared) for layer in layers.values()}) == 3  # one pair per role, tied across layers
    with torch.no_grad():
        _same(model(IDS).logits, expected)
    trained = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"u", "lora_v"}  # A and B stay frozen, as in VeRA
    _same(_round_trip(model, tmp_path / "tied", tiny_llama), expected)


def test_saved_modules_come_from_the_file(tmp_path):
    """The modules whose tensors the file holds, by full name: a sequence-classification head (PEFT's config lists
    ("classifier", "score")), and every norm that "norm" matched as a plain suffix in PEFT. They train and save
    with the adapter, so a save/load round trip keeps them."""
    import transformers

    def classifier():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, num_labels=3, pad_token_id=0,
        )  # fmt: skip
        return transformers.LlamaForSequenceClassification(config).eval()

    config = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS", modules_to_save=["norm"])
    expected = _peft_adapter(tmp_path, config, base=classifier)
    model = load_peft_adapter(classifier().double(), tmp_path, backend="torch").eval()
    saved = model.tied_lora_config.modules_to_save
    assert {"score", "model.norm", "model.layers.1.post_attention_layernorm"} <= set(saved)
    with torch.no_grad():
        _same(model(IDS).logits, expected)
    _same(_round_trip(model, tmp_path / "tied", classifier), expected)


def test_gpt2_conv1d_lora(tmp_path):
    """GPT-2's Conv1D layers (PEFT's fan_in_fan_out)."""
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"])
    expected = _peft_adapter(tmp_path, config, base=tiny_gpt2)
    model = load_peft_adapter(tiny_gpt2().double(), tmp_path, backend="torch").eval()
    with torch.no_grad():
        _same(model(IDS).logits, expected)
    _same(_round_trip(model, tmp_path / "tied", tiny_gpt2), expected)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return (
        not tied_lora_layers(model)
        and after.keys() == before.keys()
        and all(torch.equal(after[k], v) for k, v in before.items())
        and all(p.requires_grad for p in model.parameters())
    )


def test_refusals_leave_the_model_untouched(tmp_path):
    _peft_adapter(tmp_path / "dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    ia3 = peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
    _peft_adapter(tmp_path / "ia3", ia3)
    _peft_adapter(tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    _peft_adapter(tmp_path / "embedding", peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    # (what PEFT's all-linear writes by itself for the fused experts of an MoE model)
    parameters = peft.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=["down_proj.weight"])
    _peft_adapter(tmp_path / "parameters", parameters)
    head = peft.LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"])
    _peft_adapter(tmp_path / "head", head, base=tiny_gpt2)
    (tmp_path / "empty").mkdir()
    shutil.copytree(tmp_path / "lora", tmp_path / "bin")
    (tmp_path / "bin/adapter_model.safetensors").rename(tmp_path / "bin/adapter_model.bin")
    save_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)), tmp_path / "ours")
    _peft_adapter(tmp_path / "vera", peft.VeraConfig(r=4, target_modules=["q_proj"]))
    _peft_adapter(tmp_path / "unprojected", peft.VeraConfig(r=4, target_modules=["q_proj"], save_projection=False))

    def edited(source, name, config=lambda c: None, tensors=lambda s: s):  # a copy of a file, changed
        shutil.copytree(tmp_path / source, tmp_path / name)
        meta = json.loads((tmp_path / name / "adapter_config.json").read_text())
        config(meta)
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(meta))
        weights = tmp_path / name / "adapter_model.safetensors"
        save_file(tensors(load_file(weights)), weights)

    edited("lora", "bias", config=lambda c: c.update(bias="all"))
    edited("lora", "rank-pattern", config=lambda c: c.update(rank_pattern={"q_proj": 2}))
    edited("lora", "alpha-pattern", config=lambda c: c.update(alpha_pattern={"q_proj": 16}))
    edited("lora", "foreign", tensors=lambda s: {**s, "classifier.weight": torch.zeros(2)})
    edited("lora", "no-layers", tensors=lambda s: {"base_model.model.lm_head.weight": torch.zeros(97, 32)})
    q_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    edited("lora", "no-lora-B", tensors=lambda s: {k: t for k, t in s.items() if k != q_b})
    edited("vera", "short-lambda", tensors=lambda s: {k: t[:3] if "lambda_d" in k else t for k, t in s.items()})
    cases = [
        ("dora", tiny_llama, ValueError, r"uses \['use_dora'\]"),
        ("parameters", tiny_llama, ValueError, r"uses \['target_parameters'\].*PEFT adds by itself for 'all-linear'"),
        ("ia3", tiny_llama, ValueError, "holds a PEFT IA3 adapter"),
        ("embedding", tiny_llama, ValueError, r"a LoRA layer type \(embedding"),
        ("head", tiny_gpt2, ValueError, "trained lm_head.weight, which this model ties to transformer.wte.weight"),
        ("empty", tiny_llama, FileNotFoundError, "no adapter_config.json"),
        ("bin", tiny_llama, FileNotFoundError, "an adapter_model.bin must be loaded with PEFT and saved again"),
        ("ours", tiny_llama, ValueError, "holds a tied_lora_kernels adapter: load it with load_tied_lora"),
        ("lora", lambda: tiny_llama(hidden_size=48), ValueError, r"A is \(4, 32\), this layer needs \(4, 48\)"),
        ("bias", tiny_llama, ValueError, r"trains biases \(bias='all'\), which Tied-LoRA does not"),
        ("rank-pattern", tiny_llama, ValueError, r"uses \['rank_pattern'\]"),  # (per-layer ranks and alphas)
        ("alpha-pattern", tiny_llama, ValueError, r"uses \['alpha_pattern'\]"),
        ("foreign", tiny_llama, ValueError, "unexpected tensor names in .*foreign: not a PEFT model's adapter file"),
        ("no-layers", tiny_llama, ValueError, "no-layers holds no LORA layers"),
        ("no-lora-B", tiny_llama, ValueError, f"the PEFT adapter file lacks {q_b}"),
        ("short-lambda", tiny_llama, ValueError, r"q_proj: the PEFT adapter's u is \(3,\), this layer needs \(4,\)"),
        ("vera", lambda: tiny_llama(hidden_size=48), ValueError, r"vera_A/vera_B are too small for a \[48, 48\] layer"),
        ("unprojected", tiny_llama, ValueError, r"no vera_A/vera_B \(saved with save_projection=False\)"),
    ]
    for name, base, error, match in cases:
        model = base().double()
        before = _state(model)
        with pytest.raises(error, match=match):
            load_peft_adapter(model, tmp_path / name)
        assert _unchanged(model, before), name
    adapted = apply_tied_lora(tiny_llama().double(), TiedLoRAConfig(rank=4))
    with pytest.raises(RuntimeError, match="already has Tied-LoRA adapters"):
        load_peft_adapter(adapted, tmp_path / "lora")


def test_a_bf16_file_gives_float32_adapters_with_its_values(tmp_path):
    _peft_adapter(tmp_path / "lora", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert json.loads((tmp_path / "lora/adapter_config.json").read_text())["peft_type"] == "LORA"
    model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = load_peft_adapter(tiny_llama(), tmp_path / "bf16")
    state = tied_lora_state_dict(loaded)
    assert {t.dtype for t in state.values()} == {torch.float32}
    A = state["model.layers.0.self_attn.q_proj.shared.A"]
    assert torch.equal(A, model.base_model.model.model.layers[0].self_attn.q_proj.lora_A.default.weight.float())


def test_a_saved_module_of_another_shape_is_refused_before_adapting(tmp_path):
    """A modules_to_save tensor whose shape does not fit the model's module (another vocabulary size) is refused
    by name before the model is adapted, not half-way through loading."""
    _peft_adapter(tmp_path, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    model = tiny_llama(vocab_size=98).double()
    with pytest.raises(ValueError, match=r"lm_head.weight \(97, 32\) does not fit this model"):
        load_peft_adapter(model, tmp_path)
    assert not tied_lora_layers(model)


def test_lora_on_lm_head_with_its_saved_base_weight(tmp_path):
    """LoRA on an untied ``lm_head``: PEFT's ``save_embedding_layers`` (on by default for it) also writes the head's
    base weight. Equal to the model's, it is accepted and the logits are PEFT's; another model's is refused by name,
    the model untouched. On a head tied to the embeddings the adapter is refused as ``apply_tied_lora`` refuses
    such a target (a merge would change the embeddings)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    expected = _peft_adapter(tmp_path, config)
    model = load_peft_adapter(tiny_llama().double(), tmp_path, backend="torch").eval()
    assert {"lm_head", "model.layers.0.self_attn.q_proj"} <= set(tied_lora_layers(model))
    with torch.no_grad():
        _same(model(IDS).logits, expected)
    assert not model.lm_head.weight.requires_grad
    _same(_round_trip(model, tmp_path / "tied", tiny_llama), expected)

    for other, match in (
        (tiny_llama(seed=5), r"holds lm_head's base weight \(save_embedding_layers\), which is not this model's"),
        (tiny_llama(tie_word_embeddings=True), r"lm_head.weight is shared with \['model.embed_tokens.weight'\]"),
    ):
        other = other.double()
        before = _state(other)
        with pytest.raises(ValueError, match=match):
            load_peft_adapter(other, tmp_path)
        assert not tied_lora_layers(other) and _unchanged(other, before)


def test_initialisations_that_rewrite_the_base_weight_are_refused(tmp_path):
    """PiSSA and OLoRA (as CorDA, LoftQ, LoRA-GA) take their starting adapter out of the base weight, which PEFT
    redoes on loading: the file alone is not the update (loaded as a plain LoRA, the logits were off by 3 to 6), so
    it is refused, pointing at PEFT's conversion to a plain LoRA adapter."""
    for init in ("pissa", "olora"):  # (PEFT runs them in float32 or narrower)
        config = peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init)
        peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / init)
        model = tiny_llama()
        before = _state(model)
        with pytest.raises(ValueError, match=rf"init_lora_weights='{init}', which takes its starting adapter out"):
            load_peft_adapter(model, tmp_path / init)
        assert _unchanged(model, before)


class _Nested(torch.nn.Module):
    """Layers ``layers.i.q`` and, inside ``decoder``, ``decoder.layers.i.q``: a name that is the end of another."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8)}) for _ in range(2))
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q": torch.nn.Linear(8, 8)}) for _ in range(2))
        self.bn = torch.nn.BatchNorm1d(8)

    def forward(self, x):
        for layer in (*self.layers, *self.decoder.layers):
            x = torch.tanh(layer["q"](x))
        return self.bn(x)


def test_a_file_loads_exactly_the_layers_and_module_tensors_it_names(tmp_path):
    """PEFT adapts the outer ``layers.i.q`` only (its regex): the same layers, not those whose names end alike, and
    a BatchNorm in ``modules_to_save`` with its running statistics (buffers PEFT saves); the outputs are PEFT's."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    config = peft.LoraConfig(r=2, target_modules=r"layers\.\d+\.q", modules_to_save=["bn"])
    wrapped = peft.get_peft_model(_Nested().double(), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in [*wrapped.named_parameters(), *wrapped.named_buffers()]:
            if ("lora_" in name or "modules_to_save" in name) and t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5)
    wrapped.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(_Nested().double(), tmp_path).eval()(x)
    model = load_peft_adapter(_Nested().double(), tmp_path, backend="torch").eval()
    assert sorted(tied_lora_layers(model)) == ["layers.0.q", "layers.1.q"]
    assert "bn.running_var" in tied_lora_state_dict(model)  # (saved again with the adapter)
    with torch.no_grad():
        _same(model(x), expected)


def test_tied_embeddings_saved_unchanged_under_both_names_load(tmp_path):
    """PEFT's save_embedding_layers on a model with tied embeddings (its "auto" after resize_token_embeddings)
    writes the one tied weight under both names, unchanged: it loads (as one), and the logits are PEFT's. A file
    whose two copies differ (PEFT untied and trained one) is still refused."""
    base = lambda: tiny_llama(tie_word_embeddings=True)  # noqa: E731
    wrapped = peft.get_peft_model(base().double(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    wrapped.save_pretrained(tmp_path / "lora", save_embedding_layers=True)
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(base().double(), tmp_path / "lora").eval()(IDS).logits
    model = load_peft_adapter(base().double(), tmp_path / "lora", backend="torch").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        _same(model(IDS).logits, expected)
    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "lora", tmp_path / "untied")
    state = load_file(tmp_path / "untied/adapter_model.safetensors")
    state["base_model.model.lm_head.weight"] = state["base_model.model.lm_head.weight"] + 1
    save_file(state, tmp_path / "untied/adapter_model.safetensors")
    with pytest.raises(ValueError, match="PEFT trained an untied copy"):
        load_peft_adapter(base().double(), tmp_path / "untied")


def test_a_float64_file_on_a_float32_model_gives_float32_adapters(tmp_path):
    """A float64 file onto a float32 model: float32 adapters (PEFT rounds to the model's dtype too), not float64 ones
    that the float32 layers cannot run beside."""
    _peft_adapter(tmp_path, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model = load_peft_adapter(tiny_llama(), tmp_path, backend="torch").eval()
    assert {t.dtype for t in tied_lora_state_dict(model).values()} == {torch.float32}
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()(IDS).logits
        torch.testing.assert_close(model(IDS).logits, expected, rtol=1e-5, atol=1e-5)
    assert (
        tied_lora_state_dict(load_peft_adapter(tiny_llama().double(), tmp_path))[
            "model.layers.0.self_attn.q_proj.shared.A"
        ].dtype
        == torch.float64
    )  # (a float64 model keeps them float64)


def test_wrapped_peft_or_foreign_models_are_refused_or_looked_through(tmp_path):
    """A PeftModel is refused as apply_tied_lora refuses it; a torch.compile wrapper is looked through (as
    save/load_tied_lora do); a file whose layers this model does not have says so, naming them."""
    _peft_adapter(tmp_path, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    wrapped = peft.PeftModel.from_pretrained(tiny_llama().double(), tmp_path)
    with pytest.raises(ValueError, match=r"the model is a PEFT model or adapter layer \(peft.peft_model.PeftModel\)"):
        load_peft_adapter(wrapped, tmp_path)
    compiled = torch.compile(tiny_llama().double(), backend="eager")
    assert load_peft_adapter(compiled, tmp_path) is compiled  # (the model as given, not the module inside)
    assert len(tied_lora_layers(compiled)) == 2
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match=r"\['model.layers.0.self_attn.q_proj', .*\] are not modules of this GPT2LM"):
        load_peft_adapter(gpt2, tmp_path)
    assert not tied_lora_layers(gpt2)


def test_pairs_on_layers_whose_weight_the_parent_reads_are_skipped_as_peft_skips_them(tmp_path):
    """PEFT's "all-linear" adapts MobileBERT's LM-head ``dense``, whose weight the head multiplies by itself, so PEFT's
    forward skips that pair: it is left out with a warning (it was refused, by apply_tied_lora's advice to leave it
    out of target_modules), and the logits are PEFT's."""
    import transformers

    def base():
        torch.manual_seed(0)
        config = transformers.MobileBertConfig(
            vocab_size=97, hidden_size=32, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
            intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_feedforward_networks=1,
            max_position_embeddings=64,
        )  # fmt: skip
        return transformers.MobileBertForMaskedLM(config)

    expected = _peft_adapter(tmp_path, peft.LoraConfig(r=2, target_modules="all-linear"), base=base)
    with pytest.warns(UserWarning, match=r"pairs of \['cls.predictions.dense'\] are not loaded: their parent module"):
        model = load_peft_adapter(base().double(), tmp_path, backend="torch").eval()
    assert "cls.predictions.dense" not in tied_lora_layers(model) and len(tied_lora_layers(model)) > 5
    with torch.no_grad():
        _same(model(IDS).logits, expected)


def test_a_damaged_peft_file_is_refused_naming_it(tmp_path):
    """Not JSON, a JSON list, a cut-short safetensors file, a config without ``r``: a ValueError naming the file
    (they were a bare JSONDecodeError, AttributeError, SafetensorError, KeyError), the model untouched."""
    _peft_adapter(tmp_path / "good", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    config, weights = "adapter_config.json", "adapter_model.safetensors"
    damage = {
        "text": (lambda f: (f / config).write_text("{not json"), "adapter_config.json is not JSON"),
        "list": (lambda f: (f / config).write_text("[1]"), "adapter_config.json holds a JSON list, not an adapter"),
        "cut": (lambda f: os.truncate(f / weights, 99), "adapter_model.safetensors is not a readable safetensors"),
        "r": (
            lambda f: (f / config).write_text(json.dumps({**json.loads((f / config).read_text()), "r": None})),
            "the PEFT adapter's config has no number 'r'",
        ),
    }
    for name, (spoil, match) in damage.items():
        shutil.copytree(tmp_path / "good", tmp_path / name)
        spoil(tmp_path / name)
        model = tiny_llama().double()
        before = _state(model)
        with pytest.raises(ValueError, match=match):
            load_peft_adapter(model, tmp_path / name)
        assert _unchanged(model, before), name


def test_loading_inside_ddp_is_refused(tmp_path, process_group):
    """DDP averages only the parameters it found when it was built: an adapter created inside it would train apart
    on each rank."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    _peft_adapter(tmp_path, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    bare = tiny_llama()
    with pytest.raises(ValueError, match="wrapped in DistributedDataParallel"):
        load_peft_adapter(DDP(bare), tmp_path)
    assert not tied_lora_layers(bare)
