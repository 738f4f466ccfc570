"""GGUF files for llama.cpp, Ollama and LM Studio, written by llama.cpp's own tools: its converter
(convert_hf_to_gguf.py) and its metadata editor (gguf-py's gguf_new_metadata.py), both from the source
distribution of llama-cpp-python, which ships them with the `gguf` package they need. Also the Ollama Modelfile."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from cli.errors import ExportFailed, SetupError

logger = logging.getLogger(__name__)

# The llama.cpp the tools come from, where llama-cpp-python is not installed (where it is, its own version:
# the converter and the runtime that reads its files then agree).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
OUTTYPES = ("f16", "bf16", "q8_0", "f32")
# Gemma's two stop tokens: <eos> ends a text, <end_of_turn> a chat turn. The converter records <eos>; the
# end-of-turn id is added (llama.cpp also finds it by name, but other readers go by the metadata).
END_OF_TURN = "<end_of_turn>"
CONVERTER = "convert_hf_to_gguf.py"
METADATA_EDITOR = Path("gguf-py") / "gguf" / "scripts" / "gguf_new_metadata.py"
# What the tools need from the sdist: the converter, its per-model code and the gguf package.
SDIST_PARTS = (CONVERTER, "conversion", "gguf-py")


def llama_cpp_python_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        return LLAMA_CPP_PYTHON_VERSION
    return llama_cpp.__version__


def default_tools_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "gemma-finetuning" / f"llama.cpp-{llama_cpp_python_version()}"


def tools_dir(given: Optional[str]) -> Path:
    """A folder with llama.cpp's converter and gguf-py: the one given, the cached one, or one unpacked now from
    llama-cpp-python's source distribution (about 77 MB, downloaded once by pip)."""
    if given:
        folder = Path(given).expanduser()
        if not (folder / CONVERTER).is_file() or not (folder / METADATA_EDITOR).is_file():
            raise SetupError(
                f"--llama_cpp_dir {given}: no {CONVERTER} and {METADATA_EDITOR} there. Give llama.cpp's source "
                "folder (a llama.cpp checkout, or vendor/llama.cpp in llama-cpp-python's source distribution), or "
                "leave the flag out to download the tools."
            )
        return folder
    folder = default_tools_dir()
    if (folder / CONVERTER).is_file() and (folder / METADATA_EDITOR).is_file():
        return folder
    version = llama_cpp_python_version()
    logger.info("Downloading llama.cpp's converter (llama-cpp-python %s's source, about 77 MB) to %s",
                version, folder)
    with tempfile.TemporaryDirectory() as download:
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
             "--dest", download, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        archives = list(Path(download).glob("llama_cpp_python-*.tar.gz"))
        if fetched.returncode != 0 or not archives:
            raise SetupError(
                f"Could not download llama-cpp-python {version}'s source distribution, which holds llama.cpp's GGUF "
                f"converter: {(fetched.stderr or fetched.stdout).strip()[-600:]}\nWithout a network, download it "
                f"elsewhere (pip download --no-deps --no-binary :all: llama-cpp-python=={version}), unpack it and "
                "pass --llama_cpp_dir <unpacked>/vendor/llama.cpp."
            )
        unpack_tools(archives[0], folder)
    return folder


def unpack_tools(archive: Path, folder: Path) -> None:
    """The converter, conversion/ and gguf-py/ from the sdist's vendor/llama.cpp, into `folder` (atomically: an
    interrupted unpack leaves no half folder that would be taken for a complete one)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as sdist:
        root = sdist.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = []
        for member in sdist.getmembers():
            relative = member.name[len(root):] if member.name.startswith(root) else ""
            if relative and relative.split("/")[0] in SDIST_PARTS:
                member.name = relative
                members.append(member)
        sdist.extractall(partial, members=members, filter="data")
    if not (partial / CONVERTER).is_file():
        raise SetupError(f"{archive.name} has no vendor/llama.cpp/{CONVERTER}: pass --llama_cpp_dir instead.")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def log_vision_part(model_dir: Path, tools: Path) -> bool:
    """A multimodal Gemma 3 (gemma-3-4b, -12b, -27b: Gemma3ForConditionalGeneration) converts to a GGUF of its
    language model: llama.cpp's converter leaves the vision tower and projector out of it, and writes them only with
    --mmproj, into a file of their own. Text-only training left them as the base has them, so the base model's own
    mmproj file serves the trained model; one line says so. Returns whether the model is multimodal."""
    config = Path(model_dir) / "config.json"
    try:
        multimodal = "vision_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    if multimodal:
        logger.info(
            "%s is multimodal (Gemma3ForConditionalGeneration): the GGUF holds its language model, as llama.cpp's "
            "converter writes one; the vision tower and projector, unchanged by text-only training, are the base "
            "model's. For image input give llama.cpp the base model's mmproj file beside it (llama-mtmd-cli -m "
            "MODEL.gguf --mmproj mmproj.gguf), e.g. one written from the base model's folder (which holds "
            "preprocessor_config.json) by %s BASE_DIR --mmproj --outfile mmproj.gguf.", model_dir, tools / CONVERTER)
    return multimodal


def convert(model_dir: Path, outfile: Path, outtype: str, tools: Path, name: str) -> Path:
    """One GGUF of `model_dir` (a 16-bit or 32-bit Hugging Face model folder) in `outtype`, with the end-of-turn
    stop token recorded; written beside `outfile` and renamed into place."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tools / "gguf-py"),
                                                                      os.environ.get("PYTHONPATH")]))}
    converted = outfile.with_name(outfile.name + ".converted.partial")
    stamped = outfile.with_name(outfile.name + ".partial")
    steps = [
        ("llama.cpp's converter", [sys.executable, str(tools / CONVERTER), str(model_dir), "--outfile", str(converted),
                                   "--outtype", outtype, "--model-name", name]),
        ("gguf_new_metadata", [sys.executable, str(tools / METADATA_EDITOR), str(converted), str(stamped),
                               "--special-token", "eot", END_OF_TURN, "--force"]),
    ]
    try:
        for what, command in steps:
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise ExportFailed(
                    f"{what} failed on {model_dir} ({outtype}), exit {done.returncode}:\n"
                    f"{(done.stderr or done.stdout).strip()[-2000:]}\nSee TROUBLESHOOTING.md, 'GGUF export'."
                )
        os.replace(stamped, outfile)
    finally:
        converted.unlink(missing_ok=True)
        stamped.unlink(missing_ok=True)
    return outfile


# Ollama's template language (Go templates): Gemma's turns as the training data had them, a system message
# folded into the first user turn, and the model's turn opened for the answer.
OLLAMA_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- $first := true }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}<start_of_turn>user
{{ if and $first $system }}{{ $system }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ $first = false }}{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def write_modelfile(folder: Path, gguf: Path) -> Path:
    """An Ollama Modelfile beside the GGUF: the file, Gemma's chat template, its stop tokens and Gemma 3's
    recommended sampling."""
    text = "\n".join([
        f"FROM ./{gguf.name}",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        f'PARAMETER stop "{END_OF_TURN}"',
        'PARAMETER stop "<eos>"',
        "PARAMETER temperature 1.0",
        "PARAMETER top_k 64",
        "PARAMETER top_p 0.95",
        "",
    ])
    path = folder / "Modelfile"
    path.write_text(text)
    return path
