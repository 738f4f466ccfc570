"""Shared fixtures for the finetuning toolkit's tests.

The scripts live in finetuning/ and import each other as top-level modules
(`import common`, `from fastpath import rms_norm`), so that folder goes on sys.path here, found relative to this file.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

# No test may reach the hub: a hub lookup fails at once instead of retrying for 20 s.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FINETUNING_DIR = REPO_ROOT / "finetuning"
BENCH_DIR = REPO_ROOT / "bench"  # the bench's own modules have tests too (step_diagnostics, mlp_chunks)
for _folder in (BENCH_DIR, FINETUNING_DIR):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# Real instruction data kept next to the repository (never inside it: its license forbids shipping it).
ALPACA_FILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "alpaca_5000.json"


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run only where torch sees a CUDA GPU (`pytest -m gpu` there)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False")
    for item in gpu_items:
        item.add_marker(skip)


def build_tiny_model(directory: Path, texts) -> Path:
    """The smoke run's tiny random Gemma 3 + tokenizer."""
    from models import smoke

    return Path(smoke.build_random_gemma(Path(directory), list(texts)))



# --- helpers shared by several test modules (imported as `from conftest import ...`) ------------------------------


def small_gemma(layers: int = 2, random_norms: bool = True, **changes):
    """A tiny random Gemma3ForCausalLM (64 wide, a 16-token sliding window), its norm weights random unless
    `random_norms` is False: with the initial zeros, (1 + weight) would hide a wrong scale."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
        attn_implementation="sdpa",
    )
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**config, **changes}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and random_norms:
                parameter.normal_(0, 0.5)
    return model



def quantized_lora_model(directory: Path, dropout: float, base=None):
    """A tiny Gemma 3 (`base`, else small_gemma()) saved to `directory` and loaded as train_qlora loads it (NF4,
    bitsandbytes on the CPU), with LoRA adapters on every linear layer, B random."""
    import torch
    from peft import LoraConfig, get_peft_model

    import common
    import train_qlora

    if not (directory / "config.json").is_file():
        (base if base is not None else small_gemma()).save_pretrained(directory)
    model = train_qlora.load_quantized_model(str(directory), common.Precision(False, False, torch.float32, "test"),
                                             torch.device("cpu"), "sdpa")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config).train()  # eval mode would let bitsandbytes repack CPU weights
    torch.manual_seed(0)
    with torch.no_grad():  # B starts at zero; a random B makes every gradient path of the adapter count
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return peft_model


def uneven_records(count: int = 6, vocab: int = 8000, seed: int = 0, lengths: tuple = (60, 700)) -> tuple[list, list]:
    """(token ids, labels) of records of uneven length (`lengths`: 60-700 tokens) with a masked prompt of 40, as
    instruction data looks after tokenization."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(*lengths, (count,), generator=generator).tolist()
    records = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    return records, [[-100] * 40 + r[40:] for r in records]


def padded_batch(records, labels, device: str = "cuda") -> dict:
    """The records as one batch of rows padded to the longest, with their attention mask."""
    import torch

    width = max(len(r) for r in records)
    batch = {name: torch.full((len(records), width), fill) for name, fill in
             (("input_ids", 0), ("labels", -100), ("attention_mask", 0))}
    for i, (ids, lab) in enumerate(zip(records, labels)):
        batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
        batch["labels"][i, : len(ids)] = torch.tensor(lab)
        batch["attention_mask"][i, : len(ids)] = 1
    return {k: v.to(device) for k, v in batch.items()}


def packed_batch(records, labels, device: str = "cuda", row_tokens: int = 1024) -> dict:
    """The records packed into rows of `row_tokens` without padding, with their bounds (as the scripts batch them)."""
    import torch

    from records import batching

    rows = batching.pack_into_rows([len(r) for r in records], row_tokens)
    batch = batching.pad_rows(0, row_tokens)(batching.packed_rows([{"input_ids": r} for r in records], labels, rows))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def run_cli_once(module, argv, caplog, main=None) -> tuple[int, str]:
    """A script's command line as run_cli runs it: (exit code, its one error line). run_cli logs exactly one ERROR
    line and no traceback."""
    from cli import command_line

    caplog.clear()
    with caplog.at_level(logging.INFO):
        exit_code = command_line.run_cli(module.parse_args, main or module.main, [str(a) for a in argv])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert errors[0].name == "cli.command_line" and "Traceback" not in caplog.text
    return exit_code, errors[0].getMessage()


def fails_cleanly(module, argv, caplog, output_dir: Optional[Path] = None, main=None) -> str:
    """run_cli_once must end with exit code 2, and (given `output_dir`) no final model there, whole or half-written.
    Returns the message."""
    exit_code, message = run_cli_once(module, argv, caplog, main)
    assert exit_code == 2, f"expected exit code 2, got {exit_code}; log:\n{caplog.text[-3000:]}"
    if output_dir is not None:
        from training.output_dir import FINAL_DIR

        assert not (output_dir / FINAL_DIR).exists(), "a failed run left OUTPUT_DIR/final"
        assert not (output_dir / f".{FINAL_DIR}.partial").exists(), "a failed run left a half-written final"
    return message



def stop_processes(processes) -> None:
    """Kill and reap every one of a test's child processes still running, however the test ended."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()

def losses_in(output_dir: Path) -> list:
    """The logged training losses of the run in output_dir (its trainer_state.json)."""
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def trainer_losses(trainer) -> list:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture
def no_gpu(monkeypatch):
    """torch sees no CUDA GPU and no Apple GPU; reading a GPU's properties fails the test."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: pytest.fail("no GPU may be read"))


@pytest.fixture
def emulated_t4(monkeypatch):
    """A 16 GB T4 on a bigger GPU for the length of a test, by bench/emulate_t4.py's own emulate_t4(): no bfloat16,
    compute capability 7.5 (eager layers, no flash attention), the card's name and total memory a T4's (15 GiB: what
    the scripts size their batch and check the model against), memory capped at 15 GiB."""
    import torch

    import emulate_t4

    for name in ("is_bf16_supported", "get_device_name", "get_device_properties", "get_device_capability"):
        monkeypatch.setattr(torch.cuda, name, getattr(torch.cuda, name))  # what emulate_t4() replaces, restored after
    emulate_t4.emulate_t4()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    yield
    torch.cuda.set_per_process_memory_fraction(1.0)

@pytest.fixture
def write_data(tmp_path):
    """write_data(name, content) -> Path: a str is written as is, anything else as JSON."""

    def write(name: str, content) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
        return path

    return write


@pytest.fixture
def alpaca_path() -> Path:
    if not ALPACA_FILE.is_file():
        pytest.skip(f"{ALPACA_FILE} is not present")
    return ALPACA_FILE


@pytest.fixture(scope="session")
def default_texts() -> list[str]:
    """The embedded data set, formatted: what the smoke model's tokenizer is trained on."""
    import common
    from records import data

    records = json.loads(data.DEFAULT_DATASET_FILE.read_text(encoding="utf-8"))
    return [common.format_record(record) for record in records]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_texts) -> Path:
    """One tiny random Gemma 3 (tokenizer + weights) shared by the whole session; treat it as read-only."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_gemma"), default_texts)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def parse():
    """parse(module, argv) -> (model, data, report, method, training): what the script parses from argv, with its
    own dataclasses and defaults; nothing is checked or loaded."""

    def run(module, argv):
        return module.parse_args([str(a) for a in argv])

    return run


# --- one finished smoke run per script, for the tests that only read what it left -----------------------------

# A token planted in the runs' environment: no output, log or saved file may contain it.
PLANTED_TOKEN = "hf_PlantedTokenDoNotLeak7Q3x9Z"
FINISHED_RUN_FLAGS = ["--save_strategy", "steps", "--save_steps", "2", "--max_steps", "4"]


@dataclass
class FinishedRun:
    exit_code: int
    output_dir: Path
    output: bytes  # everything the process printed and logged

    def state(self) -> dict:
        """The Trainer's trainer_state.json (global_step, log_history)."""
        return json.loads((self.output_dir / "trainer_state.json").read_text())

    def losses(self) -> list:
        return [entry["loss"] for entry in self.state()["log_history"] if "loss" in entry]


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory) -> dict:
    """{"qlora": FinishedRun, "galore": FinishedRun}: each script's --smoke run through its real command line, both
    at once, with checkpoints every 2 of 4 steps, the sample answers on and HF_TOKEN planted. Read-only: copy an
    output dir before changing it."""
    root = tmp_path_factory.mktemp("finished_runs")
    env = {**os.environ, "HF_TOKEN": PLANTED_TOKEN}
    started = {}
    for script in ("qlora", "galore"):
        log = (root / f"{script}.log").open("wb")
        argv = [sys.executable, f"finetuning/train_{script}.py", "--smoke", "--output_dir", str(root / script),
                *FINISHED_RUN_FLAGS]
        started[script] = (subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    runs = {}
    for script, (process, log) in started.items():
        process.wait(timeout=300)
        log.close()
        runs[script] = FinishedRun(process.returncode, root / script, (root / f"{script}.log").read_bytes())
        assert runs[script].exit_code == 0, runs[script].output.decode(errors="replace")[-3000:]
    return runs


# --- one clean message, and scripts run as real processes (issue 24's tests) ---------------------------------------


def start_script(argv, log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """`python finetuning/<argv>` from the repository root, its output to `log_path`; SIGINT delivered as a terminal
    delivers it (a shell without job control starts background jobs with SIGINT ignored)."""
    import signal

    with Path(log_path).open("wb") as log:
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_text(process: subprocess.Popen, log_path: Path, text: str, timeout_s: float = 240) -> None:
    """Until `text` shows in the process's log; fails, with the log's end, if the process ends first."""
    import time

    deadline = time.monotonic() + timeout_s
    while text not in Path(log_path).read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{text!r} never showed; {log_path}:\n"
                                 f"{Path(log_path).read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


FAKE_CONVERTER = """import os, sys, time
out = sys.argv[sys.argv.index("--outfile") + 1]
with open(out, "wb") as f:
    f.write(b"GGUF fake " + sys.argv[sys.argv.index("--outtype") + 1].encode())
print("fake converter wrote", out, flush=True)
time.sleep(float(os.environ.get("FAKE_CONVERT_SECONDS", "0")))
"""
FAKE_METADATA_EDITOR = """import shutil, sys
shutil.copy(sys.argv[1], sys.argv[2])
"""


@pytest.fixture(scope="session")
def fake_llama_cpp(tmp_path_factory) -> Path:
    """A --llama_cpp_dir whose converter writes a small fake GGUF (after sleeping FAKE_CONVERT_SECONDS, default 0)
    and whose metadata editor copies it: export_gguf.py's own steps, without llama.cpp."""
    tools = tmp_path_factory.mktemp("fake_llama_cpp")
    (tools / "convert_hf_to_gguf.py").write_text(FAKE_CONVERTER)
    editor = tools / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    editor.parent.mkdir(parents=True)
    editor.write_text(FAKE_METADATA_EDITOR)
    return tools


@pytest.fixture
def finished_model_run(tmp_path, tiny_model_dir) -> Path:
    """A run folder whose final/ holds a whole model (as a GaLore run leaves it): the tiny random Gemma 3."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "final")
    return run
