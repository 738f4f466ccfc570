"""The report card (training/report_card.py): every smoke run writes one, base against trained, scored with the pinned
sacrebleu; batched answers (left padding) are the answers one prompt at a time gives; the scores count what they say."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import datasets
import pytest
import torch
from sacrebleu.metrics import CHRF
from transformers import AutoModelForCausalLM

from cli.arguments import ReportArguments
from records.run_data import RunData
from training import report_card


def test_every_smoke_run_writes_a_report_card_base_against_trained(finished_runs):
    for script, run in finished_runs.items():
        card = json.loads((run.output_dir / "report_card.json").read_text())
        assert [row["model"] for row in card["rows"]] == ["base", "trained"], script
        assert card["prompts"] == 8 and card["max_new_tokens"] == 16  # --smoke's own sizes
        assert card["metric"].startswith("chrF (sacrebleu 2.6.0, nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
        references = [item["reference"] for item in card["items"]]
        for row in card["rows"]:
            answers = [item["answers"][row["model"]]["text"] for item in card["items"]]
            assert row["chrf"] == pytest.approx(CHRF().corpus_score(answers, [references]).score)
            assert 0 <= row["stop_rate"] <= 1 and 0 <= row["repetition"] <= 1 and row["mean_tokens"] <= 16
        text = (run.output_dir / "report_card.md").read_text()
        assert "| model | stops (`<end_of_turn>`) | exact match | chrF |" in text and "| trained |" in text
        assert "## The 5 worst trained answers (lowest chrF)" in text
        assert "the run has no eval records, so these were trained on" in text
    # GaLore changes the weights in place: its base answered before training; QLoRA's with the adapter disabled.
    assert b"the base model answered 8 prompts" in finished_runs["galore"].output
    assert b"the base model answered" not in finished_runs["qlora"].output


def test_batched_answers_with_left_padding_are_the_one_by_one_answers(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tiny_tokenizer = copy.deepcopy(tiny_tokenizer)
    tiny_tokenizer.padding_side = "right"  # as common.load_tokenizer sets it for training
    prompts = ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
               "<start_of_turn>user\nName three colours of the rainbow, please.<end_of_turn>\n<start_of_turn>model\n",
               "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n"]
    batched, _, batch = report_card.answer(model, tiny_tokenizer, prompts, 12)
    alone = [report_card.answer(model, tiny_tokenizer, [prompt], 12)[0][0] for prompt in prompts]
    assert batched == alone and batch == 3  # one CPU batch: all three prompts
    assert tiny_tokenizer.padding_side == "right", "the training tokenizer's padding is put back"


def test_the_eval_records_are_the_prompts_where_there_are_any():
    train = datasets.Dataset.from_list([{"instruction": f"t{i}", "input": "", "output": "x"} for i in range(5)])
    evaluation = datasets.Dataset.from_list([{"instruction": f"e{i}", "input": "", "output": "y"} for i in range(3)])
    args = ReportArguments(report_card_prompts=2)
    records, source = report_card.card_records(RunData(train, evaluation, None, None, "", []), args)
    assert [r["instruction"] for r in records] == ["e0", "e1"] and "held out" in source
    records, source = report_card.card_records(RunData(train, None, None, None, "", []), args)
    assert [r["instruction"] for r in records] == ["t0", "t1"] and "trained on" in source


def answer(text, stopped=True, repetition=0.0):
    return {"text": text, "tokens": len(text.split()), "stopped_at": "<end_of_turn>" if stopped else None,
            "repetition": repetition}


def test_the_scores_count_stops_exact_matches_json_and_repetition():
    items = [
        {"reference": '{"a": 1}', "answers": {"trained": answer('{"a":  1}')}},
        {"reference": '{"b": 2}', "answers": {"trained": answer('```json\n{"b": 2}\n```')}},
        {"reference": '{"c": 3}', "answers": {"trained": answer("not json at all", stopped=False, repetition=0.5)}},
        {"reference": '[1, 2]', "answers": {"trained": answer('[1, 2]')}},
    ]
    row = report_card.score(items, "trained")
    assert row["stop_rate"] == 0.75
    assert row["exact_match"] == 0.5  # '{"a":  1}' (runs of spaces collapsed) and '[1, 2]'; a fenced answer is not
    assert row["json_parses"] == 0.75  # a ``` fence is allowed
    assert row["repetition"] == pytest.approx(0.125)
    assert "json_parses" not in report_card.score([{"reference": "plain", "answers": {"trained": answer("x")}}],
                                                  "trained")
    assert report_card.repetition([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(5 / 9)  # 4 of 9 new
    assert report_card.repetition([1, 2, 3]) == 0.0


def test_gguf_rows_are_added_on_the_same_prompts(tmp_path):
    items = [{"prompt": f"p{i}", "reference": "yes it is", "reference_tokens": 3, "reference_repetition": 0.0,
              "answers": {"base": answer("no"), "trained": answer("yes it is")}} for i in range(4)]
    card = {"source": "the eval records", "chat": True, "prompts": 4, "max_new_tokens": 8, "metric": "chrF",
            "items": items, "rows": [dict(model=m, seconds=1.0, **report_card.score(items, m))
                                     for m in ("base", "trained")],
            "reference": report_card.reference_row(items), "seconds": 2.0}
    report_card.save(tmp_path, card)
    gguf = [answer("yes it is"), answer("yes it is", stopped=False)]
    report_card.add_exported(tmp_path, report_card.load(tmp_path), {"model-q8_0.gguf": {"answers": gguf, "seconds": 0.5}})

    saved = report_card.load(tmp_path)
    assert [row["model"] for row in saved["export"]["rows"]] == ["base", "trained", "model-q8_0.gguf"]
    assert saved["export"]["prompts"] == 2
    assert saved["export"]["rows"][2]["stop_rate"] == 0.5 and saved["export"]["rows"][1]["stop_rate"] == 1.0
    assert len(saved["items"]) == 4 and [r["model"] for r in saved["rows"]] == ["base", "trained"]
    assert "## The whole chain: base, trained, exported" in (tmp_path / "report_card.md").read_text()


def test_a_zero_prompt_card_is_no_card():
    trainer = SimpleNamespace(args=SimpleNamespace(should_save=True), model=None)
    assert report_card.write(trainer, None, ReportArguments(report_card_prompts=0)) is None
    assert report_card.answer_base(trainer, None, ReportArguments(report_card_prompts=0)) is None
