"""The data doctor (records/data_doctor.py): planted duplicates, a planted train/eval overlap and a planted masked or
cut <end_of_turn> are found, the --drop_* flags drop them, the report is written where the run writes (a dry run: a
temporary folder), and 5,000 Alpaca records take well under 30 s on the CPU."""
from __future__ import annotations

import copy
import dataclasses
import logging
import time

from cli.arguments import DataArguments
from records import data, data_doctor, loading
import train_qlora

LONG_ANSWER = ("Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
               "glucose and oxygen. It happens in the chloroplasts, where chlorophyll absorbs light energy.")


def planted_records() -> list[dict]:
    return [
        {"instruction": "Explain photosynthesis.", "input": "", "output": LONG_ANSWER},               # 0
        {"instruction": "Name a prime number.", "input": "", "output": "Seven is a prime number."},   # 1
        {"instruction": "Explain photosynthesis.", "input": "", "output": LONG_ANSWER},               # 2: = 0
        {"instruction": "explain  PHOTOSYNTHESIS", "input": "", "output": LONG_ANSWER + "!"},         # 3: = 0, normalised
        {"instruction": "Explain photosynthesis briefly.", "input": "",
         "output": LONG_ANSWER.replace("green plants", "plants")},                                    # 4: ~ 0
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},           # 5
        {"instruction": "Translate 'cat' to German.", "input": "", "output": "Katze."},               # 6
    ]


def eval_records_planted() -> list[dict]:
    return [
        {"instruction": "Name a prime number.", "input": "", "output": "Seven is a prime number."},    # = train 1
        {"instruction": "What is the capital of France?", "input": "", "output": "Paris"},            # = train 5
        {"instruction": "Explain photosynthesis in plants.", "input": "",
         "output": LONG_ANSWER.replace("glucose", "sugar")},                                          # ~ train 0
        {"instruction": "Write a haiku about rain.", "input": "", "output": "Soft rain on the roof."},  # new
    ]


def examine(write_data, tokenizer, records, eval_records=None, **flags):
    data_args = DataArguments(dataset_name=str(write_data("train.json", records)), **flags)
    train = data.load_records(data_args)
    evaluation = None
    if eval_records is not None:
        evaluation = data.load_records(dataclasses.replace(data_args, dataset_name=str(write_data("eval.json", eval_records))))
    collator = loading.completion_only_collator(tokenizer, data_args, train)
    return data_doctor.examine(train, evaluation, tokenizer, collator, data_args, "planted")


def test_planted_duplicates_and_overlap_are_found(write_data, tiny_tokenizer):
    _, _, report = examine(write_data, tiny_tokenizer, planted_records(), eval_records_planted())

    assert report.exact_duplicates == [(2, 0), (3, 0)]
    assert [(a, b) for a, b, _ in report.near_duplicates] == [(4, 0)]
    assert 0.8 <= report.near_duplicates[0][2] < 1
    assert report.eval_exact_overlap == [(0, 1), (1, 5)]
    assert [(a, b) for a, b, _ in report.eval_near_overlap] == [(2, 0)]
    assert report.dropped_duplicates == report.dropped_eval == 0
    assert 0 < report.trained_share < 1
    assert report.end_of_turn_labelled == report.end_of_turn_checked == 7 and not report.end_of_turn_masked


def test_the_drop_flags_drop_duplicates_and_overlapping_eval_records(write_data, tiny_tokenizer):
    train, evaluation, report = examine(write_data, tiny_tokenizer, planted_records(), eval_records_planted(),
                                        drop_duplicates=True, drop_eval_overlap=True)

    assert len(train) == 4 and report.dropped_duplicates == 3
    assert [r["instruction"] for r in evaluation] == ["Write a haiku about rain."] and report.dropped_eval == 3
    assert len(report.lengths) == 4  # the token checks cover the records kept


def test_a_masked_end_of_turn_is_found_with_the_real_collator(write_data, tiny_tokenizer):
    # The bug behind a model that never stops: the pad token is <end_of_turn>, and the collator masks every pad.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = "<end_of_turn>"
    _, _, report = examine(write_data, tokenizer, planted_records()[:2])

    assert report.end_of_turn_masked == [0, 1] and report.end_of_turn_labelled == 0
    assert "masked out of the loss | 2 |" in data_doctor.markdown(report, plotted=False)


def test_an_answer_cut_by_max_seq_length_loses_its_end_of_turn(write_data, tiny_tokenizer):
    records = planted_records()[:2] + [{"instruction": "Tell a long story.", "input": "", "output": "word " * 400}]
    _, _, report = examine(write_data, tiny_tokenizer, records, max_seq_length=128)

    assert report.end_of_turn_cut == [2] and [i for i, _ in report.answers_cut] == [2]
    assert report.end_of_turn_labelled == 2


def test_answers_with_no_word_are_counted(write_data, tiny_tokenizer):
    records = planted_records()[:2] + [{"instruction": "Say nothing.", "input": "", "output": "..."}]
    _, _, report = examine(write_data, tiny_tokenizer, records)
    assert report.empty_answers == [2]


def test_a_dry_run_logs_the_doctor_and_writes_its_report_outside_the_output_dir(write_data, tmp_path, caplog):
    train = write_data("train.json", planted_records())
    evaluation = write_data("eval.json", eval_records_planted())
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        train_qlora.main(*train_qlora.parse_args(["--smoke", "--dry_run", "--dataset_name", train, "--eval_file",
                                                  evaluation, "--output_dir", out]))
    assert not out.exists(), "a dry run writes nothing under --output_dir"
    assert "duplicates: 2 (28.6%) exact, 1 (14.3%) near" in caplog.text
    assert "3 eval records are also in the training data" in caplog.text and "--drop_eval_overlap" in caplog.text
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Data report: ")]
    report = line.removeprefix("Data report: ")
    text = open(report, encoding="utf-8").read()
    assert "| exact duplicates (case, punctuation and spacing ignored) | 2 (28.6%) |" in text
    assert "eval record 0 = training record 1" in text
    assert (tmp_path / "out").exists() is False
    assert report.endswith("data_report.md") and open(report.replace(".md", "_lengths.png"), "rb").read(4) == b"\x89PNG"


def test_a_finished_run_has_its_data_report(finished_runs):
    for run in finished_runs.values():
        text = (run.output_dir / "data_report.md").read_text()
        assert "| final `<end_of_turn>` learnt (the model learns to stop) | 64 of 64 |" in text
        assert (run.output_dir / "data_report_lengths.png").is_file()
        assert b"Data doctor (64 training records" in run.output


def test_five_thousand_alpaca_records_take_under_30_seconds(alpaca_path, tiny_tokenizer):
    data_args = DataArguments(dataset_name=str(alpaca_path), eval_split_ratio=0.05)
    train, evaluation = data.load_train_and_eval(data_args, seed=0)
    collator = loading.completion_only_collator(tiny_tokenizer, data_args, train)
    started = time.perf_counter()
    _, _, report = data_doctor.examine(train, evaluation, tiny_tokenizer, collator, data_args, "alpaca")
    seconds = time.perf_counter() - started
    print(f"data doctor, {len(train)} + {len(evaluation)} Alpaca records: {seconds:.1f} s; "
          f"{len(report.exact_duplicates)} exact and {len(report.near_duplicates)} near duplicates")
    assert report.records + report.eval_records == 4998  # 2 blank records are skipped when read
    assert seconds < 30
