"""The Unsloth setups of run_bench.py: Unsloth's QLoRA with trl's packing, run as its users run it (issue 13).

Runs in its own child process whose PYTHONPATH is the Unsloth site only (run_bench.py --unsloth_site): the
machine's transformers 5.x and huggingface_hub 1.x, plus unsloth, unsloth_zoo, trl 1.15, peft, datasets and
bitsandbytes installed there with --no-deps (bench/unsloth_setup.md). Nothing from finetuning/ is imported:
common.py needs trl 0.8.6 and transformers 4.x.

gemma-3-4b (Gemma3ForConditionalGeneration, a folder whose config has a vision_config): FastLanguageModel hands Gemma 3
to Unsloth's FastModel, which loads the whole multimodal model (the vision tower quantized too, as ours is); the LoRA
adapters go on the language model's layers only (finetune_vision_layers=False), as ours do, and trl is given the
tokenizer (not the processor), as for a text model. spec "text_only": Unsloth's option to load the language model
alone, where its from_pretrained has it (a row of its own: it holds less than the model our scripts load).
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

# The child's environment; run_bench.py sets these before starting it, and they are set again here so that a
# by-hand `--setup` run is offline too. Unsloth reads them as it imports (names from unsloth 2026.10.9's source).
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",  # no hub requests (also skips Unsloth's model-name mapper refresh from GitHub)
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",  # unsloth.models._utils.get_statistics: no download of "unslothai/<env>"
    # import_fixes.torchvision_compatibility_check raises when the machine's torchvision does not match its torch;
    # a text model never uses torchvision, so a mismatch there must not stop the run.
    "UNSLOTH_SKIP_TORCHVISION_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Unsloth writes its generated trainer and model code here (default: ./unsloth_compiled_cache, in the repo).
COMPILE_LOCATION = "/tmp/unsloth_compiled_cache"

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VERSIONED = ("unsloth", "unsloth_zoo", "trl", "transformers", "torch", "peft", "bitsandbytes", "datasets")

# finetuning/common.py's Gemma turns, written out here: common.py imports trl 0.8.6's DataCollatorForCompletionOnlyLM,
# which trl 1.x no longer has, so it cannot be imported in this process. format_record below must give the same
# string as common.format_record for an Alpaca record (no <bos>: the tokenizer adds it), so that both scripts train
# on the same text; tests/ has no check of this (it would need both trl versions in one process), so keep the two in
# step by hand.
USER_TURN = "<start_of_turn>user\n{prompt}<end_of_turn>\n"
MODEL_TURN = "<start_of_turn>model\n{response}<end_of_turn>\n"


def format_record(record: dict) -> str:
    """common.format_record for an Alpaca record (instruction, optional input, output)."""
    prompt = record["instruction"].strip()
    extra = (record.get("input") or "").strip()
    prompt = f"{prompt}\n\n{extra}" if extra else prompt
    return USER_TURN.format(prompt=prompt) + MODEL_TURN.format(response=record["output"].strip())


def missing(site: Path) -> str | None:
    """Why the Unsloth setups cannot run from `site`, or None. Looks at files only: this process has our stack."""
    if not (site / "unsloth" / "__init__.py").is_file():
        return (f"no unsloth in {site}; install it with: python3 -m pip install -q --no-index --no-deps "
                f"--no-compile --no-cache-dir --upgrade --target {site} .whl-unsloth/*.whl {' '.join(FROM_OUR_WHEELS)}"
                " (see bench/unsloth_setup.md)")
    absent = [name for name in ("unsloth_zoo", "trl", "peft", "datasets", "bitsandbytes") if not (site / name).is_dir()]
    if absent:
        return f"{site} has unsloth but not {', '.join(absent)}: install it as bench/unsloth_setup.md says"
    return None


# Wheels of our own stack (.whl/) that the Unsloth site takes too: versions that also suit transformers 5.
FROM_OUR_WHEELS = (
    ".whl/peft-0.21.2-py3-none-any.whl", ".whl/datasets-5.0.1-py3-none-any.whl",
    ".whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", ".whl/dill-0.4.1-py3-none-any.whl",
    ".whl/multiprocess-0.70.19-py312-none-any.whl", ".whl/fsspec-2026.6.0-py3-none-any.whl",
)


def run_unsloth(spec: dict, measuring_callbacks, summarise, model_parameters, last_loss) -> dict:
    """One Unsloth setup: spec's model, data, batch (rows of max_seq_length tokens, default 1,024), steps and warmup;
    "t4": under T4 emulation (bench/emulate_t4.py: 15 GiB, no bf16, so fp16 as Unsloth runs on a T4).

    The measuring helpers are run_bench.py's own, passed in (this process runs run_bench.py as __main__).
    """
    for name, value in CHILD_ENV.items():
        os.environ[name] = value
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", COMPILE_LOCATION)
    # run_bench.py put finetuning/ first on sys.path; its modules (data, training, hub, ...) must not shadow anything.
    finetuning = str(Path(__file__).resolve().parents[1] / "finetuning")
    sys.path[:] = [entry for entry in sys.path if entry != finetuning]

    t4 = bool(spec.get("t4"))
    allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if t4:  # before Unsloth: it reads the card's bf16 support and capability as it imports
        import emulate_t4

        emulate_t4.emulate_t4()
    import unsloth  # noqa: F401  first: it patches transformers, trl and peft as they import
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if t4 and setter and os.environ.get("PYTORCH_CUDA_ALLOC_CONF") != allocator:
        setter(os.environ["PYTORCH_CUDA_ALLOC_CONF"])  # the emulation started CUDA before Unsloth set these
    torch.cuda.reset_peak_memory_stats()
    loading = {}
    if spec.get("text_only"):
        if "text_only" not in inspect.signature(FastLanguageModel.from_pretrained).parameters:
            raise SystemExit("This Unsloth's FastLanguageModel.from_pretrained has no text_only option.")
        loading["text_only"] = True
    max_seq_length = spec.get("max_seq_length", 1024)
    model, tokenizer = FastLanguageModel.from_pretrained(
        spec["model"], max_seq_length=max_seq_length, load_in_4bit=True,
        dtype=torch.float16 if t4 else torch.bfloat16, **loading,  # a T4 has no bf16
    )
    # A multimodal model's adapters on its language model alone, as our QLoRA script puts them (Unsloth's
    # FastModel.get_peft_model scopes an explicit list by these); a text model takes the list as it is.
    scope = dict(finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
                 finetune_mlp_modules=True) if multimodal(spec["model"]) else {}
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGET_MODULES,
        use_gradient_checkpointing="unsloth", **scope,
    )
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal model's processor: its tokenizer
    records = json.loads(Path(spec["data"]).read_text())
    dataset = Dataset.from_list([{"text": format_record(record)} for record in records])
    config = SFTConfig(
        output_dir=f"/tmp/bench-unsloth-{os.getpid()}",
        packing=True, max_length=max_seq_length, dataset_text_field="text",
        per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        optim="adamw_8bit", learning_rate=2e-4, bf16=not t4, fp16=t4, logging_steps=1, save_strategy="no",
        report_to="none",
        max_steps=spec["steps"], warmup_steps=0,  # transformers 5 has no warmup_ratio; Unsloth's own default is 0.1
        # transformers 5.17 (Trainer._track_num_input_tokens): the attention mask's sum, else the ids that are not
        # the pad token. Packed batches are padding-free (one row, no attention mask), so this counts real tokens.
        include_num_input_tokens_seen="non_padding",
    )
    callbacks, result = measuring_callbacks(spec["warmup"])
    # No data_collator: with one, Unsloth turns packing off (unsloth/trainer.py, "custom data collator").
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=callbacks)
    trainer.train()
    summary = summarise(result, spec["warmup"], model_parameters(spec["model"]))
    packing = bool(getattr(trainer.args, "packing", False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # ours logs the same count
    return {**summary, "loss": last_loss(trainer), "warmup": spec["warmup"], "packing": packing, "trainable": trainable,
            "versions": versions()}


def multimodal(model_dir: str) -> bool:
    """Gemma3ForConditionalGeneration's folder (gemma-3-4b and up): its config.json has a vision_config."""
    return "vision_config" in json.loads((Path(model_dir) / "config.json").read_text())


def versions() -> dict:
    import importlib

    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as error:  # noqa: BLE001 - a version is only reported
            found[name] = f"unknown ({type(error).__name__})"
    return found
