"""Look at the bundled world and check that it tests alignment.

* a contact sheet (PNG): per task, scenes with their target drawn over them;
* per task, the IoU with the target of the tiny SAM's mask after one click at the image centre,
  at a uniform random point, and at the target (interior of its largest part). Centre and random
  clicks must be clearly worse than a click on the target, or the task needs no alignment.

    python -m alignsam.data.scene_report --sheet docs/images/scenes.png --checkpoint checkpoints/tiny_sam.pt
    python -m alignsam.data.scene_report --world hard --sheet docs/images/scenes_hard.png

The gap between the training-free strategies and the oracle is :mod:`alignsam.data.scene_gaps`.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import cv2
import numpy as np
import torch

from alignsam.clicks import interior_point
from alignsam.data.scenes import SPLIT_SEED_BASE, TASKS, WORLDS, SceneConfig, render_scene
from alignsam.foundation.segmenter import Segmenter
from alignsam.foundation.registry import build_segmenter
from alignsam.geometry import MASK_LOGIT_THRESHOLD, original_to_sam_points
from alignsam.losses import mask_iou

OVERLAY_RGB = np.array([255, 40, 200], np.float32)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``image`` uint8 ``(H, W, 3)`` with ``mask`` tinted and outlined."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * OVERLAY_RGB
    edge = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    out[edge] = 255
    return out.astype(np.uint8)


def episodes(task: str, count: int, split: str = "test",
             world: str = "standard") -> Iterator[Tuple[np.ndarray, np.ndarray, str]]:
    """``(image, target, text)`` of the first ``count`` scenes of a split (every category of a scene)."""
    for i in range(count):
        scene = render_scene(task, SPLIT_SEED_BASE[split] + i, SceneConfig(world=world))
        if task == "categories":
            for name in scene.categories_present():
                yield scene.image, scene.target(name), name
        else:
            yield scene.image, scene.target(), task


def contact_sheet(path: Path, per_task: int = 6, tile: int = 128, tasks: Sequence[str] = TASKS,
                  world: str = "standard") -> None:
    """Write a PNG grid: one row per task, ``per_task`` scenes (``tile`` px) with their targets."""
    rows = []
    for task in tasks:
        tiles = [cv2.resize(np.concatenate([image, overlay(image, target)], 0), (tile, 2 * tile),
                            interpolation=cv2.INTER_AREA)
                 for image, target, _ in list(episodes(task, per_task, "val", world))[:per_task]]
        row = np.concatenate(tiles, 1)
        label = np.full((row.shape[0], 120, 3), 255, np.uint8)
        cv2.putText(label, task, (6, row.shape[0] // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([label, row], 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))


def piece_under(target: np.ndarray, xy: Tuple[float, float]) -> np.ndarray:
    """The connected component (8-connected) of bool ``target`` ``(H, W)`` at pixel ``xy`` = (x, y)."""
    _, labels = cv2.connectedComponents(target.astype(np.uint8), connectivity=8)
    label = labels[int(round(xy[1])), int(round(xy[0]))]
    return labels == label if label else np.zeros_like(target)


@torch.no_grad()
def one_click_ious(segmenter: Segmenter, task: str, count: int, seed: int = 0, world: str = "standard",
                   split: str = "test") -> Dict[str, float]:
    """Mean IoU with the target after one positive click: centre, uniform random, on the target
    (``target``), and for the click on the target also the IoU with the piece it lands in
    (``piece``: the target's connected component under the click; a target in several pieces
    caps ``target`` well below 1 even when SAM segments the clicked piece perfectly)."""
    rng = np.random.default_rng(seed)
    data = list(episodes(task, count, split, world))
    results: Dict[str, List[float]] = {"centre": [], "random": [], "target": [], "piece": []}
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        embedded = segmenter.embed([image for image, _, _ in chunk])
        clicks = {
            "centre": [(t.shape[1] / 2, t.shape[0] / 2) for _, t, _ in chunk],
            "random": [tuple(rng.uniform(0, 1, 2) * t.shape[::-1]) for _, t, _ in chunk],
            "target": [interior_point(t) for _, t, _ in chunk],
        }
        for name, xy in clicks.items():
            points = original_to_sam_points(torch.tensor(xy, dtype=torch.float32)[:, None], embedded.original_hw,
                                            segmenter.img_size)
            low_res, _ = segmenter.decode(embedded.embeddings, points, torch.ones(len(chunk), 1, dtype=torch.long))
            for i, (_, target, _) in enumerate(chunk):
                pred = (segmenter.logits_to_original(low_res[i], embedded, i)[0] > MASK_LOGIT_THRESHOLD).numpy()
                results[name].append(float(mask_iou(torch.from_numpy(pred), torch.from_numpy(target))))
                if name == "target":
                    piece = piece_under(target, xy[i])
                    results["piece"].append(float(mask_iou(torch.from_numpy(pred), torch.from_numpy(piece))))
    return {name: float(np.mean(values)) for name, values in results.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sheet", default="docs/images/scenes.png", help="contact sheet PNG to write ('' to skip)")
    parser.add_argument("--checkpoint", default="checkpoints/tiny_sam.pt", help="tiny SAM ('' to skip the table)")
    parser.add_argument("--scenes", type=int, default=50, help="test scenes per task for the table")
    parser.add_argument("--world", default="standard", choices=WORLDS, help="which world's scenes")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="scenes of the table")
    args = parser.parse_args(argv)
    if args.sheet:
        contact_sheet(Path(args.sheet), world=args.world)
        print(f"contact sheet written to {args.sheet}")
    if args.checkpoint:
        segmenter = build_segmenter("tiny", args.checkpoint)
        print(f"one positive click, tiny SAM {args.checkpoint}, {args.world} world, {args.scenes} {args.split} "
              f"scenes per task, mean IoU with the target")
        print("| task | centre click | random click | click on the target | same click, IoU with its piece |\n"
              "|---|---|---|---|---|")
        for task in TASKS:
            r = one_click_ious(segmenter, task, args.scenes, world=args.world, split=args.split)
            print(f"| {task} | {r['centre']:.3f} | {r['random']:.3f} | {r['target']:.3f} | {r['piece']:.3f} |")


if __name__ == "__main__":
    main()
