"""The fast path (finetuning/overrides.py, fused.py, batching.py's packing): each piece against the stock computation,
in float32 on the CPU; and each override's guard, which keeps the stock path where its target is not what it expects."""
from __future__ import annotations

import copy
import random

import pytest
import torch

from cli import arguments
from records import batching
from fastpath import chunked_loss, guards, lora_4bit, rms_norm, varlen_attention
from fastpath import galore_8bit
from conftest import quantized_lora_model, small_gemma



# ---------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------


def test_fused_rms_norm_matches_gemmas_in_value_and_gradient():
    stock = small_gemma()
    fused = copy.deepcopy(stock)
    assert rms_norm.fuse_rms_norms(fused) == 2 * 6 + 1  # 4 per layer + q/k norms, and the final one

    input_ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (stock, fused):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_rms_norm_output_dtype_follows_the_fp32_residual_setting():
    norm = small_gemma().model.norm  # float32 weights
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    plain, residual = copy.deepcopy(norm), copy.deepcopy(norm)
    rms_norm.fuse_rms_norms(plain)
    rms_norm.fuse_rms_norms(residual, fp32_residual=True)
    assert plain(x).dtype == torch.bfloat16  # as Gemma's: back to the input's dtype
    assert residual(x).dtype == torch.float32


# ---------------------------------------------------------------------------
# LoRA on a 4-bit base
# ---------------------------------------------------------------------------



def lora_loss_and_grads(model, seed: int):
    input_ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("keep_weight", [False, True])
def test_fused_lora_4bit_matches_peft_without_dropout(keep_weight, tmp_path):
    stock = quantized_lora_model(tmp_path, dropout=0.0)
    fused = copy.deepcopy(stock)
    assert lora_4bit.fuse_lora_4bit(fused, keep_dequantized_weight=keep_weight) == 2 * 7

    stock_loss, stock_grads = lora_loss_and_grads(stock, seed=0)
    fused_loss, fused_grads = lora_loss_and_grads(fused, seed=0)
    torch.testing.assert_close(fused_loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert set(fused_grads) == set(stock_grads) and len(stock_grads) == 2 * 2 * 7
    for name, grad in stock_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_4bit_dropout_gradients_match_an_autograd_reference(tmp_path):
    """With dropout the masks differ from peft's draws, so the reference is autograd over the same mask."""
    model = quantized_lora_model(tmp_path, dropout=0.3)
    layer = next(m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A"))
    lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=False)
    layer.train()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(5, a.shape[1], requires_grad=True)

    torch.manual_seed(7)
    out = layer(x)
    out.square().sum().backward()
    fused_grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None

    import bitsandbytes.functional as bnb_functional

    w = bnb_functional.dequantize_4bit(layer.base_layer.weight, layer.base_layer.weight.quant_state)
    torch.manual_seed(7)
    dropped, mask = torch.native_dropout(x, 0.3, True)
    reference = x @ w.t() + layer.scaling["default"] * (dropped @ a.t()) @ b.t()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    reference.square().sum().backward()
    for got, expected in zip(fused_grads, (x.grad, a.grad, b.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not mask.all(), "dropout dropped nothing: the test would not tell"


def test_fused_lora_4bit_leaves_disabled_adapters_to_peft(tmp_path):
    model = quantized_lora_model(tmp_path, dropout=0.0)
    lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=False)
    input_ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        with_adapter = model(input_ids=input_ids).logits
        with model.disable_adapter():
            without = model(input_ids=input_ids).logits
    assert not torch.allclose(without, with_adapter)


def test_fused_lora_4bit_after_an_eval_pass_still_trains_right(tmp_path):
    """Samples are generated before training (eval mode, no grad): bitsandbytes may repack CPU weights then."""
    stock = quantized_lora_model(tmp_path, dropout=0.0)
    fused = copy.deepcopy(stock)
    lora_4bit.fuse_lora_4bit(fused, keep_dequantized_weight=False)
    input_ids = torch.randint(3, 300, (1, 12))
    for model in (stock, fused):
        model.eval()
        with torch.no_grad():
            model(input_ids=input_ids)
        model.train()
    stock_loss, _ = lora_loss_and_grads(stock, seed=0)
    fused_loss, _ = lora_loss_and_grads(fused, seed=0)
    # Both run bitsandbytes' repacked bf16 CPU kernel now; a misread layout would be off by whole units.
    torch.testing.assert_close(fused_loss, stock_loss, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Packing without cross-attention
# ---------------------------------------------------------------------------


def test_rows_hold_every_record_once_within_the_row_length():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(2000)]
    rows = batching.pack_into_rows(lengths, 512)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert batching.row_fill(lengths, rows, 512) > 0.97


def test_packed_loss_and_gradients_equal_the_padded_batchs():
    """The same records, padded one per row or packed into one row: the same loss, the same gradients."""
    model = small_gemma(layers=2)
    torch.manual_seed(3)
    records = [torch.randint(3, 300, (n,)).tolist() for n in (9, 20, 14)]
    labels = [list(r) for r in records]
    labels[1][:6] = [-100] * 6  # a masked prompt

    padded_ids = torch.zeros(3, 20, dtype=torch.long)
    padded_labels = torch.full((3, 20), -100)
    mask = torch.zeros(3, 20, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(records, labels)):
        padded_ids[i, : len(ids)] = torch.tensor(ids)
        padded_labels[i, : len(ids)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    padded = copy.deepcopy(model)
    loss = padded(input_ids=padded_ids, attention_mask=mask, labels=padded_labels).loss
    loss.backward()

    features = [{"input_ids": r} for r in records]
    rows = batching.packed_rows(features, labels, [[0, 1, 2]])
    batch = batching.pad_rows(pad_token_id=0, row_tokens=48)(rows)
    assert batch["input_ids"].shape == (1, 48) and "attention_mask" not in batch
    packed = copy.deepcopy(model)
    packed_loss = packed(**batch).loss
    packed_loss.backward()

    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(padded.named_parameters(), packed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_records_do_not_see_each_other():
    """Changing the first record of a row changes nothing in the second record's logits."""
    model = small_gemma(layers=2).eval()
    first, second = [5] * 10, list(range(20, 32))
    outputs = []
    for head in (first, [7] * 10):
        rows = batching.packed_rows([{"input_ids": head}, {"input_ids": second}], [head, second], [[0, 1]])
        batch = batching.pad_rows(0, 32)(rows)
        batch.pop("labels")
        with torch.no_grad():
            # No cache: transformers reads packing from the position ids only when there is none (as in training).
            outputs.append(model(**batch, use_cache=False).logits[0, 10:22])
    torch.testing.assert_close(outputs[0], outputs[1])


def test_record_labels_keep_the_collators_masking(tiny_tokenizer):
    import common
    from records import loading

    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    texts = [common.format_record(r) for r in records]
    features = [{"input_ids": tiny_tokenizer(t)["input_ids"]} for t in texts]
    data_args = arguments.DataArguments()
    collator = loading.completion_only_collator(tiny_tokenizer, data_args, _Columns(["instruction"]))
    labels = batching.record_labels(features, collator)
    for feature, record_labels, record in zip(features, labels, records):
        assert len(record_labels) == len(feature["input_ids"])
        learnt = [t for t, label in zip(feature["input_ids"], record_labels) if label != -100]
        assert record["output"] in tiny_tokenizer.decode(learnt)
        assert record["instruction"] not in tiny_tokenizer.decode(learnt)


class _Columns:
    def __init__(self, names):
        self.column_names = names


def test_batches_cover_every_row_once_and_change_order_per_epoch():
    batches = batching.PackedBatches(10, rows_per_batch=4, seed=1)
    first = list(batches)
    assert len(first) == len(batches) == 3 and [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b) == list(range(10))
    batches.set_epoch(1)
    assert list(batches) != first


def test_record_bounds_cover_every_record_and_the_padding():
    rows = batching.packed_rows([{"input_ids": [5] * n} for n in (3, 4, 6)], [[5] * n for n in (3, 4, 6)], [[0, 1], [2]])
    batch = batching.pad_rows(pad_token_id=0, row_tokens=8)(rows)
    # Row 1: records of 3 and 4, one pad; row 2: a record of 6, two pads.
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 7, 8, 14, 16]
    assert batch["max_length_q"] == 6 and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 1]]


def varlen_against_masked(device: str, dtype, sliding_window: int, lengths=(300, 700, 24, 1000)):
    """Loss and gradients of one packed batch: SDPA with a mask in float32 (the reference), then in `dtype`, then
    through the variable-length kernels in `dtype`."""
    model = small_gemma(layers=2, sliding_window=sliding_window).to(device)
    torch.manual_seed(4)
    records = [torch.randint(3, 300, (n,)).tolist() for n in lengths]
    rows = batching.packed_rows([{"input_ids": r} for r in records], records, batching.pack_into_rows(list(lengths), 1024))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batching.pad_rows(0, 1024)(rows).items()}
    masked = {k: v for k, v in batch.items() if not k.startswith(("cu_seq", "max_length"))}
    results = []
    for packed, autocast in ((False, False), (False, True), (True, True)):
        copy_ = copy.deepcopy(model)
        if packed:
            assert varlen_attention.use_varlen_attention(copy_)
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            loss = copy_(**(batch if packed else masked)).loss
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in copy_.named_parameters()}))
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("sliding_window", [512, 4096])
@pytest.mark.parametrize("gpu", ["this", "T4"])
def test_varlen_attention_matches_masked_sdpa_on_the_gpu(sliding_window, gpu, monkeypatch):
    if gpu == "T4":  # no flash attention: the memory-efficient kernel, or the mask where a window applies
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    (_, reference), (masked_loss, masked_grads), (varlen_loss, varlen_grads) = varlen_against_masked(
        "cuda", torch.bfloat16, sliding_window)
    torch.testing.assert_close(varlen_loss, masked_loss, rtol=1e-3, atol=0)
    for name, exact in reference.items():
        # Both paths round in bf16 and sum in different orders (flash attention's backward also in a different
        # order each run): each gradient's error against float32, relative to its size, may be at most 1.5 times
        # the masked bf16 path's, plus a little.
        def error(grad):
            return float((grad - exact).norm() / exact.norm().clamp_min(1e-12))

        assert error(varlen_grads[name]) <= 1.5 * error(masked_grads[name]) + 5e-3, (
            name, error(varlen_grads[name]), error(masked_grads[name]))


def test_fused_rms_norm_in_bfloat16_stays_within_bfloat16_rounding():
    stock = small_gemma().model.layers[0].input_layernorm
    fused = copy.deepcopy(stock)
    rms_norm.fuse_rms_norms(fused)
    x = (torch.randn(64, 64) * 3).to(torch.bfloat16)
    reference = stock(x.float())  # Gemma's norm, all in float32
    for output in (stock(x), fused(x)):
        assert output.dtype == torch.bfloat16
        # Two bf16 roundings (scale and output) at most: within 2 units of bf16's relative precision.
        torch.testing.assert_close(output.float(), reference, rtol=2 * 2**-8, atol=1e-3)


def test_one_kernel_dequantization_equals_bitsandbytes(tmp_path):
    """Double-quantized scales undone once and kept: the same weights as bitsandbytes' own dequantize_4bit."""
    import bitsandbytes.functional as bnb_functional

    model = quantized_lora_model(tmp_path, dropout=0.0)
    base = next(m for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")).base_layer
    state = base.weight.quant_state
    assert state.nested, "train_qlora uses double quantization: the case worth testing"
    expected = bnb_functional.dequantize_4bit(base.weight, state).to(torch.float32)
    for _ in range(2):  # the second call uses the kept scales
        torch.testing.assert_close(lora_4bit.dequantize_4bit(base.weight, state, torch.float32), expected, rtol=0, atol=0)
    assert state.float32_absmax.dtype == torch.float32


def test_dequantization_in_plain_operations_equals_bitsandbytes(tmp_path):
    """The form a compiled layer uses (inductor makes one kernel of it): the same bits in each dtype."""
    model = quantized_lora_model(tmp_path, dropout=0.0)
    layers = [m.base_layer for m in model.modules() if type(m).__name__ == "Linear4bit" and hasattr(m, "lora_A")]
    for base in layers[:7]:
        state = base.weight.quant_state
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            expected = lora_4bit.dequantize_4bit(base.weight, state, dtype)
            with pytest.MonkeyPatch.context() as patch:  # the plain operations must run, not fall back to the op
                patch.setattr(lora_4bit, "dequantize_4bit", None)
                actual = lora_4bit.dequantize_4bit_traced(base.weight, state, dtype)
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Guards: a target that moved leaves the stock path in place, with one log line
# ---------------------------------------------------------------------------


@pytest.fixture
def transformers_moved_on(monkeypatch):
    real = guards.installed_version
    monkeypatch.setattr(guards, "installed_version",
                        lambda name: "9.0.0" if name in ("transformers", "peft", "galore-torch") else real(name))


def test_a_moved_transformers_keeps_the_stock_norms_and_loss(transformers_moved_on, caplog):
    model = small_gemma()
    stock_forward = model.forward
    assert rms_norm.fuse_rms_norms(model) == 0
    assert chunked_loss.use_chunked_loss(model) is False
    assert model.forward == stock_forward and "forward" not in vars(model.model.norm)
    assert "written for transformers 4.57.*, found 9.0.0; using the stock path" in caplog.text


def test_a_moved_peft_keeps_peft_s_lora_layers(transformers_moved_on, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    import common
    import train_qlora

    precision = common.Precision(False, False, torch.float32, "test")
    model = get_peft_model(train_qlora.load_quantized_model(str(tiny_model_dir), precision, "cpu", "sdpa"),
                           LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=False) == 0


def test_a_moved_galore_torch_gets_its_stock_optimizer(transformers_moved_on):
    from galore_torch import GaLoreAdamW8bit

    assert galore_8bit.galore_adamw8bit() is GaLoreAdamW8bit


@pytest.mark.parametrize("moved", ["version", "no cast back"])
def test_a_moved_trl_keeps_its_k_bit_preparation(moved, monkeypatch, caplog):
    from fastpath import kbit_embeddings
    from trl.trainer import sft_trainer

    if moved == "version":
        real = guards.installed_version
        monkeypatch.setattr(guards, "installed_version", lambda name: "0.9.0" if name == "trl" else real(name))
        expected = "written for trl 0.8.6*, found 0.9.0; using the stock path"
    else:  # an SFTTrainer that prepares the model but no longer casts the embeddings back to bf16
        class Trainer:
            def __init__(self, model):
                self.model = sft_trainer.prepare_model_for_kbit_training(model)

        monkeypatch.setattr(sft_trainer, "SFTTrainer", Trainer)
        expected = "no longer calls ['peft_module_casting_to_bf16']; using the stock path"
    stock = sft_trainer.prepare_model_for_kbit_training
    with kbit_embeddings.embeddings_stay_16bit(True) as installed:
        assert not installed and sft_trainer.prepare_model_for_kbit_training is stock
    assert expected in caplog.text


def test_a_private_attention_op_that_changed_keeps_stock_sdpa(monkeypatch, caplog):
    monkeypatch.setattr(varlen_attention, "FLASH_ARGUMENTS", (*varlen_attention.FLASH_ARGUMENTS, "an_argument_torch_dropped"))
    model = small_gemma()
    assert varlen_attention.use_varlen_attention(model) is False
    assert model.config._attn_implementation == "sdpa"
    assert "lacks ['an_argument_torch_dropped']; using stock SDPA with a mask" in caplog.text
