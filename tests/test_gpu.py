"""The real (non --smoke) path on a CUDA GPU, with the tiny random model: `pytest -m gpu` on a GPU machine.

Skipped wherever torch sees no CUDA GPU (see conftest.py).
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import common
from cli import errors
from fastpath import galore_8bit
import train_galore
import train_qlora

pytestmark = pytest.mark.gpu

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def run_main(module, model_dir, output_dir, *extra):
    return module.main(*module.parse_args([
        "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "3",
        "--logging_steps", "1", "--save_strategy", "no", "--max_train_samples", "16", "--max_seq_length", "256",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0", *extra,
    ]))


def finite_losses(trainer):
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), losses
    return losses


def expected_precision():
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


def test_precision_matches_the_gpu():
    from types import SimpleNamespace

    assert common.choose_precision(SimpleNamespace(bf16=False, fp16=False), on_cpu=False).name == expected_precision()


def test_qlora_on_cuda(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb

    trainer = run_main(train_qlora, tiny_model_dir, tmp_path)
    finite_losses(trainer)
    assert trainer.args.bf16 == (expected_precision() == "bf16") and trainer.args.fp16 == (not trainer.args.bf16)
    four_bit = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * trainer.model.config.num_hidden_layers
    assert all(m.weight.device.type == "cuda" for m in four_bit)
    saved = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    lora_b = [w for name, w in saved.items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)


@pytest.mark.skipif(not torch.cuda.is_available() or expected_precision() != "bf16", reason="needs a bf16 GPU")
def test_qlora_trainer_keeps_the_bf16_embedding_on_cuda(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Override 15 through trl's own SFTTrainer, which prepares 4-bit models only on a GPU."""
    from fastpath import kbit_embeddings
    from datasets import Dataset
    from transformers import TrainingArguments
    from trl import SFTTrainer

    model = train_qlora.load_quantized_model(str(tiny_model_dir), common.Precision(True, False, torch.bfloat16, "test"),
                                             torch.device("cuda"), "eager")
    embedding = model.get_input_embeddings().weight
    before = embedding.detach()  # keeps the loaded storage alive: a copy cannot land at its address
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, gradient_checkpointing=True, report_to=[])
    with kbit_embeddings.embeddings_stay_16bit(True) as installed:
        trainer = SFTTrainer(model=model, args=args, tokenizer=tiny_tokenizer, max_seq_length=32,
                             train_dataset=Dataset.from_dict({"text": ["a short record", "another one"]}),
                             dataset_text_field="text", peft_config=train_qlora.LoraArguments().peft_config())
    assert installed and embedding.data_ptr() == before.data_ptr(), "cast to float32 and back"
    assert trainer.model.get_input_embeddings().weight is embedding and embedding.dtype == torch.bfloat16
    assert trainer.model.get_output_embeddings().weight is embedding


def test_galore_on_cuda(tiny_model_dir, tmp_path):
    # bf16 weights do not register 1e-5 updates on a 3-step run; a larger rate shows the optimizer works
    trainer = run_main(train_galore, tiny_model_dir, tmp_path, "--galore_rank", "8", "--learning_rate", "1e-3")
    finite_losses(trainer)
    assert next(trainer.model.parameters()).device.type == "cuda"
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "final" / "model.safetensors"))
    for name, weight in after.items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            assert not torch.equal(weight.float(), before[name].to(weight.dtype).float()), f"{name} did not move"


def test_galore_default_rank_too_large_for_the_tiny_model(tiny_model_dir, tmp_path):
    with pytest.raises(errors.UserInputError, match="--galore_rank 128"):
        run_main(train_galore, tiny_model_dir, tmp_path)


@pytest.mark.parametrize("size", [64, 512])
def test_fixed_galore_optimizer_on_cuda(size):
    import galore_torch

    def relative_change(optimizer_class):
        generator = torch.Generator().manual_seed(size)
        weight = torch.nn.Parameter((torch.randn(size, size, generator=generator) * 0.02).cuda())
        gradient = torch.randn(size, size, generator=generator).cuda()
        start = weight.detach().clone()
        group = {"params": [weight], "rank": 8, "update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}
        optimizer = optimizer_class([group], lr=1e-3, weight_decay=0.0, eps=1e-8)
        for _ in range(5):
            weight.grad = gradient.clone()
            optimizer.step()
        return ((weight.detach() - start).norm() / start.norm()).item()

    reference = relative_change(galore_torch.GaLoreAdamW)
    assert relative_change(galore_8bit.galore_adamw8bit()) >= 0.9 * reference
