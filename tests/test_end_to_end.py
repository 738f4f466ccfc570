"""Whole --smoke runs of both scripts on the CPU: train, save, reload."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import train_galore
import train_qlora
import overrides

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def smoke(module, tmp_path_factory, name, *argv):
    output_dir = tmp_path_factory.mktemp(name)
    trainer = module.main(*module.parse_args(["--smoke", "--output_dir", str(output_dir), *argv]))
    return trainer, output_dir


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    return smoke(train_qlora, tmp_path_factory, "qlora")


@pytest.fixture(scope="module")
def galore_run(tmp_path_factory):
    return smoke(train_galore, tmp_path_factory, "galore")


def assert_one_bos_per_example(trainer):
    bos = trainer.tokenizer.bos_token_id
    for example in trainer.train_dataset.select(range(min(8, len(trainer.train_dataset)))):
        ids = example["input_ids"]
        assert ids[0] == bos and ids.count(bos) == 1


# --- QLoRA --------------------------------------------------------------------


def test_qlora_saves_adapter_and_tokenizer(qlora_run):
    _, out = qlora_run
    for name in ("adapter_model.safetensors", "adapter_config.json", *TOKENIZER_FILES):
        assert (out / "final" / name).is_file(), name
    assert not (out / "final" / "model.safetensors").exists(), "only the adapter is saved, not the base model"


def test_qlora_trains_the_requested_steps_with_finite_loss(qlora_run):
    trainer, _ = qlora_run
    assert trainer.state.global_step == 4
    logged = losses(trainer)
    assert len(logged) == 4 and all(math.isfinite(loss) for loss in logged)
    assert_one_bos_per_example(trainer)


def test_qlora_adapter_learned_on_every_projection(qlora_run):
    _, out = qlora_run
    weights = load_file(str(out / "final" / "adapter_model.safetensors"))
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert {name.split(".lora_B")[0].rsplit(".", 1)[-1] for name in lora_b} == PROJECTIONS
    # peft initialises lora_B to zero: any non-zero value was learned
    assert all(w.abs().max() > 0 for w in lora_b.values()), [n for n, w in lora_b.items() if not w.any()]


def test_qlora_base_is_4bit_and_only_lora_trains(qlora_run):
    import bitsandbytes as bnb

    trainer, _ = qlora_run
    four_bit = [name for name, m in trainer.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert {name.replace(".base_layer", "").rsplit(".", 1)[-1] for name in four_bit} == PROJECTIONS
    assert all(name.endswith(".base_layer") for name in four_bit), "LoRA wraps each 4-bit layer"
    trainable = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_qlora_adapter_reloads(qlora_run):
    from peft import AutoPeftModelForCausalLM

    trainer, out = qlora_run
    model = AutoPeftModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32)
    saved = load_file(str(out / "final" / "adapter_model.safetensors"))
    name, value = next((n, w) for n, w in saved.items() if "lora_B" in n)
    loaded = dict(model.named_parameters())[name.replace(".weight", ".default.weight")]
    torch.testing.assert_close(loaded, value)
    ids = trainer.tokenizer("<start_of_turn>user\nHi<end_of_turn>\n", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_qlora_on_real_alpaca_data(alpaca_path, tmp_path):
    trainer = train_qlora.main(*train_qlora.parse_args(["--smoke", "--output_dir", str(tmp_path), "--dataset_name", str(alpaca_path),
                                "--max_train_samples", "32"]))
    assert len(trainer.train_dataset) == 32
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    logged = losses(trainer)
    assert len(logged) == 4 and all(math.isfinite(loss) for loss in logged)
    assert_one_bos_per_example(trainer)


def test_qlora_loss_falls_on_a_fixed_batch(tmp_path):
    trainer = train_qlora.main(*train_qlora.parse_args([
        "--smoke", "--output_dir", str(tmp_path), "--max_steps", "30", "--learning_rate", "1e-2",
        "--max_train_samples", "8", "--per_device_train_batch_size", "8", "--lr_scheduler_type", "constant",
        "--warmup_ratio", "0", "--lora_dropout", "0",
    ]))
    assert trainer.state.global_step == 30, "the user's --max_steps must survive --smoke"
    assert trainer.args.per_device_train_batch_size == 8
    logged = losses(trainer)
    assert len(logged) == 30
    first, last = sum(logged[:3]) / 3, sum(logged[-3:]) / 3
    assert last < first - 0.3, f"loss went {first:.3f} -> {last:.3f} overfitting one batch"


# --- GaLore -------------------------------------------------------------------


def test_galore_saves_model_and_tokenizer(galore_run):
    _, out = galore_run
    for name in ("model.safetensors", "config.json", *TOKENIZER_FILES):
        assert (out / "final" / name).is_file(), name


def test_galore_trains_with_the_fixed_optimizer(galore_run):
    trainer, _ = galore_run
    assert trainer.state.global_step == 4
    logged = losses(trainer)
    assert len(logged) == 4 and all(math.isfinite(loss) for loss in logged)
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, overrides.galore_adamw8bit())
    assert optimizer.param_groups[0]["rank"] == 8, "--smoke lowers the rank to fit the 64-wide layers"
    assert_one_bos_per_example(trainer)


def test_galore_changed_every_weight(galore_run):
    _, out = galore_run
    before = load_file(str(out / "smoke_base_model" / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert set(before) == set(after)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    projected = [name for name in before if name.rsplit(".", 2)[-2] in PROJECTIONS]
    assert projected and not set(projected) & set(unchanged), f"projected weights that did not move: {unchanged}"
    embedding = next(name for name in before if "embed_tokens" in name)
    assert embedding not in unchanged


def test_galore_model_reloads(galore_run):
    from transformers import AutoModelForCausalLM

    trainer, out = galore_run
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"), dtype=torch.float32)
    saved = load_file(str(out / "final" / "model.safetensors"))
    name = next(n for n in saved if n.endswith("q_proj.weight"))
    torch.testing.assert_close(dict(model.named_parameters())[name], saved[name])
    ids = trainer.tokenizer("<start_of_turn>user\nHi<end_of_turn>\n", return_tensors="pt")
    assert torch.isfinite(model(**ids).logits).all()
