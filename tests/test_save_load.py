"""Saving and loading the adapter (``save_tied_lora`` / ``load_tied_lora``): bit-for-bit round trips, the ties
and dtypes a file records, ``modules_to_save``, wrappers looked through, Hugging Face's ``save_pretrained``, and
every file that must be refused before the model is touched."""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch as safetensors_torch
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from tests.models import Toy, enable_checkpointing, randomise_adapters, tiny_llama, transformers_4_input_grad_hook
from tied_lora_kernels import (
    QKV,
    TiedLoRAConfig,
    TiedLoRALinear,
    TiedLoRAShared,
    apply_tied_lora,
    count_parameters,
    disable_tied_lora,
    load_tied_lora,
    merge_tied_lora,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_state_dict,
)


def test_the_names_that_moved_still_import_from_model():
    from tied_lora_kernels import model, save_load
    from tied_lora_kernels.model import load_tied_lora as moved

    assert moved is load_tied_lora and model.WEIGHTS_NAME == save_load.WEIGHTS_NAME
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        model.nope  # noqa: B018


def test_save_load_bit_for_bit(tmp_path):
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",)))
    randomise_adapters(model)
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected = model(ids).logits
    save_tied_lora(model, tmp_path)
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


def test_load_builds_the_ties_the_file_records(tmp_path):
    """The file's layout says which layers share a pair: a file whose ties differ from the current rule (say,
    saved before the rule changed) still loads into a bare model, with its own ties."""

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


def test_a_saved_module_that_does_not_fit_leaves_a_bare_model_untouched(tmp_path):
    """A file's ``modules_to_save`` tensors are checked against the bare model's saved modules before it is adapted:
    a head of another dtype (loading would round it) or shape, a parameter the file lacks (a bias) or holds in
    excess, a head on the meta device, or one tied to the input embeddings is refused, and the model is left as it
    was (no adapted layer, no config, its own ``requires_grad`` flags)."""
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, modules_to_save=("lm_head",)))
    save_tied_lora(model, tmp_path)

    def with_head_bias():
        bare = tiny_llama()
        bare.lm_head.bias = nn.Parameter(torch.zeros(97))
        return bare

    def with_head_on_meta():
        bare = tiny_llama()
        bare.lm_head.to("meta")
        return bare

    cases = [
        (lambda: tiny_llama().to(torch.bfloat16), TypeError, r"lm_head.weight: saved as torch.float32, the model's is "
         r"torch.bfloat16; loading would round it \(load into the model in the file's dtype, then convert it\)"),
        (lambda: tiny_llama(vocab_size=98), ValueError, r"lm_head.weight: saved shape \(97, 32\), model has \(98, "),
        (with_head_bias, ValueError, r"adapter tensors differ: missing \['lm_head.bias'\], unexpected \[\]"),
        (with_head_on_meta, ValueError, r"lm_head.weight is on the meta device"),
        (lambda: tiny_llama(tie_word_embeddings=True), ValueError, r"lm_head.weight is shared with "
         r"\['model.embed_tokens.weight'\] \(tied weights\)"),
    ]  # fmt: skip
    for make, error, match in cases:
        bare = make()
        flags = [p.requires_grad for p in bare.parameters()]
        with pytest.raises(error, match=match):
            load_tied_lora(bare, tmp_path)
        assert not tied_lora_layers(bare) and not hasattr(bare, "tied_lora_config")
        assert [p.requires_grad for p in bare.parameters()] == flags
    # the other way, widening, is exact and loads: a bf16 head into a float32 model
    half = apply_tied_lora(tiny_llama().to(torch.bfloat16), TiedLoRAConfig(rank=4, modules_to_save=("lm_head",)))
    save_tied_lora(half, tmp_path / "bf16")
    widened = load_tied_lora(tiny_llama(), tmp_path / "bf16")
    assert widened.lm_head.weight.dtype == torch.float32 and torch.equal(widened.lm_head.weight, half.lm_head.weight)

    state = load_file(tmp_path / "adapter_model.safetensors")
    state["lm_head.extra"] = state.pop("lm_head.weight")
    save_file(state, tmp_path / "adapter_model.safetensors")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["tensors"]["lm_head.extra"] = meta["tensors"].pop("lm_head.weight")
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    bare = tiny_llama()
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\], unexpected \['lm_head.extra'\]"):
        load_tied_lora(bare, tmp_path)
    assert not tied_lora_layers(bare)


def test_a_tied_module_to_save_is_refused():
    """``modules_to_save`` naming a module whose weight is tied to one left out (a language model's ``lm_head``
    and its input embeddings): training it in place would train the embeddings too, and the file would hold it
    under the embeddings' name, which PEFT cannot load; both saved together are allowed."""
    model = tiny_llama(tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"lm_head.weight is shared with \['model.embed_tokens.weight'\]"):
        apply_tied_lora(model, TiedLoRAConfig(rank=4, modules_to_save=("lm_head",)))
    assert not tied_lora_layers(model) and model.model.embed_tokens.weight.requires_grad
    both = apply_tied_lora(model, TiedLoRAConfig(rank=4, modules_to_save=("lm_head", "embed_tokens")))
    assert both.lm_head.weight.requires_grad and "model.embed_tokens.weight" in tied_lora_state_dict(both)


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
    # VeRA's frozen u starts at 0.1 and is saved; a TL6 model's frozen u starts at one and is no tensor at all
    vera = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="vera", train_u=False))
    save_tied_lora(vera, tmp_path / "vera")
    frozen_u = TiedLoRAConfig(rank=4, preset="tl6", train_A=False, train_B=False, train_u=False)
    frozen = apply_tied_lora(tiny_llama(), frozen_u)
    with pytest.raises(ValueError, match=r"unexpected \[.*lora_scale.u.*\] \(only u and v differ: a frozen u or v"):
        load_tied_lora(frozen, tmp_path / "vera")


def test_load_says_what_a_folder_holds_instead_of_an_adapter(tmp_path):
    """Folders that are not a ``save_tied_lora`` adapter are refused by what they hold: a whole model (TRL scripts
    end with ``trainer.save_model()``), a ``Trainer`` checkpoint with the callback's adapter in ``tied_lora/``, a
    PEFT adapter, nothing."""
    from tied_lora_kernels import export_peft_lora

    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    model.save_pretrained(tmp_path / "whole")
    save_tied_lora(model, tmp_path / "checkpoint-2" / "tied_lora")
    export_peft_lora(model, tmp_path / "peft")
    (tmp_path / "empty").mkdir()
    cases = [
        ("whole", FileNotFoundError, "holds a whole model .*: load it with from_pretrained, or save the adapter"),
        ("checkpoint-2", FileNotFoundError, r"SaveTiedLoRACallback saved its adapter in .*checkpoint-2/tied_lora: "),
        ("peft", ValueError, r"is a PEFT adapter \(LORA\): bring it over with load_peft_adapter"),
        ("empty", FileNotFoundError, "holds no adapter_config.json: it is not a save_tied_lora adapter"),
        ("nowhere", FileNotFoundError, "nowhere is not a folder"),
    ]
    for folder, error, match in cases:
        bare = tiny_llama()
        with pytest.raises(error, match=match):
            load_tied_lora(bare, tmp_path / folder)
        assert not tied_lora_layers(bare)
    assert tied_lora_layers(load_tied_lora(tiny_llama(), tmp_path / "checkpoint-2" / "tied_lora"))


def test_load_names_what_is_damaged_in_an_adapter_file(tmp_path):
    """An adapter file edited by hand or cut short is refused naming the file and what is wrong, for a bare and an
    adapted model, which are left as they were (not a KeyError, AttributeError or safetensors' bare error)."""
    import json
    import os
    import shutil

    save_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)), tmp_path / "good")

    def edited(fn):
        def edit(folder):
            path = folder / "adapter_config.json"
            meta = json.loads(path.read_text())
            fn(meta)
            path.write_text(json.dumps(meta))

        return edit

    def first(section):
        return lambda meta: next(iter(meta[section].values()))

    cases = {
        "layout": (edited(lambda m: m.pop("layout")), r"adapter_config.json: 'layout' is missing or not a JSON"),
        "config": (edited(lambda m: m.pop("config")), r"'config' is missing or not a JSON object; the file is dam"),
        "tensors": (edited(lambda m: m.update(tensors=[])), r"'tensors' is missing or not a JSON object"),
        "shared": (edited(lambda m: first("layout")(m).pop("shared")), r"the layout of .* lacks in_features, out"),
        "dtype": (edited(lambda m: first("tensors")(m).update(dtype="float99")), r"has no shape or no dtype torch k"),
        "shape": (edited(lambda m: first("tensors")(m).update(shape=["x"])), r"has no shape or no dtype torch k"),
        "targets": (edited(lambda m: m["config"].pop("target_modules")), r"its config has no target_modules"),
        "newer": (edited(lambda m: m["config"].update(newer_option=1)), r"fields \['newer_option'\] this version"),
        "alpha": (edited(lambda m: first("layout")(m).pop("alpha")), r"json: its layout lacks a layer's alpha; the f"),
        "format": (edited(lambda m: m.update(format="x")), r"format is not a tied_lora_kernels adapter \(format 'x'\)"),
        "list": (lambda f: (f / "adapter_config.json").write_text("[1, 2]"), r"holds a JSON list, not an adapter"),
        "text": (lambda f: (f / "adapter_config.json").write_text("{not json"), r"adapter_config.json is not JSON"),
        "cut": (
            lambda f: os.truncate(f / "adapter_model.safetensors", 99),
            r"adapter_model.safetensors is not a readable safetensors file .*: a damaged adapter",
        ),
    }
    for name, (damage, match) in cases.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        damage(folder)
        for model in (tiny_llama(), apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))):
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(ValueError, match=match):
                load_tied_lora(model, folder)
            assert before.keys() == model.state_dict().keys()
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # a file without a config (saved from layers adapted by hand) loads into a model adapted alike, not a bare one
    shutil.copytree(tmp_path / "good", tmp_path / "by-hand")
    edited(lambda m: m.update(config=None))(tmp_path / "by-hand")
    with pytest.raises(ValueError, match=r"by-hand was saved without a config \(from layers adapted by hand\)"):
        load_tied_lora(bare := tiny_llama(), tmp_path / "by-hand")
    assert not tied_lora_layers(bare) and all(p.requires_grad for p in bare.parameters())
    load_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)), tmp_path / "by-hand")


def test_save_refuses_a_submodule_adapted_apart(tmp_path):
    # the file holds one config, which does not target what a second apply_tied_lora on a submodule adapted:
    # loading it would adapt the first set of layers only, so saving refuses (the submodule saves on its own)
    model = nn.ModuleDict(
        {name: nn.ModuleDict({proj: nn.Linear(8, 8)}) for name, proj in (("a", "q_proj"), ("b", "k_proj"))}
    )
    apply_tied_lora(model, TiedLoRAConfig(rank=2, target_modules=["q_proj"]))
    apply_tied_lora(model["b"], TiedLoRAConfig(rank=2, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match=r"'b' was adapted by an apply_tied_lora call of its own"):
        save_tied_lora(model, tmp_path / "whole")
    assert not (tmp_path / "whole").exists()
    save_tied_lora(model["b"], tmp_path / "b")
    fresh = nn.ModuleDict({"k_proj": nn.Linear(8, 8)})
    assert list(tied_lora_layers(load_tied_lora(fresh, tmp_path / "b"))) == ["k_proj"]

    class Forwarding(nn.Module):  # as FSDP1's wrapper: what it lacks, such as the config, comes from the model
        def __init__(self, module):
            super().__init__()
            self.module = module

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    inner = apply_tied_lora(
        nn.ModuleDict({"q_proj": nn.Linear(8, 8)}), TiedLoRAConfig(rank=2, target_modules=("q_proj",))
    )
    save_tied_lora(Forwarding(inner), tmp_path / "wrapped")  # one adaptation, seen twice: not refused
    loaded = load_tied_lora(Forwarding(nn.ModuleDict({"q_proj": nn.Linear(8, 8)})), tmp_path / "wrapped")
    assert list(tied_lora_layers(loaded)) == ["module.q_proj"]


def test_a_wrapper_saves_the_modules_its_adapted_part_trains_in_full(tmp_path):
    """A model with no config around a part adapted with ``modules_to_save`` (TiedLoRATrainer on a non-Hugging Face
    model) saves that part's trained-in-full modules too (they were left out: the reloaded head was the untrained
    one, 0.98 off), and the PEFT export lists them under their full names."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, modules_to_save=("lm_head",)))

        def forward(self, ids):
            return self.inner(ids).logits

    model = Wrapper()
    randomise_adapters(model)
    with torch.no_grad():
        model.inner.lm_head.weight.add_(0.1)  # (trained)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    assert "inner.lm_head.weight" in tied_lora_state_dict(model)
    save_tied_lora(model, tmp_path / "ours")
    assert torch.equal(load_tied_lora(Wrapper(), tmp_path / "ours")(ids), model(ids))
    from tied_lora_kernels import export_peft_lora

    export_peft_lora(model, tmp_path / "peft")
    assert json.loads((tmp_path / "peft/adapter_config.json").read_text())["modules_to_save"] == ["inner.lm_head"]


def test_load_refuses_other_layouts(tmp_path):
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    save_tied_lora(model, tmp_path)
    # (the last: the group's projections in another order, every shape and tie alike, q's rows of B elsewhere)
    reordered = TiedLoRAConfig(rank=4, preset="tl6", groups=(("v_proj", "k_proj", "q_proj"),))
    for config in (TiedLoRAConfig(rank=4, groups=()), TiedLoRAConfig(rank=4, tie=False), reordered):
        with pytest.raises(ValueError, match="does not fit this model"):
            load_tied_lora(apply_tied_lora(tiny_llama(), config), tmp_path)
    deeper = tiny_llama(num_hidden_layers=3)
    with pytest.raises(ValueError, match="its targets also match") as info:
        load_tied_lora(deeper, tmp_path)
    assert str(info.value).endswith("'model.layers.2.self_attn.v_proj']")  # (nothing said of an empty list)
    assert not tied_lora_layers(deeper)  # left as it was
    with torch.device("meta"):
        on_meta = tiny_llama()
    with pytest.raises(ValueError, match="meta device"):
        load_tied_lora(on_meta, tmp_path)
    apply_tied_lora(on_meta, TiedLoRAConfig(rank=4, preset="tl6"))  # (saving it raised torch's NotImplementedError)
    with pytest.raises(ValueError, match=r"\['model.layers.0.self_attn.q_proj.lora_v', .* are on the meta device"):
        save_tied_lora(on_meta, tmp_path / "from_meta")
    assert not (tmp_path / "from_meta").exists()
    bf16 = apply_tied_lora(tiny_llama().to(torch.bfloat16), TiedLoRAConfig(rank=4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="would round it"):
        load_tied_lora(bf16, tmp_path)
    merged = merge_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)))
    with pytest.raises(RuntimeError, match="merged"):
        load_tied_lora(merged, tmp_path)


def test_a_float64_adapter_file_is_refused_by_a_float32_model(tmp_path):
    """float64 adapters cannot run beside float32 layers and rounding them to float32 would not load what was saved:
    the bare model is left untouched (it used to load them, and every forward then raised)."""
    model = apply_tied_lora(Toy().double(), TiedLoRAConfig(rank=4, dtype=torch.float64))
    save_tied_lora(model, tmp_path)
    bare = Toy()
    with pytest.raises(TypeError, match="computes in torch.float32 and the adapters would be torch.float64"):
        load_tied_lora(bare, tmp_path)
    assert not tied_lora_layers(bare)
    assert tied_lora_layers(load_tied_lora(Toy().double(), tmp_path))


def test_load_refuses_a_file_that_lost_a_tensor(tmp_path):
    save_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)), tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    state.pop(next(k for k in state if k.endswith("lora_v")))
    save_file(state, tmp_path / "adapter_model.safetensors")
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="adapter tensors differ"):
        load_tied_lora(fresh, tmp_path)
    assert not tied_lora_layers(fresh)


@pytest.mark.parametrize("hooks", ["transformers-5", "transformers-4"])
def test_a_file_that_does_not_fit_its_own_config_leaves_a_bare_model_as_it_was(tmp_path, monkeypatch, hooks):
    """Tensors that match the file's description but not the adapter its config builds (here ``u`` gone from both,
    while the config trains it: a file edited by hand, or written by another version) can only be checked once the
    model is adapted: the refusal puts the bare model back, its own modules with their hooks, ``requires_grad``
    flags, attributes and hooks (the input-grad hook that reentrant checkpointing gets here included, as
    transformers 5 and 4 keep it)."""
    if hooks == "transformers-4":
        transformers_4_input_grad_hook(monkeypatch)
    save_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6")), tmp_path)
    state, meta = (
        load_file(tmp_path / "adapter_model.safetensors"),
        json.loads((tmp_path / "adapter_config.json").read_text()),
    )
    for key in [k for k in state if k.endswith(".lora_scale.u")]:
        del state[key], meta["tensors"][key]
    save_file(state, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))

    bare = tiny_llama()
    enable_checkpointing(bare, reentrant=True, input_grads=False)
    bare.disable_input_require_grads()  # (so that adapting it registers the hook, as for Whisper)
    bare.model.embed_tokens.weight.requires_grad_(False)
    modules, flags = dict(bare.named_modules()), [(n, p.requires_grad) for n, p in bare.named_parameters()]
    attributes, load_hooks = dict(vars(bare)), dict(bare._load_state_dict_pre_hooks)
    calls = []
    bare.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.q_proj.lora_scale.u'"):
        load_tied_lora(bare, tmp_path)
    assert dict(bare.named_modules()) == modules and not tied_lora_layers(bare)
    assert [(n, p.requires_grad) for n, p in bare.named_parameters()] == flags
    assert vars(bare) == attributes and dict(bare._load_state_dict_pre_hooks) == load_hooks
    assert not getattr(bare, "_require_grads_hooks", None) and not bare.model.embed_tokens._forward_hooks
    bare(torch.randint(0, 97, (1, 5)))
    assert calls == [1]  # the hook is back on the layer it was registered on


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


def test_a_file_saying_triton_above_its_largest_rank_still_loads(tmp_path):
    # saved before configs refused backend='triton' above the kernels' largest rank (its layers switched to torch
    # once built): a bare model loads it with "auto", and a warning; an adapted one, and an override, without
    from tied_lora_kernels.kernels.configs import MAX_RANK

    R = MAX_RANK + 2
    config = TiedLoRAConfig(rank=R, backend="torch")
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    save_tied_lora(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["config"]["backend"] = "triton"
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=rf"backend='triton' at rank {R}.*loading it with backend='auto'"):
        bare = load_tied_lora(tiny_llama(), tmp_path)
    assert {layer.backend for layer in tied_lora_layers(bare).values()} == {"auto"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_tied_lora(apply_tied_lora(tiny_llama(), config), tmp_path) is not None
        overridden = load_tied_lora(tiny_llama(), tmp_path, backend="torch")
    assert {layer.backend for layer in tied_lora_layers(overridden).values()} == {"torch"}
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        assert torch.equal(bare(ids).logits, overridden(ids).logits)
    # an override to triton at that rank is refused as a layer or config built with it is, before touching the
    # model (on an adapted model it used to set every layer's backend, to fail at the first forward on a GPU)
    adapted = apply_tied_lora(tiny_llama(), config)
    for model in (tiny_llama(), adapted):
        with pytest.raises(ValueError, match=rf"backend='triton' supports ranks up to {MAX_RANK}, got rank {R}"):
            load_tied_lora(model, tmp_path, backend="triton")
    assert {layer.backend for layer in tied_lora_layers(adapted).values()} == {"torch"}


def test_each_layers_alpha_and_dropout_set_after_apply_are_saved_and_loaded(tmp_path):
    """A layer's ``alpha`` and ``lora_dropout`` set after ``apply_tied_lora`` (the config's applied to every layer)
    load into a bare model as they were saved, so its outputs are the saved model's bit for bit (the bare load
    rebuilt every layer from the config: a new alpha was lost, 0.25 off in a reviewer's repro, and so was the
    dropout). An adapted model must have the file's alphas, and keeps its own dropout."""
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, backend="torch"))
    randomise_adapters(model)
    layers = tied_lora_layers(model)
    first, second = sorted(layers)[:2]
    layers[first].alpha, layers[second].lora_dropout = 8.0, 0.25
    save_tied_lora(model, tmp_path)
    fresh = load_tied_lora(Toy(), tmp_path).eval()
    loaded = tied_lora_layers(fresh)
    assert (loaded[first].alpha, loaded[second].lora_dropout) == (8.0, 0.25)
    assert {loaded[n].alpha for n in loaded if n != first} == {4.0}
    assert {loaded[n].lora_dropout for n in loaded if n != second} == {0.0}
    with torch.no_grad():
        assert torch.equal(fresh(x), model.eval()(x))
    other = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, backend="torch"))
    with pytest.raises(ValueError, match="alpha"):
        load_tied_lora(other, tmp_path)
    tied_lora_layers(other)[first].alpha = 8.0
    load_tied_lora(other, tmp_path)  # (its dropout differs: kept, not refused)
    assert tied_lora_layers(other)[second].lora_dropout == 0.0
    # the layout keeps the keys readers before the dropouts compare (the dropouts beside it): they load the file
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k for entry in meta["layout"].values() for k in entry} == {
        "in_features", "out_features", "rank", "alpha", "trains", "shared", "b_rows"
    }  # fmt: skip
    # a file written before it saved the dropouts ran the config's alpha whatever its layout says (an alpha set on a
    # layer changed nothing then): loaded with the config's, its outputs are what that model computed
    del meta["layer_dropout"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    layers[first].alpha, layers[second].lora_dropout = 4.0, 0.0
    with torch.no_grad():
        assert torch.equal(load_tied_lora(Toy(), tmp_path).eval()(x), model(x))
    meta["layer_dropout"] = {"nope": 0.1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layer_dropout is not a JSON object of the layout's layers"):
        load_tied_lora(Toy(), tmp_path)


def test_save_after_conversion_freeze_and_wrappers(tmp_path):
    """An adapter saved after ``model.to(bf16)`` loads into a bare bf16 model (the file records the dtype its
    tensors have); a model frozen for inference loads it and keeps its flags; ``torch.compile``'s and DDP's
    wrappers add no prefix to the file's names and are looked through on load; nor does an ``AveragedModel``'s (EMA)."""
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
    compiled = torch.compile(frozen)
    assert load_tied_lora(compiled, tmp_path) is compiled  # (the model as given: model = load_tied_lora(model, ...))
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert torch.equal(frozen(ids).logits, expected)

    # an EMA of the adapter (torch.optim.swa_utils.AveragedModel, a deepcopy that keeps the ties): its averaged tensors
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.5))
    ema.update_parameters(model)  # (the first update copies)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_v.add_(1.0)
    ema.update_parameters(model)
    save_tied_lora(ema, tmp_path / "ema")
    assert not any(k.startswith("module.") for k in load_file_keys(tmp_path / "ema"))
    averaged = load_tied_lora(tiny_llama().to(torch.bfloat16), tmp_path / "ema")
    theirs = tied_lora_state_dict(averaged)
    assert all(torch.equal(theirs[k], t) for k, t in tied_lora_state_dict(ema.module).items())
    assert not torch.equal(
        theirs["model.layers.0.self_attn.q_proj.lora_v"], model.model.layers[0].self_attn.q_proj.lora_v
    )


def test_parts_replaced_by_their_compile_wrappers_are_refused_by_name_and_compiled_in_place_work(tmp_path):
    """Regional compilation that replaces each block by ``torch.compile(block)`` puts ``_orig_mod.`` in every name
    below it: the file saved from it loaded into no bare model, and PEFT read the export as an adapter of no layer
    (a warning, then the base model's logits). Saving, exporting and loading such a model are refused by name;
    ``block.compile()``, in place, keeps the names and round-trips. Nothing is traced (no forward is run)."""
    from tied_lora_kernels import export_peft_lora, load_peft_adapter

    config = TiedLoRAConfig(rank=4, preset="tl6", target_modules=QKV + ("o_proj",))
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    save_tied_lora(model, tmp_path / "plain")
    export_peft_lora(model, tmp_path / "peft")
    for i, block in enumerate(model.model.layers):
        model.model.layers[i] = torch.compile(block)
    match = r"torch.compile wrappers \(\['model.layers.0', 'model.layers.1'\]\).*layer.compile\(\)"
    for call in (
        lambda: save_tied_lora(model, tmp_path / "wrapped"),
        lambda: tied_lora_state_dict(model),
        lambda: export_peft_lora(model, tmp_path / "wrapped_peft"),
        lambda: load_tied_lora(model, tmp_path / "plain"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    bare = tiny_llama()
    for i, block in enumerate(bare.model.layers):
        bare.model.layers[i] = torch.compile(block)
    for call in (lambda: load_tied_lora(bare, tmp_path / "plain"), lambda: load_peft_adapter(bare, tmp_path / "peft")):
        with pytest.raises(ValueError, match="loading .* into a model with parts replaced by their torch.compile"):
            call()
    assert not tied_lora_layers(bare)

    in_place = apply_tied_lora(tiny_llama(), config)
    for block in in_place.model.layers:
        block.compile()
    load_tied_lora(in_place, tmp_path / "plain")
    save_tied_lora(in_place, tmp_path / "in_place")
    assert load_file_keys(tmp_path / "in_place") == load_file_keys(tmp_path / "plain")
    model.model.layers = nn.ModuleList(block._orig_mod for block in model.model.layers)
    assert all(torch.equal(t, tied_lora_state_dict(in_place)[k]) for k, t in tied_lora_state_dict(model).items())


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


def test_a_file_that_adapted_a_layer_whose_weight_its_parent_reads_says_why_it_no_longer_loads(tmp_path, monkeypatch):
    """A file saved before apply_tied_lora learnt which layers their parent reads the weight of (Mamba's dt_proj,
    x_proj, out_proj under "all-linear"): the refusal to load it names those layers and the reason."""
    from tied_lora_kernels import targets

    def mamba():
        torch.manual_seed(0)
        shape = dict(vocab_size=50, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2)
        return transformers.MambaForCausalLM(transformers.MambaConfig(**shape))

    with monkeypatch.context() as patch:
        patch.setattr(targets, "_WEIGHT_READ_BY_PARENT", {})
        save_tied_lora(apply_tied_lora(mamba(), TiedLoRAConfig(rank=4, target_modules="all-linear")), tmp_path)
    with pytest.raises(ValueError, match=r"no longer match \['backbone.layers.0.mixer.dt_proj', .*\]; \['backbone"):
        load_tied_lora(mamba(), tmp_path)


def test_save_pretrained_stores_each_tied_tensor_once_and_strict_loading_takes_it(tmp_path):
    """save_pretrained (Trainer's checkpoints) stores a tensor that layers share once instead of refusing it;
    load_state_dict, strict, restores it through that one name (also from a module above the adapted one),
    and a tensor missing under all of its names is still reported missing."""
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

    # safetensors' own save_model / load_model: load_model expects the names save_model left out to come back
    # missing, which the hook fills in, so it takes strict=False on an adapted model (docs/api.md)
    safetensors_torch.save_model(model, tmp_path / "st.safetensors")
    third = apply_tied_lora(tiny_llama(seed=3), config)
    safetensors_torch.load_model(third, tmp_path / "st.safetensors", strict=False)
    with torch.no_grad():
        assert torch.equal(third(ids).logits, model(ids).logits)

    # names of one tied tensor with different values (saved with other ties) would each overwrite it: refused
    full = {k: v.clone() for k, v in model.state_dict().items()}
    full["model.layers.0.self_attn.k_proj.shared.A"] += 1
    with pytest.raises(RuntimeError, match="one tied tensor in this model, but the state dict holds different"):
        other.load_state_dict(full)
    # NaN is NaN: a diverged run's tied tensor, under each of its names, still loads (and the NaN with it)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    for k in full:
        if k.endswith(".shared.A"):  # every name of the one A (q, k, v of both layers)
            full[k][0, 0] = float("nan")
    other.load_state_dict(full)
    assert other.model.layers[1].self_attn.v_proj.shared.A[0, 0].isnan()
    full["model.layers.0.self_attn.k_proj.shared.A"][0, 0] = 0.0  # NaN under one name, a number under another
    with pytest.raises(RuntimeError, match="one tied tensor in this model, but the state dict holds different"):
        other.load_state_dict(full)
    # each adapted model fills in its own names only: beside an untied one, a missing key stays missing
    pair = nn.ModuleDict({"untied": apply_tied_lora(Toy(), TiedLoRAConfig(rank=2, tie=False, groups=()))})
    pair["tied"] = apply_tied_lora(Toy(), TiedLoRAConfig(rank=2))
    saved = pair.state_dict()
    del saved["untied.layers.1.q_proj.shared.A"]
    missing = pair.load_state_dict(saved, strict=False).missing_keys
    assert missing == ["untied.layers.1.q_proj.shared.A"]


def test_accelerate_save_state_and_load_state_resume_an_adapted_model(tmp_path):
    """accelerate's ``save_state`` / ``load_state`` (a custom training loop's checkpoints): its default safetensors
    files go through ``save_model`` / ``load_model``, so ``load_state`` takes ``strict=False`` (docs/api.md); pickled
    files (``safe_serialization=False``) load strictly. Both give back the adapter and AdamW's state exactly, into
    the model's own tied parameters."""
    accelerate = pytest.importorskip("accelerate")
    config = TiedLoRAConfig(rank=4, preset="tl6")
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))

    def prepared():
        accelerator = accelerate.Accelerator(cpu=True)
        model = apply_tied_lora(tiny_llama(), config)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return accelerator, *accelerator.prepare(model, opt)

    accelerator, model, opt = prepared()
    for _ in range(2):
        accelerator.backward(model(ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
    for safe, load in ((True, dict(strict=False)), (False, {})):
        folder = tmp_path / f"safe-{safe}"
        accelerator.save_state(folder, safe_serialization=safe)
        again, resumed, resumed_opt = prepared()
        if safe:  # (what load_model's strict check makes of the names the load hook fills in)
            with pytest.raises(RuntimeError, match="Unexpected key"):
                again.load_state(folder)
        again.load_state(folder, **load)
        theirs = tied_lora_state_dict(resumed)
        assert all(torch.equal(theirs[k], t) for k, t in tied_lora_state_dict(model).items())
        layers = tied_lora_layers(resumed)
        assert layers["model.layers.0.self_attn.q_proj"].shared.A is layers["model.layers.1.self_attn.v_proj"].shared.A
        ours, loaded = opt.state_dict()["state"], resumed_opt.state_dict()["state"]
        assert ours.keys() == loaded.keys() and all(
            torch.equal(ours[i][k], loaded[i][k]) for i in ours for k in ("exp_avg", "exp_avg_sq")
        )


def test_a_sharded_save_pretrained_loads_through_transformers(tmp_path):
    """A checkpoint in shards (save_pretrained's max_shard_size, as large models and Trainer write them) loads the
    adapter bit for bit through transformers' load_sharded_checkpoint (Trainer's resume), which lists the tied
    tensors' other names as missing: it compares the index with the model's keys before loading (docs/guide.md)."""
    from transformers.trainer_utils import load_sharded_checkpoint

    config = TiedLoRAConfig(rank=4)
    model = apply_tied_lora(tiny_llama(), config)
    randomise_adapters(model)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    other = apply_tied_lora(tiny_llama(seed=3), config)
    result = load_sharded_checkpoint(other, tmp_path, strict=False)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)
    tied = ("shared.A", "shared.B", "lora_scale.u")
    assert result.missing_keys and all(k.endswith(tied) for k in result.missing_keys)
    assert not result.unexpected_keys


def test_the_state_dict_is_detached():
    """tied_lora_state_dict hands out detached tensors (the parameters' storage, no autograd): editing them in
    place needs no torch.no_grad()."""
    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    state = tied_lora_state_dict(model)
    assert state and not any(t.requires_grad or isinstance(t, nn.Parameter) for t in state.values())
    state["layers.0.q_proj.shared.A"].zero_()
    assert torch.count_nonzero(model.layers[0].q_proj.shared.A) == 0


def test_backend_override_reaches_an_adapted_model(tmp_path):
    """load_tied_lora(backend=...) sets the backend of a model that is adapted already, as of a bare one."""
    save_tied_lora(apply_tied_lora(Toy(), TiedLoRAConfig(rank=4)), tmp_path)
    adapted = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    load_tied_lora(adapted, tmp_path, backend="torch")
    assert {layer.backend for layer in tied_lora_layers(adapted).values()} == {"torch"}


def test_trainable_true_trains_only_the_configured_factors(tmp_path):
    """trainable=True makes the factors the config trains require grad, and leaves the frozen ones (VeRA's tied A
    and B) frozen."""
    save_tied_lora(apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, preset="vera")), tmp_path)
    model = load_tied_lora(Toy(), tmp_path, trainable=True)
    layer = model.layers[0].q_proj
    assert not layer.shared.A.requires_grad and not layer.shared.B.requires_grad
    assert layer.lora_u.requires_grad and layer.lora_v.requires_grad


def test_trainable_true_on_layers_built_by_hand_trains_what_trained_when_saved(tmp_path):
    """Layers built by hand have no config: trainable=True makes the factors that trained when the file was saved
    require grad again (a VeRA-style pair built frozen stays frozen), after a freeze for inference too."""

    def build():
        shared = TiedLoRAShared(8, 4, 2, train_A=False, train_B=False, init="kaiming")
        return nn.Sequential(TiedLoRALinear(8, 4, shared=shared, u_init=0.1), TiedLoRALinear(8, 4, shared=shared))

    save_tied_lora(build(), tmp_path)
    model = build()
    model.requires_grad_(False)
    load_tied_lora(model, tmp_path, trainable=True)
    for layer in model:
        assert not layer.shared.A.requires_grad and not layer.shared.B.requires_grad
        assert layer.lora_u.requires_grad and layer.lora_v.requires_grad


def test_a_file_with_adapters_of_mixed_dtypes_is_refused_by_a_bare_model(tmp_path):
    """A file whose adapter tensors are not all its config's dtype (one pair converted by hand) does not adapt a
    bare model: the config could not rebuild the adapter that was saved."""
    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4, target_modules=QKV + ("o_proj",)))
    model.layers[0].o_proj.shared.to(torch.bfloat16)
    save_tied_lora(model, tmp_path)
    bare = Toy()
    with pytest.raises(TypeError, match="not all torch.float32, its config's dtype"):
        load_tied_lora(bare, tmp_path)
    assert not tied_lora_layers(bare)


def test_save_refuses_a_target_replaced_after_apply(tmp_path):
    """``resize_token_embeddings`` puts a new plain ``lm_head`` in place of the adapted one: its adapter is gone, and
    a file whose config targets ``lm_head`` without it in the layout would not load into any model. Saving refuses,
    naming it; a model resized before ``apply_tied_lora`` saves and loads."""
    config = TiedLoRAConfig(rank=4, target_modules=QKV + ("lm_head",))
    model = apply_tied_lora(tiny_llama(), config)
    model.resize_token_embeddings(120, mean_resizing=False)
    assert "lm_head" not in tied_lora_layers(model)
    with pytest.raises(ValueError, match=r"\['lm_head'\] match this adapter's target_modules but carry no adapter"):
        save_tied_lora(model, tmp_path / "resized")
    assert not (tmp_path / "resized").exists()

    def resized():
        model = tiny_llama()
        model.resize_token_embeddings(120, mean_resizing=False)
        return model

    model = apply_tied_lora(resized(), config)
    save_tied_lora(model, tmp_path / "ok")
    assert "lm_head" in tied_lora_layers(load_tied_lora(resized(), tmp_path / "ok"))


def test_layers_sized_by_numpy_save_and_a_failed_save_leaves_the_folder_alone(tmp_path, monkeypatch):
    """``nn.Linear(np.int64(16), ...)`` keeps numpy sizes, which the layout writes as plain ints; and the JSON is
    made before either file is written, so a save that fails there leaves an adapter already in the folder whole
    (it wrote the weights, then half the JSON)."""
    np = pytest.importorskip("numpy")
    from tied_lora_kernels import save_load

    def model():
        torch.manual_seed(0)
        d = np.int64(16)
        return nn.ModuleDict({"a": nn.ModuleDict({p: nn.Linear(d, d) for p in QKV})})

    adapted = apply_tied_lora(model(), TiedLoRAConfig(rank=4))
    save_tied_lora(adapted, tmp_path)
    loaded = load_tied_lora(model(), tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in adapted.state_dict().items())
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(save_load, "_layout", lambda m: {"a": object()})  # (not JSON)
    with torch.no_grad():
        adapted.a.q_proj.shared.A.add_(1.0)
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_tied_lora(adapted, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_a_saved_module_keeps_its_running_statistics(tmp_path):
    """A BatchNorm in ``modules_to_save`` is saved with its buffers (running mean and variance, as PEFT saves them):
    reloaded, and exported to PEFT, the model computes what it did in eval mode (they were lost: 0.19 off)."""

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))

    model = apply_tied_lora(net(), TiedLoRAConfig(rank=2, target_modules=["0"], modules_to_save=("1",)))
    randomise_adapters(model)
    model.train()(torch.randn(32, 8) * 3 + 1)  # (moves the running statistics)
    x = torch.randn(4, 8)
    expected = model.eval()(x)
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(tied_lora_state_dict(model))
    save_tied_lora(model, tmp_path / "ours")
    adapted = apply_tied_lora(net(), TiedLoRAConfig(rank=2, target_modules=["0"], modules_to_save=("1",)))
    for loaded in (
        load_tied_lora(net(), tmp_path / "ours"),
        load_tied_lora(adapted, tmp_path / "ours", trainable=True),
    ):
        assert torch.equal(loaded.eval()(x), expected)
        assert loaded[1].num_batches_tracked == model[1].num_batches_tracked
        assert not loaded[1].running_mean.requires_grad and loaded[1].weight.requires_grad
    # a file saved before buffers were (it lacks them) still loads, into a bare or adapted model, keeping the model's
    state, meta = (
        load_file(tmp_path / "ours/adapter_model.safetensors"),
        json.loads((tmp_path / "ours/adapter_config.json").read_text()),
    )
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        del state[name], meta["tensors"][name]
    (tmp_path / "old").mkdir()
    save_file(state, tmp_path / "old/adapter_model.safetensors")
    (tmp_path / "old/adapter_config.json").write_text(json.dumps(meta))
    adapted = apply_tied_lora(net(), TiedLoRAConfig(rank=2, target_modules=["0"], modules_to_save=("1",)))
    for loaded in (net(), adapted):
        with pytest.warns(UserWarning) as record:
            loaded = load_tied_lora(loaded, tmp_path / "old")
        assert len(record) == 1 and record[0].filename == __file__  # (once, at the call)
        assert "holds no ['1.num_batches_tracked', '1.running_mean', '1.running_var']" in str(record[0].message)
        assert torch.equal(loaded[1].running_var, torch.ones(8)) and torch.equal(loaded[1].weight, model[1].weight)
    # a file that describes them but lacks them is damaged, not old: refused
    (tmp_path / "cut").mkdir()
    save_file(state, tmp_path / "cut/adapter_model.safetensors")
    (tmp_path / "cut/adapter_config.json").write_text((tmp_path / "ours/adapter_config.json").read_text())
    for target in (net(), apply_tied_lora(net(), TiedLoRAConfig(rank=2, target_modules=["0"], modules_to_save=("1",)))):
        with pytest.raises(ValueError, match=r"adapter tensors differ: missing \['1.num_batches_tracked'"):
            load_tied_lora(target, tmp_path / "cut")
    from tied_lora_kernels import export_peft_lora

    peft = pytest.importorskip("peft")
    export_peft_lora(model, tmp_path / "peft")
    torch.testing.assert_close(peft.PeftModel.from_pretrained(net(), tmp_path / "peft").eval()(x), expected)


@pytest.mark.parametrize("factor", ["shared.A", "lora_v"])
def test_a_parametrized_adapter_factor_is_refused_by_name(tmp_path, factor):
    """A factor under torch.nn.utils.parametrize is computed at each read, no parameter of the model: the adapter's
    tensors silently lacked it, and save_tied_lora failed with a bare KeyError."""
    from torch.nn.utils.parametrizations import orthogonal

    from tied_lora_kernels.distributed import tied_lora_parameters

    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    owner, _, attr = f"model.layers.1.self_attn.k_proj.{factor}".rpartition(".")
    if attr == "A":
        orthogonal(model.get_submodule(owner), attr)
    else:
        torch.nn.utils.parametrize.register_parametrization(model.get_submodule(owner), attr, nn.Identity())
    name = "model.layers.0.self_attn.q_proj.shared.A" if attr == "A" else f"{owner}.{attr}"  # (A: its first name)
    message = f"\\['{name}'\\] are parametrized"
    for call in (tied_lora_state_dict, lambda m: save_tied_lora(m, tmp_path), tied_lora_parameters):
        with pytest.raises(ValueError, match=message):
            call(model)
    assert not (tmp_path / "adapter_config.json").exists()
    torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule(owner), attr)
    save_tied_lora(model, tmp_path)  # (the values it computed kept)


def test_a_triton_adapter_at_the_largest_rank_loads_as_triton(tmp_path):
    # rank MAX_RANK is the kernels' own: the file's backend="triton" stands, without the warning meant for ranks
    # above it (catches: "> MAX_RANK" read as ">=")
    from tied_lora_kernels.kernels.configs import MAX_RANK

    rank = MAX_RANK
    save_tied_lora(apply_tied_lora(Toy(), TiedLoRAConfig(rank=rank, backend="triton")), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_tied_lora(Toy(), tmp_path)
    assert {layer.backend for layer in tied_lora_layers(model).values()} == {"triton"}
    assert model.tied_lora_config.backend == "triton" and model.tied_lora_config.rank == rank
