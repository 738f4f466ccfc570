"""The fast path's switchboard (finetuning/fastpath/): --fast_path read as documented, `none` training both scripts to
the loss `all` trains to, and nothing the overrides changed left behind in the process once a run ends."""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import train_galore
import train_qlora
from cli.errors import UserInputError
from fastpath.patches import Patches
from cli.fast_path_flag import FIXES, SPEED, SWITCHES, parse_fast_path
from fastpath.varlen_attention import VARLEN_ATTENTION
from conftest import trainer_losses

# The fused LoRA layer dequantizes the 4-bit weight and multiplies in fp32 where bitsandbytes' CPU path rounds
# otherwise (7e-5 apart at step 1 on the smoke model); four steps of training carry that a little further.
SAME_LOSS = 2e-3  # relative


@pytest.mark.parametrize("text, expected", [
    ("all", set(SWITCHES)),
    ("none", set(FIXES)),
    ("all,-compile_layers,-offload", set(SWITCHES) - {"compile_layers", "offload"}),
    ("-compile_layers", set(SWITCHES) - {"compile_layers"}),
    ("rms_norm, chunked_loss", {"rms_norm", "chunked_loss", *FIXES}),
    ("none,-galore_8bit", set(FIXES) - {"galore_8bit"}),
    ("none,lora_4bit", {"lora_4bit", *FIXES}),
])
def test_fast_path_flag_is_read_left_to_right(text, expected):
    assert parse_fast_path(text) == frozenset(expected)


def test_none_keeps_the_fixes_and_no_speed_override():
    assert not parse_fast_path("none") & set(SPEED)
    assert set(FIXES) <= parse_fast_path("none")


@pytest.mark.parametrize("text", ["fastest", "all,-rms_norms", ""])
def test_an_unknown_switch_is_refused_with_the_list(text, parse):
    with pytest.raises(UserInputError, match="--fast_path") as error:
        parse(train_qlora, ["--fast_path", text])
    assert "compile_layers" in str(error.value)


def test_a_speed_flag_that_the_fast_path_turns_off_is_refused(tmp_path):
    argv = ["--smoke", "--output_dir", tmp_path / "run", "--fast_path", "none", "--compile_layers", "yes"]
    with pytest.raises(UserInputError, match="--compile_layers yes and --fast_path none"):
        train_qlora.main(*train_qlora.parse_args([str(a) for a in argv]))
    assert not (tmp_path / "run").exists(), "refused before anything was written"


def test_patches_put_back_instance_attributes_and_other_changes():
    module = torch.nn.Linear(2, 2)
    undone = []
    patches = Patches()
    patches.set(module, "forward", lambda x: x)
    patches.set(module, "in_features", 7)
    patches.on_restore(lambda: undone.append(True))
    patches.restore()
    assert "forward" not in vars(module) and module.in_features == 2 and undone == [True] and len(patches) == 0


def _run(module, tmp_path, name, fast_path, *flags):
    argv = ["--smoke", "--output_dir", tmp_path / name, "--fast_path", fast_path, "--num_sample_prompts", "0",
            "--report_card_prompts", "0", *flags]
    return module.main(*module.parse_args([str(a) for a in argv]))



# The two classes of Gemma 3 (issue 25): the text one (270m, 1b) and the multimodal one (4b, 12b, 27b), whose tiny
# smoke model --model_name_or_path google/gemma-3-4b-it asks for.
CLASSES = {"text": [], "multimodal": ["--model_name_or_path", "google/gemma-3-4b-it"]}


@pytest.mark.parametrize("model_class", list(CLASSES))
@pytest.mark.parametrize("module", [train_qlora, train_galore], ids=["qlora", "galore"])
def test_none_trains_to_the_loss_all_trains_to(module, model_class, tmp_path):
    # Packed token batches: the variable-length attention is selected too (it runs SDPA on the CPU).
    flags = ["--max_tokens_per_batch", "512", *CLASSES[model_class]]
    fast, stock = _run(module, tmp_path, "all", "all", *flags), _run(module, tmp_path, "none", "none", *flags)
    assert len(trainer_losses(fast)) == len(trainer_losses(stock)) == 4
    for ours, theirs in zip(trainer_losses(fast), trainer_losses(stock)):
        assert ours == pytest.approx(theirs, rel=SAME_LOSS)


@pytest.mark.parametrize("model_class", list(CLASSES))
def test_a_run_leaves_nothing_of_the_fast_path_behind(model_class, tmp_path):
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    dynamo_before = dict(torch._dynamo.config.get_config_copy())
    trainer = _run(train_qlora, tmp_path, "run", "all", "--max_tokens_per_batch", "512", *CLASSES[model_class])
    model = trainer.model
    config = model.get_base_model().config
    assert config._attn_implementation == config.get_text_config()._attn_implementation == "sdpa"
    if model_class == "multimodal":  # the vision tower's attention was never touched
        assert config.vision_config._attn_implementation == "sdpa"
    assert VARLEN_ATTENTION not in AttentionInterface._global_mapping
    patched = [name for name, module in model.named_modules() if {"forward", "train"} & set(vars(module))]
    assert patched == [], patched[:5]
    assert "floating_point_ops" not in vars(model.get_base_model())
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before
    assert dict(torch._dynamo.config.get_config_copy()) == dynamo_before
    assert not any(type(callback).__name__ == "OffloadLayerInputs" for callback in trainer.callback_handler.callbacks)


# bf16 on a GPU: the fused and compiled kernels round otherwise than the stock ones at every step.
SAME_LOSS_BF16 = 2e-2  # relative


@pytest.mark.gpu
@pytest.mark.parametrize("module", [train_qlora, train_galore], ids=["qlora", "galore"])
def test_none_trains_to_the_loss_all_trains_to_on_a_gpu(module, tiny_model_dir, tmp_path):
    def run(fast_path):
        argv = ["--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / fast_path, "--fast_path", fast_path,
                "--max_steps", "6", "--max_train_samples", "256", "--max_seq_length", "256",
                "--max_tokens_per_batch", "1024", "--logging_steps", "1", "--save_strategy", "no",
                "--num_sample_prompts", "0", "--report_card_prompts", "0", "--report_to", "none"]
        if module is train_galore:
            argv += ["--galore_rank", "8"]  # the tiny model is 64 wide
        return trainer_losses(module.main(*module.parse_args([str(a) for a in argv])))

    fast, stock = run("all"), run("none")
    assert len(fast) == len(stock) == 6
    for ours, theirs in zip(fast, stock):
        assert ours == pytest.approx(theirs, rel=SAME_LOSS_BF16)
