"""SAM 2 and SAM 2.1 image models (the ``sam2`` package) behind the :class:`Segmenter` interface.

The agent, the feature cache, evaluation and ``evaluate.py predict`` use a :class:`Sam2Segmenter`
exactly as they use SAM's :class:`~alignsam.foundation.segmenter.Segmenter`:

* **Frame.** SAM 2 resizes the whole image to its ``1024 x 1024`` input (aspect not kept, no
  padding) and puts clicks at ``(x * 1024 / W, y * 1024 / H)``. The segmenter keeps that frame, so
  its results are ``SAM2ImagePredictor``'s: ``img_size`` is a
  :class:`~alignsam.geometry.SquashedSquare` and every ``input_hw`` is ``(1024, 1024)``, which is
  all :mod:`alignsam.geometry` needs to place clicks, patches, regions and masks (docs/sam2.md).
* **Embeddings.** SAM 2's mask decoder reads, besides the ``256 x 64 x 64`` image embedding, two
  high-resolution maps of the image encoder (``32 x 256 x 256`` and ``64 x 128 x 128``). ``embed``
  packs them into extra channels of one ``(B, 1024, 64, 64)`` tensor (``pixel_unshuffle``: exact and
  reversible), so the feature cache stores them like SAM's embeddings, unchanged;
  :meth:`Sam2Segmenter.image_features` is the first 256 channels (what the policy and the SRM see)
  and ``decode`` unpacks the rest.
* **Decoding** B different images with their own clicks in one call gives, row by row,
  ``SAM2ImagePredictor.predict(point_coords, point_labels, mask_input, multimask_output,
  return_logits=True)``'s low-res logits (clamped to +-32 as predict returns them) and IoU,
  including its single-mask choice (the dynamic fallback to the best multimask output when the
  single mask is unstable). Padding clicks (label -1) are dropped as in SAM's path.

``sam2`` is an optional dependency (``pip install -e .[sam2]``): it is imported when a SAM 2 model is
built, never by importing this module. Weights come from a local file in the official format
(``{"model": state_dict}``, e.g. ``sam2.1_hiera_tiny.pt``); nothing is downloaded.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from alignsam.errors import UserError
from alignsam.foundation.segmenter import (
    CheckpointError,
    EmbeddedImages,
    Segmenter,
    SegmenterBuilder,
    _real_clicks,
    load_weights,
    read_checkpoint_file,
)
from alignsam.geometry import SquashedSquare

# registry name -> (hydra config inside the sam2 package, official checkpoint file name)
SAM2_MODELS: Dict[str, Tuple[str, str]] = {
    "sam2.1_hiera_t": ("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt"),
    "sam2.1_hiera_s": ("configs/sam2.1/sam2.1_hiera_s.yaml", "sam2.1_hiera_small.pt"),
    "sam2.1_hiera_b+": ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_hiera_base_plus.pt"),
    "sam2.1_hiera_l": ("configs/sam2.1/sam2.1_hiera_l.yaml", "sam2.1_hiera_large.pt"),
    "sam2_hiera_t": ("configs/sam2/sam2_hiera_t.yaml", "sam2_hiera_tiny.pt"),
    "sam2_hiera_s": ("configs/sam2/sam2_hiera_s.yaml", "sam2_hiera_small.pt"),
    "sam2_hiera_b+": ("configs/sam2/sam2_hiera_b+.yaml", "sam2_hiera_base_plus.pt"),
    "sam2_hiera_l": ("configs/sam2/sam2_hiera_l.yaml", "sam2_hiera_large.pt"),
}
SAM2_DOWNLOAD_PAGE = "https://github.com/facebookresearch/sam2#model-description"
SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e '.[sam2]'"
# SAM2Transforms: ImageNet statistics on [0, 1] pixels (the same map as SAM's on [0, 255])
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)
# SAM2ImagePredictor returns its low-res logits clamped to this range
LOW_RES_LOGIT_CLAMP = 32.0


class MissingPackageError(UserError, ImportError):
    """An optional package that a configured model needs is not installed."""


def import_sam2():
    """``sam2.build_sam.build_sam2``, or a :class:`MissingPackageError` saying how to install it."""
    try:
        from sam2.build_sam import build_sam2
    except ImportError as err:
        raise MissingPackageError(
            f"SAM 2 segmenters need the 'sam2' package ({err}); install the extra with: {SAM2_INSTALL}"
        ) from err
    return build_sam2


class Sam2Segmenter(Segmenter):
    """A frozen SAM 2 image model: batched embedding and batched prompting over different images.

    Args:
        model: a ``sam2.modeling.sam2_base.SAM2Base`` (as ``sam2.build_sam.build_sam2`` makes it);
            frozen and put in eval mode here. Only its image encoder, prompt encoder and mask decoder
            are used (the memory modules serve video).
        name, fingerprint: as :class:`~alignsam.foundation.segmenter.Segmenter`.
    """

    def __init__(self, model: nn.Module, name: str = "sam2", fingerprint: str = "") -> None:
        super().__init__(model, name=name, fingerprint=fingerprint)

    @property
    def pixel_mean(self) -> torch.Tensor:
        """Normalisation mean on [0, 255] pixels (for the feature-cache key; SAM's values)."""
        return torch.tensor(SAM2_PIXEL_MEAN).view(-1, 1, 1) * 255

    @property
    def pixel_std(self) -> torch.Tensor:
        return torch.tensor(SAM2_PIXEL_STD).view(-1, 1, 1) * 255

    def _encoder_parameter(self) -> torch.Tensor:
        return next(self.sam.image_encoder.parameters())

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def img_size(self) -> SquashedSquare:
        """Side of SAM 2's square input (1024), in its frame (the whole image squashed to it)."""
        return SquashedSquare(self.sam.image_size)

    @property
    def embedding_hw(self) -> Tuple[int, int]:
        return tuple(self.sam.sam_prompt_encoder.image_embedding_size)

    @property
    def embed_dim(self) -> int:
        return self.sam.sam_prompt_encoder.embed_dim

    @property
    def high_res_levels(self) -> List[Tuple[int, int]]:
        """``(channels, factor)`` of each high-resolution map the decoder reads, finest first:
        ``[(32, 4), (64, 2)]`` for the official models (maps at 4x and 2x the embedding grid)."""
        decoder = self.sam.sam_mask_decoder
        if not self.sam.use_high_res_features_in_sam:
            return []
        return [(decoder.conv_s0.out_channels, 4), (decoder.conv_s1.out_channels, 2)]

    @property
    def packed_channels(self) -> int:
        """Channels of what :meth:`embed` returns: ``embed_dim`` + the unshuffled high-res maps (1024)."""
        return self.embed_dim + sum(c * f * f for c, f in self.high_res_levels)

    def image_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The image embedding ``(B, 256, h, w)``: the first ``embed_dim`` channels of the packed tensor."""
        return embeddings[:, : self.embed_dim]

    def pack(self, image_embed: torch.Tensor, high_res: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(B, C, h, w)`` and the maps ``(B, c_i, f_i h, f_i w)`` -> ``(B, packed_channels, h, w)``."""
        parts = [image_embed] + [F.pixel_unshuffle(m, f) for m, (_, f) in zip(high_res, self.high_res_levels)]
        return torch.cat(parts, dim=1)

    def unpack(self, embeddings: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Inverse of :meth:`pack` (exact): the image embedding and the high-res maps, finest first."""
        if embeddings.shape[1] != self.packed_channels:
            raise ValueError(
                f"{self.name} decodes packed embeddings of {self.packed_channels} channels (image embedding "
                f"and high-resolution maps, see Sam2Segmenter.embed); got {embeddings.shape[1]}"
            )
        start, maps = self.embed_dim, []
        for channels, factor in self.high_res_levels:
            size = channels * factor * factor
            maps.append(F.pixel_shuffle(embeddings[:, start : start + size], factor))
            start += size
        return embeddings[:, : self.embed_dim], maps

    # -- image side ----------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``SAM2Transforms`` of uint8 ``(H, W, 3)`` images of any sizes: [0, 1] pixels, bilinear
        (antialiased) resize of the whole image to ``S x S``, ImageNet normalisation; on the CPU, as
        ``SAM2ImagePredictor.set_image`` does, then moved to the model's device.

        Returns:
            pixels ``(B, 3, S, S)``; original_hw ``(B, 2)``; input_hw ``(B, 2)``, every row ``(S, S)``.
        """
        from torchvision.transforms import functional as TF

        size = int(self.img_size)
        batch, original = [], []
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
            pixels = TF.to_tensor(image if image.flags.writeable else image.copy())  # torch warns on read-only arrays
            pixels = TF.resize(pixels, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
            batch.append(TF.normalize(pixels, list(SAM2_PIXEL_MEAN), list(SAM2_PIXEL_STD)))
            original.append(image.shape[:2])
        weight = self._encoder_parameter()
        return (
            torch.stack(batch).to(weight.device, weight.dtype),
            torch.tensor(original, dtype=torch.long),
            torch.tensor([[size, size]] * len(batch), dtype=torch.long),
        )

    @torch.no_grad()
    def embed(self, images: Sequence[np.ndarray]) -> EmbeddedImages:
        """Embed uint8 ``(H, W, 3)`` images (sizes may differ) -> packed ``(B, 1024, 64, 64)``
        embeddings: ``SAM2ImagePredictor.set_image``'s image embedding (with ``no_mem_embed`` added)
        and high-resolution maps, see :meth:`pack`."""
        pixels, original_hw, input_hw = self.preprocess(images)
        model = self.sam
        backbone_out = model.forward_image(pixels)
        _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
        if model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
        b = pixels.shape[0]
        # (HW, B, C) -> (B, C, H, W), finest level first, as set_image
        feats = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(vision_feats, feat_sizes)]
        return EmbeddedImages(self.pack(feats[-1], feats[:-1]), original_hw, input_hw)

    # -- prompt side ---------------------------------------------------------------------------
    def image_side(self, embeddings: torch.Tensor) -> None:
        """Nothing to reuse over an episode: SAM's image-side cache (:class:`DecoderImageSide`) is
        built for segment-anything's decoder; SAM 2's decodes each step in full (same results)."""
        return None

    def decode_with_grad(
        self,
        embeddings: torch.Tensor,
        points: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        mask_input: Optional[torch.Tensor] = None,
        multimask: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode` without ``no_grad``: per row, what ``SAM2ImagePredictor.predict`` returns.

        Args: as :meth:`Segmenter.decode`; ``embeddings`` are packed (:meth:`embed`), ``points`` in
            SAM 2's frame (:func:`~alignsam.geometry.original_to_sam_points` with ``img_size``).
        Returns:
            low-res logits ``(B, M, 4h, 4w)`` clamped to +-32 and IoU ``(B, M)``; M = 3 with
            ``multimask``, else 1: the single-mask token's output, or the best multimask output
            where the single mask is unstable (SAM 2's dynamic fallback, as predict does).
        """
        if points is not None and points.shape[1] == 0:
            points, labels = None, None
        if points is None:
            return self._decode_unpadded(embeddings, None, None, mask_input, multimask)
        labels = labels.to(points.device)
        real = labels >= 0
        if bool(real.all()):
            return self._decode_unpadded(embeddings, points, labels, mask_input, multimask)
        counts = real.sum(1)
        order, masks, ious = [], [], []
        for count in counts.unique().tolist():
            rows = torch.nonzero(counts == count)[:, 0]
            group_points, group_labels = _real_clicks(points[rows], labels[rows], real[rows], count)
            group_mask = None if mask_input is None else mask_input[rows.to(mask_input.device)]
            group_masks, group_ious = self._decode_unpadded(
                embeddings[rows.to(embeddings.device)], group_points, group_labels, group_mask, multimask
            )
            order.append(rows)
            masks.append(group_masks)
            ious.append(group_ious)
        inverse = torch.argsort(torch.cat(order)).to(masks[0].device)
        return torch.cat(masks)[inverse], torch.cat(ious)[inverse]

    def _decode_unpadded(
        self,
        embeddings: torch.Tensor,
        points: Optional[torch.Tensor],
        labels: Optional[torch.Tensor],
        mask_input: Optional[torch.Tensor],
        multimask: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder call; every row has the same N real clicks (or none).

        SAM 2's ``MaskDecoder`` takes one embedding per prompt set (``repeat_image=False``), with
        the high-resolution maps batched alike, so the rows are B different images.
        """
        prompt_encoder, decoder = self.sam.sam_prompt_encoder, self.sam.sam_mask_decoder
        dtype = prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype
        image_embed, high_res = self.unpack(embeddings.to(dtype))
        batch = image_embed.shape[0]
        point_prompt = None if points is None else (points.to(dtype), labels.to(points.device))
        sparse, dense = prompt_encoder(
            points=point_prompt, boxes=None, masks=None if mask_input is None else mask_input.to(dtype)
        )
        if sparse.shape[0] != batch:  # no clicks and no mask: the prompt encoder's batch is 1
            sparse = sparse.expand(batch, -1, -1)
            dense = dense.expand(batch, -1, -1, -1)
        masks, iou, _, _ = decoder(
            image_embeddings=image_embed,
            image_pe=prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=False,
            high_res_features=high_res,
        )
        return masks.clamp(-LOW_RES_LOGIT_CLAMP, LOW_RES_LOGIT_CLAMP), iou


# -- building from the official configs and files ---------------------------------------------------
def read_sam2_state(checkpoint: str, name: str) -> dict:
    """The state dict of an official SAM 2 checkpoint (``{"model": state_dict}``), or a clear error."""
    file_name = SAM2_MODELS[name][1]
    raw = read_checkpoint_file(checkpoint, file_name, SAM2_DOWNLOAD_PAGE)
    if not (isinstance(raw, dict) and isinstance(raw.get("model"), dict)):
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a SAM 2 checkpoint: expected a dict with the state dict under "
            f"'model', as the official {file_name} (from {SAM2_DOWNLOAD_PAGE})"
        )
    return raw["model"]


def build_sam2_model(name: str) -> nn.Module:
    """``SAM2Base`` of ``name`` from the sam2 package's own hydra config, random weights, on the CPU,
    with ``SAM2ImagePredictor``'s usual post-processing options (``build_sam2``'s defaults)."""
    build_sam2 = import_sam2()
    return build_sam2(SAM2_MODELS[name][0], ckpt_path=None, device="cpu", mode="eval")


def sam2_builder(name: str) -> SegmenterBuilder:
    """The builder of SAM 2 model ``name`` (a key of :data:`SAM2_MODELS`) from its official file."""

    def build(checkpoint: Optional[str]) -> Sam2Segmenter:
        import_sam2()  # a missing package first: nothing else can be done without it
        # read the file before building: a missing checkpoint is reported before a large model is built
        state = None if checkpoint is None else read_sam2_state(checkpoint, name)
        model = build_sam2_model(name)
        fingerprint = load_weights(model, state, checkpoint, f"SAM 2 '{name}'", SAM2_MODELS[name][1])
        return Sam2Segmenter(model, name=name, fingerprint=fingerprint)

    return build


def save_sam2_checkpoint(model: nn.Module, path: str) -> None:
    """Write ``model``'s weights in the official format (``{"model": state_dict}``), atomically."""
    import os

    tmp = f"{path}.tmp"
    torch.save({"model": {k: v.cpu() for k, v in model.state_dict().items()}}, tmp)
    os.replace(tmp, path)


SAM2_BUILDERS: Dict[str, SegmenterBuilder] = {name: sam2_builder(name) for name in SAM2_MODELS}
