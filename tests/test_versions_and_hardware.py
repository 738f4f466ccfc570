"""Version pins, the CUDA check, and the precision choice."""
from __future__ import annotations

import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import common
from records import data
from cli import errors
from cli import versions

REPO_ROOT = versions.PROJECT_DIR.parent


# --- versions ---------------------------------------------------------------


def test_wrong_version_names_package_versions_and_fix():
    with pytest.raises(errors.SetupError) as info:
        versions.check_versions(packages=("trl", "peft"), installed={"trl": "0.9.0", "peft": "0.21.2"},
                              pins={"trl": "0.8.6", "peft": "0.21.2"})
    message = str(info.value)
    assert "trl: found 0.9.0, need 0.8.6" in message
    assert "pip install trl==0.8.6" in message
    assert "peft" not in message, "only the mismatched package is listed"
    assert "requirements.txt" in message


def test_missing_package_says_not_installed():
    with pytest.raises(errors.SetupError, match="bitsandbytes: found not installed, need 0.50.2"):
        versions.check_versions(packages=("bitsandbytes",), installed={"bitsandbytes": None},
                              pins={"bitsandbytes": "0.50.2"})


def test_every_problem_in_one_message():
    with pytest.raises(errors.SetupError) as info:
        versions.check_versions(packages=("trl", "transformers"), installed={"trl": "0.7.0", "transformers": "5.0.0"},
                              pins={"trl": "0.8.6", "transformers": "4.57.6"})
    assert "pip install trl==0.8.6 transformers==4.57.6" in str(info.value)


def test_names_are_normalised_against_the_pins():
    # requirements.txt may spell galore_torch / Galore-Torch; pins are keyed by the normalised name
    versions.check_versions(packages=("galore-torch",), installed={"galore-torch": "1.0"}, pins={"galore-torch": "1.0"})
    pins = versions.read_pins()
    assert all(name == name.lower() and "_" not in name for name in pins)


def test_matching_versions_pass():
    versions.check_versions(packages=("trl",), installed={"trl": "0.8.6"}, pins={"trl": "0.8.6"})


def test_pins():
    pins = versions.read_pins()
    assert pins["trl"] == "0.8.6"
    assert re.fullmatch(r"4\.57\.\d+", pins["transformers"])
    missing = [name for name in versions.CHECKED_PACKAGES if versions.normalise(name) not in pins]
    assert not missing, f"CHECKED_PACKAGES without a pin in requirements.txt: {missing}"


def test_torch_is_not_pinned_exactly():
    lines = [line.split("#", 1)[0].strip() for line in versions.REQUIREMENTS_FILE.read_text().splitlines()]
    assert not [line for line in lines if re.match(r"torch\s*==", line, re.I)], "Colab's CUDA torch must not be replaced"
    assert "torch" not in versions.read_pins()


SCRIPT_RUNS = {
    "help": ("finetuning/train_qlora.py", "--help"),
    "bad_flag": ("finetuning/train_galore.py", "--galore_rnk", "8"),
}


@pytest.fixture(scope="module")
def script_runs():
    """Both script runs at once (each spends ~10 s importing torch/transformers/trl)."""
    processes = {
        key: subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        for key, args in SCRIPT_RUNS.items()
    }
    results = {}
    for key, process in processes.items():
        stdout, stderr = process.communicate(timeout=180)
        results[key] = SimpleNamespace(returncode=process.returncode, stdout=stdout, stderr=stderr)
    return results


def test_help_runs_as_a_script(script_runs):
    result = script_runs["help"]
    assert result.returncode == 0, result.stderr
    for flag in ("--lora_r", "--per_device_train_batch_size", "--smoke", "--dataset_name"):
        assert flag in result.stdout


def test_bad_flag_as_a_script_is_one_message_and_exit_2(script_runs):
    result = script_runs["bad_flag"]
    assert result.returncode == 2, result.stderr
    assert "--galore_rnk" in result.stderr
    assert "Traceback" not in result.stderr


# --- hardware ---------------------------------------------------------------



def test_require_cuda_without_a_gpu(no_gpu):
    with pytest.raises(errors.SetupError) as info:
        common.require_cuda("QLoRA training")
    message = str(info.value)
    for word in ("QLoRA training", "CUDA", "Colab", "--smoke"):
        assert word in message


def test_require_cuda_on_a_mac(no_gpu, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    with pytest.raises(errors.SetupError, match="MPS") as info:
        common.require_cuda("X")
    assert "Apple" in str(info.value)


def fail_if_called(*args, **kwargs):
    raise AssertionError("data or model was loaded before the CUDA check")


@pytest.mark.parametrize("script", ["train_qlora", "train_galore"])
def test_main_checks_cuda_before_loading_anything(script, no_gpu, monkeypatch, tmp_path):
    module = __import__(script)
    monkeypatch.setattr(data, "load_train_and_eval", fail_if_called)
    monkeypatch.setattr(common, "load_tokenizer", fail_if_called)
    argv = ["--model_name_or_path", str(tmp_path / "no_model"), "--dataset_name", str(tmp_path / "no_data.json"),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(errors.SetupError, match="--smoke"):
        module.main(*module.parse_args(argv))
    assert not (tmp_path / "out").exists()


# --- precision --------------------------------------------------------------


def flags(bf16=False, fp16=False):
    return SimpleNamespace(bf16=bf16, fp16=fp16)


@pytest.fixture
def gpu(monkeypatch):
    def set_gpu(name, bf16):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)

    return set_gpu


def test_cpu_is_fp32():
    precision = common.choose_precision(flags(), on_cpu=True)
    assert (precision.name, precision.torch_dtype) == ("fp32", torch.float32)
    assert common.choose_precision(flags(bf16=True), on_cpu=True).name == "fp32"


def test_t4_gets_fp16(gpu):
    gpu("Tesla T4", bf16=False)
    precision = common.choose_precision(flags(), on_cpu=False)
    assert (precision.name, precision.torch_dtype, precision.fp16, precision.bf16) == ("fp16", torch.float16, True, False)
    assert "bfloat16" in precision.reason and "Tesla T4" in precision.reason


def test_bf16_gpu_gets_bf16(gpu):
    gpu("NVIDIA A100-SXM4-40GB", bf16=True)
    precision = common.choose_precision(flags(), on_cpu=False)
    assert (precision.name, precision.torch_dtype) == ("bf16", torch.bfloat16)


def test_fp16_flag_is_honoured_on_a_bf16_gpu(gpu):
    gpu("NVIDIA L4", bf16=True)
    assert common.choose_precision(flags(fp16=True), on_cpu=False).name == "fp16"


def test_bf16_flag_on_a_gpu_without_bf16(gpu):
    gpu("Tesla T4", bf16=False)
    with pytest.raises(errors.UserInputError, match="--bf16") as info:
        common.choose_precision(flags(bf16=True), on_cpu=False)
    assert "Tesla T4" in str(info.value)
