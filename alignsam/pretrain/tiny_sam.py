"""Pretraining of the tiny SAM on procedural scenes, SAM-style and class-agnostic.

Per image: encode once; per region (object, shadow, pane, blurred area, background component,
or with ``data.union_share`` the union of all regions of one kind, as the scene tasks' targets):
a first click uniform inside it, then ``corrective_rounds`` clicks drawn uniformly from the error
region of the previous prediction (positive on a miss, negative on a false positive), as in SAM's
training. Round 0 supervises the best of the three multimask outputs (focal + Dice) and the
single-mask output; later rounds the single-mask output; the IoU head gets MSE against the actual
IoU of every output. The previous low-res logits are fed back as ``mask_input`` in a random half
of the corrective rounds, so the model works with and without it.

Run (writes ``checkpoints/tiny_sam.pt`` every ``export_every`` steps and at the end)::

    python -m alignsam.pretrain.tiny_sam fit --config conf/pretrain/tiny_sam.yaml
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from alignsam.clicks import largest_error_clicks, random_clicks_in, random_error_clicks
from alignsam.data.scenes import REGION_KINDS
from alignsam.foundation.segmenter import prompt_and_decode
from alignsam.foundation.tiny import TinySamArch, build_tiny_sam, build_tiny_segmenter, save_tiny_sam
from alignsam.losses import dice_loss, focal_loss, mask_iou
from alignsam.pretrain.regions import UNION_KINDS, SceneRegionStream
from alignsam.pretrain.schedule import warmup_cosine


def init_positions_like_prompts(sam) -> None:
    """Initialise ``image_encoder.pos_embed`` with the prompt encoder's dense positional encoding.

    Trained from scratch, SAM's image features carry no position (the ViT's position embedding
    starts at zero; the decoder adds positions to attention keys only), so a mask cannot at first
    depend on where the click is, and training settles on one constant mask per image. Starting the
    image's position embedding from the very encoding that embeds the clicks gives every pixel
    feature a position comparable with the click's from step 0. Needs encoder width == prompt width.
    """
    pos = sam.image_encoder.pos_embed  # (1, g, g, C_enc)
    with torch.no_grad():
        dense = sam.prompt_encoder.get_dense_pe()[0].permute(1, 2, 0)  # (g, g, C_prompt)
        if dense.shape != pos.shape[1:]:
            raise ValueError(f"position_init needs encoder_dim == prompt_dim, got {tuple(pos.shape)} vs {tuple(dense.shape)}")
        pos.copy_(dense[None])


class TinySamPretraining(L.LightningModule):
    """Trains :func:`alignsam.foundation.tiny.build_tiny_sam` to segment whatever is clicked.

    Args:
        encoder_dim, encoder_depth, encoder_heads, prompt_dim: tiny architecture (see ``TinySamArch``).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay over
            ``trainer.max_steps``.
        corrective_rounds: clicks after the first one, per region and step.
        largest_error_share: share of corrective clicks placed like the standard click simulator
            (interior of the largest error region) instead of SAM's uniform draw in the error region;
            the evaluation and the oracle baselines click the former way.
        mask_input_prob: probability that a corrective round feeds the previous logits back.
        focal_weight, dice_weight, iou_weight: loss weights (SAM: 20 : 1 : 1).
        focal_alpha: focal loss weight of foreground pixels (0.25 favours "predict nothing" for
            small regions of a from-scratch model; 0.5 weighs both classes equally).
        bf16: run the image encoder under CPU/GPU bf16 autocast (prompt encoder stays fp32).
        export_path, export_every: where and how often the shipped weights file is written.
        seed: seed of the click sampler.
        position_init: start the image encoder's absolute position embedding from the prompt
            encoder's positional encoding instead of zeros (see :func:`init_positions_like_prompts`).
        init_from: a ``tiny_sam.pt`` to continue from (its architecture must match); unlike
            ``--ckpt_path`` (exact resume from a Lightning checkpoint) the optimizer starts afresh.
        torch_threads: intra-op threads (0 keeps torch's default). On a shared 2-core machine 1 is
            several times faster than 2: OpenMP threads spin-wait when another process holds a core.
    """

    def __init__(
        self,
        encoder_dim: int = 128,
        encoder_depth: int = 6,
        encoder_heads: int = 4,
        prompt_dim: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 200,
        corrective_rounds: int = 3,
        largest_error_share: float = 0.0,
        mask_input_prob: float = 0.5,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        focal_alpha: float = 0.5,
        bf16: bool = True,
        export_path: str = "checkpoints/tiny_sam.pt",
        export_every: int = 250,
        seed: int = 0,
        torch_threads: int = 0,
        position_init: bool = True,
        init_from: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.arch = TinySamArch(
            encoder_dim=encoder_dim, encoder_depth=encoder_depth, encoder_heads=encoder_heads, prompt_dim=prompt_dim
        )
        self.sam = build_tiny_sam(self.arch)
        if position_init:
            init_positions_like_prompts(self.sam)
        if init_from:  # warm start from a shipped weights file (optimizer state starts afresh)
            self.sam.load_state_dict(build_tiny_segmenter(init_from).sam.state_dict())
        self.click_generator = torch.Generator().manual_seed(seed)
        self._started = time.time()

    # -- losses ------------------------------------------------------------------------------
    def _mask_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits ``(N, M, h, w)``, soft target ``(N, h, w)`` in [0, 1] -> focal + Dice ``(N, M)``."""
        target = target[:, None].expand_as(logits)
        return self.hparams.focal_weight * focal_loss(logits, target, self.hparams.focal_alpha) + self.hparams.dice_weight * dice_loss(logits, target)

    def _round(
        self, embeddings: torch.Tensor, points: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
        mask_input: torch.Tensor | None, first: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompting round, supervised in the low-res frame (16x cheaper than at full size).

        Args:
            embeddings ``(N, C, h, w)``; points ``(N, K, 2)`` SAM frame; labels ``(N, K)``;
            target ``(N, 4h, 4w)`` ground truth area-resized to the low-res frame, in [0, 1].
        Returns:
            loss; low-res logits ``(N, 1, 4h, 4w)`` of the mask to continue from (detached);
            its actual IoU ``(N,)``; the IoU head's MSE.
        """
        low_res, iou_pred = prompt_and_decode(self.sam, embeddings, points, labels, mask_input)
        losses = self._mask_losses(low_res, target)  # (N, 4)
        with torch.no_grad():
            actual_iou = mask_iou(low_res > 0, (target > 0.5)[:, None].expand_as(low_res))
        if first:
            keep = losses[:, 1:].argmin(1) + 1  # the best multimask output
            rows = torch.arange(len(keep))
            mask_loss = losses[rows, keep].mean() + losses[:, 0].mean()
            iou_loss = F.mse_loss(iou_pred, actual_iou)
        else:
            keep = torch.zeros(len(target), dtype=torch.long, device=target.device)
            mask_loss = losses[:, 0].mean()
            iou_loss = F.mse_loss(iou_pred[:, 0], actual_iou[:, 0])
        rows = torch.arange(len(keep))
        loss = mask_loss + self.hparams.iou_weight * iou_loss
        return loss, low_res[rows, keep][:, None].detach(), actual_iou[rows, keep], iou_loss.detach()

    def _corrective_clicks(
        self, low_res: torch.Tensor, gt: torch.Tensor, gt_low: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Clicks in the low-res error region, jittered inside the cell, labelled at full res.

        Each click is uniform in the error region (SAM's sampler) or, for a random
        ``largest_error_share`` of them, at the interior of the largest error region.
        low_res ``(N, 1, h', w')``, gt bool ``(N, S, S)``, gt_low bool ``(N, h', w')`` on the CPU (the
        ground truth in the low-res frame, majority vote of each cell; computed from ``gt`` if None)
        -> points ``(N, 2)`` (SAM frame), labels ``(N,)``.
        """
        cell = gt.shape[-1] // low_res.shape[-1]
        if gt_low is None:
            gt_low = (F.avg_pool2d(gt[:, None].float(), cell)[:, 0] > 0.5).cpu()
        pred_low = (low_res[:, 0] > 0).cpu()
        points, _ = random_error_clicks(pred_low, gt_low, self.click_generator)
        if self.hparams.largest_error_share > 0:
            chosen = torch.rand(len(points), generator=self.click_generator) < self.hparams.largest_error_share
            if chosen.any():
                points[chosen] = largest_error_clicks(pred_low[chosen], gt_low[chosen])[0]
        jitter = torch.rand(points.shape, generator=self.click_generator) * cell
        points = (points * cell + jitter).clamp(max=gt.shape[-1] - 1).to(gt.device)
        x, y = points[:, 0].long(), points[:, 1].long()
        labels = gt[torch.arange(len(gt)), y, x].long()
        return points, labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks, kinds = batch  # (B,3,S,S) uint8, (B,R,S,S) bool, (B,R) long
        r = masks.shape[1]
        pixels = self.sam.preprocess(images.float())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.bf16):
            embeddings = self.sam.image_encoder(pixels)
        embeddings = embeddings.float().repeat_interleave(r, dim=0)  # (N, C, h, w)
        gt = masks.flatten(0, 1)  # (N, S, S)
        low_hw = 4 * embeddings.shape[-1]
        target = F.adaptive_avg_pool2d(gt[:, None].float(), low_hw)[:, 0]  # (N, 4h, 4w)
        gt_low = (target > 0.5).cpu()  # the corrective clicks' ground truth, once per step
        points = random_clicks_in(gt, self.click_generator)[:, None]  # (N, 1, 2), on gt's device
        labels = torch.ones(len(gt), 1, dtype=torch.long, device=self.device)
        loss, low_res, iou, iou_mse = self._round(embeddings, points, labels, target, None, first=True)
        first_iou = iou.mean()
        for _ in range(self.hparams.corrective_rounds):
            new_points, new_labels = self._corrective_clicks(low_res, gt, gt_low)
            points = torch.cat([points, new_points[:, None]], 1)
            labels = torch.cat([labels, new_labels[:, None]], 1)
            use_mask = torch.rand((), generator=self.click_generator).item() < self.hparams.mask_input_prob
            step_loss, low_res, iou, _ = self._round(
                embeddings, points, labels, target, low_res if use_mask else None, first=False
            )
            loss = loss + step_loss
        loss = loss / (1 + self.hparams.corrective_rounds)
        self.log_dict(
            {"train/loss": loss, "train/iou_first_click": first_iou, "train/iou_last_click": iou.mean(),
             "train/iou_head_mse": iou_mse},
            prog_bar=True,
        )
        for k, name in enumerate(REGION_KINDS + UNION_KINDS):
            selected = kinds.flatten() == k
            if selected.any():
                self.log(f"train_kind/{name}_last_iou", iou[selected].mean())
        if (self.global_step + 1) % self.hparams.export_every == 0:
            self.export()
        return loss

    def export(self) -> None:
        """Write the shipped weights file (atomically) with how it was made."""
        path = Path(self.hparams.export_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tiny_sam(
            self.sam, self.arch, str(path),
            step=int(self.global_step), minutes=round((time.time() - self._started) / 60, 1),
            hparams=dict(self.hparams),
        )

    def on_train_end(self) -> None:
        self.export()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.sam.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return {"optimizer": opt, "lr_scheduler": warmup_cosine(opt, self.hparams.warmup_steps, self.trainer.max_steps)}


class SceneRegionData(L.LightningDataModule):
    """Endless stream of scene regions for pretraining.

    Args:
        batch_size: images per step (each with ``regions_per_image`` regions).
        regions_per_image, min_area, seed: see :class:`SceneRegionStream`.
        num_workers: DataLoader workers (scene rendering is cheap; 1 is enough on 2 cores).
        kind_weights: relative odds of each region kind (see :func:`sample_regions`).
        union_share: share of targets that are the union of all regions of one kind in the scene
            (all shadows, all blurred areas, all panes, all instances of a category), as the scene
            tasks' ground truth is (see :func:`alignsam.pretrain.regions.union_targets`); 0 = off.
    """

    def __init__(self, batch_size: int = 16, regions_per_image: int = 4, min_area: int = 150,
                 seed: int = 0, num_workers: int = 1, kind_weights: Optional[Dict[str, float]] = None,
                 union_share: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        stream = SceneRegionStream(h.regions_per_image, "train", h.seed, h.min_area, kind_weights=h.kind_weights,
                                   union_share=h.union_share)
        return DataLoader(stream, batch_size=h.batch_size, num_workers=h.num_workers,
                          persistent_workers=h.num_workers > 0, pin_memory=torch.cuda.is_available())


def main() -> None:
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(TinySamPretraining, SceneRegionData, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
