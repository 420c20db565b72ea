"""``export_peft_lora``: the adapter as a standard PEFT LoRA adapter. Loaded by PEFT into the original model,
it must compute what the adapted model computes."""

from __future__ import annotations

import json
import re
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.models import randomise_adapters, tiny_llama
from tied_lora_kernels import (
    QKV,
    TiedLoRAConfig,
    TiedLoRALinear,
    apply_tied_lora,
    export_peft_lora,
    merge_tied_lora,
    tied_lora_layers,
)

peft = pytest.importorskip("peft")


def _peft_logits(directory, ids, **model_kw):
    base = tiny_llama(**model_kw).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(base, directory)
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    return loaded, loaded(ids).logits


@pytest.mark.parametrize(
    "config",
    [
        dict(preset="tl6"),  # q, k, v grouped: A and u shared by the group, rows of a stacked B
        dict(preset="vera", groups=()),  # frozen u_init 0.1 ... randomised below, trained vectors
        dict(preset="lora", groups=(), target_modules=QKV + ("o_proj",)),  # untied: PEFT's own layout
        dict(preset="tl5", train_u=True, target_modules="all-linear", alpha=16.0),  # frozen v = 1 (not stored)
    ],
    ids=["tl6", "vera", "lora", "tl5_u"],
)
def test_peft_loads_the_same_model(tmp_path, config):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    model = apply_tied_lora(tiny_llama().double(), TiedLoRAConfig(rank=4, dtype=torch.float64, **config))
    randomise_adapters(model)
    expected = model(ids).logits
    export_peft_lora(model, tmp_path, base_model_name_or_path="tiny-llama")

    loaded, logits = _peft_logits(tmp_path, ids)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(expected, tiny_llama().double()(ids).logits)  # the adapter does something
    adapted = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(tied_lora_layers(model))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == meta["lora_alpha"] == 4
    assert meta["base_model_name_or_path"] == "tiny-llama"
    short = {name.rpartition(".")[2] for name in tied_lora_layers(model)}
    assert meta["target_modules"] == sorted(short)


def test_a_subset_of_layers_is_named_in_full(tmp_path):
    """Short names would also adapt the layers the callable left out: the config holds a regular expression that
    PEFT full-matches against qualified names (a list would match them as suffixes)."""
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    target = lambda module, name: name.endswith("layers.1.self_attn.q_proj")  # noqa: E731
    model = apply_tied_lora(tiny_llama().double(), TiedLoRAConfig(rank=4, target_modules=target, groups=()))
    model.double()
    randomise_adapters(model)
    export_peft_lora(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["target_modules"] == r"model\.layers\.1\.self_attn\.q_proj"
    _, logits = _peft_logits(tmp_path, ids)
    torch.testing.assert_close(logits, model(ids).logits, rtol=1e-12, atol=1e-12)


class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)
        self.block = torch.nn.ModuleDict({"proj": torch.nn.Linear(8, 8)})

    def forward(self, h):
        return self.block["proj"](torch.tanh(self.proj(h)))


def test_a_root_name_does_not_match_a_nested_one(tmp_path):
    """Only the root ``proj`` is adapted: as a list, PEFT would match ``proj`` as a suffix of ``block.proj`` too."""
    model = apply_tied_lora(_Nested(), TiedLoRAConfig(rank=2, target_modules=lambda m, n: n == "proj", groups=()))
    randomise_adapters(model)
    export_peft_lora(model, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(_Nested(), tmp_path)
    assert not [w for w in caught if "missing" in str(w.message).lower()], [str(w.message) for w in caught]
    h = torch.randn(3, 8)
    torch.testing.assert_close(loaded(h), model(h), rtol=1e-6, atol=1e-6)
    assert not hasattr(loaded.base_model.model.block["proj"], "lora_A")


def test_dtype_and_refusals(tmp_path):
    from safetensors.torch import load_file

    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, dropout=0.1))
    export_peft_lora(model, tmp_path / "bf16", dtype=torch.bfloat16)
    state = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.bfloat16} and len(state) == 2 * 3 * 2  # 2 layers × q, k, v
    assert json.loads((tmp_path / "bf16" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        export_peft_lora(model, tmp_path / "x", dtype="bf16")
    with pytest.raises(ValueError, match="no Tied-LoRA adapters"):
        export_peft_lora(tiny_llama(), tmp_path / "x")
    # layers adapted by hand at two ranks: PEFT's config has one r
    mixed = nn.Sequential(*(TiedLoRALinear.from_linear(nn.Linear(8, 8), rank=r) for r in (2, 4)))
    with pytest.raises(ValueError, match=r"the adapted layers have several ranks \[2, 4\]: PEFT's LoRA config has one"):
        export_peft_lora(mixed, tmp_path / "x")
    merge_tied_lora(model)
    with pytest.raises(RuntimeError, match="cannot export merged layers"):
        export_peft_lora(model, tmp_path / "x")
    with torch.device("meta"):
        meta = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    with pytest.raises(ValueError, match="meta device"):
        export_peft_lora(meta, tmp_path / "x")
    # one layer's own v on meta beside a materialised A (an offloaded layer): named, not a crash inside torch
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, preset="tl6"))
    q = model.model.layers[1].self_attn.q_proj
    q.lora_v = nn.Parameter(torch.empty_like(q.lora_v, device="meta"))
    with pytest.raises(ValueError, match=r"\['model.layers.1.self_attn.q_proj.lora_v'\] are on the meta device"):
        export_peft_lora(model, tmp_path / "x")


def test_task_type_and_a_part_of_the_model(tmp_path):
    """The file records the task type of a causal LM, so AutoPeftModelForCausalLM can load it (a classifier gets none:
    PEFT's classifier types expect their head in the file); exporting the .model inside the adapted ForCausalLM
    warns (its names would not fit the full model)."""
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    model = apply_tied_lora(tiny_llama().double(), TiedLoRAConfig(rank=4, dtype=torch.float64))
    randomise_adapters(model)
    export_peft_lora(model, tmp_path / "causal")
    assert json.loads((tmp_path / "causal" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    export_peft_lora(model, tmp_path / "none", task_type=None)  # None: none written
    assert json.loads((tmp_path / "none" / "adapter_config.json").read_text())["task_type"] is None
    export_peft_lora(model, tmp_path / "given", task_type="SEQ_CLS")
    assert json.loads((tmp_path / "given" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    with pytest.raises(ValueError, match="task_type must be one of PEFT's"):
        export_peft_lora(model, tmp_path / "bad", task_type="causal_lm")
    loaded, logits = _peft_logits(tmp_path / "causal", ids)
    assert type(loaded).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, rtol=1e-12, atol=1e-12)
    with pytest.warns(UserWarning, match="has no head and is not the model apply_tied_lora adapted") as caught:
        export_peft_lora(model.model, tmp_path / "part")
    assert [w.filename for w in caught] == [__file__]  # (pointing at the caller's line)


def test_modules_to_save_are_listed_in_the_peft_config(tmp_path):
    """A trained-in-full module goes into the file under PEFT's name and is listed as PEFT's modules_to_save (so
    PEFT wraps and trains it, and saves it again), and PEFT computes what the adapted model computes."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    # PEFT takes every module whose name ends with an entry: "norm" would take each layer's input_layernorm too
    # (PEFT then failed to load the file), so the entries are the saved modules' full names
    for saved, listed in ((("lm_head",), ["lm_head"]), (("lm_head", "norm"), ["lm_head", "model.norm"])):
        config = TiedLoRAConfig(rank=4, dtype=torch.float64, modules_to_save=saved)
        model = apply_tied_lora(tiny_llama().double(), config)
        randomise_adapters(model)
        with torch.no_grad():
            model.model.norm.weight.add_(0.5)  # (trained: differs from the base model's where it is saved)
        expected = model(ids).logits
        export_peft_lora(model, tmp_path / saved[-1])
        meta = json.loads((tmp_path / saved[-1] / "adapter_config.json").read_text())
        assert meta["modules_to_save"] == listed
        _, logits = _peft_logits(tmp_path / saved[-1], ids)
        if "norm" in saved:
            torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
        else:
            assert not torch.allclose(logits, expected)  # (the norm's change is not in the file)
    # a full name that is the end of another module's: PEFT would take both, and the export says so
    toy = nn.ModuleDict(
        {
            "a": nn.ModuleDict({"q_proj": nn.Linear(8, 8), "norm": nn.LayerNorm(8)}),
            "ba": nn.ModuleDict({"norm": nn.LayerNorm(8)}),
        }
    )
    apply_tied_lora(toy, TiedLoRAConfig(rank=2, target_modules=["q_proj"], modules_to_save=("a.norm",)))
    with pytest.raises(ValueError, match=r"modules_to_save \['a.norm'\] would also select \['ba.norm'\] in PEFT"):
        export_peft_lora(toy, tmp_path / "toy")
    assert not (tmp_path / "toy").exists()
    # what counts is PEFT's model: its lora_dropout child of an adapted layer ends with "out" (PEFT itself then fails),
    # with or without Tied-LoRA's dropout child
    for dropout in (0.0, 0.1):
        toy = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "out": nn.Linear(8, 2)})
        apply_tied_lora(
            toy, TiedLoRAConfig(rank=2, target_modules=["q_proj"], modules_to_save=("out",), dropout=dropout)
        )
        with pytest.raises(ValueError, match=r"\['out'\] would also select \['q_proj.lora_dropout'\] in PEFT"):
            export_peft_lora(toy, tmp_path / "out")


def test_a_tied_module_to_save_goes_in_under_both_names(tmp_path):
    """With tied embeddings, ``lm_head`` in ``modules_to_save`` needs ``embed_tokens`` there too (docs/api.md);
    PEFT looks each saved module up under its own name, so the export writes the one tied weight under both (as
    PEFT's own ``save_pretrained`` does), and PEFT loads it and computes what the adapted model computes."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    config = TiedLoRAConfig(rank=4, dtype=torch.float64, modules_to_save=("lm_head", "embed_tokens"))
    model = apply_tied_lora(tiny_llama(tie_word_embeddings=True).double(), config)
    randomise_adapters(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # (trained: the embeddings the file holds differ from the base model's)
    expected = model(ids).logits
    export_peft_lora(model, tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    head, embed = "base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"
    assert torch.equal(state[head], state[embed])
    _, logits = _peft_logits(tmp_path, ids, tie_word_embeddings=True)
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conversion", [True, False], ids=["peft", "peft-without-expert-renaming"])
def test_a_mamba_out_proj_that_peft_refuses_is_named_in_a_warning(tmp_path, monkeypatch, conversion):
    """PEFT refuses LoRA on a Mamba model's ``out_proj`` (and ``conv1d``) when it loads the file; Falcon-Mamba calls
    its ``out_proj``, so "all-linear" adapts it: the export says PEFT will refuse the file, and PEFT does. Also with
    a PEFT from before its expert renaming (``peft.utils.transformers_weight_conversion``, 0.19), whose Mamba check
    is older (0.16): the export asked that module first and said nothing without it."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft.tuners.tuners_utils", reason="PEFT's Mamba check")

    def falcon_mamba():
        torch.manual_seed(0)
        shape = dict(hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=4, expand=2, conv_kernel=4,
                     time_step_rank=4)  # fmt: skip
        return transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**shape))

    model = falcon_mamba()
    if hasattr(sys.modules[type(model).__module__], "mamba_inner_fn"):  # (targets._READ_BY_A_FUSED_PATH)
        pytest.skip(
            f"transformers {transformers.__version__} reads Falcon-Mamba's out_proj weight in its fused training path "
            "(mamba_inner_fn, removed in 5.25): 'all-linear' leaves out_proj out, so no export has it"
        )
    model = apply_tied_lora(model, TiedLoRAConfig(rank=4, preset="lora", target_modules="all-linear"))
    assert any(name.endswith(".out_proj") for name in tied_lora_layers(model))
    with (
        monkeypatch.context() as patch,
        pytest.warns(UserWarning, match="PEFT would refuse .* falcon_mamba .*'out_proj'"),
    ):
        if not conversion:
            patch.setitem(sys.modules, "peft.utils.transformers_weight_conversion", None)  # (an ImportError)
        export_peft_lora(model, tmp_path)
    with pytest.raises(ValueError, match="incompatible with Mamba"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(falcon_mamba(), tmp_path)


def test_layers_peft_would_read_as_moe_experts_are_named_in_a_warning(tmp_path):
    """Under transformers 5, PEFT rewrites ``gate_proj``/``up_proj``/``down_proj`` of Qwen2-MoE-like model types
    (DeepSeek-V3 here) into the fused experts' parameters, also where they name a dense MLP's or a shared expert's
    linear: the export warns, naming exactly the layers ``PeftModel.from_pretrained`` then leaves out, or saying
    that PEFT refuses the file (a part of a fused pair alone)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft.utils.transformers_weight_conversion")  # (a PEFT without it converts nothing)

    def deepseek():
        torch.manual_seed(0)
        shape = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                     num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=None,
                     kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)  # fmt: skip
        return transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**shape)).double()

    model = apply_tied_lora(deepseek(), TiedLoRAConfig(rank=4, preset="lora", target_modules="all-linear"))
    with pytest.warns(UserWarning, match=r"reads the names \['down_proj', 'gate_proj', 'up_proj'\]") as caught:
        export_peft_lora(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PEFT's own: missing expert keys, unmatched patterns)
        loaded = peft.PeftModel.from_pretrained(deepseek(), tmp_path)
    left_out = sorted(set(tied_lora_layers(model)) - set(loaded.base_model.targeted_module_names))
    message = next(str(w.message) for w in caught if "reads the names" in str(w.message))
    assert {w.filename for w in caught if "reads the names" in str(w.message)} == {__file__}
    assert len(left_out) == 6 and f"of {len(left_out)} adapted layers ({', '.join(left_out[:3])}, ...)" in message
    # a part of a fused pair alone (gate_proj without up_proj): PEFT refuses the file, and the export says so
    model = apply_tied_lora(deepseek(), TiedLoRAConfig(rank=4, preset="lora", target_modules=["gate_proj"]))
    with pytest.warns(UserWarning, match="PEFT would refuse to load it into this deepseek_v3 model"):
        export_peft_lora(model, tmp_path / "part")
    with pytest.raises(ValueError, match="without also targeting up_proj"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.PeftModel.from_pretrained(deepseek(), tmp_path / "part")
    # a model PEFT converts nothing of: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export_peft_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules="all-linear")), tmp_path)


def test_a_text_seq2seq_model_exports_as_seq_2_seq_lm(tmp_path):
    """A T5's export records PEFT's SEQ_2_SEQ_LM (PeftModel.from_pretrained then builds a PeftModelForSeq2SeqLM, which
    computes the adapted model's logits); a speech seq2seq model's (Whisper, whose forward does not fit that class:
    it is not in transformers' table of text seq2seq LMs) records none."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    def t5():
        torch.manual_seed(0)
        shape = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(transformers.T5Config(**shape)).double().eval()

    model = apply_tied_lora(t5(), TiedLoRAConfig(rank=4, target_modules=["q", "k", "v"], dtype=torch.float64))
    randomise_adapters(model)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    export_peft_lora(model, tmp_path / "t5")
    assert json.loads((tmp_path / "t5" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    served = peft.PeftModel.from_pretrained(t5(), tmp_path / "t5")
    assert isinstance(served, peft.PeftModelForSeq2SeqLM)
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        actual = served(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)

    speech = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, num_mel_bins=8)
    layers = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4)
    widths = dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16)
    config = transformers.WhisperConfig(vocab_size=97, **speech, **layers, **widths)
    whisper = apply_tied_lora(transformers.WhisperForConditionalGeneration(config), TiedLoRAConfig(rank=4))
    export_peft_lora(whisper, tmp_path / "whisper")
    assert json.loads((tmp_path / "whisper" / "adapter_config.json").read_text())["task_type"] is None


def test_the_layers_dropout_goes_into_peft_config(tmp_path):
    """PEFT's config holds one lora_dropout: the layers' when they agree, whatever the config said (set after
    apply_tied_lora, or turned off as TRL's disable_dropout does); when they differ, the config's, with a warning
    naming the layers that do not use it."""
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, dropout=0.1))
    layers = tied_lora_layers(model)

    def exported(folder):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no warning when the layers agree)
            export_peft_lora(model, tmp_path / folder)
        return json.loads((tmp_path / folder / "adapter_config.json").read_text())["lora_dropout"]

    assert exported("config") == 0.1
    for layer in layers.values():
        layer.lora_dropout = 0.05
    assert exported("set-after") == 0.05
    for module in model.modules():  # TRL's disable_dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert exported("disabled") == 0.0
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        layers[name].lora_dropout = 0.1  # the config's: not named
    layers["model.layers.1.self_attn.k_proj"].lora_dropout = 0.2
    others = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.k_proj"]
    said = f"the file says 0.1 (the config's), which {others}, ... do not use"  # (4 layers: 3 named)
    with pytest.warns(UserWarning, match=re.escape(said)):
        export_peft_lora(model, tmp_path / "mixed")
    assert json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    # layers adapted by hand, no config: the dropout most of them use
    by_hand = nn.Sequential(*(TiedLoRALinear.from_linear(nn.Linear(8, 8), rank=2, dropout=p) for p in (0.1, 0.0, 0.0)))
    with pytest.warns(UserWarning, match=re.escape("the file says 0.0 (the most common), which ['0'] do not use")):
        export_peft_lora(by_hand, tmp_path / "by-hand")
    assert json.loads((tmp_path / "by-hand" / "adapter_config.json").read_text())["lora_dropout"] == 0.0
