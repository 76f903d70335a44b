"""Frozen SAM behind a small, batched interface.

``Segmenter.embed`` runs SAM's own preprocessing and image encoder on images of any size;
``Segmenter.decode`` runs the prompt encoder and mask decoder for **B different images in one call**
(segment-anything's ``MaskDecoder`` repeats one image embedding for every prompt set, so the
batched path re-composes its sub-modules here without touching the installed package).
Coordinates and mask conventions are those of :mod:`alignsam.geometry`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from segment_anything.modeling import Sam

from alignsam.atomic import write_text_atomic
from alignsam.errors import UserError
from alignsam.geometry import low_res_to_original, resize_image_for_sam

OFFICIAL_CHECKPOINTS: Dict[str, str] = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
DOWNLOAD_PAGE = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


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
    """

    def __init__(self, sam: Sam, name: str = "custom", fingerprint: str = "") -> None:
        super().__init__()
        self.sam = sam
        self.name = name
        self.fingerprint = fingerprint
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
        Returns:
            low-res logits ``(B, M, 4h, 4w)`` and predicted IoU ``(B, M)``, M = 3 if multimask else 1.
        """
        return self.decode_with_grad(embeddings, points, labels, mask_input, multimask)

    def decode_with_grad(
        self,
        embeddings: torch.Tensor,
        points: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        mask_input: Optional[torch.Tensor] = None,
        multimask: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` without ``no_grad``."""
        masks, iou = prompt_and_decode(self.sam, embeddings, points, labels, mask_input)
        select = slice(1, None) if multimask else slice(0, 1)
        return masks[:, select], iou[:, select]

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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + mask decoder of ``sam`` for B different images; all 1 + 3 outputs.

    Each row gets what ``SamPredictor.predict`` gives for that image and its own real clicks
    (label >= 0, in order); padding (label -1) is dropped, not passed to SAM. SAM has no attention
    mask: it would embed a -1 entry as a "not a point" token that the decoder attends to, so padding
    would change the masks. Without padding this is one batched decode; with padding, the rows are
    grouped by their number of real clicks, each group is decoded in one call and the outputs are
    put back in row order. A row without real clicks (all padding, or ``N == 0``) is decoded like
    ``SamPredictor.predict(point_coords=None)``: no point tokens at all.

    Args: as :meth:`Segmenter.decode`.
    Returns:
        logits ``(B, 4, 4h, 4w)``: index 0 is SAM's single-mask output, 1..3 its multimask outputs;
        predicted IoU ``(B, 4)``.
    """
    if points is not None and points.shape[1] == 0:
        points, labels = None, None
    if points is None:
        return _prompt_and_decode_unpadded(sam, embeddings, None, None, mask_input)
    labels = labels.to(points.device)
    real = labels >= 0  # (B, N)
    if bool(real.all()):
        return _prompt_and_decode_unpadded(sam, embeddings, points, labels, mask_input)
    return _decode_grouped_by_click_count(sam, embeddings, points, labels, real, mask_input)


def _decode_grouped_by_click_count(
    sam: Sam,
    embeddings: torch.Tensor,
    points: torch.Tensor,
    labels: torch.Tensor,
    real: torch.Tensor,
    mask_input: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`prompt_and_decode` of padded prompts: one decode per number of real clicks.

    Args:
        embeddings ``(B, C, h, w)``; points ``(B, N, 2)``; labels ``(B, N)``; real ``(B, N)`` bool,
        True where a click is not padding (on ``points.device``); mask_input ``(B, 1, 4h, 4w)`` or None.
    Returns:
        as :func:`prompt_and_decode`, rows in input order.
    """
    counts = real.sum(1)  # (B,)
    order, masks, ious = [], [], []
    for count in counts.unique().tolist():
        rows = torch.nonzero(counts == count)[:, 0]  # (G,)
        group_points, group_labels = _real_clicks(points[rows], labels[rows], real[rows], count)
        group_mask = None if mask_input is None else mask_input[rows.to(mask_input.device)]
        group_masks, group_ious = _prompt_and_decode_unpadded(
            sam, embeddings[rows.to(embeddings.device)], group_points, group_labels, group_mask
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One batched prompt-encoder + mask-decoder call; every row has the same N clicks, none padding.

    Args: as :meth:`Segmenter.decode` (``points=None``: no clicks in any row).
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
    return _decode_batched(sam.mask_decoder, embeddings, prompt_encoder.get_dense_pe(), sparse, dense)


def _decode_batched(
    decoder: nn.Module,
    embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` with one embedding per prompt set instead of one shared one.

    Args:
        decoder: a ``segment_anything.modeling.MaskDecoder``.
        embeddings: ``(B, C, h, w)``; image_pe ``(1, C, h, w)``; sparse ``(B, T, C)``;
            dense ``(B, C, h, w)``.
    Returns:
        all ``1 + num_multimask`` masks ``(B, M, 4h, 4w)`` and their predicted IoU ``(B, M)``.
    """
    batch = embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens[None].expand(batch, -1, -1), sparse), dim=1)
    src = embeddings + dense
    pos_src = image_pe.expand(batch, -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


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


def official_builder(name: str) -> SegmenterBuilder:
    """The builder of segment-anything's ``name`` (``vit_b``, ``vit_l``, ``vit_h``) from its official file."""

    def build(checkpoint: Optional[str]) -> Segmenter:
        from segment_anything import sam_model_registry

        # read the file first: a missing checkpoint is reported before a large model is built
        state = None if checkpoint is None else load_state_dict_file(checkpoint, OFFICIAL_CHECKPOINTS[name], DOWNLOAD_PAGE)
        sam = sam_model_registry[name](checkpoint=None)
        fingerprint = "random-init"
        if state is not None:
            try:
                sam.load_state_dict(state)
            except RuntimeError as err:
                raise CheckpointError(
                    f"checkpoint {checkpoint} does not fit SAM '{name}' "
                    f"(expected {OFFICIAL_CHECKPOINTS[name]}): {str(err)[:300]}"
                ) from err
            fingerprint = file_fingerprint(checkpoint)
        return Segmenter(sam, name=name, fingerprint=fingerprint)

    return build
