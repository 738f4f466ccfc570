"""The first step's compile on the CPU (inductor's C++ backend): compiled and offloaded decoder layers of a small
QLoRA Gemma 3 (6 layers, one of full attention), a graph for each kind of layer (`two`) or one for both (`one`,
override 17). Run from the repository root, each with its own empty cache:

    for m in two one; do TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/first_step_cpu.py $m; done
"""
import pathlib
import sys
import tempfile
import time

import torch

sys.path[:0] = ["finetuning", "tests"]
from conftest import quantized_lora_model, small_gemma  # noqa: E402
from fastpath import compiled_layers, lora_4bit, offload, one_layer_graph  # noqa: E402


def step(model, ids) -> float:
    began = time.perf_counter()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - began


def main(mode: str) -> None:
    base = small_gemma(layers=6, layer_types=["sliding_attention", "full_attention"] + ["sliding_attention"] * 4)
    model = quantized_lora_model(pathlib.Path(tempfile.mkdtemp()), dropout=0.0, base=base)
    lora_4bit.fuse_lora_4bit(model, keep_dequantized_weight=True)
    model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in compiled_layers.decoder_layers(model):
        layer._gradient_checkpointing_func = offload.checkpoint_compiled  # as a run installs it with compiled layers
    with compiled_layers.compiler_settings():
        compiled_layers.compile_decoder_layers(model)
        if mode == "one":
            one_layer_graph.unify_layer_kinds(model)
        before = compiled_layers.compile_seconds()["total"]
        first = step(model, torch.randint(3, 300, (2, 40)))
        spent = compiled_layers.compile_seconds()["total"] - before
        second = step(model, torch.randint(3, 300, (3, 33)))
    print(f"{mode}: first step {first:.1f} s (torch.compile {spent:.1f} s), second step {second:.2f} s", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] not in (["one"], ["two"]):
        raise SystemExit("usage: python bench/first_step_cpu.py one|two")
    main(sys.argv[1])
