"""Interrupted training: a resumed run ends where an uninterrupted one does, and a SIGKILL at any moment
(mid-checkpoint, mid-final-save) leaves only loadable checkpoints and either no `final` or a complete one.

The kill test runs the real script as a subprocess, once per seed; each seed draws the moment to kill
(a time, or the appearance of a checkpoint folder / the final save, plus a few milliseconds). Set
KILL_RESUME_SEEDS=0,1,2,... to try more seeds. Run with -s to see one line per seed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoints
from training.output_dir import FINAL_DIR
from training import saving
from cli import versions
import train_galore
import train_qlora

REPO_ROOT = versions.PROJECT_DIR.parent
WEIGHTS = {"qlora": "adapter_model.safetensors", "galore": "model.safetensors"}
SCRIPTS = {"qlora": train_qlora, "galore": train_galore}


def assert_same_weights(expected_file: Path, actual_file: Path, atol: float = 1e-6) -> float:
    expected, actual = load_file(str(expected_file)), load_file(str(actual_file))
    assert set(expected) == set(actual)
    worst = 0.0
    for name in expected:
        difference = (expected[name].float() - actual[name].float()).abs().max().item() if expected[name].numel() else 0.0
        worst = max(worst, difference)
        assert difference <= atol, f"{name} differs by {difference:.3g} between the uninterrupted and the resumed run"
    return worst


# --- (a) a resumed run ends with the same weights as an uninterrupted one ----------------------------

RESUME_ARGV = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--seed", "3",
               "--learning_rate", "1e-3", "--num_sample_prompts", "0"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_gives_the_uninterrupted_result(script, tmp_path):
    module = SCRIPTS[script]
    whole = tmp_path / "whole"
    module.main(*module.parse_args(["--smoke", "--output_dir", str(whole), *RESUME_ARGV]))
    assert (whole / "checkpoint-3" / "trainer_state.json").is_file() and (whole / "final").is_dir()

    for how in ("latest", "checkpoint-3"):
        # The same run, cut off after checkpoint-3: checkpoint-6 and final never written.
        cut = tmp_path / f"cut-{how}"
        shutil.copytree(whole, cut)
        shutil.rmtree(cut / "checkpoint-6")
        shutil.rmtree(cut / "final")
        resume_from = "latest" if how == "latest" else str(cut / "checkpoint-3")
        trainer = module.main(*module.parse_args(["--smoke", "--output_dir", str(cut), *RESUME_ARGV, "--overwrite_output_dir", "False",
                               "--resume_from_checkpoint", resume_from]))
        assert trainer.state.global_step == 6
        trained = [e["step"] for e in trainer.state.log_history if "loss" in e]
        assert trained[-3:] == [4, 5, 6], f"steps 4-6 are trained again after resuming ({how}): {trained}"
        assert_same_weights(whole / "final" / WEIGHTS[script], cut / "final" / WEIGHTS[script])
        assert_same_weights(whole / "checkpoint-6" / WEIGHTS[script], cut / "checkpoint-6" / WEIGHTS[script])


# --- a kill while `final` is being replaced ---------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no except clause of the product catches a BaseException)."""


def test_kill_while_replacing_an_existing_final_leaves_it_absent_or_complete(tiny_model_dir, tmp_path, monkeypatch):
    final = tmp_path / "out" / FINAL_DIR
    shutil.copytree(tiny_model_dir, final)  # the earlier run's complete final
    real_rmtree = shutil.rmtree
    killed = []

    def rmtree_killed_midway(path, *args, **kwargs):
        path = Path(path)
        if killed or path.name.endswith(".partial") or not (path / "config.json").is_file():
            return real_rmtree(path, *args, **kwargs)
        (path / "config.json").unlink()  # deleting the earlier final, wherever it is now: one file gone, then killed
        killed.append(path)
        raise Killed()

    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_midway)
    try:
        saving.write_atomically(final, lambda folder: shutil.copytree(tiny_model_dir, folder))
    except Killed:
        pass
    monkeypatch.undo()
    if final.exists():
        loads(final)


# --- (b) SIGKILL at a random moment, then resume ----------------------------------------------------

KILL_SCRIPT = "galore"  # the cheaper of the two on the CPU; both share the checkpoint and final-save code
KILL_ARGV = ["--max_steps", "12", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "3",
             "--num_sample_prompts", "0"]
KILL_EVENTS = ["time", "smoke_base_model", *(f"checkpoint-{k}" for k in range(1, 13)), ".final.partial", "final",
               "metrics.json"]
# Chosen so the default draws cover: mid-save of a checkpoint (0), before any checkpoint (2), mid-save of the
# final model (9), just after it (12), and a plain time (31).
SEEDS = [int(s) for s in os.environ.get("KILL_RESUME_SEEDS", "0,2,9,12,31").split(",") if s.strip()]
NORMAL_RUN_S = 12.0  # a whole smoke run on a 2-core machine, most of it imports (10-25 s when the machine is busy)
PROCESS_TIMEOUT_S = 240


def script_argv(output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, f"finetuning/train_{KILL_SCRIPT}.py", "--smoke", "--output_dir", str(output_dir),
            *KILL_ARGV, *extra]


def start(argv: list[str], log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:  # the child keeps its own handle
        return subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log_path: Path) -> None:
    try:
        process.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"{process.args} failed; {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}"


def run_and_kill(argv: list[str], log_path: Path, output_dir: Path, event: str, delay_s: float) -> str:
    """Start the script; SIGKILL it `delay_s` after `event` (a path appearing under output_dir, or 'time': the start)."""
    started = time.monotonic()
    process = start(argv, log_path)
    try:
        target = None if event == "time" else output_dir / event
        while process.poll() is None:
            if target is None or target.exists():
                time.sleep(delay_s)
                if process.poll() is not None:
                    break
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return f"killed {time.monotonic() - started:.1f}s after start"
            if time.monotonic() - started > PROCESS_TIMEOUT_S:
                raise AssertionError(f"{event} never appeared; see {log_path}")
            time.sleep(0.0005)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, f"the run failed before it was killed; see {log_path}"
    return "finished before the kill"


def state_of(checkpoint: Path):
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None


def loads(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    AutoTokenizer.from_pretrained(folder)


def check_what_the_kill_left(output_dir: Path) -> dict:
    """The invariants after a SIGKILL; returns what was found, for the per-seed line."""
    folders = sorted((p for p in output_dir.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    incomplete = [p.name for p in folders if state_of(p) is None]
    complete = [p for p in folders if state_of(p) is not None]
    latest = checkpoints.latest_complete_checkpoint(output_dir)
    if latest is None:
        assert not complete, f"complete checkpoints {complete} were not found"
    else:
        latest = Path(latest)
        assert latest.name not in incomplete, f"{latest} has no readable trainer_state.json but was returned"
        assert latest == complete[-1], "the newest complete checkpoint is the latest"
        assert state_of(latest)["global_step"] == int(latest.name.split("-")[1])
        for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
            assert (latest / name).is_file(), f"{latest} has trainer_state.json but no {name}"
        loads(latest)
        # The same folders with the newest one cut off before its trainer_state.json: it is skipped.
        planted = output_dir.parent / f"{output_dir.name}-planted"
        for checkpoint in complete[-2:]:
            shutil.copytree(checkpoint, planted / checkpoint.name)
        (planted / latest.name / "trainer_state.json").unlink()
        expected = str(planted / complete[-2].name) if len(complete) > 1 else None
        assert checkpoints.latest_complete_checkpoint(planted) == expected
        shutil.rmtree(planted)
    final = output_dir / FINAL_DIR
    if final.exists():
        loads(final)  # written to .final.partial and renamed: complete or absent
    return {
        "latest": latest.name if latest else None,
        "incomplete": incomplete,
        "final": "complete" if final.exists() else "absent",
        "partial_final": (output_dir / f".{FINAL_DIR}.partial").exists(),
    }


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory) -> dict:
    """Every seed's kill, check and resume, pipelined: a seed's resume runs while the next seed's run is killed.

    Each run spends most of its time importing torch and transformers, so two at a time halves the wall time on
    a 2-core machine. An uninterrupted run, started alongside the first seed, gives the reference weights.
    """
    root = tmp_path_factory.mktemp("kill_resume")
    reference = start(script_argv(root / "uninterrupted"), root / "uninterrupted.log")
    background = (reference, root / "uninterrupted.log")
    outcomes = {}
    for seed in SEEDS:
        rng = random.Random(seed)
        event = rng.choice(KILL_EVENTS)
        # 'time': anywhere in a normal run (mostly imports); otherwise a few ms after the folder appears,
        # which lands inside that checkpoint's (or the final model's) save.
        delay = rng.uniform(0, NORMAL_RUN_S) if event == "time" else rng.uniform(0, 0.015)
        folder = root / f"seed{seed}"
        folder.mkdir()
        out = folder / "out"
        outcome = outcomes[seed] = {"event": event, "delay": delay, "out": out, "folder": folder}
        try:
            outcome["when"] = run_and_kill(script_argv(out), folder / "killed.log", out, event, delay)
            outcome["left"] = check_what_the_kill_left(out)
        except Exception as error:  # reported by this seed's test; the other seeds go on
            outcome["error"] = error
            continue
        finish(*background)
        if outcome["left"]["latest"]:
            resume = ["--overwrite_output_dir", "False", "--resume_from_checkpoint", "latest"]
        else:
            resume = ["--overwrite_output_dir"]
        outcome["resume"] = start(script_argv(out, *resume), folder / "resumed.log")
        background = (outcome["resume"], folder / "resumed.log")
    for outcome in outcomes.values():
        if "resume" in outcome:
            try:
                finish(outcome["resume"], outcome["folder"] / "resumed.log")
            except AssertionError as error:
                outcome.setdefault("error", error)
    finish(reference, root / "uninterrupted.log")
    return {"reference": root / "uninterrupted" / "final" / WEIGHTS[KILL_SCRIPT], **outcomes}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_a_random_moment_then_resume(seed, kill_runs):
    outcome = kill_runs[seed]
    if "error" in outcome:
        raise outcome["error"]
    out, left = outcome["out"], outcome["left"]
    log = (outcome["folder"] / "resumed.log").read_text(errors="replace")
    if left["latest"]:
        assert f"Resuming from the latest complete checkpoint, {out / left['latest']}" in log
    assert state_of(out / "checkpoint-12")["global_step"] == 12
    assert not (out / f".{FINAL_DIR}.partial").exists()
    loads(out / "final")
    difference = assert_same_weights(kill_runs["reference"], out / "final" / WEIGHTS[KILL_SCRIPT])
    print(f"\nseed {seed}: kill at {outcome['event']} + {outcome['delay'] * 1000:.0f} ms ({outcome['when']}); "
          f"left: latest={left['latest']}, incomplete={left['incomplete'] or '-'}, final={left['final']}, "
          f".final.partial={left['partial_final']}; {'resumed' if left['latest'] else 'restarted'} to the end, "
          f"max |final - uninterrupted| = {difference:.1g}")
