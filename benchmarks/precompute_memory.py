"""Peak resident memory of filling the feature cache, per ``encode_chunk`` (images per embed call).

Every setting runs in a fresh child process, since ``ru_maxrss`` is a high-water mark that never
goes down. The child builds the segmenter (random weights: memory and time do not depend on them),
makes ``--images`` random uint8 images, notes its peak RSS so far ("before"), runs
:func:`alignsam.data.precompute.precompute_splits` on the CPU into an empty temporary cache, and
reports its peak RSS and the seconds per image. Usage::

    python benchmarks/precompute_memory.py --segmenter tiny --images 8 --chunks 1 2 4 8
    python benchmarks/precompute_memory.py --segmenter vit_b --images 2 --chunks 1 2

Prints a Markdown table: encoder, chunk, images, RSS before embedding, peak RSS (GiB), s/image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
GIB_PER_KIB = 1.0 / 2**20  # Linux reports ru_maxrss in KiB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * GIB_PER_KIB


def child(args: argparse.Namespace) -> None:
    """One setting: print ``{"before", "peak", "s_per_image"}`` as one JSON line."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from alignsam.data.features import FeatureStore
    from alignsam.data.precompute import precompute_splits
    from alignsam.foundation.registry import build_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = build_segmenter(args.segmenter)
    rng = np.random.default_rng(0)
    samples = [{"id": str(i), "image": rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)}
               for i in range(args.images)]
    before = peak_rss_gib()
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        precompute_splits(segmenter, FeatureStore(cache, fsync=False), {"train": samples}, device="cpu",
                          encode_chunk=args.chunk, show_progress=False)
        seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "peak": peak_rss_gib(), "s_per_image": seconds / args.images,
                      "threads": torch.get_num_threads()}))


def run_setting(args: argparse.Namespace, chunk: int) -> Dict[str, float]:
    command = [sys.executable, __file__, "--child", "--segmenter", args.segmenter, "--images", str(args.images),
               "--chunk", str(chunk), "--height", str(args.height), "--width", str(args.width),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"chunk {chunk}: the child failed (status {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segmenter", default="tiny", help="registry name: tiny, vit_b, vit_l, vit_h")
    parser.add_argument("--images", type=int, default=8, help="images embedded per setting")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8], help="encode_chunk values")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    rows = [(chunk, run_setting(args, chunk)) for chunk in args.chunks]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{rows[0][1]['threads']}, images {args.height}x{args.width} (SAM resizes them to its input size)\n")
    print("| encoder | chunk | images | RSS before embedding (GiB) | peak RSS (GiB) | s/image |")
    print("|---|---:|---:|---:|---:|---:|")
    for chunk, r in rows:
        print(f"| {args.segmenter} | {chunk} | {args.images} | {r['before']:.2f} | {r['peak']:.2f} | {r['s_per_image']:.2f} |")


if __name__ == "__main__":
    main()
