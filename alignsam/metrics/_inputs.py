"""Input handling shared by the binary-map metrics.

Every binary-map metric takes ``update(pred, target)`` where

* ``pred`` is one probability map ``(H, W)`` float in ``[0, 1]``, a batch ``(B, H, W)``, or a list of
  ``(H_i, W_i)`` maps (images of a data set rarely share a size), all in the **original frame**
  (GT resolution, see :mod:`alignsam.geometry`);
* ``target`` has the same structure, ``bool`` (foreground ``True``).

Per-image computations run in float64, as the reference implementation (pysodmetrics) does, so the
numbers agree with it to rounding.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple, Union

import torch
from torchmetrics import Metric

MapOrMaps = Union[torch.Tensor, Sequence[torch.Tensor]]

# numpy's ``np.spacing(1)``: the epsilon the saliency measures put in their denominators.
FLOAT64_EPS = torch.finfo(torch.float64).eps


def _as_list(maps: MapOrMaps, what: str) -> list:
    if isinstance(maps, torch.Tensor):
        if maps.dim() == 2:
            return [maps]
        if maps.dim() == 3:
            return list(maps.unbind(0))
        raise ValueError(f"{what} must be (H, W), (B, H, W) or a list of (H, W); got shape {tuple(maps.shape)}")
    if isinstance(maps, (list, tuple)):
        out = list(maps)
        for i, m in enumerate(out):
            if not isinstance(m, torch.Tensor) or m.dim() != 2:
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"{what}[{i}] must be a (H, W) tensor; got {shape}")
        return out
    raise TypeError(f"{what} must be a tensor or a list of tensors; got {type(maps).__name__}")


def iter_binary_pairs(
    pred: MapOrMaps, target: MapOrMaps, validate: bool = True
) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(pred (H, W) float64 in [0, 1], target (H, W) bool)`` per image.

    Args:
        pred: probability maps, see the module docstring.
        target: boolean ground truth of the same sizes.
        validate: check dtypes and the ``[0, 1]`` range (one device sync per image); turn off only
            for inputs already known to be valid.
    Raises:
        ValueError / TypeError naming the offending image index.
    """
    preds, targets = _as_list(pred, "pred"), _as_list(target, "target")
    if len(preds) != len(targets):
        raise ValueError(f"pred has {len(preds)} maps but target has {len(targets)}")
    for i, (p, t) in enumerate(zip(preds, targets)):
        if validate:
            if p.shape != t.shape:
                raise ValueError(f"image {i}: pred shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
            if not p.is_floating_point():
                raise TypeError(f"image {i}: pred must be a float probability map; got {p.dtype}")
            if t.dtype != torch.bool:
                raise TypeError(f"image {i}: target must be bool (foreground True); got {t.dtype}")
            if p.numel() == 0:
                raise ValueError(f"image {i}: empty map of shape {tuple(p.shape)}")
            lo, hi = torch.aminmax(p)
            if lo.item() < 0.0 or hi.item() > 1.0:
                raise ValueError(
                    f"image {i}: pred must be probabilities in [0, 1] (sigmoid of logits); "
                    f"got range [{lo.item():.4g}, {hi.item():.4g}]"
                )
        yield p.to(torch.float64), t


def minmax_stretch(pred: torch.Tensor) -> torch.Tensor:
    """Stretch a map to ``[0, 1]`` (MATLAB ``mapminmax``); a constant map is returned unchanged.

    The saliency toolkits apply this to every prediction they read; it is optional here because
    our maps are already probabilities.
    """
    lo, hi = torch.aminmax(pred)
    if hi > lo:
        return (pred - lo) / (hi - lo)
    return pred


class PerImageMetric(Metric):
    """Base of the metrics that score each image and average the scores over images.

    Subclasses register their per-image sums with :meth:`add_sum_state` and implement
    :meth:`update_image`; the image count ``num_images`` is kept here. All states reduce with
    ``sum``, so DDP gives the same average as one process.

    Args:
        minmax_normalize: stretch each map to [0, 1] before scoring, as the saliency toolkits do
            when they read a saved map (off by default: our maps are probabilities already).
        validate_args: check input dtypes and ranges.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, minmax_normalize: bool = False, validate_args: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.minmax_normalize = minmax_normalize
        self.validate_args = validate_args
        self.add_state("num_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def add_sum_state(self, name: str, shape: Tuple[int, ...] = ()) -> None:
        self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update_image(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one image's scores: ``pred (H, W)`` float64 in [0, 1], ``target (H, W)`` bool."""
        raise NotImplementedError

    def update(self, pred: MapOrMaps, target: MapOrMaps) -> None:
        for p, t in iter_binary_pairs(pred, target, self.validate_args):
            self.update_image(minmax_stretch(p) if self.minmax_normalize else p, t)
            self.num_images += 1
