"""What a run tells its user: the settings once at the start, the dry run, sample answers before and after
training, metrics.json and the loss curve, and the smoke run's reload check."""
from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from training import interruptions, processes
from cli.arguments import DataArguments, ReportArguments
from records.batching import PackedBatches, pack_into_rows, row_fill
from common import Precision, format_example, format_prompt
from records.run_data import RunData
from common import OUTPUT_FIELD
from training.output_dir import SAMPLES_JSON

logger = logging.getLogger(__name__)



# ---------------------------------------------------------------------------
# Before training: the settings, the dry run
# ---------------------------------------------------------------------------


def count_parameters(model: "torch.nn.Module") -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def log_settings(script: str, trainer, precision: Precision, data_args: DataArguments, loaded: RunData,
                 extra: Mapping[str, Any]) -> None:
    """One block with what a user needs to know about the run they started."""
    model, training_args = trainer.model, trainer.args
    trainable, total = count_parameters(model)
    devices, accumulation = max(1, training_args.world_size), training_args.gradient_accumulation_steps
    tokens = data_args.max_tokens_per_batch
    if tokens is None:
        batch = training_args.per_device_train_batch_size
        effective = f"{batch * accumulation * devices} records = {batch} per device"
    else:
        how = "packed without padding" if data_args.padding_free else "padded, similar lengths together"
        effective = f"{tokens * accumulation * devices:,} tokens = {tokens:,} per device ({how})"
    lines = [
        f"{script} settings:",
        f"  precision: {precision.name} ({precision.reason})",
        f"  effective batch: {effective} x {accumulation} accumulation x {devices} device(s)",
        f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)",
        f"  learning rate: {training_args.learning_rate}, optimizer: {extra.get('optimizer', getattr(training_args.optim, 'value', training_args.optim))}",
        f"  gradient checkpointing: {training_args.gradient_checkpointing}",
        f"  max_seq_length: {data_args.max_seq_length}",
        f"  output: {training_args.output_dir}",
    ]
    lines += [f"  {k}: {v}" for k, v in extra.items() if k != "optimizer"]
    lines += [
        f"  loss: {'answers only' if loaded.collator else 'every token'}",
        f"  records: {len(loaded.records)} train"
        + (f", {len(loaded.eval_records)} eval" if loaded.eval_records is not None else ""),
    ]
    logger.info("\n".join(lines))


def dry_run_report(loaded: RunData, data_args: DataArguments, training_args) -> dict:
    """What training would see, without loading the model: logged, and returned for tests."""
    records, tokenizer, collator = loaded.records, loaded.tokenizer, loaded.collator
    lengths = loaded.lengths
    ordered = sorted(lengths)
    stats = {
        "records": len(lengths),
        "min": ordered[0],
        "median": int(statistics.median(ordered)),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
        "longer_than_max_seq_length": sum(length > data_args.max_seq_length for length in lengths),
        "effective_batch_size": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size),
    }
    processes, accumulation = max(1, training_args.world_size), training_args.gradient_accumulation_steps
    batching = f"Effective batch size: {stats['effective_batch_size']} records ({processes} process(es))."
    if data_args.max_tokens_per_batch:
        tokens = data_args.max_tokens_per_batch
        stats["tokens_per_optimizer_step"] = tokens * accumulation * processes
        batching = (f"Up to {tokens:,} tokens a micro-batch per process x {accumulation} accumulation x {processes} "
                    f"process(es) = {stats['tokens_per_optimizer_step']:,} tokens an optimizer step.")
    if data_args.max_tokens_per_batch and data_args.padding_free:
        # The same packing training will do; longer records count as cut to one row, as training cuts them.
        row_tokens = data_args.max_seq_length
        rows = pack_into_rows(lengths, row_tokens)
        fill = row_fill(lengths, rows, row_tokens)
        per_process = len(PackedBatches(len(rows), max(1, tokens // row_tokens), processes=processes)) // processes
        stats["optimizer_steps_per_epoch"] = math.ceil(per_process / accumulation)
        batching = (
            f"Packed without padding: {len(rows)} rows of {row_tokens} tokens ({100 * fill:.1f}% real tokens). "
            f"{batching} {stats['optimizer_steps_per_epoch']} optimizer steps per epoch."
        )
    examples = [render_with_mask(record, tokenizer, collator, data_args.max_seq_length) for record in records.select(range(min(2, len(records))))]
    logger.info(
        "Dry run (no model loaded):\n%s\n"
        "Token lengths: min %d, median %d, 95th percentile %d, max %d; %d of %d records longer than "
        "--max_seq_length %d.\n%s",
        "\n".join(f"--- example {i} ({'⟦masked⟧ = not learnt' if collator else 'every token learnt'}) ---\n{text}"
                  for i, text in enumerate(examples)),
        stats["min"], stats["median"], stats["p95"], stats["max"], stats["longer_than_max_seq_length"],
        stats["records"], data_args.max_seq_length, batching,
    )
    return {**stats, "examples": examples}


def render_with_mask(record, tokenizer, collator, max_seq_length: int) -> str:
    """The example as the model sees it, with the tokens left out of the loss inside ⟦ ⟧."""
    ids = tokenizer(format_example(record), truncation=True, max_length=max_seq_length)["input_ids"]
    if collator is None:
        return tokenizer.decode(ids)
    labels = collator([{"input_ids": ids}])["labels"][0].tolist()
    pieces, run, masked = [], [], None
    for token, label in zip(ids, labels):
        is_masked = label == -100
        if masked is not None and is_masked != masked:
            pieces.append((masked, run))
            run = []
        run.append(token)
        masked = is_masked
    pieces.append((masked, run))
    return "".join(f"⟦{tokenizer.decode(run)}⟧" if is_masked else tokenizer.decode(run) for is_masked, run in pieces)



# ---------------------------------------------------------------------------
# After training: samples, metrics, the loss curve
# ---------------------------------------------------------------------------


def reference_answer(record: Mapping[str, Any]) -> str:
    """The answer the data gives for format_prompt(record): the last assistant turn, the text's second half, or the
    output field."""
    if "messages" in record:
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        return answers[-1].strip() if answers and record["messages"][-1]["role"] == "assistant" else ""
    if "text" in record:
        return record["text"][max(1, len(record["text"]) // 2):]
    return record[OUTPUT_FIELD].strip()


def generate_samples(model, tokenizer, records, count: int, max_new_tokens: int) -> list[dict]:
    """Greedy answers to the first `count` prompts: written to samples.md before and after training."""
    was_training = model.training
    model.eval()
    samples = []
    for record in records.select(range(min(count, len(records)))):
        prompt = format_prompt(record)
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "answer": answer, "reference": reference_answer(record)})
    model.train(was_training)
    return samples


@interruptions.writing("check")
def check_saved_model(load, final: Path, loaded: RunData, report_args: ReportArguments, what: str) -> None:
    """The smoke run's last step: what was saved loads back and generates."""
    reloaded = load(final, dtype=torch.float32)
    sample = generate_samples(reloaded, loaded.tokenizer, loaded.records, 1, report_args.sample_max_new_tokens)[0]
    # The smoke model's weights are random: its text is noise (often byte pieces that print as �), which is no fault.
    logger.info("Smoke run passed: the saved %s loads and generates (the smoke model is random, so its text is noise, "
                "not a fault): %r", what, sample["answer"])


def sample_answers(trainer, loaded: RunData, report_args: ReportArguments) -> list[dict]:
    """Answers to the first --num_sample_prompts prompts (of the eval records where there are any), for samples.md;
    under DDP by the process that writes it only."""
    model = trainer.model
    if not report_args.num_sample_prompts or not processes.writes(trainer.args):
        return []
    records = loaded.eval_records if loaded.eval_records is not None else loaded.records
    return generate_samples(model, loaded.tokenizer, records, report_args.num_sample_prompts,
                            report_args.sample_max_new_tokens)


@interruptions.writing("reports")
def write_reports(trainer, train_result, loaded: RunData, report_args: ReportArguments,
                  samples_before: list[dict]) -> dict:
    """metrics.json (the Trainer's train metrics, with the whole run's train_loss from training.train however often
    it was resumed; eval loss and perplexity), trainer_state.json, loss_curve.png and
    samples.md (the answers before training beside the trained model's) in the output directory; returns the
    metrics."""
    output_dir = Path(trainer.args.output_dir)
    metrics = dict(train_result.metrics)
    if loaded.eval_records is not None:  # on every process under DDP: each evaluates its share
        evaluation = trainer.evaluate()
        metrics.update(evaluation)
        metrics["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
        logger.info("Eval loss %.4f, perplexity %.2f", evaluation["eval_loss"], metrics["eval_perplexity"])
    if not processes.writes(trainer.args):
        return metrics
    samples_after = sample_answers(trainer, loaded, report_args)
    metrics["global_step"] = trainer.state.global_step
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trainer.save_state()
    plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
    if samples_after:
        lines = ["# Samples: the same prompts before and after training (greedy decoding), beside the data's answer\n"]
        for index, (before, after) in enumerate(zip(samples_before, samples_after)):
            lines += [
                f"## Prompt {index}\n", "```", before["prompt"].rstrip(), "```\n",
                "**Reference (the data's answer):**\n", "```", after["reference"], "```\n",
                "**Before:**\n", "```", before["answer"], "```\n", "**After:**\n", "```", after["answer"], "```\n",
            ]
        (output_dir / "samples.md").write_text("\n".join(lines))
        # The same, for tools: export_gguf.py answers these prompts with the exported model.
        (output_dir / SAMPLES_JSON).write_text(json.dumps(
            [{"prompt": after["prompt"], "reference": after["reference"], "before": before["answer"],
              "after": after["answer"]} for before, after in zip(samples_before, samples_after)], indent=2))
    logger.info("metrics.json, loss_curve.png%s in %s", " and samples.md/.json" if samples_after else "", output_dir)
    return metrics


def plot_loss_curve(log_history: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Train (and eval) loss against the step, as a PNG; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on Colab's workers or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: no loss_curve.png (pip install matplotlib).")
        return False
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
