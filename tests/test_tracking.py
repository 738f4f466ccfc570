"""--report_to: the loss reaches each tracker, offline (TensorBoard's event files, wandb's offline run, trackio's
local store). The trackers are optional (finetuning/requirements-tracking.txt); a test skips where its package is
missing."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import train_qlora


def smoke_run(output_dir, tracker: str):
    return train_qlora.main(*train_qlora.parse_args([
        "--smoke", "--output_dir", str(output_dir), "--report_to", tracker, "--num_sample_prompts", "0"]))


def test_the_loss_reaches_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = smoke_run(tmp_path / "run", "tensorboard")
    (events,) = {p.parent for p in (tmp_path / "run").rglob("events.out.tfevents.*")}
    logged = EventAccumulator(str(events)).Reload()
    losses = [event.value for event in logged.Scalars("train/loss")]
    assert losses == pytest.approx([e["loss"] for e in trainer.state.log_history if "loss" in e], abs=1e-4)


def test_the_loss_reaches_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network: the run is kept on disk for `wandb sync`
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "gemma-smoke")
    trainer = smoke_run(tmp_path / "run", "wandb")
    last = [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]
    assert wandb.run.summary["train/loss"] == pytest.approx(last, abs=1e-4)  # what the run holds, read back
    wandb.finish()  # what the end of the script's process does (wandb's exit hook)
    (saved,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")  # the run, for `wandb sync` later
    assert saved.stat().st_size > 0


def test_the_loss_reaches_trackios_local_store(tmp_path):
    pytest.importorskip("trackio")
    store = tmp_path / "trackio"
    # A TRACKIO_SPACE_ID, TRACKIO_DATASET_ID or TRACKIO_PROJECT in the caller's environment would send the run to a
    # Space or another project: the test's run stays local.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRACKIO_SPACE_ID", "TRACKIO_DATASET_ID", "TRACKIO_PROJECT")}
    # A process of its own: trackio reads TRACKIO_DIR once, when it is first imported.
    done = subprocess.run(
        [sys.executable, "finetuning/train_qlora.py", "--smoke", "--output_dir", str(tmp_path / "run"),
         "--report_to", "trackio", "--project", "gemma-smoke", "--num_sample_prompts", "0"],
        cwd=Path(__file__).resolve().parents[1], env={**env, "TRACKIO_DIR": str(store)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "huggingface.co" not in done.stdout + done.stderr  # local only: no Space was created
    with sqlite3.connect(store / "gemma-smoke.db") as db:
        logged = [json.loads(row[0]) for row in db.execute("SELECT metrics FROM metrics ORDER BY step")]
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert [m["train/loss"] for m in logged if "train/loss" in m] == [e["loss"] for e in history if "loss" in e]


def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(tmp_path, caplog):
    import importlib.util

    from cli import command_line

    assert importlib.util.find_spec("mlflow") is None, "the test needs a tracker that is not installed"
    argv = ["--smoke", "--output_dir", str(tmp_path / "run"), "--report_to", "mlflow"]
    assert command_line.run_cli(train_qlora.parse_args, train_qlora.main, argv) == 2
    assert "--report_to mlflow: not installed. pip install -r finetuning/requirements-tracking.txt" in caplog.text
    assert not (tmp_path / "run").exists()
