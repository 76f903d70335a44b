"""Quality of a tiny SAM on held-out scenes: IoU after each simulated click, per region kind.

Protocol: every connected region (>= ``min_area`` px) of ``scenes_per_task`` test-split scenes of
each task; click 1 at the region's interior point (positive); clicks 2..K from the standard
click simulator (interior of the largest error region, labelled by the ground truth). SAM's
single-mask output is scored (the output the prompting environment uses), without mask input.

Union targets (on by default; ``--no-unions`` leaves them out) are scored the same way, in the same
scenes, as rows of their own below the region rows (which, and whose "all" rows, stay as they were):
every multi-component union of a scene (all its shadows, all its blurred areas, all its panes, all
instances of one category; :func:`alignsam.pretrain.regions.union_targets`), the scene tasks' kind of
ground truth. Click 1 lands at the union's interior point, so in one of its pieces.

    python -m alignsam.pretrain.evaluate_tiny_sam --checkpoint checkpoints/tiny_sam.pt
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Dict, List, Sequence

import numpy as np
import torch

from alignsam.clicks import interior_point, oracle_next_click
from alignsam.data.scenes import REGION_KINDS, SPLIT_SEED_BASE, TASKS, render_scene
from alignsam.foundation.segmenter import Segmenter
from alignsam.foundation.registry import build_segmenter
from alignsam.geometry import MASK_LOGIT_THRESHOLD, original_to_sam_points
from alignsam.losses import mask_iou
from alignsam.pretrain.regions import UNION_KINDS, region_components, union_targets


@torch.no_grad()
def click_curves(
    segmenter: Segmenter,
    scenes_per_task: int = 40,
    clicks: int = 6,
    min_area: int = 150,
    max_regions_per_scene: int = 8,
    split: str = "test",
    tasks: Sequence[str] = TASKS,
    chunk: int = 8,
    unions: bool = False,
) -> Dict[str, np.ndarray]:
    """IoU after each click for every evaluated region, grouped by region kind.

    Args:
        unions: also score the scenes' union targets, under keys ``union_<kind>`` (``UNION_KINDS``).
    Returns:
        ``{kind: (n_regions, clicks + 1) float array}``: IoU after clicks 1..K with the single-mask
        output, then after click 1 with the multimask output SAM rates best (its own 1-click practice).
    """
    curves: Dict[str, List[np.ndarray]] = defaultdict(list)
    seeds = [(task, SPLIT_SEED_BASE[split] + i) for task in tasks for i in range(scenes_per_task)]
    for start in range(0, len(seeds), chunk):
        scenes = [render_scene(task, seed) for task, seed in seeds[start : start + chunk]]
        embedded = segmenter.embed([s.image for s in scenes])
        target_sets = [[region_components(scene, min_area)[:max_regions_per_scene] for scene in scenes]]
        if unions:  # decoded apart, so that the region rows do not depend on this option
            target_sets.append([[(f"union_{kind}", mask) for kind, mask in union_targets(scene, min_area)]
                                for scene in scenes])
        for per_scene in target_sets:
            owners = [i for i, targets in enumerate(per_scene) for _ in targets]
            kinds = [kind for targets in per_scene for kind, _ in targets]
            gts = [mask for targets in per_scene for _, mask in targets]
            if not gts:
                continue
            ious = _click_sequence(segmenter, embedded, owners, gts, clicks)
            for kind, row in zip(kinds, ious):
                curves[kind].append(row)
    return {k: np.stack(v) for k, v in curves.items()}


def _click_sequence(segmenter, embedded, owners: List[int], gts: List[np.ndarray], clicks: int) -> np.ndarray:
    """Run the click protocol on regions ``gts`` of images ``owners``; IoU ``(N, clicks + 1)``."""
    index = torch.tensor(owners)
    embeddings = embedded.embeddings[index]
    original_hw = embedded.original_hw[index]
    points: List[List[tuple]] = [[interior_point(gt) + (1,)] for gt in gts]
    ious = np.zeros((len(gts), clicks + 1))  # last column: first click, SAM's multimask pick
    first_xy = original_to_sam_points(torch.tensor([[row[0][:2]] for row in points], dtype=torch.float32),
                                      original_hw, segmenter.img_size)
    multi, predicted = segmenter.decode(embeddings, first_xy, torch.ones(len(gts), 1, dtype=torch.long), multimask=True)
    picked = multi[torch.arange(len(gts)), predicted.argmax(1)]  # (N, h, w) highest predicted IoU
    for n, gt in enumerate(gts):
        pred = (segmenter.logits_to_original(picked[n][None], embedded, owners[n])[0] > MASK_LOGIT_THRESHOLD).numpy()
        ious[n, clicks] = _iou(pred, gt)
    for k in range(clicks):
        xy = torch.tensor([[p[:2] for p in row] for row in points], dtype=torch.float32)
        labels = torch.tensor([[p[2] for p in row] for row in points])
        low_res, _ = segmenter.decode(embeddings, original_to_sam_points(xy, original_hw, segmenter.img_size), labels)
        for n, gt in enumerate(gts):
            logits = segmenter.logits_to_original(low_res[n], embedded, owners[n])[0]
            pred = (logits > MASK_LOGIT_THRESHOLD).numpy()
            ious[n, k] = _iou(pred, gt)
            nxt = oracle_next_click(pred, gt)
            points[n].append(nxt if nxt is not None else points[n][-1])
    return ious


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two bool ``(H, W)`` arrays (empty union counts as 1, as in :func:`mask_iou`)."""
    return float(mask_iou(torch.from_numpy(pred), torch.from_numpy(gt)))


UNION_LABELS = {"union_object": "union: all instances of a category", "union_shadow": "union: all shadows",
                "union_pane": "union: all panes", "union_blur": "union: all blurred areas"}


def summarise(curves: Dict[str, np.ndarray]) -> str:
    """Markdown table: rows = region kinds and all, then union targets (if any) and their mean over
    targets; columns = mean IoU after each click. The "all" rows average the regions alone."""
    clicks = next(iter(curves.values())).shape[1] - 1
    header = ("| region | n | " + " | ".join(f"IoU@{k + 1}" for k in range(clicks))
              + " | IoU@1 multimask (best predicted) |")
    lines = [header, "|" + "---|" * (clicks + 3)]

    def row(label: str, mean: np.ndarray, n: int) -> None:
        lines.append(f"| {label} | {n} | " + " | ".join(f"{v:.3f}" for v in mean) + " |")

    kinds = [k for k in REGION_KINDS if k in curves]
    for kind in kinds:
        row(kind, curves[kind].mean(0), len(curves[kind]))
    if kinds:
        regions = np.concatenate([curves[k] for k in kinds])
        row("all (mean over regions)", regions.mean(0), len(regions))
        row("all (mean over kinds)", np.mean([curves[k].mean(0) for k in kinds], 0), len(regions))
    unions = [k for k in UNION_KINDS if k in curves]
    for kind in unions:
        row(UNION_LABELS[kind], curves[kind].mean(0), len(curves[kind]))
    if unions:
        targets = np.concatenate([curves[k] for k in unions])
        row("union: all (mean over targets)", targets.mean(0), len(targets))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/tiny_sam.pt")
    parser.add_argument("--scenes-per-task", type=int, default=40)
    parser.add_argument("--clicks", type=int, default=6)
    parser.add_argument("--split", default="test", choices=sorted(SPLIT_SEED_BASE))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--unions", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the scenes' multi-component union targets, as rows of their own")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = build_segmenter("tiny", args.checkpoint)
    curves = click_curves(segmenter, args.scenes_per_task, args.clicks, split=args.split, unions=args.unions)
    print(f"tiny SAM {args.checkpoint}: {args.scenes_per_task} {args.split} scenes per task, "
          f"single-mask output, click 1 at the region's interior point, then the standard click simulator")
    print(summarise(curves))


if __name__ == "__main__":
    main()
