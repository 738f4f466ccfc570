"""With no batch flag, a run trains on packed rows in a token budget chosen from the GPU's memory and the data's size;
any batch flag (command line or config file) keeps the batch as given."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cli import arguments
from training import auto_batch
from records import data_doctor, loading
from records import data
from training import processes
from training import reports
import train_galore
import train_qlora

SCRIPTS = {"QLoRA": train_qlora, "GaLore": train_galore}
H100 = (79.19, "NVIDIA H100 80GB HBM3")
T4 = (14.74, "Tesla T4")


def parse(module, argv):
    """The script's real parse_args; the devices are set up now, before a test fakes a GPU."""
    parsed = module.parse_args([str(arg) for arg in argv])
    parsed[4].device
    return parsed


def fake_gpu(monkeypatch, gpu):
    gib, name = gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=int(gib * 2**30), name=name))



@pytest.fixture
def loaded(tiny_tokenizer, tiny_model_dir):
    """The shipped 200 records (about 22,000 tokens) with the tiny model's tokenizer; the tiny model's config, whose
    memory estimate caps no budget."""
    records, _ = data.load_train_and_eval(arguments.DataArguments(), seed=0)
    return loading.RunData(records, None, tiny_tokenizer, None, str(tiny_model_dir),
                           loading.token_lengths(records, tiny_tokenizer))


def many_tokens(monkeypatch, loaded=None, count=20000, length=200):
    """A large data set (4M tokens), as its token lengths (those `loaded` holds, or those the load step counts): the
    data cap never bites."""
    if loaded is not None:
        monkeypatch.setattr(loaded, "lengths", [length] * count)
    monkeypatch.setattr(loading, "token_lengths", lambda records, tokenizer: [length] * count)
    real_examine = data_doctor.examine

    def examine(*args, **kwargs):  # the dry run takes its lengths from the data doctor's count
        records, eval_records, report = real_examine(*args, **kwargs)
        report.lengths = [length] * count
        return records, eval_records, report

    monkeypatch.setattr(data_doctor, "examine", examine)


@pytest.mark.parametrize("script, gpu, expected", [
    ("QLoRA", T4, 8192), ("GaLore", T4, 4096), ("QLoRA", (11.8, "NVIDIA GeForce RTX 3060"), 8192),
    ("QLoRA", H100, 32768), ("GaLore", H100, 32768), ("GaLore", (22.0, "NVIDIA L4"), 32768),
    ("QLoRA", (39.4, "NVIDIA A100-SXM4-40GB"), 32768), ("GaLore", (19.9, "a card just under the tier"), 4096),
])
def test_no_batch_flag_gets_packed_rows_in_the_budget_of_the_gpus_tier(script, gpu, expected, monkeypatch, loaded):
    model, data_args, _, _, training_args = parse(SCRIPTS[script], [])
    assert data_args.auto_batch and data_args.max_tokens_per_batch is None
    many_tokens(monkeypatch, loaded)
    fake_gpu(monkeypatch, gpu)
    data_args, training_args = auto_batch.choose_batch(script, data_args, training_args, loaded)
    assert data_args.max_tokens_per_batch == expected
    assert data_args.padding_free and data_args.packs_without_padding
    assert training_args.gradient_accumulation_steps == 1
    arguments.check_arguments(model, data_args, training_args)  # what the run checks holds for the choice


BATCH_FLAGS = [
    ["--max_tokens_per_batch", "4096"],
    ["--per_device_train_batch_size", "2"],  # QLoRA's default value, given: still given
    ["--per-device-train-batch-size", "2"],
    ["--gradient_accumulation_steps=4"],
    ["--packing", "--completion_only_loss", "false"],
    ["--padding_free", "true"],
    ["--no_padding_free"],
    ["--auto_find_batch_size"],
]


@pytest.mark.parametrize("flags", BATCH_FLAGS, ids=[" ".join(f) for f in BATCH_FLAGS])
def test_any_batch_flag_on_the_command_line_keeps_the_batch_as_given(flags, monkeypatch, loaded):
    data_args, training_args = parse(train_qlora, flags)[1::3]
    before = (data_args.max_tokens_per_batch, data_args.padding_free, data_args.packing,
              training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps)
    fake_gpu(monkeypatch, H100)
    chosen = auto_batch.choose_batch("QLoRA", data_args, training_args, loaded)
    assert chosen[0] is data_args and chosen[1] is training_args and not data_args.auto_batch
    assert (chosen[0].max_tokens_per_batch, chosen[0].padding_free, chosen[0].packing,
            chosen[1].per_device_train_batch_size, chosen[1].gradient_accumulation_steps) == before


def test_the_record_batch_keeps_the_scripts_accumulation(monkeypatch, loaded):
    data_args, training_args = parse(train_qlora, ["--per_device_train_batch_size", "2"])[1::3]
    fake_gpu(monkeypatch, H100)
    data_args, training_args = auto_batch.choose_batch("QLoRA", data_args, training_args, loaded)
    assert data_args.max_tokens_per_batch is None
    assert (training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps) == (2, 4)


@pytest.mark.parametrize("key, value", [("per_device_train_batch_size", 1), ("gradient_accumulation_steps", 8),
                                        ("max_tokens_per_batch", 2048), ("padding_free", False)])
def test_a_batch_key_in_a_config_file_keeps_the_batch_as_given(key, value, tmp_path, monkeypatch, loaded):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({key: value, "learning_rate": 1e-5}))
    data_args, training_args = parse(train_galore, [config])[1::3]
    assert not data_args.auto_batch
    fake_gpu(monkeypatch, H100)
    chosen = auto_batch.choose_batch("GaLore", data_args, training_args, loaded)
    assert chosen[0] is data_args and chosen[1] is training_args


def test_a_config_file_without_batch_keys_gets_the_chosen_batch(tmp_path, monkeypatch, loaded):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1.0e-5\nmax_seq_length: 512\n")
    data_args, training_args = parse(train_galore, [config])[1::3]
    many_tokens(monkeypatch, loaded)
    fake_gpu(monkeypatch, T4)
    assert auto_batch.choose_batch("GaLore", data_args, training_args, loaded)[0].max_tokens_per_batch == 4096


@pytest.mark.parametrize("name", ["qlora_t4.yaml", "galore_a100.yaml"])
def test_the_shipped_configs_keep_their_budgets(name, monkeypatch, loaded):
    module = train_qlora if name.startswith("qlora") else train_galore
    data_args, training_args = parse(module, [Path(__file__).parents[1] / "configs" / name])[1::3]
    expected = data_args.max_tokens_per_batch
    fake_gpu(monkeypatch, T4 if "a100" in name else H100)  # the other tier's GPU: the file still wins
    chosen = auto_batch.choose_batch("QLoRA" if module is train_qlora else "GaLore", data_args, training_args, loaded)
    assert chosen[0].max_tokens_per_batch == expected


def test_a_small_data_set_still_gets_32_steps_an_epoch(monkeypatch, loaded):
    data_args, training_args = parse(train_qlora, ["--max_seq_length", "256"])[1::3]
    fake_gpu(monkeypatch, H100)
    data_args, training_args = auto_batch.choose_batch("QLoRA", data_args, training_args, loaded)
    tokens = data_args.max_tokens_per_batch
    assert 256 <= tokens < 32768 and tokens % 256 == 0
    # The steps as the dry run counts them, which tests/test_token_batching.py checks against a real run.
    steps = reports.dry_run_report(loaded, data_args, training_args)["optimizer_steps_per_epoch"]
    assert steps >= auto_batch.MIN_STEPS_PER_EPOCH
    # The largest budget that does so: one more row a step would give fewer.
    assert tokens + 256 > sum(min(n, 256) for n in loading.token_lengths(loaded.records, loaded.tokenizer)) // 32


@pytest.mark.parametrize("script, gib, data_tokens, max_seq_length, expected", [
    ("QLoRA", 79, 10**8, 1024, 32768),
    ("QLoRA", 79, 10**8, 3000, 30000),  # whole rows of --max_seq_length
    ("QLoRA", 15, 10**8, 16384, 16384),  # a row longer than the tier's budget: one row, never less
    ("GaLore", 15, 10**8, 2048, 4096),
    ("QLoRA", 79, 40_000, 1024, 1024),  # tiny data: one row a step
    ("QLoRA", 79, 200_000, 512, 6144),  # 200,000 // 32 = 6,250, down to whole rows
    ("GaLore", 15, 200_000, 512, 4096),  # the tier's budget is below the data's cap
])
def test_token_budget(script, gib, data_tokens, max_seq_length, expected):
    assert auto_batch.token_budget(script, gib, data_tokens, max_seq_length) == expected


def test_under_ddp_the_cap_counts_every_gpus_steps():
    # Two GPUs take a step together: 32 steps an epoch need half the tokens per GPU.
    assert auto_batch.token_budget("QLoRA", 79, 200_000, 512, processes=2) == 3072


def test_under_ddp_every_process_takes_the_smallest_gpu(monkeypatch):
    training_args = parse(train_qlora, [])[4]
    fake_gpu(monkeypatch, H100)
    monkeypatch.setattr(processes, "gather", lambda value, args: [value, T4, None])
    assert auto_batch.smallest_gpu(training_args) == T4


def test_the_log_line_says_what_was_chosen_and_why(monkeypatch, loaded, caplog):
    caplog.set_level("INFO", logger="training.auto_batch")
    data_args, training_args = parse(train_qlora, [])[1::3]
    many_tokens(monkeypatch, loaded)
    fake_gpu(monkeypatch, H100)
    auto_batch.choose_batch("QLoRA", data_args, training_args, loaded)
    assert [record.getMessage() for record in caplog.records if record.name == "training.auto_batch"] == [
        "No batch flags given: packed rows, 32,768 tokens per step per GPU (NVIDIA H100 80GB HBM3, 79 GiB; the data's "
        "4,000,000 tokens make 125 steps an epoch). --max_tokens_per_batch N sets the budget; "
        "--per_device_train_batch_size N batches by records instead."]


def test_the_log_line_says_when_the_data_cut_the_budget(monkeypatch, loaded, caplog):
    caplog.set_level("INFO", logger="training.auto_batch")
    data_args, training_args = parse(train_qlora, ["--max_seq_length", "256"])[1::3]
    fake_gpu(monkeypatch, T4)
    auto_batch.choose_batch("QLoRA", data_args, training_args, loaded)
    assert "packed rows, 512 tokens per step per GPU (Tesla T4, 15 GiB: up to 8,192, cut so that the data's " in \
        caplog.text
    assert "tokens make 45 steps an epoch)" in caplog.text


def test_the_dry_run_without_a_gpu_states_each_tiers_budget(tiny_model_dir, tmp_path, monkeypatch, caplog, no_gpu):
    many_tokens(monkeypatch, count=2000, length=1024)  # 2,048,000 tokens: neither tier is cut
    reported = {}
    real_report = reports.dry_run_report
    monkeypatch.setattr(reports, "dry_run_report", lambda *args: reported.update(real_report(*args)))
    caplog.set_level("INFO")
    assert train_qlora.main(*parse(train_qlora, ["--dry_run", "--model_name_or_path", tiny_model_dir,
                                                 "--output_dir", tmp_path / "out"])) is None
    assert ("No batch flags given: packed rows, 8,192 tokens per step per GPU under 20 GiB of memory, 32,768 from "
            "20 GiB (the data's 2,048,000 tokens make 250 or 63 steps an epoch; no GPU here: what follows counts "
            "8,192).") in caplog.text
    # The dry run's own statistics are those of the budget it names: the same lengths, packed as training packs them.
    assert reported["tokens_per_optimizer_step"] == 8192 and "Packed without padding" in caplog.text


def test_the_dry_run_on_a_gpu_states_its_budget(tiny_model_dir, tmp_path, monkeypatch, caplog):
    model_args, data_args, report_args, _, training_args = parse(
        train_galore, ["--dry_run", "--model_name_or_path", tiny_model_dir, "--output_dir", tmp_path / "out",
                       "--max_seq_length", "256"])
    loaded = loading.load_data_and_tokenizer(model_args, data_args, report_args, training_args)
    fake_gpu(monkeypatch, T4)
    caplog.set_level("INFO")
    data_args, training_args = auto_batch.choose_batch("GaLore", data_args, training_args, loaded)
    stats = reports.dry_run_report(loaded, data_args, training_args)
    assert "packed rows, 512 tokens per step per GPU (Tesla T4, 15 GiB: up to 4,096, cut so that" in caplog.text
    assert f"make {stats['optimizer_steps_per_epoch']} steps an epoch" in caplog.text


def test_a_smoke_run_keeps_its_record_batches_and_reads_no_gpu(monkeypatch, loaded, no_gpu):
    data_args, training_args = parse(train_qlora, ["--smoke"])[1::3]
    chosen = auto_batch.choose_batch("QLoRA", data_args, training_args, loaded)
    assert chosen[0] is data_args and chosen[1] is training_args
    assert (training_args.per_device_train_batch_size, data_args.max_tokens_per_batch) == (2, None)


# ---------------------------------------------------------------------------
# Each Gemma 3 size (issue 25): the budget its memory estimate fits, and the card a model that fits none needs
# ---------------------------------------------------------------------------

L4 = (22.03, "NVIDIA L4")
A100_40 = (39.39, "NVIDIA A100-SXM4-40GB")
T4_EMULATED = (15.0, "Tesla T4 (emulated)")  # bench/emulate_t4.py's cap


@pytest.fixture(scope="module")
def size_folders(tmp_path_factory) -> dict:
    """A folder with the published config.json of each size (no weights: the budget reads the config alone)."""
    from models import shapes

    folders, root = {}, tmp_path_factory.mktemp("sizes")
    for size in shapes.GEMMA3_TEXT:
        folder = root / f"gemma-3-{size}"  # named as the hub names it: the log says the size
        shapes.gemma3_config(size).save_pretrained(folder)
        folders[size] = folder
    return folders


def sized(loaded, folder):
    return loading.RunData(loaded.records, None, loaded.tokenizer, None, str(folder), loaded.lengths)


@pytest.mark.parametrize("size, script, gpu, expected", [
    # A T4 (fp16: float32 embeddings, a float32 residual stream; GaLore's float32 master weights): the tier's
    # budgets, which every size up to 4b QLoRA fits.
    ("270m", "QLoRA", T4, 8192), ("270m", "GaLore", T4, 4096), ("1b", "QLoRA", T4, 8192), ("1b", "GaLore", T4, 4096),
    ("4b", "QLoRA", T4, 8192), ("4b", "QLoRA", T4_EMULATED, 8192),
    # 24 GB: 4b QLoRA at the tier's 32k, 4b GaLore's weights, gradients and states leave room for 4k; 12b QLoRA 8k.
    ("4b", "QLoRA", L4, 32768), ("4b", "GaLore", L4, 4096), ("12b", "QLoRA", L4, 8192),
    ("4b", "GaLore", A100_40, 32768), ("27b", "QLoRA", A100_40, 8192),
    ("270m", "QLoRA", H100, 32768), ("4b", "QLoRA", H100, 32768), ("4b", "GaLore", H100, 32768),
    ("12b", "GaLore", H100, 32768), ("27b", "QLoRA", H100, 32768),
])
def test_each_size_gets_a_budget_its_memory_estimate_fits(size, script, gpu, expected, size_folders, monkeypatch,
                                                          loaded):
    from training import memory_estimate

    model, data_args, _, _, training_args = parse(SCRIPTS[script], [])
    training_args.fp16 = gpu[0] < auto_batch.LARGE_GPU_GIB  # as settings.check sets it: no bf16 on the T4s
    many_tokens(monkeypatch, loaded)
    fake_gpu(monkeypatch, gpu)
    run = sized(loaded, size_folders[size])
    data_args, training_args = auto_batch.choose_batch(script, data_args, training_args, run)
    assert data_args.max_tokens_per_batch == expected
    estimate = auto_batch.run_estimate(script, training_args, run.model_path, bool(training_args.fp16))
    assert estimate.at(expected) <= memory_estimate.usable_bytes(gpu[0])


def test_the_log_line_says_when_the_models_memory_cut_the_budget(size_folders, monkeypatch, loaded, caplog):
    caplog.set_level("INFO", logger="training.auto_batch")
    data_args, training_args = parse(train_galore, [])[1::3]
    many_tokens(monkeypatch, loaded)
    fake_gpu(monkeypatch, L4)
    auto_batch.choose_batch("GaLore", data_args, training_args, sized(loaded, size_folders["4b"]))
    assert ("packed rows, 4,096 tokens per step per GPU (NVIDIA L4, 22 GiB; gemma-3-4b (4.30B parameters): at most "
            "4,096 by its memory estimate, about ") in caplog.text


def test_the_dry_run_without_a_gpu_states_each_tiers_budget_for_the_model(size_folders, monkeypatch, loaded, caplog,
                                                                         no_gpu):
    caplog.set_level("INFO", logger="training.auto_batch")
    data_args, training_args = parse(train_galore, [])[1::3]
    many_tokens(monkeypatch, loaded)
    auto_batch.choose_batch("GaLore", data_args, training_args, sized(loaded, size_folders["4b"]))
    assert ("packed rows, 1,024 tokens per step per GPU under 20 GiB of memory, 4,096 from 20 GiB (the data's "
            "4,000,000 tokens make 4000 or 1000 steps an epoch; no GPU here: what follows counts 1,024). gemma-3-4b "
            "(4.30B parameters): its memory estimate caps these, on a 16 GB T4 and on a 24 GB card with bf16 (L4, "
            "A10G, RTX 3090/4090); on a 16 GB T4 not even one row fits: it needs a 24 GB card") in caplog.text


def fake_cuda_machine(monkeypatch, gpu, bf16: bool):
    """What settings.check asks of the machine, as on a GPU of `gpu` (GiB, name)."""
    fake_gpu(monkeypatch, gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu[1])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)  # settings.check's copy sets the device up


def test_galore_on_4b_on_a_t4_stops_before_anything_loads_naming_the_card_it_needs(size_folders, tmp_path,
                                                                                   monkeypatch, caplog):
    from conftest import fails_cleanly

    parsed = parse(train_galore, ["--model_name_or_path", size_folders["4b"], "--output_dir", tmp_path / "out"])
    fake_cuda_machine(monkeypatch, T4_EMULATED, bf16=False)
    # The folder holds a config and nothing else: had the data, tokenizer or model been loaded, another message.
    message = fails_cleanly(SimpleNamespace(parse_args=lambda argv: parsed, main=train_galore.main), [], caplog,
                            tmp_path / "out")
    assert message.startswith("GaLore on gemma-3-4b (4.30B parameters) does not fit this GPU, the Tesla T4 (emulated) "
                              "with 15.0 GiB: the estimate at one row of --max_seq_length 1024 is about ")
    assert "float32 master weights 16.0" in message and "without bf16" in message
    assert "It needs a 24 GB card with bf16 (L4, A10G, RTX 3090/4090), where the estimate is about 18." in message
    assert "Or train it with train_qlora.py" in message


@pytest.mark.parametrize("size, script", [("4b", "QLoRA"), ("1b", "GaLore"), ("270m", "GaLore")])
def test_what_fits_a_t4_passes_the_check(size, script, size_folders, tmp_path, monkeypatch, caplog):
    from conftest import fails_cleanly

    module = SCRIPTS[script]
    parsed = parse(module, ["--model_name_or_path", size_folders[size], "--output_dir", tmp_path / "out"])
    fake_cuda_machine(monkeypatch, T4_EMULATED, bf16=False)
    message = fails_cleanly(SimpleNamespace(parse_args=lambda argv: parsed, main=module.main), [], caplog)
    assert "holds a model but no tokenizer" in message  # the check passed: the load step found no tokenizer


@pytest.mark.parametrize("size, script, card", [
    ("4b", "GaLore", "a 24 GB card with bf16"), ("12b", "QLoRA", "a 24 GB card with bf16"),
    ("12b", "GaLore", "an 80 GB A100 or H100"), ("27b", "QLoRA", "a 40 GB A100"), ("27b", "GaLore", "a 141 GB H200"),
])
def test_the_card_each_size_needs(size, script, card):
    """What docs/usage.md's table says: from a T4 up, the first card one row of 1,024 tokens fits."""
    from models import shapes
    from training import memory_estimate

    assert memory_estimate.card_needed(shapes.gemma3_shape(size), script, 1024)[0].startswith(card)
    assert memory_estimate.card_needed(shapes.gemma3_shape("4b"), "QLoRA", 1024)[0] == "a 16 GB T4"
