"""Full-parameter finetuning of Gemma 3 with the GaLore optimizer (galore-torch, 8-bit states), trained by trl's SFTTrainer.

    python finetuning/train_galore.py --dataset_name my_data.jsonl --output_dir outputs/galore
    python finetuning/train_galore.py --smoke        # the whole pipeline on the CPU in under a minute

GaLore trains every weight, but keeps Adam's state for the attention and MLP
matrices in a low-rank projection of their gradients, so a 1B model's full
finetune fits a 16 GB T4. Every TrainingArguments flag works; --help lists them all.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import common

try:  # before torch/transformers/trl load, so a wrong version is one clear message
    common.check_versions()
except common.SetupError as version_error:
    sys.exit(f"ERROR: {version_error}")

import torch  # noqa: E402
from bitsandbytes.optim.optimizer import Optimizer2State  # noqa: E402
from galore_torch import GaLoreAdamW8bit  # noqa: E402
from galore_torch.galore_projector import GaLoreProjector  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import SFTTrainer  # noqa: E402

logger = logging.getLogger("finetuning.galore")

PROJECTION_TYPES = ("std", "reverse_std", "right", "left", "full")


@dataclass
class GaloreArguments:
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
            raise common.UserInputError(f"--galore_rank must be 1 or more, got {self.galore_rank}.")
        if self.galore_update_proj_gap < 1:
            raise common.UserInputError(f"--galore_update_proj_gap must be 1 or more, got {self.galore_update_proj_gap}.")
        if not self.galore_scale > 0:
            raise common.UserInputError(f"--galore_scale must be positive, got {self.galore_scale}.")
        if self.galore_proj_type not in PROJECTION_TYPES:
            raise common.UserInputError(
                f"--galore_proj_type {self.galore_proj_type!r} is not one of {', '.join(PROJECTION_TYPES)}."
            )


class GaLoreAdamW8bitFixed(GaLoreAdamW8bit):
    """galore-torch's GaLoreAdamW8bit with its bitsandbytes settings bound by keyword.

    galore-torch 1.0 passes `percentile_clipping=100, block_wise=True` to
    bitsandbytes' Optimizer2State by position. bitsandbytes 0.50 dropped those two
    parameters, so the values land in `max_unorm=100, skip_zeros=True`. Where a
    projected gradient is small enough for 32-bit states (under 4,096 values: small
    layers, low ranks) that update-norm clipping holds the weights almost still;
    the blockwise 8-bit path of larger ones ignores it, which hides the fault on
    the real model. Binding by keyword gives what galore-torch meant everywhere: no
    clipping, blockwise 8-bit states (bitsandbytes' default now).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, is_paged=False):
        Optimizer2State.__init__(
            self, "adam", params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=8, is_paged=is_paged
        )

    @torch.no_grad()
    def step(self, closure=None):
        if self.is_paged:
            return super().step(closure)
        # galore-torch calls torch.cuda.synchronize() after every weight's update. Every
        # kernel of the step runs on one stream, in order, so nothing needs it unless
        # the states are paged; on a GPU each call drains the queue (about 340 a step
        # for gemma-3-1b), and on the CPU (--smoke, the tests) it would fail.
        synchronize = torch.cuda.synchronize
        torch.cuda.synchronize = lambda *args, **kwargs: None
        try:
            return super().step(closure)
        finally:
            torch.cuda.synchronize = synchronize


# The optimizer state keeps a GaLoreProjector per weight (its rank, gap, scale and
# projection matrix: plain values and a tensor). The Trainer reloads checkpoints with
# torch.load(weights_only=True), which refuses any class not allowed here.
torch.serialization.add_safe_globals([GaLoreProjector])

TRAINING_DEFAULTS = dict(
    common.SHARED_TRAINING_DEFAULTS,
    output_dir="outputs/galore",
    learning_rate=1e-5,
    # Batch 2 x 1,024 tokens ran out of memory on a 16 GB T4 with the stock loss (TROUBLESHOOTING.md); 1 x 8 is the
    # same effective batch.
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
)


def main(argv: Sequence[str]) -> Optional[SFTTrainer]:
    # Load: every input checked, data and tokenizer first; the model only once all of it passed.
    run = common.prepare_run(GaloreArguments, argv, TRAINING_DEFAULTS, "GaLore with 8-bit optimizer states (bitsandbytes)")
    if run.report_args.dry_run:
        return None
    galore_args = run.script_args
    if run.model_args.smoke:
        galore_args.galore_rank = min(galore_args.galore_rank, 8)  # the tiny model's layers are 64 wide
    else:
        torch.cuda.empty_cache()  # a notebook's earlier run may still hold cached blocks
    model = load_model(run.model_path, run.precision, run.model_args.attn_implementation,
                       run.model_args.trust_remote_code)
    common.prepare_numerics(model, run.precision)
    optimizer = build_optimizer(model, galore_args, run.training_args)

    # Format and train
    trainer = common.trainer_class(run)(
        model=model,
        optimizers=(optimizer, None),  # the scheduler is built by the Trainer from --lr_scheduler_type
        **common.sft_inputs(run),
    )
    galore_weights = sum(p.numel() for p in optimizer.param_groups[0]["params"])
    common.log_settings(
        "GaLore",
        run,
        model,
        {
            "optimizer": "GaLoreAdamW8bit (galore-torch, bitsandbytes 8-bit states)",
            "GaLore": f"rank={galore_args.galore_rank}, update_proj_gap={galore_args.galore_update_proj_gap}, "
            f"scale={galore_args.galore_scale}, proj_type={galore_args.galore_proj_type}, "
            f"{galore_weights:,} weights projected ({galore_args.galore_target_modules})",
            "weights": f"{run.precision.torch_dtype}".replace("torch.", "")
            + (" master weights with fp16 autocast" if run.precision.fp16 else ""),
            "loss": "answers only" if run.collator else "every token",
            "records": f"{len(run.records)} train" + (f", {len(run.eval_records)} eval" if run.eval_records else ""),
            "max_seq_length": run.data_args.max_seq_length,
        },
    )

    # Save: the whole model (safetensors) and the tokenizer.
    final = common.train_and_save(trainer, run)
    if run.model_args.smoke:
        common.check_saved_model(AutoModelForCausalLM.from_pretrained, final, run, "model")
    return trainer


def load_model(
    model_path: str, precision: common.Precision, attn_implementation: str, trust_remote_code: bool = False
):
    # fp16 training keeps fp32 master weights (the loss scaler cannot unscale fp16
    # gradients); with bf16 the weights themselves are bf16, as GaLore's paper trains.
    dtype = torch.bfloat16 if precision.bf16 else torch.float32
    model = common.load_causal_lm(model_path, trust_remote_code, dtype=dtype, attn_implementation=attn_implementation)
    return model.to("cpu" if precision.name == "fp32" else "cuda")


def build_optimizer(model, galore_args: GaloreArguments, training_args) -> GaLoreAdamW8bitFixed:
    """GaLore for the 2-D weights of the target linear layers; plain 8-bit AdamW for embeddings and norms."""
    targets = [t.strip() for t in galore_args.galore_target_modules.split(",") if t.strip()]
    projected, regular = [], []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(t in module_name for t in targets):
            weight = module.weight
            if galore_args.galore_rank >= min(weight.shape):
                raise common.UserInputError(
                    f"--galore_rank {galore_args.galore_rank} is not below the smaller side of {module_name} "
                    f"{tuple(weight.shape)}: GaLore would save nothing. Use a rank below {min(weight.shape)}."
                )
            projected.append(weight)
    if not projected:
        raise common.UserInputError(
            f"--galore_target_modules {galore_args.galore_target_modules!r} matches no linear layer of the model. "
            "Gemma 3's are under 'self_attn' and 'mlp'."
        )
    projected_ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in projected_ids]
    return GaLoreAdamW8bitFixed(
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


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
