"""Does an exported GGUF answer like the trained model? The same prompts answered greedily by the Hugging Face
model (float32, on the CPU) and by each GGUF through llama-cpp-python; the report says, per prompt, whether the
prompt tokenizes the same, whether the first tokens of the answers agree and whether both stopped at a stop token.
A GGUF that does not stop where the trained model does is an export failure: a model that never stops is the most
common complaint about exported Gemma 3."""
from __future__ import annotations

import json
import os
import logging
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from export import gguf_files
from export import gguf_run
from cli.errors import ExportFailed, SetupError
from export.gguf_files import END_OF_TURN
from export.gguf_run import Answer

logger = logging.getLogger(__name__)

INSTALL_LLAMA_CPP = (
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install -r finetuning/requirements-export.txt (it compiles llama.cpp: "
    "14 to 16 minutes on 2 cores), "
    "or pass --check_parity false to export without the check"
)


@dataclass
class Comparison:
    index: int  # of the prompt
    prompt: str
    file: str
    prompt_tokens_same: bool
    agreeing: int  # how many of the first `compared` answer tokens are the same
    compared: int
    hf: Answer = field(repr=False)
    gguf: Answer = field(repr=False)

    @property
    def agrees(self) -> bool:
        return self.agreeing == self.compared

    @property
    def text_differs_alone(self) -> bool:
        """The same token ids, shown as different text: the two tools detokenize them otherwise (byte pieces, a
        space), and the model is not to blame."""
        return self.hf.ids == self.gguf.ids and self.hf.text.strip() != self.gguf.text.strip()


def require_llama_cpp() -> None:
    """Checked before anything is converted: the check needs llama-cpp-python."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        raise SetupError(f"The parity check runs each GGUF with llama-cpp-python, which is not installed: "
                         f"{INSTALL_LLAMA_CPP}.") from e


def hf_answers(model_dir: Path, prompts: Sequence[str], max_new_tokens: int) -> list[Answer]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stops = {tokenizer.eos_token_id: tokenizer.eos_token, tokenizer.convert_tokens_to_ids(END_OF_TURN): END_OF_TURN}
    answers = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stops),
                                    pad_token_id=tokenizer.pad_token_id)
        ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        answers.append(Answer(inputs["input_ids"][0].tolist(), ids, tokenizer.decode(ids, skip_special_tokens=True),
                              stops.get(ids[-1]) if ids else None))
    del model
    return answers


def gguf_answers(gguf: Path, prompts: Sequence[str], max_new_tokens: int) -> tuple[list[Answer], list[str]]:
    """The GGUF's greedy answers and what is wrong with its stop tokens or chat template (gguf_run.py), in a process
    of its own: llama.cpp compiled for another CPU dies of SIGILL, which would end this one without a word."""
    # gguf_run imports its package's gguf_files: the scripts' folder goes on the child's path.
    scripts = str(Path(__file__).resolve().parents[1])
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [scripts, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(Path(gguf_run.__file__)), str(gguf), str(max_new_tokens)],
                          input=json.dumps(list(prompts)), capture_output=True, text=True, env=environment)
    if done.returncode in (-signal.SIGILL, 128 + signal.SIGILL):
        raise SetupError(
            "llama-cpp-python stopped with 'Illegal instruction': it was compiled for another CPU (a wheel from a pip "
            "cache or another machine). Rebuild it here: CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install --no-cache-dir "
            "--force-reinstall --no-deps llama-cpp-python==" + gguf_files.llama_cpp_python_version()
            + "; or pass --check_parity false.")
    if done.returncode != 0:
        raise ExportFailed(f"llama.cpp could not run {gguf.name} (exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [Answer(**answer) for answer in result["answers"]], result["problems"]


def compare(prompts: Sequence[str], file: str, hf: Sequence[Answer], gguf: Sequence[Answer],
            tokens: int) -> list[Comparison]:
    rows = []
    for index, (prompt, a, b) in enumerate(zip(prompts, hf, gguf)):
        compared = min(tokens, len(a.ids))
        agreeing = next((i for i, (x, y) in enumerate(zip(a.ids[:compared], b.ids)) if x != y),
                        min(compared, len(b.ids)))
        rows.append(Comparison(index, prompt, file, a.prompt_ids == b.prompt_ids, agreeing, compared, a, b))
    return rows


def write_report(folder: Path, rows: Sequence[Comparison], problems: dict) -> Path:
    """parity.md for reading, parity.json for tools; both in the export folder."""
    lines = ["# Parity: the trained model (Hugging Face, float32) against each GGUF (llama.cpp), greedy\n",
             "| prompt | file | prompt tokens same | first tokens agree | HF stopped at | GGUF stopped at |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.index} | {row.file} | "
                     f"{'yes' if row.prompt_tokens_same else 'NO'} | {row.agreeing}/{row.compared}"
                     f"{' (same ids; the text differs: detokenized otherwise)' if row.text_differs_alone else ''} | "
                     f"{row.hf.stopped_at or '(token limit)'} | {row.gguf.stopped_at or '(token limit)'} |")
    for file, found in problems.items():
        lines += [f"\n**{file}:** " + ("; ".join(found) if found else "stop tokens and chat template present")]
    for row in rows:
        lines += [f"\n## Prompt {row.index}, {row.file}\n", "```", row.prompt.rstrip(), "```", "**Trained model:**", "```", row.hf.text,
                  "```", "**GGUF:**", "```", row.gguf.text, "```"]
        if row.text_differs_alone:
            lines += ["(The token ids are the same: the texts differ only in how transformers and llama.cpp turn "
                      "those ids into text, e.g. byte pieces of a character.)"]
    (folder / "parity.md").write_text("\n".join(lines) + "\n")
    (folder / "parity.json").write_text(json.dumps({
        "problems": problems,
        "rows": [{**{k: v for k, v in asdict(row).items() if k not in ("hf", "gguf")}, "agrees": row.agrees,
                  "text_differs_alone": row.text_differs_alone,
                  "hf": asdict(row.hf), "gguf": asdict(row.gguf)} for row in rows]}, indent=2))
    return folder / "parity.md"


def verdict(rows: Sequence[Comparison], problems: dict, report: Path) -> None:
    """Raise where a GGUF would not stop as the trained model does; log what else differs."""
    broken = {file: found for file, found in problems.items() if found}
    never_stops = sorted({row.file for row in rows if row.hf.stopped_at and not row.gguf.stopped_at})
    if broken or never_stops:
        details = [f"{file}: {'; '.join(found)}" for file, found in broken.items()]
        details += [f"{file}: ran to the token limit where the trained model stopped" for file in never_stops]
        raise ExportFailed(
            "The GGUF export does not stop as the trained model does:\n  " + "\n  ".join(details)
            + f"\nThe report: {report}. See TROUBLESHOOTING.md, 'GGUF export'."
        )
    if not any(row.hf.stopped_at for row in rows):
        logger.warning("The trained model itself did not stop within the token limit on any prompt, so stopping "
                       "could not be compared: train longer, or check that the data's answers end with %s.",
                       END_OF_TURN)
    disagreeing = [row for row in rows if not row.agrees or not row.prompt_tokens_same]
    for row in disagreeing:
        logger.warning("%s: the answer agrees with the trained model's for %d of its first %d tokens%s.", row.file,
                       row.agreeing, row.compared, "" if row.prompt_tokens_same else " (the prompt tokenizes "
                       "differently)")
    logger.info("Parity: %d of %d answers agree in their first tokens; report in %s",
                len(rows) - len(disagreeing), len(rows), report)
