"""Training a Hugging Face model with the adapter: activation checkpointing (both kinds, both backends), greedy
``generate`` through the KV cache, DDP (a one-process gloo group), and ``Trainer``'s checkpoints with
``SaveTiedLoRACallback``."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import transformers

from tests.helpers import cpu_triton
from tests.models import Toy, enable_checkpointing, randomise_adapters, tiny_llama, transformers_4_input_grad_hook
from tied_lora_kernels import (
    QKV,
    TiedLoRAConfig,
    apply_tied_lora,
    disable_tied_lora,
    load_tied_lora,
    merge_tied_lora,
    save_tied_lora,
    tied_lora_layers,
    tied_lora_state_dict,
    unmerge_tied_lora,
)


def token_rows(count: int = 8) -> tuple[torch.Tensor, list[dict]]:
    """Token ids for the Trainer tests, and the dataset of them (labels = inputs)."""
    ids = torch.randint(0, 97, (count, 9), generator=torch.Generator().manual_seed(7))
    return ids, [{"input_ids": row, "labels": row} for row in ids]


def training_args(folder, **kwargs) -> transformers.TrainingArguments:
    """Trainer's arguments for the tests (CPU, 2 rows a step, 4 steps, no reports), ``kwargs`` overriding them."""
    defaults = dict(max_steps=4, per_device_train_batch_size=2, report_to=[], use_cpu=True, learning_rate=1e-2)
    return transformers.TrainingArguments(str(folder), **{**defaults, **kwargs})


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


def test_reentrant_checkpointing_of_a_model_whose_input_is_not_token_ids():
    """Whisper's main input is ``input_features``, so transformers does not make its embeddings' output require grad
    under reentrant checkpointing, and the frozen base gives the first checkpointed layer no input that does: its
    adapters would get no gradient (here backward raised). ``apply_tied_lora`` on a model that checkpoints already,
    reentrantly, calls ``enable_input_require_grads()``, as PEFT does when it wraps one: gradients equal the run
    without checkpointing. A model that does not checkpoint, or not reentrantly, gets no such hook."""

    def whisper():
        torch.manual_seed(0)
        shape = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
                     max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                     eos_token_id=2, bos_token_id=1)  # fmt: skip
        return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**shape)).train()

    features, labels = torch.randn(2, 8, 32), torch.randint(3, 96, (2, 5))

    def grads(checkpointing):
        model = whisper()
        if checkpointing:
            enable_checkpointing(model, reentrant=True, input_grads=False)
        apply_tied_lora(model, TiedLoRAConfig(rank=4, backend="torch"))
        assert bool(getattr(model, "_require_grads_hooks", None)) == checkpointing
        randomise_adapters(model)
        model(input_features=features, labels=labels).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    want, got = grads(False), grads(True)
    assert want.keys() == got.keys() and any("encoder" in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    model = whisper()  # non-reentrant checkpointing needs no such hook, and gets none
    enable_checkpointing(model, reentrant=False)
    assert not getattr(apply_tied_lora(model, TiedLoRAConfig(rank=4)), "_require_grads_hooks", None)


def test_a_model_that_transformers_4_hooked_is_not_hooked_twice(monkeypatch):
    """transformers 4 keeps the input-grad hook as ``_require_grads_hook`` alone: a model that reentrant
    checkpointing hooked already gets no second hook from apply_tied_lora, and one whose hook was removed gets one."""
    transformers_4_input_grad_hook(monkeypatch)
    model = tiny_llama()
    enable_checkpointing(model, reentrant=True, input_grads=False)
    if not model.model.embed_tokens._forward_hooks:  # (transformers 5 hooks a token-id model itself, else we do)
        model.enable_input_require_grads()
    assert len(model.model.embed_tokens._forward_hooks) == 1 and not hasattr(model, "_require_grads_hooks")
    apply_tied_lora(model, TiedLoRAConfig(rank=4))
    assert len(model.model.embed_tokens._forward_hooks) == 1
    # transformers 4's disable_input_require_grads removes the hook and keeps the handle: a model unhooked so is
    # hooked (reentrant checkpointing gives its adapters no gradient otherwise)
    model = tiny_llama()
    enable_checkpointing(model, reentrant=True, input_grads=False)
    if not model.model.embed_tokens._forward_hooks:
        model.enable_input_require_grads()
    model.disable_input_require_grads()
    assert not model.model.embed_tokens._forward_hooks and hasattr(model, "_require_grads_hook")
    apply_tied_lora(model, TiedLoRAConfig(rank=4))
    assert len(model.model.embed_tokens._forward_hooks) == 1


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
    DDP refuses by default and accepts with ``static_graph=True`` (what docs/guide.md says)."""
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


def test_hugging_face_trainer_checkpoints_resume_and_carry_the_adapter(tmp_path):
    """Trainer's own checkpoints save an adapted model and resume it: training 4 steps in one go, or 2 steps
    then resuming from checkpoint-2 on a fresh model, ends with the same adapter. The callback puts the adapter
    into each checkpoint, saves every few steps when asked and at the end; all reload exactly."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import SaveTiedLoRACallback

    config = TiedLoRAConfig(rank=4, groups=(("q_proj", "k_proj", "v_proj"),))
    ids, data = token_rows()

    def trainer(model, out, **more):
        args = training_args(tmp_path / out, **more)
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
    args = training_args(tmp_path / "toy", save_strategy="steps", save_steps=2)
    toy = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    with pytest.raises(ValueError, match="not a PreTrainedModel"):
        transformers.Trainer(model=toy, args=args, train_dataset=data, callbacks=[SaveTiedLoRACallback()]).train()


def test_only_the_main_process_saves_the_adapter(tmp_path):
    """SaveTiedLoRACallback writes on the main process only: the other ranks of a multi-process run write nothing."""
    from types import SimpleNamespace

    from tied_lora_kernels.hf import SaveTiedLoRACallback

    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    args = SimpleNamespace(output_dir=str(tmp_path))
    callback = SaveTiedLoRACallback()
    callback.on_train_end(args, SimpleNamespace(is_world_process_zero=False, global_step=3), None, model=model)
    assert not (tmp_path / "adapter-final").exists()
    callback.on_train_end(args, SimpleNamespace(is_world_process_zero=True, global_step=3), None, model=model)
    assert (tmp_path / "adapter-final" / "adapter_model.safetensors").is_file()


def test_tied_lora_trainer_saves_on_the_processes_that_should_save_only(tmp_path, monkeypatch):
    """TiedLoRATrainer's save writes nothing where Trainer's ``args.should_save`` is False (a process other than the
    main one), and the adapter where it is True."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import TiedLoRATrainer

    _, data = token_rows()
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    trainer = TiedLoRATrainer(model=model, args=training_args(tmp_path / "out", save_strategy="no"), train_dataset=data)
    monkeypatch.setattr(transformers.TrainingArguments, "should_save", property(lambda self: False))
    trainer._save(str(tmp_path / "other-process"))
    assert not (tmp_path / "other-process").exists()
    monkeypatch.setattr(transformers.TrainingArguments, "should_save", property(lambda self: True))
    trainer._save(str(tmp_path / "main-process"))
    assert (tmp_path / "main-process" / "adapter_model.safetensors").is_file()


def test_every_process_saves_into_a_checkpoint_alike(tmp_path, monkeypatch):
    """on_save gathers on every process (a collective when FSDP2 sharded the adapter): every process must take the
    same branch, whether or not it sees Trainer's checkpoint folder yet (a process other than the main one may get
    there first, or not share its file system); under a hyperparameter search (checkpoints in a run folder) none
    saves."""
    from types import SimpleNamespace

    from tied_lora_kernels import hf

    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    args = SimpleNamespace(output_dir=str(tmp_path))
    gathered = []
    saver = hf._saver
    monkeypatch.setattr(
        hf, "_saver", lambda model, path, gather: gathered.append(path) or saver(model, path, gather=gather)
    )
    for main, search in ((False, False), (True, False), (False, True), (True, True)):
        state = SimpleNamespace(is_world_process_zero=main, global_step=3, is_hyper_param_search=search)
        hf.SaveTiedLoRACallback().on_save(args, state, None, model=model)  # (no checkpoint-3 folder yet)
    path = str(tmp_path / "checkpoint-3" / "tied_lora")
    assert gathered == [path, path]
    assert (tmp_path / "checkpoint-3" / "tied_lora" / "adapter_model.safetensors").is_file()


def test_tied_lora_trainer_checkpoints_hold_the_adapter_alone(tmp_path):
    """TiedLoRATrainer's checkpoints hold the adapter (save_tied_lora's files) beside Trainer's optimizer and state,
    not the model, and resume from them: 4 steps in one go, or 2 then a resume on a fresh model, end with the
    same adapter bit for bit; so does a resume from a plain Trainer's whole-model checkpoint. load_best_model_at_end
    loads the best checkpoint's adapter; a model that is not a PreTrainedModel trains and saves the same way."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import SaveTiedLoRACallback, TiedLoRATrainer

    config = TiedLoRAConfig(rank=4, groups=(("q_proj", "k_proj", "v_proj"),))
    ids, data = token_rows()

    def args(out, **more):
        return training_args(tmp_path / out, **more)

    whole = apply_tied_lora(tiny_llama(), config)
    callback = SaveTiedLoRACallback()
    TiedLoRATrainer(
        model=whole, args=args("whole", save_strategy="steps", save_steps=2), train_dataset=data, callbacks=[callback]
    ).train()
    assert not callback.checkpoints_hold_adapter  # (only while TiedLoRATrainer trains: reusable with Trainer)
    checkpoint = tmp_path / "whole/checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
    assert not [f for f in files if f.startswith("model")] and "tied_lora" not in files  # the checkpoint is the adapter
    assert (tmp_path / "whole/adapter-final/adapter_model.safetensors").is_file()  # the callback's own save

    def same_adapter(model):
        theirs = tied_lora_state_dict(model)
        return all(torch.equal(theirs[name], t) for name, t in tied_lora_state_dict(whole).items())

    resumed = apply_tied_lora(tiny_llama(), config)
    TiedLoRATrainer(model=resumed, args=args("resumed", save_strategy="no"), train_dataset=data).train(
        resume_from_checkpoint=str(checkpoint)
    )
    assert same_adapter(resumed)
    untrained = tied_lora_state_dict(apply_tied_lora(tiny_llama(), config))
    assert all(not torch.equal(tied_lora_state_dict(resumed)[k], t) for k, t in untrained.items())
    whole.eval()
    fresh = load_tied_lora(tiny_llama(), tmp_path / "whole/checkpoint-4")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, whole(ids).logits)

    # a plain Trainer's checkpoint (the whole model) resumes through Trainer's own loading
    plain = apply_tied_lora(tiny_llama(), config)
    transformers.Trainer(
        model=plain, args=args("plain", save_strategy="steps", save_steps=2), train_dataset=data
    ).train()
    from_plain = apply_tied_lora(tiny_llama(), config)
    TiedLoRATrainer(model=from_plain, args=args("from_plain", save_strategy="no"), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "plain/checkpoint-2")
    )
    assert same_adapter(from_plain)

    # the best checkpoint's adapter is loaded at the end ("best" = the highest loss here: not the last checkpoint)
    best = apply_tied_lora(tiny_llama(), config)
    every_step = dict(save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1)
    worst = dict(load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = TiedLoRATrainer(
        model=best,
        args=args("best", **every_step, **worst),
        train_dataset=data,
        eval_dataset=data[:2],
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    expected = load_tied_lora(tiny_llama(), trainer.state.best_model_checkpoint)
    theirs = tied_lora_state_dict(best)
    assert all(torch.equal(theirs[k], t) for k, t in tied_lora_state_dict(expected).items())

    # not a PreTrainedModel: saved as the adapter all the same (a plain Trainer refuses its tied tensors)
    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.toy = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))

        def forward(self, h, target):
            return {"loss": (self.toy(h) - target).pow(2).mean()}

    g = torch.Generator().manual_seed(3)
    rows = [{"h": torch.randn(5, 24, generator=g), "target": torch.randn(5, 24, generator=g)} for _ in range(4)]
    toy = Regression()
    TiedLoRATrainer(
        model=toy, args=args("toy", save_strategy="steps", save_steps=2), train_dataset=rows,
        callbacks=[SaveTiedLoRACallback()],
    ).train()  # fmt: skip
    loaded = load_tied_lora(Regression(), tmp_path / "toy/checkpoint-4")  # (its config is the inner model's)
    theirs = tied_lora_state_dict(loaded)
    assert all(torch.equal(theirs[k], t) for k, t in tied_lora_state_dict(toy).items())
    assert not all(torch.equal(theirs[k], t) for k, t in tied_lora_state_dict(Regression()).items())

    with pytest.raises(ValueError, match="does not push to the Hub"):
        TiedLoRATrainer(model=whole, args=args("hub", push_to_hub=True), train_dataset=data)

    class ThirdArgs(
        transformers.Trainer
    ):  # as TRL's DPOTrainer (model, ref_model, args) and GRPOTrainer (model, reward, args)
        def __init__(self, model, ref_model, args, **kwargs):
            super().__init__(model=model, args=args, **kwargs)

    class TiedThird(TiedLoRATrainer, ThirdArgs):
        pass

    # the arguments are found by type: a reference model second (its push_to_hub is a method) is not refused, and
    # push_to_hub=True third is (the reverse of what reading the second argument did)
    TiedThird(whole, tiny_llama(), args("third", save_strategy="no"), train_dataset=data)
    with pytest.raises(ValueError, match="does not push to the Hub"):
        TiedThird(whole, tiny_llama(), args("third-hub", push_to_hub=True), train_dataset=data)
    with pytest.raises(ValueError, match="this model has no Tied-LoRA adapter"):
        TiedLoRATrainer(model=tiny_llama(), args=args("bare", save_strategy="no"), train_dataset=data).save_model()


def test_tied_lora_trainer_saves_the_tokenizer_beside_the_adapter(tmp_path):
    """As Trainer does: the ``processing_class`` given (here a tokenizer) is saved in every checkpoint and by
    ``save_model``, beside the adapter, and loads back from there."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    tokenizers = pytest.importorskip("tokenizers")
    from tied_lora_kernels.hf import TiedLoRATrainer

    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w0")
    _, data = token_rows()
    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    args = training_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = TiedLoRATrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "final"):
        files = {p.name for p in folder.iterdir()}
        assert {"adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files, folder
        assert transformers.AutoTokenizer.from_pretrained(folder)("w5 w7 w96").input_ids == [5, 7, 96]
    with torch.no_grad():
        assert torch.equal(load_tied_lora(tiny_llama(), tmp_path / "final")(data[0]["input_ids"][None]).logits,
                           model.eval()(data[0]["input_ids"][None]).logits)  # fmt: skip


def test_trainers_combined_with_tied_lora_trainer_checkpoint_the_adapter_alone(tmp_path):
    """``class MyTrainer(TiedLoRATrainer, OtherTrainer)`` (TRL's SFTTrainer, DPOTrainer, ... in docs/guide.md): the
    other trainer's loss and its own ``_save`` give way to TiedLoRATrainer's checkpoints (the adapter alone), which
    resume bit for bit; ``save_model`` writes an adapter that ``load_tied_lora`` reads."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import TiedLoRATrainer

    class OtherTrainer(transformers.Trainer):  # (a subclass with a loss and a save of its own, as TRL's)
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = model(**inputs).loss * 2
            return (loss, None) if return_outputs else loss

        def _save(self, output_dir=None, state_dict=None):
            raise AssertionError("OtherTrainer._save runs: TiedLoRATrainer's should")

    class Combined(TiedLoRATrainer, OtherTrainer):
        pass

    config = TiedLoRAConfig(rank=4, preset="tl6")
    ids, data = token_rows()

    def args(out, **more):
        return training_args(tmp_path / out, **more)

    whole = apply_tied_lora(tiny_llama(), config)
    trainer = Combined(model=whole, args=args("whole", save_strategy="steps", save_steps=2), train_dataset=data)
    trainer.train()
    files = {p.name for p in (tmp_path / "whole/checkpoint-2").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= files
    assert not [f for f in files if f.startswith("model")]
    trainer.save_model(str(tmp_path / "final"))
    resumed = apply_tied_lora(tiny_llama(), config)
    Combined(model=resumed, args=args("resumed", save_strategy="no"), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "whole/checkpoint-2")
    )
    final = load_tied_lora(tiny_llama(), tmp_path / "final")
    for model in (resumed, final):
        theirs = tied_lora_state_dict(model)
        assert all(torch.equal(theirs[k], t) for k, t in tied_lora_state_dict(whole).items())
    untrained = tied_lora_state_dict(apply_tied_lora(tiny_llama(), config))
    assert all(not torch.equal(tied_lora_state_dict(whole)[k], t) for k, t in untrained.items())


def test_a_transformers_without_the_pre_optimizer_step_event_says_the_gradient_checks_do_not_run(monkeypatch):
    """The checks that the adapter gets gradients run at ``on_pre_optimizer_step``, an event from transformers 4.45 on;
    before it they would silently not run, so the start of a run says so."""
    import types

    from tied_lora_kernels.hf import SaveTiedLoRACallback

    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    args = types.SimpleNamespace(save_strategy="no")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SaveTiedLoRACallback().on_train_begin(args, None, None, model=model)
    monkeypatch.delattr(transformers.TrainerCallback, "on_pre_optimizer_step")
    with pytest.warns(UserWarning, match="no on_pre_optimizer_step event .* do not run"):
        SaveTiedLoRACallback().on_train_begin(args, None, None, model=model)


def test_a_run_in_which_the_adapter_would_not_train_is_stopped_before_the_first_update(tmp_path):
    """SaveTiedLoRACallback and TiedLoRATrainer refuse to start (and save_tied_lora to save) when PEFT wraps the
    adapted model — what a trainer given a ``peft_config`` does (TRL's): PEFT freezes the Tied-LoRA adapter — and
    stop at the first optimizer step, before any update, when the adapted output layer got no gradient: a loss
    that reads ``lm_head.weight`` without calling the layer (TRL's fused LM head, Liger's fused linear cross
    entropy; a stand-in here), also under bf16 autocast (accelerate then wraps the forward). Training the head in
    full (``modules_to_save``) under that loss runs, and so does an adapted head the loss calls."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    peft = pytest.importorskip("peft")
    import types

    from tied_lora_kernels.hf import SaveTiedLoRACallback, TiedLoRATrainer

    _, data = token_rows(4)

    def runs(model, out, **more):
        args = training_args(tmp_path / out, max_steps=1, save_strategy="no", **more)
        yield lambda: transformers.Trainer(model, args, train_dataset=data, callbacks=[SaveTiedLoRACallback()]).train()
        yield lambda: TiedLoRATrainer(model, args, train_dataset=data).train()

    wrapped = peft.get_peft_model(
        apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)), peft.LoraConfig(r=2, target_modules=["q_proj"])
    )
    for run in runs(wrapped, "peft"):
        with pytest.raises(ValueError, match=r"has PEFT in it \(.*\): PEFT freezes .* pass none"):
            run()
    with pytest.raises(ValueError, match="has PEFT in it"):
        save_tied_lora(wrapped, tmp_path / "peft_save")
    peft_alone = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    TiedLoRATrainer(
        peft_alone, training_args(tmp_path / "peft_alone", max_steps=1, save_strategy="no"), train_dataset=data
    ).train()

    def fused_loss(model):  # the loss from lm_head.weight, as TRL's fused head and Liger's FLCE compute it
        def forward(self, input_ids, labels=None, **_):
            logits = torch.nn.functional.linear(self.model(input_ids).last_hidden_state, self.lm_head.weight)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)

        model.forward = types.MethodType(forward, model)
        return model

    adapted_head = TiedLoRAConfig(rank=4, target_modules=("q_proj", "lm_head"), groups=())
    for mixed in ({}, dict(bf16=True)):
        head = fused_loss(apply_tied_lora(tiny_llama(), adapted_head))
        start = {k: t.clone() for k, t in head.state_dict().items()}
        for run in runs(head, "head", **mixed):
            with pytest.raises(ValueError, match="the output layer is adapted, but its adapter got no gradient"):
                run()
        assert all(torch.equal(t, start[k]) for k, t in head.state_dict().items())  # no update
    in_full = fused_loss(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, modules_to_save=("lm_head",))))
    before = in_full.lm_head.weight.detach().clone()
    for run in runs(in_full, "in_full"):
        run()
    assert not torch.equal(in_full.lm_head.weight, before)
    called = apply_tied_lora(tiny_llama(), adapted_head)
    for run in runs(called, "called"):
        run()


def test_a_run_with_a_merged_or_frozen_adapter_is_refused_by_name(tmp_path):
    """A merged adapter (merge_tied_lora) and a frozen one with nothing else to train (load_tied_lora(...,
    trainable=False)) are refused when the run begins, naming the cause, rather than failing in the first backward
    with PyTorch's "element 0 of tensors does not require grad". Unmerged, or loaded to train, both run. A run that
    saves checkpoints of a model whose blocks were replaced by their torch.compile wrappers is refused when it
    begins, not at its first checkpoint."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import SaveTiedLoRACallback, TiedLoRATrainer

    _, data = token_rows(4)
    saved = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))
    save_tied_lora(saved, tmp_path / "adapter")
    merged = merge_tied_lora(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)))
    frozen = load_tied_lora(tiny_llama(), tmp_path / "adapter", trainable=False)
    for model, match in ((merged, r"adapted layers are merged \(\['model.layers.0"), (frozen, "adapter is frozen")):
        for trainer in (
            lambda m, a: transformers.Trainer(m, a, train_dataset=data, callbacks=[SaveTiedLoRACallback()]),
            lambda m, a: TiedLoRATrainer(m, a, train_dataset=data),
        ):
            with pytest.raises(ValueError, match=match):
                trainer(model, training_args(tmp_path / "run", max_steps=1, save_strategy="no")).train()
    compiled = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4))  # blocks replaced by their compile wrappers
    for i, block in enumerate(compiled.model.layers):
        compiled.model.layers[i] = torch.compile(block)
    with pytest.raises(ValueError, match="saving checkpoints of a model with parts replaced by their torch.compile"):
        TiedLoRATrainer(compiled, training_args(tmp_path / "compiled", max_steps=1), train_dataset=data).train()
    unmerge_tied_lora(merged)
    TiedLoRATrainer(
        merged, training_args(tmp_path / "unmerged", max_steps=1, save_strategy="no"), train_dataset=data
    ).train()
    trainable = load_tied_lora(tiny_llama(), tmp_path / "adapter", trainable=True)
    TiedLoRATrainer(
        trainable, training_args(tmp_path / "loaded", max_steps=1, save_strategy="no"), train_dataset=data
    ).train()


def test_adapter_tensors_without_a_gradient_in_the_first_steps_are_named(tmp_path):
    """SaveTiedLoRACallback and TiedLoRATrainer warn, once, naming the trainable adapter tensors that got no gradient
    in any of the first optimizer steps (10, or a shorter run's): here a model that computes its logits from
    ``lm_head.weight`` without calling the adapted head (as a fused loss does; not a PreTrainedModel, so the head
    is not known to be the output layer). A layer skipped in the first step only (LayerDrop) is not named, and a
    model whose adapted layers are all called trains without a warning."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import SaveTiedLoRACallback, TiedLoRATrainer

    class Model(torch.nn.Module):
        def __init__(self, read):
            super().__init__()
            self.llama = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules=("q_proj", "lm_head")))
            self.read, self.calls = read, 0

        def forward(self, input_ids, labels):
            self.calls += 1
            if self.read == "skip-first" and self.calls == 1:  # LayerDrop: layer 1 skipped at the first step
                self.llama.model.layers[1].forward = lambda h, *args, **kwargs: h
            else:
                vars(self.llama.model.layers[1]).pop("forward", None)
            h = self.llama.model(input_ids).last_hidden_state
            head = self.llama.lm_head
            logits = torch.nn.functional.linear(h, head.weight) if self.read == "weight" else head(h)
            return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}

    _, data = token_rows(4)
    cases = itertools.product(("weight", "skip-first", "call"), (transformers.Trainer, TiedLoRATrainer))
    for read, trainer in cases:
        args = training_args(tmp_path / f"{trainer.__name__}-{read}", max_steps=3, save_strategy="no")
        run = trainer(Model(read), args, train_dataset=data, callbacks=[SaveTiedLoRACallback()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.train()
        ours = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
        if read == "weight":
            assert len(ours) == 1, ours  # once, whatever the callbacks and steps
            expected = "4 trainable adapter tensors got no gradient in any of the first 3 optimizer steps"
            assert ours[0].startswith(expected)
            named = ("lora_scale.u", "lora_v", "shared.A", "shared.B")
            assert str([f"llama.lm_head.{name}" for name in named]) in ours[0]
        else:
            assert not ours, ours
    # a run longer than the watch warns at its 10th step, once (not again when it ends)
    args = training_args(tmp_path / "long", max_steps=12, save_strategy="no")
    run = TiedLoRATrainer(Model("weight"), args, train_dataset=data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.train()
    ours = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    assert len(ours) == 1, ours
    assert ours[0].startswith("4 trainable adapter tensors got no gradient in any of the first 10 optimizer steps")


def test_an_optimizer_that_steps_inside_the_backward_is_not_taken_for_missing_gradients(tmp_path):
    """Optimizers that update each parameter in the backward and clear its gradient (transformers' layerwise GaLore,
    LOMO; a stand-in here: post-accumulate-grad hooks) leave no ``.grad`` at the optimizer step: the checks do not
    take that for an adapted head bypassed by the loss, nor warn, and the adapter trains."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    from tied_lora_kernels.hf import SaveTiedLoRACallback, TiedLoRATrainer

    _, data = token_rows(4)
    for trainer in (transformers.Trainer, TiedLoRATrainer):
        model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules=("q_proj", "lm_head"), groups=()))
        trained = [p for p in model.parameters() if p.requires_grad]

        def step_in_backward(p):  # SGD inside the backward, then the gradient dropped
            p.data.add_(p.grad, alpha=-0.1)
            p.grad = None

        for p in trained:
            p.register_post_accumulate_grad_hook(step_in_backward)
        start = {k: t.clone() for k, t in tied_lora_state_dict(model).items()}
        args = training_args(tmp_path / trainer.__name__, max_steps=3, save_strategy="no")
        optimizers = (torch.optim.SGD(trained, lr=0.0), None)  # (steps nothing: every .grad is None by then)
        run = trainer(model, args, train_dataset=data, callbacks=[SaveTiedLoRACallback()], optimizers=optimizers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run.train()
        assert not [w for w in caught if "got no gradient" in str(w.message)]
        assert not torch.equal(tied_lora_state_dict(model)["lm_head.lora_v"], start["lm_head.lora_v"])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_disable_tied_lora_under_checkpointing(reentrant):
    """A backward recomputes checkpointed layers with the flags of its own moment: called inside the block, the
    adapter gets no gradient and the others are those of the base model alone; with grad on, entering the block
    of a reentrantly checkpointing model warns that a backward after it would recompute with the adapter on (wrong
    gradients, PEFT's disable_adapter alike); under no_grad (a reference model) it does not."""
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    config = TiedLoRAConfig(rank=4, preset="tl6", modules_to_save=("norm",))

    def model_and_grads(checkpointing):
        model = apply_tied_lora(tiny_llama(), config)
        randomise_adapters(model)
        model.train()
        if checkpointing:
            enable_checkpointing(model, reentrant)
        with warnings.catch_warnings(record=True) as caught, disable_tied_lora(model):
            warnings.simplefilter("always")
            model(ids, labels=ids).loss.backward()
        warned = [w for w in caught if "checkpoints activations" in str(w.message)]
        return model, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, warned

    _, want, warned = model_and_grads(False)
    assert not warned
    model, got, warned = model_and_grads(True)
    assert len(warned) == reentrant  # (non-reentrant: a backward after the block raises a CheckpointError)
    assert got.keys() == want.keys()
    for n, grad in got.items():
        if want[n] is None:  # the adapter: no gradient inside the block, with or without checkpointing
            assert grad is None, n
        else:  # the saved norm, trained in full
            torch.testing.assert_close(grad, want[n], rtol=1e-5, atol=1e-7)
    assert any(g is None for g in got.values()) and any(g is not None for g in got.values())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpoints activations")
        with torch.no_grad(), disable_tied_lora(model):  # a reference model's forward: no warning
            model(ids)
        model.eval()
        with disable_tied_lora(model):  # (evaluation does not checkpoint)
            model(ids)


@pytest.mark.parametrize("every", [True, False, 0, -2, 2.0])
def test_save_callback_refuses_an_every_that_is_not_a_positive_int(every):
    # (catches: a bool taken for the int it subclasses)
    from tied_lora_kernels.hf import SaveTiedLoRACallback

    with pytest.raises(ValueError, match="every must be a positive int or None"):
        SaveTiedLoRACallback(every=every)


def _no_save(strategy: str = "no"):
    import types

    return types.SimpleNamespace(save_strategy=strategy, output_dir="/nonexistent")


def _grads(model, without=()):
    """A gradient on every trainable parameter of ``model`` but those in ``without`` (by name)."""
    for name, p in model.named_parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad and name not in without else None


def test_a_tensor_graded_in_an_earlier_watched_step_is_not_named():
    # the warning names tensors that got no gradient in ANY of the watched steps: a layer skipped at the last step
    # only (LayerDrop, an expert no token reached) was called before (catches: ungraded = the last step's alone)
    from tied_lora_kernels.hf import _TrainingCheck

    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    check = _TrainingCheck()
    check.on_train_begin(_no_save(), None, None, model=model)
    never, last_skipped = "layers.2.q_proj.lora_v", "layers.1.q_proj.lora_v"
    _grads(model, without={never})
    check.on_pre_optimizer_step(_no_save(), None, None, model=model)
    _grads(model, without={never, last_skipped})
    check.on_pre_optimizer_step(_no_save(), None, None, model=model)
    with pytest.warns(UserWarning, match="got no gradient") as caught:
        check.on_train_end(_no_save(), None, None, model=model)
    ours = [str(w.message) for w in caught if "got no gradient" in str(w.message)]
    assert len(ours) == 1 and ours[0].startswith("1 trainable adapter tensors got no gradient") and never in ours[0]


def test_a_frozen_adapted_head_is_not_taken_for_a_head_the_loss_bypasses():
    # an adapted output layer whose adapter the user froze has no trainable tensor of its own: nothing to miss, no
    # refusal (catches: "own and" dropped, an empty set being a subset of any)
    from tied_lora_kernels.hf import _TrainingCheck

    model = apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4, target_modules=("q_proj", "lm_head"), groups=()))
    for name, p in model.named_parameters():
        if name.startswith("lm_head."):
            p.requires_grad_(False)
    check = _TrainingCheck()
    check.on_train_begin(_no_save(), None, None, model=model)
    _grads(model)
    check.on_pre_optimizer_step(_no_save(), None, None, model=model)  # (no ValueError)
    assert check.steps == 1


def test_a_run_that_saves_no_checkpoint_may_hold_compiled_parts():
    # the refusal of torch.compile wrappers inside the model is about checkpoints' names: a run with
    # save_strategy="no" trains (catches: the save_strategy condition dropped)
    from tied_lora_kernels.hf import _TrainingCheck

    model = apply_tied_lora(Toy(), TiedLoRAConfig(rank=4))
    model.layers[0] = torch.compile(model.layers[0])
    _TrainingCheck().on_train_begin(_no_save("no"), None, None, model=model)
    with pytest.raises(ValueError, match="saving checkpoints of a model with parts replaced"):
        _TrainingCheck().on_train_begin(_no_save("steps"), None, None, model=model)


def test_save_callback_looks_through_a_whole_model_compile_wrapper():
    # Trainer(model=torch.compile(model)): a PreTrainedModel inside, which Trainer saves as one (catches: the
    # isinstance check on the wrapper itself)
    from tied_lora_kernels.hf import SaveTiedLoRACallback

    compiled = torch.compile(apply_tied_lora(tiny_llama(), TiedLoRAConfig(rank=4)))
    SaveTiedLoRACallback().on_train_begin(_no_save("steps"), None, None, model=compiled)  # (no ValueError)
    with pytest.raises(ValueError, match="not a PreTrainedModel"):
        SaveTiedLoRACallback().on_train_begin(_no_save("steps"), None, None, model=torch.compile(Toy()))


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP"])
def test_gradient_checks_stand_aside_under_accelerate_sharding(monkeypatch, kind):
    # FSDP or DeepSpeed set up through accelerate (not TrainingArguments) keep gradients away from .grad: the checks
    # must not read them (catches: FSDP dropped from _sharded)
    accelerate_state = pytest.importorskip("accelerate.state")
    from accelerate.utils import DistributedType

    from tied_lora_kernels.hf import _sharded

    monkeypatch.setitem(accelerate_state.AcceleratorState._shared_state, "distributed_type", DistributedType[kind])
    assert _sharded(_no_save())
    monkeypatch.setitem(accelerate_state.AcceleratorState._shared_state, "distributed_type", DistributedType.NO)
    assert not _sharded(_no_save())
