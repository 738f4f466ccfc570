"""Gemma 3's two classes and five sizes, as the scripts need to know them before and after a model loads.

- **The class.** gemma-3-270m and -1b are text models (`Gemma3ForCausalLM`); gemma-3-4b, -12b and -27b are multimodal
  (`Gemma3ForConditionalGeneration`: a SigLIP vision tower and a projector beside the language model, which
  `AutoModelForCausalLM` builds for them in transformers 4.57). Text-only training trains the language model alone:
  the vision tower and the projector (`FROZEN_IN_TEXT_TRAINING`) get no LoRA adapter, no GaLore projection and no
  place in the optimizer, and stay as the base has them.
- **The shapes** (`Shape`): read from a model's config (no weights), and the parameter counts the memory estimate
  (training/memory_estimate.py) is built on. `GEMMA3_TEXT` holds each size's published shapes, for the tests, the
  docs' tables and the GPU tests' random-weight models.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

# Module-name parts of a multimodal Gemma 3 that text-only training leaves alone.
FROZEN_IN_TEXT_TRAINING = ("vision_tower", "multi_modal_projector")
# The multimodal sizes, as hub ids name them (google/gemma-3-4b-it, unsloth/gemma-3-12b-pt, ...).
MULTIMODAL_NAME = re.compile(r"gemma-3-(4b|12b|27b)(?![0-9a-z])", re.IGNORECASE)


def is_multimodal(model_or_config) -> bool:
    """A Gemma3ForConditionalGeneration (or its config): a vision tower beside the language model."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "vision_config", None) is not None


def names_multimodal(model_name_or_path: str) -> bool:
    """Whether --model_name_or_path names the multimodal class: a local folder by its config.json (a vision_config
    in it), a hub id by its size (4b, 12b, 27b). What --smoke reads to build its tiny model of the same class."""
    config = Path(str(model_name_or_path)).expanduser() / "config.json"
    if config.is_file():
        try:
            return "vision_config" in json.loads(config.read_text())
        except (OSError, ValueError):
            return False
    return bool(MULTIMODAL_NAME.search(str(model_name_or_path)))


def frozen_in_text_training(module_name: str) -> bool:
    """Whether a module (by its name in the model, or peft's wrapper of it) is part of the vision side."""
    parts = module_name.split(".")
    return any(part in parts for part in FROZEN_IN_TEXT_TRAINING)


def text_linear_layers(model) -> Iterable[tuple[str, torch.nn.Module]]:
    """(name, module) of every linear layer outside the vision tower and projector (lm_head included)."""
    return ((name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not frozen_in_text_training(name))


def language_model_targets(names: Iterable[str]) -> str:
    """peft's target_modules as a regular expression (which peft matches against each module's whole name): the
    linear layers of these last names inside the language model only. For a multimodal model, where a list or
    "all-linear" would also wrap the vision tower's q_proj, k_proj, v_proj, out_proj, fc1 and fc2."""
    alternatives = "|".join(re.escape(name) for name in sorted(set(names)))
    return rf"(?:.*\.)?language_model\.(?:.*\.)?(?:{alternatives})"


def freeze_vision(model) -> int:
    """Text-only training: the vision tower's and the projector's weights stop requiring gradients (no gradient, no
    optimizer state). Returns how many weights were frozen; 0 for a text model."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if frozen_in_text_training(name) and parameter.requires_grad:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


# ---------------------------------------------------------------------------
# Shapes and parameter counts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the memory estimate needs of a Gemma 3: the language model's shapes, and the vision side's weights."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_linear: int = 0  # the vision tower's linear weights (quantized to 4 bits by QLoRA)
    vision_other: int = 0  # its patch and position embeddings, norms, biases; the projector
    name: str = ""

    @property
    def multimodal(self) -> bool:
        return self.vision_linear > 0

    @property
    def layer_linear(self) -> int:
        """One decoder layer's linear weights: q, k, v, o and the gated MLP."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + 3 * self.hidden * self.intermediate

    @property
    def text_linear(self) -> int:
        return self.layers * self.layer_linear

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden  # tied to the output layer

    @property
    def text_parameters(self) -> int:
        norms = self.layers * (4 * self.hidden + 2 * self.head_dim) + self.hidden
        return self.text_linear + self.embedding + norms

    @property
    def vision_parameters(self) -> int:
        return self.vision_linear + self.vision_other

    @property
    def parameters(self) -> int:
        return self.text_parameters + self.vision_parameters

    def lora_parameters(self, rank: int) -> int:
        """Adapter weights of every linear layer of the language model (lm_head aside) at this rank."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        sides = 2 * (self.hidden + q) + 2 * (self.hidden + kv) + 3 * (self.hidden + self.intermediate)
        return self.layers * rank * sides

    def galore_state_elements(self, rank: int) -> int:
        """GaLore's low-rank optimizer state and projection matrices of every attention and MLP weight, counted as
        rank x (rows + columns) each."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        sides = 2 * (self.hidden + q) + 2 * (self.hidden + kv) + 3 * (self.hidden + self.intermediate)
        return self.layers * rank * sides

    @property
    def label(self) -> str:
        billions = self.parameters / 1e9
        size = f"{billions:.2f}B" if billions >= 0.995 else f"{self.parameters / 1e6:.0f}M"
        return f"{self.name} ({size} parameters)" if self.name else f"a {size}-parameter Gemma 3"


def shape_of(config, name: str = "") -> Shape:
    """The Shape of a Gemma 3 config: a text one (Gemma3TextConfig) or a multimodal one (Gemma3Config), whose
    vision tower is counted from its vision_config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vision_linear = vision_other = 0
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        width, inner = vision.hidden_size, vision.intermediate_size
        vision_linear = vision.num_hidden_layers * (4 * width * width + 2 * width * inner)
        patches = (vision.image_size // vision.patch_size) ** 2
        per_layer_other = 4 * width + inner + width + 4 * width  # biases and two layer norms
        vision_other = (patches * width + vision.num_channels * vision.patch_size ** 2 * width + width
                        + vision.num_hidden_layers * per_layer_other + 2 * width
                        + width * text.hidden_size + width)  # the projector and its norm
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Shape(text.num_hidden_layers, text.hidden_size, text.intermediate_size, text.num_attention_heads,
                 text.num_key_value_heads, head_dim, text.vocab_size, vision_linear, vision_other, name)


# The published shapes (google/gemma-3-*-it configs); the multimodal ones with gemma-3-4b's SigLIP tower (all three
# share it). For the tests and docs of each size's budgets and cards, and the GPU tests' random-weight models.
GEMMA3_TEXT = {
    "270m": dict(layers=18, hidden=640, intermediate=2048, heads=4, kv_heads=1, head_dim=256, vocab=262144,
                 window=512, context=32768),
    "1b": dict(layers=26, hidden=1152, intermediate=6912, heads=4, kv_heads=1, head_dim=256, vocab=262144,
               window=512, context=32768),
    "4b": dict(layers=34, hidden=2560, intermediate=10240, heads=8, kv_heads=4, head_dim=256, vocab=262208,
               window=1024, context=131072),
    "12b": dict(layers=48, hidden=3840, intermediate=15360, heads=16, kv_heads=8, head_dim=256, vocab=262208,
                window=1024, context=131072),
    "27b": dict(layers=62, hidden=5376, intermediate=21504, heads=32, kv_heads=16, head_dim=128, vocab=262208,
                window=1024, context=131072),
}
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=896,
              patch_size=14, vision_use_head=False)


def gemma3_config(size: str):
    """A transformers config of the published shapes of gemma-3-SIZE: Gemma3TextConfig for 270m and 1b,
    Gemma3Config (with the SigLIP tower) for 4b, 12b and 27b."""
    from transformers import Gemma3Config, Gemma3TextConfig

    shape = GEMMA3_TEXT[size]
    multimodal = size not in ("270m", "1b")
    text = Gemma3TextConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                            intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                            num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                            head_dim=shape["head_dim"], sliding_window=shape["window"],
                            max_position_embeddings=shape["context"], eos_token_id=[1, 106],
                            # 4b and up: a 128k context by linear RoPE scaling of the global layers
                            rope_scaling={"rope_type": "linear", "factor": 8.0} if multimodal else None)
    if not multimodal:
        return text
    return Gemma3Config(text_config=text.to_dict(), vision_config=dict(SIGLIP), mm_tokens_per_image=256,
                        eos_token_id=[1, 106])


def gemma3_shape(size: str) -> Shape:
    return shape_of(gemma3_config(size), f"gemma-3-{size}")


def size_named(model_name_or_path: str) -> Optional[str]:
    """The Gemma 3 size a name or path spells (gemma-3-4b-it -> 4b), or None."""
    found = re.search(r"gemma-3-(270m|1b|4b|12b|27b)(?![0-9a-z])", str(model_name_or_path), re.IGNORECASE)
    return found.group(1).lower() if found else None


def shape_for(model_name_or_path: str, config) -> Shape:
    """The Shape of the model a run names, from its config (read without weights by the caller), labelled with its
    Gemma 3 size where the name says one."""
    size = size_named(model_name_or_path)
    return shape_of(config, f"gemma-3-{size}" if size else "")


def known_shape(model_name_or_path: str, config) -> Optional[Shape]:
    """shape_for, or None for a config without a decoder's usual fields (not a Gemma-like model): no estimate then."""
    try:
        return shape_for(model_name_or_path, config)
    except (AttributeError, TypeError, KeyError):
        return None
