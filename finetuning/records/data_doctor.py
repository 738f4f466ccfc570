"""The data doctor: what is wrong with the training data before a GPU hour is spent on it. Run in the load step of
every run and dry run; logged, and written to data_report.md with a token-length histogram (data_report_lengths.png).

- exact duplicates (the same record once normalised: case, punctuation and spacing ignored) and near duplicates
  (MinHash over character 5-grams, datasketch's LSH, each candidate confirmed by its true Jaccard similarity >= 0.8);
- records in both the training and the eval data, exactly or nearly: they make the eval loss and the report card look
  better than the model is;
- the share of the training tokens that the loss learns (after the answers-only mask, and the --max_seq_length cut);
- whether each record's final <end_of_turn> is labelled, from the run's own collator: a model that never sees it in
  its labels never learns to stop;
- answers cut by --max_seq_length, and answers with no word in them (blank ones are skipped when read).

`examine` finds (and, with --drop_duplicates / --drop_eval_overlap, drops) without writing; `write_report` writes.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from cli.arguments import DataArguments
from common import INPUT_FIELD, INSTRUCTION_FIELD, MODEL_TURN_START, OUTPUT_FIELD, format_example

logger = logging.getLogger(__name__)

DATA_REPORT_MD, DATA_LENGTHS_PNG = "data_report.md", "data_report_lengths.png"
END_OF_TURN = "<end_of_turn>"
NEAR_DUPLICATE_JACCARD = 0.8  # of the records' character 5-gram sets: a changed word or number, not a new record
SHINGLE_CHARACTERS = 5
NUM_PERM = 128  # MinHash permutations
# The LSH's bands x rows: a pair at Jaccard 0.8 becomes a candidate with probability 1 - (1 - 0.8**6)**20 = 99.8%
# (datasketch's balanced default, 9 x 13, misses 31% of pairs at 0.85). Candidates are confirmed by their true
# Jaccard similarity, so the extra ones (27% of pairs at 0.5, 1.5% at 0.3) cost a set comparison each, nothing more.
LSH_BANDS = (20, 6)
EXAMPLES = 5  # of each finding, in the report


@dataclass
class DataReport:
    """What the doctor found. Indices are the records' positions as read (before anything was dropped)."""

    source: str
    records: int
    eval_records: Optional[int]
    max_seq_length: int
    texts: list = field(repr=False, default_factory=list)  # each training record's normalised text, for examples
    eval_texts: list = field(repr=False, default_factory=list)
    exact_duplicates: list = field(default_factory=list)  # (record, the earlier record it repeats)
    near_duplicates: list = field(default_factory=list)  # (record, earlier record, Jaccard)
    eval_exact_overlap: list = field(default_factory=list)  # (eval record, training record)
    eval_near_overlap: list = field(default_factory=list)  # (eval record, training record, Jaccard)
    dropped_duplicates: int = 0
    dropped_eval: int = 0
    # Token checks, on the training records kept
    lengths: list = field(repr=False, default_factory=list)  # uncut token lengths
    tokens: int = 0  # after the --max_seq_length cut
    trained_tokens: int = 0
    end_of_turn_labelled: int = 0
    end_of_turn_masked: list = field(default_factory=list)  # records whose final <end_of_turn> has label -100
    end_of_turn_cut: list = field(default_factory=list)  # records whose final <end_of_turn> lies past the cut
    end_of_turn_checked: int = 0  # records with a model turn (not plain text)
    answers_cut: list = field(default_factory=list)  # (record, its tokens): losing part of the last answer to the cut
    empty_answers: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return len(self.exact_duplicates) + len(self.near_duplicates)

    @property
    def overlap(self) -> int:
        return len(self.eval_exact_overlap) + len(self.eval_near_overlap)

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / max(1, self.tokens)


# ---------------------------------------------------------------------------
# Finding
# ---------------------------------------------------------------------------


def examine(records, eval_records, tokenizer, collator, data_args: DataArguments, source: str):
    """(records, eval_records, DataReport): the records with the flags' drops applied, and what was found."""
    started = time.perf_counter()
    report = DataReport(source, len(records), None if eval_records is None else len(eval_records),
                        data_args.max_seq_length)
    report.texts = [normalise(record_text(record)) for record in records]
    shingles = [shingle_set(text) for text in report.texts]
    exact_keys, lsh = find_duplicates(report, shingles)
    if eval_records is not None:
        report.eval_texts = [normalise(record_text(record)) for record in eval_records]
        find_overlap(report, shingles, exact_keys, lsh)
    positions = list(range(len(records)))  # each kept record's number as read
    if data_args.drop_duplicates and report.duplicates:
        dropped = {index for index, *_ in report.exact_duplicates + report.near_duplicates}
        positions = [i for i in positions if i not in dropped]
        records = records.select(positions)
        report.dropped_duplicates = len(dropped)
    if data_args.drop_eval_overlap and report.overlap:
        dropped = {index for index, *_ in report.eval_exact_overlap + report.eval_near_overlap}
        if len(dropped) == len(eval_records):
            logger.warning("--drop_eval_overlap: every eval record is also in the training data; all are kept, so "
                           "that the run still has eval records. Give eval records of their own (--eval_file).")
        else:
            eval_records = eval_records.select([i for i in range(len(eval_records)) if i not in dropped])
            report.dropped_eval = len(dropped)
    check_tokens(report, records, positions, tokenizer, collator, data_args.max_seq_length)
    report.seconds = time.perf_counter() - started
    return records, eval_records, report


def record_text(record: Mapping[str, Any]) -> str:
    """The whole record as one text: prompt and answer (every turn of a chat)."""
    if "messages" in record:
        return "\n".join(message["content"] for message in record["messages"])
    if "text" in record:
        return record["text"]
    return "\n".join((record[INSTRUCTION_FIELD] or "", record.get(INPUT_FIELD) or "", record[OUTPUT_FIELD] or ""))


def answer_text(record: Mapping[str, Any]) -> Optional[str]:
    """The record's last answer; None for plain text, which has none."""
    if "messages" in record:
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        return answers[-1] if answers else ""
    if "text" in record:
        return None
    return record[OUTPUT_FIELD] or ""


def normalise(text: str) -> str:
    """Case, accents' encodings, punctuation and spacing ignored: `Hello,  World!` and `hello world` are the same."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def shingle_set(text: str) -> set:
    n = SHINGLE_CHARACTERS
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


def minhashes(shingle_sets: Sequence[set]) -> list:
    from datasketch import MinHash

    return MinHash.bulk(([s.encode() for s in shingles] for shingles in shingle_sets), num_perm=NUM_PERM)


def find_duplicates(report: DataReport, shingles: Sequence[set]):
    """Each record against the ones before it: an exact duplicate of one, or a near duplicate (MinHash LSH
    candidates, confirmed by their true Jaccard similarity). Returns the LSH index of the records that are neither,
    and a dict of each normalised text's hash to its first record."""
    from datasketch import MinHashLSH

    first: dict = {}
    hashes = minhashes(shingles)
    lsh = MinHashLSH(num_perm=NUM_PERM, params=LSH_BANDS)
    for index, text in enumerate(report.texts):
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key in first:
            report.exact_duplicates.append((index, first[key]))
            continue
        first[key] = index
        match = best_match(shingles[index], lsh.query(hashes[index]), shingles)
        if match is not None:
            report.near_duplicates.append((index, *match))
            continue
        lsh.insert(index, hashes[index])
    return first, lsh


def best_match(shingles: set, candidates, pool: Sequence[set]):
    """(record, Jaccard) of the most similar candidate at or above the threshold; None if none is."""
    scored = [(jaccard(shingles, pool[c]), c) for c in candidates]
    scored = [(score, c) for score, c in scored if score >= NEAR_DUPLICATE_JACCARD]
    if not scored:
        return None
    score, candidate = max(scored, key=lambda pair: (pair[0], -pair[1]))
    return candidate, round(score, 3)


def find_overlap(report: DataReport, shingles: Sequence[set], exact_keys: dict, lsh) -> None:
    eval_shingles = [shingle_set(text) for text in report.eval_texts]
    eval_hashes = minhashes(eval_shingles)
    for index, text in enumerate(report.eval_texts):
        key = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if key in exact_keys:
            report.eval_exact_overlap.append((index, exact_keys[key]))
            continue
        match = best_match(eval_shingles[index], lsh.query(eval_hashes[index]), shingles)
        if match is not None:
            report.eval_near_overlap.append((index, *match))


def check_tokens(report: DataReport, records, positions: Sequence[int], tokenizer, collator,
                 max_seq_length: int) -> None:
    """The loss mask as the run's collator sets it, on each record cut to --max_seq_length as training cuts it.
    `positions`: each record's number as read, which the findings name."""
    from records.batching import record_labels  # torch and trl: loaded by the scripts anyway

    ids_list = tokenizer([format_example(record) for record in records], add_special_tokens=True)["input_ids"]
    report.lengths = [len(ids) for ids in ids_list]
    cut = [{"input_ids": ids[:max_seq_length]} for ids in ids_list]
    with warnings.catch_warnings():  # trl warns once per record whose answer the cut removed: counted here instead
        warnings.simplefilter("ignore")
        labels = record_labels(cut, collator)
    report.tokens = sum(len(row["input_ids"]) for row in cut)
    report.trained_tokens = sum(sum(label != -100 for label in row) for row in labels)
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model_turn = tokenizer.encode(MODEL_TURN_START, add_special_tokens=False)
    for index, record, ids, row_labels in zip(positions, records, ids_list, labels):
        answer = answer_text(record)
        if answer is None:  # plain text: no turns
            if len(ids) > max_seq_length:
                report.answers_cut.append((index, len(ids)))
            continue
        if not normalise(answer):
            report.empty_answers.append(index)
        start = last_occurrence(ids, model_turn)
        end = next((i for i in range(start + len(model_turn), len(ids)) if ids[i] == end_of_turn), None) \
            if start is not None else None
        if end is None:
            continue
        report.end_of_turn_checked += 1
        if end >= max_seq_length:
            report.end_of_turn_cut.append(index)
            report.answers_cut.append((index, len(ids)))
        elif row_labels[end] == -100:
            report.end_of_turn_masked.append(index)
        else:
            report.end_of_turn_labelled += 1


def last_occurrence(ids: Sequence[int], pattern: Sequence[int]) -> Optional[int]:
    width = len(pattern)
    for i in range(len(ids) - width, -1, -1):
        if ids[i] == pattern[0] and list(ids[i : i + width]) == list(pattern):
            return i
    return None


# ---------------------------------------------------------------------------
# Telling
# ---------------------------------------------------------------------------


def summary(report: DataReport) -> str:
    percent = lambda n, of: f"{n} ({100 * n / max(1, of):.1f}%)"  # noqa: E731
    lines = [f"Data doctor ({report.records} training records"
             + (f", {report.eval_records} eval" if report.eval_records is not None else "") + f", {report.seconds:.1f} s):",
             f"  duplicates: {percent(len(report.exact_duplicates), report.records)} exact, "
             f"{percent(len(report.near_duplicates), report.records)} near"
             + (f"; {report.dropped_duplicates} dropped (--drop_duplicates)" if report.dropped_duplicates else "")]
    if report.eval_records is not None:
        lines.append(f"  in both train and eval: {len(report.eval_exact_overlap)} exact, "
                     f"{len(report.eval_near_overlap)} near of {report.eval_records} eval records"
                     + (f"; {report.dropped_eval} dropped (--drop_eval_overlap)" if report.dropped_eval else ""))
    lines.append(f"  tokens learnt: {100 * report.trained_share:.1f}% of {report.tokens:,} (after the loss mask and "
                 f"the --max_seq_length {report.max_seq_length} cut)")
    if report.end_of_turn_checked:
        lines.append(f"  final {END_OF_TURN} learnt: {report.end_of_turn_labelled} of {report.end_of_turn_checked}; "
                     f"masked {len(report.end_of_turn_masked)}, cut off {len(report.end_of_turn_cut)}")
    lines.append(f"  answers cut by --max_seq_length: {len(report.answers_cut)}; answers with no word: "
                 f"{len(report.empty_answers)}")
    return "\n".join(lines)


def log_report(report: DataReport) -> None:
    logger.info("%s", summary(report))
    if report.end_of_turn_masked:
        logger.warning(
            "%d of %d records have their final %s masked out of the loss: the model will not learn to stop, and "
            "answers run on. Check the tokenizer's pad token (it must not be %s) and the loss mask: data_report.md "
            "lists them; TROUBLESHOOTING.md, 'Data'.", len(report.end_of_turn_masked), report.end_of_turn_checked,
            END_OF_TURN, END_OF_TURN)
    if report.overlap and not report.dropped_eval:
        logger.warning("%d eval records are also in the training data (exactly or nearly): the eval loss and the "
                       "report card will look better than the model is. --drop_eval_overlap drops them.", report.overlap)
    if report.duplicates and not report.dropped_duplicates:
        logger.info("%d training records repeat an earlier one (exactly or nearly): --drop_duplicates drops them.",
                    report.duplicates)


def write_report(report: DataReport, folder: Path) -> Path:
    """data_report.md and the token-length histogram in `folder`; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    plotted = plot_lengths(report.lengths, report.max_seq_length, folder / DATA_LENGTHS_PNG)
    path = folder / DATA_REPORT_MD
    path.write_text(markdown(report, plotted))
    return path


def markdown(report: DataReport, plotted: bool) -> str:
    n = report.records
    share = lambda k, of=n: f"{k} ({100 * k / max(1, of):.1f}%)"  # noqa: E731
    lines = [f"# Data report: {report.source}\n",
             f"{report.records} training records" + (f", {report.eval_records} eval records" if report.eval_records
                                                     is not None else "") + f". Checked in {report.seconds:.1f} s.\n",
             "| check | found | fix |", "|---|---|---|",
             f"| exact duplicates (case, punctuation and spacing ignored) | {share(len(report.exact_duplicates))} | "
             "`--drop_duplicates` |",
             f"| near duplicates (MinHash, Jaccard >= {NEAR_DUPLICATE_JACCARD} of character {SHINGLE_CHARACTERS}-grams) "
             f"| {share(len(report.near_duplicates))} | `--drop_duplicates` |"]
    if report.eval_records is not None:
        lines += [f"| eval records also in the training data, exact | "
                  f"{share(len(report.eval_exact_overlap), report.eval_records)} | `--drop_eval_overlap` |",
                  f"| eval records also in the training data, near | "
                  f"{share(len(report.eval_near_overlap), report.eval_records)} | `--drop_eval_overlap` |"]
    lines += [f"| tokens learnt (after the loss mask and the cut) | {100 * report.trained_share:.1f}% of "
              f"{report.tokens:,} | `--completion_only_loss false` learns the prompts too |"]
    if report.end_of_turn_checked:
        lines += [f"| final `{END_OF_TURN}` learnt (the model learns to stop) | {report.end_of_turn_labelled} of "
                  f"{report.end_of_turn_checked} | |",
                  f"| final `{END_OF_TURN}` masked out of the loss | {len(report.end_of_turn_masked)} | the tokenizer's "
                  "pad token must not be it |",
                  f"| final `{END_OF_TURN}` cut off by --max_seq_length | {len(report.end_of_turn_cut)} | raise "
                  "`--max_seq_length` |"]
    lines += [f"| answers cut by --max_seq_length {report.max_seq_length} | {share(len(report.answers_cut))} | raise "
              "`--max_seq_length` |",
              f"| answers with no word (punctuation only) | {len(report.empty_answers)} | blank ones are skipped when "
              "read |"]
    if report.dropped_duplicates or report.dropped_eval:
        lines.append(f"\nDropped: {report.dropped_duplicates} duplicate training records, {report.dropped_eval} "
                     "overlapping eval records.")
    if plotted:
        lines.append(f"\n![token lengths, the --max_seq_length cut marked]({DATA_LENGTHS_PNG})")
    ordered = sorted(report.lengths) or [0]
    lines.append(f"\nToken lengths: min {ordered[0]}, median {ordered[len(ordered) // 2]}, "
                 f"95th percentile {ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}, max {ordered[-1]}.")

    def quote(text: str) -> str:
        return text[:200] + ("..." if len(text) > 200 else "")

    sections = [
        ("Exact duplicates", [f"- record {a} repeats record {b}: `{quote(report.texts[a])}`"
                              for a, b in report.exact_duplicates]),
        ("Near duplicates", [f"- record {a} ~ record {b} (Jaccard {j}):\n  - `{quote(report.texts[a])}`\n"
                             f"  - `{quote(report.texts[b])}`" for a, b, j in report.near_duplicates]),
        ("Eval records in the training data", [
            f"- eval record {a} = training record {b}: `{quote(report.eval_texts[a])}`" for a, b in report.eval_exact_overlap
        ] + [f"- eval record {a} ~ training record {b} (Jaccard {j}):\n  - `{quote(report.eval_texts[a])}`\n"
             f"  - `{quote(report.texts[b])}`" for a, b, j in report.eval_near_overlap]),
        (f"Final `{END_OF_TURN}` masked out of the loss", [f"- record {i}: `{quote(report.texts[i])}`"
                                                         for i in report.end_of_turn_masked]),
        ("Answers cut by --max_seq_length", [f"- record {i} ({length} tokens): `{quote(report.texts[i])}`"
                                              for i, length in report.answers_cut]),
        ("Answers with no word", [f"- record {i}: `{quote(report.texts[i])}`" for i in report.empty_answers]),
    ]
    for title, items in sections:
        if items:
            lines += [f"\n## {title} ({len(items)}; the first {min(EXAMPLES, len(items))})\n", *items[:EXAMPLES]]
    lines.append("\nRecord numbers count from 0 over the training (or eval) records as read, blank ones skipped, "
                 "after the eval split where there is one; texts are shown normalised (lower case, no punctuation).")
    return "\n".join(lines) + "\n"


def plot_lengths(lengths: Sequence[int], max_seq_length: int, path: Path) -> bool:
    """The token lengths as a histogram, the --max_seq_length cut marked; False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.hist(lengths, bins=min(60, max(10, len(set(lengths)))), color="#4c72b0")
    axes.axvline(max_seq_length, color="#c44e52", linestyle="--", label=f"--max_seq_length {max_seq_length}")
    cut = sum(length > max_seq_length for length in lengths)
    axes.set_title(f"{len(lengths)} records, {cut} longer than the cut")
    axes.set_xlabel("tokens per record")
    axes.set_ylabel("records")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
