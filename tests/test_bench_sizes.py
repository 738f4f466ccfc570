"""The bench's sizes (issue 25): a setup name after "270m: " or "4b: " runs on that size's random-weight model, and a
setup our scripts refuse before anything loads (GaLore on gemma-3-4b under T4 emulation) becomes a "refused" row."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import run_bench
import setups
from cli.errors import UserInputError
from models import shapes


@pytest.mark.parametrize("name, expected", [
    ("4b: ours QLoRA, 8k tokens/batch", ("4b", "ours QLoRA, 8k tokens/batch")),
    ("270m: T4 emulation: ours GaLore defaults", ("270m", "T4 emulation: ours GaLore defaults")),
    ("T4 emulation: ours QLoRA defaults", (None, "T4 emulation: ours QLoRA defaults")),
    ("ours QLoRA, 8k tokens/batch + --lora_dropout 0", (None, "ours QLoRA, 8k tokens/batch + --lora_dropout 0")),
])
def test_a_size_in_front_of_a_setup_name_picks_the_model(name, expected):
    assert setups.sized_setup(name) == expected


def fake_build(built: list, cut_off: bool = False):
    """make_random_model.main as the bench calls it: config.json first, as save_pretrained writes it, then the
    weights, unless the build is `cut_off` between the two."""
    def build(argv):
        built.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir()
        (out / "config.json").write_text("{}")
        if cut_off:
            raise KeyboardInterrupt
        (out / "model.safetensors").write_text("")

    return build


def test_each_size_model_is_built_once_from_its_config(tmp_path, monkeypatch):
    import make_random_model

    built = []
    monkeypatch.setattr(setups, "SIZE_MODEL", str(tmp_path / "bench-gemma-3-{size}"))
    monkeypatch.setattr(make_random_model, "main", fake_build(built))
    shapes_dir = tmp_path / "shared"
    shapes.gemma3_config("4b").save_pretrained(shapes_dir / "gemma-3-4b")
    for _ in range(2):
        folder = setups.size_model("4b", shapes_dir, tmp_path / "data.json")
    assert folder == tmp_path / "bench-gemma-3-4b" and len(built) == 1
    assert built[0][:2] == ["--config", str(shapes_dir / "gemma-3-4b" / "config.json")]
    with pytest.raises(SystemExit, match="gemma-3-270m/config.json"):
        setups.size_model("270m", shapes_dir, tmp_path / "data.json")


def test_a_model_cut_off_while_built_is_built_again(tmp_path, monkeypatch):
    """A build stopped half-way (the process killed while 4b's weights were written) is no model for the next run:
    a size's model, and the bench's main --model alike."""
    import make_random_model

    built = []
    monkeypatch.setattr(setups, "SIZE_MODEL", str(tmp_path / "bench-gemma-3-{size}"))
    shapes_dir = tmp_path / "shared"
    shapes.gemma3_config("270m").save_pretrained(shapes_dir / "gemma-3-270m")
    monkeypatch.setattr(make_random_model, "main", fake_build(built, cut_off=True))
    with pytest.raises(KeyboardInterrupt):
        setups.size_model("270m", shapes_dir, tmp_path / "data.json")
    monkeypatch.setattr(make_random_model, "main", fake_build(built))
    folder = setups.size_model("270m", shapes_dir, tmp_path / "data.json")
    assert len(built) == 2 and folder == tmp_path / "bench-gemma-3-270m" and setups.is_whole(folder)
    main_model = tmp_path / "bench-model"  # a folder an older build left half-written
    main_model.mkdir()
    (main_model / "config.json").write_text("{}")
    assert setups.random_model(main_model, tmp_path / "config.json", tmp_path / "data.json") == main_model
    assert len(built) == 3 and setups.is_whole(main_model)
    (tmp_path / "no-model").mkdir()
    with pytest.raises(SystemExit, match="give --config"):
        setups.random_model(tmp_path / "no-model", None, tmp_path / "data.json")


def test_a_run_refused_before_loading_is_a_row_that_says_why(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise UserInputError("GaLore on gemma-3-4b (4.30B parameters) does not fit this GPU, the Tesla T4 (emulated) "
                             "with 15.0 GiB: the estimate at one row ... It needs a 24 GB card with bf16.")

    import torch

    monkeypatch.setattr(run_bench, "run_ours", refuse)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)  # no GPU here
    result = run_bench.run_setup(dict(kind="ours", method="galore", model="m", data="d", batch=None, steps=1,
                                      warmup=0, output_dir=str(tmp_path)))
    assert result["refused"].startswith("GaLore on gemma-3-4b")
    args = SimpleNamespace(config=None, model=Path("m"), data=Path("d"), steps=1, warmup=0, only="x", warm=False,
                           shapes_dir=Path("s"), results=tmp_path / "results.md")
    run_bench.write_results(args, [("4b: T4 emulation: ours GaLore defaults", json.loads(json.dumps(result)))])
    assert ("| 4b: T4 emulation: ours GaLore defaults | refused before loading: GaLore on gemma-3-4b (4.30B "
            "parameters) does not fit this GPU, the Tesla T4 (emulated) with 15.0 GiB |") in \
        (tmp_path / "results.md").read_text()
