"""Feature cache: SAM embeddings and CLIP Surgery maps computed once per image, read back from disk.

An entry's key is a SHA-256 of everything its value depends on:

* the model: registry ``name`` and weights ``fingerprint`` (``Segmenter.name/.fingerprint``; a text
  matcher's ``.fingerprint``). A model without a real fingerprint (``""`` or ``"random-init"``) is
  keyed by a hash of its weights instead, so two random models never share entries;
* the image content: SHA-256 of the pixel bytes plus shape and dtype (not the sample id: a changed
  file under the same id misses);
* the preprocessing: SAM's input size and normalisation (``text`` and ``out_hw`` for maps), any
  caller ``options``, the storage dtype and the entry format version.

Entries (one file each, see :mod:`alignsam.data.feature_files`):

* ``sam_embedding``: ``embedding (C, h, w)`` in the storage dtype, ``original_hw (2,)`` and
  ``input_hw (2,)`` int64 as in :class:`~alignsam.foundation.segmenter.EmbeddedImages`;
* ``text_map``: ``map (1, h, w)`` in the storage dtype, the matcher's similarity in [0, 1].

The training code calls :meth:`FeatureStore.embeddings` / :meth:`FeatureStore.text_maps`, which read
what is cached and compute only what is missing. :mod:`alignsam.data.precompute` fills the store
before training (:class:`~alignsam.data.precompute.PrecomputeFeatures`), one image per embed call
and each rank its shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from alignsam.data.feature_files import CorruptEntryError, read_entry, remove_stale_temp_files, write_entry
from alignsam.foundation.segmenter import EmbeddedImages, Segmenter
from alignsam.geometry import input_frame_description

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
EMBEDDING_KIND = "sam_embedding"
TEXT_MAP_KIND = "text_map"
ENTRY_SUFFIX = ".feat"
UNSET_FINGERPRINTS = ("", "random-init")
Sample = Mapping[str, Any]


class TextMatcherLike(Protocol):
    """What the cache needs from a text matcher (``alignsam.foundation.clip_surgery.TextMatcher``)."""

    fingerprint: str

    def similarity(self, images: Sequence[np.ndarray], texts: Sequence[str], out_hw: Tuple[int, int]) -> torch.Tensor:
        """uint8 ``(H, W, 3)`` images and one text each -> ``(B, 1, h, w)`` maps in [0, 1]."""


@dataclass
class CacheStats:
    """Counters of one :class:`FeatureStore` object (this process only)."""

    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0

    def minus(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


# -- keys ------------------------------------------------------------------------------------------
# id(array) -> (weak reference to the array, its digest), for read-only arrays (see image_digest)
_IMAGE_DIGESTS: Dict[int, Tuple["weakref.ref[np.ndarray]", str]] = {}


def image_digest(image: np.ndarray) -> str:
    """SHA-256 of an image's pixel bytes, shape and dtype (what the image *is*, not where it came from).

    Remembered for a read-only array object (``image.flags.writeable`` False, and so is every array
    it is a view of): hashing the same object again returns the remembered digest without reading
    the pixels (a cache hit then costs no hashing; datasets that keep their images, like
    :class:`~alignsam.data.scene_data.SceneImages`, hand out read-only arrays for this). Writable
    arrays are hashed every time, since their pixels may have changed in place. (An owner that
    makes its read-only array writable again to change it must not hash it meanwhile.)
    """
    remember = _frozen(image)
    if remember:
        entry = _IMAGE_DIGESTS.get(id(image))
        if entry is not None and entry[0]() is image:
            return entry[1]
    contiguous = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{contiguous.dtype.str}{contiguous.shape}".encode())
    digest.update(memoryview(contiguous).cast("B"))
    hexdigest = digest.hexdigest()
    if remember:
        key = id(image)

        def forget(ref, key=key):  # the array is gone: its id may be reused by another object
            if _IMAGE_DIGESTS.get(key, (None,))[0] is ref:
                del _IMAGE_DIGESTS[key]

        _IMAGE_DIGESTS[key] = (weakref.ref(image, forget), hexdigest)
    return hexdigest


def _frozen(image: Any) -> bool:
    """Whether ``image``'s pixels cannot change behind its back: a read-only ndarray whose bases
    (the arrays it views) are read-only ndarrays too, or immutable bytes."""
    array = image
    while isinstance(array, np.ndarray):
        if array.flags.writeable:
            return False
        array = array.base
    return array is None or isinstance(array, bytes)


_WEIGHT_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, Tuple[List[torch.Tensor], tuple, str]]" = weakref.WeakKeyDictionary()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes, bytes).

    Memoised per module object; recomputed when one of its tensors was modified in place since
    (tensor version counters). Replacing a parameter object is not noticed: give such models a
    real ``fingerprint``.
    """
    memo = _WEIGHT_DIGESTS.get(module)
    if memo is not None and tuple(t._version for t in memo[0]) == memo[1]:
        return memo[2]
    state = module.state_dict(keep_vars=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)};".encode())
        digest.update(memoryview(tensor.view(torch.uint8).numpy()))
    tensors = list(state.values())
    _WEIGHT_DIGESTS[module] = (tensors, tuple(t._version for t in tensors), digest.hexdigest())
    return _WEIGHT_DIGESTS[module][2]


def model_identity(model: Any) -> Dict[str, str]:
    """``{"name", "fingerprint"}`` of a frozen model, the model part of every cache key."""
    name = getattr(model, "name", None) or type(model).__qualname__
    fingerprint = getattr(model, "fingerprint", None)
    if fingerprint is None or fingerprint in UNSET_FINGERPRINTS:
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"{type(model).__qualname__} has no weights fingerprint (.fingerprint = {fingerprint!r}); "
                f"the feature cache cannot tell its checkpoints apart"
            )
        fingerprint = f"weights-sha256:{weights_digest(model)}"
    return {"name": str(name), "fingerprint": str(fingerprint)}


def segmenter_preprocessing(segmenter: Segmenter) -> Dict[str, Any]:
    """What SAM's preprocessing depends on: input size, resize rule (the frame, see
    :func:`~alignsam.geometry.input_frame_description`), normalisation (the segmenter's own
    ``pixel_mean`` / ``pixel_std`` when it has them, as SAM 2's does, else its SAM's)."""
    prep: Dict[str, Any] = {"img_size": int(segmenter.img_size), **input_frame_description(segmenter.img_size)}
    source = segmenter if hasattr(segmenter, "pixel_mean") else getattr(segmenter, "sam", None)
    if source is not None and hasattr(source, "pixel_mean"):
        prep["pixel_mean"] = [round(float(v), 6) for v in source.pixel_mean.flatten()]
        prep["pixel_std"] = [round(float(v), 6) for v in source.pixel_std.flatten()]
    return prep


def entry_key(description: Mapping[str, Any]) -> str:
    """SHA-256 hex of a JSON description (sorted keys) of everything an entry depends on."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def _sample_field(sample: Sample, index: int, field: str) -> Any:
    if field not in sample:
        raise KeyError(f"sample {index} (id {sample.get('id', '?')!r}) has no '{field}' (needed by the feature cache)")
    value = sample[field]
    if field == "image" and not isinstance(value, np.ndarray):
        raise TypeError(f"sample {index} (id {sample.get('id', '?')!r}): 'image' must be a uint8 (H, W, 3) numpy array, got {type(value).__name__}")
    return value


# -- store -----------------------------------------------------------------------------------------
class FeatureStore:
    """A directory of cache entries: ``root/<kind>/<key[:2]>/<key>.feat``.

    Args:
        root: cache directory (created on demand; may be shared by several processes).
        storage_dtype: floating-point arrays are stored in this precision (part of every key).
        fsync: fsync each entry and its directory before it becomes visible (durable across power
            loss; turn off only for throw-away caches).
    """

    def __init__(self, root: Union[str, Path], storage_dtype: torch.dtype = torch.float16, fsync: bool = True) -> None:
        self.root = Path(root)
        self.storage_dtype = storage_dtype
        self.fsync = fsync
        self.stats = CacheStats()

    # -- low level: one entry by key --------------------------------------------------------------
    def path_for(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def entry_paths(self, kind: str = "*") -> List[Path]:
        """Every complete entry file of ``kind`` (temporary files of writers are never listed)."""
        return sorted(self.root.glob(f"{kind}/*/*{ENTRY_SUFFIX}"))

    def get(self, kind: str, key: str, required: Sequence[str] = ()) -> Optional[Dict[str, torch.Tensor]]:
        """The entry's arrays as CPU tensors, or None when absent or corrupt.

        A corrupt entry (bad checksum, truncated, missing one of ``required``) is logged as a
        warning naming the file, deleted, and reported as a miss so that the caller recomputes it.
        """
        path = self.path_for(kind, key)
        try:
            arrays, _ = read_entry(path, expected_key=key)
            absent = [name for name in required if name not in arrays]
            if absent:
                raise CorruptEntryError(f"{path}: lacks arrays {absent}")
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except CorruptEntryError as err:
            logger.warning("feature cache: discarding corrupt entry %s (%s); it will be recomputed", path, err)
            path.unlink(missing_ok=True)
            self.stats.corrupt += 1
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return {name: torch.from_numpy(array) for name, array in arrays.items()}

    def put(
        self,
        kind: str,
        key: str,
        arrays: Mapping[str, Union[torch.Tensor, np.ndarray]],
        meta: Optional[Mapping[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Store arrays (floats cast to ``storage_dtype``) atomically; returns exactly what a read returns."""
        stored = {}
        for name, value in arrays.items():
            tensor = torch.as_tensor(value).detach().to("cpu")
            if tensor.is_floating_point():
                cast = tensor.to(self.storage_dtype)
                if not torch.isfinite(cast).all() and torch.isfinite(tensor).all():
                    raise ValueError(
                        f"feature cache: '{name}' of entry {key} overflows {self.storage_dtype} "
                        f"(max |value| {tensor.abs().max().item():.3g}); use FeatureStore(storage_dtype=torch.float32)"
                    )
                tensor = cast
            stored[name] = tensor.contiguous()
        write_entry(self.path_for(kind, key), key, {n: t.numpy() for n, t in stored.items()}, meta, fsync=self.fsync)
        self.stats.writes += 1
        return stored

    def remove_stale_temp_files(self, max_age_s: float = 3600.0) -> int:
        """Reclaim temporary files of writers that were killed mid-write (see feature_files)."""
        return remove_stale_temp_files(self.root, max_age_s)

    def _read_or_compute(
        self,
        kind: str,
        keys: Sequence[str],
        metas: Sequence[Mapping[str, Any]],
        required: Sequence[str],
        compute: Callable[[List[int]], List[Dict[str, torch.Tensor]]],
        chunk_size: int,
    ) -> List[Dict[str, torch.Tensor]]:
        """Entries for ``keys`` in input order; ``compute(indices)`` is called once per chunk of misses."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        found: Dict[str, Dict[str, torch.Tensor]] = {}
        first_index_of_missing: Dict[str, int] = {}  # duplicates in one batch are computed once
        for index, key in enumerate(keys):
            if key in found or key in first_index_of_missing:
                continue
            entry = self.get(kind, key, required)
            if entry is None:
                first_index_of_missing[key] = index
            else:
                found[key] = entry
        todo = list(first_index_of_missing.values())
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            for index, arrays in zip(chunk, compute(chunk)):
                found[keys[index]] = self.put(kind, keys[index], arrays, metas[index])
        return [found[key] for key in keys]

    # -- high level: what training calls ----------------------------------------------------------
    def embeddings(
        self,
        segmenter: Segmenter,
        samples: Sequence[Sample],
        chunk_size: int = 16,
        options: Optional[Mapping[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> EmbeddedImages:
        """SAM embeddings of ``samples`` (dicts with ``"image"`` uint8 ``(H, W, 3)`` and ``"id"``).

        Cached entries are read; the missing ones are computed with one ``segmenter.embed`` call per
        ``chunk_size`` images and written. ``options`` (JSON-able) enter the key: pass anything that
        changes the embedding and is not in the segmenter's name, fingerprint or input size.

        Returns:
            :class:`EmbeddedImages` in input order: embeddings ``(B, C, h, w)`` in ``storage_dtype``
            (identical whether read or freshly computed), original_hw and input_hw ``(B, 2)`` long,
            on ``device`` (CPU by default).
        """
        model = model_identity(segmenter)
        prep = {**segmenter_preprocessing(segmenter), "options": dict(options or {})}
        images = [_sample_field(s, i, "image") for i, s in enumerate(samples)]
        keys, metas = [], []
        for sample, image in zip(samples, images):
            description = {
                "kind": EMBEDDING_KIND, "format": FORMAT_VERSION, "model": model, "image": image_digest(image),
                "preprocessing": prep, "storage_dtype": str(self.storage_dtype),
            }
            keys.append(entry_key(description))
            metas.append({"id": str(sample.get("id", "")), **description})

        def compute(indices: List[int]) -> List[Dict[str, torch.Tensor]]:
            out = segmenter.embed([images[i] for i in indices])
            return [
                {"embedding": out.embeddings[j], "original_hw": out.original_hw[j], "input_hw": out.input_hw[j]}
                for j in range(len(indices))
            ]

        entries = self._read_or_compute(
            EMBEDDING_KIND, keys, metas, ("embedding", "original_hw", "input_hw"), compute, chunk_size
        )
        stack = lambda name: torch.stack([e[name] for e in entries]).to(device)  # noqa: E731
        return EmbeddedImages(stack("embedding"), stack("original_hw").long(), stack("input_hw").long())

    def text_maps(
        self,
        matcher: TextMatcherLike,
        samples: Sequence[Sample],
        out_hw: Tuple[int, int],
        chunk_size: int = 16,
        options: Optional[Mapping[str, Any]] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """Text-similarity maps for ``samples`` (``"image"``, ``"text"``, ``"id"``) at ``out_hw``.

        Missing maps are computed with one ``matcher.similarity(images, texts, out_hw)`` call per
        chunk. Returns ``(B, 1, h, w)`` in ``storage_dtype``, input order, on ``device``.
        """
        out_hw = (int(out_hw[0]), int(out_hw[1]))
        model = model_identity(matcher)
        images = [_sample_field(s, i, "image") for i, s in enumerate(samples)]
        texts = [str(_sample_field(s, i, "text")) for i, s in enumerate(samples)]
        keys, metas = [], []
        for sample, image, text in zip(samples, images, texts):
            description = {
                "kind": TEXT_MAP_KIND, "format": FORMAT_VERSION, "model": model, "image": image_digest(image),
                "text": text, "out_hw": list(out_hw), "options": dict(options or {}),
                "storage_dtype": str(self.storage_dtype),
            }
            keys.append(entry_key(description))
            metas.append({"id": str(sample.get("id", "")), **description})

        def compute(indices: List[int]) -> List[Dict[str, torch.Tensor]]:
            # writable copies of read-only images (torch warns on tensors over read-only memory)
            chunk = [images[i] if images[i].flags.writeable else images[i].copy() for i in indices]
            maps = matcher.similarity(chunk, [texts[i] for i in indices], out_hw)
            if tuple(maps.shape) != (len(indices), 1, *out_hw):
                raise ValueError(
                    f"{type(matcher).__qualname__}.similarity returned shape {tuple(maps.shape)}, "
                    f"expected {(len(indices), 1, *out_hw)}"
                )
            return [{"map": maps[j]} for j in range(len(indices))]

        entries = self._read_or_compute(TEXT_MAP_KIND, keys, metas, ("map",), compute, chunk_size)
        return torch.stack([e["map"] for e in entries]).to(device)
