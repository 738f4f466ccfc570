"""The multimodal Gemma 3 class (gemma-3-4b, -12b, -27b: Gemma3ForConditionalGeneration) through the same scripts
(issue 25): the class told from --model_name_or_path, text-only training of its language model (LoRA targets, GaLore's
projections and optimizer, the vision tower and projector frozen), and every fast-path override giving the stock
answer on a tiny model of this class, as tests/test_speed.py, test_numerics.py and test_compiled_layers.py check it
on the text class."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3TextConfig

import common
import train_galore
import train_qlora
from cli.errors import UserInputError
from fastpath import (chunked_loss, compiled_layers, flops_once, lora_4bit, offload, one_layer_graph, rms_norm,
                      skip_train, varlen_attention)
from fastpath.patches import Patches
from models import shapes, smoke
from records import batching
from conftest import small_gemma

CPU = common.Precision(False, False, torch.float32, "test")
MULTIMODAL_ID = "google/gemma-3-4b-it"


def small_multimodal_gemma(layers: int = 2, random_norms: bool = True, **changes) -> Gemma3ForConditionalGeneration:
    """conftest.small_gemma's language model (64 wide, a 16-token sliding window, 300 tokens) inside the multimodal
    class, with the smoke model's tiny SigLIP tower and projector; norm weights random, as there."""
    torch.manual_seed(0)
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16)
    config = smoke.tiny_multimodal_config(Gemma3TextConfig(**{**text, **changes}))
    config._attn_implementation = "sdpa"
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and random_norms:
                parameter.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def multimodal_dir(tmp_path_factory, default_texts):
    """The smoke run's tiny multimodal model (tokenizer + weights); read-only."""
    return smoke.build_random_gemma(tmp_path_factory.mktemp("tiny_multimodal"), default_texts, multimodal=True)


def loss_and_grads(model, seed=0, **batch):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(b[0], a[0], rtol=rtol, atol=atol)
    assert set(a[1]) == set(b[1])
    for name, grad in a[1].items():
        torch.testing.assert_close(b[1][name], grad, rtol=rtol * 10, atol=atol, msg=name)


def padded_batch():
    """Three rows: a masked prompt, and a row padded at its end (labels -100 and attention mask 0 there)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 300, (3, 40), generator=generator)
    labels, mask = input_ids.clone(), torch.ones_like(input_ids)
    labels[0, :10] = -100
    labels[2, 30:], mask[2, 30:], input_ids[2, 30:] = -100, 0, 0
    return dict(input_ids=input_ids, attention_mask=mask, labels=labels)


# ---------------------------------------------------------------------------
# The class, from --model_name_or_path
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, multimodal", [
    ("google/gemma-3-4b-it", True), ("google/gemma-3-4b-pt", True), ("google/gemma-3-12b-it", True),
    ("unsloth/gemma-3-27b-it", True), ("google/gemma-3-1b-it", False), ("google/gemma-3-270m", False),
    ("google/gemma-3-270m-it", False), ("google/gemma-2-9b", False),
])
def test_the_class_is_told_from_a_hub_id(name, multimodal):
    assert shapes.names_multimodal(name) is multimodal


def test_the_class_is_told_from_a_folders_config(multimodal_dir, tiny_model_dir):
    assert shapes.names_multimodal(str(multimodal_dir)) and not shapes.names_multimodal(str(tiny_model_dir))


def test_the_tiny_multimodal_model_is_the_4b_class_with_a_tiny_vision_tower(multimodal_dir):
    model = AutoModelForCausalLM.from_pretrained(multimodal_dir)
    assert type(model) is Gemma3ForConditionalGeneration
    vision = sum(p.numel() for n, p in model.named_parameters() if shapes.frozen_in_text_training(n))
    assert 0 < vision < 40_000 and (multimodal_dir / "model.safetensors").stat().st_size < 1_000_000
    assert shapes.shape_of(model.config).vision_parameters == vision  # the count the memory estimate uses
    assert model.config.get_text_config().hidden_size == 64


def test_the_shapes_count_the_published_parameters():
    # gemma-3-270m: 268M (168M of them the embedding); gemma-3-4b: 4.30B with its vision tower.
    assert round(shapes.gemma3_shape("270m").parameters / 1e6) == 268
    assert round(shapes.gemma3_shape("270m").embedding / 1e6) == 168
    assert round(shapes.gemma3_shape("4b").parameters / 1e7) == 430
    assert shapes.gemma3_shape("4b").multimodal and not shapes.gemma3_shape("1b").multimodal


# ---------------------------------------------------------------------------
# Text-only training: what trains
# ---------------------------------------------------------------------------


def test_lora_targets_only_the_language_models_linear_layers(multimodal_dir, caplog):
    caplog.set_level(logging.INFO)
    for targets, names in (("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"}), ("q_proj,v_proj", {"q_proj", "v_proj"})):
        from peft import get_peft_model

        model = AutoModelForCausalLM.from_pretrained(multimodal_dir)
        config = train_qlora.LoraArguments(lora_target_modules=targets, lora_r=4).peft_config(model)
        wrapped = get_peft_model(model, config)
        adapted = {n.split(".lora_A")[0] for n, _ in wrapped.named_parameters() if "lora_A" in n}
        assert adapted and all(".language_model." in n for n in adapted), sorted(adapted)
        assert {n.rsplit(".", 1)[-1] for n in adapted} == names
        assert len(adapted) == 2 * len(names)  # both layers
        trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
        assert not any(shapes.frozen_in_text_training(n) for n in trainable)
    assert "LoRA targets the language model's" in caplog.text


def test_the_text_class_keeps_its_lora_targets(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert train_qlora.LoraArguments().peft_config(model).target_modules == "all-linear"


def test_a_lora_target_only_the_vision_tower_has_is_refused(multimodal_dir):
    with pytest.raises(UserInputError, match="out_proj names no linear layer"):
        train_qlora.check_lora_targets(str(multimodal_dir), train_qlora.LoraArguments(lora_target_modules="out_proj"),
                                       False)


def test_galore_projects_and_optimizes_the_language_model_only(multimodal_dir, caplog):
    caplog.set_level(logging.INFO)
    model = train_galore.load_model(str(multimodal_dir), CPU, "cpu", "sdpa")
    assert "the vision tower and projector" in caplog.text
    args = train_galore.GaloreArguments(galore_rank=8)
    training = type("T", (), dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                                  weight_decay=0.0))
    optimizer = train_galore.build_optimizer(model, args, training)
    projected, regular = optimizer.param_groups
    assert len(projected["params"]) == 7 * model.config.get_text_config().num_hidden_layers
    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert not any(shapes.frozen_in_text_training(n) for n in in_optimizer)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == \
        {n for n, _ in model.named_parameters() if shapes.frozen_in_text_training(n)}


# ---------------------------------------------------------------------------
# The fast path on the multimodal class: each override against the stock path
# ---------------------------------------------------------------------------


def test_rms_norm_gives_the_stock_answer():
    stock = small_multimodal_gemma()
    fused = copy.deepcopy(stock)
    assert rms_norm.fuse_rms_norms(fused) == 2 * 6 + 1 + 1  # the language model's, and the projector's
    batch = padded_batch()
    assert_same(loss_and_grads(stock, **batch), loss_and_grads(fused, **batch), rtol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [7, 1000])
def test_chunked_loss_gives_the_stock_multimodal_loss_and_gradients(chunk_tokens):
    """Gemma3ForConditionalGeneration's own loss: the mean over the positions its attention mask keeps (the Trainer
    passes it no token count). The chunked one reads the softcap from its text config and the hidden states from its
    `model`."""
    stock = small_multimodal_gemma(random_norms=False)
    chunked = copy.deepcopy(stock)
    assert chunked_loss.use_chunked_loss(chunked, chunk_tokens=chunk_tokens)
    batch = padded_batch()
    expected, ours = loss_and_grads(stock, **batch), loss_and_grads(chunked, **batch)
    assert_same(expected, ours)
    assert ours[1]["model.language_model.embed_tokens.weight"].abs().sum() > 0  # the tied output layer's share
    assert not any(shapes.frozen_in_text_training(name) for name in ours[1])  # text-only: no vision gradient


@pytest.mark.parametrize("make", [small_gemma, small_multimodal_gemma], ids=["text", "multimodal"])
def test_generation_with_the_chunked_loss_in_place_is_the_stocks(make):
    """Samples are generated while the fast path is installed; the multimodal class passes logits_to_keep=None
    where the forward does not name it."""
    stock = make().eval()
    chunked = copy.deepcopy(stock)
    chunked_loss.use_chunked_loss(chunked)
    prompt = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(chunked.generate(prompt, **kwargs), stock.generate(prompt, **kwargs))


def test_varlen_attention_is_selected_on_the_language_model_only():
    model = small_multimodal_gemma()
    patches = Patches()
    assert varlen_attention.use_varlen_attention(model, patches)
    assert model.config.get_text_config()._attn_implementation == varlen_attention.VARLEN_ATTENTION
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    patches.restore()
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert varlen_attention.VARLEN_ATTENTION not in varlen_attention.AttentionInterface._global_mapping


def packed_and_padded(lengths=(9, 20, 14), row_tokens=48):
    torch.manual_seed(3)
    records = [torch.randint(3, 300, (n,)).tolist() for n in lengths]
    labels = [list(r) for r in records]
    labels[1][:6] = [-100] * 6
    width = max(lengths)
    padded = dict(input_ids=torch.zeros(3, width, dtype=torch.long), labels=torch.full((3, width), -100),
                  attention_mask=torch.zeros(3, width, dtype=torch.long))
    for i, (ids, lab) in enumerate(zip(records, labels)):
        padded["input_ids"][i, :len(ids)] = torch.tensor(ids)
        padded["labels"][i, :len(ids)] = torch.tensor(lab)
        padded["attention_mask"][i, :len(ids)] = 1
    rows = batching.packed_rows([{"input_ids": r} for r in records], labels,
                                batching.pack_into_rows(list(lengths), row_tokens))
    return padded, batching.pad_rows(pad_token_id=0, row_tokens=row_tokens)(rows)


@pytest.mark.parametrize("model_class", ["text", "multimodal"])
@pytest.mark.parametrize("varlen", ["stock", "varlen selected", "masks skipped", "masks skipped, one layer graph",
                                    "masks skipped, one layer graph, compiled"])
def test_packed_rows_train_as_padded_records_do(varlen, model_class, monkeypatch):
    """The records of a packed row see only themselves, in both classes (the multimodal one's Gemma3Model builds the
    mask from the text config). With the variable-length attention selected, the CPU runs its SDPA fallback. With
    the masks skipped (the hook forecasts that the kernels serve every layer, as on a GPU), transformers builds no
    mask and each layer's fallback builds the packed mask from the record bounds; under override 17 from the window
    each layer's call is given (FULL_WINDOW for full attention), with its own rotary embeddings under both names."""
    from transformers.models.gemma3 import modeling_gemma3

    # 6 layers: sliding ones and a full-attention one; rows of 24 tokens: two rows, one ending in padding
    model = (small_multimodal_gemma if model_class == "multimodal" else small_gemma)(layers=6, random_norms=False)
    padded, packed = packed_and_padded(row_tokens=24)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (2, 24)
    expected = loss_and_grads(copy.deepcopy(model), **padded)
    rows = copy.deepcopy(model)
    if varlen != "stock":
        assert varlen_attention.use_varlen_attention(rows)
    if varlen.startswith("masks skipped"):
        forecasts = []
        monkeypatch.setattr(varlen_attention, "serves_every_layer", lambda *args: forecasts.append(args) or True)
        monkeypatch.setattr(modeling_gemma3, "create_causal_mask", lambda **kwargs: pytest.fail("a mask was built"))
    windows, graphs = [], []
    kinds = [(layer.self_attn.is_sliding, layer.self_attn.sliding_window)
             for layer in compiled_layers.decoder_layers(rows)]
    if varlen.endswith("compiled"):  # the window a symbol of the one graph, the packed mask built inside it
        torch._dynamo.reset()
        compiled_layers.compile_decoder_layers(
            rows, backend=lambda graph, inputs: graphs.append(graph) or graph.forward)
    if varlen.endswith("one layer graph"):  # the windows the packed masks are built with, recorded
        packed_mask = varlen_attention.packed_mask
        monkeypatch.setattr(varlen_attention, "packed_mask",
                            lambda *args: windows.append(args[3]) or packed_mask(*args))
    if "one layer graph" in varlen:
        assert one_layer_graph.unify_layer_kinds(rows.train()) == 6
    with compiled_layers.compiler_settings():
        assert_same(expected, loss_and_grads(rows, **packed))
    if varlen.endswith("one layer graph"):  # the layers' windows as given: one full-attention layer of six
        assert sorted(windows) == [16] * 5 + [one_layer_graph.FULL_WINDOW]
    if varlen.endswith("compiled"):
        assert len(graphs) == 1
    assert [(layer.self_attn.is_sliding, layer.self_attn.sliding_window)
            for layer in compiled_layers.decoder_layers(rows)] == kinds
    if varlen.startswith("masks skipped"):  # what the hook forecast from: the text config, the batch's longest record
        ((device, dtype, config, longest, dropout),) = forecasts
        assert (device.type, dtype, longest, dropout) == ("cpu", torch.float32, packed["max_length_q"], 0.0)
        assert config is rows.config.get_text_config() and config.sliding_window == 16


def test_the_masks_are_skipped_only_for_a_packed_text_batch_the_kernels_serve(monkeypatch):
    """The hook's cases, and the kernels' (`serves`): a GPU of compute capability 8.0 or more runs flash attention
    with the window; an older one the memory-efficient kernel, which has none; the CPU, float32 or dropout: SDPA."""
    from types import SimpleNamespace

    serves_every_layer = varlen_attention.serves_every_layer  # before the hook's forecast is replaced below
    model = small_gemma()
    patches = Patches()
    assert varlen_attention.use_varlen_attention(model, patches)
    (hook,) = model.model._forward_pre_hooks.values()
    packed = dict(input_ids=torch.ones(1, 8, dtype=torch.long), cu_seq_lens_q=torch.tensor([0, 8]), max_length_q=8)
    assert hook(model.model, (), packed) is None  # the CPU: SDPA with transformers' masks
    monkeypatch.setattr(varlen_attention, "serves_every_layer", lambda *args: True)
    assert hook(model.model, (), packed)[1]["attention_mask"] == varlen_attention.NO_MASKS
    for other in (dict(attention_mask=torch.ones(1, 8)), dict(cu_seq_lens_q=None), dict(pixel_values=torch.ones(1)),
                  dict(past_key_values=object()), dict(token_type_ids=torch.zeros(1, 8)), dict(max_length_q=None)):
        assert hook(model.model, (), {**packed, **other}) is None, other
    patches.restore()
    assert not model.model._forward_pre_hooks

    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    config = SimpleNamespace(head_dim=256, sliding_window=512)
    assert varlen_attention.serves(cuda, bf16, 256, 512, 4096, 0.0)  # flash: the window in the kernel
    assert not varlen_attention.serves(torch.device("cpu"), bf16, 256, None, 100, 0.0)
    assert not varlen_attention.serves(cuda, torch.float32, 256, None, 100, 0.0)
    assert not varlen_attention.serves(cuda, bf16, 256, None, 100, 0.1)
    assert serves_every_layer(cuda, bf16, config, 4096, 0.0)
    assert not serves_every_layer(torch.device("cpu"), bf16, config, 100, 0.0)
    capability[0] = (7, 5)  # a T4: the memory-efficient kernel, which serves a sliding layer by the batch's longest
    assert varlen_attention.serves(cuda, torch.float16, 256, 512, 512, 0.0)
    assert not varlen_attention.serves(cuda, torch.float16, 256, 512, 513, 0.0)
    assert not varlen_attention.serves(cuda, torch.float16, 256, 512, None, 0.0)
    assert not serves_every_layer(cuda, torch.float16, config, 512, 0.0)  # so the masks are always built there


@pytest.mark.gpu
def test_varlen_attention_matches_masked_sdpa_on_the_gpu():
    model = small_multimodal_gemma(sliding_window=512).cuda()
    torch.manual_seed(4)
    lengths = (300, 700, 24, 1000)
    records = [torch.randint(3, 300, (n,)).tolist() for n in lengths]
    rows = batching.packed_rows([{"input_ids": r} for r in records], records, batching.pack_into_rows(list(lengths), 1024))
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batching.pad_rows(0, 1024)(rows).items()}
    masked = {k: v for k, v in batch.items() if not k.startswith(("cu_seq", "max_length"))}
    results = []
    for packed in (False, True):
        copied = copy.deepcopy(model)
        if packed:
            assert varlen_attention.use_varlen_attention(copied)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = copied(**(batch if packed else masked)).loss
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in copied.named_parameters()
                                                if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-3, atol=0)
    for name, grad in results[0][1].items():
        assert float((results[1][1][name] - grad).norm() / grad.norm().clamp_min(1e-12)) < 5e-2, name


def quantized_multimodal_lora(directory, layers=2, **text_changes):
    """A tiny multimodal model saved and loaded as train_qlora loads it (NF4 on the CPU), with LoRA adapters where
    the QLoRA script puts them (the language model's linear layers), B random."""
    from peft import get_peft_model

    if not (directory / "config.json").is_file():
        small_multimodal_gemma(layers=layers, **text_changes).save_pretrained(directory)
    model = train_qlora.load_quantized_model(str(directory), CPU, torch.device("cpu"), "sdpa")
    config = train_qlora.LoraArguments(lora_r=4, lora_alpha=8).peft_config(model)
    peft_model = get_peft_model(model, config).train()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return peft_model


@pytest.mark.parametrize("keep_weight", [False, True])
def test_lora_4bit_gives_peft_s_answer(keep_weight, tmp_path):
    stock = quantized_multimodal_lora(tmp_path)
    fused = copy.deepcopy(stock)
    assert lora_4bit.fuse_lora_4bit(fused, keep_dequantized_weight=keep_weight) == 2 * 7
    batch = padded_batch()
    expected, ours = loss_and_grads(stock, **batch), loss_and_grads(fused, **batch)
    assert len(expected[1]) == 2 * 2 * 7 and all(g.abs().sum() > 0 for g in expected[1].values())
    assert_same(expected, ours)


@pytest.fixture(scope="module")
def multimodal_lora(tmp_path_factory):
    """Four layers, one of them full attention, QLoRA as the script sets it up."""
    model = quantized_multimodal_lora(tmp_path_factory.mktemp("mm_lora"), layers=4,
                                      layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                   "sliding_attention"])
    assert lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True) == 4 * 7
    return model


def checkpointed(model, function=None):
    copied = copy.deepcopy(model).train()
    copied.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if function is not None:
        for layer in compiled_layers.decoder_layers(copied):
            layer._gradient_checkpointing_func = function
    return copied


def test_compiled_layers_are_the_language_models_and_give_the_eager_answer(multimodal_lora):
    torch._dynamo.reset()
    eager, compiled = checkpointed(multimodal_lora), checkpointed(multimodal_lora)
    with compiled_layers.compiler_settings():
        assert compiled_layers.compile_decoder_layers(compiled, backend="aot_eager") == 4  # no SigLIP layer
        batch = padded_batch()
        assert_same(loss_and_grads(eager, **batch), loss_and_grads(compiled, **batch))


def test_offloaded_checkpoints_give_the_stock_checkpoints_answer(multimodal_lora):
    assert offload.offload_target_found(multimodal_lora)
    batch = padded_batch()
    stock = loss_and_grads(checkpointed(multimodal_lora), **batch)
    assert_same(stock, loss_and_grads(checkpointed(multimodal_lora, offload.checkpoint), **batch))


def test_skip_train_and_flops_once_give_the_stock_answer():
    model = small_multimodal_gemma()
    stock_flops = model.floating_point_ops({"input_ids": torch.zeros(2, 10, dtype=torch.long)})
    patches = Patches()
    assert skip_train.skip_train_when_training(model, patches)
    assert flops_once.count_parameters_once(model, patches)
    assert model.floating_point_ops({"input_ids": torch.zeros(2, 10, dtype=torch.long)}) == stock_flops
    model.eval()
    model.train()
    assert all(module.training for module in model.modules())  # the vision tower's too
    patches.restore()


def prepared_as_sft_trainer_does(model_dir, keep_embeddings: bool):
    """The 4-bit bf16 multimodal model through trl 0.8.6 SFTTrainer's steps on a GPU (peft's k-bit preparation, LoRA
    where the QLoRA script puts it, the cast back to bf16), with or without override 15; as
    tests/test_model_loading.py takes them for the text class."""
    from fastpath import kbit_embeddings
    from peft import get_peft_model
    from trl.trainer import sft_trainer

    model = train_qlora.load_quantized_model(str(model_dir), common.Precision(True, False, torch.bfloat16, "test"),
                                             "cpu", "eager")
    embedding = model.get_input_embeddings().weight
    before = embedding.detach()
    with kbit_embeddings.embeddings_stay_16bit(keep_embeddings) as installed:
        model = sft_trainer.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert installed == keep_embeddings
    model = get_peft_model(model, train_qlora.LoraArguments().peft_config(model))
    sft_trainer.peft_module_casting_to_bf16(model)
    return model, embedding, before


def test_kbit_embeddings_end_as_the_stock_preparation_leaves_them(multimodal_dir):
    stock, _, _ = prepared_as_sft_trainer_does(multimodal_dir, keep_embeddings=False)
    kept, embedding, before = prepared_as_sft_trainer_does(multimodal_dir, keep_embeddings=True)
    assert embedding.data_ptr() == before.data_ptr() and embedding.dtype == torch.bfloat16
    assert kept.get_output_embeddings().weight is embedding, "still tied"
    dtypes = lambda m: {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    assert dtypes(kept) == dtypes(stock)
    assert torch.equal(stock.get_input_embeddings().weight, embedding)
    assert [n for n, p in kept.named_parameters() if p.requires_grad] == \
        [n for n, p in stock.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------
# Smoke runs of both scripts on the multimodal class: what they save
# ---------------------------------------------------------------------------


def vision_weights(folder) -> dict:
    weights = load_file(str(folder / "model.safetensors"))
    return {n: t for n, t in weights.items() if shapes.frozen_in_text_training(n)}


def assert_generates_text(folder) -> None:
    """The saved model loads as a user loads it (AutoModelForCausalLM and its own tokenizer), as the multimodal class,
    and continues a text-only prompt from the tokenizer's inputs alone (no pixel values, no token_type_ids)."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is Gemma3ForConditionalGeneration
    inputs = tokenizer(common.format_prompt({"instruction": "Name a primary colour.", "input": ""}),
                       return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert output.shape == (1, length + 3) and torch.equal(output[:, :length], inputs["input_ids"])


@pytest.mark.slow
def test_a_qlora_smoke_run_of_the_4b_class_trains_saves_and_merges(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run = tmp_path / "qlora"
    trainer = train_qlora.main(*train_qlora.parse_args([
        "--smoke", "--model_name_or_path", MULTIMODAL_ID, "--output_dir", str(run), "--merge",
        "--num_sample_prompts", "1"]))
    assert "Gemma3ForConditionalGeneration: a tiny vision tower" in caplog.text  # the load step says the class
    assert type(trainer.model.get_base_model()) is Gemma3ForConditionalGeneration
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert "language_model" in adapter["target_modules"]
    saved = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert saved and not any(shapes.frozen_in_text_training(n) for n in saved)
    # merged/: the whole multimodal model, its vision tower the base's (in the merge's bf16; a real base is bf16
    # already, so to the bit); it loads for text generation.
    base, merged = vision_weights(run / "smoke_base_model"), vision_weights(run / "merged")
    assert set(base) == set(merged) and all(torch.equal(base[n].to(merged[n].dtype), merged[n]) for n in base)
    assert_generates_text(run / "merged")


@pytest.mark.slow
def test_a_galore_smoke_run_of_the_4b_class_trains_the_language_model_alone(tmp_path):
    run = tmp_path / "galore"
    train_galore.main(*train_galore.parse_args([
        "--smoke", "--model_name_or_path", MULTIMODAL_ID, "--output_dir", str(run), "--learning_rate", "1e-2",
        "--num_sample_prompts", "0"]))
    base = load_file(str(run / "smoke_base_model" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    assert set(base) == set(final)
    vision = [n for n in base if shapes.frozen_in_text_training(n)]
    assert vision and all(torch.equal(base[n], final[n]) for n in vision)
    # (saved under the checkpoint's own names: language_model.model.layers..., vision_tower...)
    language = [n for n in base if "language_model" in n and ".layers." in n and n.endswith("proj.weight")]
    assert language and all(not torch.equal(base[n], final[n]) for n in language)
    assert_generates_text(run / "final")  # final/ is the whole model: it loads for text generation as it is
