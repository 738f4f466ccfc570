"""Several processes (DDP): both scripts under torchrun on the CPU (gloo), the batches each process takes, the
writes only one process makes, plain python on a machine with several GPUs, and the shipped accelerate configs.

The GPU versions (NCCL, two GPUs) are in tests/test_gpu_ddp.py.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from records import batching
from training import processes
from fastpath import one_gpu
from fastpath.patches import Patches
from cli.errors import SetupError
from conftest import losses_in

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = {"qlora": "adapter_model.safetensors", "galore": "model.safetensors"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, output_dir: Path, *flags: str, processes: int = 2, launcher=(), steps: int = 3) -> subprocess.Popen:
    """The script's --smoke run under torchrun (gloo on the CPU), or plain python with processes=0."""
    launch = [sys.executable, *(["-m", "torch.distributed.run", *(launcher or ["--standalone", "--nproc_per_node",
                                                                                str(processes)])]
                               if processes else [])]
    argv = [*launch, f"finetuning/train_{script}.py", "--smoke", "--output_dir", str(output_dir), "--max_steps", str(steps),
            "--num_sample_prompts", "1", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output



# ---------------------------------------------------------------------------
# The real scripts on two processes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["qlora", "galore"])
def test_two_processes_train_the_same_model_as_one_with_the_same_global_batch(script, tmp_path):
    # One packed row of 256 tokens on each of two processes, against two rows on one: the same rows in each step.
    extra = ["--galore_update_proj_gap", "2"] if script == "galore" else []  # a second projection update at step 3
    two = torchrun(script, tmp_path / "two", "--max_tokens_per_batch", "256", *extra)
    one = torchrun(script, tmp_path / "one", "--max_tokens_per_batch", "512", *extra, processes=0)
    two_log, _ = finish(two), finish(one)

    assert losses_in(tmp_path / "two") == pytest.approx(losses_in(tmp_path / "one"), abs=2e-4)
    assert len(losses_in(tmp_path / "two")) == 3
    trained_two = load_file(tmp_path / "two" / "final" / WEIGHTS[script])
    trained_one = load_file(tmp_path / "one" / "final" / WEIGHTS[script])
    for name, weight in trained_one.items():
        torch.testing.assert_close(trained_two[name].float(), weight.float(), rtol=0, atol=1e-5, msg=name)
    # One copy of every output, nothing half-written; the log says the effective batch over both processes.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    assert "512 tokens = 256 per device (packed without padding) x 1 accumulation x 2 device(s)" in two_log
    assert two_log.count("Saved to") == 1  # the other process logs errors only
    if script == "galore":
        assert "GaLore projections identical on all 2 processes after step 1" in two_log
        assert "GaLore projections identical on all 2 processes after step 3" in two_log


def test_two_hosts_meet_through_torchruns_rendezvous(tmp_path):
    # Two "hosts" of one process each on this machine: the c10d rendezvous a multi-host run uses (README).
    port = _free_port()
    hosts = [torchrun("qlora", tmp_path / "run", "--max_tokens_per_batch", "256", launcher=[
        "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
        "--rdzv_id", "two-hosts"]) for _ in range(2)]
    logs = [finish(host) for host in hosts]
    assert any("x 2 device(s)" in log for log in logs)
    assert (tmp_path / "run" / "final" / WEIGHTS["qlora"]).is_file() and len(losses_in(tmp_path / "run")) == 3


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_process_at_the_same_step_with_a_checkpoint(tmp_path):
    run = torchrun("qlora", tmp_path / "run", "--max_tokens_per_batch", "256", "--save_strategy", "steps",
                   "--save_steps", "10000", "--logging_steps", "20", steps=5000)
    deadline = time.time() + 120
    seen = ""
    while "'loss'" not in seen and time.time() < deadline:
        seen += run.stdout.readline()
    run.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    output = seen + run.communicate(timeout=120)[0]
    stops = [line.split("Training interrupted at step ")[1].split()[0] for line in output.splitlines()
             if "Training interrupted at step" in line]
    assert len(stops) == 2 and stops[0] == stops[1], output[-3000:]  # both processes, one step
    assert "resume with: torchrun --nproc_per_node 2 finetuning/train_qlora.py --smoke" in output
    checkpoint = tmp_path / "run" / f"checkpoint-{stops[0]}"
    assert {"optimizer.pt", "rng_state_0.pth", "rng_state_1.pth", WEIGHTS["qlora"]} <= {p.name for p in checkpoint.iterdir()}


# ---------------------------------------------------------------------------
# What each process takes
# ---------------------------------------------------------------------------


def _per_process(batch_sampler, processes: int, epoch: int) -> list[list[list[int]]]:
    """The batches each process takes from accelerate's own DDP data loader, at `epoch`."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    taken = []
    for index in range(processes):
        loader = prepare_data_loader(DataLoader(range(1000), batch_sampler=batch_sampler, collate_fn=list),
                                     num_processes=processes, process_index=index, put_on_device=False)
        loader.set_epoch(epoch)
        taken.append(list(loader))
    return taken


@pytest.mark.parametrize("rows, per_batch", [(33, 1), (37, 4), (9, 4), (3, 2), (64, 8)])
def test_packed_rows_are_dealt_so_each_process_takes_the_same_steps_and_sees_each_row_once(rows, per_batch):
    sampler = batching.PackedBatches(rows, per_batch, seed=3, processes=2)
    taken = _per_process(sampler, 2, epoch=0)
    assert len(taken[0]) == len(taken[1]) == len(sampler) // 2
    seen = sorted(row for process in taken for batch in process for row in batch)
    assert set(seen) == set(range(rows)) and len(seen) == rows + sampler.repeated
    assert sampler.repeated == (rows % 2 if per_batch == 1 else 0)
    assert all(1 <= len(batch) <= per_batch for process in taken for batch in process)
    assert taken != _per_process(sampler, 2, epoch=1), "the epoch must reach the sampler through accelerate's loader"


def test_token_batches_are_dealt_so_each_process_takes_the_same_steps_and_sees_each_record_once():
    lengths = [(i * 37) % 300 + 20 for i in range(101)]
    for count in (2, 3):
        sampler = batching.TokenBudgetBatchSampler(lengths, max_tokens=1024, seed=1, processes=count)
        taken = _per_process(sampler, count, epoch=0)
        assert len({len(process) for process in taken}) == 1
        seen = sorted(i for process in taken for batch in process for i in batch)
        assert seen == list(range(len(lengths)))
        assert all(max(lengths[i] for i in batch) * len(batch) <= 1024 for process in taken for batch in process)
        # The fullest batches open the epoch on every process: an out-of-memory error shows at step 1.
        fullest = max(sampler.padded_tokens)
        assert max(max(lengths[i] for i in p[0]) * len(p[0]) for p in taken) == fullest


def test_one_record_batches_repeat_the_fewest_records_to_even_the_steps():
    sampler = batching.TokenBudgetBatchSampler([900] * 5, max_tokens=1000, processes=2)
    taken = _per_process(sampler, 2, epoch=0)
    assert len(taken[0]) == len(taken[1]) == 3 and sampler.repeated == 1


# ---------------------------------------------------------------------------
# Writes on one process
# ---------------------------------------------------------------------------


class _OtherProcessArguments(TrainingArguments):
    should_save = False  # what the Trainer's rule gives on every process but the main one


class _OtherProcess:
    """A trainer as a process other than the main one sees it under DDP."""

    def __init__(self, output_dir):
        self.args = _OtherProcessArguments(output_dir=str(output_dir), use_cpu=True, report_to="none")
        self.model = None


def test_processes_other_than_the_main_one_write_nothing(tmp_path):
    from training import reports
    from training import saving
    from cli.arguments import ReportArguments

    trainer = _OtherProcess(tmp_path)
    assert saving.save_final(trainer, tokenizer=None) is None
    assert reports.sample_answers(trainer, loaded=None, report_args=ReportArguments(num_sample_prompts=2)) == []
    result = type("Result", (), {"metrics": {"train_loss": 1.0}})()
    loaded = type("Loaded", (), {"eval_records": None})()
    assert reports.write_reports(trainer, result, loaded, ReportArguments(), []) == {"train_loss": 1.0}
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Plain python with several GPUs, and the commands
# ---------------------------------------------------------------------------


@pytest.fixture
def two_gpus(monkeypatch, tmp_path):
    """TrainingArguments set up on this CPU machine, then torch made to report two CUDA GPUs."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    _ = args.device  # the real set-up, before the GPUs are faked
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(args, "_n_gpu", 2)  # what the set-up gives on a machine with two GPUs
    return args


def test_plain_python_on_two_gpus_trains_on_one_and_says_the_torchrun_command(two_gpus, caplog):
    with caplog.at_level(logging.WARNING):
        processes.use_one_gpu_without_launcher(two_gpus, "/x/finetuning/train_qlora.py", one_gpu.can_pin_one_gpu())
    # The fast path's one_gpu fix pins the trainer's arguments once the Trainer is built (trl copies them before).
    patches = Patches()
    assert one_gpu.pin_one_gpu(two_gpus, patches)
    assert two_gpus.n_gpu == 1  # the Trainer wraps the model in nn.DataParallel when n_gpu > 1
    assert two_gpus.train_batch_size == two_gpus.per_device_train_batch_size
    patches.restore()
    assert two_gpus.n_gpu == 2, "the run's end leaves the arguments as they were"
    assert "This machine has 2 GPUs" in caplog.text
    assert "torchrun --nproc_per_node 2 finetuning/train_qlora.py <your flags>" in caplog.text


def test_plain_python_on_two_gpus_stops_with_the_command_where_one_gpu_cannot_be_kept(two_gpus):
    with pytest.raises(SetupError, match="torchrun --nproc_per_node 2 finetuning/train_galore.py"):
        processes.use_one_gpu_without_launcher(two_gpus, "train_galore.py", False)


def test_the_command_names_torchrun_when_a_launcher_started_the_run(monkeypatch):
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(REPO_ROOT / "finetuning" / "train_qlora.py"),
                        raising=False)
    monkeypatch.setattr(sys, "orig_argv", ["/usr/bin/python3", "-u", "finetuning/train_qlora.py", "--max_steps", "9",
                                           "--resume_from_checkpoint", "latest"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert processes.command_line() == [
        "torchrun", "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", "MAIN_HOST:29500",
        "--nproc_per_node", "2", "finetuning/train_qlora.py", "--max_steps", "9"]


@pytest.mark.parametrize("name, machines", [("one_host.yaml", 1), ("two_hosts.yaml", 2)])
def test_the_accelerate_configs_are_ddp_configs_accelerate_reads(name, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / name))
    assert config.distributed_type == "MULTI_GPU" and config.num_machines == machines
    assert config.mixed_precision == "no"  # the scripts pick bf16 or fp16 for the GPU


def test_a_spent_time_budget_stops_every_process_at_the_same_step_for_the_same_reason(tmp_path):
    # 20 s from the start: the first checkpoint is assumed to take 60 s, so both processes stop after step 1.
    run = torchrun("qlora", tmp_path / "run", "--max_tokens_per_batch", "256", "--time_budget", "20s", steps=50)
    output = run.communicate(timeout=300)[0]
    stops = [line.split("Training interrupted at ")[1] for line in output.splitlines()
             if "Training interrupted at" in line]
    assert len(stops) == 2 and stops[0] == stops[1], output[-3000:]
    assert stops[0].startswith("step 1 (--time_budget nearly spent; latest checkpoint checkpoint-1)")
    assert (tmp_path / "run" / "checkpoint-1" / "rng_state_1.pth").is_file()


# ---------------------------------------------------------------------------
# GaLore's projections, resuming with another number of processes
# ---------------------------------------------------------------------------


class _Projector:
    def __init__(self, matrix):
        self.ortho_matrix = matrix


def test_galore_projections_that_differ_between_processes_stop_training(monkeypatch):
    from cli import errors

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=1.0)
    args = type("Args", (), {"world_size": 2})()
    state = type("State", (), {"global_step": 1})()
    check = processes.GaloreProjectionsAgree()
    gathered = []

    def gather(values):  # this process's checksum, and another process's
        gathered.append(values[0])
        return [values[0], [values[0][0] + 1.0, values[0][1]]]

    monkeypatch.setattr(processes, "gather_object", gather)
    check.on_step_end(args, state, None, optimizer=optimizer)
    assert gathered == [], "nothing to compare before GaLore's first step"
    optimizer.state[optimizer.param_groups[0]["params"][0]]["projector"] = _Projector(torch.eye(2))
    with pytest.raises(errors.TrainingFailed, match="GaLore's projections differ between the 2 processes"):
        check.on_step_end(args, state, None, optimizer=optimizer)
    check.on_step_end(args, state, None, optimizer=optimizer)
    assert len(gathered) == 1, "the same matrices are compared once, not at every step"


@pytest.mark.parametrize("files, processes, refused", [
    (["rng_state.pth"], 1, False), (["rng_state.pth"], 2, True),
    (["rng_state_0.pth", "rng_state_1.pth"], 2, False), (["rng_state_0.pth", "rng_state_1.pth"], 1, True),
    (["rng_state_0.pth", "rng_state_1.pth"], 4, True), ([], 2, False),
])
def test_a_checkpoint_resumes_with_as_many_processes_as_wrote_it(files, processes, refused, tmp_path):
    from training import checkpoints
    from cli import errors

    for name in files:
        (tmp_path / name).write_bytes(b"")
    if refused:
        with pytest.raises(errors.UserInputError, match=f"this run has {processes}"):
            checkpoints.require_same_processes(tmp_path, processes)
    else:
        checkpoints.require_same_processes(tmp_path, processes)
