"""Tokenizer and model loading, on the session's tiny random Gemma 3."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import common
from cli import errors
from fastpath import galore_8bit
import train_galore
import train_qlora

CPU = common.Precision(False, False, torch.float32, "test")

def test_load_tokenizer_pads_right_with_a_distinct_pad(tiny_model_dir):
    tokenizer = common.load_tokenizer(str(tiny_model_dir))
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token_id == 0 != tokenizer.eos_token_id


def test_load_tokenizer_rejects_pad_equal_to_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(errors.UserInputError, match="padding token"):
        common.load_tokenizer(str(tmp_path))


def test_load_tokenizer_unreachable_hub_id_explains_access():
    with pytest.raises(errors.UserInputError, match="HF_TOKEN") as info:
        common.load_tokenizer("google/no-such-gemma-for-tests")
    assert "google/no-such-gemma-for-tests" in str(info.value)


@pytest.mark.parametrize("where", ["missing", "empty_folder"])
@pytest.mark.parametrize("loader", ["tokenizer", "qlora_model", "galore_model"])
def test_unreadable_local_model_path_is_a_user_error(loader, where, tmp_path):
    path = tmp_path / "no_model_here"
    if where == "empty_folder":
        path.mkdir()
    load = {
        "tokenizer": lambda: common.load_tokenizer(str(path)),
        "qlora_model": lambda: train_qlora.load_quantized_model(str(path), CPU, "cpu", "eager"),
        "galore_model": lambda: train_galore.load_model(str(path), CPU, "cpu", "eager"),
    }[loader]
    with pytest.raises(errors.UserInputError, match="--model_name_or_path") as info:
        load()
    assert str(path) in str(info.value)


def test_quantized_model_has_nf4_linear_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model = train_qlora.load_quantized_model(str(tiny_model_dir), CPU, "cpu", "eager")
    four_bit = {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    projections = {name.rsplit(".", 1)[-1] for name in four_bit}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(four_bit) == 7 * model.config.num_hidden_layers
    weight = next(iter(four_bit.values())).weight
    assert weight.quant_type == "nf4"
    assert weight.quant_state.nested, "double quantization was asked for"
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit), "lm_head is skipped from quantization"
    assert model.config.use_cache is False

    from peft import get_peft_model

    lora = get_peft_model(model, train_qlora.LoraArguments().peft_config())
    wrapped = [name for name, m in lora.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(wrapped) == len(four_bit) and all(name.endswith(".base_layer") for name in wrapped), \
        "LoRA wraps each 4-bit layer"
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def galore_args(**overrides):
    return train_galore.GaloreArguments(**{"galore_rank": 8, **overrides})


TRAINING = SimpleNamespace(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.0)


@pytest.fixture(scope="module")
def galore_model(tiny_model_dir):
    return train_galore.load_model(str(tiny_model_dir), CPU, "cpu", "eager")


def test_build_optimizer_projects_the_attention_and_mlp_weights(galore_model):
    optimizer = train_galore.build_optimizer(galore_model, galore_args(), TRAINING)
    assert isinstance(optimizer, galore_8bit.galore_adamw8bit())
    projected, regular = optimizer.param_groups
    assert projected["rank"] == 8 and projected["proj_type"] == "std"
    layers = galore_model.config.num_hidden_layers
    assert len(projected["params"]) == 7 * layers
    assert all(p.dim() == 2 for p in projected["params"])
    # every trainable weight is in exactly one group
    everything = {id(p) for p in galore_model.parameters() if p.requires_grad}
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == everything
    embedding = galore_model.get_input_embeddings().weight
    assert any(p is embedding for p in regular["params"])


def test_build_optimizer_rejects_a_rank_as_large_as_the_layer(galore_model):
    with pytest.raises(errors.UserInputError, match="--galore_rank 64"):
        train_galore.build_optimizer(galore_model, galore_args(galore_rank=64), TRAINING)


def test_build_optimizer_rejects_targets_matching_nothing(galore_model):
    with pytest.raises(errors.UserInputError, match="--galore_target_modules 'attention'"):
        train_galore.build_optimizer(galore_model, galore_args(galore_target_modules="attention"), TRAINING)



def _prepared_as_sft_trainer_does(model_dir, keep_embeddings: bool):
    """A 4-bit bf16 model through trl 0.8.6 SFTTrainer's own steps on a GPU (peft's k-bit preparation, LoRA, the cast
    back to bf16), with or without override 15. On the CPU SFTTrainer skips them (it takes 4-bit weights on the CPU
    for sharded QLoRA), so the test takes the steps itself, through the name SFTTrainer looks up."""
    from fastpath import kbit_embeddings
    from peft import get_peft_model
    from trl.trainer import sft_trainer

    model = train_qlora.load_quantized_model(str(model_dir), common.Precision(True, False, torch.bfloat16, "test"),
                                             "cpu", "eager")
    embedding = model.get_input_embeddings().weight
    before = embedding.detach()  # keeps the loaded storage alive: a copy cannot land at its address
    with kbit_embeddings.embeddings_stay_16bit(keep_embeddings) as installed:
        model = sft_trainer.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert installed == keep_embeddings
    model = get_peft_model(model, train_qlora.LoraArguments().peft_config())
    sft_trainer.peft_module_casting_to_bf16(model)
    return model, embedding, before


def test_trainer_keeps_the_bf16_embedding_without_a_float32_copy(tiny_model_dir):
    stock, stock_embedding, stock_before = _prepared_as_sft_trainer_does(tiny_model_dir, keep_embeddings=False)
    assert stock_embedding.data_ptr() != stock_before.data_ptr(), "stock: cast to float32 and back, a new tensor"
    kept, embedding, before = _prepared_as_sft_trainer_does(tiny_model_dir, keep_embeddings=True)
    assert embedding.data_ptr() == before.data_ptr(), "the embedding was copied (the float32 round trip)"
    assert kept.get_input_embeddings().weight is embedding and embedding.dtype == torch.bfloat16
    assert kept.get_output_embeddings().weight is embedding, "still tied"
    # The model ends as the stock preparation leaves it: every parameter's and buffer's dtype, the embedding's values,
    # what trains.
    dtypes = lambda m: {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    assert dtypes(kept) == dtypes(stock)
    assert torch.equal(stock_embedding, embedding)
    assert [n for n, p in kept.named_parameters() if p.requires_grad] == \
        [n for n, p in stock.named_parameters() if p.requires_grad]


def test_qlora_builds_its_trainer_inside_override_15_with_the_run_s_bf16(tiny_model_dir, tmp_path, monkeypatch):
    import contextlib

    from records import batching
    from fastpath import kbit_embeddings

    class Built(Exception):
        pass

    entered = []

    @contextlib.contextmanager
    def spy(bf16):
        entered.append(bf16)
        try:
            yield True
        finally:
            entered.append("left")

    def build_trainer(model, loaded, data_args, training_args, *args, **kwargs):
        assert entered == [training_args.bf16], "the trainer is built inside embeddings_stay_16bit(bf16)"
        raise Built

    monkeypatch.setattr(kbit_embeddings, "embeddings_stay_16bit", spy)
    monkeypatch.setattr(batching, "build_trainer", build_trainer)
    with pytest.raises(Built):
        train_qlora.main(*train_qlora.parse_args(["--model_name_or_path", str(tiny_model_dir), "--smoke",
                                                  "--output_dir", str(tmp_path / "out")]))
    assert entered[-1] == "left"
