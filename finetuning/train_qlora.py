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
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from cli import startup  # noqa: F401  (first: checks the library versions before torch loads)
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig
from transformers import BitsAndBytesConfig, TrainerCallback, TrainingArguments
from trl import SFTTrainer

import common
from cli import arguments, command_line, parsing
from cli.arguments import DataArguments, ModelArguments, ReportArguments
from cli.errors import UserInputError
from models import shapes
from records import batching, loading
from training import interruptions, loop, processes, report_card, reports, saving, settings

logger = logging.getLogger(__name__)


LORA_INITS = ("default", "gaussian", "olora")
LORA_INITS_NEEDING_16_BITS = ("pissa", "loftq")


@dataclass
class LoraArguments:
    lora_r: int = field(default=16, metadata={"help": "LoRA rank: adapter size. 8-64 is usual."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (update scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapter input. 0, as Unsloth's default: 0.05 is slower and takes more "
                  "memory (docs/benchmarks.md). Try 0.05-0.1 on small data sets, where it can curb overfitting."},
    )
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "'all-linear' (every projection, as QLoRA's paper), or comma-separated module names."},
    )
    merge: bool = field(
        default=False,
        metadata={"help": "Also write OUTPUT_DIR/merged: the adapter merged into a 16-bit base, loadable without peft."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilised LoRA: scale updates by alpha/sqrt(r) instead of alpha/r, so a high rank "
                  "(64+) still learns."},
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: learn each weight's magnitude apart from its direction. Slower (peft's own layers, "
                  "not the fused 4-bit path)."},
    )
    init_lora_weights: str = field(
        default="default",
        metadata={"help": f"How the adapters start: {', '.join(LORA_INITS)}. default: A random, B zero (the update "
                  "starts at zero); gaussian: A Gaussian; olora: from a QR decomposition of each 4-bit weight (saved "
                  "converted into a plain LoRA adapter of twice the rank, for the original base). pissa and loftq need the base in 16 "
                  "bits and are refused."},
    )

    def __post_init__(self):
        if self.init_lora_weights not in LORA_INITS + LORA_INITS_NEEDING_16_BITS:
            raise UserInputError(
                f"--init_lora_weights {self.init_lora_weights!r} is not one of {', '.join(LORA_INITS)}.")
        if self.init_lora_weights in LORA_INITS_NEEDING_16_BITS:
            raise UserInputError(
                f"--init_lora_weights {self.init_lora_weights}: it starts from the base weights in 16 bits (an SVD, "
                "or quantizing them itself), and QLoRA holds them in 4 bits. Use olora (which starts from the 4-bit "
                "weights themselves) or gaussian; or train every weight with train_galore.py."
            )
        if self.use_dora and self.init_lora_weights == "olora":
            raise UserInputError("--use_dora with --init_lora_weights olora: peft cannot convert the trained DoRA "
                                 "adapter back onto the original base. Choose one.")
        if self.lora_r < 1:
            raise UserInputError(f"--lora_r must be 1 or more, got {self.lora_r}.")
        if self.lora_alpha <= 0:
            raise UserInputError(f"--lora_alpha must be positive, got {self.lora_alpha}.")
        if not 0 <= self.lora_dropout < 1:
            raise UserInputError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    def peft_config(self, model=None) -> LoraConfig:
        """`model`: a multimodal Gemma 3 (gemma-3-4b) gets its targets inside the language model only, as a regular
        expression: "all-linear" or a list would also wrap the vision tower's layers (q_proj, k_proj, v_proj, ...)."""
        targets = self.lora_target_modules
        target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
        if model is not None and shapes.is_multimodal(model):
            names = common.linear_layer_names(model) - {"lm_head"} if targets == "all-linear" else target_modules
            target_modules = shapes.language_model_targets(names)
            logger.info("LoRA targets the language model's %s only: %s's vision tower and projector stay frozen "
                        "(text-only training).", ", ".join(sorted(names)), type(model).__name__)
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=target_modules,
            bias="none",
            task_type="CAUSAL_LM",
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init_lora_weights=True if self.init_lora_weights == "default" else self.init_lora_weights,
        )


# The settings the troubleshooting log arrived at for a 16 GB T4; every one can be overridden by its flag.
TRAINING_DEFAULTS = dict(
    arguments.SHARED_TRAINING_DEFAULTS,
    output_dir="outputs/qlora",
    # One fused kernel for all adapter weights; bitsandbytes' paged 8-bit AdamW would save a little memory but waits
    # for the GPU after every adapter tensor.
    optim="adamw_torch_fused",
    learning_rate=2e-4,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    max_grad_norm=0.3,  # QLoRA paper's value: adapters on a 4-bit base are easily knocked off course
)


@interruptions.whole_run  # SIGTERM/Ctrl-C outside training: one line; the output folder's lock released
def main(model_args: ModelArguments, data_args: DataArguments, report_args: ReportArguments, lora_args: LoraArguments,
         training_args: TrainingArguments, callbacks: Optional[list[TrainerCallback]] = None) -> Optional[SFTTrainer]:
    # ===== Check: every flag, the machine and the output dir; nothing loads and nothing is deleted yet =====
    run = settings.check(model_args, data_args, report_args, training_args, "QLoRA", __file__, lora_args)

    # ===== Load data and tokenizer: a bad record must not cost a model download =====
    loaded = loading.load_data_and_tokenizer(model_args, data_args, report_args, run.training_args)
    run = settings.resolve(run, model_args, loaded, dropout=lora_args.lora_dropout)  # batch shape, speed, fast path
    if report_args.dry_run:
        reports.dry_run_report(loaded, run.data_args, run.training_args)
        return None

    # ===== Load model: 4-bit NF4 base weights =====
    check_lora_targets(loaded.model_path, lora_args, model_args.trust_remote_code)
    model = load_quantized_model(loaded.model_path, run.precision, run.training_args.device,
                                 model_args.attn_implementation, model_args.trust_remote_code)

    # ===== Format: SFTTrainer formats and tokenizes the records and wraps the model in LoRA =====
    with run.fast_path.building_trainer(run.precision.bf16):  # no float32 copy of the embeddings on the way
        trainer = batching.build_trainer(model, loaded, run.data_args, run.training_args, callbacks,
                                         peft_config=lora_args.peft_config(model))
    initial_adapter = save_initial_adapter(trainer, lora_args)
    base_answers = report_card.answer_base(trainer, loaded, report_args)  # OLoRA only: else the adapter is disabled

    # ===== Train: the fast path in place for the training only; an earlier run is deleted only now =====
    with run.fast_path.installed(trainer) as fast:
        reports.log_settings("QLoRA", trainer, run.precision, run.data_args, loaded, {
            "base weights": f"NF4 4-bit, double quantization, compute in {run.precision.torch_dtype}".replace("torch.", ""),
            "LoRA": f"r={lora_args.lora_r}, alpha={lora_args.lora_alpha}, targets={lora_args.lora_target_modules}, "
                    f"init {lora_args.init_lora_weights}{', rsLoRA' if lora_args.use_rslora else ''}"
                    f"{', DoRA (peft layers: the fused path has no DoRA)' if lora_args.use_dora else ''}, "
                    + fused_path_text(fast.get("lora_4bit", "off")),
        })
        samples_before = reports.sample_answers(trainer, loaded, report_args)
        if processes.writes(trainer.args):
            loading.write_data_report(loaded, run.output.output_dir)
        train_result = loop.train(trainer, run.output, report_args.time_budget_seconds)

    # ===== Save: the adapter and the tokenizer (the base model stays where it came from); merged on request =====
    final = saving.save_final(trainer, loaded.tokenizer, initial_adapter)  # None on processes that do not write
    reports.write_reports(trainer, train_result, loaded, report_args, samples_before)
    report_card.write(trainer, loaded, report_args, base_answers)  # base (adapter disabled) vs trained: report_card.md
    if final and lora_args.merge:
        dtype = torch.bfloat16 if run.precision.bf16 or run.precision.name == "fp32" else torch.float16
        logger.info("Merged the adapter into a 16-bit copy of the base model: %s", saving.merge_adapter(final, dtype))
    if final and model_args.smoke:
        reports.check_saved_model(AutoPeftModelForCausalLM.from_pretrained, final, loaded, report_args, "adapter")
    return trainer


def fused_path_text(done: str) -> str:
    """What the fast path's lora_4bit switch did, as the settings block says it."""
    return f"{done} on the fused 4-bit path" if done.endswith("layers") else f"fused 4-bit path {done}"


def save_initial_adapter(trainer, lora_args: LoraArguments) -> Optional[Path]:
    """OLoRA moves part of each base weight into the adapter. The adapter as it starts, saved to a temporary folder,
    lets save_final convert the trained one into a plain LoRA adapter for the original base, which tools that do
    not rerun OLoRA's initialisation (vLLM, llama.cpp, a second adapter) load as well."""
    if lora_args.init_lora_weights != "olora" or not processes.writes(trainer.args):
        return None
    folder = Path(tempfile.mkdtemp(prefix="olora-initial-adapter-"))
    trainer.model.save_pretrained(folder)
    return folder


def check_lora_targets(model_path: str, lora_args: LoraArguments, trust_remote_code: bool) -> None:
    """Every name in --lora_target_modules names linear layers of the model, and --lora_r fits them, from its config
    alone (no weights)."""
    model = common.empty_model(model_path, trust_remote_code)
    available = common.linear_layer_names(model) - {"lm_head"}
    targets = available if lora_args.lora_target_modules == "all-linear" else set(lora_args.peft_config().target_modules)
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise UserInputError(
            f"--lora_target_modules {lora_args.lora_target_modules!r}: {', '.join(sorted(unknown))} names no linear "
            f"layer of the model. Its linear layers are {', '.join(sorted(available))}; or use all-linear."
        )
    sides = {min(m.in_features, m.out_features): name for name, m in shapes.text_linear_layers(model)
             if name.rsplit(".", 1)[-1] in targets}
    if sides and lora_args.lora_r > min(sides):
        # A rank above a layer's smaller side adds parameters and no expressiveness: B·A is at most that rank.
        raise UserInputError(
            f"--lora_r {lora_args.lora_r} is larger than the smaller side of {sides[min(sides)]} ({min(sides)}): an "
            f"adapter's update cannot have a rank above that, and the adapter would hold more parameters than the "
            f"layer it adapts. Use --lora_r {min(sides)} or less (8-64 is usual)"
            + ("; the --smoke model is 64 wide." if min(sides) <= 64 else ".")
        )


def load_quantized_model(model_path: str, precision: common.Precision, device: torch.device,
                         attn_implementation: str, trust_remote_code: bool = False):
    """The base model in 4 bits on `device`: this process's own GPU under DDP (a 4-bit model cannot be moved)."""
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=precision.torch_dtype,
        # Gemma ties the 262k-row embedding to the output layer; quantizing it hurts quality most.
        llm_int8_skip_modules=["lm_head"],
    )
    return common.load_causal_lm(
        model_path,
        trust_remote_code,
        quantization_config=quantization,
        # The layers left unquantized (embeddings, norms) load in float32, where peft's
        # k-bit preparation would put them anyway: with fp16, that keeps the residual stream out of overflow.
        dtype=torch.float32 if precision.fp16 else precision.torch_dtype,
        device_map={"": "cpu" if torch.device(device).type == "cpu" else device},  # DDP on the CPU gives "cpu:0"
        attn_implementation=attn_implementation,
    )


def parse_args(argv: Sequence[str]) -> tuple:
    """(model, data, report, lora, training) arguments: the command line, or a config file and flags after it."""
    return parsing.parse_arguments(LoraArguments, TRAINING_DEFAULTS, argv)


if __name__ == "__main__":
    sys.exit(command_line.run_cli(parse_args, main))
