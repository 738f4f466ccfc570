"""The tiny randomly initialised Gemma 3 of --smoke runs and the tests, with a tokenizer trained on the spot.

Also the real gemma-3-1b shapes with random weights, for the bench (bench/make_random_model.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

from errors import UserInputError

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
) -> Path:
    """Write a tokenizer trained on `texts` and a randomly initialised Gemma 3 to `directory`.

    Without `config_file`, a 2-layer Gemma 3 a few hundred kB in size (the smoke
    runs and tests); with one (such as the real gemma-3-1b config.json), a model of
    those shapes, for measuring real cost. The tokenizer has Gemma's special-token
    ids (<pad>=0, <eos>=1, <bos>=2) and chat turns, so the real loading,
    formatting and training code runs on it unchanged.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size)
    tokenizer.save_pretrained(directory)
    if config_file is None:
        config = Gemma3TextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            max_position_embeddings=2048,
            sliding_window=64,
        )
    else:
        config = AutoConfig.from_pretrained(Path(config_file).parent)
        if config.vocab_size < len(tokenizer):
            raise UserInputError(f"The tokenizer ({len(tokenizer)} tokens) does not fit {config_file}'s vocabulary.")
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(directory)
    return directory


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the spot, shaped like Gemma's (ids, special tokens, chat template)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", SPECIAL_TOKENS.index("<bos>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=32768,
        chat_template=GEMMA_CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],  # as Gemma's; no token_type_ids
    )


def smoke_model(output_dir: str, texts: Iterable[str], reuse: bool = False) -> str:
    """Build the tiny model for a smoke run, its tokenizer trained on the run's own texts; returns its folder.
    `reuse`: take the one another process of this run has just built there."""
    folder = Path(output_dir).resolve() / SMOKE_MODEL_DIR
    if reuse and (folder / "model.safetensors").is_file():
        return str(folder)
    return str(build_random_gemma(folder, texts))
