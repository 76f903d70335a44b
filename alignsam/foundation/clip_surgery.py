"""Text matcher: frozen open_clip ViT with CLIP Surgery -> dense text-image similarity maps.

CLIP Surgery (Li et al. 2023, "CLIP Surgery for Better Explainability with Enhancement in
Open-Vocabulary Tasks") makes CLIP's patch tokens usable as localisation maps without training:

* **v-v attention, dual paths** (architecture surgery). From block ``vv_start_block`` on, the vision
  transformer carries two token streams. The *original path* is the unmodified network (q-k
  attention + MLP in every block); its class token gives the global image embedding. The *new path*
  starts as the input of block ``vv_start_block`` and, in each later block, only adds the output of a
  v-v self-attention (queries and keys replaced by the values: ``softmax(v v^T / sqrt(d)) v``,
  then the block's output projection) computed on the block's normalised *original-path* input;
  the new path skips the MLPs. Patch tokens are read from the new path (then ``ln_post`` and the
  projection), the class token from the original path.
* **prompt-template ensembling**: a text's embedding is the normalised mean of the normalised
  embeddings of ``template.format(text)`` over the templates.
* **feature surgery** (option ``feature_surgery``): with ``f_i`` the normalised patch embeddings,
  ``g`` the normalised global embedding and ``t_k`` the K texts scored together,
  ``p = softmax_k(surgery_weight_scale * g . t_k)``, ``w_k = p_k / mean(p)`` and
  ``s_ik = w_k (f_i . t_k) - (1/K) sum_k' w_k' (f_i . t_k')``: the component shared by all texts
  is removed. With a single text (K = 1) that would be zero, so, as the paper's single-text mode,
  the redundant feature is the ensembled embedding of the empty text: ``s_i = f_i . (t - t_empty)``.
  Without feature surgery ``s_ik = f_i . t_k`` (cosine similarity).

**Which texts are scored together.** For a query text q the set is ``[q] + context_texts +
background_texts`` (duplicates removed, q first). It does not depend on the other texts of the same
call, so a map is a function of (image, text, options) only: batched, one-by-one and several-texts
calls agree and the feature cache can key maps by text. Put a task's whole class list into
``context_texts`` to get the paper's multi-class surgery.

**Background texts** (option ``background_texts``, mode ``background_mode``): with
``b`` ranging over the background texts (other than q) and ``s`` the scores above,

* ``"softmax"``: ``m_i = exp(beta s_iq) / (exp(beta s_iq) + sum_b exp(beta s_ib))``, the probability
  that patch i shows q rather than a background text; ``beta = background_temperature`` (default:
  the model's own ``logit_scale.exp()``);
* ``"subtract"``: ``m_i = s_iq - max_b s_ib``.

Without background texts ``m_i = s_iq``.

**Normalisation** (``normalization``): ``"minmax"`` (the paper's) maps each (image, text) map
linearly onto [0, 1] (a constant map becomes 0); it is applied after resampling to the requested
grid, so every returned map spans exactly [0, 1] (resampling is linear, so this differs from the
paper's normalise-then-resize only by an affine rescaling). ``"probability"`` keeps the softmax
probability as it is (needs background texts in ``"softmax"`` mode).

**Frames.** Every image is resized to the model's square input (``image_size``, 224 for ViT-B-16)
*without* keeping the aspect ratio or cropping, so the patch grid, and every returned map, tiles the
**whole original image**: the maps live on the *whole-image grid* of :mod:`alignsam.geometry`
(``out_hw = (G, G)`` gives one value per action patch). To combine them with SAM embeddings, which
cover SAM's padded square, use :func:`alignsam.geometry.whole_image_maps_to_sam_grid`.

The installed open_clip package is not modified: the dual-path forward re-composes the sub-modules
of open_clip's ``VisionTransformer`` / ``ResidualAttentionBlock`` (``nn.MultiheadAttention`` weights).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from alignsam.foundation.segmenter import CheckpointError, file_fingerprint, read_checkpoint_file
from alignsam.foundation.surgery import (  # the image side of the surgery
    check_surgery_compatible,
    feature_surgery_scores,
    minmax_normalize,
    surgery_image_features,
)
from alignsam.geometry import resize_whole_image_maps

DEFAULT_CLIP_MODEL = "ViT-B-16"
DEFAULT_CLIP_CHECKPOINT = "checkpoints/ViT-B-16.pt"
# A short prompt ensemble for web-trained CLIP models (generic photo captions).
DEFAULT_TEMPLATES: Tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a close-up photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
)
BACKGROUND_MODES = ("softmax", "subtract")
NORMALIZATIONS = ("minmax", "probability")
Tokenizer = Callable[..., torch.Tensor]


def _unique(items: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(items))


# -- the module --------------------------------------------------------------------------------
class TextMatcher(nn.Module):
    """A frozen open_clip ViT with CLIP Surgery: (image, text) -> dense similarity map in [0, 1].

    See the module docstring for the method, the options and the frames.

    Args:
        model: an open_clip ``CLIP`` with a ``VisionTransformer`` image tower; frozen here.
        tokenizer: callable ``tokenizer(list_of_str) -> (N, context_length)`` long token ids
            (open_clip's tokenizer for the model, or the tiny CLIP's ``WordTokenizer``).
        templates: prompt templates, each containing ``{}`` once.
        vv_start_block: first block of the v-v path; negative counts from the end (``-6``: the last
            six blocks, the paper's choice for ViT-B); None = the second half (6 of 12, 3 of 6).
        feature_surgery: remove the component shared by the texts scored together.
        surgery_weight_scale: scale of the text-weighting softmax of feature surgery (paper: 2).
        context_texts: texts always scored together with the query (e.g. the task's class list).
        background_texts: texts the query competes against (e.g. ``["background"]``).
        background_mode: ``"softmax"`` or ``"subtract"``.
        background_temperature: softmax inverse temperature; None = the model's ``logit_scale.exp()``.
        normalization: ``"minmax"`` or ``"probability"``.
        name: registry name the model was built from (part of the fingerprint).
        weights_fingerprint: identity of the weights file (part of the fingerprint).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        vv_start_block: Optional[int] = None,
        feature_surgery: bool = True,
        surgery_weight_scale: float = 2.0,
        context_texts: Sequence[str] = (),
        background_texts: Sequence[str] = (),
        background_mode: str = "softmax",
        background_temperature: Optional[float] = None,
        normalization: str = "minmax",
        name: str = "custom",
        weights_fingerprint: str = "",
    ) -> None:
        super().__init__()
        check_surgery_compatible(model.visual)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        layers = len(model.visual.transformer.resblocks)
        start = layers // 2 if vv_start_block is None else int(vv_start_block)
        if start < 0:
            start += layers
        if not 0 <= start < layers:
            raise ValueError(f"vv_start_block={vv_start_block} is outside the {layers} vision blocks (config key matcher.vv_start_block)")
        templates = tuple(templates)
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"every template needs exactly one '{{}}' (config key matcher.templates), got {templates}")
        if background_mode not in BACKGROUND_MODES:
            raise ValueError(f"background_mode must be one of {BACKGROUND_MODES} (config key matcher.background_mode), got '{background_mode}'")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS} (config key matcher.normalization), got '{normalization}'")
        if normalization == "probability" and not (background_texts and background_mode == "softmax"):
            raise ValueError(
                "normalization 'probability' needs background_texts with background_mode 'softmax' "
                "(config keys matcher.normalization, matcher.background_texts)"
            )
        self.templates = templates
        self.vv_start_block = start
        self.feature_surgery = bool(feature_surgery)
        self.surgery_weight_scale = float(surgery_weight_scale)
        self.context_texts = tuple(context_texts)
        self.background_texts = tuple(background_texts)
        self.background_mode = background_mode
        self.background_temperature = background_temperature
        self.normalization = normalization
        self.weights_fingerprint = weights_fingerprint

        from open_clip import get_model_preprocess_cfg
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        cfg = get_model_preprocess_cfg(model)
        self.register_buffer("pixel_mean", torch.tensor(cfg.get("mean", OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.get("std", OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._text_cache: Dict[str, torch.Tensor] = {}
        self.fingerprint = self._make_fingerprint()

        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    # -- bookkeeping ---------------------------------------------------------------------------
    def options(self) -> dict:
        """The options that change the maps (JSON-serialisable)."""
        return {
            "templates": list(self.templates),
            "vv_start_block": self.vv_start_block,
            "feature_surgery": self.feature_surgery,
            "surgery_weight_scale": self.surgery_weight_scale,
            "context_texts": list(self.context_texts),
            "background_texts": list(self.background_texts),
            "background_mode": self.background_mode,
            "background_temperature": self.background_temperature,
            "normalization": self.normalization,
            "input_hw": list(self.input_hw),
            "preprocess": "square resize, bicubic antialiased",
            "pixel_mean": [round(float(v), 6) for v in self.pixel_mean.flatten()],
            "pixel_std": [round(float(v), 6) for v in self.pixel_std.flatten()],
        }

    def _make_fingerprint(self) -> str:
        digest = hashlib.sha1(json.dumps(self.options(), sort_keys=True).encode()).hexdigest()[:16]
        surgery = "fs" if self.feature_surgery else "nofs"
        return f"clip_surgery:{self.name}:{self.weights_fingerprint}:vv{self.vv_start_block}:{surgery}:{digest}"

    def train(self, mode: bool = True) -> "TextMatcher":
        # Frozen: stays in eval mode whatever the enclosing module does.
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self._text_cache = {}  # cached text embeddings would stay on the old device / dtype
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def input_hw(self) -> Tuple[int, int]:
        """``(h, w)`` of the model's square input."""
        return tuple(int(v) for v in self.model.visual.image_size)

    @property
    def grid_hw(self) -> Tuple[int, int]:
        """``(gh, gw)`` of the patch grid (the maps' native resolution)."""
        return tuple(int(v) for v in self.model.visual.grid_size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().mean())

    # -- image side ----------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``(H, W, 3)`` RGB images of any sizes -> ``(B, 3, S, S)`` normalised model input.

        Square resize to the model's input size (bicubic, antialiased; aspect ratio not kept, no
        crop), scaling to [0, 1] and the model's own mean/std normalisation.
        """
        batch = []
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
                raise ValueError(f"image {i}: expected a uint8 (H, W, 3) RGB array, got {got}")
            tensor = torch.as_tensor(np.ascontiguousarray(image), device=self.device).permute(2, 0, 1)[None].float()
            if tuple(tensor.shape[-2:]) != self.input_hw:
                tensor = F.interpolate(tensor, self.input_hw, mode="bicubic", align_corners=False, antialias=True)
            batch.append(tensor.clamp(0, 255))
        if not batch:
            raise ValueError("no images given")
        pixels = torch.cat(batch) / 255.0
        return (pixels - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def image_features(self, images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised dense ``(B, gh, gw, D)`` and global ``(B, D)`` embeddings of the images."""
        pixels = self.preprocess(images).to(self.model.visual.conv1.weight.dtype)
        patches, pooled = surgery_image_features(self.model.visual, pixels, self.vv_start_block)
        return F.normalize(patches.float(), dim=-1), F.normalize(pooled.float(), dim=-1)

    # -- text side -----------------------------------------------------------------------------
    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Template-ensembled, normalised text embeddings ``(K, D)`` (cached per text)."""
        missing = [t for t in _unique(texts) if t not in self._text_cache]
        if missing:
            if len(self._text_cache) > 4096:
                self._text_cache = {}
            prompts = [template.format(text) for text in missing for template in self.templates]
            tokens = self.tokenizer(prompts).to(self.device)
            embedded = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            embedded = embedded.reshape(len(missing), len(self.templates), -1).mean(dim=1)
            for text, emb in zip(missing, F.normalize(embedded, dim=-1)):
                self._text_cache[text] = emb
        return torch.stack([self._text_cache[t] for t in texts])

    # -- maps ----------------------------------------------------------------------------------
    def scored_texts(self, query: str) -> List[str]:
        """The texts scored together with ``query`` (query first): query, context, background."""
        return _unique([query, *self.context_texts, *self.background_texts])

    def query_scores(self, patches: torch.Tensor, global_: torch.Tensor, query: str) -> torch.Tensor:
        """The map ``m`` of one text on one image's features, on the patch grid, not normalised.

        Args:
            patches: ``(gh, gw, D)`` normalised; global_: ``(D,)`` normalised.
        Returns:
            ``(gh, gw)`` float: ``m_i`` of the module docstring (a probability in softmax mode).
        """
        gh, gw, dim = patches.shape
        flat = patches.reshape(gh * gw, dim)
        texts = self.scored_texts(query)
        emb = self.text_embeddings(texts)  # (K, D)
        if not self.feature_surgery:
            scores = flat @ emb.T
        elif len(texts) == 1:
            redundant = self.text_embeddings([""])[0]
            scores = flat @ (emb[0] - redundant)[:, None]
        else:
            scores = feature_surgery_scores(flat, global_, emb, self.surgery_weight_scale)
        background = [i for i, t in enumerate(texts) if t in self.background_texts and t != query]
        if not background:
            values = scores[:, 0]
        elif self.background_mode == "softmax":
            beta = self.logit_scale if self.background_temperature is None else float(self.background_temperature)
            values = torch.softmax(beta * scores[:, [0, *background]], dim=1)[:, 0]
        else:
            values = scores[:, 0] - scores[:, background].max(dim=1).values
        return values.reshape(gh, gw)

    def maps_from_features(
        self,
        patches: torch.Tensor,
        global_: torch.Tensor,
        texts_per_image: Sequence[Sequence[str]],
        out_hw: Sequence[int],
    ) -> List[torch.Tensor]:
        """Maps for precomputed :meth:`image_features`: one ``(K_b, h, w)`` tensor per image."""
        if len(texts_per_image) != patches.shape[0]:
            raise ValueError(f"{patches.shape[0]} images but {len(texts_per_image)} text lists")
        out = []
        for b, texts in enumerate(texts_per_image):
            if isinstance(texts, str):
                raise TypeError(f"texts_per_image[{b}] is a str; give a list of texts per image")
            if not texts:
                out.append(patches.new_zeros((0, *tuple(int(v) for v in out_hw))))
                continue
            grid = torch.stack([self.query_scores(patches[b], global_[b], t) for t in texts])[None]
            maps = resize_whole_image_maps(grid, out_hw)[0]
            out.append(minmax_normalize(maps) if self.normalization == "minmax" else maps.clamp(0.0, 1.0))
        return out

    @torch.no_grad()
    def similarity_many(
        self, images: Sequence[np.ndarray], texts_per_image: Sequence[Sequence[str]], out_hw: Sequence[int]
    ) -> List[torch.Tensor]:
        """Several texts per image: the image is encoded once for all its texts.

        Args:
            images: B uint8 ``(H, W, 3)`` RGB arrays (sizes may differ).
            texts_per_image: B lists of texts.
            out_hw: ``(h, w)`` of the whole-image grid the maps are resampled to.
        Returns:
            B float tensors ``(K_b, h, w)`` in [0, 1] (K_b = number of texts of image b).
        """
        patches, global_ = self.image_features(images)
        return self.maps_from_features(patches, global_, texts_per_image, out_hw)

    @torch.no_grad()
    def similarity(self, images: Sequence[np.ndarray], texts: Sequence[str], out_hw: Sequence[int]) -> torch.Tensor:
        """One text per image -> ``(B, 1, h, w)`` float maps in [0, 1] on the whole-image grid.

        Args:
            images: B uint8 ``(H, W, 3)`` RGB arrays (sizes may differ); each is squashed to the
                model's square input, so the map covers the whole original image.
            texts: B texts, ``texts[b]`` for ``images[b]``.
            out_hw: ``(h, w)`` of the output grid (e.g. ``(G, G)`` for the action grid).
        """
        if isinstance(texts, str) or len(texts) != len(images):
            raise ValueError(f"similarity takes one text per image: {len(images)} images, texts={texts!r}")
        return torch.stack(self.similarity_many(images, [[t] for t in texts], out_hw))


# -- loading -----------------------------------------------------------------------------------
def load_open_clip_state_dict(path: Union[str, Path], expected_name: str, where: str) -> Dict[str, torch.Tensor]:
    """Read a CLIP weights file into an open_clip ``CLIP`` state dict (never downloads).

    Accepts OpenAI's TorchScript archives (``ViT-B-16.pt``), open_clip checkpoints
    (``open_clip_pytorch_model.bin``, training checkpoints with ``state_dict``, ``module.``
    prefixes) and ``.safetensors`` files. A missing file raises :class:`CheckpointError`.
    """
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = read_checkpoint_file(path, expected_name, where)
    if isinstance(state, torch.jit.ScriptModule):
        state = state.state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"checkpoint {path} holds no state dict (expected {expected_name})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archive extras
        state.pop(key, None)
    return state


def _weights_hint(model_name: str) -> Tuple[str, str]:
    """(expected file, where to get it) for the error messages."""
    try:
        from open_clip import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name, "openai")
    except Exception:  # unknown name
        cfg = {}
    if cfg.get("url"):
        where = cfg["url"]
        if cfg.get("hf_hub"):
            where += f" (or open_clip_pytorch_model.bin from https://huggingface.co/{cfg['hf_hub'].rstrip('/')})"
        return Path(cfg["url"]).name, where
    return f"the open_clip weights of {model_name}", "the model's open_clip pretrained release"


TextMatcherBuilder = Callable[..., TextMatcher]


def check_options(options: dict) -> None:
    known = set(inspect.signature(TextMatcher.__init__).parameters) - {"self", "model", "tokenizer", "name", "weights_fingerprint"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown text matcher option(s) {unknown} (config keys matcher.*); known: {sorted(known)}")


def build_open_clip_matcher(
    model_name: str,
    checkpoint_path: Optional[Union[str, Path]],
    tokenizer: Optional[Tokenizer] = None,
    quick_gelu: bool = True,
    **options,
) -> TextMatcher:
    """Any open_clip ViT by model name + a local weights file; ``checkpoint_path=None``: random init.

    ``quick_gelu=True`` matches OpenAI's weights (the default ViT-B-16 file); set it False for
    weights trained with GELU (LAION, DataComp). The tokenizer defaults to open_clip's for the name.
    """
    import open_clip

    check_options(options)
    if open_clip.get_model_config(model_name) is None:
        raise KeyError(f"unknown open_clip model '{model_name}' (config key matcher.model_name); e.g. {open_clip.list_models()[:8]}")
    expected, where = _weights_hint(model_name)
    state = None
    if checkpoint_path is not None:  # read (or fail on) the file before building a large model
        state = load_open_clip_state_dict(checkpoint_path, expected, where)
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    fingerprint = "random-init"
    if state is not None:
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"checkpoint {checkpoint_path} does not fit open_clip '{model_name}' (expected {expected}): {str(err)[:300]}"
            ) from err
        fingerprint = file_fingerprint(checkpoint_path)
    if tokenizer is None:
        tokenizer = open_clip.get_tokenizer(model_name)
    return TextMatcher(model, tokenizer, name=model_name, weights_fingerprint=fingerprint, **options)
