"""Both scripts and the fast path on random-weight models of gemma-3-270m's, -1b's and -4b's published shapes, on a
CUDA GPU: `pytest -m gpu`. 4b is the multimodal class, its SigLIP tower at full size; the shapes come from
models/shapes.py (the same numbers as ../shared/gemma-3-*/config.json). Skipped without CUDA (conftest.py).
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

import common
import train_galore
import train_qlora
from cli.arguments import TOKEN_BUDGETS
from fastpath import (chunked_loss, compiled_layers, galore_8bit, lora_4bit, offload, one_layer_graph, rms_norm,
                      varlen_attention)
from models import shapes, smoke
from records import loading
from conftest import fails_cleanly, packed_batch, padded_batch, uneven_records

pytestmark = pytest.mark.gpu
SIZES = ["270m", "1b", "4b"]
SCRIPTS = {"QLoRA": train_qlora, "GaLore": train_galore}
VOCAB = 8000  # the tokenizer's; the model keeps the published 262k-row embedding
T4 = "Tesla T4 (emulated)"  # bench/emulate_t4.py's card, as the emulated_t4 fixture fakes it


@pytest.fixture(scope="module", params=SIZES)
def sized_model(request, tmp_path_factory, default_texts) -> tuple[str, Path]:
    """(size, folder): a random-weight Gemma 3 of that size's published shapes and an 8,000-token tokenizer."""
    size = request.param
    folder = tmp_path_factory.mktemp(f"sizes-{size}")
    shapes.gemma3_config(size).save_pretrained(folder / "config")
    model = smoke.build_random_gemma(folder / f"gemma-3-{size}", default_texts, vocab_size=VOCAB,
                                     config_file=folder / "config" / "config.json")
    yield size, model
    shutil.rmtree(folder, ignore_errors=True)  # 4b: 8.6 GB


def overfit(module, model_dir, output_dir, learning_rate, *extra):
    """Train repeatedly on one fixed batch of 4 records: the loss must fall."""
    trainer = module.main(*module.parse_args([
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "12",
        "--logging_steps", "1", "--save_strategy", "no", "--max_train_samples", "4",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0",
        "--lr_scheduler_type", "constant", "--learning_rate", str(learning_rate), "--max_grad_norm", "1.0",
        "--num_train_epochs", "100", "--num_sample_prompts", "0", "--report_card_prompts", "0", *extra,
    ]))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    return trainer


def test_qlora_trains_and_its_adapter_loads(sized_model, tmp_path):
    from peft import AutoPeftModelForCausalLM

    size, model_dir = sized_model
    trainer = overfit(train_qlora, model_dir, tmp_path, 1e-3)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and not any(shapes.frozen_in_text_training(n) for n in trainable)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.bfloat16).to("cuda")
    assert any("lora_B" in name and p.abs().max() > 0 for name, p in reloaded.named_parameters())
    assert shapes.is_multimodal(reloaded.get_base_model()) == shapes.gemma3_shape(size).multimodal


def test_galore_trains_the_language_model_alone(sized_model, tmp_path):
    """Every attention and MLP weight of the language model moves; the vision tower and projector (4b) do not; the
    saved model loads."""
    from transformers import AutoModelForCausalLM

    size, model_dir = sized_model
    trainer = overfit(train_galore, model_dir, tmp_path, 1e-4)
    assert any(isinstance(g.get("rank"), int) for g in trainer.optimizer.param_groups)
    before = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.bfloat16).named_parameters())
    assert after.keys() == before.keys()
    projected = [n for n in before if n.endswith("proj.weight") and ".layers." in n
                 and not shapes.frozen_in_text_training(n)]
    assert len(projected) == 7 * shapes.gemma3_shape(size).layers  # q, k, v, o, gate, up, down
    for name in projected:
        change = (after[name].float() - before[name].float()).norm() / before[name].float().norm()
        assert change > 1e-4, f"{name} moved only {change:.2e}"
    vision = [n for n in before if shapes.frozen_in_text_training(n)]
    assert bool(vision) == shapes.gemma3_shape(size).multimodal
    assert all(torch.equal(before[n], after[n]) for n in vision)


def test_qlora_fp16_path_trains_finite(sized_model, tmp_path, emulated_t4):
    """The loss falls, finite, in fp16 (no bf16 on a T4). Memory under the T4's cap: defaults_within_a_t4."""
    _, model_dir = sized_model
    trainer = overfit(train_qlora, model_dir, tmp_path, 1e-3)
    assert trainer.args.fp16 and not trainer.args.bf16


def defaults_within_a_t4(script, model_dir, data_file, output_dir, caplog):
    """Two steps with no batch flag under T4 emulation: the tier's whole token budget (neither the data nor the memory
    estimate cuts it), in fp16, finite, within the 15 GiB cap."""
    module = SCRIPTS[script]
    caplog.set_level("INFO", logger="training.auto_batch")
    trainer = module.main(*module.parse_args([str(arg) for arg in (
        "--model_name_or_path", model_dir, "--dataset_name", data_file, "--output_dir", output_dir,
        "--max_steps", 2, "--num_sample_prompts", 0, "--report_card_prompts", 0)]))
    budget = TOKEN_BUDGETS[script][0]
    assert f"packed rows, {budget:,} tokens per step per GPU ({T4}, 15 GiB; the data's " in caplog.text
    assert trainer.args.fp16 and trainer.state.global_step == 2
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert torch.cuda.max_memory_allocated() <= 15 * 2**30


def test_qlora_defaults_train_within_a_t4(sized_model, alpaca_path, tmp_path, emulated_t4, caplog):
    defaults_within_a_t4("QLoRA", sized_model[1], alpaca_path, tmp_path, caplog)


@pytest.mark.parametrize("sized_model", ["270m", "1b"], indirect=True)  # 4b: refused, the next test
def test_galore_defaults_train_within_a_t4(sized_model, alpaca_path, tmp_path, emulated_t4, caplog):
    defaults_within_a_t4("GaLore", sized_model[1], alpaca_path, tmp_path, caplog)


@pytest.mark.parametrize("sized_model", ["4b"], indirect=True)
def test_galore_on_4b_on_a_t4_is_refused_before_anything_loads(sized_model, tmp_path, emulated_t4, monkeypatch,
                                                               caplog):
    """The emulated card's name and memory reach the check; the whole message: tests/test_auto_batch.py."""
    monkeypatch.setattr(loading, "load_data_and_tokenizer", lambda *args: pytest.fail("the data was loaded"))
    message = fails_cleanly(train_galore, ["--model_name_or_path", sized_model[1], "--output_dir", tmp_path / "out"],
                            caplog, tmp_path / "out")
    assert message.startswith(f"GaLore on gemma-3-4b (4.30B parameters) does not fit this GPU, the {T4} with 15.0 GiB")
    assert "It needs a 24 GB card with bf16 (L4, A10G, RTX 3090/4090), where the estimate is about 18." in message


# ---------------------------------------------------------------------------
# The fast path: the same answer as the stock path
# ---------------------------------------------------------------------------


def _same_answer(stock_loss, fast_loss, stock_grads, fast_grads, reference_grads=None):
    """Loss within 1e-3 (relative). Gradients within bf16 tolerance: against a float32 reference where there is one,
    the fast path may be off by no more than about the stock bf16 path is; otherwise within 2% of each other."""
    assert abs(fast_loss - stock_loss) <= 1e-3 * abs(stock_loss), (stock_loss, fast_loss)
    for name, grad in stock_grads.items():
        if reference_grads is None:
            relative = float((fast_grads[name] - grad).norm() / grad.norm())
            assert relative < 2e-2, (name, relative)  # bf16 keeps 8 bits of mantissa
            continue
        reference = reference_grads[name]
        stock_error = float((grad - reference).norm() / reference.norm())
        fast_error = float((fast_grads[name] - reference).norm() / reference.norm())
        assert fast_error <= 1.5 * stock_error + 5e-3, (name, fast_error, stock_error)


def _watched(model) -> list:
    """The embedding, the first layer's q_proj, a k_norm and the last layer's down_proj, by their names here."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and not shapes.frozen_in_text_training(n)]
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n})
    pick = lambda part: next(n for n in names if part in n)  # noqa: E731
    return [pick("embed_tokens.weight"), pick(f".layers.{layers[0]}.self_attn.q_proj.weight"),
            pick(f".layers.{layers[len(layers) // 2]}.self_attn.k_norm.weight"),
            pick(f".layers.{layers[-1]}.mlp.down_proj.weight")]


def test_fast_path_same_answer_as_stock(sized_model):
    """GaLore's model: fused norms, chunked loss, packed rows and variable-length attention against stock
    transformers on the same records (padded, SDPA with a mask, the class's own loss), both in bf16, and both against
    the stock computation in float32."""
    _, model_dir = sized_model
    records, labels = uneven_records(vocab=VOCAB)
    losses, grads = {}, {}
    for run, dtype in (("reference", torch.float32), ("stock", torch.bfloat16), ("fast", torch.bfloat16)):
        model = common.load_causal_lm(str(model_dir), False, dtype=dtype, attn_implementation="sdpa").cuda()
        shapes.freeze_vision(model)
        watched = _watched(model)
        if run == "fast":
            assert chunked_loss.use_chunked_loss(model)
            rms_norm.fuse_rms_norms(model)
            assert varlen_attention.use_varlen_attention(model)
        loss = model(**(packed_batch(records, labels) if run == "fast" else padded_batch(records, labels))).loss
        loss.backward()
        losses[run] = loss.float().item()
        parameters = dict(model.named_parameters())
        grads[run] = {name: parameters[name].grad.float() for name in watched}
        del model, parameters
        torch.cuda.empty_cache()
    assert abs(losses["stock"] - losses["reference"]) <= 1e-3 * abs(losses["reference"]), losses
    _same_answer(losses["stock"], losses["fast"], grads["stock"], grads["fast"], grads["reference"])


@pytest.mark.parametrize("sized_model", ["1b"], indirect=True)
@pytest.mark.parametrize("row_tokens", [4096, 16384])
def test_fast_path_same_answer_at_long_context(sized_model, row_tokens):
    """Issue 27, long context: packing, variable-length attention with the 512-token sliding window and the chunked
    loss on three records of a quarter to a third of a row (each past the window) packed into one row of `row_tokens`,
    against stock transformers on each record alone (its own causal and sliding masks, no padding), in bf16, and both
    against float32. The stock loss is the packed batch's: each record's mean weighted by its share of the labels,
    its gradients added record by record in float32, so that memory holds one record's logits at a time."""
    _, model_dir = sized_model
    records, labels = uneven_records(count=3, vocab=VOCAB, lengths=(row_tokens // 4, row_tokens // 3))
    assert sum(map(len, records)) <= row_tokens
    learnt = [sum(label != -100 for label in record_labels[1:]) for record_labels in labels]  # shifted: one fewer
    losses, grads = {}, {}
    for run, dtype in (("reference", torch.float32), ("stock", torch.bfloat16), ("fast", torch.bfloat16)):
        model = common.load_causal_lm(str(model_dir), False, dtype=dtype, attn_implementation="sdpa").cuda()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing runs in training mode only; Gemma 3 has no dropout to change the answer
        watched = _watched(model)
        if run == "fast":
            assert chunked_loss.use_chunked_loss(model)
            rms_norm.fuse_rms_norms(model)
            assert varlen_attention.use_varlen_attention(model)
            # Override 17 as a run has it: each layer's window as a number, FULL_WINDOW for no window
            assert one_layer_graph.unify_layer_kinds(model) == shapes.gemma3_shape("1b").layers
            batch = packed_batch(records, labels, row_tokens=row_tokens)
            assert batch["input_ids"].shape == (1, row_tokens)
            loss = model(**batch).loss
            loss.backward()
            losses[run] = loss.float().item()
            parameters = dict(model.named_parameters())
            grads[run] = {name: parameters[name].grad.float() for name in watched}
        else:
            losses[run], parameters = 0.0, dict(model.named_parameters())
            grads[run] = {name: torch.zeros_like(parameters[name], dtype=torch.float32) for name in watched}
            for record, record_labels, count in zip(records, labels, learnt):
                ids = torch.tensor([record], device="cuda")
                loss = model(input_ids=ids, labels=torch.tensor([record_labels], device="cuda")).loss
                (loss * count / sum(learnt)).backward()
                losses[run] += loss.float().item() * count / sum(learnt)
                for name in watched:  # in float32: bf16 .grad would round the sum
                    grads[run][name] += parameters[name].grad.float()
                model.zero_grad()
        del model, parameters
        torch.cuda.empty_cache()
    assert abs(losses["stock"] - losses["reference"]) <= 1e-3 * abs(losses["reference"]), losses
    _same_answer(losses["stock"], losses["fast"], grads["stock"], grads["fast"], grads["reference"])


def _lora_model(model_dir, dtype=torch.bfloat16):
    """QLoRA's model (the script's LoRA targets: the language model alone) with a non-zero B, the same in every run
    and dtype, so every adapter path carries gradient."""
    from peft import get_peft_model

    model = train_qlora.load_quantized_model(str(model_dir), common.Precision(
        dtype == torch.bfloat16, False, dtype, "test"), "cuda", "sdpa")
    torch.manual_seed(0)
    model = get_peft_model(model, train_qlora.LoraArguments().peft_config(model)).train()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(len(name)))
    return model


def _lora_step(model, batch, autocast=True):
    """(loss, gradients of the first and the last decoder layer's adapters) of one step."""
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters()
                     if ".layers." in n and not shapes.frozen_in_text_training(n)})
    ends = (f".layers.{layers[0]}.", f".layers.{layers[-1]}.")
    return loss.float().item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                 if p.requires_grad and any(end in n for end in ends)}


def test_fused_lora_4bit_same_answer_as_peft(sized_model):
    """QLoRA's layers on the 4-bit base: the fused autograd node against peft + bitsandbytes, in bf16."""
    size, model_dir = sized_model
    batch = padded_batch(*uneven_records(vocab=VOCAB, count=4))
    results = []
    for fast in (False, True):
        model = _lora_model(model_dir)
        if fast:
            assert lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True) == shapes.gemma3_shape(size).layers * 7
        results.append(_lora_step(model, batch))
        del model
        torch.cuda.empty_cache()
    (stock_loss, stock_grads), (fast_loss, fast_grads) = results
    _same_answer(stock_loss, fast_loss, stock_grads, fast_grads)


def test_compiled_offloaded_layers_same_answer_and_compiled_once(sized_model):
    """Overrides 10, 11 and 17 with inductor: compiled decoder layers (one graph for both kinds) whose checkpointed
    inputs wait in pinned CPU memory, against the eager fast path, both in bf16 and both against float32, on packed
    batches with other record bounds (and row counts) each step. As close to float32 as the eager path is, and nothing
    compiled after the first step. (Deep in the backward pass the two bf16 paths round differently: 3.6% apart at 1b's
    layer 0 on an H100.)"""
    from torch._inductor.compile_fx import compile_fx

    def eager_fast_path(dtype):
        model = _lora_model(model_dir, dtype)
        chunked_loss.use_chunked_loss(model.get_base_model())
        rms_norm.fuse_rms_norms(model)
        lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True)
        varlen_attention.use_varlen_attention(model.get_base_model())  # bf16 only: float32 runs SDPA with the mask
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    size, model_dir = sized_model
    batches = [packed_batch(*uneven_records(vocab=VOCAB, count=8, seed=seed)) for seed in range(4)]
    assert len({batch["input_ids"].shape[0] for batch in batches}) > 1  # other row counts must not compile again
    model = eager_fast_path(torch.float32)
    reference = [_lora_step(model, batch, autocast=False) for batch in batches]
    del model
    torch.cuda.empty_cache()
    model = eager_fast_path(torch.bfloat16)
    eager = [_lora_step(model, batch) for batch in batches]
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    # The scripts' compiler settings, but a layer that fails to compile fails the test instead of running eagerly.
    with compiled_layers.compiler_settings(), torch._dynamo.config.patch(suppress_errors=False):
        assert compiled_layers.compile_decoder_layers(model, backend=counting) == shapes.gemma3_shape(size).layers
        assert one_layer_graph.unify_layer_kinds(model) == shapes.gemma3_shape(size).layers  # override 17
        for layer in compiled_layers.decoder_layers(model):
            layer._gradient_checkpointing_func = offload.checkpoint_compiled  # as a run installs it with compiled layers
        fast = [_lora_step(model, batches[0])]
        first = len(graphs)
        fast += [_lora_step(model, batch) for batch in batches[1:]]
    assert len(graphs) == first == 1, len(graphs)  # one graph for both kinds of layer: sliding window, full attention
    for (reference_loss, reference_grads), (eager_loss, eager_grads), (fast_loss, fast_grads) in zip(
            reference, eager, fast):
        assert abs(eager_loss - reference_loss) <= 1e-2 * abs(reference_loss)  # 4-bit weights dequantized to bf16
        _same_answer(eager_loss, fast_loss, eager_grads, fast_grads, reference_grads)


# ---------------------------------------------------------------------------
# gemma-3-1b alone
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sized_model", ["1b"], indirect=True)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager chunks", "compiled chunks"])
def test_chunked_loss_equals_stock_loss_on_real_shapes(sized_model, compiled):
    """The fast path's loss within 1e-3 (relative) of the stock one, gradients within bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    _, model_dir = sized_model
    stock = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    chunked = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    chunked_loss.use_chunked_loss(chunked, compiled_chunks=compiled)
    generator = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(3, 8000, (2, 512), device="cuda", generator=generator)
    labels = input_ids.clone()
    labels[:, :100] = -100
    losses, grads = [], []
    for model in (stock, chunked):
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        losses.append(loss.float().item())
        grads.append(model.model.layers[-1].mlp.down_proj.weight.grad.float())
    assert abs(losses[1] - losses[0]) <= 1e-3 * abs(losses[0]), losses
    relative = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert relative < 2e-2, relative.item()  # bf16 keeps 8 bits of mantissa


def test_galore_8bit_moves_like_32bit_reference_on_real_shapes():
    """The real 8-bit blockwise path (states above bitsandbytes' 4,096-element threshold), Gemma's MLP shape."""
    from galore_torch import GaLoreAdamW

    def relative_change(optimizer_class):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(6912, 1152, device="cuda") * 0.02)
        start = weight.detach().clone()
        group = {"params": [weight], "rank": 128, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
        optimizer = optimizer_class([group], lr=1e-3, weight_decay=0.0)
        generator = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            weight.grad = torch.randn(weight.shape, device="cuda", generator=generator)
            optimizer.step()
        return ((weight.detach() - start).norm() / start.norm()).item()

    reference = relative_change(GaLoreAdamW)
    fixed = relative_change(galore_8bit.galore_adamw8bit())
    assert fixed >= 0.9 * reference, (fixed, reference)


def test_plain_dequantization_compiled_equals_bitsandbytes_kernel_on_real_shapes():
    """The dequantization inside compiled layers, eager and as inductor's kernel, against bitsandbytes' CUDA kernel,
    for gemma-3-1b's MLP weight with double-quantized scales: within one rounding of the 16-bit type (the bf16 results
    were not bit-equal on an H100)."""
    import bitsandbytes.functional as bnb_functional

    torch.manual_seed(0)
    compiled = torch.compile(lora_4bit.dequantize_4bit_traced)
    for dtype in (torch.bfloat16, torch.float16):  # a weight quantized from `dtype` dequantizes to it (QLoRA's case)
        packed, state = bnb_functional.quantize_4bit(torch.randn(6912, 1152, device="cuda", dtype=dtype),
                                                     quant_type="nf4", compress_statistics=True)
        expected = lora_4bit.dequantize_4bit(packed, state, dtype)
        rounding = torch.finfo(dtype).eps
        with pytest.MonkeyPatch.context() as patch:  # the plain operations must run, not fall back to the op
            patch.setattr(lora_4bit, "dequantize_4bit", None)
            for actual in (lora_4bit.dequantize_4bit_traced(packed, state, dtype), compiled(packed, state, dtype)):
                torch.testing.assert_close(actual, expected, rtol=rounding, atol=0)
