"""Whole --smoke runs of both scripts on the CPU: train, save, reload. Most tests read the session's finished runs
(conftest.finished_runs); the others train with settings of their own."""
from __future__ import annotations

import math

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import train_qlora
from conftest import trainer_losses

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")



def assert_one_bos_per_example(trainer):
    bos = trainer.tokenizer.bos_token_id
    for example in trainer.train_dataset.select(range(min(8, len(trainer.train_dataset)))):
        ids = example["input_ids"]
        assert ids[0] == bos and ids.count(bos) == 1


def hello_ids(final):
    return AutoTokenizer.from_pretrained(final)("<start_of_turn>user\nHi<end_of_turn>\n", return_tensors="pt")


# --- both ---------------------------------------------------------------------


def test_both_train_the_requested_steps_with_finite_loss_and_pass_the_smoke_check(finished_runs):
    for run in finished_runs.values():
        assert run.state()["global_step"] == 4
        assert len(run.losses()) == 4 and all(math.isfinite(loss) for loss in run.losses())
        assert b"Smoke run passed" in run.output


def test_start_up_prints_no_library_noise(finished_runs):
    from cli import noise

    for run in finished_runs.values():
        text = run.output.decode(errors="replace")
        for message in ["Failed to load CPU gemm_4bit_forward", "`tokenizer` is deprecated",
                        "The tokenizer has new PAD/BOS/EOS tokens", "mtime may not be reliable"]:
            assert message not in text, message
        assert "Traceback" not in text
    assert len(noise.LOGGED) + len(noise.WARNED) == 4, "a silenced message without a check here"


# --- QLoRA --------------------------------------------------------------------


def test_qlora_saves_adapter_and_tokenizer(finished_runs):
    out = finished_runs["qlora"].output_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", *TOKENIZER_FILES):
        assert (out / "final" / name).is_file(), name
    assert not (out / "final" / "model.safetensors").exists(), "only the adapter is saved, not the base model"


def test_qlora_adapter_learned_on_every_projection_and_nothing_else(finished_runs):
    weights = load_file(str(finished_runs["qlora"].output_dir / "final" / "adapter_model.safetensors"))
    assert weights and all("lora_" in name for name in weights), "only the adapters train"
    lora_b = {name: w for name, w in weights.items() if "lora_B" in name}
    assert {name.split(".lora_B")[0].rsplit(".", 1)[-1] for name in lora_b} == PROJECTIONS
    # peft initialises lora_B to zero: any non-zero value was learned
    assert all(w.abs().max() > 0 for w in lora_b.values()), [n for n, w in lora_b.items() if not w.any()]
    assert b"NF4 4-bit" in finished_runs["qlora"].output and b"14 layers on the fused 4-bit path" in finished_runs["qlora"].output


def test_qlora_adapter_reloads(finished_runs):
    from peft import AutoPeftModelForCausalLM

    final = finished_runs["qlora"].output_dir / "final"
    model = AutoPeftModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    saved = load_file(str(final / "adapter_model.safetensors"))
    name, value = next((n, w) for n, w in saved.items() if "lora_B" in n)
    loaded = dict(model.named_parameters())[name.replace(".weight", ".default.weight")]
    torch.testing.assert_close(loaded, value)
    logits = model(**hello_ids(final)).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_qlora_on_real_alpaca_data(alpaca_path, tmp_path):
    trainer = train_qlora.main(*train_qlora.parse_args(["--smoke", "--output_dir", str(tmp_path), "--dataset_name", str(alpaca_path),
                                "--max_train_samples", "32"]))
    assert len(trainer.train_dataset) == 32
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    logged = trainer_losses(trainer)
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
    logged = trainer_losses(trainer)
    assert len(logged) == 30
    first, last = sum(logged[:3]) / 3, sum(logged[-3:]) / 3
    assert last < first - 0.3, f"loss went {first:.3f} -> {last:.3f} overfitting one batch"


# --- GaLore -------------------------------------------------------------------


def test_galore_saves_model_and_tokenizer(finished_runs):
    out = finished_runs["galore"].output_dir
    for name in ("model.safetensors", "config.json", *TOKENIZER_FILES):
        assert (out / "final" / name).is_file(), name


def test_galore_trains_with_the_fixed_optimizer(finished_runs):
    output = finished_runs["galore"].output
    assert b"optimizer: GaLoreAdamW8bitFixed" in output
    assert b"rank=8," in output, "--smoke lowers the rank to fit the 64-wide layers"


def test_galore_changed_every_weight(finished_runs):
    out = finished_runs["galore"].output_dir
    before = load_file(str(out / "smoke_base_model" / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert set(before) == set(after)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    projected = [name for name in before if name.rsplit(".", 2)[-2] in PROJECTIONS]
    assert projected and not set(projected) & set(unchanged), f"projected weights that did not move: {unchanged}"
    embedding = next(name for name in before if "embed_tokens" in name)
    assert embedding not in unchanged


def test_galore_model_reloads(finished_runs):
    from transformers import AutoModelForCausalLM

    final = finished_runs["galore"].output_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    saved = load_file(str(final / "model.safetensors"))
    name = next(n for n in saved if n.endswith("q_proj.weight"))
    torch.testing.assert_close(dict(model.named_parameters())[name], saved[name])
    assert torch.isfinite(model(**hello_ids(final)).logits).all()
