"""From formatted records to training batches: batches by tokens (padded, or packed without padding), and the
SFTTrainer subclass that serves them."""
from __future__ import annotations

import bisect
import logging
import random
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader
from trl import SFTTrainer

from cli.arguments import DataArguments
from common import formatting_func
from records.run_data import RunData

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Batches by tokens
# ---------------------------------------------------------------------------


class EpochSeed:
    """The seed of a batch sampler's shuffle, per epoch. It is the batch sampler's `sampler`, where accelerate's
    data loader sets the epoch under DDP too (it wraps the batch sampler there)."""

    def __init__(self, seed: int):
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self) -> random.Random:
        return random.Random(self.seed * 1000003 + self.epoch)


class TokenBudgetBatchSampler:
    """Batches of records of similar length, each within a budget of padded tokens.

    Every training step costs the GPU a fixed amount of launch overhead (about 0.7 s
    for gemma-3-1b on an H100, docs/benchmarks.md) whatever its size; short
    instruction records in fixed-size batches leave it idle. The batches are formed
    once (a seeded shuffle, then length-sorted windows cut greedily to the budget),
    so their count is exact for the scheduler; only their order changes per epoch.
    The fullest batches come first, so an out-of-memory error shows at step 1.

    `processes` (DDP): accelerate deals the batches out in turn, the i-th to process i mod `processes`, so their
    count is made a multiple of it (the batches of most records are halved): every process takes the same number
    of steps, and every record is seen once an epoch.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int = 0, window: int = 1024,
                 processes: int = 1):
        order = list(range(len(lengths)))
        random.Random(seed).shuffle(order)
        self.batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
            batch, longest = [], 0
            for index in chunk:
                if batch and max(longest, lengths[index]) * (len(batch) + 1) > max_tokens:
                    self.batches.append(batch)
                    batch, longest = [], 0
                batch.append(index)
                longest = max(longest, lengths[index])
            if batch:
                self.batches.append(batch)
        self.repeated = 0
        while len(self.batches) % processes:
            largest = max(range(len(self.batches)), key=lambda i: len(self.batches[i]))
            batch = self.batches[largest]
            if len(batch) > 1:
                self.batches[largest:largest + 1] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
            else:  # every batch is one record: some records are seen twice
                self.batches.append(self.batches[self.repeated])
                self.repeated += 1
        self.padded_tokens = [max(lengths[i] for i in b) * len(b) for b in self.batches]
        self.processes, self.sampler = processes, EpochSeed(seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        order = list(range(len(self.batches)))
        self.sampler.rng().shuffle(order)
        fullest = sorted(order, key=lambda i: -self.padded_tokens[i])[: self.processes]
        for index in fullest:
            order.remove(index)
        for index in [*fullest, *order]:
            yield self.batches[index]


def pack_into_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Record indices grouped into rows of at most `row_tokens` tokens: best-fit decreasing bin packing.

    Each record goes to the fullest row it still fits in, longest records first,
    so rows come out nearly full (a few per cent of padding for instruction data).
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row number), sorted
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = min(lengths[index], row_tokens)
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            left, row = free.pop(at)
        else:
            left, row = row_tokens, len(rows)
            rows.append([])
        rows[row].append(index)
        if left - length > 0:
            bisect.insort(free, (left - length, row))
    return rows


def packed_rows(features: Sequence[dict], labels: Sequence[Sequence[int]], rows: Sequence[Sequence[int]]) -> list[dict]:
    """Each row's records concatenated (input_ids, labels), with the records' lengths, from which `pad_rows`
    derives the position ids.

    The first label of every record is masked: in a packed row it would be
    predicted from the previous record's last token.
    """
    packed = []
    for row in rows:
        input_ids, row_labels, lengths = [], [], []
        for index in row:
            ids = list(features[index]["input_ids"])
            record_labels = list(labels[index])
            record_labels[0] = -100
            input_ids += ids
            row_labels += record_labels
            lengths.append(len(ids))
        packed.append({"input_ids": input_ids, "labels": row_labels, "lengths": lengths})
    return packed


def record_labels(features: Sequence[dict], collator: Optional[Callable], chunk: int = 256) -> list[list[int]]:
    """Each record's labels as the collator sets them (answers only, say), unpadded; the input ids where it is None."""
    if collator is None:
        return [list(f["input_ids"]) for f in features]
    labels = []
    for start in range(0, len(features), chunk):
        part = [{"input_ids": f["input_ids"], "attention_mask": [1] * len(f["input_ids"])}
                for f in features[start : start + chunk]]
        batch = collator(part)
        for row_labels, row_mask in zip(batch["labels"], batch["attention_mask"]):
            labels.append(row_labels[row_mask.bool()].tolist())
    return labels


class PackedBatches:
    """Batches of packed rows for a DataLoader's batch_sampler: rows shuffled per epoch, full batches first.

    Every batch but the last few has `rows_per_batch` rows, padded to the same
    length, so memory is the same at every step and an out-of-memory error shows
    at step 1. Under DDP (`processes`) accelerate deals the batches out in turn,
    the i-th to process i mod `processes`: their count is a multiple of it, and the
    rows that do not fill the last round are spread over its batches (taken from
    full batches before it where a round would have too few), so every process
    takes the same number of steps and every row is seen once an epoch; only with
    fewer rows than batches are a few rows seen twice (`repeated`).
    """

    def __init__(self, row_count: int, rows_per_batch: int, seed: int = 0, processes: int = 1):
        self.row_count, self.rows_per_batch, self.processes = row_count, rows_per_batch, processes
        self.sampler = EpochSeed(seed)
        batches = -(-row_count // (rows_per_batch * processes)) * processes
        self.sizes = [rows_per_batch] * batches
        surplus = batches * rows_per_batch - row_count
        for index in reversed(range(batches)):  # each batch keeps at least one row
            cut = min(rows_per_batch - 1, surplus)
            self.sizes[index] -= cut
            surplus -= cut
        self.repeated = max(0, sum(self.sizes) - row_count)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        order = list(range(self.row_count))
        self.sampler.rng().shuffle(order)
        order += order[: self.repeated]
        start = 0
        for size in self.sizes:
            yield order[start : start + size]
            start += size


def pad_rows(pad_token_id: int, row_tokens: int) -> Callable[[Sequence[dict]], dict]:
    """Collate packed rows to one [rows, row_tokens] shape. Padding gets label -100 and position ids of its own.

    The batch also carries each record's bounds in the flattened batch
    (`cu_seq_lens_q/k`, `max_length_q/k`, transformers' names for them), which
    overrides.use_varlen_attention hands to a variable-length attention kernel.
    """

    def collate(rows: Sequence[dict]) -> dict:
        batch = {
            "input_ids": torch.full((len(rows), row_tokens), pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), row_tokens), -100, dtype=torch.long),
        }
        lengths = []
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(row["input_ids"])
            batch["labels"][i, :n] = torch.tensor(row["labels"])
            lengths += row["lengths"]
            # Padding is one more "record", after every real token, so none of them can see it.
            if n < row_tokens:
                lengths.append(row_tokens - n)
        # Position ids restart at 0 for every record (and the padding).
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).view(len(rows), row_tokens)
        bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        batch.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(lengths), max_length_k=max(lengths))
        return batch

    return collate


def row_fill(lengths: Sequence[int], rows: Sequence[Sequence[int]], row_tokens: int) -> float:
    """The share of the rows' tokens that are real (not padding)."""
    return sum(min(length, row_tokens) for length in lengths) / max(1, len(rows) * row_tokens)


# ---------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------


def build_trainer(model, loaded: RunData, data_args: DataArguments, training_args, callbacks=None,
                  **kwargs) -> SFTTrainer:
    """trl's SFTTrainer on the records (it formats and tokenizes them), batching by tokens where asked."""
    collator = loaded.collator
    inputs = dict(
        model=model, args=training_args, train_dataset=loaded.records, eval_dataset=loaded.eval_records,
        tokenizer=loaded.tokenizer, formatting_func=formatting_func, max_seq_length=data_args.max_seq_length,
        packing=data_args.packing, data_collator=collator, callbacks=callbacks, **kwargs,
    )
    if data_args.max_tokens_per_batch is None:
        logger.info(
            "Batches of %d records, each padded to the longest. On short records, token batches (packed, no "
            "padding: what runs where no batch flag is given) train many times faster: README.md, 'Speed'.",
            training_args.per_device_train_batch_size,
        )
        trainer = SFTTrainer(**inputs)
    else:
        trainer = TokenBudgetSFTTrainer(data_args=data_args, response_collator=collator, **inputs)
    return trainer


class TokenBudgetSFTTrainer(SFTTrainer):
    """SFTTrainer whose training batches hold --max_tokens_per_batch tokens: packed rows, or padded records."""

    def __init__(self, *args, data_args: DataArguments, response_collator, **kwargs):
        self.max_tokens = data_args.max_tokens_per_batch
        self.row_tokens = data_args.max_seq_length
        self.padding_free = data_args.padding_free
        self.response_collator = response_collator
        super().__init__(*args, **kwargs)

    def get_train_dataloader(self):
        # trl 0.8.6 leaves only the tokenized columns; anything else would not collate.
        dataset = self.train_dataset.select_columns(
            [c for c in ("input_ids", "attention_mask") if c in self.train_dataset.column_names])
        lengths = [len(ids) for ids in dataset["input_ids"]]
        processes = self.accelerator.num_processes
        if self.padding_free:
            features = dataset.to_list()
            rows = pack_into_rows(lengths, self.row_tokens)
            data = packed_rows(features, record_labels(features, self.response_collator), rows)
            sampler = PackedBatches(len(data), max(1, self.max_tokens // self.row_tokens), self.args.seed, processes)
            collate = pad_rows(self.tokenizer.pad_token_id, self.row_tokens)
            logger.info(
                "Padding-free batches: %d records packed into %d rows of %d tokens (%.1f%% filled), "
                "%d rows a batch.", len(lengths), len(rows), self.row_tokens,
                100 * row_fill(lengths, rows, self.row_tokens), sampler.rows_per_batch,
            )
        else:
            data, collate = dataset, self.data_collator
            sampler = TokenBudgetBatchSampler(lengths, self.max_tokens, self.args.seed, processes=processes)
            logger.info(
                "Batching by tokens: %d batches of up to %d padded tokens (mean %.1f records a batch).",
                len(sampler), self.max_tokens, len(dataset) / len(sampler),
            )
        if sampler.repeated:
            unit = (("batch", "batches"), ("row", "rows"))[self.padding_free][sampler.repeated != 1]
            logger.info("So that each of the %d processes takes the same number of steps, %d %s of the epoch %s "
                        "seen twice.", processes, sampler.repeated, unit, "is" if sampler.repeated == 1 else "are")
        loader = DataLoader(
            data, batch_sampler=sampler, collate_fn=collate,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)
