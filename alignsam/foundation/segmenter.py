"""Frozen SAM behind a small, batched interface.

``Segmenter.embed`` runs SAM's own preprocessing and image encoder on images of any size;
``Segmenter.decode`` runs the prompt encoder and mask decoder for **B different images in one call**
(segment-anything's ``MaskDecoder`` repeats one image embedding for every prompt set, so the
batched path re-composes its sub-modules here without touching the installed package).
Coordinates and mask conventions are those of :mod:`alignsam.geometry`.

The batched decode is faster than segment-anything's own modules, with the same masks
(``tests/foundation/test_segmenter.py`` holds every row to ``SamPredictor``'s logits within 1e-4):

* the decoder's attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (one
  fused kernel instead of matmul, scale, softmax, matmul), except on the CPU where the image
  tokens attend to the few prompt tokens: there a keys-major softmax is several times faster
  (:data:`DECODE_ATTENTION`, :func:`_attend`);
* the output upscaling is never laid out as an image (its 2x2 transposed convolutions are
  per-pixel matmuls, its LayerNorm2d one fused ``layer_norm``; :func:`_upscaled_masks`), and only
  the mask outputs asked for are formed;
* the dense positional encoding is computed once (:func:`dense_positional_encoding`), and the
  decoder's prompt-independent work on an episode's images once per episode
  (:meth:`Segmenter.image_side`, :class:`DecoderImageSide`);
* on the CPU a large batch is decoded in chunks (:func:`auto_decode_chunk`): the decoder's
  activations of a ViT-B-sized model are 4 MiB an image, and a batch that outgrows the caches runs
  slower per image than a few images at a time (docs/performance.md has the measurements);
* SAM decodes in float32 inside an autocast region too (bfloat16 would move its masks).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

from alignsam.atomic import write_text_atomic
from alignsam.errors import UserError
from alignsam.geometry import low_res_to_original, resize_image_for_sam

OFFICIAL_CHECKPOINTS: Dict[str, str] = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
DOWNLOAD_PAGE = "https://github.com/facebookresearch/segment-anything#model-checkpoints"
# How the mask decoder's attention is computed (see _attend): "fast" (the default:
# scaled_dot_product_attention, and on the CPU a keys-major softmax where few keys meet many
# queries), "sdpa" (scaled_dot_product_attention throughout) or "eager" (segment-anything's own
# Attention.forward, kept for comparisons).
DECODE_ATTENTION = ("fast", "sdpa", "eager")
# CPU decode chunks hold about this many bytes of decoder image tokens (h * w * C * 4 an image):
# 4 ViT-B images (64 x 64 x 256), 128 tiny ones (16 x 16 x 128). Measured in docs/performance.md.
CPU_DECODE_CHUNK_BYTES = 16 << 20
# Segmenter.image_side keeps the decoder's prompt-independent tensors up to this size (ViT-B: ~10 MiB an image)
IMAGE_SIDE_BYTES = 2 << 30


def auto_decode_chunk(device: torch.device, embedding_hw: Tuple[int, int], channels: int) -> Optional[int]:
    """Images per decoder call when none is configured: None (the whole batch at once) on an
    accelerator; on the CPU as many as fit :data:`CPU_DECODE_CHUNK_BYTES` of image tokens (at least 1)."""
    if torch.device(device).type != "cpu":
        return None
    per_image = int(embedding_hw[0]) * int(embedding_hw[1]) * int(channels) * 4
    return max(1, CPU_DECODE_CHUNK_BYTES // per_image)


@dataclass
class EmbeddedImages:
    """SAM image embeddings plus what maps them back to each original image.

    embeddings: ``(B, C, h, w)`` float (C = 256, h = w = 64 for the official models).
    original_hw: ``(B, 2)`` long, original ``(H, W)``.
    input_hw: ``(B, 2)`` long, size after the longest-side resize (before padding).
    """

    embeddings: torch.Tensor
    original_hw: torch.Tensor
    input_hw: torch.Tensor


@dataclass
class DecoderImageSide:
    """What SAM's mask decoder computes from the image embeddings alone, before any prompt, when no
    mask is prompted (:meth:`Segmenter.image_side`); an episode's T + 1 decodes share it.

    keys: ``(B, h*w, C)`` the image tokens entering the two-way transformer (embedding + SAM's
    no-mask embedding); token_to_image_k, token_to_image_v, image_to_token_q: ``(B, h*w, C')`` the
    first block's projections of them (with the positional encoding where SAM adds it).
    """

    keys: torch.Tensor
    token_to_image_k: torch.Tensor
    token_to_image_v: torch.Tensor
    image_to_token_q: torch.Tensor

    def rows(self, index) -> "DecoderImageSide":
        """The same for rows ``index`` (a slice or an index tensor)."""
        if isinstance(index, torch.Tensor):
            index = index.to(self.keys.device)
        return DecoderImageSide(self.keys[index], self.token_to_image_k[index], self.token_to_image_v[index],
                                self.image_to_token_q[index])

    def __len__(self) -> int:
        return self.keys.shape[0]


class CheckpointError(UserError, FileNotFoundError):
    """A segmenter or matcher checkpoint is missing or does not fit the architecture."""


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout that holds checkpoints/ (bundled weights)


def resolve_weights_path(path: Optional[Union[str, Path]]) -> Optional[str]:
    """Where a configured weights path points, wherever the command runs.

    A relative path is taken from the working directory when the file is there, else from the
    project's root (so ``checkpoints/tiny_sam.pt``, stored in every bundled-world checkpoint, is
    found from any folder); otherwise it is returned unchanged and the loader's error names it.
    """
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists() or not (PROJECT_ROOT / path).exists():
        return str(path)
    return str(PROJECT_ROOT / path)


def read_checkpoint_file(path: Union[str, Path], expected_name: str, where: str):
    """``torch.load`` a local checkpoint, or raise one clear error naming the file.

    Args:
        path: the configured checkpoint path.
        expected_name: the file name users should have (for the message).
        where: where to get it (a URL or a command), for the message.
    """
    path = Path(path)
    if not path.is_file():
        where_from = "" if path.is_absolute() else f", relative to the working directory {Path.cwd()}"
        raise CheckpointError(
            f"checkpoint not found: {path}{where_from} (expected the file '{expected_name}'; get it from {where} "
            f"and set the checkpoint path in the config)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated download, wrong format
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def load_state_dict_file(path: Union[str, Path], expected_name: str, where: str) -> dict:
    """:func:`read_checkpoint_file`, unwrapping ``{"state_dict": ...}`` containers."""
    state = read_checkpoint_file(path, expected_name, where)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


class Segmenter(nn.Module):
    """A frozen SAM: batched embedding and batched prompting over different images.

    Args:
        sam: a ``segment_anything.modeling.Sam``; it is frozen and put in eval mode here.
        name: the registry name it was built from (part of the feature-cache fingerprint).
        fingerprint: a string that identifies the weights (part of the feature-cache key).

    Attributes that tune :meth:`decode` (not its results):
        decode_chunk: images per decoder call; None (default) picks :func:`auto_decode_chunk`
            for the device, 0 decodes every batch in one call.
        attention: :data:`DECODE_ATTENTION`, ``"fast"`` by default.
    """

    def __init__(self, sam: Sam, name: str = "custom", fingerprint: str = "") -> None:
        super().__init__()
        self.sam = sam
        self.name = name
        self.fingerprint = fingerprint
        self.decode_chunk: Optional[int] = None
        self.attention = "fast"
        self.sam.eval()
        for p in self.sam.parameters():
            p.requires_grad_(False)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        """Side of SAM's square input (1024 official, 256 tiny)."""
        return self.sam.image_encoder.img_size

    @property
    def embedding_hw(self) -> Tuple[int, int]:
        """``(h, w)`` of the image embedding grid."""
        return tuple(self.sam.prompt_encoder.image_embedding_size)

    @property
    def embed_dim(self) -> int:
        """Channels C of the image embedding."""
        return self.sam.prompt_encoder.embed_dim

    @property
    def low_res_hw(self) -> Tuple[int, int]:
        """``(h, w)`` of the decoder's low-res logits (4 x the embedding grid)."""
        h, w = self.embedding_hw
        return 4 * h, 4 * w

    def train(self, mode: bool = True) -> "Segmenter":
        # Frozen: stays in eval mode whatever the enclosing module does.
        return super().train(False)

    def image_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The image features E ``(B, embed_dim, h, w)`` that the policy and the SRM see, out of
        what :meth:`embed` returns and :meth:`decode` takes. For SAM they are the same tensor; a
        segmenter whose decoder needs more (SAM 2's high-resolution maps) packs those into extra
        channels of its embeddings and returns only the first ``embed_dim`` here."""
        return embeddings

    # -- image side ----------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM's own preprocessing of uint8 ``(H, W, 3)`` images of any sizes.

        Returns:
            pixels ``(B, 3, S, S)`` normalised and padded; original_hw ``(B, 2)``; input_hw ``(B, 2)``.
        """
        device = self.sam.pixel_mean.device
        batch, original, resized = [], [], []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
            small = resize_image_for_sam(image, self.img_size)
            tensor = torch.as_tensor(small, device=device).permute(2, 0, 1).contiguous()
            batch.append(self.sam.preprocess(tensor[None].float())[0])
            original.append(image.shape[:2])
            resized.append(small.shape[:2])
        return (
            torch.stack(batch),
            torch.tensor(original, dtype=torch.long),
            torch.tensor(resized, dtype=torch.long),
        )

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> EmbeddedImages:
        """Embed a list of uint8 ``(H, W, 3)`` images (sizes may differ) -> :class:`EmbeddedImages`."""
        pixels, original_hw, input_hw = self.preprocess(images)
        return EmbeddedImages(self.sam.image_encoder(pixels), original_hw, input_hw)

    # -- prompt side ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        embeddings: torch.Tensor,
        points: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        mask_input: Optional[torch.Tensor] = None,
        multimask: bool = False,
        image_side: Optional[DecoderImageSide] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt SAM on B different images at once.

        Args:
            embeddings: ``(B, C, h, w)`` image embeddings (may be half precision; cast here).
            points: ``(B, N, 2)`` float clicks in SAM's input frame, or None for no clicks.
            labels: ``(B, N)`` 1 positive, 0 negative, -1 padding. Padding is dropped before SAM
                sees the clicks (anywhere in a row, with any coordinates), so every row gets exactly
                what ``SamPredictor.predict`` gives on that image's own real clicks; a row of only
                padding gets SAM's output without point prompts. One decoder call without
                padding; with padding, one per distinct number of real clicks in the batch.
            mask_input: optional ``(B, 1, 4h, 4w)`` low-res logits from a previous step.
            multimask: return SAM's three multimask outputs instead of its single-mask output.
            image_side: :meth:`image_side` of these ``embeddings`` (used when ``mask_input`` is None):
                repeated decodes of the same images skip the decoder's prompt-independent work.
        Returns:
            low-res logits ``(B, M, 4h, 4w)`` and predicted IoU ``(B, M)``, M = 3 if multimask else 1.

        Batches larger than :meth:`decode_chunk_size` are decoded in chunks of that size (each row's
        output does not depend on the others). SAM runs in float32 even inside an autocast region
        (``Trainer(precision="bf16-mixed")``, ``model.ppo.precision: bf16``): bfloat16 moves its masks.
        """
        b = embeddings.shape[0]
        if image_side is not None and len(image_side) != b:
            raise ValueError(f"image_side holds {len(image_side)} images, the embeddings {b}")
        if mask_input is not None or not self._own_decoder():
            image_side = None

        def rows(start: int, stop: int):
            cut = lambda x: None if x is None else x[start:stop]  # noqa: E731
            if image_side is None:
                return self.decode_with_grad(cut(embeddings), cut(points), cut(labels), cut(mask_input), multimask)
            select = slice(1, None) if multimask else slice(0, 1)
            return prompt_and_decode(self.sam, cut(embeddings), cut(points), cut(labels), None, outputs=select,
                                     attention=self.attention, image_side=image_side.rows(slice(start, stop)))

        chunk = self.decode_chunk_size(embeddings) or b
        with torch.autocast(embeddings.device.type, enabled=False):
            parts = [rows(start, start + chunk) for start in range(0, b, chunk)]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def image_side(self, embeddings: torch.Tensor) -> Optional[DecoderImageSide]:
        """The decoder's prompt-independent work on ``embeddings`` ``(B, C, h, w)``, for
        :meth:`decode` (``image_side=``) to reuse over an episode's decodes; None where there is
        nothing to reuse (``attention="eager"``, another decoder, more than
        :data:`IMAGE_SIDE_BYTES`)."""
        if self.attention == "eager" or not self._own_decoder():  # checked first: another family has no mask_decoder
            return None
        transformer = self.sam.mask_decoder.transformer
        if not _is_sam_two_way_transformer(transformer):
            return None
        b, c, h, w = embeddings.shape
        inner = transformer.layers[0].cross_attn_token_to_image.internal_dim
        if b * h * w * (c + 3 * inner) * 4 > IMAGE_SIDE_BYTES:
            return None
        prompt_encoder = self.sam.prompt_encoder
        with torch.autocast(embeddings.device.type, enabled=False):
            dtype = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype
            # what decode adds when no mask is prompted: SAM's no-mask embedding (PromptEncoder.forward)
            src = embeddings.to(dtype) + prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            keys = src.flatten(2).transpose(1, 2).contiguous()
            k = keys + dense_positional_encoding(prompt_encoder).flatten(2).transpose(1, 2)
            first = transformer.layers[0]
            return DecoderImageSide(keys, first.cross_attn_token_to_image.k_proj(k),
                                    first.cross_attn_token_to_image.v_proj(keys),
                                    first.cross_attn_image_to_token.q_proj(k))

    def _own_decoder(self) -> bool:
        """Whether decoding runs this class's SAM path (a subclass with its own decoder does not)."""
        return type(self).decode_with_grad is Segmenter.decode_with_grad

    def decode_chunk_size(self, embeddings: torch.Tensor) -> Optional[int]:
        """Images per decoder call for ``embeddings``: :attr:`decode_chunk` when set (0: no chunks),
        else :func:`auto_decode_chunk` for their device and this model's embedding size."""
        if self.decode_chunk is not None:
            return self.decode_chunk or None
        return auto_decode_chunk(embeddings.device, self.embedding_hw, self.embed_dim)

    def decode_with_grad(
        self,
        embeddings: torch.Tensor,
        points: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        mask_input: Optional[torch.Tensor] = None,
        multimask: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` without ``no_grad`` (and without chunks: one graph for the whole batch)."""
        select = slice(1, None) if multimask else slice(0, 1)
        return prompt_and_decode(self.sam, embeddings, points, labels, mask_input, outputs=select,
                                 attention=self.attention)

    def logits_to_original(self, low_res: torch.Tensor, embedded: EmbeddedImages, index: int) -> torch.Tensor:
        """Low-res logits ``(M, h, w)`` of image ``index`` -> ``(M, H, W)`` logits at original size."""
        return low_res_to_original(
            low_res,
            tuple(embedded.input_hw[index].tolist()),
            tuple(embedded.original_hw[index].tolist()),
            self.img_size,
        )


def prompt_and_decode(
    sam: Sam,
    embeddings: torch.Tensor,
    points: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    mask_input: Optional[torch.Tensor] = None,
    outputs: slice = slice(None),
    attention: str = "fast",
    image_side: Optional[DecoderImageSide] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder of ``sam`` for B different images; all 1 + 3 outputs.

    Each row gets what ``SamPredictor.predict`` gives for that image and its own real clicks
    (label >= 0, in order); padding (label -1) is dropped, not passed to SAM. SAM has no attention
    mask: it would embed a -1 entry as a "not a point" token that the decoder attends to, so padding
    would change the masks. Without padding this is one batched decode; with padding, the rows are
    grouped by their number of real clicks, each group is decoded in one call and the outputs are
    put back in row order. A row without real clicks (all padding, or ``N == 0``) is decoded like
    ``SamPredictor.predict(point_coords=None)``: no point tokens at all.

    Args: as :meth:`Segmenter.decode`; ``outputs`` selects SAM's outputs (only those masks are
    formed); ``attention`` one of :data:`DECODE_ATTENTION`; ``image_side`` the decoder's
    prompt-independent work on these embeddings (:meth:`Segmenter.image_side`; only without mask_input).
    Returns:
        logits ``(B, 4, 4h, 4w)``: index 0 is SAM's single-mask output, 1..3 its multimask outputs;
        predicted IoU ``(B, 4)`` (with ``outputs``, only those: e.g. ``slice(0, 1)`` gives ``(B, 1, ...)``).
    """
    if attention not in DECODE_ATTENTION:
        raise ValueError(f"attention must be one of {DECODE_ATTENTION}, got {attention!r}")
    if image_side is not None and (mask_input is not None or attention == "eager"):
        raise ValueError("image_side holds the decoder's work without a mask prompt and with attention 'fast' or 'sdpa'")
    options = {"outputs": outputs, "attention": attention, "image_side": image_side}
    if points is not None and points.shape[1] == 0:
        points, labels = None, None
    if points is None:
        return _prompt_and_decode_unpadded(sam, embeddings, None, None, mask_input, **options)
    labels = labels.to(points.device)
    real = labels >= 0  # (B, N)
    if bool(real.all()):
        return _prompt_and_decode_unpadded(sam, embeddings, points, labels, mask_input, **options)
    return _decode_grouped_by_click_count(sam, embeddings, points, labels, real, mask_input, **options)


def _decode_grouped_by_click_count(
    sam: Sam,
    embeddings: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    mask_input: Optional[torch.Tensor],
    **options,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`prompt_and_decode` of padded prompts: one decode per number of real clicks.

    Args:
        embeddings ``(B, C, h, w)``; points ``(B, N, 2)``; labels ``(B, N)``; real ``(B, N)`` bool,
        True where a click is not padding (on ``points.device``); mask_input ``(B, 1, 4h, 4w)`` or None;
        options: ``outputs`` and ``attention`` of :func:`_decode_batched`.
    Returns:
        as :func:`prompt_and_decode`, rows in input order.
    """
    counts = real.sum(1)  # (B,)
    order, masks, ious = [], [], []
    image_side = options.pop("image_side", None)
    for count in counts.unique().tolist():
        rows = torch.nonzero(counts == count)[:, 0]  # (G,)
        group_points, group_labels = _real_clicks(points[rows], labels[rows], real[rows], count)
        group_mask = None if mask_input is None else mask_input[rows.to(mask_input.device)]
        group_masks, group_ious = _prompt_and_decode_unpadded(
            sam, embeddings[rows.to(embeddings.device)], group_points, group_labels, group_mask, **options,
            image_side=None if image_side is None else image_side.rows(rows),
        )
        order.append(rows)
        masks.append(group_masks)
        ious.append(group_ious)
    inverse = torch.argsort(torch.cat(order)).to(masks[0].device)  # output row -> its place in the groups
    return torch.cat(masks)[inverse], torch.cat(ious)[inverse]


def _real_clicks(
    points: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, count: int
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The ``count`` real clicks of each row, in their original order (None, None when count is 0).

    Args:
        points ``(G, N, 2)``; labels ``(G, N)``; real ``(G, N)`` bool with ``count`` True per row.
    Returns:
        points ``(G, count, 2)`` and labels ``(G, count)``.
    """
    if count == 0:
        return None, None
    # stable sort puts each row's real clicks first, in order
    index = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices[:, :count]  # (G, count)
    return points.gather(1, index[..., None].expand(-1, -1, 2)), labels.gather(1, index)


def _prompt_and_decode_unpadded(
    sam: Sam,
    embeddings: torch.Tensor,
    points: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    mask_input: Optional[torch.Tensor] = None,
    outputs: slice = slice(None),
    attention: str = "fast",
    image_side: Optional[DecoderImageSide] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One batched prompt-encoder + mask-decoder call; every row has the same N clicks, none padding.

    Args: as :meth:`Segmenter.decode` (``points=None``: no clicks in any row); ``outputs`` and
    ``attention`` and ``image_side`` as in :func:`_decode_batched`.
    Returns: as :func:`prompt_and_decode`.
    """
    prompt_encoder = sam.prompt_encoder
    dtype = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype
    embeddings = embeddings.to(dtype)
    point_prompt = None
    if points is not None:
        point_prompt = (points.to(dtype), labels.to(points.device))
    sparse, dense = prompt_encoder(
        points=point_prompt, boxes=None, masks=None if mask_input is None else mask_input.to(dtype)
    )
    if points is None:  # no clicks at all: SAM's sparse prompt is then empty
        sparse = sparse.expand(embeddings.shape[0], -1, -1)
    return _decode_batched(sam.mask_decoder, embeddings, dense_positional_encoding(prompt_encoder), sparse, dense,
                           outputs, attention, image_side)


# prompt encoder -> (what its dense positional encoding was computed from, the encoding)
_DENSE_PE: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def dense_positional_encoding(prompt_encoder: nn.Module) -> torch.Tensor:
    """``prompt_encoder.get_dense_pe()`` ``(1, C, h, w)``, computed once and reused while the random
    Fourier matrix it comes from is unchanged (same tensor, device, dtype and version counter).
    It depends on nothing else, yet costs ViT-B 1M sines and cosines (~8 ms on one CPU core) a call."""
    matrix = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    key = (matrix.data_ptr(), matrix.device, matrix.dtype, matrix._version, tuple(prompt_encoder.image_embedding_size))
    memo = _DENSE_PE.get(prompt_encoder)
    if memo is not None and memo[0] == key:
        return memo[1]
    with torch.no_grad():
        pe = prompt_encoder.get_dense_pe()
    _DENSE_PE[prompt_encoder] = (key, pe)
    return pe


def _decode_batched(
    decoder: nn.Module,
    embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    outputs: slice = slice(None),
    attention: str = "fast",
    image_side: Optional[DecoderImageSide] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` with one embedding per prompt set instead of one shared one.

    Args:
        decoder: a ``segment_anything.modeling.MaskDecoder``.
        embeddings: ``(B, C, h, w)``; image_pe ``(1, C, h, w)``; sparse ``(B, T, C)``;
            dense ``(B, C, h, w)``.
        outputs: which of the ``1 + num_multimask`` outputs to form (default all).
        attention: one of :data:`DECODE_ATTENTION` (see :func:`_attend`).
        image_side: the prompt-independent work on ``embeddings + dense`` (then ``dense`` must be
            SAM's no-mask embedding), or None.
    Returns:
        the selected masks ``(B, M, 4h, 4w)`` and their predicted IoU ``(B, M)``.
    """
    batch = embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens[None].expand(batch, -1, -1), sparse), dim=1)
    b, c, h, w = embeddings.shape
    src = embeddings + dense if image_side is None else None
    hs, src = _run_transformer(decoder.transformer, src, image_pe, tokens, attention, image_side)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    wanted = range(decoder.num_mask_tokens)[outputs]
    hyper_in = torch.stack(
        [decoder.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in wanted],
        dim=1,
    )  # (B, M, c')
    if attention != "eager" and _is_sam_upscaling(decoder.output_upscaling):
        masks = _upscaled_masks(decoder.output_upscaling, src, hyper_in, h, w)
    else:
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)[:, outputs]


def _upscaled_masks(upscaling: nn.Sequential, tokens: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``hyper_in @ upscaling(tokens)``: segment-anything's ``output_upscaling`` (2x2 stride-2
    transposed conv, LayerNorm2d, act, the same again, act) and the masks' dot products, without
    ever laying the upscaled features out as an image.

    A stride-2 2x2 transposed convolution turns every input pixel into its own 2x2 block, one
    matmul over the channels; the LayerNorm over channels and the activations act pixel by pixel.
    So the features stay ``(B, h, w, 2, 2, [2, 2,] C)`` (each pixel's sub-pixel blocks next to it)
    and only the small masks are rearranged into rows and columns at the end.

    Args:
        tokens: the transformer's image tokens ``(B, h*w, C)``; hyper_in ``(B, M, C')``.
    Returns:
        masks ``(B, M, 4h, 4w)``.
    """
    up1, norm, act1, up2, act2 = upscaling
    b, m = tokens.shape[0], hyper_in.shape[1]
    x = _subpixel_linear(tokens, up1)  # (B * h*w * 4, C / 4): pixel (i, j), block (a, b)
    x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
    x = act2(_subpixel_linear(x, up2))  # (B * h*w * 16, C'): pixel (i, j), blocks (a, b), (c, d)
    masks = torch.bmm(x.view(b, -1, x.shape[-1]), hyper_in.transpose(1, 2))  # (B, h*w*16, M)
    # output row 4i + 2a + c, column 4j + 2b + d
    masks = masks.view(b, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return masks.reshape(b, m, 4 * h, 4 * w)


def _subpixel_linear(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A ``kernel_size=2, stride=2`` transposed convolution of channels-last pixels ``(..., C_in)``
    -> ``(N * 4, C_out)``, each pixel's 2x2 output block (row-major) after it."""
    c_in, c_out = conv.in_channels, conv.out_channels
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # (C_in, (dy, dx, C_out))
    return torch.addmm(conv.bias.repeat(4), x.reshape(-1, c_in), weight).view(-1, c_out)


def _is_sam_upscaling(upscaling: nn.Module) -> bool:
    """Whether ``upscaling`` is the ``MaskDecoder.output_upscaling`` that :func:`_upscaled_masks`
    re-composes (two stride-2 2x2 transposed convolutions around a LayerNorm2d)."""
    from segment_anything.modeling.common import LayerNorm2d

    if not isinstance(upscaling, nn.Sequential) or len(upscaling) != 5:
        return False
    up1, norm, _, up2, _ = upscaling
    plain = lambda m: (type(m) is nn.ConvTranspose2d and m.kernel_size == (2, 2) and m.stride == (2, 2)  # noqa: E731
                       and m.padding == (0, 0) and m.output_padding == (0, 0) and m.dilation == (1, 1)
                       and m.groups == 1 and m.bias is not None)
    return plain(up1) and plain(up2) and type(norm) is LayerNorm2d


def _run_transformer(
    transformer: nn.Module, image_embedding: Optional[torch.Tensor], image_pe: torch.Tensor, tokens: torch.Tensor,
    attention: str, image_side: Optional[DecoderImageSide] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decoder's two-way transformer: ``(B, C, h, w)``, ``(1, C, h, w)``, ``(B, T, C)`` ->
    queries ``(B, T, C)``, keys ``(B, h*w, C)``.

    segment-anything's ``TwoWayTransformer.forward`` step by step, with the positional encoding
    broadcast over the batch instead of copied, ``keys + pe`` formed once per block instead of
    twice, the attention of :func:`_attend`, and the first block's image-side projections taken
    from ``image_side`` when given (then ``image_embedding`` is unused). ``attention="eager"``, or a
    transformer of another class, runs the modules' own forward.
    """
    if attention == "eager" or not _is_sam_two_way_transformer(transformer):
        return transformer(image_embedding, image_pe.expand(image_embedding.shape[0], -1, -1, -1), tokens)
    key_pe = image_pe.flatten(2).transpose(1, 2)  # (1, h*w, C): broadcast over the batch
    if image_side is None:
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, C); contiguous: faster linears
    else:
        keys = image_side.keys
    queries = tokens
    for index, block in enumerate(transformer.layers):
        cached = image_side if index == 0 else None
        if block.skip_first_layer_pe:
            queries = _attend(block.self_attn, queries, queries, queries, attention)
        else:
            q = queries + tokens
            queries = queries + _attend(block.self_attn, q, q, queries, attention)
        queries = block.norm1(queries)
        q = queries + tokens
        k = keys + key_pe if cached is None else None
        given = (None, None, None) if cached is None else (None, cached.token_to_image_k, cached.token_to_image_v)
        queries = block.norm2(queries + _attend(block.cross_attn_token_to_image, q, k, keys, attention, given))
        queries = block.norm3(queries + block.mlp(queries))
        q = queries + tokens  # keys are unchanged since k was formed: k is still keys + key_pe
        given = (None, None, None) if cached is None else (cached.image_to_token_q, None, None)
        keys = block.norm4(keys + _attend(block.cross_attn_image_to_token, k, q, queries, attention, given))
    attn_out = _attend(transformer.final_attn_token_to_image, queries + tokens, keys + key_pe, keys, attention)
    return transformer.norm_final_attn(queries + attn_out), keys


def _attend(module: Attention, q: Optional[torch.Tensor], k: Optional[torch.Tensor], v: torch.Tensor, attention: str,
            projected: Tuple[Optional[torch.Tensor], ...] = (None, None, None)) -> torch.Tensor:
    """``Attention.forward``: projections, heads, ``softmax(q k^T / sqrt(d)) v``, output projection.

    ``projected``: q, k, v projections computed already (:class:`DecoderImageSide`); where one is
    given, its input is not used. The middle is one ``scaled_dot_product_attention`` call, except
    with ``attention="fast"`` on the CPU when the keys are fewer than the queries (the image tokens
    attending to the few prompt tokens): there the scores are formed keys-major, ``(k q^T)``, and
    the softmax runs over the keys' axis, which vectorises along the many queries (PyTorch's CPU
    kernels handle a softmax over a last axis of ~10 elements, or SDPA's blocked kernel, several
    times slower).
    """
    heads = module.num_heads
    q, k, v = (given if given is not None else projection(x) for given, projection, x in
               zip(projected, (module.q_proj, module.k_proj, module.v_proj), (q, k, v)))
    b, n, c = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)  # (B, heads, tokens, c / heads)
    if attention == "fast" and q.device.type == "cpu" and k.shape[2] < q.shape[2]:
        scores = (k @ q.transpose(-1, -2)) * (1.0 / math.sqrt(c // heads))  # (B, heads, N_k, N_q)
        out = scores.softmax(dim=-2).transpose(-1, -2) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return module.out_proj(out.transpose(1, 2).reshape(b, n, c))


def _is_sam_two_way_transformer(transformer: nn.Module) -> bool:
    """Whether ``transformer`` is segment-anything's own (what :func:`_run_transformer` re-composes)."""
    return (type(transformer) is TwoWayTransformer
            and all(type(layer) is TwoWayAttentionBlock for layer in transformer.layers)
            and all(type(m) is Attention for layer in transformer.layers
                    for m in (layer.self_attn, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token))
            and type(transformer.final_attn_token_to_image) is Attention)


# -- weights files and the official models ----------------------------------------------------
SegmenterBuilder = Callable[[Optional[str]], Segmenter]


# -- weights-file identity -----------------------------------------------------------------------
DIGEST_CHUNK_BYTES = 8 << 20
DIGEST_MEMO_VERSION = 1
# (absolute path, size, mtime_ns, ctime_ns) -> SHA-256 hex of the whole file, for this process
_FILE_DIGESTS: Dict[Tuple[str, int, int, int], str] = {}


def file_fingerprint(path: Union[str, Path]) -> str:
    """Identity of a weights file for the feature cache: ``"<name>:<size>:sha256:<hex>"``.

    The SHA-256 covers the whole file, so a re-saved checkpoint that differs anywhere gets a new
    fingerprint (and new cache entries). It is computed once per version of the file: see
    :func:`file_sha256`.
    """
    path = Path(path)
    return f"{path.name}:{path.stat().st_size}:sha256:{file_sha256(path)}"


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 hex of a file's whole content, remembered across calls and runs.

    The digest is remembered by (absolute path, size, mtime_ns, ctime_ns) in this process and in
    the JSON memo :func:`digest_memo_path`, so a multi-GB checkpoint is read once per change of the
    file, not once per run. ctime also moves when a writer restores the mtime afterwards. A corrupt
    or unwritable memo is ignored (the file is then hashed again).
    """
    path = Path(path).absolute()
    version = _file_version(path)
    digest = _FILE_DIGESTS.get(version)
    if digest is None:
        digest = _remembered_digest(path, version)
    if digest is None:
        digest = sha256_of_file(path)
        if _file_version(path) != version:  # changed while being read: hash what is there next time
            return digest
        _remember_digest(path, version, digest)
    _FILE_DIGESTS[version] = digest
    return digest


def sha256_of_file(path: Union[str, Path]) -> str:
    """SHA-256 hex of a file, read in :data:`DIGEST_CHUNK_BYTES` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DIGEST_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def digest_memo_path() -> Path:
    """``$XDG_CACHE_HOME/alignsam/file_digests.json`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alignsam" / "file_digests.json"


def _file_version(path: Path) -> Tuple[str, int, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _read_digest_memo() -> Dict[str, dict]:
    """The memo's ``{absolute path: {"size", "mtime_ns", "ctime_ns", "sha256"}}``; {} when absent or unreadable."""
    try:
        memo = json.loads(digest_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError):  # RuntimeError: no home directory
        return {}
    files = memo.get("files") if isinstance(memo, dict) and memo.get("version") == DIGEST_MEMO_VERSION else None
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _remembered_digest(path: Path, version: Tuple[str, int, int, int]) -> Optional[str]:
    entry = _read_digest_memo().get(str(path), {})
    digest = entry.get("sha256")
    if (entry.get("size"), entry.get("mtime_ns"), entry.get("ctime_ns")) != version[1:]:
        return None
    return digest if isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest) else None


def _remember_digest(path: Path, version: Tuple[str, int, int, int], digest: str) -> None:
    """Add one digest to the JSON memo (dropping files that no longer exist); failures are ignored."""
    files = {k: v for k, v in _read_digest_memo().items() if Path(k).exists()}
    files[str(path)] = {"size": version[1], "mtime_ns": version[2], "ctime_ns": version[3], "sha256": digest}
    try:
        write_text_atomic(digest_memo_path(), json.dumps({"version": DIGEST_MEMO_VERSION, "files": files}, indent=1))
    except (OSError, RuntimeError):
        pass  # read-only home or cache dir: the digest is simply recomputed next run


def load_weights(model: nn.Module, state: Optional[dict], checkpoint: Optional[str], what: str, expected: str) -> str:
    """Load ``state`` (read from ``checkpoint``) into ``model`` strictly -> the weights fingerprint of
    the feature cache (``"random-init"`` when ``state`` is None). A state that does not fit is one
    :class:`CheckpointError` naming the file, the model (``what``) and the file name ``expected``."""
    if state is None:
        return "random-init"
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit {what} (expected {expected}): {str(err)[:300]}") from err
    return file_fingerprint(checkpoint)


def official_builder(name: str) -> SegmenterBuilder:
    """The builder of segment-anything's ``name`` (``vit_b``, ``vit_l``, ``vit_h``) from its official file."""

    def build(checkpoint: Optional[str]) -> Segmenter:
        from segment_anything import sam_model_registry

        # read the file first: a missing checkpoint is reported before a large model is built
        state = None if checkpoint is None else load_state_dict_file(checkpoint, OFFICIAL_CHECKPOINTS[name], DOWNLOAD_PAGE)
        sam = sam_model_registry[name](checkpoint=None)
        fingerprint = load_weights(sam, state, checkpoint, f"SAM '{name}'", OFFICIAL_CHECKPOINTS[name])
        return Segmenter(sam, name=name, fingerprint=fingerprint)

    return build
