"""Computing a SAM embedding vs reading it back from the feature cache.

For the tiny SAM and the ViT-B architecture (random weights: the timing does not depend on them),
times per image:

* ``embed``: ``Segmenter.embed`` (SAM preprocessing + image encoder);
* ``miss``: ``FeatureStore.embeddings`` on an empty store (embed + fp16 cast + atomic fsynced write);
* ``hit``: ``FeatureStore.embeddings`` on a filled store (hash the pixels, read, verify the checksum),
  with the entry in the OS page cache;
* ``hit, evicted``: the same after asking the kernel to drop the entry files from the page cache
  (``posix_fadvise DONTNEED``), closer to a first read from disk.

A second table compares the entry format with ``torch.save``/``torch.load`` and ``np.save``/``np.load``
of the same embedding. Usage::

    python benchmarks/feature_cache.py [--skip-vitb] [--images 8] [--vitb-images 1]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignsam.data.feature_files import read_entry  # noqa: E402
from alignsam.data.features import EMBEDDING_KIND, FeatureStore  # noqa: E402
from alignsam.foundation.registry import build_segmenter  # noqa: E402


def seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evict_from_page_cache(paths: List[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def random_samples(n: int, hw: tuple, seed: int) -> List[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"bench{i}", "image": rng.integers(0, 256, (*hw, 3), dtype=np.uint8)} for i in range(n)]


def bench_model(name: str, n_images: int, hw: tuple, repeats: int, root: Path) -> Dict[str, float]:
    torch.manual_seed(0)
    segmenter = build_segmenter(name)
    samples = random_samples(n_images, hw, seed=1)
    images = [s["image"] for s in samples]
    segmenter.embed(images[:1])  # warm-up (allocator, kernels)
    embed = seconds(lambda: segmenter.embed(images), 1) / n_images

    store = FeatureStore(root / name)
    start = time.perf_counter()
    computed = store.embeddings(segmenter, samples, chunk_size=n_images)
    miss = (time.perf_counter() - start) / n_images
    hit = seconds(lambda: store.embeddings(segmenter, samples), repeats) / n_images
    read = store.embeddings(segmenter, samples)
    assert torch.equal(read.embeddings, computed.embeddings)

    paths = store.entry_paths(EMBEDDING_KIND)

    def evicted_read():
        evict_from_page_cache(paths)
        store.embeddings(segmenter, samples)

    hit_evicted = seconds(evicted_read, repeats) / n_images
    return {
        "model": name, "embedding": tuple(computed.embeddings.shape[1:]), "entry_kib": paths[0].stat().st_size / 1024,
        "embed": embed, "miss": miss, "hit": hit, "hit_evicted": hit_evicted, "path": paths[0],
    }


def _detects_flipped_byte(path: Path, load: Callable[[Path], object], reference: np.ndarray) -> bool:
    """Flip one byte in the middle of the file: does ``load`` fail, rather than return altered values?"""
    damaged = path.with_name("damaged" + path.suffix)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    damaged.write_bytes(bytes(data))
    try:
        loaded = load(damaged)
    except Exception:
        return True
    return np.array_equal(np.asarray(loaded), reference)  # a silent change is not detection


def bench_formats(entry: Path, repeats: int, root: Path) -> Dict[str, tuple]:
    """Read time of one embedding entry in three formats (page cache warm), and corruption detection."""
    arrays, _ = read_entry(entry)
    reference = arrays["embedding"].copy()
    torch_file, npy_file = root / "entry.pt", root / "embedding.npy"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, torch_file)
    np.save(npy_file, reference)
    loaders = {
        "this format (checksum verified)": (entry, lambda p: read_entry(p)[0]["embedding"]),
        "torch.load(weights_only=True)": (torch_file, lambda p: torch.load(p, weights_only=True)["embedding"].numpy()),
        "np.load (.npy, embedding only)": (npy_file, np.load),
    }
    return {
        name: (seconds(lambda: load(path), repeats * 10), _detects_flipped_byte(path, load, reference))
        for name, (path, load) in loaders.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="images for the tiny SAM")
    parser.add_argument("--vitb-images", type=int, default=1, help="images for ViT-B (~20 s each on 2 CPU cores)")
    parser.add_argument("--image-hw", type=int, nargs=2, default=(480, 640), help="original image size H W")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each cache read (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-vitb", action="store_true", help="only the tiny SAM")
    parser.add_argument("--root", type=Path, default=None, help="cache directory (default: a temporary one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        runs = [("tiny", args.images)] + ([] if args.skip_vitb else [("vit_b", args.vitb_images)])
        results = [bench_model(name, n, tuple(args.image_hw), args.repeats, root) for name, n in runs]
        formats = bench_formats(results[-1]["path"], args.repeats, root)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; images {args.image_hw[0]}x{args.image_hw[1]}; "
          f"cache in {'the given directory' if args.root else 'a temporary directory'}\n")
    print("| model | embedding (fp16) | entry | embed | miss (embed + write) | hit (page cache) | hit (evicted) | embed / hit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        shape = "x".join(map(str, r["embedding"]))
        print(f"| {r['model']} | {shape} | {r['entry_kib']:.0f} KiB | {r['embed'] * 1e3:.1f} ms | {r['miss'] * 1e3:.1f} ms "
              f"| {r['hit'] * 1e3:.2f} ms | {r['hit_evicted'] * 1e3:.2f} ms | {r['embed'] / r['hit']:.0f}x |")
    print(f"\nReading one {results[-1]['model']} embedding entry ({results[-1]['entry_kib']:.0f} KiB), page cache warm:\n")
    print("| format | read | detects a flipped byte |")
    print("|---|---|---|")
    for name, (t, detects) in formats.items():
        print(f"| {name} | {t * 1e3:.2f} ms | {'yes' if detects else 'no (serves altered values)'} |")


if __name__ == "__main__":
    main()
