"""Peak memory of one LoRA MLP's forward and backward pass at gemma-3-1b's shapes, on the CPU, in token chunks or not.

    python bench/mlp_chunk_memory.py compiled 1     # or: eager 1, compiled 2, compiled 4, eager 2

8,192 tokens, float32, LoRA r16 on frozen weights, Gemma's tanh GELU; the chunks made by override 14's own forward
(finetuning/mlp_chunks.py). The peak is the process's resident high-water mark above what it held before the measured step
(Linux: /proc/self/clear_refs resets it), in blocks of tokens x 6,912 x 4 bytes, the MLP's intermediate size.
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetuning"))
import mlp_chunks  # noqa: E402

TOKENS, HIDDEN, INTERMEDIATE, RANK = 8192, 1152, 6912, 16


def lora_linear(inputs, outputs):
    return (torch.randn(outputs, inputs) * 0.02, (torch.randn(RANK, inputs) * 0.02).requires_grad_(),
            (torch.randn(outputs, RANK) * 0.02).requires_grad_())


def lora(x, weight, a, b):
    return x @ weight.T + 2.0 * ((x @ a.T) @ b.T)


class LoraMlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up = lora_linear(HIDDEN, INTERMEDIATE), lora_linear(HIDDEN, INTERMEDIATE)
        self.down = lora_linear(INTERMEDIATE, HIDDEN)

    def forward(self, x):
        return lora(F.gelu(lora(x, *self.gate), approximate="tanh") * lora(x, *self.up), *self.down)


def status(field: str) -> float:
    line = next(line for line in open("/proc/self/status") if line.startswith(field))
    return int(line.split()[1]) / 1024


def main(mode: str, chunks: int) -> None:
    torch.manual_seed(0)
    module = LoraMlp()
    if chunks > 1:
        mlp_chunks.run_in_pieces(module, LoraMlp.forward, chunks)
    run = torch.compile(module) if mode == "compiled" else module
    x, grad = torch.randn(TOKENS, HIDDEN).requires_grad_(), torch.randn(TOKENS, HIDDEN)
    run(x).backward(grad)  # compiles
    open("/proc/self/clear_refs", "w").write("5")
    before = status("VmRSS")
    started = time.perf_counter()
    run(x).backward(grad)
    seconds = time.perf_counter() - started
    peak = status("VmHWM") - before
    block = TOKENS * INTERMEDIATE * 4 / 2**20
    print(f"{mode}, {chunks} chunk(s): {peak:,.0f} MiB above the start = {peak / block:.2f} blocks of {block:.0f} MiB; "
          f"{seconds:.2f} s")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
