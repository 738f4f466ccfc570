"""Both scripts on a random-weight model of the real gemma-3-1b shapes, on a CUDA GPU: `pytest -m gpu`.

The shapes come from gemma-3-1b's config.json: `$GEMMA_CONFIG`, else
../shared/gemma-3-1b/config.json, else .gpu/config.json (where the GPU runs carry it).
Skipped without CUDA (conftest.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import common
from fastpath import galore_8bit
from fastpath import chunked_loss, compiled_layers, lora_4bit, rms_norm, varlen_attention
from models import smoke
from conftest import packed_batch, padded_batch, uneven_records

pytestmark = pytest.mark.gpu

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_CANDIDATES = [
    Path(os.environ.get("GEMMA_CONFIG", "/nonexistent")),
    REPO_ROOT.parent / "shared" / "gemma-3-1b" / "config.json",
    REPO_ROOT / ".gpu" / "config.json",
]
PROJECTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def real_shape_model(tmp_path_factory, default_texts) -> Path:
    config = next((path for path in CONFIG_CANDIDATES if path.is_file()), None)
    if config is None:
        pytest.skip("no gemma-3-1b config.json found")
    return smoke.build_random_gemma(
        tmp_path_factory.mktemp("gemma-3-1b-random"), default_texts, vocab_size=8000, config_file=config
    )


def overfit(module, model_dir, output_dir, learning_rate, *extra):
    """Train repeatedly on one fixed batch of 4 records: the loss must fall."""
    trainer = module.main(*module.parse_args([
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "12",
        "--logging_steps", "1", "--save_strategy", "no", "--max_train_samples", "4",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0",
        "--lr_scheduler_type", "constant", "--learning_rate", str(learning_rate), "--max_grad_norm", "1.0",
        "--num_train_epochs", "100", *extra,
    ]))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.8 * losses[0], losses
    return trainer


def test_qlora_real_shapes_loss_falls_and_adapter_loads(real_shape_model, tmp_path):
    import train_qlora
    from peft import AutoPeftModelForCausalLM

    overfit(train_qlora, real_shape_model, tmp_path, 1e-3)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.bfloat16).to("cuda")
    assert any("lora_B" in name and p.abs().max() > 0 for name, p in reloaded.named_parameters())


def test_galore_real_shapes_projected_weights_change_and_model_loads(real_shape_model, tmp_path):
    import train_galore
    from transformers import AutoModelForCausalLM

    trainer = overfit(train_galore, real_shape_model, tmp_path, 1e-4)
    assert any(isinstance(g.get("rank"), int) for g in trainer.optimizer.param_groups)
    before = AutoModelForCausalLM.from_pretrained(real_shape_model, dtype=torch.bfloat16)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "final", dtype=torch.bfloat16)
    after_weights = dict(after.named_parameters())
    for name, weight in before.named_parameters():
        if name.endswith(".weight") and any(p in name for p in PROJECTED):
            change = (after_weights[name].float() - weight.float()).norm() / weight.float().norm()
            assert change > 1e-4, f"{name} moved only {change:.2e}"


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




def test_fp16_path_trains_finite_on_real_shapes(real_shape_model, tmp_path, emulated_t4):
    import train_qlora

    trainer = overfit(train_qlora, real_shape_model, tmp_path, 1e-3)
    assert trainer.args.fp16 and not trainer.args.bf16
    assert torch.cuda.max_memory_allocated() < 15 * 2**30


@pytest.mark.parametrize("compiled", [False, True], ids=["eager chunks", "compiled chunks"])
def test_chunked_loss_equals_stock_loss_on_real_shapes(real_shape_model, compiled):
    """The fast path's loss within 1e-3 (relative) of the stock one, gradients within bf16 tolerance."""
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(real_shape_model, dtype=torch.bfloat16).cuda()
    chunked = AutoModelForCausalLM.from_pretrained(real_shape_model, dtype=torch.bfloat16).cuda()
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


def test_fast_path_same_answer_as_stock_on_real_shapes(real_shape_model):
    """GaLore's model: fused norms, chunked loss, packed rows and variable-length attention against stock
    transformers on the same records (padded, SDPA with a mask, stock loss), both in bf16, and both against the
    stock computation in float32."""
    records, labels = uneven_records()
    losses, grads = {}, {}
    watched = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.5.self_attn.k_norm.weight", "model.layers.25.mlp.down_proj.weight")
    for run, dtype in (("reference", torch.float32), ("stock", torch.bfloat16), ("fast", torch.bfloat16)):
        model = common.load_causal_lm(str(real_shape_model), False, dtype=dtype, attn_implementation="sdpa").cuda()
        if run == "fast":
            chunked_loss.use_chunked_loss(model)
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


def test_fused_lora_4bit_same_answer_as_peft_on_real_shapes(real_shape_model):
    """QLoRA's layers on the 4-bit base: the fused autograd node against peft + bitsandbytes, in bf16."""
    import train_qlora
    from peft import LoraConfig, get_peft_model

    precision = common.Precision(True, False, torch.bfloat16, "test")
    records, labels = uneven_records(count=4)
    losses, grads = [], []
    for fast in (False, True):
        model = train_qlora.load_quantized_model(str(real_shape_model), precision, "cuda", "sdpa")
        torch.manual_seed(0)  # the same adapter initialisation in both runs
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM")).train()
        with torch.no_grad():  # a non-zero B, the same in both runs, so every adapter path carries gradient
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        if fast:
            assert lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True) == 26 * 7
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**padded_batch(records, labels)).loss
        loss.backward()
        losses.append(loss.float().item())
        grads.append({n: p.grad.float() for n, p in model.named_parameters()
                      if p.requires_grad and ("layers.0." in n or "layers.25." in n)})
        del model
        torch.cuda.empty_cache()
    _same_answer(losses[0], losses[1], grads[0], grads[1])


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


def test_compiled_offloaded_qlora_layers_same_answer_and_compiled_once_on_real_shapes(real_shape_model):
    """Overrides 10 and 11 with inductor: compiled decoder layers whose checkpointed inputs wait in pinned CPU memory,
    against the eager fast path, both in bf16 and both against float32, on packed batches with other record bounds
    (and row counts) each step. As close to float32 as the eager path is, and nothing compiled after the first
    step. (Deep in the backward pass the two bf16 paths round differently: 3.6% apart at layer 0 on an H100.)"""
    from fastpath import offload
    import train_qlora
    from peft import LoraConfig, get_peft_model
    from torch._inductor.compile_fx import compile_fx

    def lora_model(dtype):
        model = train_qlora.load_quantized_model(str(real_shape_model), common.Precision(
            dtype == torch.bfloat16, False, dtype, "test"), "cuda", "sdpa")
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                 task_type="CAUSAL_LM")).train()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02, generator=torch.Generator("cuda").manual_seed(len(name)))
        chunked_loss.use_chunked_loss(model.get_base_model())
        rms_norm.fuse_rms_norms(model)
        lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True)
        varlen_attention.use_varlen_attention(model.get_base_model())  # bf16 only: float32 runs SDPA with the mask
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def step(model, batch, dtype):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        return loss.float().item(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                     if p.requires_grad and ("layers.0." in n or "layers.25." in n)}

    batches = [packed_batch(*uneven_records(count=8, seed=seed)) for seed in range(4)]
    reference_model = lora_model(torch.float32)
    reference = [step(reference_model, batch, torch.float32) for batch in batches]
    del reference_model
    torch.cuda.empty_cache()
    model = lora_model(torch.bfloat16)
    eager = [step(model, batch, torch.bfloat16) for batch in batches]
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return compile_fx(graph_module, example_inputs)

    assert compiled_layers.compile_decoder_layers(model, backend=counting) == 26
    for layer in model.get_base_model().model.layers:
        layer._gradient_checkpointing_func = offload.checkpoint
    fast = [step(model, batches[0], torch.bfloat16)]
    first = len(graphs)
    fast += [step(model, batch, torch.bfloat16) for batch in batches[1:]]
    assert len(graphs) == first <= 5, len(graphs)
    assert len({batch["input_ids"].shape[0] for batch in batches}) > 1  # other row counts did not compile again
    for (reference_loss, reference_grads), (eager_loss, eager_grads), (fast_loss, fast_grads) in zip(
            reference, eager, fast):
        assert abs(eager_loss - reference_loss) <= 1e-2 * abs(reference_loss)  # 4-bit weights dequantized to bf16
        _same_answer(eager_loss, fast_loss, eager_grads, fast_grads, reference_grads)
