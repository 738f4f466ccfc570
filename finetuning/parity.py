"""Does an exported GGUF answer like the trained model? The same prompts answered greedily by the Hugging Face
model (float32, on the CPU) and by each GGUF through llama-cpp-python; the report says, per prompt, whether the
prompt tokenizes the same, whether the first tokens of the answers agree and whether both stopped at a stop token.
A GGUF that does not stop where the trained model does is an export failure: a model that never stops is the most
common complaint about exported Gemma 3."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from errors import ExportFailed, SetupError
from gguf_files import END_OF_TURN

logger = logging.getLogger(__name__)

INSTALL_LLAMA_CPP = (
    "pip install -r finetuning/requirements-export.txt (it compiles llama.cpp: about 8 minutes on 2 cores), "
    "or pass --check_parity false to export without the check"
)


@dataclass
class Answer:
    prompt_ids: list
    ids: list
    text: str
    stopped_at: Optional[str]  # the stop token's text, None where it ran to the token limit


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
    """The GGUF's greedy answers, and what is wrong with its stop tokens or chat template (empty if nothing)."""
    import llama_cpp

    context = max(512, max_new_tokens + 4 * max(len(p) for p in prompts))
    model = llama_cpp.Llama(model_path=str(gguf), n_ctx=min(context, 8192), n_threads=os.cpu_count() or 1,
                            seed=0, verbose=False)
    vocab = model._model.vocab
    end_of_turn = model.tokenize(END_OF_TURN.encode(), add_bos=False, special=True)
    problems = []
    if len(end_of_turn) != 1 or not llama_cpp.llama_vocab_is_eog(vocab, end_of_turn[0]):
        problems.append(f"llama.cpp does not stop at {END_OF_TURN} (it tokenizes as {end_of_turn})")
    elif model.metadata.get("tokenizer.ggml.eot_token_id") != str(end_of_turn[0]):
        problems.append(f"the metadata has no end-of-turn token id ({end_of_turn[0]})")
    if "tokenizer.chat_template" not in model.metadata:
        problems.append("the metadata has no chat template")
    answers = []
    for prompt in prompts:
        prompt_ids = model.tokenize(prompt.encode(), add_bos=True, special=True)
        ids, stopped_at = [], None
        for token in model.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            ids.append(token)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                stopped_at = model.detokenize([token], special=True).decode(errors="replace")
                break
            if len(ids) >= max_new_tokens:
                break
        text = model.detokenize(ids[:-1] if stopped_at else ids).decode(errors="replace")
        answers.append(Answer(prompt_ids, ids, text, stopped_at))
    model.close()
    return answers, problems


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
                     f"{'yes' if row.prompt_tokens_same else 'NO'} | {row.agreeing}/{row.compared} | "
                     f"{row.hf.stopped_at or '(token limit)'} | {row.gguf.stopped_at or '(token limit)'} |")
    for file, found in problems.items():
        lines += [f"\n**{file}:** " + ("; ".join(found) if found else "stop tokens and chat template present")]
    for row in rows:
        lines += [f"\n## Prompt {row.index}, {row.file}\n", "```", row.prompt.rstrip(), "```", "**Trained model:**", "```", row.hf.text,
                  "```", "**GGUF:**", "```", row.gguf.text, "```"]
    (folder / "parity.md").write_text("\n".join(lines) + "\n")
    (folder / "parity.json").write_text(json.dumps({
        "problems": problems,
        "rows": [{**{k: v for k, v in asdict(row).items() if k not in ("hf", "gguf")}, "agrees": row.agrees,
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
