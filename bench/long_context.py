"""The bench's long-context rows (issue 27, requirement 4): long instruction records made by joining consecutive
Alpaca records, the setups that train on them (ours and Unsloth's, the same tokens a step), and the search for the
longest --max_seq_length at which one step of QLoRA trains under T4 emulation (bf16 off, 15 GiB).

A long record asks for N tasks in order and answers them in order:

    instruction: Answer each of the following 3 tasks in order, numbering each answer as its task is numbered.
    input:       Task 1. Give three tips for staying healthy.\\n\\nTask 2. ...
    output:      Answer 1. Eat a balanced diet ...\\n\\nAnswer 2. ...

Both our scripts and Unsloth's child read the same file (/tmp/bench-long-LENGTH.json, made once from --data), so
they train on the same text.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

LONG_DATA = "/tmp/bench-long-{length}.json"  # made once per length, as the SIZE models are (cached by path)
LENGTHS = (4096, 8192, 16384)
# 16k tokens a step: the longest rows (16k) still fit one row a step, and every length trains the same tokens. 32k
# would double every step's memory without adding a length.
TOKENS_PER_STEP = 16384
# A record is aimed a little under --max_seq_length: a record past it would be cut, trl may add <eos> to Unsloth's
# text, and the ~4 characters a token estimate errs.
FILL = 0.97
CHARS_PER_TOKEN = 4
SEARCHES = ("ours", "unsloth")
NAMES = {"ours": "ours", "unsloth": "Unsloth"}
SEARCH_START, RESOLUTION = 4096, 1024
LONGEST_LOG = "/tmp/bench-longest-{which}-{model}.json"  # each attempt's outcome: a search cut off resumes from it
# What a child's output says when a length did not fit: torch's error (Unsloth's), our script's message (ours).
OUT_OF_MEMORY = ("OutOfMemoryError", "CUDA out of memory", "The GPU ran out of memory")


class SearchStopped(Exception):
    """An attempt failed for another reason than memory: its length says nothing of the longest, so the search ends."""


# ---------------------------------------------------------------------------
# Long records
# ---------------------------------------------------------------------------


def estimate_tokens(texts: list[str]) -> list[int]:
    """About 4 characters a token, rounded up: where no tokenizer is given."""
    return [-(-len(text) // CHARS_PER_TOKEN) for text in texts]


def token_counter(model_dir) -> Callable[[list[str]], list[int]]:
    """Tokens of each text as the scripts count a record (<bos> added), by the model folder's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def _task(record: dict, number: int) -> tuple[str, str]:
    import common  # here, not at the top: run_bench imports this module in the Unsloth child too (transformers 5)

    question = record[common.INSTRUCTION_FIELD].strip()
    extra = (record.get(common.INPUT_FIELD) or "").strip()
    question = f"{question}\n{extra}" if extra else question
    return f"Task {number}. {question}", f"Answer {number}. {record[common.OUTPUT_FIELD].strip()}"


def joined(records: list[dict]) -> dict:
    """One instruction record asking for `records`' tasks in order, its output their answers in order."""
    import common

    tasks = [_task(record, number) for number, record in enumerate(records, 1)]
    return {common.INSTRUCTION_FIELD: f"Answer each of the following {len(records)} tasks in order, numbering each "
                                      "answer as its task is numbered.",
            common.INPUT_FIELD: "\n\n".join(question for question, _ in tasks),
            common.OUTPUT_FIELD: "\n\n".join(answer for _, answer in tasks)}


def long_records(records: list[dict], max_tokens: int, count=estimate_tokens) -> list[dict]:
    """Consecutive `records` joined into long ones of at most `max_tokens` (by `count`, of the formatted record),
    each closed when the next task would not fit, so each is within about one task of the target. Records are used
    in order, each at most once; one that alone is past the target is left out, and so is the unclosed last group.
    """
    import common

    # Each task's share, counted alone (a two-digit number stands for its own); the whole record is then counted
    # exactly, and tasks past the target move on to the next record.
    sizes = count([question + "\n\n" + answer + "\n\n" for question, answer in (_task(r, 10) for r in records)])
    overhead = count([common.format_record(joined([]))])[0]
    long, group, used = [], [], overhead
    for index, size in enumerate(sizes):
        if overhead + size > max_tokens:
            continue
        if used + size > max_tokens:
            kept = list(group)
            while kept and count([common.format_record(joined([records[i] for i in kept]))])[0] > max_tokens:
                kept.pop()
            if kept:
                long.append(joined([records[i] for i in kept]))
            group = group[len(kept):] if kept else group[1:]  # a first task too long with its record's text: out
            used = overhead + sum(sizes[i] for i in group)
        group.append(index)
        used += size
    return long


def target_tokens(length: int) -> int:
    return int(FILL * length)


def long_file(length: int, data, model_dir=None) -> Path:
    """The long records for --max_seq_length `length`, made from `data`'s Alpaca records once (LONG_DATA): counted by
    `model_dir`'s tokenizer where given, else by the ~4 characters a token estimate."""
    path = Path(LONG_DATA.format(length=length))
    if path.is_file():
        return path
    records = json.loads(Path(data).read_text())
    count = token_counter(model_dir) if model_dir else estimate_tokens
    long = long_records(records, target_tokens(length), count)
    if not long:
        raise SystemExit(f"{data} has too few tokens for one record of {target_tokens(length):,} tokens.")
    partial = path.with_name(f".{path.name}.{os.getpid()}")  # a run killed while writing leaves no half file
    partial.write_text(json.dumps(long))
    partial.replace(path)
    print(f"{path}: {len(long):,} records of up to {target_tokens(length):,} tokens, joined from {data}'s "
          f"{len(records):,}", flush=True)
    return path


# ---------------------------------------------------------------------------
# The setups: ours and Unsloth's at each length, TOKENS_PER_STEP tokens a step
# ---------------------------------------------------------------------------


def setups() -> dict:
    """run_bench's long setups; "long" names the length whose file becomes the setup's data."""
    table = {}
    for length in LENGTHS:
        rows = TOKENS_PER_STEP // length
        table[f"ours QLoRA, {length // 1024}k-token records, {TOKENS_PER_STEP // 1024}k tokens/step"] = dict(
            kind="ours", method="qlora", batch=1, long=length,
            extra=["--max_seq_length", str(length), "--max_tokens_per_batch", str(TOKENS_PER_STEP)])
        table[f"Unsloth QLoRA, packing, {rows} {'row' if rows == 1 else 'rows'} x {length:,}"] = dict(
            kind="unsloth", batch=rows, max_seq_length=length, long=length)
    return table


# ---------------------------------------------------------------------------
# The longest sequence one step trains under T4 emulation
# ---------------------------------------------------------------------------


def longest_length(try_length: Callable[[int], bool], start: int = SEARCH_START, limit: Optional[int] = None,
                   resolution: int = RESOLUTION) -> Optional[int]:
    """The longest length, in steps of `resolution`, at which `try_length` succeeds (taken to fail from some length
    on): lengths double from `start` until one fails or `limit` (the model's context) is reached, then the gap between
    the last success and the first failure is halved down to `resolution`. None where even `resolution` fails."""
    good, bad, length = 0, None, start
    while bad is None:
        length = min(length, limit) if limit else length
        if not try_length(length):
            bad = length
        elif limit and length >= limit:
            return length
        else:
            good, length = length, 2 * length
    while True:
        middle = good + max(1, (bad - good) // (2 * resolution)) * resolution
        if middle >= bad:
            return good or None
        if try_length(middle):
            good = middle
        else:
            bad = middle


def search_spec(which: str, length: int, base: dict) -> dict:
    """One attempt: one step of QLoRA on one row of `length` tokens, batch 1, under T4 emulation."""
    spec = {**base, "batch": 1, "steps": 1, "warmup": 0, "t4": True,
            "output_dir": f"/tmp/bench-longest-{which}-{length}-{os.getpid()}"}
    if which == "ours":
        flags = ["--max_seq_length", str(length), "--max_tokens_per_batch", str(length)]
        return {**spec, "kind": "ours", "method": "qlora", "extra": [*base.get("extra", []), *flags]}
    return {**spec, "kind": "unsloth", "max_seq_length": length}


def outcome(result: Optional[dict]) -> str:
    if result is None:
        return "out of memory"
    if "refused" in result:
        return f"refused before loading: {result['refused']}"
    return f"trained, {result['tokens_per_step']:,.0f} tokens, peak {result['peak_gib']:.2f} GiB"


def search(which: str, base: dict, run: Callable[[str, dict], Optional[dict]], limit: Optional[int]) -> dict:
    """The longest --max_seq_length one step of `which`'s QLoRA trains under T4 emulation, each attempt a child
    process (`run(name, spec)`: its result, or None where it failed). Outcomes are kept in LONGEST_LOG, so the same
    search run again (a command cut off by a time limit) resumes; delete the file to measure afresh."""
    label = f"T4 emulation: longest {NAMES[which]} QLoRA"
    log = Path(LONGEST_LOG.format(which=which, model=Path(base["model"]).name))
    attempts = {int(k): v for k, v in json.loads(log.read_text()).items()} if log.is_file() else {}

    def try_length(length: int) -> bool:
        if length in attempts:
            print(f"{label}: --max_seq_length {length:,}: {outcome(attempts[length])} (earlier run, {log})", flush=True)
        else:
            data = str(long_file(length, base["data"], base["model"]))
            result = run(f"{label}, {length:,} tokens", search_spec(which, length, {**base, "data": data}))
            if result is None or "failed" in result:
                failure = (result or {}).get("failed", "")
                if not any(sign in failure for sign in OUT_OF_MEMORY):  # not kept: a rerun tries it again
                    raise SearchStopped(f"{label}: --max_seq_length {length:,} failed, not for memory; the search "
                                        f"stops here:\n{failure[-1500:]}")
                result = None
            attempts[length] = result
            log.write_text(json.dumps(attempts))
            print(f"{label}: --max_seq_length {length:,}: {outcome(attempts[length])}", flush=True)
        return attempts[length] is not None and "refused" not in attempts[length]

    longest = longest_length(try_length, limit=limit)
    failed = [length for length, result in attempts.items() if length > (longest or 0)]
    found = dict(name=label, longest=longest, limit=limit, first_failure=min(failed, default=None),
                 result=attempts.get(longest), attempts=len(attempts))
    print(f"{label}: longest {longest or 0:,} tokens" + (" (the model's context)" if limit and longest == limit else "")
          + (f", {outcome(found['result'])}" if longest else ": not even 1,024") + f"; {len(attempts)} attempts",
          flush=True)
    return found


def run_searches(args, base: dict, run_child, cold_caches) -> None:
    """run_bench.py --longest: each search asked for, the answers appended to --results."""
    import unsloth_run

    found = []
    for which in args.longest:
        skipped = which == "unsloth" and unsloth_run.missing(args.unsloth_site)
        if skipped:
            print(f"T4 emulation: longest Unsloth QLoRA: skipped: {skipped}", flush=True)
            continue
        # One set of compile caches for all of a search's attempts: it measures memory, not the compile's time.
        caches = cold_caches(f"/tmp/bench-longest-{which}-{os.getpid()}")
        extra = args.ours_args.split() if which == "ours" else []
        run = functools.partial(run_child, args=args, caches=caches, keep_failure=True)
        try:
            found.append(search(which, {**base, "extra": extra}, run, model_context(args.model)))
        except SearchStopped as stopped:
            print(stopped, flush=True)
    if found:
        write_longest(args.results, found, shlex.join(["python", "bench/run_bench.py", *sys.argv[1:]]))


def write_longest(path: Path, found: list[dict], command: str) -> None:
    """The searches' answers, appended to the results file."""
    gpu = next((f["result"]["gpu"] for f in found if f["result"]), "unknown GPU")
    lines = [f"\n## {datetime.date.today()}: the longest --max_seq_length one step of QLoRA trains under T4 "
             f"emulation (15 GiB, no bf16), on {gpu}\n", f"`{command}`: one row a step, long records made by joining "
             "Alpaca records; lengths double from 4,096, then halve the gap to 1,024.\n",
             "| search | longest --max_seq_length | tokens in the step | peak GiB | first failure | attempts |",
             "|---|---|---|---|---|---|"]
    for f in found:
        r = f["result"] or {}
        reached = " (the model's context)" if f["limit"] and f["longest"] == f["limit"] else ""
        failure = f"{f['first_failure']:,}" if f["first_failure"] else "–"
        lines.append(f"| {f['name']} | {f['longest'] or 0:,}{reached} | {r.get('tokens_per_step', 0):,.0f} | "
                     f"{r.get('peak_gib', 0):.2f} | {failure} | {f['attempts']} |")
    with open(path, "a") as results:
        results.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def model_context(model_dir) -> Optional[int]:
    """max_position_embeddings of the model folder's language model: past it no length is tried."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("text_config", config).get("max_position_embeddings")
