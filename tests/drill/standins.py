"""Stand-ins for the official checkpoints: the real file formats, random weights.

The drill (``tests/drill/test_real_path.py``) runs the task configs on the real ViT-B models, whose
weights cannot be downloaded here. What matters for the code path is the *file*, not the numbers,
so these builders write files that look to the loaders exactly like the official downloads:

* ``sam_vit_b_01ec64.pth``: SAM ViT-B as a plain state dict saved with ``torch.save`` (what Meta
  ships), from ``segment_anything.sam_model_registry["vit_b"](checkpoint=None)``;
* ``ViT-B-16.pt``: OpenAI CLIP ViT-B/16 as a TorchScript archive (what OpenAI ships): a scripted
  module whose ``state_dict()`` has OpenAI's key names and shapes (open_clip's ``ViT-B-16`` with
  quick_gelu uses the same names), OpenAI's dtypes (``convert_weights``: linear, conv and attention
  weights and the two projections in fp16, the rest fp32) and the archive's extras
  ``input_resolution``, ``context_length`` and ``vocab_size``.

Both are a few hundred MB, so build them once per session (``standin_checkpoints``); set
``ALIGNSAM_DRILL_STANDINS=<dir>`` to keep them between sessions.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from fixture_trees import REAL_LAYOUTS, image_for, mask_for, voc_label_map, write_image, write_palette_png  # noqa: E402

SAM_VIT_B_NAME = "sam_vit_b_01ec64.pth"
CLIP_VIT_B_16_NAME = "ViT-B-16.pt"
CLIP_MODEL_NAME = "ViT-B-16"
# OpenAI's archives carry these three as integer entries of the state dict (build_model drops them)
OPENAI_EXTRAS = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}


def build_sam_vit_b(path: Path, seed: int = 0) -> Path:
    """Write SAM ViT-B with random weights as Meta's ``sam_vit_b_01ec64.pth`` (a plain state dict)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(sam.state_dict(), tmp)
    tmp.replace(path)
    return path


def _openai_dtype(key: str, shape: torch.Size) -> torch.dtype:
    """The dtype OpenAI's ``convert_weights`` left each entry in (fp16 for linear / conv /
    attention weights and biases and for ``text_projection`` / ``visual.proj``; fp32 otherwise)."""
    last = key.rsplit(".", 1)[-1]
    if last in ("text_projection", "proj"):
        return torch.float16
    if last in ("in_proj_weight", "in_proj_bias"):
        return torch.float16
    if any(part in key for part in (".out_proj.", ".c_fc.", ".c_proj.", "conv1.")):
        return torch.float16
    return torch.float32


class _Holder(nn.Module):
    """A node of the stand-in archive: its tensors are parameters, its children are ``_Holder`` s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # TorchScript wants a method to compile
        return x


def openai_clip_state_dict(model_name: str = CLIP_MODEL_NAME, seed: int = 0) -> Dict[str, torch.Tensor]:
    """open_clip ``model_name`` (quick_gelu, its own random init) as OpenAI's archive holds it."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=True)
    state = {k: v.detach().to(_openai_dtype(k, v.shape)).clone() for k, v in model.state_dict().items()}
    for key, value in OPENAI_EXTRAS.items():
        state[key] = torch.tensor(value)
    return state


def scripted_archive(state: Dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A TorchScript module whose ``state_dict()`` is ``state`` (same keys, shapes and dtypes)."""
    root = _Holder()
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        if tensor.is_floating_point():
            node.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
        else:
            node.register_buffer(leaf, tensor)
    return torch.jit.script(root)


def build_clip_vit_b_16(path: Path, seed: int = 0) -> Path:
    """Write open_clip ViT-B-16 with random weights as OpenAI's TorchScript ``ViT-B-16.pt``."""
    archive = scripted_archive(openai_clip_state_dict(CLIP_MODEL_NAME, seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.jit.save(archive, str(tmp))
    tmp.replace(path)
    return path


def standin_checkpoints(directory: Path) -> Dict[str, Path]:
    """``{"sam": .../sam_vit_b_01ec64.pth, "clip": .../ViT-B-16.pt}`` in ``directory``, building the
    missing ones (``ALIGNSAM_DRILL_STANDINS`` overrides ``directory``, so they outlive the session)."""
    directory = Path(os.environ.get("ALIGNSAM_DRILL_STANDINS") or directory)
    sam, clip = directory / SAM_VIT_B_NAME, directory / CLIP_VIT_B_16_NAME
    if not sam.is_file():
        build_sam_vit_b(sam)
    if not clip.is_file():
        build_clip_vit_b_16(clip)
    return {"sam": sam, "clip": clip}


SAM2_1_HIERA_T_NAME = "sam2.1_hiera_tiny.pt"
SAM2_1_HIERA_T_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def build_sam2_1_hiera_t(path: Path, seed: int = 0) -> Path:
    """Write SAM 2.1 Hiera-T with random weights as Meta's ``sam2.1_hiera_tiny.pt`` (``{"model":
    state dict}``, ~156 MB), from the sam2 package's own config and builder (needs the sam2 extra)."""
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(SAM2_1_HIERA_T_CONFIG, ckpt_path=None, device="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"model": model.state_dict()}, tmp)
    tmp.replace(path)
    return path


def sam2_standin_checkpoint(directory: Path) -> Path:
    """``.../sam2.1_hiera_tiny.pt`` in ``directory`` (or ``ALIGNSAM_DRILL_STANDINS``), built when missing."""
    path = Path(os.environ.get("ALIGNSAM_DRILL_STANDINS") or directory) / SAM2_1_HIERA_T_NAME
    if not path.is_file():
        build_sam2_1_hiera_t(path)
    return path


# -- stand-in datasets: tiny trees in the real layouts, with the real datasets' quirks -------------
HW = (72, 96)           # (h, w) of the landscape images
PORTRAIT_HW = (96, 72)  # one image per evaluation split is portrait, as in every real dataset
# quirk of each image, by position in its split: the few-shot draw (train_size 4, subset_seed 0)
# takes train images 1-4 of 6, so each quirk is on one of them; every test image is evaluated
TRAIN_QUIRKS = ("plain", "grey_jpeg", "palette_mask", "rgb_mask", "palette_mask+antialiased", "antialiased")
TEST_QUIRKS = ("grey_jpeg+rgb_mask", "palette_mask+antialiased", "portrait")
# stems in each dataset's own style, distinct between splits (train images inside an evaluation
# split are refused)
STEM_STYLE = {"cuhk_dbd": {"train": "out_of_focus{:04d}", "test": "motion{:04d}", "test_dut": "dut_{:04d}"},
              "sbu": {"train": "lssd{}", "test": "lssd_test{}"},
              "gdd": {"train": "{:d}", "test": "{:d}_t"},
              "duts": {"train": "ILSVRC2012_test_{:08d}", "test": "sun_a{:05d}"}}


def _antialias(mask: np.ndarray) -> np.ndarray:
    """0/255 uint8 with a soft 1-2 px edge (a 3x3 box blur), as resized or hand-drawn masks have."""
    grey = mask.astype(np.float32) * 255
    padded = np.pad(grey, 1, mode="edge")
    blurred = sum(padded[dy:dy + grey.shape[0], dx:dx + grey.shape[1]] for dy in range(3) for dx in range(3)) / 9
    return np.round(blurred).astype(np.uint8)


def _write_mask(path: Path, mask: np.ndarray, quirk: str) -> None:
    grey = _antialias(mask) if "antialiased" in quirk else mask.astype(np.uint8) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    if "palette_mask" in quirk and "antialiased" in quirk:  # a palette of greys, index = grey level
        im = Image.fromarray(grey, mode="P")
        im.putpalette([v for g in range(256) for v in (g, g, g)])
        im.save(path)
    elif "palette_mask" in quirk:  # indices 0/1 with a black/white palette
        im = Image.fromarray((grey > 127).astype(np.uint8), mode="P")
        im.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
        im.save(path)
    elif "rgb_mask" in quirk:
        Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB").save(path)
    else:
        Image.fromarray(grey, mode="L").save(path)


def _write_photo(path: Path, image: np.ndarray, quirk: str) -> None:
    if "grey_jpeg" in quirk:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("L").save(path, quality=95)
    else:
        write_image(path, image)


def write_binary_tree(root: Path, preset: str, n_train: int = 6, n_test: int = 3) -> Dict[str, list]:
    """Write ``preset``'s layout (``fixture_trees.REAL_LAYOUTS``) under ``root``; returns ``{split: stems}``."""
    written: Dict[str, list] = {}
    for split, (image_dir, mask_dir) in REAL_LAYOUTS[preset].items():
        quirks = TRAIN_QUIRKS[:n_train] if split == "train" else TEST_QUIRKS[:n_test]
        stems = []
        for i, quirk in enumerate(quirks):
            stem = STEM_STYLE[preset][split].format(100 + i)
            hw = PORTRAIT_HW if quirk == "portrait" else HW
            mask = mask_for(f"{preset}/{stem}", hw)
            _write_photo(root / image_dir / f"{stem}.jpg", image_for(mask, f"{preset}/{stem}"), quirk)
            _write_mask(root / mask_dir / f"{stem}.png", mask, quirk)
            stems.append(stem)
        written[split] = stems
    return written


# VOC: (image id, classes present); the val images show a class no train image shows (diningtable)
VOC_TRAIN = (("2007_000032", (1, 15)), ("2007_000039", (8,)), ("2007_000063", (9, 15)),
             ("2007_000068", (7,)), ("2007_000121", (12,)), ("2007_000123", (12, 15)))
VOC_VAL = (("2007_000033", (15,)), ("2007_000042", (8, 12)), ("2007_000061", (11,)))
VOC_UNLABELLED = ("2008_000001", "2008_000002")  # in JPEGImages, in no split, without labels


def write_voc_tree(root: Path, voc_dir: str = "VOCdevkit/VOC2012") -> Dict[str, list]:
    """VOC2012 as extracted: JPEGImages (with images outside any split), SegmentationClass palette
    PNGs of class ids with 255 (void) borders, ImageSets/Segmentation/{train,val}.txt."""
    base = root / voc_dir
    written: Dict[str, list] = {}
    for split, entries in (("train", VOC_TRAIN), ("val", VOC_VAL)):
        for i, (image_id, classes) in enumerate(entries):
            hw = PORTRAIT_HW if (split, i) == ("val", 2) else HW
            label_map = voc_label_map(image_id, classes, hw)
            quirk = "grey_jpeg" if i == 1 else "plain"  # a drawn train image, a val image
            _write_photo(base / "JPEGImages" / f"{image_id}.jpg",
                         image_for(np.isin(label_map, classes), image_id), quirk)
            write_palette_png(base / "SegmentationClass" / f"{image_id}.png", label_map)
        split_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("".join(f"{image_id}\n" for image_id, _ in entries))
        written[split] = [image_id for image_id, _ in entries]
    for image_id in VOC_UNLABELLED:
        write_image(base / "JPEGImages" / f"{image_id}.jpg", image_for(mask_for(image_id, HW), image_id))
    return written
