"""Write a randomly initialised Gemma 3 of given shapes, with a tokenizer trained on real text, for GPU runs and benchmarks.

    python bench/make_random_model.py --config ../shared/gemma-3-1b/config.json \
        --texts ../shared/datasets/alpaca_5000.json --out /tmp/gemma-3-1b-random

Random weights cost the same compute and memory as the real ones, which the model
hub (gated, and unreachable from CI) would otherwise be needed for. Any size's config.json: gemma-3-270m and -1b
give Gemma3ForCausalLM, gemma-3-4b (and 12b, 27b) Gemma3ForConditionalGeneration with its SigLIP vision tower at full
size (as AutoModelForCausalLM builds them). The weights are written in bfloat16, as published; built on the GPU where
there is one (4b's 4.3B weights: seconds there, minutes on a CPU).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetuning"))
import common  # noqa: E402
from models import smoke  # noqa: E402


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="A Gemma 3 config.json.")
    parser.add_argument("--texts", type=Path, required=True, help="Instruction records (JSON list) to train the tokenizer on.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab_size", type=int, default=32000, help="Tokenizer size (the model keeps the config's).")
    args = parser.parse_args(argv)
    records = json.loads(args.texts.read_text())
    texts = [common.format_record(record) for record in records]
    smoke.build_random_gemma(args.out, texts, vocab_size=args.vocab_size, config_file=args.config)
    logging.getLogger(__name__).info("Wrote %s", args.out)
    return args.out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
