"""The tiny randomly initialised Gemma 3 of --smoke runs and the tests, with a tokenizer trained on the spot: the text
class (`Gemma3ForCausalLM`, as gemma-3-270m and -1b) or the multimodal one (`Gemma3ForConditionalGeneration`, as
gemma-3-4b, -12b and -27b: a tiny SigLIP vision tower and projector beside the language model). `smoke_model` picks the
class the run's --model_name_or_path names (models/shapes.py).

Also the real shapes with random weights (a config.json: 270m, 1b, 4b...), for the bench (bench/make_random_model.py).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Optional

import torch
import transformers
import sentencepiece
from transformers import (AutoConfig, AutoModelForCausalLM, Gemma3Config,
                          Gemma3TextConfig, GemmaTokenizerFast, SiglipVisionConfig)

from cli.errors import UserInputError

# Where a smoke run writes its tiny base model, inside its output dir: also how a smoke run's folder is told from
# a real run's (training.plan_output_dir).
SMOKE_MODEL_DIR = "smoke_base_model"

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Gemma's chat format for the tiny tokenizer: user and model turns, a system message
# folded into the first user turn, roles that must alternate.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] | trim + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_random_gemma(
    directory: Path,
    texts: Iterable[str],
    vocab_size: int = 1024,
    config_file: Optional[Path] = None,
    seed: int = 0,
    multimodal: bool = False,
) -> Path:
    """Write a tokenizer trained on `texts` and a randomly initialised Gemma 3 to `directory`.

    Without `config_file`, a 2-layer Gemma 3 a few hundred kB in size (the smoke
    runs and tests): `multimodal`, a Gemma3ForConditionalGeneration with a one-layer SigLIP vision tower 32 wide
    (28 x 28 images, 4 image tokens) around that same language model. With a `config_file` (such as the real
    gemma-3-4b config.json), a model of those shapes and of its class, in bfloat16 (built on the GPU where there is
    one), for measuring real cost. The tokenizer has Gemma's special-token
    ids (<pad>=0, <eos>=1, <bos>=2) and chat turns, so the real loading,
    formatting and training code runs on it unchanged.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size, directory)
    tokenizer.save_pretrained(directory)
    if config_file is None:
        config = tiny_text_config(len(tokenizer))
        if multimodal:
            config = tiny_multimodal_config(config)
        dtype = torch.float32
    else:
        config = AutoConfig.from_pretrained(Path(config_file).parent)
        if config.get_text_config().vocab_size < len(tokenizer):
            raise UserInputError(f"The tokenizer ({len(tokenizer)} tokens) does not fit {config_file}'s vocabulary.")
        dtype = torch.bfloat16  # as the checkpoints are published: half the disk and load time of float32
    # The multimodal config keeps these at the top and in its text_config: generation reads both.
    for each in {id(c): c for c in (config, config.get_text_config())}.values():
        each.pad_token_id = tokenizer.pad_token_id
        each.bos_token_id = tokenizer.bos_token_id
        each.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    torch.manual_seed(seed)
    # Real shapes: built on the GPU where there is one (a 4b model's random init takes minutes on a CPU).
    device = "cuda" if config_file is not None and torch.cuda.is_available() else "cpu"
    with torch.device(device):
        # AutoModelForCausalLM: Gemma3ForCausalLM for a text config, Gemma3ForConditionalGeneration for a multimodal one
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    mask = os.umask(0)
    os.umask(mask)
    for weights in directory.glob("*.safetensors"):  # safetensors writes 0600; every other file follows the umask
        weights.chmod(0o666 & ~mask)
    return directory


def train_tokenizer(texts: Iterable[str], vocab_size: int, directory: Path) -> transformers.PreTrainedTokenizerFast:
    """A SentencePiece BPE tokenizer trained on the spot, shaped like Gemma's: its ids (<pad>=0, <eos>=1, <bos>=2,
    <unk>=3), chat turns as whole pieces, byte fallback, no normalisation and no space prefix. Its
    `tokenizer.model` is written to `directory`, so llama.cpp's converter reads it as it reads Gemma's (GGUF export).
    """
    model_file = directory / "tokenizer.model"
    stopped: list = []
    with model_file.open("wb") as writer, _stops_come_through(stopped):
        sentencepiece.SentencePieceTrainer.train(
            # SentencePiece trains on lines; a newline falls back to its byte, as any character it has not seen.
            sentence_iterator=_sentences(texts, stopped), model_writer=writer,
            vocab_size=vocab_size, hard_vocab_limit=False, model_type="bpe", byte_fallback=True,
            character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", user_defined_symbols=SPECIAL_TOKENS[4:], minloglevel=2, num_threads=1,
        )
    return GemmaTokenizerFast(
        vocab_file=str(model_file),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=32768,
        chat_template=GEMMA_CHAT_TEMPLATE,
    )


# SentencePiece skips a line longer than 4,192 bytes (its max_sentence_length) and fails on none left ("[!sentences_
# .empty()]"): a record of a megabyte is cut into lines it reads, 1,000 characters (at most 4,000 bytes) each.
SENTENCE_CHARACTERS = 1000


def _sentences(texts: Iterable[str], stopped: list):
    try:
        for text in texts:
            text = text.replace("\n", " ")
            for start in range(0, max(len(text), 1), SENTENCE_CHARACTERS):
                yield text[start:start + SENTENCE_CHARACTERS]
    except GeneratorExit:  # closed early: nothing to report
        raise
    except BaseException as stop:  # Ctrl-C, SIGTERM or a bad text while SentencePiece's C++ reads: kept, raised again
        stopped.append(stop)
        raise


@contextlib.contextmanager
def _stops_come_through(stopped: list):
    """SentencePiece turns an exception raised while it reads the lines into RuntimeError('INTERNAL: ...'): it is
    raised as itself, so a stop (Ctrl-C, the run's SIGTERM) ends the run as any stop does."""
    try:
        yield
    except RuntimeError as error:
        if stopped:
            raise stopped[0] from error
        raise


def tiny_text_config(vocab_size: int) -> Gemma3TextConfig:
    """The smoke runs' language model: 2 layers, 64 wide, a sliding window of 64."""
    return Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        sliding_window=64,
        # As gemma-3-1b (both 256): llama.cpp scales attention by head_dim and ignores this field.
        query_pre_attn_scalar=32,
    )


def tiny_multimodal_config(text_config: Gemma3TextConfig) -> Gemma3Config:
    """gemma-3-4b's class around the tiny language model: a SigLIP vision tower of one layer, 32 wide, on 28 x 28
    images in 14-pixel patches (4 patches), and a projector to 4 image tokens; a few thousand parameters. The image
    tokens' ids lie past the text vocabulary (as gemma-3-4b's <image_soft_token> lies past most of it): text-only
    training never meets them."""
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14, vision_use_head=False)
    vocab = text_config.vocab_size
    return Gemma3Config(text_config=text_config.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        boi_token_index=vocab, eoi_token_index=vocab + 1, image_token_index=vocab + 2)


def smoke_model(output_dir: str, texts: Iterable[str], reuse: bool = False, multimodal: bool = False) -> str:
    """Build the tiny model for a smoke run, its tokenizer trained on the run's own texts; returns its folder.
    `reuse`: take the one another process of this run has just built there. `multimodal`: the class of gemma-3-4b
    (shapes.names_multimodal tells it from --model_name_or_path)."""
    folder = Path(output_dir).resolve() / SMOKE_MODEL_DIR
    if reuse and (folder / "model.safetensors").is_file():
        return str(folder)
    return str(build_random_gemma(folder, texts, multimodal=multimodal))
