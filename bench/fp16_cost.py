"""What the fp16 fixes cost: a training step of the real gemma-3-1b shapes in fp16 autocast, with and without them.

    python bench/fp16_cost.py --model /tmp/gemma-3-1b-random

Times forward + backward (median of 10 steps after 3 warm-ups) of one batch of
1,024-token sequences, four ways: stock, with the fp32 residual stream, with the
chunked loss, with both (the scripts' fp16 path). Prints step time and peak memory.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from fastpath import chunked_loss, rms_norm
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetuning"))


def time_steps(model, input_ids, steps=10, warmup=3):
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, loss.item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    input_ids = torch.randint(3, 8000, (args.batch, args.seq), device="cuda")
    print(f"GPU: {torch.cuda.get_device_name()}; batch {args.batch} x {args.seq} tokens; fp16 autocast, fp32 weights")
    for name, residual, chunked in [("stock", False, False), ("fp32 residual", True, False),
                                    ("chunked loss", False, True), ("both (scripts)", True, True)]:
        model = copy.deepcopy(base).cuda()
        if residual:
            rms_norm.fuse_rms_norms(model, fp32_residual=True)
        if chunked:
            chunked_loss.use_chunked_loss(model)
        seconds, peak, loss = time_steps(model, input_ids)
        print(f"{name:16s} step {seconds * 1000:7.1f} ms  peak {peak:6.2f} GiB  loss {loss:.4f}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
