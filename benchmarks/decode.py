"""Decoded masks per second: segment-anything's one-image-at-a-time predictor vs the batched path.

For each model and batch size B, the same B images (embeddings already computed, different original
sizes) and the same clicks are decoded three ways:

(a) ``SamPredictor.predict`` in a loop, one image at a time, as segment-anything is meant to be used
    (``SAM2ImagePredictor.predict`` for SAM 2, features set the same way).
    The image encoder never runs: each image's features are set on the predictor directly (a few
    attribute assignments, outside the timed region), and only the ``predict`` calls are timed. The
    predictor also upsamples each mask to its image's original size, part of its cost.
(b) The same prompt encoder and mask decoder called once per image, low-res output only: separates
    what batching gains from what skipping (a)'s upsampling and NumPy conversion gains.
(c) ``Segmenter.decode``: all B images in one call (clicks converted to SAM's frame included).

Weights are random unless checkpoints are given: the decoder's cost does not depend on their values.
Each figure is the median over ``--repeats`` timed passes after ``--warmup`` untimed ones.
``--embed`` also times each model's image encoder on one 640 x 480 image (``Segmenter.embed``).

    python benchmarks/decode.py                       # tiny and ViT-B, B in {8, 32}, 3 clicks, CPU
    python benchmarks/decode.py --device cuda --batch-sizes 8 32 128
    python benchmarks/decode.py --models sam2.1_hiera_t --embed   # SAM 2.1 Hiera-T (needs the sam2 extra)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from segment_anything import SamPredictor

from alignsam.foundation.segmenter import Segmenter
from alignsam.foundation.registry import build_segmenter
from alignsam.geometry import input_size_for, original_to_sam_points

# Original image sizes cycled over the batch (VOC-like for ViT-B, scene-like for the tiny model).
IMAGE_HW: Dict[str, List[Tuple[int, int]]] = {
    "tiny": [(256, 256), (192, 256), (256, 200), (240, 180)],
    "vit_b": [(375, 500), (500, 375), (480, 640), (500, 500)],
    "sam2.1_hiera_t": [(375, 500), (500, 375), (480, 640), (500, 500)],
}
EMBED_HW = (480, 640)  # --embed: one 640 x 480 image


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"], choices=sorted(IMAGE_HW))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32], help="images per decode call (B)")
    parser.add_argument("--clicks", type=int, default=3, help="clicks per image (first positive, the rest random)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--tiny-checkpoint", default=None, help="tiny SAM weights (default: random)")
    parser.add_argument("--vit-b-checkpoint", default=None, help="sam_vit_b_01ec64.pth (default: random)")
    parser.add_argument("--sam2-checkpoint", default=None, help="sam2.1_hiera_tiny.pt (default: random)")
    parser.add_argument("--embed", action="store_true", help="also time the image encoder on one 640 x 480 image")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(run_pass: Callable[[], float], warmup: int, repeats: int) -> float:
    """``run_pass`` returns the seconds it measured itself; median over ``repeats`` after ``warmup``."""
    for _ in range(warmup):
        run_pass()
    return statistics.median(run_pass() for _ in range(repeats))


def make_prompts(segmenter: Segmenter, batch: int, clicks: int, seed: int):
    """Embeddings ``(B, C, h, w)``, original sizes ``(B, 2)``, clicks ``(B, N, 2)`` (original frame), labels."""
    gen = torch.Generator().manual_seed(seed)
    sizes = IMAGE_HW[segmenter.name]
    original_hw = torch.tensor([sizes[i % len(sizes)] for i in range(batch)])
    channels = getattr(segmenter, "packed_channels", segmenter.embed_dim)  # SAM 2: + its high-res maps
    embeddings = torch.randn(batch, channels, *segmenter.embedding_hw, generator=gen) * 0.3
    points = torch.rand(batch, clicks, 2, generator=gen) * original_hw.flip(-1)[:, None, :].float()
    labels = torch.randint(0, 2, (batch, clicks), generator=gen)
    labels[:, 0] = 1
    return embeddings, original_hw, points, labels


def is_sam2(segmenter: Segmenter) -> bool:
    return hasattr(segmenter, "packed_channels")


def time_sam2_predictor_loop(segmenter: Segmenter, embeddings, original_hw, points, labels, device) -> float:
    """(a) for SAM 2: seconds inside ``SAM2ImagePredictor.predict`` for one pass over the B images."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(segmenter.sam)
    points_np, labels_np = points.numpy(), labels.numpy()
    total = 0.0
    for i in range(embeddings.shape[0]):
        image_embed, high_res = segmenter.unpack(embeddings[i : i + 1])
        predictor._features = {"image_embed": image_embed, "high_res_feats": high_res}
        predictor._orig_hw = [tuple(original_hw[i].tolist())]
        predictor._is_image_set = True
        synchronize(device)
        start = time.perf_counter()
        predictor.predict(points_np[i], labels_np[i], multimask_output=False, return_logits=True)
        synchronize(device)
        total += time.perf_counter() - start
    return total


def time_predictor_loop(segmenter: Segmenter, embeddings, original_hw, points, labels, device) -> float:
    """(a) seconds spent inside ``SamPredictor.predict`` for one pass over the B images."""
    if is_sam2(segmenter):
        return time_sam2_predictor_loop(segmenter, embeddings, original_hw, points, labels, device)
    predictor = SamPredictor(segmenter.sam)
    points_np, labels_np = points.numpy(), labels.numpy()
    total = 0.0
    for i in range(embeddings.shape[0]):
        hw = tuple(original_hw[i].tolist())
        predictor.features = embeddings[i : i + 1]
        predictor.original_size = hw
        predictor.input_size = input_size_for(hw, segmenter.img_size)
        predictor.is_image_set = True
        synchronize(device)
        start = time.perf_counter()
        predictor.predict(points_np[i], labels_np[i], multimask_output=False, return_logits=True)
        synchronize(device)
        total += time.perf_counter() - start
    return total


@torch.no_grad()
def time_decoder_per_image(segmenter: Segmenter, embeddings, sam_points, labels, device) -> float:
    """(b) seconds for the prompt encoder + mask decoder called once per image (low-res only)."""
    if is_sam2(segmenter):
        return time_sam2_decoder_per_image(segmenter, embeddings, sam_points, labels, device)
    sam = segmenter.sam
    image_pe = sam.prompt_encoder.get_dense_pe()
    synchronize(device)
    start = time.perf_counter()
    for i in range(embeddings.shape[0]):
        sparse, dense = sam.prompt_encoder(points=(sam_points[i : i + 1], labels[i : i + 1]), boxes=None, masks=None)
        sam.mask_decoder(embeddings[i : i + 1], image_pe, sparse, dense, multimask_output=False)
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_sam2_decoder_per_image(segmenter: Segmenter, embeddings, sam_points, labels, device) -> float:
    """(b) for SAM 2: its prompt encoder + mask decoder once per image (unpacking included)."""
    sam = segmenter.sam
    image_pe = sam.sam_prompt_encoder.get_dense_pe()
    synchronize(device)
    start = time.perf_counter()
    for i in range(embeddings.shape[0]):
        image_embed, high_res = segmenter.unpack(embeddings[i : i + 1])
        sparse, dense = sam.sam_prompt_encoder(points=(sam_points[i : i + 1], labels[i : i + 1]), boxes=None, masks=None)
        sam.sam_mask_decoder(image_embed, image_pe, sparse, dense, multimask_output=False, repeat_image=False,
                             high_res_features=high_res)
    synchronize(device)
    return time.perf_counter() - start


def time_embed(segmenter: Segmenter, device: torch.device, seed: int) -> float:
    """Seconds for ``Segmenter.embed`` of one :data:`EMBED_HW` image (preprocessing included)."""
    import numpy as np

    image = np.random.default_rng(seed).integers(0, 256, (*EMBED_HW, 3), dtype=np.uint8)
    synchronize(device)
    start = time.perf_counter()
    segmenter.embed([image])
    synchronize(device)
    return time.perf_counter() - start


def time_batched(segmenter: Segmenter, embeddings, original_hw, points, labels, device) -> float:
    """(c) seconds for one ``Segmenter.decode`` call over all B images."""
    synchronize(device)
    start = time.perf_counter()
    sam_points = original_to_sam_points(points, original_hw, segmenter.img_size)
    segmenter.decode(embeddings, sam_points, labels)
    synchronize(device)
    return time.perf_counter() - start


def benchmark_model(name: str, checkpoint: Optional[str], args, device: torch.device) -> List[dict]:
    torch.manual_seed(args.seed)
    segmenter = build_segmenter(name, checkpoint).to(device)
    rows, embed_s = [], None
    if args.embed:
        embed_s = median_seconds(lambda: time_embed(segmenter, device, args.seed), args.warmup, args.repeats)
        print(f"  embed: {name} {EMBED_HW[1]}x{EMBED_HW[0]} image in {embed_s:.2f} s", flush=True)
    for batch in args.batch_sizes:
        embeddings, original_hw, points, labels = make_prompts(segmenter, batch, args.clicks, args.seed)
        embeddings, points, labels = embeddings.to(device), points.to(device), labels.to(device)
        sam_points = original_to_sam_points(points, original_hw, segmenter.img_size)
        cpu_points, cpu_labels = points.cpu(), labels.cpu()
        seconds = {
            "predictor": median_seconds(
                lambda: time_predictor_loop(segmenter, embeddings, original_hw, cpu_points, cpu_labels, device),
                args.warmup, args.repeats,
            ),
            "per_image": median_seconds(
                lambda: time_decoder_per_image(segmenter, embeddings, sam_points, labels, device),
                args.warmup, args.repeats,
            ),
            "batched": median_seconds(
                lambda: time_batched(segmenter, embeddings, original_hw, points, labels, device),
                args.warmup, args.repeats,
            ),
        }
        rate = {key: batch / value for key, value in seconds.items()}
        rows.append({
            "model": name + ("" if checkpoint else " (random weights)"),
            "B": batch,
            **rate,
            "ratio": rate["batched"] / rate["predictor"],
            "embed_s": embed_s,
        })
        print(f"  done: {name} B={batch}", flush=True)
    return rows


def markdown_table(rows: List[dict], clicks: int) -> str:
    lines = [
        "| model | B | clicks | (a) SamPredictor / SAM2ImagePredictor .predict loop, masks/s | (b) decoder one image a call, masks/s "
        "| (c) batched Segmenter.decode, masks/s | (c) / (a) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['B']} | {clicks} | {row['predictor']:.1f} | {row['per_image']:.1f} "
            f"| {row['batched']:.1f} | {row['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                what = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    load = "n/a"
    if hasattr(os, "getloadavg"):
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"device {device} ({what}); {os.cpu_count()} CPU cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {load}"
    )


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_description(device), flush=True)
    checkpoints = {"tiny": args.tiny_checkpoint, "vit_b": args.vit_b_checkpoint, "sam2.1_hiera_t": args.sam2_checkpoint}
    rows = []
    for name in args.models:
        rows += benchmark_model(name, checkpoints[name], args, device)
    print()
    print(markdown_table(rows, args.clicks))
    if args.embed:
        print(f"\nImage encoder, one {EMBED_HW[1]}x{EMBED_HW[0]} image (Segmenter.embed, preprocessing included):")
        seen = {}
        for row in rows:
            seen.setdefault(row["model"], row["embed_s"])
        for model, seconds in seen.items():
            print(f"  {model}: {seconds:.2f} s")
    print(
        f"\nMedian of {args.repeats} passes after {args.warmup} warm-up; (a) includes SAM's upsampling of each "
        f"mask to its original size, (b) and (c) stop at the low-res logits. Load average at the end: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'}."
    )
    return rows


if __name__ == "__main__":
    main()
