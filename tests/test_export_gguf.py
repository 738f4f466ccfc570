"""GGUF export (finetuning/export_gguf.py): llama.cpp's converter writes f16 and q8_0 files that carry Gemma's chat
template and both stop tokens, an Ollama Modelfile, and a parity report in which the GGUF answers the run's prompts
as the trained model does and stops where it stops. The runs through llama.cpp need llama-cpp-python
(finetuning/requirements-export.txt) and skip without it."""
from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
import time

import pytest

from cli import command_line
import export_gguf
from export import gguf_files
from export import parity
import train_galore
import train_qlora
from cli import errors
from cli.errors import ExportFailed

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed (finetuning/requirements-export.txt)")


@pytest.fixture(scope="module")
def run_that_stops(tmp_path_factory):
    """A smoke GaLore run on answers that are all one short sentence: the tiny model learns to end its turn."""
    folder = tmp_path_factory.mktemp("stops")
    data = folder / "data.json"
    data.write_text(json.dumps([{"instruction": f"Question {i}: is {i} a number?", "input": "", "output": "Yes, it is."}
                                for i in range(48)]))
    run_dir = folder / "run"
    train_galore.main(*train_galore.parse_args([
        "--smoke", "--output_dir", str(run_dir), "--dataset_name", str(data), "--max_steps", "30",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--warmup_ratio", "0",
        "--num_sample_prompts", "2", "--sample_max_new_tokens", "12"]))
    return run_dir


@pytest.mark.slow
@needs_llama_cpp
def test_a_trained_run_exports_ggufs_that_answer_and_stop_as_it_does(run_that_stops):
    started = time.perf_counter()
    folder = export_gguf.main(*export_gguf.parse_args(["--run_dir", str(run_that_stops)]))
    print(f"export of the smoke model (f16 and q8_0, parity on 2 prompts): {time.perf_counter() - started:.1f} s")

    assert sorted(p.name for p in folder.iterdir()) == [
        "Modelfile", "model-f16.gguf", "model-q8_0.gguf", "parity.json", "parity.md"]
    report = json.loads((folder / "parity.json").read_text())
    assert report["problems"] == {"model-f16.gguf": [], "model-q8_0.gguf": []}  # eot id, EOG, chat template
    assert len(report["rows"]) == 4
    for row in report["rows"]:
        assert row["prompt_tokens_same"] and row["agrees"], row
        assert row["hf"]["stopped_at"] == row["gguf"]["stopped_at"] == "<end_of_turn>", row
        assert row["gguf"]["text"] == "Yes, it is."
    modelfile = (folder / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n")  # the smaller file
    assert 'PARAMETER stop "<end_of_turn>"' in modelfile and "<start_of_turn>model" in modelfile
    # "Yes, it is." and the stop token, all compared and all agreeing
    assert "| 0 | model-f16.gguf | yes | 6/6 | <end_of_turn> | <end_of_turn> |" in (folder / "parity.md").read_text()
    # The run's report card gains a row for each GGUF: base -> trained -> exported, on the same prompts.
    card = json.loads((run_that_stops / "report_card.json").read_text())
    rows = {row["model"]: row for row in card["export"]["rows"]}
    assert list(rows) == ["base", "trained", "model-f16.gguf", "model-q8_0.gguf"] and card["export"]["prompts"] == 8
    for name in ("trained", "model-f16.gguf", "model-q8_0.gguf"):
        assert rows[name]["stop_rate"] == 1.0 and rows[name]["exact_match"] == 1.0, rows[name]
    assert rows["base"]["stop_rate"] < 1.0  # the random base runs on
    assert "| model-q8_0.gguf | 100% | 100% | 100.0 |" in (run_that_stops / "report_card.md").read_text()


@pytest.mark.slow
@needs_llama_cpp
def test_a_qlora_run_is_merged_into_its_base_then_exported(tmp_path, caplog):
    run_dir = tmp_path / "qlora"
    train_qlora.main(*train_qlora.parse_args(["--smoke", "--output_dir", str(run_dir), "--num_sample_prompts", "1"]))
    assert not (run_dir / "merged").exists()

    folder = export_gguf.main(*export_gguf.parse_args(["--run_dir", str(run_dir), "--outtypes", "f16"]))

    assert (run_dir / "merged" / "model.safetensors").is_file()
    rows = json.loads((folder / "parity.json").read_text())["rows"]
    assert [row["agrees"] for row in rows] == [True]
    # The random model never ends its turn: nothing to compare stopping with, which is said, not failed.
    assert "did not stop within the token limit" in caplog.text


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("script", [train_qlora, train_galore], ids=["qlora", "galore"])
def test_a_multimodal_run_exports_its_language_model_and_answers_alike(script, tmp_path, caplog):
    """gemma-3-4b's class (issue 25): the smoke model of Gemma3ForConditionalGeneration trained (QLoRA's adapter
    merged into its base, the vision tower kept; GaLore's final/ the whole model, converted as it is); the GGUF is its
    language model alone, as llama.cpp's converter writes it, and answers as the trained model does."""
    import logging

    run_dir = tmp_path / f"{script.__name__}-4b"
    script.main(*script.parse_args(["--smoke", "--model_name_or_path", "google/gemma-3-4b-it",
                                    "--output_dir", str(run_dir), "--num_sample_prompts", "2"]))
    caplog.set_level(logging.INFO)
    folder = export_gguf.main(*export_gguf.parse_args(["--run_dir", str(run_dir), "--outtypes", "f16,q8_0"]))

    converted = run_dir / ("merged" if script is train_qlora else "final")
    assert (run_dir / "final" / "adapter_config.json").is_file() == (script is train_qlora)
    assert (run_dir / "merged").exists() == (script is train_qlora)  # GaLore's full weights need no merge
    assert f"{converted.resolve()} is multimodal (Gemma3ForConditionalGeneration)" in caplog.text
    assert json.loads((converted / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    report = json.loads((folder / "parity.json").read_text())
    assert report["problems"] == {"model-f16.gguf": [], "model-q8_0.gguf": []}  # eot id, EOG, chat template
    assert len(report["rows"]) == 4 and all(row["prompt_tokens_same"] and row["agrees"] for row in report["rows"])
    assert "the GGUF holds its language model" in caplog.text and "--mmproj" in caplog.text
    sys.path.insert(0, str(gguf_files.tools_dir(None) / "gguf-py"))
    try:
        import gguf

        reader = gguf.GGUFReader(str(folder / "model-f16.gguf"))
    finally:
        sys.path.pop(0)
    names = [tensor.name for tensor in reader.tensors]
    assert "token_embd.weight" in names and not [n for n in names if n.startswith(("v.", "mm."))], names
    assert bytes(reader.fields["general.architecture"].parts[-1]) == b"gemma3"


def test_a_gguf_that_does_not_stop_where_the_model_does_fails_the_export(tmp_path):
    def answer(stop):
        return parity.Answer([2, 4], [7, 8, 5] if stop else [7, 8, 9], "ab", stop)

    stopping = parity.compare(["p"], "model-f16.gguf", [answer("<end_of_turn>")], [answer("<end_of_turn>")], 16)
    parity.verdict(stopping, {"model-f16.gguf": []}, tmp_path / "parity.md")  # passes

    running_on = parity.compare(["p"], "model-q8_0.gguf", [answer("<end_of_turn>")], [answer(None)], 16)
    with pytest.raises(ExportFailed, match="model-q8_0.gguf: ran to the token limit where the trained model stopped"):
        parity.verdict(stopping + running_on, {"model-f16.gguf": [], "model-q8_0.gguf": []}, tmp_path / "parity.md")
    with pytest.raises(ExportFailed, match="model-f16.gguf: the metadata has no end-of-turn token id"):
        parity.verdict(stopping, {"model-f16.gguf": ["the metadata has no end-of-turn token id (106)"]},
                       tmp_path / "parity.md")


def test_the_first_tokens_are_compared_up_to_where_the_trained_model_stopped():
    hf = parity.Answer([2], [7, 8, 5], "", "<end_of_turn>")
    rows = parity.compare(["p", "p"], "f", [hf, hf], [parity.Answer([2], [7, 8, 5, 9], "", None),
                                                      parity.Answer([2], [7, 6, 5], "", "<end_of_turn>")], 16)
    assert [(row.agreeing, row.compared, row.agrees) for row in rows] == [(3, 3, True), (1, 3, False)]


@pytest.mark.parametrize("argv, message", [
    (["--run_dir", "{tmp}/nothing"], "no final/ folder there"),
    (["--run_dir", "{tmp}", "--outtypes", "q4_k_m"], "--outtypes 'q4_k_m': choose from f16, bf16, q8_0, f32"),
    (["--run_dir", "{tmp}", "--parity_tokens", "100"], "at most --max_new_tokens"),
    (["--run_dir", "{tmp}", "--llama_cpp_dir", "{tmp}", "--check_parity", "false"], "no convert_hf_to_gguf.py"),
    (["--run_dir", "{tmp}", "--quantize"], "Unknown flag(s): --quantize"),
    ([], "the following arguments are required: --run_dir"),
])
def test_bad_exports_are_refused_before_anything_is_written(argv, message, tmp_path, caplog):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert command_line.run_cli(export_gguf.parse_args, export_gguf.main, argv) == 2
    assert message in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_without_llama_cpp_python_the_parity_check_says_how_to_install_it(tmp_path, caplog, monkeypatch):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    assert command_line.run_cli(export_gguf.parse_args, export_gguf.main, ["--run_dir", str(tmp_path)]) == 2
    assert "pip install -r finetuning/requirements-export.txt" in caplog.text and "--check_parity false" in caplog.text


def test_the_tools_are_unpacked_from_the_source_distribution_alone(tmp_path):
    sdist = tmp_path / "src"
    root = sdist / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    for name in ["convert_hf_to_gguf.py", "conversion/gemma.py", "gguf-py/gguf/scripts/gguf_new_metadata.py",
                 "src/llama.cpp", "examples/big.bin"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    archive = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist / "llama_cpp_python-0.3.36", arcname="llama_cpp_python-0.3.36")

    tools = tmp_path / "tools"
    gguf_files.unpack_tools(archive, tools)
    assert sorted(str(p.relative_to(tools)) for p in tools.rglob("*") if p.is_file()) == [
        "conversion/gemma.py", "convert_hf_to_gguf.py", "gguf-py/gguf/scripts/gguf_new_metadata.py"]
    assert gguf_files.tools_dir(str(tools)) == tools


def test_llama_cpp_built_for_another_cpu_is_a_message_not_a_crash(tmp_path, monkeypatch):
    # Met for real: a llama-cpp-python wheel from a pip cache filled on another machine dies of SIGILL in llama.cpp.
    dies = tmp_path / "gguf_run.py"
    dies.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    monkeypatch.setattr(parity.gguf_run, "__file__", str(dies))
    with pytest.raises(errors.SetupError, match="Illegal instruction.*-DGGML_NATIVE=OFF"):
        parity.gguf_answers(tmp_path / "model-f16.gguf", ["a prompt"], 8)
