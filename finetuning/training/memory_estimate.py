"""How much GPU memory a run needs, from the model's config alone: what the batch chosen with no flags is capped by
(auto_batch.py), and what stops a run that cannot fit before anything loads (`check_fits`), naming the card it needs.

    peak = weights + optimizer states + max(forward pass, backward pass) + 0.25 GiB of workspaces
    forward  = tokens x (checkpointed layer input + one layer's activations + the loss's hidden states)
               + the loss's chunk of logits (and, for GaLore, the output layer's float32 gradient)
               + under fp16, autocast's 16-bit copies of float32 weights
    backward = gradients (GaLore: every language-model weight) + tokens x (checkpointed input + one layer)

Weights: QLoRA's linear layers at 0.52 bytes a weight (NF4 and its double-quantized scales), the embedding in bf16
(fp16 runs: float32), the adapters with their gradients and Adam states at 16 bytes a weight. GaLore: every weight in
bf16 (fp16 runs: float32 master weights), 8-bit Adam states (2 bytes) for the embedding and norms, GaLore's low-rank
states and projections at 4 bytes x rank x (rows + columns) per projected matrix. Activations with gradient
checkpointing (the default): the residual stream at each layer's input (2 bytes an element, 4 under fp16, where it
stays float32), and one layer's recomputed activations, 2 x (5 x intermediate + 12 x hidden + 2 x (q + 2 kv)) bytes a
token.

Against the H100 measurements of gemma-3-1b (docs/benchmarks.md) the estimate errs high: QLoRA at 8k tokens 3.3 GiB
against 2.07 measured, at 32k 7.2 against 4.52; GaLore at 32k 10.5 against 7.06 (those runs offload the checkpointed
inputs to the CPU, which the estimate does not count on); GaLore at 4k under T4 emulation 10.4 against 10.09. A
budget is chosen where the estimate stays within 92% of the card's memory less 0.5 GiB (the CUDA context,
fragmentation). Not yet checked against a measurement of 270m or 4b: bench/unsloth_setup.md has the commands.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from cli.errors import UserInputError
from models.shapes import Shape

GIB = 2**30
NF4_BYTES = 0.52  # a 4-bit weight with its double-quantized block scales
WORKSPACE = 0.25 * GIB
LOSS_CHUNK = 2 * 2**28  # chunked_loss: about 256 MiB of float32 probabilities a chunk, its logits and gradient
DEFAULT_LORA_RANK, DEFAULT_GALORE_RANK = 16, 128
# The budgets tried, smallest first (whole rows of --max_seq_length are taken later, in auto_batch.token_budget).
BUDGETS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)

# Cards a run is told it needs: (what to call them, GiB torch reports, bf16). The smallest that fits is named.
CARDS = (
    ("a 16 GB T4", 14.74, False),
    ("a 24 GB card with bf16 (L4, A10G, RTX 3090/4090)", 22.0, True),
    ("a 40 GB A100", 39.4, True),
    ("a 48 GB card (L40S, RTX 6000 Ada, A6000)", 44.4, True),
    ("an 80 GB A100 or H100", 79.1, True),
    ("a 141 GB H200", 139.8, True),
)


def usable_bytes(gpu_gib: float) -> float:
    """What a run may plan to allocate on a card of this many GiB."""
    return (0.92 * gpu_gib - 0.5) * GIB


@dataclass(frozen=True)
class Estimate:
    """A run's memory in bytes, as the module's docstring says: fixed parts, and what a token adds."""

    method: str
    shape: Shape
    fp16: bool
    weights: float
    states: float  # optimizer states; for QLoRA also the adapters and their gradients
    gradients: float
    forward_fixed: float  # the loss's transient, autocast's copies, a layer's dequantized weights
    per_token_forward: float
    per_token_backward: float

    def at(self, tokens: int) -> float:
        forward = self.forward_fixed + tokens * self.per_token_forward
        backward = self.gradients + tokens * self.per_token_backward
        return self.weights + self.states + max(forward, backward) + WORKSPACE

    def describe(self, tokens: int) -> str:
        """'about 27.6 GiB: weights 16.0, gradients 14.5, optimizer states 2.3, at 1,024 tokens a step ...'"""
        weights = "float32 master weights" if self.method == "GaLore" and self.fp16 else "weights"
        parts = [f"{weights} {self.weights / GIB:.1f}"]
        if self.gradients:
            parts.append(f"gradients {self.gradients / GIB:.1f}")
        states = "adapters and their Adam states" if self.method == "QLoRA" else "8-bit optimizer states"
        parts.append(f"{states} {self.states / GIB:.1f}")
        rest = self.at(tokens) - self.weights - self.states - self.gradients
        parts.append(f"activations and the loss at {tokens:,} tokens a step {max(rest, 0) / GIB:.1f}")
        return f"about {self.at(tokens) / GIB:.1f} GiB ({', '.join(parts)} GiB)"


def estimate(shape: Shape, method: str, fp16: bool, lora_rank: int = DEFAULT_LORA_RANK,
             galore_rank: int = DEFAULT_GALORE_RANK, checkpointing: bool = True, processes: int = 1) -> Estimate:
    """The memory of `method` ("QLoRA" or "GaLore") training `shape` on one GPU; fp16: a GPU without bf16."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    residual = 4 if fp16 else 2
    layer = 2 * (5 * shape.intermediate + 12 * shape.hidden + 2 * (q + 2 * kv))
    checkpointed = shape.layers * shape.hidden * residual
    if not checkpointing:  # every layer's activations kept for the backward pass
        checkpointed, layer = checkpointed + shape.layers * layer, 0
    loss = 8 * shape.hidden
    norms = shape.text_parameters - shape.text_linear - shape.embedding
    if method == "QLoRA":
        weights = ((shape.text_linear + shape.vision_linear) * NF4_BYTES + shape.embedding * residual
                   + (shape.vision_other + norms) * 4)
        states = shape.lora_parameters(lora_rank) * 16
        gradients = 0.0
        forward_fixed = (LOSS_CHUNK + 4 * shape.layer_linear  # a recomputed layer's 16-bit weights, kept
                         + (2 * shape.embedding if fp16 else 0))  # autocast's 16-bit copy of the float32 output layer
    else:
        width = 4 if fp16 else 2
        weights = shape.parameters * width
        states = 2 * (shape.embedding + norms) + 4 * shape.galore_state_elements(galore_rank)
        gradients = shape.text_parameters * width * (2 if processes > 1 else 1)  # DDP: its buckets too
        forward_fixed = (LOSS_CHUNK + shape.embedding * (4 + width)  # the output layer's float32 gradient, and cast
                         + (2 * shape.text_parameters if fp16 else 0))  # autocast's 16-bit copies
    return Estimate(method, shape, fp16, weights, states, gradients, forward_fixed,
                    checkpointed + layer + loss, checkpointed + layer)


def largest_budget(est: Estimate, gpu_gib: float, row: int) -> Optional[int]:
    """The largest of BUDGETS (at least one row of `row` tokens) whose estimate fits a card of `gpu_gib`; None where
    not even one row fits."""
    fitting = [tokens for tokens in BUDGETS if tokens >= row and est.at(tokens) <= usable_bytes(gpu_gib)]
    if fitting:
        return fitting[-1]
    return row if est.at(row) <= usable_bytes(gpu_gib) else None


def card_needed(shape: Shape, method: str, row: int, **kwargs) -> Optional[tuple[str, Estimate]]:
    """The smallest of CARDS on which one row fits, with its estimate there; None where none does."""
    for name, gib, bf16 in CARDS:
        est = estimate(shape, method, fp16=not bf16, **kwargs)
        if largest_budget(est, gib, row) is not None:
            return name, est
    return None


def check_fits(shape: Shape, method: str, fp16: bool, gpu: tuple[float, str], row: int, **kwargs) -> Estimate:
    """Stop, before anything loads, a run whose estimate at one row of `row` tokens is past the GPU's memory, saying
    the estimate and the card it needs. Returns the estimate."""
    gib, name = gpu
    est = estimate(shape, method, fp16, **kwargs)
    if largest_budget(est, gib, row) is not None:
        return est
    needed = card_needed(shape, method, row, **kwargs)
    where = (f"It needs {needed[0]}, where the estimate is {needed[1].describe(row)}" if needed else
             "No single card listed fits it; use several GPUs or a smaller model")
    other = ""
    if method == "GaLore":
        qlora = estimate(shape, "QLoRA", fp16, **{k: v for k, v in kwargs.items() if k != "galore_rank"})
        if largest_budget(qlora, gib, row) is not None:
            other = (f" Or train it with train_qlora.py (4-bit base weights and LoRA adapters), which fits this GPU: "
                     f"{qlora.describe(row)}.")
    raise UserInputError(
        f"{method} on {shape.label} does not fit this GPU, the {name} with {gib:.1f} GiB: the estimate at one row of "
        f"--max_seq_length {row} is {est.describe(row)}{', without bf16' if fp16 else ''}. {where}.{other} "
        "(The estimate is docs/usage.md's, from the model's config; it errs high.)"
    )
