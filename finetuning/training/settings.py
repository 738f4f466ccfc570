"""The run's settings, resolved once: flags, the machine and the data turned into what every later step reads.

Two named steps, both in main() before any model weight loads:
- `check`: every flag and flag combination, the machine (CUDA, precision, plain python on several GPUs), the output
  folder's plan; nothing is read from the data and nothing written yet.
- `resolve`: once the data and tokenizer are loaded, the batch shape (auto_batch.py), the compile and offload choices
  (fastpath/choices.py) and the fast path; the effective settings logged once.

A smoke run's forced settings (the CPU, fp32) are applied here and nowhere else after parsing.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import transformers

import common

from records import loading
from cli.arguments import DataArguments, ModelArguments, ReportArguments, check_arguments
from cli.errors import UserInputError
from cli.versions import environment_summary
from fastpath import choices, one_gpu
from fastpath.switchboard import FastPath
from cli.fast_path_flag import parse_fast_path
from models import hub
from training import auto_batch
from training import output_dir, processes

logger = logging.getLogger(__name__)

GPU_FEATURE = {"QLoRA": "QLoRA (bitsandbytes 4-bit layers)", "GaLore": "GaLore with 8-bit optimizer states (bitsandbytes)"}


@dataclass(frozen=True)
class RunSettings:
    method: str  # "QLoRA" or "GaLore"
    training_args: transformers.TrainingArguments
    data_args: DataArguments
    precision: common.Precision
    output: Optional[output_dir.OutputPlan]  # None for a dry run, which writes nothing
    fast_path: FastPath


def check(model_args: ModelArguments, data_args: DataArguments, report_args: ReportArguments, training_args,
          method: str, script: str) -> RunSettings:
    """Every flag, the machine and the output folder, before anything loads; nothing is deleted here. `script`: the
    calling script's path, for the torchrun command shown on a machine with several GPUs."""
    check_arguments(model_args, data_args, training_args)
    switches = parse_fast_path(model_args.fast_path)
    for flag, switch in (("compile_layers", "compile_layers"), ("offload_activations", "offload")):
        if getattr(model_args, flag) == "yes" and switch not in switches:
            raise UserInputError(f"--{flag} yes and --fast_path {model_args.fast_path}, which leaves {switch} off: "
                                 "give one of the two.")
    unreachable = training_args.push_to_hub and not report_args.dry_run and hub.hub_unreachable()
    if unreachable:
        raise UserInputError(
            f"--push_to_hub: {unreachable[0]} cannot be reached from this machine ({unreachable[1]}), so the trained "
            "model could not be pushed. Check the network, or leave out --push_to_hub: the model is saved in "
            "--output_dir either way, and can be pushed later with huggingface-cli upload."
        ) from unreachable[1]
    if not (model_args.smoke or report_args.dry_run):
        common.require_cuda(GPU_FEATURE[method])
    output = None if report_args.dry_run else output_dir.plan_output_dir(training_args, smoke=model_args.smoke)
    hub.use_colab_token()
    on_cpu = model_args.smoke or report_args.dry_run
    precision = common.choose_precision(training_args, on_cpu=on_cpu)
    logger.info("Environment: %s", environment_summary())
    # The one copy of the arguments this run makes: a smoke run on the CPU in fp32, else the chosen precision.
    training_args = dataclasses.replace(training_args, bf16=precision.bf16, fp16=precision.fp16,
                                        **({"use_cpu": True} if model_args.smoke else {}))
    processes.use_one_gpu_without_launcher(training_args, script, "one_gpu" in switches and one_gpu.can_pin_one_gpu())
    transformers.set_seed(training_args.seed)  # the same LoRA initialisation on every run with the same --seed
    fast_path = FastPath(switches, method=method, fp16=precision.fp16, text=model_args.fast_path)
    return RunSettings(method, training_args, data_args, precision, output, fast_path)


def resolve(run: RunSettings, model_args: ModelArguments, loaded: loading.RunData, dropout: float = 0.0) -> RunSettings:
    """The batch shape, the speed choices and the fast path, from the loaded data; logged once."""
    data_args, training_args = auto_batch.choose_batch(run.method, run.data_args, run.training_args, loaded)
    speed = choices.choose(model_args, data_args, training_args, dropout, run.fast_path.switches)
    fast_path = dataclasses.replace(
        run.fast_path, speed=speed, padding_free=bool(data_args.packs_without_padding),
        # Under checkpointing one recomputed layer's dequantized weights at a time are kept for its backward pass.
        keep_dequantized_weight=run.method == "QLoRA" and training_args.gradient_checkpointing)
    return dataclasses.replace(run, data_args=data_args, training_args=training_args, fast_path=fast_path)
