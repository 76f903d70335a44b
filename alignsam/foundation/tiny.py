"""The tiny SAM of the bundled world: segment-anything's own model classes at small width.

Same classes and same composition as ``segment_anything.build_sam`` (ImageEncoderViT, PromptEncoder,
MaskDecoder, TwoWayTransformer), at 256 px input. Its weights are produced by
``python -m alignsam.pretrain.tiny_sam`` and shipped in ``checkpoints/``; it loads through the same
registry as the official models: ``build_segmenter("tiny", "checkpoints/tiny_sam.pt")``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Optional

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from alignsam.foundation.segmenter import (
    CheckpointError,
    Segmenter,
    file_fingerprint,
    read_checkpoint_file,
)

TINY_SAM_FILE = "tiny_sam.pt"
TINY_SAM_COMMAND = "python -m alignsam.pretrain.tiny_sam (see checkpoints/README.md)"


@dataclass(frozen=True)
class TinySamArch:
    """Architecture of the tiny SAM (defaults are the shipped model's)."""

    img_size: int = 256
    patch_size: int = 16
    encoder_dim: int = 128
    encoder_depth: int = 6
    encoder_heads: int = 4
    prompt_dim: int = 128
    decoder_mlp_dim: int = 512
    decoder_heads: int = 4
    iou_head_hidden_dim: int = 128


def build_tiny_sam(arch: TinySamArch = TinySamArch()) -> Sam:
    """A randomly initialised ``Sam`` with the tiny architecture."""
    grid = arch.img_size // arch.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=arch.img_size,
            patch_size=arch.patch_size,
            embed_dim=arch.encoder_dim,
            depth=arch.encoder_depth,
            num_heads=arch.encoder_heads,
            mlp_ratio=4,
            out_chans=arch.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=0,  # the token grid is small: global attention in every block
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=arch.prompt_dim,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=arch.decoder_heads,
            ),
            transformer_dim=arch.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
    )


def save_tiny_sam(sam: Sam, arch: TinySamArch, path: str, **meta) -> None:
    """Write ``{"arch", "state_dict", "meta"}`` atomically (fp16 weights keep the file small; CPU tensors,
    so that a file written on a GPU loads anywhere without ``map_location``)."""
    import os

    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in sam.state_dict().items()}
    tmp = f"{path}.tmp"
    torch.save({"arch": asdict(arch), "state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)


def build_tiny_segmenter(checkpoint: Optional[str]) -> Segmenter:
    """Builder of ``tiny`` (see :mod:`alignsam.foundation.registry`): random weights when ``checkpoint`` is None."""
    if checkpoint is None:
        return Segmenter(build_tiny_sam(), name="tiny", fingerprint="random-init")
    raw = read_checkpoint_file(checkpoint, TINY_SAM_FILE, TINY_SAM_COMMAND)
    if not (isinstance(raw, dict) and "arch" in raw and "state_dict" in raw):
        raise CheckpointError(f"checkpoint {checkpoint} is not a tiny SAM file ({TINY_SAM_FILE}, made by {TINY_SAM_COMMAND})")
    arch = TinySamArch(**raw["arch"])
    sam = build_tiny_sam(arch)
    try:
        sam.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in raw["state_dict"].items()})
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the tiny SAM architecture: {str(err)[:300]}") from err
    return Segmenter(sam, name="tiny", fingerprint=file_fingerprint(checkpoint))
