"""The report card's time and batches (training/report_card.py): the card's seconds count a base answered after
training once; a GPU batch is sized from the free memory (no GPU here: the numbers are passed in, or torch.cuda's
memory calls stand in), and halves on running out of it."""
from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import datasets
import pytest
import torch

from cli.arguments import ReportArguments
from models.shapes import gemma3_config, gemma3_shape
from records.run_data import RunData
from training import report_card

GiB = 1024 ** 3
BASE_SECONDS, TRAINED_SECONDS = 100.0, 50.0


class Clock:
    """time.perf_counter's stand-in: moves only when a fake model answers."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class AdapterModel:
    """Like a QLoRA peft model: its base answers with the adapter disabled, after training."""

    peft_config = {"default": SimpleNamespace(init_lora_weights=True)}
    disabled = False

    @contextlib.contextmanager
    def disable_adapter(self):
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = False


def fake_answers(prompts):
    return [{"text": "yes", "tokens": 1, "stopped_at": report_card.END_OF_TURN, "repetition": 0.0} for _ in prompts]


def card_of(tmp_path, monkeypatch, model, base=None) -> dict:
    clock = Clock()

    def answer(model, tokenizer, prompts, max_new_tokens):
        seconds = BASE_SECONDS if getattr(model, "disabled", False) else TRAINED_SECONDS
        clock.now += seconds
        return fake_answers(prompts), seconds, len(prompts)

    monkeypatch.setattr(report_card, "answer", answer)
    monkeypatch.setattr(report_card, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    records = datasets.Dataset.from_list([{"instruction": f"q{i}", "input": "", "output": "yes"} for i in range(3)])
    tokenizer = lambda text, add_special_tokens=True: {"input_ids": text.split()}  # noqa: E731
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(should_save=True, output_dir=str(tmp_path)))
    report_card.write(trainer, RunData(records, None, tokenizer, None, "", []), ReportArguments(report_card_prompts=3),
                      base)
    return json.loads((tmp_path / "report_card.json").read_text())


def test_a_base_answered_after_training_is_counted_once(tmp_path, monkeypatch):
    card = card_of(tmp_path, monkeypatch, AdapterModel())  # QLoRA: the base answers inside write()
    assert {row["model"]: row["seconds"] for row in card["rows"]} == {"base": BASE_SECONDS, "trained": TRAINED_SECONDS}
    assert card["seconds"] == BASE_SECONDS + TRAINED_SECONDS  # was 250: the base's 100 s counted twice


def test_a_base_answered_before_training_is_added(tmp_path, monkeypatch):
    base = {"answers": fake_answers(range(3)), "seconds": BASE_SECONDS, "batch": 3}  # GaLore: answer_base's
    card = card_of(tmp_path, monkeypatch, SimpleNamespace(), base)
    assert [row["model"] for row in card["rows"]] == ["base", "trained"]
    assert card["seconds"] == BASE_SECONDS + TRAINED_SECONDS


def test_a_gpu_batch_is_what_half_the_free_memory_holds():
    """A row: its KV cache, one layer's activations over its prompt, its last-token logits."""
    one_b, four_b = gemma3_shape("1b"), gemma3_shape("4b")
    # 1b, 300-token prompts, 256 new tokens, bf16: about 34 MB a row. 15 GiB free holds all 200 prompts at once.
    assert 200 <= report_card.cuda_batch(15 * GiB, one_b, 2, 300, 256) < report_card.BATCH_CUDA_CAP
    # 1b on a T4 after training, 1,024-token prompts: about 90 MB a row, so 12 GiB free holds 71, not 256.
    assert report_card.cuda_batch(12 * GiB, one_b, 2, 1024, 256) == 71
    # 4b: about 106 MB a row: 2 GiB free holds ten.
    assert report_card.cuda_batch(2 * GiB, four_b, 2, 300, 256) == 10
    assert report_card.cuda_batch(8 * GiB, four_b, 2, 1200, 256) < report_card.cuda_batch(8 * GiB, four_b, 2, 300, 256)
    assert report_card.cuda_batch(8 * GiB, four_b, 4, 300, 256) < report_card.cuda_batch(8 * GiB, four_b, 2, 300, 256)
    assert report_card.cuda_batch(0, gemma3_shape("27b"), 2, 300, 256) == 1  # never below one
    assert report_card.cuda_batch(100 * GiB, one_b, 2, 300, 256, cap=32) == 32


def test_the_batch_is_read_from_the_model_config_and_the_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (GiB, 80 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * GiB)  # the allocator's cache, 1 GiB
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GiB)  # of it unused: free to it
    card = SimpleNamespace(total_memory=80 * GiB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: card)
    cuda = torch.device("cuda", 0)

    def model(size, embeddings=torch.bfloat16):  # model.dtype: a float32 vision weight, as peft's casting leaves it
        weight = SimpleNamespace(dtype=embeddings)
        return SimpleNamespace(device=cuda, config=gemma3_config(size), dtype=torch.float32,
                               get_input_embeddings=lambda: SimpleNamespace(weight=weight))

    for size in ("1b", "4b"):  # 4b's config is multimodal: its shapes are under text_config
        expected = report_card.cuda_batch(2 * GiB, gemma3_shape(size), 2, 300, 256)
        assert report_card.batch_size(model(size), 300, 256) == expected, size
    assert report_card.batch_size(model("1b", torch.float32), 300, 256) == \
        report_card.cuda_batch(2 * GiB, gemma3_shape("1b"), 4, 300, 256)  # fp16 runs keep float32 embeddings
    card.total_memory = 3 * GiB  # a card that says it is smaller than the device (bench/emulate_t4.py): 1 GiB free
    assert report_card.batch_size(model("1b"), 300, 256) == report_card.cuda_batch(GiB, gemma3_shape("1b"), 2, 300, 256)
    assert report_card.batch_size(SimpleNamespace(device=cuda, config=SimpleNamespace(), dtype=torch.bfloat16),
                                  300, 256) == report_card.BATCH_CUDA_UNKNOWN  # not a Gemma-like config
    cpu = SimpleNamespace(device=torch.device("cpu"), config=gemma3_config("1b"), dtype=torch.float32)
    assert report_card.batch_size(cpu, 300, 256) == report_card.BATCH_CPU


class FakeTokenizer:
    eos_token, eos_token_id, pad_token_id, padding_side = "<eos>", 1, 0, "right"

    def convert_tokens_to_ids(self, token):
        return 106

    def __call__(self, texts, **kwargs):
        return {"input_ids": [text.split() for text in texts]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class FakeModel:
    device, training = torch.device("cpu"), False

    def eval(self):
        pass

    def train(self, mode=True):
        pass


def test_out_of_gpu_memory_halves_the_batch(monkeypatch, caplog):
    batches = []

    def generate(model, tokenizer, prompts, max_new_tokens, stop_ids):
        batches.append(len(prompts))
        if len(prompts) > 5:
            raise torch.cuda.OutOfMemoryError("fake")
        return [[7, 106] for _ in prompts]

    monkeypatch.setattr(report_card, "generate", generate)
    monkeypatch.setattr(report_card, "batch_size", lambda model, longest, max_new_tokens: 16)
    with caplog.at_level("INFO", logger=report_card.logger.name):
        answers, _, batch = report_card.answer(FakeModel(), FakeTokenizer(), [f"p {i}" for i in range(12)], 4)
    assert batches == [12, 8, 4, 4, 4] and batch == 4  # 16 (all 12) -> 8 -> 4, then the rest in fours
    assert all(a == {"text": "7", "tokens": 1, "stopped_at": "<end_of_turn>", "repetition": 0.0} for a in answers)
    assert "out of GPU memory, 4 prompts a batch from here on" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):
        monkeypatch.setattr(report_card, "batch_size", lambda model, longest, max_new_tokens: 1)
        monkeypatch.setattr(report_card, "generate", lambda *args: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
        report_card.answer(FakeModel(), FakeTokenizer(), ["p"], 4)
