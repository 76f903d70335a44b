"""Run a trained AlignSAM agent on your own images from Python.

In the spirit of segment-anything's ``SamPredictor``::

    from alignsam import AlignSAMPredictor

    predictor = AlignSAMPredictor.from_checkpoint("logs/demo/version_0/checkpoints/last.ckpt")
    result = predictor.predict("photo.jpg")              # a path, a PIL image or a uint8 (H, W, 3) array
    result.mask                                          # bool (H, W) at the image's own size
    result.clicks, result.labels                         # (n, 2) (x, y) pixels and (n,) 1 / 0, in order
    result.masks_per_click                               # bool (T + 1, H, W): after the seed prompts, then each click

The semantic tasks (``voc``, ``categories``) need the class to segment: ``predict(image, text="cat")``;
the binary tasks default to their own word (``shadow``, ``glass``, ...). Nothing is downloaded: the
checkpoint names the frozen SAM (and CLIP) files, found from any working directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from alignsam.agent import Agent
from alignsam.errors import UserError
from alignsam.evaluation.scoring import original_logits
from alignsam.geometry import MASK_LOGIT_THRESHOLD, sam_to_original_points

ImageLike = Union[str, Path, Image.Image, np.ndarray]


class PredictionInputError(UserError, ValueError):
    """An image or text the predictor cannot take (the message says which and why)."""


@dataclass
class Prediction:
    """The agent's episode on one image (every array at the image's original size).

    mask ``(H, W)`` bool, the final mask; logits ``(H, W)`` float32 SAM's final logits (mask =
    logits > 0); clicks ``(n, 2)`` float32 ``(x, y)`` pixel coordinates of every prompt in order (the
    SRM's seed prompts first, then the agent's T clicks); labels ``(n,)`` int64, 1 positive, 0
    negative; masks_per_click ``(T + 1, H, W)`` bool, the mask after the seed prompts and after each
    click; text the episode's text.
    """

    mask: np.ndarray
    logits: np.ndarray
    clicks: np.ndarray
    labels: np.ndarray
    masks_per_click: np.ndarray
    text: str


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """A path, PIL image or array -> uint8 ``(H, W, 3)`` RGB (EXIF orientation applied for files)."""
    from alignsam.evaluation.images import ImageReadError, _to_rgb, read_image

    if isinstance(image, (str, Path)):
        try:
            return read_image(image)
        except ImageReadError as error:
            raise PredictionInputError(str(error)) from None
    if isinstance(image, Image.Image):
        return _to_rgb(image.copy(), Path("<PIL image>"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise PredictionInputError(f"expected a uint8 (H, W, 3) RGB array, got {array.dtype} {array.shape}")
    return np.ascontiguousarray(array)


def default_text(task: str, text: Optional[str]) -> str:
    """The episode text: ``text``, else the task's own word (binary tasks only)."""
    from alignsam.tasks import task_record

    if text:
        return text
    record = task_record(task)
    if record.semantic:
        raise PredictionInputError(f"a text is required for the {task} task: the class to segment (--text cat on the command line, text='cat' in Python)")
    return record.default_text or task


class AlignSAMPredictor:
    """A trained agent ready to run on images (greedy episodes, T clicks after the seed prompts).

    Args:
        agent: an :class:`~alignsam.agent.Agent` (e.g. ``AlignSAMPredictor.from_checkpoint(...)``).
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent.eval()

    @classmethod
    def from_checkpoint(cls, ckpt_path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                        segmenter_checkpoint: Optional[str] = None,
                        feature_cache: Optional[str] = None) -> "AlignSAMPredictor":
        """Load a ``train.py`` checkpoint (``.../checkpoints/last.ckpt``), from any working directory.

        Args:
            segmenter_checkpoint: SAM's weights file, when not where the checkpoint says.
            feature_cache: where image embeddings are cached (default: the run's own cache).
        """
        overrides = {}
        if segmenter_checkpoint:
            stored = Agent.stored_segmenter(ckpt_path)
            overrides["segmenter"] = {**stored, "checkpoint": segmenter_checkpoint}
        if feature_cache:
            overrides["feature_cache"] = feature_cache
        return cls(Agent.from_checkpoint(ckpt_path, device, **overrides))

    @property
    def task(self) -> str:
        return self.agent.task

    def predict(self, image: ImageLike, text: Optional[str] = None) -> Prediction:
        """One image (a path, a PIL image or a uint8 ``(H, W, 3)`` array) -> :class:`Prediction`."""
        return self.predict_batch([image], [text])[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageLike], texts: Optional[Sequence[Optional[str]]] = None,
                      ids: Optional[Sequence[str]] = None) -> List[Prediction]:
        """Several images in one batched episode (one text per image, or None for the default)."""
        texts = list(texts) if texts is not None else [None] * len(images)
        if len(texts) != len(images):
            raise PredictionInputError(f"{len(texts)} texts for {len(images)} images")
        arrays = [as_rgb_array(image) for image in images]
        ids = list(ids) if ids is not None else [f"image{i}" for i in range(len(arrays))]
        samples = [{"image": a, "text": default_text(self.task, t), "id": i, "image_id": i}
                   for a, t, i in zip(arrays, texts, ids)]
        agent = self.agent
        episodes, embedded = agent.prepare(samples, with_gt=False)
        rollout = agent.rollout(episodes, training=False, greedy=True)
        clicks = sam_to_original_points(rollout.points.float(), embedded.original_hw, agent.segmenter.img_size)
        final = original_logits(agent.segmenter, rollout.final_logits, embedded)
        steps = [original_logits(agent.segmenter, step, embedded) for step in rollout.step_logits]
        results = []
        for i, sample in enumerate(samples):
            keep = (rollout.point_labels[i] >= 0).cpu()
            logits = final[i].float().cpu()
            results.append(Prediction(
                mask=(logits > MASK_LOGIT_THRESHOLD).numpy(),
                logits=logits.numpy(),
                clicks=clicks[i].cpu()[keep].numpy().astype(np.float32),
                labels=rollout.point_labels[i].cpu()[keep].numpy().astype(np.int64),
                masks_per_click=np.stack([(step[i].cpu() > MASK_LOGIT_THRESHOLD).numpy() for step in steps]),
                text=sample["text"],
            ))
        return results
