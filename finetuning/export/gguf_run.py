"""A GGUF answering prompts greedily through llama-cpp-python, and what its metadata lacks for stopping; run by
parity.py as a child process (`python gguf_run.py FILE MAX_NEW_TOKENS`, the scripts' folder on PYTHONPATH, the prompts as JSON on stdin, the answers
as one JSON line on stdout). No torch or transformers, so the child starts in a moment."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from export.gguf_files import END_OF_TURN  # standard library only, as this file


@dataclass
class Answer:
    prompt_ids: list
    ids: list
    text: str
    stopped_at: Optional[str]  # the stop token's text, None where it ran to the token limit


def answer(gguf: Path, prompts: Sequence[str], max_new_tokens: int) -> tuple[list[Answer], list[str]]:
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


if __name__ == "__main__":
    answers, problems = answer(Path(sys.argv[1]), json.loads(sys.stdin.read()), int(sys.argv[2]))
    print(json.dumps({"answers": [asdict(a) for a in answers], "problems": problems}))
