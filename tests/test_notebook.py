"""The Colab notebook, run top to bottom in a real Jupyter kernel, its Colab-only cells skipped, with smoke settings."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# requirements-dev.txt installs these; where only finetuning/requirements.txt is (a GPU box), skip, not error.
pytest.importorskip("ipykernel", reason="the notebook runs in an ipykernel kernel (requirements-dev.txt)")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
from nbclient.exceptions import CellExecutionError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "finetune_gemma3_colab.ipynb"
KERNEL_NAME = "finetuning-test-python"


def kernel_for_this_python(directory: Path) -> str:
    """A kernelspec running ipykernel with this very interpreter (the venv's), found first through JUPYTER_PATH.

    A plain "python3" spec may resolve to another Python (a user-level kernelspec, `python` on PATH).
    """
    spec_dir = directory / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "finetuning tests",
        "language": "python",
    }))
    return KERNEL_NAME


def cell_text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.get("output_type") == "stream")


def cell_with(notebook, needle: str):
    matches = [cell for cell in notebook.cells if cell.cell_type == "code" and needle in cell.source]
    assert len(matches) == 1, f"expected one code cell containing {needle!r}"
    return matches[0]


def parameters_cells(notebook) -> list:
    return [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]


def inject_parameters(notebook, values: dict) -> None:
    """As papermill does: after each `parameters` cell, a cell assigning the values of the names that cell sets."""
    used = set()
    for cell in parameters_cells(notebook):
        names = [name for name in values if f"\n{name} = " in f"\n{cell.source}"]
        assert names, f"a parameters cell sets none of {sorted(values)}:\n{cell.source}"
        used.update(names)
        injected = nbformat.v4.new_code_cell("\n".join(f"{name} = {values[name]!r}" for name in names),
                                             metadata={"tags": ["injected-parameters"]})
        notebook.cells.insert(notebook.cells.index(cell) + 1, injected)
    assert used == set(values), f"no parameters cell sets {sorted(set(values) - used)}"


def test_notebook_structure():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    colab_only = [c for c in notebook.cells if "colab-only" in c.metadata.get("tags", [])]
    sources = "\n".join(c.source for c in colab_only)
    assert "git clone" in sources and "pip install -r finetuning/requirements.txt" in sources.replace("-q ", "")
    assert "userdata.get(\"HF_TOKEN\")" in sources
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "the notebook is stored clean"
            assert "!python" not in cell.source, "shell commands must use {sys.executable}, the kernel's own Python"
    for cell in notebook.cells:
        assert "NOTEBOOK_" not in cell.source, "settings are plain assignments, not test-only environment variables"
    smoke_settings, settings = parameters_cells(notebook)
    assert 'SMOKE_DIR = "outputs/smoke"' in smoke_settings.source
    assert 'OUTPUT_DIR = "outputs/qlora"' in settings.source
    assert 'CONFIG = "configs/qlora_t4.yaml"' in settings.source
    # Each settings cell comes right before the command that uses it (where papermill injects its values).
    smoke = cell_with(notebook, "finetuning/train_qlora.py --smoke --output_dir {SMOKE_DIR}")
    training = cell_with(notebook, "finetuning/train_qlora.py {CONFIG}")
    assert notebook.cells.index(smoke) == notebook.cells.index(smoke_settings) + 1
    assert notebook.cells.index(training) == notebook.cells.index(settings) + 1
    assert "{OUTPUT_DIR}" in training.source and "{EXTRA}" in training.source


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    output_dir = tmp_path / "qlora"
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    kernel_name = kernel_for_this_python(tmp_path / "jupyter")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    inject_parameters(notebook, {
        "SMOKE_DIR": str(tmp_path / "smoke"),
        "OUTPUT_DIR": str(output_dir),
        "MAX_STEPS": 4,
        # Flags after the config win: --logging_steps 1, since the config logs every 10 steps and 4 steps would plot
        # no loss; a batch of 2 without accumulation keeps the CPU run small should the config batch by records
        # (the T4 config's token batches ignore the first flag and accumulate 1 already).
        "EXTRA": "--smoke --eval_split_ratio 0.25 --logging_steps 1 "
                 "--per_device_train_batch_size 2 --gradient_accumulation_steps 1",
    })
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=240,  # per cell
        skip_cells_with_tag="colab-only",
        resources={"metadata": {"path": str(REPO_ROOT)}},  # the kernel's working directory
    )
    try:
        client.execute()
    except CellExecutionError as error:
        pytest.fail(f"A notebook cell failed:\n{error}")

    executed = [c for c in notebook.cells if c.cell_type == "code" and c.get("execution_count") is not None]
    skipped = [c for c in notebook.cells if "colab-only" in c.metadata.get("tags", [])]
    assert skipped and not any(c.get("execution_count") for c in skipped), "colab-only cells were skipped"
    assert len(executed) == sum(c.cell_type == "code" for c in notebook.cells) - len(skipped)

    setup = cell_text(cell_with(notebook, 'print("Python:", sys.executable)'))
    assert f"Python: {sys.executable}" in setup, "the kernel and its ! commands ran this environment's Python"
    assert f"Toolkit: {REPO_ROOT}" in setup

    assert (tmp_path / "smoke" / "final" / "adapter_config.json").is_file()
    final = output_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (output_dir / "loss_curve.png").stat().st_size > 0
    assert "After" in (output_dir / "samples.md").read_text()
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and "eval_loss" in metrics

    gguf = output_dir / "gguf"  # the export cell: both files, the Modelfile and the parity report it displays
    assert {"model-f16.gguf", "model-q8_0.gguf", "Modelfile", "parity.md"} <= {p.name for p in gguf.iterdir()}
    assert "Parity" in cell_text(cell_with(notebook, "export_gguf.py"))

    plot = cell_with(notebook, "loss_curve.png")
    assert any("image/png" in output.get("data", {}) for output in plot.outputs)
    reports = cell_with(notebook, "report_card.md")  # the report card, then the data report and its histogram
    shown = "".join(output.get("data", {}).get("text/markdown", "") for output in reports.outputs)
    assert "# Report card" in shown and "the eval records (held out from training)" in shown
    assert "# Data report" in shown and any("image/png" in output.get("data", {}) for output in reports.outputs)
    answer_lines = [line for line in cell_text(cell_with(notebook, "AutoPeftModelForCausalLM")).splitlines()
                    if line.startswith("Answer:")]
    assert answer_lines and answer_lines[0].removeprefix("Answer:").strip(), "the generation cell printed an answer"
