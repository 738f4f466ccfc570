"""Both scripts and the fast path on random-weight models of gemma-3-270m's and gemma-3-4b's published shapes, on a
CUDA GPU (issue 25): `pytest -m gpu`. 4b is the multimodal class, its SigLIP tower at full size; the shapes come from
models/shapes.py (the same numbers as ../shared/gemma-3-*/config.json). tests/test_gpu_real_shapes.py does the same
and more for gemma-3-1b. Skipped without CUDA (conftest.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import common
import train_galore
import train_qlora
from fastpath import chunked_loss, compiled_layers, lora_4bit, offload, rms_norm, varlen_attention
from models import shapes, smoke
from conftest import packed_batch, padded_batch, uneven_records

pytestmark = pytest.mark.gpu
REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8000  # the tokenizer's; the model keeps the published 262k-row embedding


@pytest.fixture(scope="module", params=["270m", "4b"])
def sized_model(request, tmp_path_factory, default_texts):
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
    assert all(loss == loss for loss in losses), losses
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
    assert shapes.is_multimodal(reloaded.get_base_model()) == (size == "4b")


def test_galore_trains_the_language_model_alone(sized_model, tmp_path):
    from safetensors.torch import load_file

    size, model_dir = sized_model
    trainer = overfit(train_galore, model_dir, tmp_path, 1e-4)
    assert any(isinstance(g.get("rank"), int) for g in trainer.optimizer.param_groups)
    after = {}
    for file in (tmp_path / "final").glob("*.safetensors"):
        after.update(load_file(str(file)))
    before = {}
    for file in Path(model_dir).glob("*.safetensors"):
        before.update(load_file(str(file)))
    projected = [n for n in before if n.endswith("proj.weight") and ".layers." in n
                 and not shapes.frozen_in_text_training(n)]
    assert projected and all(not torch.equal(before[n], after[n].to(before[n].dtype)) for n in projected[:20])
    vision = [n for n in before if shapes.frozen_in_text_training(n)]
    assert (size == "4b") == bool(vision)
    assert all(torch.equal(before[n], after[n].to(before[n].dtype)) for n in vision)





def _watched(model) -> list:
    """The embedding, the first layer's q_proj, a k_norm and the last layer's down_proj, by their names here."""
    names = [n for n, p in model.named_parameters() if p.requires_grad and not shapes.frozen_in_text_training(n)]
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n})
    pick = lambda part: next(n for n in names if part in n)  # noqa: E731
    return [pick("embed_tokens.weight"), pick(f".layers.{layers[0]}.self_attn.q_proj.weight"),
            pick(f".layers.{layers[len(layers) // 2]}.self_attn.k_norm.weight"),
            pick(f".layers.{layers[-1]}.mlp.down_proj.weight")]


def _same_answer(stock_loss, fast_loss, stock_grads, fast_grads, reference_grads):
    assert abs(fast_loss - stock_loss) <= 1e-3 * abs(stock_loss), (stock_loss, fast_loss)
    for name, grad in stock_grads.items():
        reference = reference_grads[name]
        stock_error = float((grad - reference).norm() / reference.norm())
        fast_error = float((fast_grads[name] - reference).norm() / reference.norm())
        assert fast_error <= 1.5 * stock_error + 5e-3, (name, fast_error, stock_error)


def test_fast_path_same_answer_as_stock(sized_model):
    """GaLore's model: fused norms, chunked loss, packed rows and variable-length attention against stock
    transformers (padded, SDPA with a mask, the class's own loss), both in bf16, and both against float32."""
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


def _lora_model(model_dir, dtype=torch.bfloat16):
    from peft import get_peft_model

    model = train_qlora.load_quantized_model(str(model_dir), common.Precision(
        dtype == torch.bfloat16, False, dtype, "test"), "cuda", "sdpa")
    torch.manual_seed(0)
    model = get_peft_model(model, train_qlora.LoraArguments().peft_config(model)).train()
    with torch.no_grad():  # a non-zero B, the same in every run, so every adapter path carries gradient
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(len(name)))
    return model


def _lora_step(model, batch, autocast=True):
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
    size, model_dir = sized_model
    layers = shapes.gemma3_shape(size).layers
    batch = padded_batch(*uneven_records(vocab=VOCAB, count=4))
    results = []
    for fast in (False, True):
        model = _lora_model(model_dir)
        if fast:
            assert lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True) == layers * 7
        results.append(_lora_step(model, batch))
        del model
        torch.cuda.empty_cache()
    (stock_loss, stock_grads), (fast_loss, fast_grads) = results
    assert abs(fast_loss - stock_loss) <= 1e-3 * abs(stock_loss)
    for name, grad in stock_grads.items():
        assert float((fast_grads[name] - grad).norm() / grad.norm()) < 2e-2, name


def test_compiled_offloaded_layers_same_answer_and_compiled_once(sized_model):
    """Overrides 10 and 11 with inductor on this size's layers, against the eager fast path, on packed batches whose
    record bounds and row counts change every step: within bf16 rounding, and nothing compiled after the first step."""
    from torch._inductor.compile_fx import compile_fx

    size, model_dir = sized_model
    model = _lora_model(model_dir)
    chunked_loss.use_chunked_loss(model.get_base_model())
    rms_norm.fuse_rms_norms(model)
    lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True)
    varlen_attention.use_varlen_attention(model.get_base_model())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batches = [packed_batch(*uneven_records(vocab=VOCAB, count=8, seed=seed)) for seed in range(3)]
    eager = [_lora_step(model, batch) for batch in batches]
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    with compiled_layers.compiler_settings():
        assert compiled_layers.compile_decoder_layers(model, backend=counting) == shapes.gemma3_shape(size).layers
        for layer in compiled_layers.decoder_layers(model):
            layer._gradient_checkpointing_func = offload.checkpoint
        fast = [_lora_step(model, batches[0])]
        first = len(graphs)
        fast += [_lora_step(model, batch) for batch in batches[1:]]
    assert len(graphs) == first <= 5, len(graphs)
    for (eager_loss, eager_grads), (fast_loss, fast_grads) in zip(eager, fast):
        assert abs(fast_loss - eager_loss) <= 1e-2 * abs(eager_loss)
        for name, grad in eager_grads.items():
            assert float((fast_grads[name] - grad).norm() / grad.norm()) < 5e-2, name




def test_qlora_fp16_path_trains_finite_within_a_t4(sized_model, tmp_path, emulated_t4):
    _, model_dir = sized_model
    trainer = overfit(train_qlora, model_dir, tmp_path, 1e-3)
    assert trainer.args.fp16 and not trainer.args.bf16
    assert torch.cuda.max_memory_allocated() < 15 * 2**30
