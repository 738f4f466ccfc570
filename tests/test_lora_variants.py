"""LoRA variants (--use_rslora, --use_dora, --init_lora_weights): each trains, saves an adapter that loads onto the
original base, and merges into the same model; the ones QLoRA cannot start are refused before anything loads."""
from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

import common
from cli import errors
import train_qlora


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("flags, config", [
    (["--use_rslora"], {"use_rslora": True}),
    (["--use_dora"], {"use_dora": True}),
    (["--init_lora_weights", "gaussian"], {"init_lora_weights": "gaussian"}),
    # OLoRA moves part of each base weight into the adapter: the saved adapter is converted (rank 2r) into a plain
    # LoRA adapter for the original base, which loads anywhere without rerunning OLoRA's initialisation.
    (["--init_lora_weights", "olora"], {"init_lora_weights": True, "r": 2 * 16}),
])
def test_each_variant_trains_saves_and_merges_into_the_model_it_trained(flags, config, tmp_path):
    out = tmp_path / "run"
    trainer = train_qlora.main(*train_qlora.parse_args([
        "--smoke", "--output_dir", str(out), "--merge", "--num_sample_prompts", "0", "--learning_rate", "1e-2",
        *flags]))
    saved = json.loads((out / "final" / "adapter_config.json").read_text())
    assert {key: saved[key] for key in config} == config

    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    adapter = AutoPeftModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(out / "smoke_base_model", dtype=torch.float32)
    on_base, merged_logits = logits(adapter, ids), logits(merged, ids)
    assert (on_base - logits(base, ids)).abs().max() > 1e-3, "training changed nothing"
    # --merge writes bf16 weights: the merged model gives the adapter's answer up to that rounding.
    torch.testing.assert_close(merged_logits, on_base, atol=0.05, rtol=0.05)
    # The adapter on the original 16-bit base answers like the model that trained on the 4-bit base, within twice
    # what 4-bit rounding alone moves the base's answer.
    four_bit = train_qlora.load_quantized_model(str(out / "smoke_base_model"), common.Precision(
        False, False, torch.float32, "test"), "cpu", "eager")
    rounding = (logits(four_bit, ids) - logits(base, ids)).abs().max()
    assert (logits(trainer.model.eval(), ids) - on_base).abs().max() < 2 * rounding


@pytest.mark.parametrize("flags, message", [
    (["--init_lora_weights", "pissa"], "--init_lora_weights pissa: it starts from the base weights in 16 bits"),
    (["--init_lora_weights", "loftq"], "--init_lora_weights loftq: it starts from the base weights in 16 bits"),
    (["--init_lora_weights", "kaiming"], "--init_lora_weights 'kaiming' is not one of default, gaussian, olora"),
    (["--init_lora_weights", "olora", "--use_dora"], "cannot convert the trained DoRA adapter"),
])
def test_variants_qlora_cannot_start_are_refused_while_parsing(flags, message, tmp_path):
    with pytest.raises(errors.UserInputError, match=message):
        train_qlora.parse_args(["--smoke", "--output_dir", str(tmp_path), *flags])
