"""The report card: the held-out prompts answered greedily by the base model and by the trained model, scored against
the data's answers, in report_card.md and report_card.json; export_gguf.py adds a row for each exported GGUF.

The prompts: the eval records (--eval_split_ratio, --eval_file), the first --report_card_prompts of them; a run
without eval records takes its first training records instead, and the card says they were trained on. Answers are
batched (left padding) with the KV cache, at most --report_card_max_new_tokens tokens each; on a GPU as many prompts a
batch as half its free memory holds (`cuda_batch`), at most 256. Expected, not yet measured: a decode step of a small
batch costs its kernel launches more than its rows, so fewer, larger batches take less time.

The scores: the stop rate (the answer ended its turn, <end_of_turn>, within the token limit), exact match (after
trimming and collapsing spaces), chrF (sacrebleu, pinned: its signature is in the card), the mean answer length
against the reference's, the repetition rate (the share of an answer's token 4-grams that it has already said) and,
where the references are JSON, the share of answers that parse as JSON.

The base model: QLoRA's is the same model with the adapter disabled (peft's `disable_adapter`), answered after
training; GaLore trains the weights in place (and OLoRA changes the base weights), so theirs is answered before
training (`answer_base`). Under DDP one process answers and writes.
"""
from __future__ import annotations

import json
import logging
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from cli.arguments import ReportArguments
from common import format_prompt
from models.shapes import known_shape
from training import processes
from training.output_dir import REPORT_CARD_JSON, REPORT_CARD_MD

if TYPE_CHECKING:  # export_gguf.py imports this module, and must not load trl (records.batching) through it
    from records.run_data import RunData

logger = logging.getLogger(__name__)

END_OF_TURN = "<end_of_turn>"
REPEATED_NGRAM = 4
WORST = 5
# Prompts a batch: on CPU a fixed few; on a GPU sized from its free memory (`cuda_batch`). Halved on running out.
BATCH_CPU = 16
BATCH_CUDA_UNKNOWN = 64  # a config without Gemma-like shapes: nothing to size from
BATCH_CUDA_CAP = 256  # past this, a decode step is expected to cost its rows more than its launches (not measured)
FREE_MEMORY_SHARE = 0.5  # of the free GPU memory: the rest for the allocator's slack
LOGITS_COPIES = 4  # a row's last-token float32 logits: raw, soft-capped, processed, argmax input


# ---------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------


def card_records(loaded: "RunData", report_args: ReportArguments):
    """(records, where they come from): the eval records where there are any, else the first training records."""
    if loaded.eval_records is not None and len(loaded.eval_records):
        records, source = loaded.eval_records, "the eval records (held out from training)"
    else:
        records, source = loaded.records, ("the first training records: the run has no eval records, so these "
                                           "were trained on (--eval_split_ratio 0.05 holds some out)")
    return records.select(range(min(report_args.report_card_prompts, len(records)))), source


def cuda_batch(free_bytes: float, shape, dtype_bytes: int, prompt_tokens: int, new_tokens: int,
               cap: int = BATCH_CUDA_CAP) -> int:
    """Prompts a GPU batch: as many rows as FREE_MEMORY_SHARE of `free_bytes` holds, 1 to `cap`. A row: its KV cache
    (keys and values of every layer, sliding ones counted whole, for the longest prompt and the answer), one layer's
    activations during the prompt's pass (the MLP's three intermediates and a few hidden-wide tensors), and its
    last-token logits. `shape`: models.shapes.Shape."""
    cache = shape.layers * 2 * shape.kv_heads * shape.head_dim * (prompt_tokens + new_tokens)
    prefill = prompt_tokens * (3 * shape.intermediate + 4 * shape.hidden)
    row = (cache + prefill) * dtype_bytes + LOGITS_COPIES * shape.vocab * 4
    return max(1, min(cap, int(free_bytes * FREE_MEMORY_SHARE // row)))


def batch_size(model, longest: int, max_new_tokens: int) -> int:
    """The first batch size of `answer`: BATCH_CPU on CPU; on a GPU from its free memory (`cuda_batch`)."""
    if model.device.type != "cuda":
        return BATCH_CPU
    shape = known_shape("", model.config)  # the text config's shapes, also a multimodal config's
    if shape is None:
        return BATCH_CUDA_UNKNOWN
    device, allocated = model.device, torch.cuda.memory_allocated(model.device)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - allocated  # held by torch's cache, unused
    # A card's memory as torch reports it can be less than the device's (bench/emulate_t4.py's T4 on a bigger GPU).
    free = min(free, torch.cuda.get_device_properties(device).total_memory - allocated)
    # The embeddings' dtype is the hidden states' and the cache's: model.dtype can be a float32 vision weight.
    dtype_bytes = model.get_input_embeddings().weight.dtype.itemsize
    return cuda_batch(free, shape, dtype_bytes, longest, max_new_tokens)


def answer(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> tuple[list[dict], float, int]:
    """Greedy answers to `prompts`, batched with left padding and the KV cache; (answers, seconds, prompts a batch).
    Each answer: its text, its tokens (the stop token not counted), the stop token it ended at (None: the token
    limit) and its repetition rate."""
    started = time.perf_counter()
    stops = {tokenizer.convert_tokens_to_ids(END_OF_TURN): END_OF_TURN, tokenizer.eos_token_id: tokenizer.eos_token}
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # similar lengths together: less padding
    answers: list[Optional[dict]] = [None] * len(prompts)
    batch = batch_size(model, max(lengths, default=0), max_new_tokens)  # the longest prompts come first
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues each row from its last token
    try:
        start = 0
        while start < len(order):
            chosen = order[start : start + batch]
            try:
                outputs = generate(model, tokenizer, [prompts[i] for i in chosen], max_new_tokens, list(stops))
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
                outputs = None  # the cache is emptied below, once the error's frames (and tensors) are gone
            if outputs is None:
                batch = max(1, batch // 2)
                torch.cuda.empty_cache()
                logger.info("Report card: out of GPU memory, %d prompts a batch from here on.", batch)
                continue
            for index, ids in zip(chosen, outputs):
                end = next((i for i, token in enumerate(ids) if token in stops), None)
                kept = ids if end is None else ids[:end]
                answers[index] = {"text": tokenizer.decode(kept, skip_special_tokens=True).strip(),
                                  "tokens": len(kept), "stopped_at": None if end is None else stops[ids[end]],
                                  "repetition": repetition(kept)}
            start += len(chosen)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers, time.perf_counter() - started, min(batch, len(prompts))


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop_ids: list) -> list[list[int]]:
    inputs = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                top_p=None, top_k=None, temperature=None)
    return output[:, inputs["input_ids"].shape[1]:].tolist()


def repetition(ids: Sequence[int], n: int = REPEATED_NGRAM) -> float:
    """The share of the token n-grams that already occurred earlier in the same text: 0 for none, near 1 for a loop."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def has_adapter_to_disable(model) -> bool:
    """A peft model whose base weights training left as they were: the base answers with its adapter disabled.
    OLoRA moves part of each base weight into the adapter, so its base is not the original one."""
    if not hasattr(model, "disable_adapter") or not hasattr(model, "peft_config"):
        return False
    return all(getattr(config, "init_lora_weights", True) != "olora" for config in model.peft_config.values())


def answer_base(trainer, loaded: "RunData", report_args: ReportArguments) -> Optional[dict]:
    """Before training: the base model's answers, where training will change its weights in place (GaLore; QLoRA's
    OLoRA). None where the card is off, this process does not write, or the base can be answered afterwards."""
    if not report_args.report_card_prompts or not processes.writes(trainer.args) \
            or has_adapter_to_disable(trainer.model):
        return None
    records, _ = card_records(loaded, report_args)
    answers, seconds, batch = answer(trainer.model, loaded.tokenizer, [format_prompt(r) for r in records],
                                     report_args.report_card_max_new_tokens)
    logger.info("Report card: the base model answered %d prompts in %.1f s, %d prompts a batch (before training).",
                len(answers), seconds, batch)
    return {"answers": answers, "seconds": seconds, "batch": batch}


def write(trainer, loaded: "RunData", report_args: ReportArguments, base: Optional[dict] = None) -> Optional[Path]:
    """After training (and the final save): the trained model's answers beside the base's, scored; report_card.md
    and .json in the output folder. `base`: answer_base's, where it answered before training."""
    from training.reports import reference_answer  # here: it imports records.batching, and so trl

    if not report_args.report_card_prompts or not processes.writes(trainer.args):
        return None
    started = time.perf_counter()
    # The base's seconds are added only where it answered before training: one answered below is timed already.
    before = base["seconds"] if base else 0.0
    model, tokenizer = trainer.model, loaded.tokenizer
    records, source = card_records(loaded, report_args)
    prompts = [format_prompt(record) for record in records]
    limit = report_args.report_card_max_new_tokens
    if base is None and has_adapter_to_disable(model):
        with model.disable_adapter():
            base_answers, base_seconds, base_batch = answer(model, tokenizer, prompts, limit)
        base = {"answers": base_answers, "seconds": base_seconds, "batch": base_batch}
    trained, trained_seconds, batch = answer(model, tokenizer, prompts, limit)
    references = [reference_answer(record) for record in records]
    items = []
    for index, (prompt, reference) in enumerate(zip(prompts, references)):
        ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
        answers = {"trained": trained[index], **({"base": base["answers"][index]} if base else {})}
        items.append({"prompt": prompt, "reference": reference, "reference_tokens": len(ids),
                      "reference_repetition": repetition(ids), "answers": answers})
    models = [("base", base["seconds"])] if base else []
    models.append(("trained", trained_seconds))
    card = {
        "source": source,
        "chat": "text" not in records.column_names,
        "prompts": len(items),
        "max_new_tokens": limit,
        "metric": metric_name(),
        "items": items,
        "rows": [dict(model=name, seconds=round(seconds, 2), **score(items, name)) for name, seconds in models],
        "reference": reference_row(items),
        "seconds": round(before + time.perf_counter() - started, 2),
    }
    path = save(Path(trainer.args.output_dir), card)
    rows = {row["model"]: row for row in card["rows"]}
    batches = f"{batch}" if not base or base.get("batch", batch) == batch else f"{base['batch']} (base), {batch}"
    logger.info("Report card (%d prompts, %.1f s, %s prompts a batch): %s. %s", len(items), card["seconds"], batches,
                "; ".join(f"{name} stops {100 * row['stop_rate']:.0f}%, chrF {row['chrf']:.1f}"
                          for name, row in rows.items()), path)
    return path


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------


def chrf():
    from sacrebleu.metrics import CHRF  # pinned in requirements.txt; --report_card_prompts checks it is installed

    return CHRF()


def metric_name() -> str:
    metric = chrf()
    metric.corpus_score(["a"], [["a"]])  # the signature counts the references of a scored corpus
    return f"chrF (sacrebleu {metadata.version('sacrebleu')}, {metric.get_signature()})"


def same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def parses_as_json(text: str) -> bool:
    """A JSON object or array, also inside one ``` fence."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        return isinstance(json.loads(text), (dict, list))
    except ValueError:
        return False


def references_are_json(items: Sequence[dict]) -> bool:
    return sum(parses_as_json(item["reference"]) for item in items) * 2 > len(items)


def score(items: Sequence[dict], model: str) -> dict:
    """One model's row: its answers to `items` against their references."""
    answers = [item["answers"][model] for item in items]
    references = [item["reference"] for item in items]
    n = max(1, len(items))
    metric = chrf()
    texts = [a["text"] for a in answers]
    row = {
        "stop_rate": sum(a["stopped_at"] == END_OF_TURN for a in answers) / n,
        "exact_match": sum(same(a, r) for a, r in zip(texts, references)) / n,
        "chrf": metric.corpus_score(texts, [references]).score if items else 0.0,
        "mean_tokens": sum(a["tokens"] for a in answers) / n,
        "repetition": sum(a["repetition"] for a in answers) / n,
    }
    if references_are_json(items):
        row["json_parses"] = sum(parses_as_json(text) for text in texts) / n
    return row


def reference_row(items: Sequence[dict]) -> dict:
    n = max(1, len(items))
    row = {"mean_tokens": sum(i["reference_tokens"] for i in items) / n,
           "repetition": sum(i["reference_repetition"] for i in items) / n}
    if references_are_json(items):
        row["json_parses"] = sum(parses_as_json(i["reference"]) for i in items) / n
    return row


# ---------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------


def save(folder: Path, card: dict) -> Path:
    (folder / REPORT_CARD_JSON).write_text(json.dumps(card, indent=2))
    path = folder / REPORT_CARD_MD
    path.write_text(render(card))
    return path


def table(rows: Sequence[dict], reference: dict, chat: bool) -> list[str]:
    with_json = "json_parses" in reference
    header = ["model", f"stops (`{END_OF_TURN}`)", "exact match", "chrF", "mean length (tokens)", "repetition"]
    header += ["parses as JSON"] * with_json + ["seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    percent = lambda value: f"{100 * value:.0f}%"  # noqa: E731
    for row in rows:
        cells = [row["model"], percent(row["stop_rate"]) if chat else "n/a (plain text)", percent(row["exact_match"]),
                 f"{row['chrf']:.1f}", f"{row['mean_tokens']:.0f}", percent(row["repetition"])]
        cells += [percent(row.get("json_parses", 0))] * with_json + [f"{row['seconds']:.1f}" if "seconds" in row else ""]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["the data's answers", "", "", "", f"{reference['mean_tokens']:.0f}", percent(reference["repetition"])]
    lines.append("| " + " | ".join(cells + [percent(reference.get("json_parses", 0))] * with_json + [""]) + " |")
    return lines


def render(card: dict) -> str:
    items = card["items"]
    lines = [
        "# Report card\n",
        f"{card['prompts']} prompts from {card['source']}, answered greedily (at most {card['max_new_tokens']} new "
        f"tokens each), scored against the data's answers. Took {card['seconds']:.1f} s.\n",
        *table(card["rows"], card["reference"], card["chat"]),
        "",
        f"- **stops**: the answer ended its turn with `{END_OF_TURN}` within {card['max_new_tokens']} tokens. A model "
        "that does not stop runs on past its answer (in Ollama and llama.cpp too).",
        "- **exact match**: the same text as the data's answer, spaces aside.",
        f"- **chrF**: character n-gram overlap with the data's answer, 0-100: {card['metric']}.",
        f"- **repetition**: the share of an answer's token {REPEATED_NGRAM}-grams it had already said; a loop "
        "comes near 100%.",
    ]
    if any(item["reference_tokens"] > card["max_new_tokens"] for item in items):
        longer = sum(item["reference_tokens"] > card["max_new_tokens"] for item in items)
        lines.append(f"- {longer} of the data's answers are longer than the token limit: raise "
                     "--report_card_max_new_tokens for a fair stop rate.")
    export = card.get("export")
    if export:
        lines += ["", "## The whole chain: base, trained, exported\n",
                  f"The first {export['prompts']} of the prompts, answered by each GGUF through llama.cpp "
                  f"(export_gguf.py, {export['seconds']:.1f} s), beside the same prompts' rows above.\n",
                  *table(export["rows"], export["reference"], card["chat"])]
    worst = worst_answers(items)
    if worst:
        lines += ["", f"## The {len(worst)} worst trained answers (lowest chrF)"]
    for rank, (value, item) in enumerate(worst, 1):
        trained = item["answers"]["trained"]
        lines += [f"\n### {rank}. chrF {value:.1f}, " + (f"stopped at {trained['stopped_at']}" if trained["stopped_at"]
                                                         else "ran to the token limit") + "\n",
                  "**Prompt:**\n", "```", item["prompt"].rstrip(), "```\n",
                  "**The data's answer:**\n", "```", item["reference"], "```\n",
                  "**Trained:**\n", "```", trained["text"], "```\n"]
        if "base" in item["answers"]:
            lines += ["**Base:**\n", "```", item["answers"]["base"]["text"], "```\n"]
    return "\n".join(lines) + "\n"


def worst_answers(items: Sequence[dict]) -> list[tuple[float, dict]]:
    metric = chrf()
    scored = [(metric.sentence_score(item["answers"]["trained"]["text"], [item["reference"]]).score, index)
              for index, item in enumerate(items)]
    return [(value, items[index]) for value, index in sorted(scored)[:WORST]]


# ---------------------------------------------------------------------------
# Exported models (export_gguf.py)
# ---------------------------------------------------------------------------


def load(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / REPORT_CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def add_exported(run_dir: Path, card: dict, exported: dict[str, dict]) -> Path:
    """The GGUFs' rows on the card's first prompts, beside the base and trained rows on the same prompts.
    `exported`: each file's {"answers": [...] (as `answer` makes them, one per prompt from the first), "seconds"}.
    Replaces the rows of an earlier export."""
    prompts = min(len(e["answers"]) for e in exported.values())
    items = [dict(item, answers=dict(item["answers"])) for item in card["items"][:prompts]]
    names = [row["model"] for row in card["rows"]]
    for name, done in exported.items():
        for item, answer_ in zip(items, done["answers"]):
            item["answers"][name] = answer_
    card["export"] = {
        "prompts": prompts,
        "seconds": round(sum(done["seconds"] for done in exported.values()), 2),
        "rows": [dict(model=name, **score(items, name)) for name in names]
        + [dict(model=name, seconds=round(done["seconds"], 2), **score(items, name)) for name, done in exported.items()],
        "reference": reference_row(items),
        "answers": {name: done["answers"][:prompts] for name, done in exported.items()},
    }
    return save(Path(run_dir), card)
