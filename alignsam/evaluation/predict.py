"""Writing an agent's predictions: ``evaluate.py --save_predictions DIR`` on a dataset split, and
``evaluate.py predict`` on a folder of new images (no ground truth).

Both write, per episode, ``DIR/masks/<stem>.png`` (the mask at the image's original resolution)
and ``DIR/overlays/<stem>.png`` (the mask and the numbered clicks over the image), through
:mod:`alignsam.evaluation.writer`; the semantic tasks also get one label map per image under
``DIR/label_maps/``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch

from alignsam.evaluation.images import iter_images, list_images, output_stems
from alignsam.evaluation.writer import save_binary_prediction, save_label_map_prediction
from alignsam.geometry import sam_to_original_points

log = logging.getLogger(__name__)


def safe_stem(text: str) -> str:
    """A file-name-safe stem from an episode id (``voc/2007_000032/cat`` -> ``voc_2007_000032_cat``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "episode"
    return stem[:120]


def _clicks_in_original_frame(points, labels, embedded, segmenter):
    """SAM-frame prompts ``(B, n, 2)``, ``(B, n)`` -> numpy ``(x, y)`` in each original frame, labels."""
    points = sam_to_original_points(points.float(), embedded.original_hw, segmenter.img_size)
    return points.cpu().numpy(), labels.cpu().numpy()


class PredictionSaver:
    """The evaluator's hook for the agent's predictions on a dataset split (``--save_predictions``).

    Besides the PNGs it keeps one row per episode for ``DIR/episodes.csv``: the episode id, its
    text, the IoU after each click (``iou@0`` = after the seed prompts) and every click as
    ``x y label`` in the original frame, separated by ``;``.
    """

    def __init__(self, out_dir: str, segmenter) -> None:
        self.out_dir = Path(out_dir)
        self.segmenter = segmenter
        self.written = 0
        self.episodes_csv = self.out_dir / "episodes.csv"
        self._rows: List[List[str]] = []
        self._clicks = 0
        self._images: Dict[str, object] = {}  # image_id -> image, for the semantic tasks' label maps

    def __call__(self, batch: List[Dict], embedded, outcome, logits: List[torch.Tensor]) -> None:
        points, labels = _clicks_in_original_frame(outcome.points, outcome.labels, embedded, self.segmenter)
        ious = outcome.curve.ious.cpu().numpy() if outcome.curve is not None else None  # (R, B)
        for i, sample in enumerate(batch):
            keep = labels[i] >= 0
            save_binary_prediction(self.out_dir, safe_stem(sample["id"]), sample["image"], logits[i].cpu(),
                                   points[i][keep], labels[i][keep])
            self.written += 1
            clicks = "; ".join(f"{x:.1f} {y:.1f} {int(l)}" for (x, y), l in zip(points[i][keep], labels[i][keep]))
            curve = [] if ious is None else [f"{v:.6f}" for v in ious[:, i]]
            self._clicks = max(self._clicks, len(curve))
            self._rows.append([str(sample["id"]), str(sample.get("text", "")), *curve, clicks])
            if "label_map" in sample:
                self._images.setdefault(str(sample["image_id"]), sample["image"])

    def write_episodes_csv(self) -> Path:
        """``episodes.csv``: id, text, iou@0..iou@T, clicks (atomic write)."""
        import csv
        import io

        from alignsam.atomic import write_text_atomic

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "text", *[f"iou@{k}" for k in range(self._clicks)], "clicks (x y label; ...)"])
        for row in self._rows:
            *head, clicks = row
            writer.writerow(head + [""] * (2 + self._clicks - len(head)) + [clicks])
        return write_text_atomic(self.episodes_csv, buffer.getvalue())

    def finish(self, evaluator) -> None:
        """The per-episode CSV, and the semantic tasks' label maps assembled over all of an image's
        episodes."""
        self.write_episodes_csv()
        if not evaluator.scores.semantic:
            return
        assembler = evaluator.scores.assemblers["agent"]
        preds, _ = assembler.label_maps()
        for image_id, pred in zip(assembler.image_ids(), preds):
            save_label_map_prediction(self.out_dir / "label_maps", safe_stem(image_id), self._images[image_id], pred.numpy())


# -- evaluate.py predict: a folder of new images ---------------------------------------------------
@torch.no_grad()
def predict_folder(predictor, images_dir: str, out_dir: str, text: Optional[str] = None, batch_size: int = 8):
    """Run an :class:`~alignsam.api.AlignSAMPredictor` on every readable image of ``images_dir``;
    returns ``(written, failures)`` with failures a list of ``(path, reason)`` for the files that
    could not be read (they are skipped)."""
    paths = list_images(images_dir)
    stems = output_stems(paths)
    written, failures, pending = 0, [], []

    def flush() -> int:
        if not pending:
            return 0
        ids = [stems[r.path] for r in pending]
        results = predictor.predict_batch([r.image for r in pending], [text] * len(pending), ids)
        for read, stem, result in zip(pending, ids, results):
            save_binary_prediction(out_dir, stem, read.image, torch.from_numpy(result.logits), result.clicks, result.labels)
            log.info("%s -> %s", read.path, stem)
        count = len(pending)
        pending.clear()
        return count

    for result in iter_images(paths):
        if not result.ok:
            failures.append((result.path, result.error))
            continue
        pending.append(result)
        if len(pending) == batch_size:
            written += flush()
    written += flush()
    return written, failures
