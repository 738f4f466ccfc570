"""Both scripts on two GPUs (NCCL): torchrun and accelerate launch, a two-host rendezvous, plain python on a
machine with two GPUs, and the same answer as one GPU given the same global batch. `pytest -m gpu` on a machine
with two or more CUDA GPUs; skipped elsewhere. The CPU (gloo) versions are in tests/test_distributed.py.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import losses_in

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
WEIGHTS = {"qlora": "adapter_model.safetensors", "galore": "model.safetensors"}


def run(script: str, model_dir: Path, output_dir: Path, launch: list, tokens: int, gpus: str = "0,1",
        *extra: str) -> str:
    """The script's real command line on the tiny random model (bf16 or fp16, as the GPU has it); returns the log."""
    flags = ["--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), "--max_steps", "3",
             "--max_tokens_per_batch", str(tokens), "--max_seq_length", "256", "--max_train_samples", "64",
             "--logging_steps", "1", "--save_strategy", "no", "--num_sample_prompts", "1", "--warmup_ratio", "0",
             "--overwrite_output_dir"]
    if script == "galore":  # the tiny model is 64 wide; a rate that moves bf16 weights within 3 steps
        flags += ["--galore_rank", "8", "--galore_update_proj_gap", "2", "--learning_rate", "1e-3"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    done = subprocess.run([*launch, f"finetuning/train_{script}.py", *flags, *extra], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr



def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("script", ["qlora", "galore"])
def test_two_gpus_take_the_same_step_as_one_gpu_with_the_same_global_batch(script, tiny_model_dir, tmp_path):
    # One packed row of 256 tokens on each GPU against the same two rows on one GPU, one after the other
    # (accumulation 2): the same micro-batches, so bf16 rounds the same sums; only the two gradients' sum differs
    # (an all-reduce against accumulation). Two rows in one micro-batch would round every sum in another order,
    # which GaLore's SVD turns into a different subspace where singular values are near-equal (measured: 14% of
    # the update on two H200s, against 2e-7 in float32 on the CPU, tests/test_distributed.py).
    two_log = run(script, tiny_model_dir, tmp_path / "two", [*TORCHRUN, "--standalone", "--nproc_per_node", "2"], 256,
                  "0,1", "--gradient_accumulation_steps", "1")
    run(script, tiny_model_dir, tmp_path / "one", [sys.executable], 256, "0", "--gradient_accumulation_steps", "2")

    assert losses_in(tmp_path / "two") == pytest.approx(losses_in(tmp_path / "one"), rel=2e-2)
    two = load_file(tmp_path / "two" / "final" / WEIGHTS[script])
    one = load_file(tmp_path / "one" / "final" / WEIGHTS[script])
    if script == "qlora":  # B starts at zero: its value is the update
        updates = {name: (two[name], one[name]) for name in one if "lora_B" in name}
    else:  # the update: the trained weight less the random one it started from
        start = load_file(tiny_model_dir / "model.safetensors")
        updates = {name: (two[name].float() - start[name].float(), one[name].float() - start[name].float())
                   for name in one if name in start and "proj" in name}
    assert updates
    whole = relative_difference(torch.cat([a.flatten().float() for a, _ in updates.values()]),
                                torch.cat([b.flatten().float() for _, b in updates.values()]))
    worst = max(relative_difference(a, b) for a, b in updates.values())
    print(f"{script}: update on two GPUs against one: {whole:.1%} overall, {worst:.1%} at worst")
    assert whole < 0.05 and worst < 0.1, (whole, worst)
    assert two_log.count("Saved to") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    if script == "galore":
        assert "GaLore projections identical on all 2 processes after step 1" in two_log


@pytest.mark.parametrize("script", ["qlora", "galore"])
def test_accelerate_launch_with_the_shipped_config(script, tiny_model_dir, tmp_path):
    log = run(script, tiny_model_dir, tmp_path, [*ACCELERATE, "--config_file", "configs/accelerate/one_host.yaml",
                                                 "--num_processes", "2"], 256)
    assert "x 2 device(s)" in log and log.count("Saved to") == 1
    assert (tmp_path / "final" / WEIGHTS[script]).is_file() and (tmp_path / "samples.md").is_file()


def test_two_single_gpu_hosts_meet_through_torchruns_rendezvous(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-hosts"]
    env = {**os.environ}
    hosts = []
    for gpu in ("0", "1"):  # each "host" sees one GPU, as two one-GPU machines would
        flags = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path), "--max_steps", "3",
                 "--max_tokens_per_batch", "256", "--max_seq_length", "256", "--max_train_samples", "64",
                 "--save_strategy", "no", "--num_sample_prompts", "0"]
        hosts.append(subprocess.Popen([*launch, "finetuning/train_qlora.py", *flags], cwd=REPO_ROOT,
                                      env={**env, "CUDA_VISIBLE_DEVICES": gpu}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [host.communicate(timeout=600)[0] for host in hosts]
    assert all(host.returncode == 0 for host in hosts), logs[0][-3000:] + logs[1][-3000:]
    assert any("x 2 device(s)" in log for log in logs)
    assert (tmp_path / "final" / WEIGHTS["qlora"]).is_file()


def test_plain_python_on_two_gpus_trains_on_one_and_says_how_to_use_both(tiny_model_dir, tmp_path):
    log = run("qlora", tiny_model_dir, tmp_path, [sys.executable], 512)
    assert "This machine has 2 GPUs; started by plain python, this run trains on one (cuda:0)" in log
    assert "torchrun --nproc_per_node 2 finetuning/train_qlora.py --model_name_or_path" in log
    assert (tmp_path / "final" / WEIGHTS["qlora"]).is_file()
