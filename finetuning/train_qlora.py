"""QLoRA finetuning of Gemma 3: 4-bit NF4 base weights (bitsandbytes) + LoRA adapters (peft), trained by trl's SFTTrainer.

    python finetuning/train_qlora.py --dataset_name my_data.jsonl --output_dir outputs/qlora
    python finetuning/train_qlora.py --smoke        # the whole pipeline on the CPU in under a minute

Every TrainingArguments flag works (--per_device_train_batch_size, --learning_rate,
--max_steps, ...); --help lists them all. A .json or .yaml file given as the first
argument supplies flags, and flags after it override them.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import common
import speed

try:  # before torch/transformers/trl load, so a wrong version is one clear message
    common.check_versions()
except common.SetupError as version_error:
    sys.exit(f"ERROR: {version_error}")

import torch  # noqa: E402
from peft import AutoPeftModelForCausalLM, LoraConfig  # noqa: E402
from transformers import AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import SFTTrainer  # noqa: E402

logger = logging.getLogger("finetuning.qlora")


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank: adapter size. 8-64 is usual."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (update scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapter input. 0, as Unsloth's default: 0.05 trained 10 percent fewer "
                  "tokens/s and took 0.7 GiB more at 32k tokens a batch on an H100 (bench/RESULTS.md). Try 0.05-0.1 "
                  "on small data sets, where it can curb overfitting."},
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every projection, as QLoRA's paper), or comma-separated module names."},
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also write OUTPUT_DIR/merged: the adapter merged into a 16-bit base, loadable without peft."},
    )

    def __post_init__(self):
        if self.lora_r < 1:
            raise common.UserInputError(f"--lora_r must be 1 or more, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise common.UserInputError(f"--lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise common.UserInputError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    def peft_config(self) -> LoraConfig:
        targets = self.lora_target_modules
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            bias="none",
            task_type="CAUSAL_LM",
        )


# The settings the troubleshooting log arrived at for a 16 GB T4; every one can be overridden by its flag.
TRAINING_DEFAULTS = dict(
    common.SHARED_TRAINING_DEFAULTS,
    output_dir="outputs/qlora",
    # One fused kernel for all adapter weights. The adapters' float32 states are about 100 MB for gemma-3-1b at r16;
    # bitsandbytes' paged 8-bit AdamW would save 80 MB of that, but waits for the GPU after every one of the 364 tensors.
    optim="adamw_torch_fused",
    learning_rate=2e-4,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    max_grad_norm=0.3,  # QLoRA paper's value: adapters on a 4-bit base are easily knocked off course
)


def main(argv: Sequence[str]) -> Optional[SFTTrainer]:
    # Load: every input checked, data and tokenizer first; the 4-bit model only once all of it passed.
    run = common.prepare_run(LoraArguments, argv, TRAINING_DEFAULTS, "QLoRA (bitsandbytes 4-bit layers and paged 8-bit AdamW)")
    if run.report_args.dry_run:
        return None
    lora_args = run.script_args
    model = load_quantized_model(run.model_path, run.precision, run.model_args.attn_implementation,
                                 run.model_args.trust_remote_code)
    common.prepare_numerics(model, run.precision)

    # Format and train: SFTTrainer formats, tokenizes, wraps the model in LoRA and trains.
    trainer = common.trainer_class(run)(model=model, peft_config=lora_args.peft_config(), **common.sft_inputs(run))
    fused = speed.fuse_lora_4bit(trainer.model, keep_dequantized_weight=run.training_args.gradient_checkpointing)
    common.log_settings(
        "QLoRA",
        run,
        trainer.model,
        {
            "base weights": f"NF4 4-bit, double quantization, compute in {run.precision.torch_dtype}".replace("torch.", ""),
            "LoRA": f"r={lora_args.lora_r}, alpha={lora_args.lora_alpha}, targets={lora_args.lora_target_modules}, "
                    f"{fused} layers on the fused 4-bit path",
            "loss": "answers only" if run.collator else "every token",
            "records": f"{len(run.records)} train" + (f", {len(run.eval_records)} eval" if run.eval_records else ""),
            "max_seq_length": run.data_args.max_seq_length,
        },
    )

    # Save: the adapter and the tokenizer (the base model stays where it came from); merged on request.
    final = common.train_and_save(trainer, run)
    if lora_args.merge:
        merged = merge_adapter(final, run.precision)
        logger.info("Merged the adapter into a 16-bit copy of the base model: %s", merged)
    if run.model_args.smoke:
        common.check_saved_model(AutoPeftModelForCausalLM.from_pretrained, final, run, "adapter")
    return trainer


def merge_adapter(adapter_dir: Path, precision: common.Precision) -> Path:
    """OUTPUT_DIR/merged: the adapter merged into a 16-bit base model, loadable without peft.

    The base is loaded again in 16 bits (on the CPU, so the GPU's memory is not
    needed): merging into the 4-bit weights would round the update away and
    leave a model only bitsandbytes can load.
    """
    dtype = torch.bfloat16 if precision.bf16 or precision.name == "fp32" else torch.float16
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=dtype, device_map={"": "cpu"})
    merged_model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

    def write(folder: Path) -> None:
        merged_model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)

    return common.write_atomically(adapter_dir.parent / "merged", write)


def load_quantized_model(
    model_path: str, precision: common.Precision, attn_implementation: str, trust_remote_code: bool = False
):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision.torch_dtype,
        # Gemma ties the 262k-row embedding to the output layer; quantizing it hurts quality most.
        llm_int8_skip_modules=["lm_head"],
    )
    device_map = {"": "cpu"} if precision.name == "fp32" else {"": torch.cuda.current_device()}
    return common.load_causal_lm(
        model_path,
        trust_remote_code,
        quantization_config=quantization,
        # The layers left unquantized (embeddings, norms) load in float32, where peft's
        # k-bit preparation would put them anyway: with fp16, that keeps the residual stream out of overflow.
        dtype=torch.float32 if precision.fp16 else precision.torch_dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
    )


if __name__ == "__main__":
    sys.exit(common.run_cli(main))
