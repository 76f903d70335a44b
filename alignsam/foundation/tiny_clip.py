"""The tiny CLIP of the bundled world: an open_clip ``CLIP`` from a small config + a word tokenizer.

The model is open_clip's own ``CLIP`` class built from :func:`tiny_clip_config` (a ViT with
width 128, 6 blocks, 16 px patches on 256 px images; a 3-block text transformer over a small word
vocabulary), so CLIP Surgery runs on it through the same code as on ViT-B-16. Its weights are
produced by the project's tiny-CLIP pretraining and stored by :func:`save_tiny_clip` as
``{"model_cfg", "vocabulary", "templates", "state_dict", "meta"}`` so that a file fully describes
its model and tokenizer; ``build_text_matcher("tiny", path)`` loads it (``path=None``: random
weights with the default config and vocabulary, for tests). The config is used by constructing
``open_clip.model.CLIP(**cfg)`` directly (``open_clip.add_model_config`` would need a JSON file on
disk and would make the model depend on a global registry).
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch

from alignsam.foundation.clip_surgery import TextMatcher, check_options
from alignsam.foundation.segmenter import CheckpointError, file_fingerprint, read_checkpoint_file

TINY_CLIP_FILE = "tiny_clip.pt"
TINY_CLIP_COMMAND = "python -m alignsam.pretrain.tiny_clip (see checkpoints/README.md)"
SPECIAL_TOKENS = ("<pad>", "<sot>", "<eot>", "<unk>")  # ids 0, 1, 2, 3
PAD_ID, SOT_ID, EOT_ID, UNK_ID = range(4)
TINY_CONTEXT_LENGTH = 16

# Words the bundled world's captions and task texts use. The scene module owns the final category,
# colour and shape lists; this default is a superset and the tokenizer takes any list.
CATEGORY_WORDS = ("tomato", "leaf", "sun", "ice", "kite", "flower", "grape", "lemon", "moon", "drop", "coin", "cloud")
COLOUR_WORDS = (
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "magenta", "pink", "brown",
    "white", "black", "gray", "grey", "dark", "light", "bright", "pale",
)
SHAPE_WORDS = (
    "circle", "disc", "square", "triangle", "star", "ring", "ellipse", "hexagon", "rectangle",
    "diamond", "cross", "shape", "round",
)
TASK_WORDS = (
    "blur", "blurred", "blurry", "defocus", "sharp", "shadow", "shadows", "glass", "pane", "panes",
    "transparent", "salient", "object", "objects", "background", "region", "area", "texture",
    "textured", "plain", "striped",
)
TEMPLATE_WORDS = (
    "a", "an", "the", "photo", "picture", "image", "scene", "of", "in", "on", "with", "and", "is",
    "there", "this", "one", "two", "many", "some", "small", "large", "big", "part", "thing",
)
TINY_VOCABULARY = CATEGORY_WORDS + COLOUR_WORDS + SHAPE_WORDS + TASK_WORDS + TEMPLATE_WORDS
TINY_TEMPLATES = ("a photo of the {}", "a {}", "{}")


class WordTokenizer:
    """Word-level tokenizer over a fixed vocabulary, called like open_clip's tokenizers.

    Text is lower-cased and split into ``[a-z0-9]+`` words (punctuation dropped). Ids: 0 padding,
    1 start of text, 2 end of text, 3 unknown word, then the vocabulary in order.

    Args:
        vocabulary: the words (lower case, no spaces, no duplicates).
        context_length: tokens per text, start and end tokens included (longer texts are cut and
            still end with the end token).
        strict: raise on a word outside the vocabulary (else it becomes the unknown token).
    """

    def __init__(self, vocabulary: Sequence[str] = TINY_VOCABULARY, context_length: int = TINY_CONTEXT_LENGTH, strict: bool = True) -> None:
        vocabulary = tuple(vocabulary)
        bad = [w for w in vocabulary if not re.fullmatch(r"[a-z0-9]+", w) or w in SPECIAL_TOKENS]
        if bad:
            raise ValueError(f"vocabulary words must be lower-case [a-z0-9]+ words, got {bad}")
        dupes = sorted({w for w in vocabulary if vocabulary.count(w) > 1})
        if dupes:
            raise ValueError(f"duplicate vocabulary words: {dupes}")
        if context_length < 3:
            raise ValueError(f"context_length must be >= 3, got {context_length}")
        self.vocabulary = vocabulary
        self.context_length = int(context_length)
        self.strict = strict
        self.ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(vocabulary)}
        self.pad_id, self.sot_id, self.eot_id, self.unk_id = PAD_ID, SOT_ID, EOT_ID, UNK_ID

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.vocabulary)

    def encode(self, text: str) -> List[int]:
        """Word ids of ``text`` (no start/end tokens)."""
        ids = []
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            if word in self.ids:
                ids.append(self.ids[word])
            elif self.strict:
                raise KeyError(f"word '{word}' (in '{text}') is not in the tiny CLIP vocabulary of {len(self.vocabulary)} words; add it to the vocabulary")
            else:
                ids.append(self.unk_id)
        return ids

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        """``(N, context_length)`` long token ids: start, words, end, padding."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else int(context_length)
        out = torch.full((len(texts), length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text)[: length - 2], self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def tiny_clip_config(vocab_size: int, context_length: int = TINY_CONTEXT_LENGTH, embed_dim: int = 128) -> dict:
    """open_clip model config (``CLIP(**cfg)``) of the tiny CLIP for a tokenizer's vocabulary.

    The text tower pools at the first end token (``pool_type="eos"``, ``eos_id`` = the word
    tokenizer's end id), since the end id is not the largest id as in CLIP's BPE vocabulary.
    """
    return {
        "embed_dim": embed_dim,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 256, "patch_size": 16, "width": 128, "layers": 6, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": vocab_size,
            "width": 128,
            "heads": 4,
            "layers": 3,
            "pool_type": "eos",
            "eos_id": EOT_ID,
            "pad_id": PAD_ID,
        },
    }


TINY_CLIP_CONFIG = tiny_clip_config(WordTokenizer().vocab_size)


def build_tiny_clip(cfg: Optional[dict] = None, seed: Optional[int] = 0) -> torch.nn.Module:
    """An open_clip ``CLIP`` from ``cfg`` (default :data:`TINY_CLIP_CONFIG`), random weights.

    ``seed`` makes the initialisation reproducible without touching the global RNG state.
    """
    from open_clip.model import CLIP

    cfg = copy.deepcopy(TINY_CLIP_CONFIG if cfg is None else cfg)
    if seed is None:
        return CLIP(**cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(**cfg)


def save_tiny_clip(
    model: torch.nn.Module,
    cfg: dict,
    tokenizer: WordTokenizer,
    path: Union[str, Path],
    templates: Optional[Sequence[str]] = None,
    **meta,
) -> None:
    """Write a self-describing tiny CLIP file atomically (fp16 weights keep it small)."""
    if cfg["text_cfg"]["vocab_size"] != tokenizer.vocab_size:
        raise ValueError(f"config vocab_size {cfg['text_cfg']['vocab_size']} != tokenizer vocab_size {tokenizer.vocab_size}")
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    payload = {
        "model_cfg": cfg,
        "vocabulary": list(tokenizer.vocabulary),
        "templates": list(templates) if templates is not None else None,
        "state_dict": state,
        "meta": meta,
    }
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def build_tiny_text_matcher(
    checkpoint_path: Optional[Union[str, Path]], tokenizer: Optional[WordTokenizer] = None, **options
) -> TextMatcher:
    """Builder of ``tiny`` (see :mod:`alignsam.foundation.registry`): a tiny CLIP file, or random weights when the path is None.

    Template default: the file's ``templates`` if it has them, else :data:`TINY_TEMPLATES`.
    """
    check_options(options)
    if checkpoint_path is None:
        tokenizer = tokenizer or WordTokenizer()
        cfg = tiny_clip_config(tokenizer.vocab_size, tokenizer.context_length)
        options.setdefault("templates", TINY_TEMPLATES)
        return TextMatcher(build_tiny_clip(cfg), tokenizer, name="tiny", weights_fingerprint="random-init-seed0", **options)
    raw = read_checkpoint_file(checkpoint_path, TINY_CLIP_FILE, TINY_CLIP_COMMAND)
    if not (isinstance(raw, dict) and {"model_cfg", "vocabulary", "state_dict"} <= set(raw)):
        raise CheckpointError(f"checkpoint {checkpoint_path} is not a tiny CLIP file ({TINY_CLIP_FILE}, made by {TINY_CLIP_COMMAND})")
    cfg = raw["model_cfg"]
    if tokenizer is None:
        tokenizer = WordTokenizer(raw["vocabulary"], context_length=cfg["text_cfg"]["context_length"])
    if tokenizer.vocab_size != cfg["text_cfg"]["vocab_size"]:
        raise CheckpointError(
            f"tokenizer vocab_size {tokenizer.vocab_size} does not fit checkpoint {checkpoint_path} "
            f"(vocab_size {cfg['text_cfg']['vocab_size']})"
        )
    model = build_tiny_clip(cfg, seed=None)
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in raw["state_dict"].items()})
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not fit its tiny CLIP config: {str(err)[:300]}") from err
    options.setdefault("templates", raw.get("templates") or TINY_TEMPLATES)
    return TextMatcher(model, tokenizer, name="tiny", weights_fingerprint=file_fingerprint(checkpoint_path), **options)
