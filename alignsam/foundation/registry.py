"""Which builder makes which frozen model: two explicit tables, the one place that knows every name.

``model.segmenter.name`` is looked up in :data:`SEGMENTER_BUILDERS` (segment-anything's official
``vit_b`` / ``vit_l`` / ``vit_h`` and the bundled ``tiny``); ``model.matcher.model_name`` in
:data:`TEXT_MATCHER_BUILDERS` (the bundled ``tiny``), any other name being an open_clip model. A new
family is one import and one line here; nothing registers itself by being imported.

Relative weights paths resolve from the working directory, else from the project root
(:func:`~alignsam.foundation.segmenter.resolve_weights_path`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

from alignsam.errors import ConfigError
from alignsam.foundation.clip_surgery import (
    DEFAULT_CLIP_CHECKPOINT,
    DEFAULT_CLIP_MODEL,
    TextMatcher,
    TextMatcherBuilder,
    Tokenizer,
    build_open_clip_matcher,
)
from alignsam.foundation.sam2_segmenter import SAM2_BUILDERS
from alignsam.foundation.segmenter import Segmenter, SegmenterBuilder, official_builder, resolve_weights_path
from alignsam.foundation.tiny import build_tiny_segmenter
from alignsam.foundation.tiny_clip import build_tiny_text_matcher

SEGMENTER_BUILDERS: Dict[str, SegmenterBuilder] = {
    "vit_b": official_builder("vit_b"),
    "vit_l": official_builder("vit_l"),
    "vit_h": official_builder("vit_h"),
    "tiny": build_tiny_segmenter,
    **SAM2_BUILDERS,  # sam2.1_hiera_{t,s,b+,l} and sam2_hiera_{t,s,b+,l}; needs the sam2 extra (docs/sam2.md)
}

TEXT_MATCHER_BUILDERS: Dict[str, TextMatcherBuilder] = {
    "tiny": build_tiny_text_matcher,
}


def build_segmenter(name: str, checkpoint: Optional[str] = None) -> Segmenter:
    """Build a frozen segmenter by name (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``) from a local file.

    ``checkpoint=None`` gives random weights (tests only).
    """
    if name not in SEGMENTER_BUILDERS:
        raise ConfigError("model.segmenter.name", f"unknown segmenter {name!r}; choose one of {sorted(SEGMENTER_BUILDERS)}")
    return SEGMENTER_BUILDERS[name](resolve_weights_path(checkpoint))


def build_text_matcher(
    model_name: str = DEFAULT_CLIP_MODEL,
    checkpoint_path: Optional[Union[str, Path]] = DEFAULT_CLIP_CHECKPOINT,
    tokenizer: Optional[Tokenizer] = None,
    **options,
) -> TextMatcher:
    """Build a frozen CLIP Surgery text matcher; never downloads.

    Args:
        model_name: ``"tiny"`` (the bundled world's tiny CLIP, see :mod:`alignsam.foundation.tiny_clip`)
            or any open_clip model name with a ViT image tower (default ``ViT-B-16``).
        checkpoint_path: local weights file (default: OpenAI's ``ViT-B-16.pt`` under ``checkpoints/``);
            None = random weights (tests only). A missing file raises ``CheckpointError``.
        tokenizer: overrides the model's tokenizer.
        **options: :class:`~alignsam.foundation.clip_surgery.TextMatcher` options (``templates``,
            ``feature_surgery``, ``background_texts``, ...) and, for open_clip names, ``quick_gelu``.
    """
    checkpoint_path = resolve_weights_path(checkpoint_path)
    if model_name in TEXT_MATCHER_BUILDERS:
        return TEXT_MATCHER_BUILDERS[model_name](checkpoint_path, tokenizer=tokenizer, **options)
    return build_open_clip_matcher(model_name, checkpoint_path, tokenizer=tokenizer, **options)
