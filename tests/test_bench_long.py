"""The bench's long-context rows (issue 27, requirement 4): long records joined from Alpaca ones, the setups that
train on them, the search for the longest sequence one step trains under T4 emulation, and Unsloth's child at a
--max_seq_length other than 1,024 and under the emulation."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import common
import long_context
import run_bench
import setups as bench_setups
import unsloth_run
from records import data

FIELDS = (common.INSTRUCTION_FIELD, common.INPUT_FIELD, common.OUTPUT_FIELD)


@pytest.fixture(scope="module")
def alpaca_records() -> list[dict]:
    return json.loads(data.DEFAULT_DATASET_FILE.read_text(encoding="utf-8"))  # 200 Alpaca-style records


def _counted(records, count) -> list[int]:
    return count([common.format_record(record) for record in records])


def _assert_long_records(long, count, max_tokens):
    assert long
    for record in long:
        assert set(record) == set(FIELDS) and all(isinstance(record[f], str) and record[f].strip() for f in FIELDS)
    lengths = _counted(long, count)
    assert max(lengths) <= max_tokens  # a record past --max_seq_length would be cut
    assert min(lengths) >= 0.8 * max_tokens, lengths  # each fills its row


def test_long_records_fill_the_target_by_the_estimate(alpaca_records):
    long = long_context.long_records(alpaca_records, 1024)
    _assert_long_records(long, long_context.estimate_tokens, 1024)
    assert len(long) >= 10  # 200 records of ~77 tokens: all but the unclosed last group used


def test_long_records_of_hundreds_of_tiny_tasks_stay_under_the_target():
    # Each task is sized as "Task 10."; three-digit numbers are longer, so the whole record must be counted too.
    tiny = [{"instruction": "Say yes.", "input": "", "output": "Yes."} for _ in range(2000)]
    long = long_context.long_records(tiny, 2000)
    _assert_long_records(long, long_context.estimate_tokens, 2000)
    assert "Task 150. Say yes." in long[0]["input"]


def test_long_records_fill_the_target_by_a_tokenizer(alpaca_records, tmp_path):
    from models import smoke

    smoke.train_tokenizer([common.format_record(r) for r in alpaca_records], 1024, tmp_path).save_pretrained(tmp_path)
    count = long_context.token_counter(tmp_path)  # as long_file counts with the model folder's tokenizer
    long = long_context.long_records(alpaca_records, 1500, count)
    _assert_long_records(long, count, 1500)
    assert count(["x"]) == [2]  # <bos> counted, as the scripts count a record


def test_each_record_is_used_once_in_order_and_one_past_the_target_is_left_out():
    records = [{"instruction": f"Question q{i}q about " + "words " * (5 + 7 * (i % 5)),
                "input": f"context c{i}c" if i % 3 else "", "output": f"reply r{i}r " + "more " * (i % 4)}
               for i in range(120)]
    records[40]["output"] += "long " * 1000  # alone past the target
    long = long_context.long_records(records, 400)
    questions = [int(n) for record in long for n in re.findall(r"q(\d+)q", record["input"])]
    answers = [int(n) for record in long for n in re.findall(r"r(\d+)r", record["output"])]
    assert questions == answers == sorted(set(questions))
    assert 40 not in questions and questions[0] == 0 and len(questions) >= 100
    for record in long:
        tasks = len(re.findall(r"q\d+q", record["input"]))
        assert f"the following {tasks} tasks" in record["instruction"]
        assert re.findall(r"^Task (\d+)\. ", record["input"], re.M) == [str(n) for n in range(1, tasks + 1)]
        assert re.findall(r"^Answer (\d+)\. ", record["output"], re.M) == [str(n) for n in range(1, tasks + 1)]
        for i in re.findall(r"q(\d+)q", record["input"]):
            if int(i) % 3:
                assert f"q{i}q about" in record["input"] and f"context c{i}c" in record["input"]


def test_the_long_file_is_made_once_per_length(tmp_path, monkeypatch, alpaca_records):
    monkeypatch.setattr(long_context, "LONG_DATA", str(tmp_path / "long-{length}.json"))
    source = tmp_path / "alpaca.json"
    source.write_text(json.dumps(alpaca_records))
    path = long_context.long_file(2048, source)
    assert path == tmp_path / "long-2048.json"
    _assert_long_records(json.loads(path.read_text()), long_context.estimate_tokens, long_context.target_tokens(2048))
    source.unlink()  # the second call reads the file made by the first
    assert long_context.long_file(2048, source) == path
    source.write_text(json.dumps(alpaca_records[:3]))
    with pytest.raises(SystemExit, match="too few tokens"):
        long_context.long_file(4096, source)
    assert [p.name for p in tmp_path.iterdir() if "4096" in p.name] == []


def test_the_long_setups_train_the_same_tokens_a_step_ours_and_unsloths():
    setups = bench_setups.setup_table()
    for length, rows, unsloth in ((4096, 4, "4 rows x 4,096"), (8192, 2, "2 rows x 8,192"),
                                  (16384, 1, "1 row x 16,384")):
        ours = setups[f"ours QLoRA, {length // 1024}k-token records, 16k tokens/step"]
        theirs = setups[f"Unsloth QLoRA, packing, {unsloth}"]
        assert (ours["kind"], ours["method"], ours["batch"], ours["long"]) == ("ours", "qlora", 1, length)
        assert ours["extra"] == ["--max_seq_length", str(length), "--max_tokens_per_batch", "16384"]
        assert (theirs["kind"], theirs["batch"], theirs["max_seq_length"], theirs["long"]) == \
            ("unsloth", rows, length, length)
        assert theirs["batch"] * theirs["max_seq_length"] == 16384  # every length fits at least one row
    assert setups["Unsloth QLoRA, packing, 8 rows x 1,024"] == dict(kind="unsloth", batch=8)  # the old ones stay


def _fits_below(limit, tried):
    return lambda length: tried.append(length) or length < limit


@pytest.mark.parametrize("fits_below, limit, answer, attempts", [
    (23_500, None, 22_528, [4096, 8192, 16384, 32768, 24576, 20480, 22528, 23552]),
    (10**9, 32_768, 32_768, [4096, 8192, 16384, 32768]),  # everything fits: the model's context is the answer
    (10**9, 20_000, 20_000, [4096, 8192, 16384, 20000]),
    (3_000, None, 2_048, [4096, 2048, 3072]),
    (1_000, None, None, [4096, 2048, 1024]),
])
def test_the_longest_length_doubles_then_halves_the_gap_to_1024(fits_below, limit, answer, attempts):
    tried = []
    assert long_context.longest_length(_fits_below(fits_below, tried), limit=limit) == answer
    assert tried == attempts


@pytest.fixture
def search_files(tmp_path, monkeypatch):
    """The searches' logs and long files in the test's folder (the long files named, not made)."""
    monkeypatch.setattr(long_context, "LONGEST_LOG", str(tmp_path / "longest-{which}-{model}.json"))
    monkeypatch.setattr(long_context, "long_file", lambda length, source, model: tmp_path / f"long-{length}.json")


def _length(spec: dict) -> int:
    """An attempt's --max_seq_length: Unsloth's spec names it, ours passes it as a flag."""
    return spec.get("max_seq_length") or int(spec["extra"][spec["extra"].index("--max_seq_length") + 1])


def _result(tokens, peak=3.5):
    return {"tokens_per_step": tokens, "peak_gib": peak, "gpu": "Tesla T4 (emulated)"}


def test_a_search_runs_each_attempt_as_a_t4_setup_and_resumes_from_its_log(tmp_path, search_files):
    specs = []

    def run(name, spec):
        specs.append(spec)
        length = _length(spec)
        if length > 20_000:
            return {"refused": "does not fit this GPU"} if spec["kind"] == "ours" else {
                "failed": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
        return _result(0.95 * length)

    base = dict(model="/tmp/bench-gemma-3-1b", data="alpaca.json", steps=14, warmup=2, extra=["--lora_r", "8"])
    found = long_context.search("ours", base, run, limit=32_768)
    assert found["longest"] == 19_456 and found["first_failure"] == 20_480 and found["attempts"] == len(specs) == 8
    ours = specs[0]
    assert (ours["kind"], ours["method"], ours["batch"], ours["steps"], ours["warmup"], ours["t4"]) == \
        ("ours", "qlora", 1, 1, 0, True)
    assert ours["extra"] == ["--lora_r", "8", "--max_seq_length", "4096", "--max_tokens_per_batch", "4096"]
    assert ours["data"] == str(tmp_path / "long-4096.json")

    specs.clear()
    assert long_context.search("ours", base, run, limit=32_768)["longest"] == 19_456 and specs == []  # resumed
    unsloth = long_context.search("unsloth", base, run, limit=32_768)
    assert unsloth["longest"] == 19_456 and specs[0]["kind"] == "unsloth" and specs[0]["max_seq_length"] == 4096
    assert specs[0]["t4"] and specs[0]["batch"] == 1 and specs[0]["steps"] == 1 and specs[0]["warmup"] == 0


def test_a_failure_not_for_memory_stops_the_search_and_is_not_kept(tmp_path, search_files):
    """A bug or a missing file at 4,096 would otherwise read as 'not even 1,024' after three wasted GPU runs."""
    tried = []

    def run(name, spec):
        tried.append(spec)
        return {"failed": "ModuleNotFoundError: No module named 'unsloth'"}

    base = dict(model="/tmp/bench-gemma-3-1b", data="alpaca.json", steps=14, warmup=2, extra=[])
    with pytest.raises(long_context.SearchStopped, match="4,096 failed, not for memory"):
        long_context.search("unsloth", base, run, limit=32_768)
    assert len(tried) == 1 and not (tmp_path / "longest-unsloth-bench-gemma-3-1b.json").exists()


def _main(monkeypatch, tmp_path, *argv):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 16384}))
    (model / "model.safetensors").write_text("")  # a whole model: the bench builds none
    monkeypatch.setattr(sys, "argv", ["run_bench.py", "--model", str(model), "--data", str(tmp_path / "alpaca.json"),
                                      "--results", str(tmp_path / "results.md"), *argv])
    monkeypatch.setattr(unsloth_run, "missing", lambda site: None)
    children = []

    def run_child(name, spec, args, caches=None, keep_failure=False):
        children.append((name, spec, caches))
        length = _length(spec)
        return {"failed": "The GPU ran out of memory (1 row)"} if length > 9_000 else {
            **_result(0.95 * length), "tokens_per_second": 1000.0, "median_step_s": 1.0, "mfu": None, "loss": 1.0,
            "partial_steps_left_out": 0}

    monkeypatch.setattr(run_bench, "run_child", run_child)
    run_bench.main()
    return children, (tmp_path / "results.md").read_text()


def test_the_long_rows_train_on_the_long_file_made_for_their_length(tmp_path, monkeypatch, search_files):
    children, results = _main(monkeypatch, tmp_path, "--only",
                              "ours QLoRA, 8k-token records, 16k tokens/step;Unsloth QLoRA, packing, 2 rows x 8,192")
    (_, ours, _), (_, theirs, _) = children
    assert ours["data"] == theirs["data"] == str(tmp_path / "long-8192.json")
    assert ours["extra"][-4:] == ["--max_seq_length", "8192", "--max_tokens_per_batch", "16384"]
    assert theirs["max_seq_length"] == 8192 and theirs["batch"] == 2 and not theirs.get("t4")
    assert "| Unsloth QLoRA, packing, 2 rows x 8,192 | 1,000 |" in results


def test_longest_runs_the_searches_alone_and_writes_their_answers(tmp_path, monkeypatch, search_files):
    children, results = _main(monkeypatch, tmp_path, "--longest", "ours", "--longest", "unsloth")
    assert children and all(spec["t4"] and spec["steps"] == 1 for _, spec, _ in children)  # no other setup ran
    assert all(caches and "TORCHINDUCTOR_CACHE_DIR" in caches for _, _, caches in children)  # shared per search
    assert {spec["kind"] for _, spec, _ in children} == {"ours", "unsloth"}
    assert "| T4 emulation: longest ours QLoRA | 8,192 | 7,782 | 3.50 | 9,216 |" in results
    assert "| T4 emulation: longest Unsloth QLoRA | 8,192 |" in results


def test_importing_the_bench_loads_neither_torch_nor_transformers():
    # Unsloth's child runs run_bench.py: transformers must first load there after Unsloth, and from its own site.
    probe = ("import sys; sys.path.insert(0, 'bench'); import run_bench; "
             "print(sorted(m for m in ('torch', 'transformers', 'common') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("t4", [False, True])
def test_unsloths_child_takes_the_length_and_fp16_under_t4_emulation(t4, tmp_path, monkeypatch):
    import torch

    import emulate_t4

    site = tmp_path / "site" / "unsloth"
    site.mkdir(parents=True)
    # Unsloth decides bf16 as it imports: the emulation must already be on by then.
    (site / "__init__.py").write_text(
        "import os, torch\nSUPPORTS_BFLOAT16 = torch.cuda.is_bf16_supported()\n"
        "os.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'expandable_segments:True'\nCALLS = {}\n"
        "class Model:\n    def parameters(self):\n        return []\n"
        "class FastLanguageModel:\n"
        "    @staticmethod\n    def from_pretrained(model, **kwargs):\n"
        "        CALLS['from_pretrained'] = kwargs\n        return Model(), object()\n"
        "    @staticmethod\n    def get_peft_model(model, **kwargs):\n        return model\n")
    monkeypatch.syspath_prepend(str(site.parent))
    monkeypatch.setitem(sys.modules, "unsloth", None)
    monkeypatch.delitem(sys.modules, "unsloth")  # imported afresh, and gone again after the test
    for name in [*unsloth_run.CHILD_ENV, "UNSLOTH_COMPILE_LOCATION", "PYTORCH_CUDA_ALLOC_CONF"]:
        monkeypatch.setenv(name, "")  # whatever the child sets is undone after the test
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(emulate_t4, "emulate_t4", lambda: monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: "emulated T4"))
    allocator = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", allocator.append)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    configs = []

    class Trainer:
        def __init__(self, model, args, **kwargs):
            self.args = args

        def train(self):
            pass

    trl = types.ModuleType("trl")
    trl.SFTConfig = lambda **kwargs: configs.append(kwargs) or types.SimpleNamespace(**kwargs)
    trl.SFTTrainer = Trainer
    monkeypatch.setitem(sys.modules, "trl", trl)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(Dataset=types.SimpleNamespace(
        from_list=lambda rows: rows)))
    monkeypatch.setattr(unsloth_run, "versions", lambda: {})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "data.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    spec = dict(model=str(tmp_path), data=str(tmp_path / "data.json"), batch=1, steps=1, warmup=0,
                **({"t4": True, "max_seq_length": 8192} if t4 else {}))
    result = unsloth_run.run_unsloth(spec, lambda warmup: ([], {}), lambda result, warmup, n: {"peak_gib": 1.0},
                                     lambda model: 1, lambda trainer: 0.5)
    fake = sys.modules["unsloth"]
    loaded = fake.CALLS["from_pretrained"]
    length = 8192 if t4 else 1024
    assert loaded["max_seq_length"] == length and configs[0]["max_length"] == length
    assert loaded["dtype"] == (torch.float16 if t4 else torch.bfloat16)
    assert (configs[0]["fp16"], configs[0]["bf16"]) == (t4, not t4)
    assert (fake.SUPPORTS_BFLOAT16 == "emulated T4") == t4
    assert allocator == (["expandable_segments:True"] if t4 else [])  # set after CUDA started: applied by hand
    assert result["peak_gib"] == 1.0
