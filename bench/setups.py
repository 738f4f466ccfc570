"""The bench's setups by name (kind, method, batch, flags), and the sizes a name may start with ("4b: ours QLoRA, 8k
tokens/batch"), each a random-weight model of that size's published shapes. run_bench.py runs them."""
from __future__ import annotations

import shutil
from pathlib import Path

import long_context

# The sizes a setup name may start with ("4b: ours QLoRA, 8k tokens/batch"), each a random-weight model of its
# published shapes (--shapes_dir/gemma-3-SIZE/config.json), built once here.
SIZES = ("270m", "1b", "4b", "12b", "27b")
SIZE_MODEL = "/tmp/bench-gemma-3-{size}"


def sized_setup(name: str) -> tuple:
    """("4b", "ours QLoRA, 8k tokens/batch") for "4b: ours QLoRA, 8k tokens/batch"; (None, name) without a size."""
    size, separator, rest = name.partition(": ")
    return (size.strip(), rest) if separator and size.strip() in SIZES else (None, name)


def size_model(size: str, shapes_dir: Path, data: Path) -> Path:
    """The random-weight model of gemma-3-SIZE's shapes, built on first use (bench/make_random_model.py)."""
    config = shapes_dir / f"gemma-3-{size}" / "config.json"
    folder = Path(SIZE_MODEL.format(size=size))
    if not is_whole(folder) and not config.is_file():
        raise SystemExit(f"{config} is not there: --shapes_dir must hold gemma-3-{size}/config.json")
    return random_model(folder, config, data)


def is_whole(folder: Path) -> bool:
    """A model folder with its config and its weights (one file, or shards and their index)."""
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def random_model(folder: Path, config: Path, data: Path) -> Path:
    """`folder`, a random-weight model of `config`'s shapes, built unless it is whole already. Built beside and
    renamed when whole: a build cut off (4b's weights take minutes) left config.json without weights, which the next
    command took for a model."""
    if not is_whole(folder):
        import make_random_model

        if config is None:
            raise SystemExit(f"{folder} holds no whole model (config.json and its weights): give --config to build one")
        building = folder.with_name(folder.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        make_random_model.main(["--config", str(config), "--texts", str(data), "--out", str(building)])
        shutil.rmtree(folder, ignore_errors=True)
        building.rename(folder)
    return folder


def setup_table() -> dict:
    """Every setup by name: kind, method, batch, flags; main() adds the model, data, steps and warmup."""
    tokens = lambda n: ["--max_tokens_per_batch", str(n)]  # noqa: E731
    setups = {}
    for method, label in (("qlora", "QLoRA"), ("galore", "GaLore")):
        for batch in (8, 32):
            setups[f"stock {label}, batch {batch}"] = dict(kind="stock", method=method, batch=batch)
        for batch in (8, 32, 64):
            setups[f"ours {label}, batch {batch}"] = dict(kind="ours", method=method, batch=batch)
        # No batch flag at all: the batch the script chooses for this GPU and data (auto_batch.py).
        setups[f"ours {label}, defaults"] = dict(kind="ours", method=method, batch=None)
        for budget in (8192, 16384, 32768, 65536):
            setups[f"ours {label}, {budget // 1024}k tokens/batch"] = dict(
                kind="ours", method=method, batch=1, extra=tokens(budget)
            )
            setups[f"ours {label}, {budget // 1024}k tokens/batch, no checkpointing"] = dict(
                kind="ours", method=method, batch=1, extra=[*tokens(budget), "--gradient_checkpointing", "false"]
            )
            setups[f"ours {label}, {budget // 1024}k tokens/batch, padded"] = dict(
                kind="ours", method=method, batch=1, extra=[*tokens(budget), "--padding_free", "false"]
            )
            # The stock trl/peft/transformers path under our batching: what the fast path is worth.
            setups[f"ours {label}, {budget // 1024}k tokens/batch, fast path none"] = dict(
                kind="ours", method=method, batch=1, extra=[*tokens(budget), "--fast_path", "none"]
            )
            # DDP, one process per GPU (torchrun): the budget is per GPU, so a step trains twice the tokens.
            setups[f"ours {label}, {budget // 1024}k tokens/batch, 2 GPUs"] = dict(
                kind="ours", method=method, batch=1, extra=tokens(budget), gpus=2
            )
    for budget in (8192, 32768):  # override 17 off: a graph for each kind of layer, what the one graph saves
        setups[f"ours QLoRA, {budget // 1024}k tokens/batch, a graph per kind of layer"] = dict(
            kind="ours", method="qlora", batch=1, extra=[*tokens(budget), "--fast_path", "all,-one_layer_graph"])
    # Measurement only (unsafe for flags changed mid-run, such as peft's disable_adapter()): what guard evaluation costs.
    setups["ours QLoRA, 8k tokens/batch, guards skipped"] = dict(kind="ours", method="qlora", batch=1,
                                                                 extra=tokens(8192), skip_guards="1")
    for budget in (8192, 32768):  # override 14, not on by default: what it costs and saves
        setups[f"ours QLoRA, {budget // 1024}k tokens/batch, MLP in 2 token chunks"] = dict(
            kind="ours", method="qlora", batch=1, extra=tokens(budget), mlp_chunks="2")
    setups.update({
        "T4 emulation: ours QLoRA defaults": dict(kind="ours", method="qlora", batch=None, t4=True),
        "T4 emulation: ours QLoRA, 8k tokens/batch": dict(kind="ours", method="qlora", batch=1, t4=True,
                                                           extra=tokens(8192)),
        "T4 emulation: ours GaLore defaults": dict(kind="ours", method="galore", batch=None, t4=True),
        "T4 emulation: ours GaLore batch 4": dict(kind="ours", method="galore", batch=4, t4=True),
        # Packed rows are full: 4 rows of 1,024 real tokens, the "batch 4 x 1,024".
        "T4 emulation: ours GaLore, 4k tokens/batch": dict(kind="ours", method="galore", batch=1, t4=True,
                                                            extra=tokens(4096)),
    })
    for rows_per_step in (8, 32):  # trl's packing: each row is up to 1,024 tokens of whole records
        setups[f"Unsloth QLoRA, packing, {rows_per_step} rows x 1,024"] = dict(kind="unsloth", batch=rows_per_step)
        # gemma-3-4b: Unsloth loading the language model alone (its text_only), beside the whole model above
        setups[f"Unsloth QLoRA, packing, {rows_per_step} rows x 1,024, text only"] = dict(
            kind="unsloth", batch=rows_per_step, text_only=True)
    setups.update(long_context.setups())  # issue 27: 4k-16k-token records, ours and Unsloth's
    return setups
