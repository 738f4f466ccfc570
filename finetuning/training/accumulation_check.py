"""Gradient accumulation, checked: the same records as one batch of N and as N batches of 1 accumulated over N
micro-batches must give the same loss and the same update. Where micro-batches hold different numbers of answer
tokens, averaging each micro-batch's loss and then the micro-batches weights the tokens of short ones more: the bug
of transformers issue 37197, which the Trainer fixes by dividing the summed loss by the step's token count
(`num_items_in_batch`), and which every loss override (the fast path's chunked loss) must keep fixed.

Run on the toolkit's own path: its records, collator, batching (packed rows, and padded record batches), trl's
SFTTrainer and the fast path; the tiny random Gemma 3 of --smoke unless a model folder is given. The update is the
gradient the optimizer steps with (plain SGD's update, with no clipping): Adam's first step, nearly sign(gradient),
would hide a wrong scale. `python finetuning/check_accumulation.py` runs it; so does the test suite.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import common
from cli.arguments import DataArguments
from cli.fast_path_flag import parse_fast_path
from fastpath.switchboard import FastPath
from records import batching, data, loading
from records.batching import pack_into_rows

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # relative, in float32
RECORDS = 10
ROW_TOKENS = 256


@dataclass
class Outcome:
    packing: bool
    micro_batches: int
    loss_one_batch: float
    loss_accumulated: float
    gradient_difference: float  # |g_accumulated - g_one_batch| / |g_one_batch|, over every trainable weight

    @property
    def loss_difference(self) -> float:
        return abs(self.loss_accumulated - self.loss_one_batch) / max(abs(self.loss_one_batch), 1e-12)

    def passed(self, tolerance: float = TOLERANCE) -> bool:
        return self.loss_difference <= tolerance and self.gradient_difference <= tolerance

    def line(self, tolerance: float = TOLERANCE) -> str:
        what = "packed rows" if self.packing else "padded records"
        return (f"{what}: 1 batch of {self.micro_batches} vs {self.micro_batches} x 1 accumulated: loss "
                f"{self.loss_one_batch:.6f} vs {self.loss_accumulated:.6f} (relative difference "
                f"{self.loss_difference:.1e}), gradient relative difference {self.gradient_difference:.1e}: "
                + ("same" if self.passed(tolerance) else f"DIFFERENT (tolerance {tolerance:.0e})"))


class Capture(TrainerCallback):
    """The accumulated gradients right before the optimizer step."""

    def __init__(self, model):
        self.model, self.gradients = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.gradients = torch.cat([p.grad.detach().float().flatten().cpu()
                                    for p in self.model.parameters() if p.requires_grad and p.grad is not None])


def check(model_dir: Optional[str] = None, fast_path: str = "all", device: str = "cpu", records: int = RECORDS,
          after_build: Optional[Callable] = None) -> list[Outcome]:
    """Both batch shapes, packed rows and padded records; one Outcome each. `after_build(trainer)` changes a trainer
    before it trains (the tests plant the bug with it)."""
    folder = Path(tempfile.mkdtemp(prefix="accumulation-check-"))
    data_args = DataArguments(max_seq_length=ROW_TOKENS, max_train_samples=records)
    loaded_records = data.load_records(data_args)
    if model_dir is None:
        from models import smoke

        model_dir = str(smoke.build_random_gemma(folder / "model", [common.format_example(r) for r in loaded_records]))
    tokenizer = common.load_tokenizer(model_dir)
    collator = loading.completion_only_collator(tokenizer, data_args, loaded_records)
    lengths = loading.token_lengths(loaded_records, tokenizer)
    loaded = loading.RunData(loaded_records, None, tokenizer, collator, model_dir, lengths)
    outcomes = []
    for packing in (True, False):
        if packing:  # rows as training packs them; one batch of them all against one row a micro-batch
            count = len(pack_into_rows(lengths, ROW_TOKENS))
            one = (dataclasses.replace(data_args, max_tokens_per_batch=count * ROW_TOKENS, padding_free=True), 1, 1)
            many = (dataclasses.replace(data_args, max_tokens_per_batch=ROW_TOKENS, padding_free=True), 1, count)
        else:
            count = len(loaded_records)
            one, many = (data_args, count, 1), (data_args, 1, count)
        results = [one_step(loaded, *shape, folder, fast_path, device, after_build) for shape in (one, many)]
        (loss_a, grads_a), (loss_b, grads_b) = results
        difference = (torch.linalg.vector_norm(grads_b - grads_a) / torch.linalg.vector_norm(grads_a)).item()
        outcomes.append(Outcome(packing, count, loss_a, loss_b, difference if math.isfinite(difference) else math.inf))
    return outcomes


def one_step(loaded, data_args: DataArguments, batch: int, accumulation: int, folder: Path, fast_path: str,
             device: str, after_build: Optional[Callable]) -> tuple[float, torch.Tensor]:
    """One optimizer step over every record: (the Trainer's train loss, unrounded; the accumulated gradient)."""
    torch.manual_seed(0)
    model = common.load_causal_lm(loaded.model_path, False, dtype=torch.float32).to(device)
    training_args = TrainingArguments(
        output_dir=str(folder / "run"), use_cpu=device == "cpu", per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant",
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to="none", seed=0, group_by_length=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=training_args.learning_rate)
    capture = Capture(model)
    trainer = batching.build_trainer(model, loaded, data_args, training_args, [capture], optimizers=(optimizer, None))
    for quiet in (PrinterCallback, ProgressCallback):  # one line per outcome is said instead
        trainer.remove_callback(quiet)
    if after_build is not None:
        after_build(trainer)
    fast = FastPath(parse_fast_path(fast_path), method="GaLore", padding_free=bool(data_args.packs_without_padding),
                    text=fast_path)
    with fast.installed(trainer):
        result = trainer.train()
    return result.training_loss, capture.gradients
