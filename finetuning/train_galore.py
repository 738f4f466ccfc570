"""Full-parameter finetuning of Gemma 3 with the GaLore optimizer (galore-torch, 8-bit states), trained by trl's SFTTrainer.

    python finetuning/train_galore.py --dataset_name my_data.jsonl --output_dir outputs/galore
    python finetuning/train_galore.py --smoke        # the whole pipeline on the CPU in under a minute

GaLore trains every weight, but keeps Adam's state for the attention and MLP
matrices in a low-rank projection of their gradients, so a 1B model's full
finetune fits a 16 GB T4. Every TrainingArguments flag works; --help lists them all.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

from cli import startup  # noqa: F401  (first: checks the library versions before torch loads)
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments
from trl import SFTTrainer

import common
from cli import arguments, command_line, parsing
from cli.arguments import DataArguments, ModelArguments, ReportArguments
from cli.errors import UserInputError
from fastpath import galore_8bit
from models import shapes
from records import batching, loading
from training import interruptions, loop, processes, report_card, reports, saving, settings

logger = logging.getLogger(__name__)

PROJECTION_TYPES = ("std", "reverse_std", "right", "left", "full")


TRAINER_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}


@dataclass
class GaloreArguments:
    # The Trainer's optimizer flags, which this script does not use: hidden from --help, refused if given.
    trainer_flags_not_used: ClassVar[tuple] = ("optim", "optim_args", "optim_target_modules")
    # --smoke's tiny model is 64 wide: a rank must stay below that.
    smoke_caps: ClassVar[dict] = {"galore_rank": 8}

    galore_rank: int = field(default=128, metadata={"help": "Rank of the gradient projection (optimizer memory grows with it)."})
    galore_update_proj_gap: int = field(default=200, metadata={"help": "Steps between recomputing each projection (an SVD)."})
    galore_scale: float = field(default=1.0, metadata={"help": "Multiplier on the projected-back update."})
    galore_proj_type: str = field(default="std", metadata={"help": f"Projection side: one of {', '.join(PROJECTION_TYPES)}."})
    galore_target_modules: str = field(
        default="self_attn,mlp",
        metadata={"help": "Comma-separated name parts: the linear layers under them get GaLore; the rest plain AdamW."},
    )

    def __post_init__(self):
        if self.galore_rank < 1:
            raise UserInputError(f"--galore_rank must be 1 or more, got {self.galore_rank}.")
        if self.galore_update_proj_gap < 1:
            raise UserInputError(f"--galore_update_proj_gap must be 1 or more, got {self.galore_update_proj_gap}.")
        if not self.galore_scale > 0:
            raise UserInputError(f"--galore_scale must be positive, got {self.galore_scale}.")
        if self.galore_proj_type not in PROJECTION_TYPES:
            raise UserInputError(f"--galore_proj_type {self.galore_proj_type!r} is not one of {', '.join(PROJECTION_TYPES)}.")


TRAINING_DEFAULTS = dict(
    arguments.SHARED_TRAINING_DEFAULTS,
    output_dir="outputs/galore",
    learning_rate=1e-5,
    # Batch 2 x 1,024 tokens ran out of memory on a 16 GB T4 with the stock loss (TROUBLESHOOTING.md); 1 x 8 is the
    # same effective batch.
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
)


@interruptions.whole_run  # SIGTERM/Ctrl-C outside training: one line; the output folder's lock released
def main(model_args: ModelArguments, data_args: DataArguments, report_args: ReportArguments, galore_args: GaloreArguments,
         training_args: TrainingArguments, callbacks: Optional[list[TrainerCallback]] = None) -> Optional[SFTTrainer]:
    # ===== Check: every flag, the machine and the output dir; nothing loads and nothing is deleted yet =====
    if "layerwise" in str(training_args.optim):
        raise UserInputError(
            f"--optim {training_args.optim}: layerwise GaLore steps each weight inside the backward pass, which DDP "
            "(torchrun, several GPUs) cannot run, and the Trainer cannot clip or accumulate its gradients. This "
            "script's GaLore steps once per batch and fits gemma-3-1b on a 16 GB T4: leave --optim out."
        )
    if any(getattr(training_args, name) != TRAINER_DEFAULTS[name] for name in GaloreArguments.trainer_flags_not_used):
        raise UserInputError(
            f"{', '.join('--' + n for n in GaloreArguments.trainer_flags_not_used)}: this script's optimizer is always "
            "GaLore with 8-bit states; set it with the --galore_* flags (--help lists them), and leave these out."
        )
    run = settings.check(model_args, data_args, report_args, training_args, "GaLore", __file__, galore_args)

    # ===== Load data and tokenizer: a bad record must not cost a model load =====
    loaded = loading.load_data_and_tokenizer(model_args, data_args, report_args, run.training_args)
    run = settings.resolve(run, model_args, loaded)  # batch shape, speed, fast path
    if report_args.dry_run:
        reports.dry_run_report(loaded, run.data_args, run.training_args)
        return None

    # ===== Load model: every weight trainable; GaLore for the attention and MLP matrices =====
    check_galore_targets(loaded.model_path, galore_args, model_args.trust_remote_code)
    if not model_args.smoke:
        torch.cuda.empty_cache()  # a notebook's earlier run may still hold cached blocks
    model = load_model(loaded.model_path, run.precision, run.training_args.device, model_args.attn_implementation,
                       model_args.trust_remote_code)
    optimizer = build_optimizer(model, galore_args, run.training_args, run.fast_path.galore_class())

    # ===== Format: SFTTrainer formats and tokenizes the records =====
    trainer = batching.build_trainer(model, loaded, run.data_args, run.training_args,
                                     [processes.GaloreProjectionsAgree(), *(callbacks or [])],
                                     optimizers=(optimizer, None))  # the Trainer builds the scheduler

    # ===== Train: the fast path in place for the training only; an earlier run is deleted only now =====
    base_answers = report_card.answer_base(trainer, loaded, report_args)  # now: training changes the weights in place
    with run.fast_path.installed(trainer):
        reports.log_settings("GaLore", trainer, run.precision, run.data_args, loaded, {
            "optimizer": f"{type(optimizer).__name__} (galore-torch, bitsandbytes 8-bit states)",
            "GaLore": f"rank={galore_args.galore_rank}, update_proj_gap={galore_args.galore_update_proj_gap}, "
                      f"scale={galore_args.galore_scale}, proj_type={galore_args.galore_proj_type}, "
                      f"{sum(p.numel() for p in optimizer.param_groups[0]['params']):,} weights projected "
                      f"({galore_args.galore_target_modules})",
            "weights": f"{run.precision.torch_dtype}".replace("torch.", "")
                       + (" master weights with fp16 autocast" if run.precision.fp16 else ""),
        })
        samples_before = reports.sample_answers(trainer, loaded, report_args)
        if processes.writes(trainer.args):
            loading.write_data_report(loaded, run.output.output_dir)
        train_result = loop.train(trainer, run.output, report_args.time_budget_seconds)

    # ===== Save: the whole model (safetensors) and the tokenizer =====
    final = saving.save_final(trainer, loaded.tokenizer)  # None on the processes that do not write (DDP)
    reports.write_reports(trainer, train_result, loaded, report_args, samples_before)
    report_card.write(trainer, loaded, report_args, base_answers)  # base vs trained: report_card.md
    if final and model_args.smoke:
        reports.check_saved_model(AutoModelForCausalLM.from_pretrained, final, loaded, report_args, "model")
    return trainer


def load_model(model_path: str, precision: common.Precision, device: torch.device, attn_implementation: str,
               trust_remote_code: bool = False):
    # fp16 training keeps fp32 master weights (the loss scaler cannot unscale fp16
    # gradients); with bf16 the weights themselves are bf16, as GaLore's paper trains.
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    model = common.load_causal_lm(model_path, trust_remote_code, dtype=dtype, attn_implementation=attn_implementation)
    frozen = shapes.freeze_vision(model)  # a multimodal Gemma 3 (gemma-3-4b): text-only training, its language model
    if frozen:
        logger.info("%s: the vision tower and projector (%s weights) stay frozen, outside the optimizer; the language "
                    "model trains.", type(model).__name__, f"{frozen:,}")
    return model.to(device)


def projected_weights(model, galore_args: GaloreArguments) -> list:
    """The 2-D weights GaLore projects: the linear layers under --galore_target_modules, each wider than the rank;
    in a multimodal Gemma 3 those of its language model only (shapes.text_linear_layers)."""
    targets = [t.strip() for t in galore_args.galore_target_modules.split(",") if t.strip()]
    projected = []
    for module_name, module in shapes.text_linear_layers(model):
        if any(t in module_name for t in targets):
            weight = module.weight
            if galore_args.galore_rank >= min(weight.shape):
                raise UserInputError(
                    f"--galore_rank {galore_args.galore_rank} is not below the smaller side of {module_name} "
                    f"{tuple(weight.shape)}: GaLore would save nothing. Use a rank below {min(weight.shape)}."
                )
            projected.append(weight)
    if not projected:
        raise UserInputError(
            f"--galore_target_modules {galore_args.galore_target_modules!r} matches no linear layer of the model. "
            "Gemma 3's are under 'self_attn' and 'mlp'."
        )
    return projected


def check_galore_targets(model_path: str, galore_args: GaloreArguments, trust_remote_code: bool) -> None:
    """--galore_rank and --galore_target_modules against the model's shapes, from its config alone (no weights)."""
    projected_weights(common.empty_model(model_path, trust_remote_code), galore_args)


def build_optimizer(model, galore_args: GaloreArguments, training_args, optimizer_class: Optional[type] = None):
    """GaLore for the 2-D weights of the target linear layers; plain 8-bit AdamW for embeddings and norms.
    `optimizer_class`: the fast path's (FastPath.galore_class); by default both its GaLore overrides."""
    projected = projected_weights(model, galore_args)
    projected_ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in projected_ids]
    optimizer_class = optimizer_class or galore_8bit.galore_adamw8bit()
    return optimizer_class(
        [
            {
                "params": projected,
                "rank": galore_args.galore_rank,
                "update_proj_gap": galore_args.galore_update_proj_gap,
                "scale": galore_args.galore_scale,
                "proj_type": galore_args.galore_proj_type,
            },
            {"params": regular},
        ],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
        weight_decay=training_args.weight_decay,
    )


def parse_args(argv: Sequence[str]) -> tuple:
    """(model, data, report, galore, training) arguments: the command line, or a config file and flags after it."""
    return parsing.parse_arguments(GaloreArguments, TRAINING_DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(command_line.run_cli(parse_args, main))
