"""The run's settings, resolved once: flags, the machine and the data turned into what every later step reads.

Two named steps, both in main() before any model weight loads:
- `check`: every flag and flag combination, the machine (CUDA, precision, plain python on several GPUs), the output
  folder's plan, taken for this run (run_lock.py), and a resumed checkpoint's settings (saved_settings.py); nothing is
  read from the data, and nothing written but the lock.
- `resolve`: once the data and tokenizer are loaded, the batch shape (auto_batch.py), the compile and offload choices
  (fastpath/choices.py) and the fast path; the effective settings logged once.

A smoke run's forced settings (the CPU, fp32) are applied here and nowhere else after parsing.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import transformers

import common

from records import loading
from cli.arguments import DataArguments, ModelArguments, ReportArguments, check_arguments
from cli.errors import UserInputError
from cli import noise
from cli.versions import environment_summary
from fastpath import choices, one_gpu
from fastpath.switchboard import FastPath
from cli.fast_path_flag import parse_fast_path
from models import hub
from training import auto_batch
from training import output_dir, processes, run_lock, saved_settings

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
          method: str, script: str, method_args=None) -> RunSettings:
    """Every flag, the machine and the output folder, before anything loads; nothing is deleted here. `script`: the
    calling script's path, for the torchrun command shown on a machine with several GPUs. `method_args`: the script's
    own (LoraArguments, GaloreArguments), compared with a resumed checkpoint's.

    The output folder is taken for this run (run_lock: refused where another run holds it) before it is planned, and
    held until main() ends (interruptions.whole_run)."""
    output_dir.require_output_dir_named(training_args.output_dir)
    check_arguments(model_args, data_args, training_args)
    hub.check_cache_variables()
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
    output = None  # a dry run writes nothing and takes no lock
    if not report_args.dry_run:
        output_dir.check_output_dir_writable(Path(training_args.output_dir))
        run_lock.take(training_args.output_dir, save_on_each_node=training_args.save_on_each_node)
        output = output_dir.plan_output_dir(training_args, smoke=model_args.smoke)
        output.settings = saved_settings.describe(method, model_args, data_args, method_args)
        if output.resume_from is not None:
            saved_settings.check_resume(output.resume_from, output.settings)
    hub.use_colab_token()
    if "trackio" in training_args.report_to and not getattr(training_args, "trackio_space_id", None):
        noise.correct_trackio_finish_line()  # trackio says it uploads a local run's logs
    on_cpu = model_args.smoke or report_args.dry_run
    precision = common.choose_precision(training_args, on_cpu=on_cpu)
    logger.info("Environment: %s", environment_summary())
    # The one copy of the arguments this run makes: a smoke run on the CPU in fp32, else the chosen precision.
    training_args = dataclasses.replace(training_args, bf16=precision.bf16, fp16=precision.fp16,
                                        **({"use_cpu": True} if model_args.smoke else {}))
    processes.use_one_gpu_without_launcher(training_args, script, "one_gpu" in switches and one_gpu.can_pin_one_gpu())
    if not on_cpu:  # a model this GPU cannot hold stops here, with its memory estimate and the card it needs
        auto_batch.check_model_fits(method, model_args, data_args, training_args, method_args)
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
