"""What users of other finetuning tools look for first: data formats, response-only loss, evaluation, export, reports."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common

from records import loading
from training import reports
from cli import arguments, parsing
from records import data
from cli import errors
import train_galore
import train_qlora
from conftest import REPO_ROOT

CHAT = [
    {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]},
    {"messages": [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}]},
]
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Help?"},
                       {"from": "gpt", "value": "Of course."}]},
]


def load(path, **data_flags):
    return data.load_records(arguments.DataArguments(dataset_name=str(path), **data_flags))


def test_chat_records_render_like_the_tokenizers_chat_template(write_data, tiny_tokenizer):
    records = load(write_data("chat.json", CHAT))
    assert records.column_names == ["messages"]
    text = common.format_example(records[0])
    # The system message is folded into the first user turn, as in Gemma's template.
    assert text.startswith("<start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n")
    assert "<start_of_turn>model\nRome.<end_of_turn>\n" in text
    templated = tiny_tokenizer.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert templated == tiny_tokenizer.bos_token + text


def test_sharegpt_records_become_user_and_assistant_turns(write_data):
    records = load(write_data("share.jsonl", "\n".join(json.dumps(r) for r in SHAREGPT)))
    assert records[0]["messages"] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    assert records[1]["messages"][0]["content"] == "Be kind.\n\nHelp?"


def test_plain_text_records_and_renamed_columns(write_data):
    text = load(write_data("text.json", [{"body": "<bos>Once upon a time."}]), text_column="body")
    assert common.format_example(text[0]) == "Once upon a time."  # no second <bos>
    alpaca = load(write_data("qa.csv", "question,answer\nWhy?,Because.\n"),
                  instruction_column="question", output_column="answer")
    assert common.format_example(alpaca[0]).endswith("<start_of_turn>model\nBecause.<end_of_turn>\n")


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "alternate"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "turn 0"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "messages\\[0\\].content"),
    ({"prompt": "x", "reply": "y"}, "--instruction_column"),
])
def test_bad_chat_records_name_the_record_and_turn(write_data, record, message):
    with pytest.raises(errors.UserInputError, match=message):
        load(write_data("bad.json", [record]))


def test_one_bos_and_a_pad_that_is_not_eos(tiny_tokenizer):
    ids = tiny_tokenizer(common.format_example(CHAT[1]))["input_ids"]
    assert ids.count(tiny_tokenizer.bos_token_id) == 1 and ids[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def collator_for(tokenizer, records, **flags):
    return loading.completion_only_collator(tokenizer, arguments.DataArguments(**flags), records)


def test_response_only_loss_masks_prompts_and_keeps_every_answer(write_data, tiny_tokenizer):
    records = load(write_data("chat.json", CHAT))
    collator = collator_for(tiny_tokenizer, records)
    ids = tiny_tokenizer(common.format_example(records[0]))["input_ids"]
    labels = collator([{"input_ids": ids}])["labels"][0]
    learnt = tiny_tokenizer.decode([t for t, l in zip(ids, labels.tolist()) if l != -100])
    assert "Paris." in learnt and "Rome." in learnt
    assert "France" not in learnt and "Italy" not in learnt and "Answer briefly" not in learnt
    # Switched off, every token but padding is learnt.
    assert collator_for(tiny_tokenizer, records, completion_only_loss=False) is None


def test_packing_with_response_only_loss_is_refused(write_data, tiny_tokenizer):
    records = load(write_data("chat.json", CHAT))
    with pytest.raises(errors.UserInputError, match="--completion_only_loss false"):
        collator_for(tiny_tokenizer, records, packing=True)


def test_a_data_set_whose_answers_are_all_cut_off_is_an_error(tmp_path):
    long_prompt = " ".join(["word"] * 400)
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"instruction": long_prompt + f" {i}", "output": "short"} for i in range(4)]))
    with pytest.raises(errors.UserInputError, match="--max_seq_length"):
        train_qlora.main(*train_qlora.parse_args(["--smoke", "--output_dir", str(tmp_path / "out"), "--dataset_name", str(data),
                          "--max_seq_length", "64"]))
    assert not (tmp_path / "out" / "final").exists()


def test_eval_split_metrics_plot_and_samples(tmp_path):
    out = tmp_path / "run"
    trainer = train_galore.main(*train_galore.parse_args(["--smoke", "--output_dir", str(out), "--eval_split_ratio", "0.25",
                                 "--eval_strategy", "steps", "--eval_steps", "2", "--num_sample_prompts", "2"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isclose(metrics["eval_perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-6)
    assert metrics["global_step"] == 4 and "train_loss" in metrics
    assert any("eval_loss" in entry for entry in trainer.state.log_history[:-2])  # evaluated during training
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (out / "samples.md").read_text()
    assert samples.count("**Before:**") == 2 and samples.count("**After:**") == 2
    # Beside each prompt, the answer the shipped data gives for it.
    outputs = {record["output"].strip() for record in json.loads(data.DEFAULT_DATASET_FILE.read_text())}
    references = [part.split("\n```")[0] for part in samples.split("**Reference (the data's answer):**\n\n```\n")[1:]]
    assert len(references) == 2 and all(reference in outputs for reference in references)


def test_merge_writes_a_16_bit_model_that_loads_without_peft(tmp_path):
    out = tmp_path / "run"
    train_qlora.main(*train_qlora.parse_args(["--smoke", "--output_dir", str(out), "--merge", "--num_sample_prompts", "0"]))
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert not any("lora" in name for name in merged)
    assert {w.dtype for w in merged.values()} == {torch.bfloat16}
    # The merged weights carry the adapter's update: they differ from the base.
    base = load_file(str(out / "smoke_base_model" / "model.safetensors"))
    assert any(not torch.equal(merged[name].float(), base[name].to(torch.bfloat16).float())
               for name in merged if "q_proj" in name)
    script = (
        "import sys; sys.modules['peft'] = None\n"  # peft cannot be imported in this process
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out / 'merged')!r})\n"
        "print(type(m).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Gemma3ForCausalLM" in result.stdout


def test_dry_run_loads_no_model_and_reports(tmp_path, caplog, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a dry run must not load model weights")

    monkeypatch.setattr(train_qlora, "load_quantized_model", no_model)
    caplog.set_level("INFO")
    assert train_qlora.main(*train_qlora.parse_args(["--smoke", "--dry_run", "--output_dir", str(tmp_path / "out"),
                             "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "5"])) is None
    report = caplog.text
    assert "⟦" in report and "Effective batch size: 15" in report and "95th percentile" in report
    assert not (tmp_path / "out").exists(), "a dry run writes nothing under --output_dir, not even its tiny model"


def test_tensorboard_is_used_when_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "tensorboard" else real(name))
    assert parsing.default_report_to() == "tensorboard"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    assert parsing.default_report_to() == "none"


@pytest.mark.parametrize("installed", [True, False])
def test_runs_log_to_tensorboard_by_default_when_it_is_installed(installed, tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: (object() if installed else None) if name == "tensorboard" else real(name))
    seen = {}
    monkeypatch.setattr(reports, "dry_run_report", lambda loaded, data_args, training_args:
                        seen.setdefault("report_to", training_args.report_to))
    # A dry run needs no GPU; a smoke run would turn reporting off.
    train_galore.main(*train_galore.parse_args(["--dry_run", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path)]))
    assert ("tensorboard" in seen["report_to"]) is installed
