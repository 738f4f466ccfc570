"""Training speed and memory of both scripts against the stock trl 0.8.6 settings, on one GPU (and DDP on two), in one command.

    python bench/run_bench.py --config ../shared/gemma-3-1b/config.json \
        --data ../shared/datasets/alpaca_5000.json --results bench/RESULTS.md

A random-weight model of the config's shapes and a tokenizer trained on the data
(bench/make_random_model.py); real text. Each setup runs in its own process
(clean memory, clean peak counter) and trains --steps optimizer steps; the first
--warmup are not timed. Printed per setup: real (non-padding) tokens/s, median
step time, peak GPU memory, MFU (6 FLOPs per parameter per token against the
GPU's dense bf16 peak). Then the peak memory of both scripts' defaults under T4
emulation (bf16 off, 15 GiB cap). Results are appended to --results.

The "Unsloth ..." setups run Unsloth's QLoRA beside ours (bench/unsloth_run.py), in a child whose PYTHONPATH is
--unsloth_site alone (transformers 5.x; bench/unsloth_setup.md installs it); without it they are skipped.

Other sizes of Gemma 3 in the same command: a setup name after "270m: ", "1b: " or "4b: " (also 12b, 27b) runs on a
random-weight model of that size's published shapes, built once at /tmp/bench-gemma-3-SIZE from
--shapes_dir/gemma-3-SIZE/config.json (4b: the multimodal class, its SigLIP tower at full size). E.g.

    python bench/run_bench.py --data ../shared/datasets/alpaca_5000.json --shapes_dir ../shared \
        --only "270m: ours QLoRA, 8k tokens/batch;270m: Unsloth QLoRA, packing, 8 rows x 1,024;4b: T4 emulation: ours GaLore defaults"

A setup our scripts refuse before anything loads (a model the GPU cannot hold: GaLore on gemma-3-4b under T4
emulation) gets a "refused" row with the script's message.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "finetuning"))
sys.path.insert(0, str(BENCH_DIR))

import long_context  # noqa: E402
import unsloth_run  # noqa: E402
from measure import measuring_callbacks, summarise  # noqa: E402
from setups import SIZE_MODEL, random_model, setup_table, size_model, sized_setup  # noqa: E402

# ---------------------------------------------------------------------------
# One setup, in its own process
# ---------------------------------------------------------------------------


def run_ours(script: str, model: str, data: str, batch: int, steps: int, warmup: int, extra: list[str],
             output_dir: str, gpus: int = 1) -> dict:
    module = __import__(script)
    callbacks, result = measuring_callbacks(warmup)
    # batch None: the script's own batch size and accumulation (its defaults).
    batch_flags = [] if batch is None else [
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1"]
    *parsed, training_args = module.parse_args([
        "--model_name_or_path", model, "--dataset_name", data, "--output_dir", output_dir, "--overwrite_output_dir",
        "--max_steps", str(steps), *batch_flags,
        "--logging_steps", "1", "--save_strategy", "no", "--num_sample_prompts", "0", "--report_card_prompts", "0",
        "--warmup_ratio", "0", *extra,
    ])
    training_args.include_num_input_tokens_seen = "non_padding"  # the flag parses as a bool only
    trainer = module.main(*parsed, training_args, callbacks=callbacks)
    summary = summarise(result, warmup, _model_parameters(model), gpus)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {**summary, "loss": _last_loss(trainer), "trainable": trainable}


def _last_loss(trainer):
    return next((entry["loss"] for entry in reversed(trainer.state.log_history) if "loss" in entry), None)


def _model_parameters(model: str) -> int:
    """The language model's weights (embedding and decoder layers), for MFU: a multimodal model's vision tower does
    not run on text."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model).get_text_config()
    embedding = config.vocab_size * config.hidden_size
    per_layer = (
        config.hidden_size * config.head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
        + 3 * config.hidden_size * config.intermediate_size
    )
    return embedding + config.num_hidden_layers * per_layer


def run_stock(method: str, model: str, data: str, batch: int, steps: int, warmup: int) -> dict:
    """The settings the troubleshooting log used: trl 0.8.6's SFTTrainer as its docs show it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainingArguments
    from trl import SFTTrainer

    import common

    tokenizer = AutoTokenizer.from_pretrained(model)
    records = Dataset.from_list(json.loads(Path(data).read_text()))
    common_args = dict(
        output_dir=f"/tmp/bench-stock-{os.getpid()}", max_steps=steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, gradient_checkpointing=True, bf16=True, logging_steps=1,
        save_strategy="no", report_to=[], eval_strategy="no", warmup_ratio=0, include_num_input_tokens_seen="non_padding",
    )
    if method == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        loaded = AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization, dtype=torch.bfloat16,
                                                      device_map={"": 0}, attn_implementation="eager")
        args = TrainingArguments(optim="paged_adamw_8bit", learning_rate=2e-4, **common_args)
        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="eager").cuda()
        args = TrainingArguments(optim="galore_adamw_8bit", optim_target_modules=["attn", "mlp"],
                                 optim_args="rank=128, update_proj_gap=200, scale=0.25", learning_rate=1e-5,
                                 **common_args)
        peft = None

    def formatting(examples):
        return [common.format_record({"instruction": i, "input": x, "output": o})
                for i, x, o in zip(examples["instruction"], examples["input"], examples["output"])]

    callbacks, result = measuring_callbacks(warmup)
    trainer = SFTTrainer(model=loaded, args=args, train_dataset=records, tokenizer=tokenizer, peft_config=peft,
                         formatting_func=formatting, max_seq_length=1024, packing=False, callbacks=callbacks)
    trainer.train()
    return {**summarise(result, warmup, _model_parameters(model)), "loss": _last_loss(trainer)}


def run_setup(spec: dict) -> dict:
    variables = (("profile", "BENCH_PROFILE"), ("memory", "BENCH_MEMORY"), ("skip_guards", "BENCH_SKIP_GUARDS"),
                 ("mlp_chunks", "BENCH_MLP_CHUNKS"))
    for key, variable in variables:
        if spec.get(key):
            os.environ[variable] = spec[key]
    if spec["kind"] == "unsloth":  # before torch: Unsloth sets the allocator and patches the libraries as they import
        return unsloth_run.run_unsloth(spec, measuring_callbacks, summarise, _model_parameters, _last_loss)
    import torch

    if spec.get("t4"):
        import emulate_t4

        emulate_t4.emulate_t4()
    torch.cuda.reset_peak_memory_stats()
    if spec["kind"] == "stock":
        return run_stock(spec["method"], spec["model"], spec["data"], spec["batch"], spec["steps"], spec["warmup"])
    from cli.errors import UserInputError

    try:
        return run_ours(f"train_{spec['method']}", spec["model"], spec["data"], spec["batch"], spec["steps"],
                        spec["warmup"], spec.get("extra", []), spec["output_dir"], spec.get("gpus", 1))
    except UserInputError as refusal:  # stopped before anything loaded (a model this GPU cannot hold): the row says so
        return {"refused": str(refusal), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}


# ---------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=False)
    parser.add_argument("--data", type=Path, required=False)
    parser.add_argument("--model", type=Path, default=Path("/tmp/bench-gemma-3-1b"))
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", default="",
                        help="Setup names to run, separated by semicolons (default: all). 'NAME + FLAGS' adds "
                             "script flags to one of our setups, e.g. 'ours QLoRA, 32k tokens/batch + --lora_dropout 0'.")
    parser.add_argument("--profile_dir", type=Path,
                        help="Write a torch.profiler table of each of our and Unsloth's setups here.")
    parser.add_argument("--memory_dir", type=Path, help="Write what GPU memory holds at each setup's peak here "
                        "(bench/step_diagnostics.py).")
    parser.add_argument("--ours_args", default="", help="Extra flags for every one of our setups (e.g. '--attn_implementation sdpa').")
    parser.add_argument("--shapes_dir", type=Path, default=REPO_ROOT.parent / "shared",
                        help="Folder of gemma-3-SIZE/config.json files (270m, 1b, 4b...), for the setups named "
                             "'SIZE: ...'; each size's random-weight model is built once at " + SIZE_MODEL + ".")
    parser.add_argument("--unsloth_site", type=Path, default=Path("/tmp/unsloth-site"),
                        help="pip --target folder with Unsloth and its transformers-5 stack (bench/unsloth_setup.md); "
                             "the Unsloth setups run with PYTHONPATH set to it alone, and are skipped without it.")
    parser.add_argument("--warm", action="store_true",
                        help="Share the compile caches between setups and earlier runs (torch's default folders). "
                             "Default: each setup compiles from empty inductor, Triton and Unsloth caches, as a user "
                             "on a fresh Colab or Kaggle session does.")
    parser.add_argument("--longest", action="append", default=[], choices=long_context.SEARCHES,
                        help="The longest --max_seq_length one step of QLoRA trains under T4 emulation (ours, unsloth: "
                             "repeat for both; bench/long_context.py). Without --only, no other setup runs.")
    parser.add_argument("--setup", help=argparse.SUPPRESS)  # internal: one setup as JSON, in a child process
    args = parser.parse_args()
    if args.setup:
        result = run_setup(json.loads(args.setup))
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, the main process reports
            print("RESULT " + json.dumps(result), flush=True)
        return
    wanted = [name.strip() for name in args.only.split(";") if name.strip()]
    if not wanted or any(sized_setup(n)[0] is None for n in wanted):
        random_model(args.model, args.config, args.data)
    base = dict(model=str(args.model), data=str(args.data), steps=args.steps, warmup=args.warmup)
    setups = setup_table()
    for folder in (args.profile_dir, args.memory_dir):
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
    wanted = wanted or ([] if args.longest else list(setups))
    rows = []
    for name in wanted:
        size, sized_name = sized_setup(name)
        setup_name, _, added = sized_name.partition(" + ")
        spec = {**base, **setups[setup_name.strip()]}
        if size:
            spec["model"] = str(size_model(size, args.shapes_dir, args.data))
        if added:
            spec["extra"] = [*spec.get("extra", []), *added.split()]
        if spec["kind"] == "ours" and args.ours_args:
            spec["extra"] = [*spec.get("extra", []), *args.ours_args.split()]
        label = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        if args.profile_dir and spec["kind"] != "stock" and not spec.get("t4"):
            spec["profile"] = str(args.profile_dir / f"profile_{label}.txt")
        if args.memory_dir:
            spec["memory"] = str(args.memory_dir / f"memory_{label}.txt")
        if spec.get("long"):  # records of about that many tokens, joined from --data's (the same file for Unsloth)
            spec["data"] = str(long_context.long_file(spec["long"], args.data, spec["model"]))
        if spec["kind"] == "unsloth":
            skipped = unsloth_run.missing(args.unsloth_site)
            if skipped:
                print(f"{name}: skipped: {skipped}", flush=True)
                rows.append((name, {"skipped": skipped}))
                continue
            # Unsloth compiles each block before its first step (56-133 s measured): more steps left untimed.
            spec["warmup"] = max(args.warmup, 6)
            print(f"{name}: Unsloth from {args.unsloth_site}, the first {spec['warmup']} steps untimed "
                  f"(max(--warmup, 6): compilation)", flush=True)
        started = time.time()
        spec["output_dir"] = f"/tmp/bench-{len(rows)}-{os.getpid()}"
        result = run_child(name, spec, args)
        rows.append((name, result))
        if result is None:
            continue
        if "refused" in result:
            print(f"{name}: refused before anything loaded: {result['refused']}", flush=True)
            continue
        print(f"{name}: {result['tokens_per_second']:,.0f} tokens/s, step {result['median_step_s']:.3f} s, "
              f"{result['tokens_per_step']:,.0f} tokens/step, peak {_peak(result)} GiB, "
              f"MFU {_percent(result['mfu'])}, loss {result['loss']}, first step {result.get('first_step_s', 0):.1f} s, "
              f"mean step {result.get('mean_step_s', 0):.3f} s, start to first step {result.get('start_to_first_step_s') or 0:.1f} s "
              f"(after loading {result.get('load_to_first_step_s', 0):.1f} s; {_compiling(result)}), "
              f"recompilations after step 1 "
              f"{result.get('recompilations_after_step_1')}, {'warm' if args.warm else 'cold'} caches, "
              f"GPU busy {1000 * result.get('gpu_tail_s', 0):.0f} ms after the host queued a step, "
              f"partial epoch-end steps left out {result['partial_steps_left_out']}  ({time.time() - started:.0f} s)",
              flush=True)
    if rows:
        write_results(args, rows)
    long_context.run_searches(args, base, run_child, cold_caches)


def run_child(name: str, spec: dict, args, caches: dict | None = None, keep_failure: bool = False) -> dict | None:
    """One setup in its own process: its result, or None where it failed ({"failed": the output's end} with
    `keep_failure`). `caches`: compile caches to share."""
    gpus = spec.get("gpus", 1)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)] \
        if gpus > 1 else [sys.executable]
    # One-GPU setups see one GPU: on a machine with more, the same card as a DDP run's first.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")} if gpus == 1 \
        else os.environ
    if spec["kind"] == "unsloth":  # its own stack only (transformers 5.x), not ours; offline, no statistics
        env = {**env, **unsloth_run.CHILD_ENV, "PYTHONPATH": str(args.unsloth_site.resolve())}
    if not args.warm:
        env = {**env, **(caches or cold_caches(spec["output_dir"]))}
    child = subprocess.run([*launch, __file__, "--setup", json.dumps(spec)], capture_output=True, text=True, env=env)
    line = next((l for l in child.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        tail = (child.stderr or child.stdout)[-1500:]
        print(f"{name}: FAILED\n{tail}", flush=True)
        return {"failed": tail} if keep_failure else None
    return json.loads(line[len("RESULT "):])


def _compiling(result: dict) -> str:
    """The first step's torch.compile timers that say most (the names our runs' log line reads too)."""
    timers = result.get("first_step_compile_s") or {}
    parts = (("torch.compile", "_compile.compile_inner"), ("backward graphs", "compile_fx.<locals>.bw_compiler"),
             ("inductor's code generation", "compile_fx_inner"), ("waiting for kernel builds", "async_compile.wait"))
    return ", ".join(f"{label} {timers.get(name, 0):.1f} s" for label, name in parts) + " by torch's timers"


def cold_caches(folder: str) -> dict:
    """Empty compile caches of a setup's own: nothing compiled by an earlier setup or run is reused."""
    caches = Path(folder + "-caches")
    shutil.rmtree(caches, ignore_errors=True)
    return {"TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton"),
            "UNSLOTH_COMPILE_LOCATION": str(caches / "unsloth")}


def _peak(result: dict) -> str:
    """The whole run's peak, then the peak after the first step (compilation): '2.07 (1.98)'."""
    later = result.get("later_steps_peak_gib")
    return f"{result['peak_gib']:.2f}" + (f" ({later:.2f})" if later is not None else "")


def _percent(fraction) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def write_results(args, rows) -> None:
    import step_diagnostics

    gpu = next((r["gpu"] for _, r in rows if r and "gpu" in r), "unknown GPU")
    lines = [
        f"\n## {datetime.date.today()} on {gpu}, host CPU {step_diagnostics.host_cpu()}\n",
        f"`python bench/run_bench.py --config {args.config} --model {args.model} --data {args.data} "
        f"--steps {args.steps} --warmup {args.warmup} --shapes_dir {args.shapes_dir} --only \"{args.only}\"`: random "
        f"weights of the shapes of {args.config} (rows named 'SIZE: ...': gemma-3-SIZE's), "
        f"Alpaca text, a 1,024-token cap or the N a row names ('Nk-token records', 'rows x N': records joined to fill N), "
        f"gradient checkpointing; timed steps after the first {args.warmup}, an epoch's partial last step left out.\n",
        f"Compile caches: {'warm (shared)' if args.warm else 'cold (empty for each setup)'}.\n",
        "| setup | real tokens/s | median step s | mean step s | tokens/step | start to first step s (after loading) "
        "| recompilations after step 1 | peak GiB (after the first step) | MFU | loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        if r is None:
            lines.append(f"| {name} | failed | | | | | | | | |")
        elif "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped'].split(';')[0]} | | | | | | | | |")
        elif "refused" in r:
            lines.append(f"| {name} | refused before loading: {r['refused'].split(': the estimate')[0]} | | | | | | | | |")
        else:
            lines.append(f"| {name} | {r['tokens_per_second']:,.0f} | {r['median_step_s']:.3f} | "
                         f"{r.get('mean_step_s', 0):.3f} | {r['tokens_per_step']:,.0f} | "
                         f"{r.get('start_to_first_step_s') or 0:.0f} ({r.get('load_to_first_step_s', 0):.0f}) | "
                         f"{r.get('recompilations_after_step_1')} | {_peak(r)} | {_percent(r['mfu'])} | {r['loss']} |")
    for name, r in rows:
        if r and "trainable" in r:
            lines.append(f"\n{name}: {r['trainable']:,} trainable weights.")
        if r and "versions" in r:
            lines.append(f"\n{name}: timed steps after the first {r['warmup']} (Unsloth compiles first); packing "
                         f"{'on' if r['packing'] else 'OFF'}; "
                         + ", ".join(f"{package} {version}" for package, version in r["versions"].items()) + ".")
    by_name = dict(rows)
    for name, r in rows:
        one_gpu = by_name.get(name.replace(", 2 GPUs", ""))
        if r and ", 2 GPUs" in name and one_gpu:
            lines.append(f"\n{name}: {r['tokens_per_second'] / one_gpu['tokens_per_second']:.2f}x the one-GPU "
                         f"real tokens/s ({r['tokens_per_second']:,.0f} against {one_gpu['tokens_per_second']:,.0f}).")
    with open(args.results, "a") as results:
        results.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
