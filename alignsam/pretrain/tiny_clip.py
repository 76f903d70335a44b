"""Pretraining of the tiny CLIP on captioned procedural scenes and crops, for CLIP Surgery.

Two losses on every batch of images (whole scenes and object crops, see
:mod:`alignsam.pretrain.scene_captions`):

* **global contrastive**: the image embedding (class token of the unmodified network, as
  ``encode_image``) against the caption embeddings, symmetric cross-entropy at the model's
  ``logit_scale``; images with the same caption are all positives of that caption.
* **dense patch-text**: each patch embedding *on CLIP Surgery's v-v path* (the same features
  :class:`~alignsam.foundation.clip_surgery.TextMatcher` reads, from ``vv_start_block`` on) is
  classified among the texts that compete in its scene (the six category names, or the task's
  target word, and ``"background"``; text embeddings template-ensembled exactly as the matcher does),
  at the same ``logit_scale``, against the patch's label from the scene's label map (majority or
  centre pixel, or the class fractions as a soft target). With a ``"background"`` text in softmax
  mode, the matcher's map is then exactly the trained probability of the query against background.

Run (writes ``checkpoints/tiny_clip.pt`` every ``export_every`` steps and at the end)::

    python -m alignsam.pretrain.tiny_clip fit --config conf/pretrain/tiny_clip.yaml
"""
from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from alignsam.data.scenes import TASKS
from alignsam.foundation.surgery import surgery_image_features
from alignsam.foundation.tiny_clip import TINY_TEMPLATES, WordTokenizer, build_tiny_clip, save_tiny_clip, tiny_clip_config
from alignsam.pretrain.schedule import warmup_cosine
from alignsam.pretrain.scene_captions import DENSE_TEXTS, SceneCaptionStream, task_text_mask

PATCH_LABELS = ("majority", "centre", "soft")


def patch_label_targets(labels: torch.Tensor, grid_hw: Tuple[int, int], num_texts: int, mode: str) -> torch.Tensor:
    """Per-patch targets from pixel label maps.

    Args:
        labels: ``(B, S, S)`` integer ids in ``[0, num_texts)``; S a multiple of the grid size.
        grid_hw: ``(gh, gw)`` patch grid tiling the whole image.
        mode: ``"majority"`` (most frequent id in the patch), ``"centre"`` (id at the patch centre) or
            ``"soft"`` (fraction of the patch covered by each id).
    Returns:
        ``(B, gh * gw)`` long ids (majority, centre) or ``(B, gh * gw, num_texts)`` float fractions (soft).
    """
    if mode not in PATCH_LABELS:
        raise ValueError(f"patch label mode must be one of {PATCH_LABELS} (config key model.patch_label), got '{mode}'")
    batch, height, width = labels.shape
    gh, gw = grid_hw
    if height % gh or width % gw:
        raise ValueError(f"label maps {height}x{width} are not a multiple of the patch grid {gh}x{gw}")
    ch, cw = height // gh, width // gw
    labels = labels.long()
    if mode == "centre":
        return labels[:, ch // 2 :: ch, cw // 2 :: cw].reshape(batch, gh * gw)
    rows = torch.arange(height, device=labels.device) // ch
    cols = torch.arange(width, device=labels.device) // cw
    patch = (rows[:, None] * gw + cols[None, :])[None]  # (1, S, S)
    image = torch.arange(batch, device=labels.device)[:, None, None]
    index = (image * (gh * gw) + patch) * num_texts + labels
    counts = torch.bincount(index.flatten(), minlength=batch * gh * gw * num_texts).view(batch, gh * gw, num_texts)
    if mode == "majority":
        return counts.argmax(-1)
    return counts.float() / (ch * cw)


class TinyClipPretraining(L.LightningModule):
    """Trains the tiny CLIP (an open_clip ``CLIP``) so that CLIP Surgery maps point at named things.

    Args:
        image_size, patch_size, vision_width, vision_layers, vision_head_width: image tower (the
            patch grid is ``image_size / patch_size`` squared and tiles the whole image).
        text_width, text_layers, text_heads, embed_dim: text tower and joint space.
        vv_start_block: first block of the v-v path the dense loss trains (None: half the blocks,
            the matcher's default; negative: from the end). The matcher must use the same value.
        templates: prompt templates of the text ensemble (stored in the weights file; the matcher's default).
        dense_weight: weight of the dense loss beside the global one.
        patch_label: ``"majority"``, ``"centre"`` or ``"soft"`` (see :func:`patch_label_targets`).
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW, linear warm-up, cosine decay over
            ``trainer.max_steps`` down to ``min_lr_ratio * lr`` (no decay on gains, biases, embeddings).
        init_logit_scale, max_logit_scale: the learnt softmax scale (exp of the parameter) at the
            start, and its ceiling (clamped after every step, as open_clip does).
        bf16: run the image tower under bf16 autocast (losses in fp32).
        export_path, export_every: the shipped weights file and how often (steps) it is written.
        seed: seed of the weight initialisation.
    """

    def __init__(
        self,
        image_size: int = 128,
        patch_size: int = 8,
        vision_width: int = 128,
        vision_layers: int = 6,
        vision_head_width: int = 32,
        text_width: int = 128,
        text_layers: int = 3,
        text_heads: int = 4,
        embed_dim: int = 128,
        vv_start_block: Optional[int] = None,
        templates: Sequence[str] = TINY_TEMPLATES,
        dense_weight: float = 1.0,
        patch_label: str = "majority",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.05,
        init_logit_scale: float = 10.0,
        max_logit_scale: float = 100.0,
        bf16: bool = False,
        export_path: str = "checkpoints/tiny_clip.pt",
        export_every: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if patch_label not in PATCH_LABELS:
            raise ValueError(f"model.patch_label must be one of {PATCH_LABELS}, got '{patch_label}'")
        if image_size % patch_size:
            raise ValueError(f"model.image_size {image_size} is not a multiple of model.patch_size {patch_size}")
        self.tokenizer = WordTokenizer()
        cfg = tiny_clip_config(self.tokenizer.vocab_size, self.tokenizer.context_length, embed_dim=embed_dim)
        cfg["vision_cfg"].update(image_size=image_size, patch_size=patch_size, width=vision_width,
                                 layers=vision_layers, head_width=vision_head_width)
        cfg["text_cfg"].update(width=text_width, layers=text_layers, heads=text_heads)
        self.model_cfg = cfg
        self.clip = build_tiny_clip(copy.deepcopy(cfg), seed=seed)
        with torch.no_grad():
            self.clip.logit_scale.fill_(math.log(init_logit_scale))
        start = vision_layers // 2 if vv_start_block is None else int(vv_start_block)
        start = start + vision_layers if start < 0 else start
        if not 0 <= start < vision_layers:
            raise ValueError(f"model.vv_start_block={vv_start_block} is outside the {vision_layers} vision blocks")
        self.vv_start_block = start
        self.templates = tuple(templates)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"every template needs exactly one '{{}}' (config key model.templates), got {self.templates}")

        from open_clip import get_model_preprocess_cfg
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        pre = get_model_preprocess_cfg(self.clip)  # the matcher's normalisation, same defaults
        self.register_buffer("pixel_mean", torch.tensor(pre.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pre.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1), persistent=False)
        prompts = [template.format(text) for text in DENSE_TEXTS for template in self.templates]
        self.register_buffer("dense_tokens", self.tokenizer(prompts), persistent=False)  # (K * T, L)
        self.register_buffer("task_texts", task_text_mask(TASKS), persistent=False)  # (tasks, K)
        self._seconds_before = 0.0  # training time of earlier runs this one resumed from
        self._fit_started = time.time()
        self.images_seen = 0

    # -- features ------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, S, S)`` -> normalised ``(B, 3, s, s)`` model input, resized as the matcher does."""
        pixels = images.float()
        size = self.hparams.image_size
        if pixels.shape[-1] != size or pixels.shape[-2] != size:
            pixels = F.interpolate(pixels, (size, size), mode="bicubic", align_corners=False, antialias=True)
        return (pixels.clamp(0, 255) / 255.0 - self.pixel_mean) / self.pixel_std

    def image_features(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised v-v patch embeddings ``(B, gh * gw, D)`` and global embeddings ``(B, D)``."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.hparams.bf16):
            patches, pooled = surgery_image_features(self.clip.visual, self.preprocess(images), self.vv_start_block)
        return F.normalize(patches.float().flatten(1, 2), dim=-1), F.normalize(pooled.float(), dim=-1)

    def dense_text_embeddings(self) -> torch.Tensor:
        """``(K, D)`` template-ensembled embeddings of :data:`DENSE_TEXTS` (as ``TextMatcher.text_embeddings``)."""
        emb = F.normalize(self.clip.encode_text(self.dense_tokens).float(), dim=-1)
        emb = emb.view(len(DENSE_TEXTS), len(self.templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    # -- losses --------------------------------------------------------------------------------
    def global_loss(self, image_emb: torch.Tensor, captions: Sequence[str], scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Symmetric contrastive loss of ``(B, D)`` image embeddings and their B captions.

        Identical captions are encoded once; image -> text is a cross-entropy over the distinct
        captions, text -> image a cross-entropy with every image of that caption as a positive.
        Returns (loss, accuracy of image -> caption retrieval).
        """
        unique = list(dict.fromkeys(captions))
        index = torch.tensor([unique.index(c) for c in captions], device=image_emb.device)
        text_emb = F.normalize(self.clip.encode_text(self.tokenizer(unique).to(image_emb.device)).float(), dim=-1)
        logits = scale * image_emb @ text_emb.T  # (B, U)
        image_to_text = F.cross_entropy(logits, index)
        positives = F.one_hot(index, len(unique)).T.float()  # (U, B)
        text_to_image = -(positives / positives.sum(1, keepdim=True) * logits.T.log_softmax(dim=1)).sum(1).mean()
        accuracy = (logits.argmax(1) == index).float().mean()
        return (image_to_text + text_to_image) / 2, accuracy

    def dense_loss(
        self, patch_emb: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, scale: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Patch-text cross-entropy among the texts of each image's task.

        Args:
            patch_emb: ``(B, P, D)`` normalised v-v path patch embeddings.
            labels: ``(B, S, S)`` pixel ids into :data:`DENSE_TEXTS`.
            task_ids: ``(B,)`` indices into ``TASKS``.
        Returns:
            (loss, patch accuracy against the majority label).
        """
        grid = tuple(int(v) for v in self.clip.visual.grid_size)
        text_emb = self.dense_text_embeddings()  # (K, D)
        logits = scale * patch_emb @ text_emb.T  # (B, P, K)
        allowed = self.task_texts[task_ids][:, None, :]  # (B, 1, K)
        logits = logits.masked_fill(~allowed, float("-inf"))
        log_prob = logits.log_softmax(-1).masked_fill(~allowed, 0.0)
        targets = patch_label_targets(labels, grid, len(DENSE_TEXTS), self.hparams.patch_label)
        if targets.dim() == 2:
            loss = -log_prob.gather(-1, targets[..., None]).mean()
            majority = targets
        else:
            loss = -(targets * log_prob).sum(-1).mean()
            majority = targets.argmax(-1)
        accuracy = (logits.argmax(-1) == majority).float().mean()
        return loss, accuracy

    def losses(self, batch) -> Dict[str, torch.Tensor]:
        """All losses and training figures of one batch ``(images, labels, task ids, captions)``.

        images uint8 ``(B, 3, S, S)``; labels uint8 ``(B, S, S)`` ids into ``DENSE_TEXTS``;
        task ids ``(B,)`` indices into ``TASKS``; captions: B strings.
        """
        images, labels, task_ids, captions = batch
        patch_emb, image_emb = self.image_features(images)
        scale = self.clip.logit_scale.exp()
        global_loss, retrieval = self.global_loss(image_emb, list(captions), scale)
        dense_loss, patch_acc = self.dense_loss(patch_emb, labels, task_ids, scale)
        return {
            "loss": global_loss + self.hparams.dense_weight * dense_loss, "global_loss": global_loss,
            "dense_loss": dense_loss, "patch_acc": patch_acc, "caption_retrieval": retrieval,
            "logit_scale": scale.detach(),
        }

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        self.images_seen += len(batch[0])
        self.log_dict({f"train/{k}": out[k] for k in ("loss", "global_loss", "dense_loss", "patch_acc")}, prog_bar=True)
        self.log_dict({"train/caption_retrieval": out["caption_retrieval"], "train/logit_scale": out["logit_scale"],
                       "train/minutes": self.train_minutes()})
        return out["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(max=math.log(self.hparams.max_logit_scale))
        if self.global_step % self.hparams.export_every == 0:
            self.export()

    # -- bookkeeping ---------------------------------------------------------------------------
    def train_minutes(self) -> float:
        return (self._seconds_before + time.time() - self._fit_started) / 60

    def on_fit_start(self) -> None:
        self._fit_started = time.time()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_seconds"] = self.train_minutes() * 60
        checkpoint["images_seen"] = self.images_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._seconds_before = float(checkpoint.get("train_seconds", 0.0))
        self.images_seen = int(checkpoint.get("images_seen", 0))

    def matcher_options(self) -> Dict[str, object]:
        """The TextMatcher options the weights were trained for."""
        return {"vv_start_block": self.vv_start_block, "templates": list(self.templates)}

    def export(self, path: Optional[str] = None) -> None:
        """Write the shipped weights file (fp16, atomically) with how it was made."""
        path = Path(path or self.hparams.export_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tiny_clip(
            self.clip, self.model_cfg, self.tokenizer, path, templates=self.templates,
            command=invocation(), seed=self.hparams.seed, step=int(self.global_step),
            minutes=round(self.train_minutes(), 1), images_seen=self.images_seen,
            threads=torch.get_num_threads(), matcher_options=self.matcher_options(),
            dense_texts=list(DENSE_TEXTS), hparams=dict(self.hparams),
        )

    def on_train_end(self) -> None:
        self.export()

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, param in self.clip.named_parameters():
            (decay if param.ndim >= 2 and "embedding" not in name else no_decay).append(param)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        h = self.hparams
        return {"optimizer": opt, "lr_scheduler": warmup_cosine(opt, h.warmup_steps, self.trainer.max_steps, h.min_lr_ratio)}


def invocation() -> str:
    """The command line of this process, as a person would type it."""
    args = sys.argv[1:]
    if sys.argv and sys.argv[0].endswith("pretrain/tiny_clip.py"):
        return " ".join(["python -m alignsam.pretrain.tiny_clip", *args])
    return " ".join(["python", *sys.argv])


def collate_captioned(items: List[tuple]):
    """Batch ``(image, labels, task id, caption)`` items: stacked tensors and a list of captions."""
    images, labels, tasks, captions = zip(*items)
    return torch.stack(images), torch.stack(labels), torch.tensor(tasks), list(captions)


class SceneCaptionData(L.LightningDataModule):
    """Endless captioned scenes and crops from the train seed range (see :class:`SceneCaptionStream`).

    Args:
        batch_size: images (scenes and crops together) per step.
        tasks, task_weights, crops_per_scene, whole_scene_prob, crop_margin, min_area, out_size:
            see :class:`~alignsam.pretrain.scene_captions.SceneCaptionStream`.
        seed: base seed of the stream.
        num_workers: DataLoader worker processes (0: render in the training process).
    """

    def __init__(
        self,
        batch_size: int = 32,
        tasks: Sequence[str] = TASKS,
        task_weights: Optional[Sequence[float]] = None,
        crops_per_scene: int = 2,
        whole_scene_prob: float = 1.0,
        crop_margin: Tuple[float, float] = (0.1, 0.5),
        min_area: int = 200,
        out_size: int = 256,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()

    def stream(self) -> SceneCaptionStream:
        h = self.hparams
        return SceneCaptionStream(
            tasks=h.tasks, task_weights=h.task_weights, split="train", seed=h.seed, crops_per_scene=h.crops_per_scene,
            whole_scene_prob=h.whole_scene_prob, crop_margin=h.crop_margin, min_area=h.min_area, out_size=h.out_size,
        )

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(self.stream(), batch_size=h.batch_size, num_workers=h.num_workers,
                          collate_fn=collate_captioned, persistent_workers=h.num_workers > 0)


class TorchThreads(L.Callback):
    """Caps torch's intra-op CPU threads (set when the callback is built, before the model runs)."""

    def __init__(self, threads: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 (config key trainer.callbacks TorchThreads.threads), got {threads}")
        self.threads = threads
        torch.set_num_threads(threads)

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.threads)


def main() -> None:
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(TinyClipPretraining, SceneCaptionData, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
