"""The names of the fast path's switches and the --fast_path flag's reading of them. Nothing heavy is imported here:
the command line reads it before torch loads."""
from __future__ import annotations

from cli.errors import UserInputError

# The switches, in the table's order (fastpath/__init__.py). SPEED: `none` turns them off. FIXES: without them the stock
# path trains wrongly, cannot run on the CPU, cannot resume or cannot start, so `none` keeps them; `-name` still drops one.
SPEED = ("rms_norm", "lora_4bit", "varlen_attention", "chunked_loss", "cudnn_off", "compile_layers", "offload",
         "skip_train", "flops_once", "kbit_embeddings", "trainable_grads", "one_layer_graph")
FIXES = ("galore_8bit", "galore_no_sync", "galore_resume", "one_gpu")
SWITCHES = SPEED + FIXES


def parse_fast_path(text: str) -> frozenset:
    """--fast_path: `all`, `none`, or a comma list read left to right from `all` (or from `none` where it starts with
    `none` or with a name): `name` turns a switch on, `-name` off. `none` keeps the fixes."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise UserInputError(f"--fast_path {text!r} is empty: give all, none, or switch names ({', '.join(SWITCHES)}).")
    starts_with_name = items[0] not in ("all", "none") and not items[0].startswith("-")
    on = set(FIXES) if starts_with_name else set(SWITCHES)
    for item in items:
        name = item.lstrip("-+")
        if item == "all":
            on = set(SWITCHES)
        elif item == "none":
            on = set(FIXES)
        elif name not in SWITCHES:
            raise UserInputError(
                f"--fast_path {text!r}: {name!r} is not a switch. The switches are {', '.join(SWITCHES)}; give all, "
                "none, or a comma list (e.g. all,-compile_layers). docs/architecture.md says what each does.")
        elif item.startswith("-"):
            on.discard(name)
        else:
            on.add(name)
    return frozenset(on)
