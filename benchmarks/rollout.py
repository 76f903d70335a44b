"""Environment steps per second: the project's batched rollout against a naive per-episode loop.

For each model, batch size B and episode length T, the same B episodes (cached embeddings: the image
encoder never runs in the timed region) are rolled out twice:

(a) naive: one :class:`~alignsam.rl.env.PromptingEnv` per episode, stepped one after the other; each
    runs the policy and the SRM on its own state (batch 1), draws its action, and re-segments with
    ``SamPredictor.predict`` on its own image with every click so far (original-frame clicks; the
    predictor also upsamples each mask to the image's size, as segment-anything does);
(b) ``Agent.rollout``: all B episodes in lock-step, one batched policy, SRM and SAM decode a step
    (:meth:`~alignsam.foundation.segmenter.Segmenter.decode`, chunked where that is faster).

Both draw their actions from generators in the same state and in the same order (step by step,
episode by episode), so they take the same actions and must produce the same masks: the check
printed under the table compares the actions, the rewards, the final low-res logits and masks.

(c) ``Agent.rollout`` as training runs it, at ``model.ppo.precision`` (``--precision``, default
``auto``: bf16 where the device has native bfloat16, see ``alignsam.rl.ppo.resolved_precision``):
the policy and the SRM in bfloat16, SAM's decode in float32. Its actions are not bit-equal to
(a)'s (the policy's logits differ in the last bits); the check prints how many agree. When the
precision resolves to fp32, (c) is (b) and is not timed twice.

Models: the tiny SAM (``checkpoints/tiny_sam.pt``, on rendered bundled-world scenes) and the ViT-B
architecture with random weights (``segment_anything.sam_model_registry['vit_b'](checkpoint=None)``;
its encoder never runs: random embeddings stand for cached ones, random ellipses for the ground
truth, VOC-like image sizes). The policy and SRM are freshly initialised (implicit branches).
Each pass times (a) then (b), ``--repeats`` passes after ``--warmup`` untimed ones; the table gives
the median rates and the median of the per-pass ratios (both sides of a ratio saw the same load).

    python benchmarks/rollout.py --threads 1
    python benchmarks/rollout.py --models vit_b --batch-sizes 8 32 --steps 5
    python benchmarks/rollout.py --device cuda --models vit_b --batch-sizes 64 128
    python benchmarks/rollout.py --precision fp32      # (b) and (a) only
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything import SamPredictor

from alignsam.agent import Agent, SegmenterConfig
from alignsam.foundation.segmenter import EmbeddedImages
from alignsam.geometry import input_size_for, sam_to_original_points
from alignsam.rl import ppo
from alignsam.rl.env import EnvConfig, Episodes, PromptingEnv, make_episodes
from alignsam.rl.policy import PolicyConfig
from alignsam.srm import SRMConfig

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = {"tiny": str(ROOT / "checkpoints" / "tiny_sam.pt"), "vit_b": None}
VIT_B_IMAGE_HW = [(375, 500), (500, 375), (480, 640), (500, 500)]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "vit_b"], choices=sorted(CHECKPOINTS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32], help="episodes rolled out together (B)")
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 15], help="clicks per episode (T)")
    parser.add_argument("--grid", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", choices=ppo.PRECISIONS,
                        help="model.ppo.precision of the training-precision rollout (c); default: auto")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- episodes ---------------------------------------------------------------------------------------
def tiny_episodes(agent: Agent, batch: int, seed: int) -> Tuple[EmbeddedImages, List[np.ndarray]]:
    """B rendered saliency scenes, embedded by the tiny SAM (outside any timing)."""
    from alignsam.data.scenes import render_scene

    scenes = [render_scene("saliency", 10_000 + seed * 1000 + i) for i in range(batch)]
    return agent.segmenter.embed([s.image for s in scenes]), [s.target() for s in scenes]


def random_episodes(agent: Agent, batch: int, seed: int) -> Tuple[EmbeddedImages, List[np.ndarray]]:
    """Random embeddings at the scale of SAM's features and random ellipses as ground truth."""
    segmenter = agent.segmenter
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    original = [VIT_B_IMAGE_HW[i % len(VIT_B_IMAGE_HW)] for i in range(batch)]
    embeddings = torch.randn(batch, segmenter.embed_dim, *segmenter.embedding_hw, generator=gen) * 0.3
    gts = []
    for h, w in original:
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx, ry, rx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
        gts.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    input_hw = torch.tensor([input_size_for(hw, segmenter.img_size) for hw in original])
    return EmbeddedImages(embeddings, torch.tensor(original), input_hw), gts


# -- the naive loop ---------------------------------------------------------------------------------
class PredictorSegmenter:
    """What :class:`PromptingEnv` needs of a segmenter, for ONE image, decoded by ``SamPredictor.predict``
    with every click so far (converted back to the image's original frame, as a user would pass them)."""

    def __init__(self, segmenter, embedding: torch.Tensor, original_hw: Tuple[int, int]) -> None:
        self.img_size, self.embedding_hw, self.low_res_hw = segmenter.img_size, segmenter.embedding_hw, segmenter.low_res_hw
        self.original_hw = torch.tensor([original_hw])
        self.predictor = SamPredictor(segmenter.sam)
        self.predictor.features = embedding[None]
        self.predictor.original_size = tuple(original_hw)
        self.predictor.input_size = input_size_for(tuple(original_hw), segmenter.img_size)
        self.predictor.is_image_set = True

    def decode(self, embeddings, points, labels, mask_input=None):
        coords = sam_to_original_points(points.float().cpu(), self.original_hw, self.img_size)[0].numpy()
        _, iou, low_res = self.predictor.predict(
            point_coords=coords, point_labels=labels[0].cpu().numpy(),
            mask_input=None if mask_input is None else mask_input[0].cpu().numpy(),
            multimask_output=False, return_logits=True,
        )
        device = embeddings.device
        return torch.from_numpy(low_res)[None].to(device), torch.from_numpy(iou)[None].to(device)


def single_episodes(episodes: Episodes) -> List[Episodes]:
    """Episode ``i`` of a batch as a batch of one."""
    fields = ("embeddings", "original_hw", "input_hw", "pool", "region", "action_points", "text_map", "gt_low",
              "valid_low", "gt_grid", "patch_on_gt", "sam_embeddings")
    return [Episodes(**{f: None if getattr(episodes, f) is None else getattr(episodes, f)[i : i + 1] for f in fields})
            for i in range(len(episodes))]


@torch.no_grad()
def naive_rollout(agent: Agent, singles: List[Episodes], predictors: List[PredictorSegmenter], steps: int,
                  generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """(a): one environment per episode, batch-1 networks, ``SamPredictor.predict`` per step."""
    envs, states = [], []
    for episode, predictor in zip(singles, predictors):
        env = PromptingEnv(predictor, agent.env_config, agent.srm_config.threshold)
        srm_probs = torch.sigmoid(agent.srm(env.blank_state(episode), None))
        states.append(env.reset(episode, srm_probs, training=True))
        envs.append(env)
    actions, rewards, log_probs = [], [], []
    for _ in range(steps):
        step_actions, step_rewards, step_log_probs = [], [], []
        for i, (env, episode) in enumerate(zip(envs, singles)):
            logits, _ = agent.policy(states[i], episode.pool, None)
            action, log_prob = ppo.sample_actions(logits.float().cpu(), env.valid.cpu(), generator)
            srm_probs = torch.sigmoid(agent.srm(states[i], None))
            result = env.step(action.to(states[i].device), srm_probs)
            states[i] = result.state
            step_actions.append(action)
            step_rewards.append(result.reward.cpu())
            step_log_probs.append(log_prob)
        actions.append(torch.cat(step_actions))
        rewards.append(torch.cat(step_rewards))
        log_probs.append(torch.cat(step_log_probs))
    for i, episode in enumerate(singles):
        agent.policy(states[i], episode.pool, None)  # V(s_T), as the rollout bootstraps
    return {"actions": torch.stack(actions), "rewards": torch.stack(rewards), "log_probs": torch.stack(log_probs),
            "final_logits": torch.cat([env.logits.cpu() for env in envs])}


def project_rollout(agent: Agent, episodes: Episodes, steps: int, precision: str = "fp32") -> Dict[str, torch.Tensor]:
    """(b), or (c) with ``precision``: ``Agent.rollout`` as training calls it, the policy and the
    SRM at ``model.ppo.precision = precision``."""
    configured = agent.ppo_config.precision
    agent.ppo_config.precision = precision
    try:
        rollout = agent.rollout(episodes, training=True, greedy=False, steps=steps)
    finally:
        agent.ppo_config.precision = configured
    return {"actions": rollout.actions.cpu(), "rewards": rollout.rewards.cpu(), "log_probs": rollout.log_probs.cpu(),
            "final_logits": rollout.final_logits.cpu(), "points": rollout.points, "labels": rollout.point_labels}


@torch.no_grad()
def bf16_decode_effect(agent: Agent, episodes: Episodes, points: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """What a bfloat16 SAM decode does to the masks of the episodes' final prompts: SAM's decoder
    under bf16 autocast (as ``Trainer(precision="bf16-mixed")`` ran it before ``Segmenter.decode``
    turned autocast off) against float32."""
    segmenter = agent.segmenter
    full, _ = segmenter.decode(episodes.sam_embeddings, points, labels)
    with torch.autocast(episodes.sam_embeddings.device.type, dtype=torch.bfloat16):
        half, _ = segmenter.decode_with_grad(episodes.sam_embeddings, points, labels)
    a, b = full > 0, half.float() > 0
    union = (a | b).flatten(1).sum(1).clamp(min=1)
    return {"bf16_logit_diff": (full - half.float()).abs().max().item(),
            "bf16_mask_agreement": (a == b).float().mean().item(),
            "bf16_min_iou": ((a & b).flatten(1).sum(1) / union).min().item()}


def compare(naive: Dict[str, torch.Tensor], ours: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """How far (b) is from (a): equal actions and rewards, logit and mask differences."""
    masks_a, masks_b = naive["final_logits"] > 0, ours["final_logits"] > 0
    return {
        "same_actions": bool(torch.equal(naive["actions"], ours["actions"])),
        "same_rewards": bool(torch.allclose(naive["rewards"], ours["rewards"], atol=1e-5)),
        "log_prob_diff": (naive["log_probs"] - ours["log_probs"]).abs().max().item(),
        "logit_diff": (naive["final_logits"] - ours["final_logits"]).abs().max().item(),
        "mask_agreement": (masks_a == masks_b).float().mean().item(),
    }


def alternating_seconds(runs: Dict[str, Callable[[], None]], warmup: int, repeats: int,
                        device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each run, ``repeats`` times after ``warmup`` untimed passes, the runs alternating
    within every pass so that they see the same machine load."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for index in range(warmup + repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def benchmark_model(name: str, args, device: torch.device, cache: str) -> List[dict]:
    torch.manual_seed(args.seed)
    rows = []
    agent = Agent("saliency", SegmenterConfig(name=name, checkpoint=CHECKPOINTS[name]),
                  env=EnvConfig(steps=max(args.steps), grid=args.grid), policy=PolicyConfig(variant="implicit"),
                  srm=SRMConfig(branch="implicit"), ppo=ppo.PPOConfig(precision="fp32"), feature_cache=cache, seed=args.seed)  # branch: older checkouts' name
    agent = agent.to(device).eval()
    training_precision = ppo.resolved_precision(args.precision, device)
    for batch in args.batch_sizes:
        make = tiny_episodes if name == "tiny" else random_episodes
        embedded, gts = make(agent, batch, args.seed)
        embedded = EmbeddedImages(embedded.embeddings.to(device), embedded.original_hw, embedded.input_hw)
        episodes = make_episodes(agent.segmenter, embedded, args.grid, gts)
        singles = single_episodes(episodes)
        predictors = [PredictorSegmenter(agent.segmenter, embedded.embeddings[i], tuple(embedded.original_hw[i].tolist()))
                      for i in range(batch)]
        for steps in args.steps:
            outputs = {}

            def run_naive():
                outputs["naive"] = naive_rollout(agent, singles, predictors, steps, torch.Generator().manual_seed(args.seed))

            def run_ours():
                agent.generator.manual_seed(args.seed)
                outputs["ours"] = project_rollout(agent, episodes, steps)

            def run_training_precision():
                agent.generator.manual_seed(args.seed)
                outputs["train"] = project_rollout(agent, episodes, steps, training_precision)

            runs = {"naive": run_naive, "ours": run_ours}
            if training_precision != "fp32":
                runs["train"] = run_training_precision
            times = alternating_seconds(runs, args.warmup, args.repeats, device)
            times.setdefault("train", times["ours"])
            outputs.setdefault("train", outputs["ours"])
            rate = {k: batch * steps / statistics.median(v) for k, v in times.items()}
            ratio = statistics.median(a / b for a, b in zip(times["naive"], times["ours"]))
            train_ratio = statistics.median(a / b for a, b in zip(times["naive"], times["train"]))
            rows.append({"model": name + (" (random weights)" if CHECKPOINTS[name] is None else ""), "B": batch,
                         "T": steps, **rate, "ratio": ratio, "train_ratio": train_ratio,
                         "precision": training_precision,
                         "train_action_agreement": (outputs["train"]["actions"] == outputs["naive"]["actions"]).float().mean().item(),
                         **compare(outputs["naive"], outputs["ours"]),
                         **bf16_decode_effect(agent, episodes, outputs["ours"]["points"], outputs["ours"]["labels"])})
            print(f"  done: {name} B={batch} T={steps}", flush=True)
    return rows


def markdown_table(rows: List[dict]) -> str:
    precision = rows[0]["precision"] if rows else "fp32"
    lines = ["| model | B | T | (a) naive loop, env steps/s | (b) Agent.rollout fp32, env steps/s | (b) / (a) "
             f"| (c) Agent.rollout {precision}, env steps/s | (c) / (a) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['B']} | {r['T']} | {r['naive']:.1f} | {r['ours']:.1f} | {r['ratio']:.2f}x "
                     f"| {r['train']:.1f} | {r['train_ratio']:.2f}x |")
    return "\n".join(lines)


def check_lines(rows: List[dict]) -> str:
    lines = ["Check, (b) against (a) on the same episodes and generator state:"]
    for r in rows:
        lines.append(
            f"  {r['model']} B={r['B']} T={r['T']}: same actions {'yes' if r['same_actions'] else 'NO'}, "
            f"same rewards {'yes' if r['same_rewards'] else 'NO'}, max |log-prob diff| {r['log_prob_diff']:.2g}, "
            f"final low-res logits max |diff| {r['logit_diff']:.2g}, masks agree on {100 * r['mask_agreement']:.3f}% of pixels")
    for r in rows:
        if r["precision"] != "fp32":
            lines.append(f"  (c) at {r['precision']}, {r['model']} B={r['B']} T={r['T']}: "
                         f"{100 * r['train_action_agreement']:.1f}% of its actions equal to (a)'s")
    lines.append("SAM's decode in bfloat16 instead (autocast; not used: Segmenter.decode stays float32), final prompts:")
    for r in rows:
        lines.append(f"  {r['model']} B={r['B']} T={r['T']}: masks agree on {100 * r['bf16_mask_agreement']:.2f}% of "
                     f"pixels, lowest per-episode IoU with the float32 mask {r['bf16_min_iou']:.3f}, "
                     f"max |logit diff| {r['bf16_logit_diff']:.2g}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode import machine_description

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_description(device), flush=True)
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            rows += benchmark_model(name, args, device, cache)
    print()
    print(markdown_table(rows))
    print()
    print(check_lines(rows))
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"\nEnv steps per second = B * T / median seconds of one rollout ({args.repeats} alternating passes "
          f"after {args.warmup} warm-up; the initial prompts' decode included); (b) / (a) is the median of the "
          f"per-pass ratios. Load average at the end: {load}.")
    return rows


if __name__ == "__main__":
    main()
