"""AlignSAM as a LightningModule: PPO agent + Semantic Recalibration Module over a frozen SAM.

One ``training_step`` is one PPO iteration (``method.md``, "Training loop"): roll out B episodes
(the batch's images) with the current policy, then K epochs of minibatch PPO updates, then the SRM
update on the same images. Validation and test run greedy episodes and score the final masks with
the task's metrics (and, once per run, a centre click and T random clicks for reference).

Optimisation is manual (two optimizers, many updates per batch), so ``trainer.max_steps`` would
count optimizer steps: bound training with ``trainer.max_epochs``. The frozen SAM and CLIP never
enter the checkpoint (:func:`~alignsam.foundation.frozen.frozen_submodule`).
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import numpy as np
import torch

from alignsam.evaluation.evaluator import Evaluator
from alignsam.evaluation.scoring import original_logits
from alignsam.data.features import FeatureStore
from alignsam.foundation.frozen import frozen_submodule
from alignsam.foundation.segmenter import EmbeddedImages
from alignsam.foundation.registry import build_segmenter
from alignsam.geometry import MASK_LOGIT_THRESHOLD, sam_to_original_points, whole_image_maps_to_sam_grid
from alignsam.metrics import task_metrics
from alignsam.rl import ppo
from alignsam.rl.env import EnvConfig, Episodes, PromptingEnv, make_episodes
from alignsam.rl.ppo import PPOConfig
from alignsam.rl.policy import ActorCritic, PolicyConfig
from alignsam.srm import SemanticRecalibration, SRMConfig, srm_loss

warnings.filterwarnings("ignore", message=".*module.*in eval mode.*")  # the frozen SAM / CLIP, by design

BASELINES = ("centre", "random")  # scored once per run in validation (evaluate.py scores them all)


@dataclass
class SegmenterConfig:
    """The frozen SAM (``model.segmenter.*``): a registry name (``vit_b``, ``vit_l``, ``vit_h``,
    ``tiny``) and its local checkpoint file (nothing is downloaded)."""

    name: str = "vit_b"
    checkpoint: Optional[str] = "checkpoints/sam_vit_b_01ec64.pth"


@dataclass
class Rollout:
    """B episodes of T steps (``A = G*G``; ``h x w`` the embedding grid).

    masks ``(T, B, 1, h, w)`` m(M_{t-1}) of each state (the state is ``E * mask``); valid
    ``(T, B, A)`` the action mask each action was drawn under; actions, log_probs, values,
    rewards, labels ``(T, B)``; bootstrap_value ``(B,)`` V(s_T); final_mask ``(B, 1, h, w)``;
    final_logits ``(B, 1, 4h, 4w)``; iou_curve ``(T + 1, B)`` low-res IoU after P_0 and each step
    (None without ground truth); points ``(B, n, 2)`` and point_labels ``(B, n)`` every prompt, SAM frame;
    step_logits: T + 1 tensors ``(B, 1, 4h, 4w)``, SAM's logits after P_0 and after each step (the
    env's own list, not stacked: training never reads it).
    """

    masks: torch.Tensor
    valid: torch.Tensor
    actions: torch.Tensor
    log_probs: torch.Tensor
    values: torch.Tensor
    rewards: Optional[torch.Tensor]
    labels: torch.Tensor
    bootstrap_value: torch.Tensor
    final_mask: torch.Tensor
    final_logits: torch.Tensor
    iou_curve: Optional[torch.Tensor]
    points: torch.Tensor
    point_labels: torch.Tensor
    step_logits: List[torch.Tensor]


# The config dataclasses are hyperparameters, hence in every checkpoint: allow them for
# torch.load(weights_only=True), the default of torch >= 2.6 and of Trainer.fit(ckpt_path=...).
torch.serialization.add_safe_globals([SegmenterConfig, EnvConfig, PolicyConfig, SRMConfig, PPOConfig])


def _config(cls, value):
    """A config dataclass from itself or from a dict of its fields (errors name the bad key)."""
    if isinstance(value, dict):
        return cls(**value)
    return value


class AlignSAM(L.LightningModule):
    """The agent (policy + SRM) and its frozen foundation models.

    Args:
        task: metric set and label-map protocol: ``blur``, ``shadow``, ``glass``, ``saliency``,
            ``voc`` or ``categories`` (see :func:`alignsam.metrics.task_metrics`).
        segmenter: the frozen SAM.
        env, policy, srm, ppo: see :class:`EnvConfig`, :class:`PolicyConfig`, :class:`SRMConfig`,
            :class:`~alignsam.rl.ppo.PPOConfig`.
        matcher: keyword arguments of :func:`alignsam.foundation.registry.build_text_matcher`
            (``model_name``, ``checkpoint_path``, surgery options); needed when the policy or the
            SRM is ``explicit``, unused otherwise.
        feature_cache: directory of the on-disk cache of SAM embeddings and text maps.
        num_classes: classes incl. background for ``voc`` / ``categories`` (default from the task).
            Under DDP the episodes of one image can land on different ranks, so the label maps of
            these two tasks are assembled per rank: validate them on one device (evaluate.py does).
        seed: seed of the rollout sampler, the PPO minibatch order and the random-click baseline.
        log_images: episodes drawn to TensorBoard at every validation.
    """

    def __init__(
        self,
        task: str,
        segmenter: SegmenterConfig = SegmenterConfig(),
        env: EnvConfig = EnvConfig(),
        policy: PolicyConfig = PolicyConfig(),
        srm: SRMConfig = SRMConfig(),
        ppo: PPOConfig = PPOConfig(),
        matcher: Optional[Dict[str, Any]] = None,
        feature_cache: str = "cache/features",
        num_classes: Optional[int] = None,
        seed: int = 0,
        log_images: int = 4,
    ) -> None:
        super().__init__()
        # the configs may come as dicts (LightningCLI, or a checkpoint's hyperparameters)
        segmenter, env, policy = _config(SegmenterConfig, segmenter), _config(EnvConfig, env), _config(PolicyConfig, policy)
        srm, ppo = _config(SRMConfig, srm), _config(PPOConfig, ppo)
        self.save_hyperparameters()
        self.automatic_optimization = False
        explicit = policy.variant == "explicit" or srm.branch == "explicit"
        if explicit and matcher is None:
            raise ValueError("model.matcher is required when model.policy.variant or model.srm.branch is 'explicit'")
        if num_classes is None and task == "categories":
            from alignsam.data.scenes import CATEGORY_NAMES

            num_classes = 1 + len(CATEGORY_NAMES)
        self.num_classes = num_classes
        self.new_metrics()  # fails here, before any model is built, on an unknown task
        self.env_config, self.ppo_config, self.srm_config = env, ppo, srm
        self.segmenter = frozen_submodule(build_segmenter(segmenter.name, segmenter.checkpoint))
        self.matcher = None
        if explicit:
            from alignsam.foundation.registry import build_text_matcher

            self.matcher = frozen_submodule(build_text_matcher(**matcher))
        channels = self.segmenter.embed_dim
        self.policy = ActorCritic(channels, policy)
        self.srm = SemanticRecalibration(channels, srm)
        self.policy_text = policy.variant == "explicit"
        self.srm_text = srm.branch == "explicit"
        self.store = FeatureStore(feature_cache)
        self.generator = torch.Generator().manual_seed(seed)
        self.validation_table: Dict[str, Dict[str, float]] = {}
        self.test_table: Dict[str, Dict[str, float]] = {}
        # set by evaluate.py (EvaluateCLI.before_test) before trainer.test
        self.test_strategies: Optional[List[str]] = None
        self.oracle_clicks = 20
        self.prediction_hook = None
        self.validation_epoch = 0
        self._baseline_results: Dict[str, Dict[str, float]] = {}

    def new_metrics(self):
        """A fresh metric collection of the task (:func:`alignsam.metrics.task_metrics`)."""
        return task_metrics(self.hparams.task, self.num_classes)

    # -- features ------------------------------------------------------------------------------------
    def prepare(self, samples: Sequence[Dict], with_gt: bool = True):
        """Cached embeddings (and text maps) of a batch of samples -> (:class:`Episodes`, embedded).

        Runs outside mixed precision: the cache stores fp16 and its reads must not be autocast.
        """
        with torch.autocast(self.device.type, enabled=False):
            return self._prepare(samples, with_gt)

    def _prepare(self, samples: Sequence[Dict], with_gt: bool):
        embedded = self.store.embeddings(self.segmenter, samples, device=self.device)
        embedded = EmbeddedImages(embedded.embeddings.float(), embedded.original_hw, embedded.input_hw)
        text_map = None
        if self.matcher is not None:
            maps = self.store.text_maps(self.matcher, samples, self.segmenter.low_res_hw, device=self.device)
            text_map = whole_image_maps_to_sam_grid(maps.float(), embedded.input_hw, self.segmenter.img_size,
                                                    self.segmenter.embedding_hw)
        gts = [s["mask"] for s in samples] if with_gt else None
        return make_episodes(self.segmenter, embedded, self.env_config.grid, gts, text_map), embedded

    def _text(self, episodes: Episodes, used: bool) -> Optional[torch.Tensor]:
        return episodes.text_state if used else None

    # -- rollout -------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, episodes: Episodes, training: bool, greedy: bool, steps: Optional[int] = None,
                all_positive: bool = False) -> Rollout:
        """Run B episodes of ``steps`` (default ``env.steps``) with the current policy and SRM
        (``all_positive``: every click labelled positive instead of by the SRM)."""
        steps = steps or self.env_config.steps
        env = PromptingEnv(self.segmenter, self.env_config, self.srm_config.threshold, all_positive)
        policy_text, srm_text = self._text(episodes, self.policy_text), self._text(episodes, self.srm_text)
        srm_probs = torch.sigmoid(self.srm(env.blank_state(episodes), srm_text))
        state = env.reset(episodes, srm_probs, training)
        record: Dict[str, List[torch.Tensor]] = {k: [] for k in ("masks", "valid", "actions", "log_probs", "values", "rewards", "labels")}
        for _ in range(steps):
            logits, value = self.policy(state, episodes.pool, policy_text)
            # sampled on the CPU with the module's generator, whose state the checkpoint keeps
            actions, log_probs = ppo.sample_actions(logits.float().cpu(), env.valid.cpu(), self.generator, greedy)
            actions = actions.to(self.device)
            srm_probs = torch.sigmoid(self.srm(state, srm_text))
            record["masks"].append(env.mask)
            record["valid"].append(env.valid)
            record["actions"].append(actions)
            record["log_probs"].append(log_probs.to(self.device))
            record["values"].append(value.float())
            result = env.step(actions, srm_probs)
            state = result.state
            record["labels"].append(result.labels)
            if result.reward is not None:
                record["rewards"].append(result.reward)
        final_mask = env.mask
        _, bootstrap = self.policy(state, episodes.pool, policy_text)
        stack = lambda key: torch.stack(record[key]) if record[key] else None  # noqa: E731
        return Rollout(
            masks=stack("masks"), valid=stack("valid"), actions=stack("actions"), log_probs=stack("log_probs"),
            values=stack("values"), rewards=stack("rewards"), labels=stack("labels"),
            bootstrap_value=bootstrap.float(), final_mask=final_mask, final_logits=env.logits,
            iou_curve=torch.stack(env.iou_history) if env.iou_history else None,
            points=env.points, point_labels=env.labels, step_logits=env.logits_history,
        )

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch: List[Dict], batch_idx: int) -> None:
        episodes, _ = self.prepare(batch)
        rollout = self.rollout(episodes, training=True, greedy=False)
        stats = self.ppo_update(episodes, rollout)
        stats["srm/loss"] = self.srm_update(episodes, rollout)
        returns = rollout.rewards.sum(0)
        on_gt = episodes.patch_on_gt.gather(1, rollout.actions.T)  # (B, T)
        stats.update({
            "train/return": returns.mean(), "train/final_iou": rollout.iou_curve[-1].mean(),
            "train/initial_iou": rollout.iou_curve[0].mean(),
            "train/label_accuracy": (rollout.labels.T.bool() == on_gt).float().mean(),
            "train/clicks_on_target": on_gt.float().mean(),
        })
        b = len(batch)
        self.log_dict(stats, batch_size=b, on_step=True, on_epoch=False, prog_bar=False)
        self.log_dict({"train/final_iou_epoch": rollout.iou_curve[-1].mean(), "train/return_epoch": returns.mean()},
                      batch_size=b, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict({f"train_iou_curve/step_{t:02d}": v for t, v in enumerate(rollout.iou_curve.mean(1))},
                      batch_size=b, on_step=False, on_epoch=True)

    def ppo_update(self, episodes: Episodes, rollout: Rollout) -> Dict[str, torch.Tensor]:
        """K epochs of clipped-PPO minibatch updates on one rollout; returns the last epoch's means."""
        cfg = self.ppo_config
        policy_opt = self.optimizers()[0]
        advantages, returns = ppo.gae(rollout.rewards, rollout.values, rollout.bootstrap_value, cfg.gamma, cfg.gae_lambda)
        t_count, b_count = rollout.actions.shape
        policy_text = self._text(episodes, self.policy_text)
        sums: Dict[str, float] = {}
        for epoch in range(cfg.epochs):
            sums = {}
            batches = ppo.minibatches(t_count * b_count, cfg.minibatch_size, self.generator)
            for index in batches:
                index = index.to(self.device)
                t, b = index // b_count, index % b_count
                state = episodes.embeddings[b] * rollout.masks[t, b]
                logits, value = self.policy(state, episodes.pool[b], None if policy_text is None else policy_text[b])
                valid = rollout.valid[t, b]
                new_log_probs = ppo.action_log_probs(logits, valid, rollout.actions[t, b])
                adv = advantages[t, b]
                if cfg.normalize_advantages:
                    adv = ppo.normalize(adv)
                policy_loss, info = ppo.clipped_policy_loss(new_log_probs, rollout.log_probs[t, b], adv, cfg.clip)
                old_values = rollout.values[t, b] if cfg.clip_value_loss else None
                v_loss = ppo.value_loss(value, returns[t, b], old_values, cfg.clip if cfg.clip_value_loss else None)
                entropy = ppo.masked_entropy(logits, valid).mean()
                loss = policy_loss + cfg.value_coef * v_loss - cfg.entropy_coef * entropy
                policy_opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(policy_opt, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                policy_opt.step()
                for key, value_ in (("policy_loss", policy_loss), ("value_loss", v_loss), ("entropy", entropy),
                                    ("approx_kl", info["approx_kl"]), ("clip_fraction", info["clip_fraction"])):
                    sums[key] = sums.get(key, 0.0) + float(value_.detach()) / len(batches)
        out = {f"ppo/{k}": torch.tensor(v) for k, v in sums.items()}
        out["ppo/explained_variance"] = torch.tensor(ppo.explained_variance(rollout.values.flatten(), returns.flatten()))
        return out

    def srm_update(self, episodes: Episodes, rollout: Rollout) -> torch.Tensor:
        """One pass of Dice + BCE over every state of the rollout (the blank one included)."""
        srm_opt = self.optimizers()[1]
        masks = torch.cat([torch.ones_like(rollout.masks[:1]), rollout.masks, rollout.final_mask[None]])  # (T+2, B, ...)
        t_count, b_count = masks.shape[:2]
        srm_text = self._text(episodes, self.srm_text)
        valid = episodes.region > 0.5
        total = 0.0
        batches = ppo.minibatches(t_count * b_count, self.ppo_config.minibatch_size, self.generator)
        for index in batches:
            index = index.to(self.device)
            t, b = index // b_count, index % b_count
            logits = self.srm(episodes.embeddings[b] * masks[t, b], None if srm_text is None else srm_text[b])
            loss = srm_loss(logits, episodes.gt_grid[b], valid[b], self.srm_config)
            srm_opt.zero_grad()
            self.manual_backward(loss)
            srm_opt.step()
            total += float(loss.detach()) / len(batches)
        return torch.tensor(total)

    def configure_optimizers(self):
        policy_opt = torch.optim.Adam(self.policy.parameters(), lr=self.ppo_config.lr, eps=self.ppo_config.adam_eps)
        srm_opt = torch.optim.Adam(self.srm.parameters(), lr=self.srm_config.lr)
        return [policy_opt, srm_opt]

    # -- evaluation ----------------------------------------------------------------------------------
    # Validation scores the agent (and, once per run, the centre / random baselines); the test loop
    # (evaluate.py) scores every strategy of ``self.test_strategies``. Scoring lives in
    # alignsam.evaluation; the tables land in ``validation_table`` / ``test_table``.
    def on_validation_epoch_start(self) -> None:
        self._run_baselines = not self._baseline_results and not self.trainer.sanity_checking
        strategies = ["agent"] + (list(BASELINES) if self._run_baselines else [])
        self._evaluator = Evaluator(self, strategies, seed=self.hparams.seed + 1)

    def on_test_epoch_start(self) -> None:
        from alignsam.evaluation.strategies import NEEDS_PROTOTYPES, check_strategies, default_strategies

        names = self.test_strategies or default_strategies(self.matcher is not None)
        names = check_strategies(names, self.matcher is not None)
        train = None
        if any(n in NEEDS_PROTOTYPES for n in names):
            datamodule = getattr(self.trainer, "datamodule", None)
            train = getattr(datamodule, "train_dataset", None)
        self._evaluator = Evaluator(self, names, seed=self.hparams.seed + 1, oracle_clicks=self.oracle_clicks,
                                    train_samples=train, on_agent=self.prediction_hook)

    def validation_step(self, batch: List[Dict], batch_idx: int) -> None:
        outcomes, embedded = self._evaluator.add_batch(batch)
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self._log_episode_images(batch, outcomes["agent"], embedded)

    def test_step(self, batch: List[Dict], batch_idx: int) -> None:
        self._evaluator.add_batch(batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        table = self._evaluator.compute()
        if self._run_baselines:
            self._baseline_results = {k: v for k, v in table.items() if k != "agent"}
        table.update({k: v for k, v in self._baseline_results.items() if k not in table})
        self.validation_table = table
        # epochs trained when this table was made: inside fit the epoch in progress counts; a
        # validate() after fit (train.py's final validation) sees current_epoch = epochs done
        self.validation_epoch = self.current_epoch + (1 if self.trainer.state.fn == "fit" else 0)
        self._log_table("val", table)

    def on_test_epoch_end(self) -> None:
        self.test_table = self._evaluator.compute()
        if self.prediction_hook is not None and hasattr(self.prediction_hook, "finish"):
            self.prediction_hook.finish(self._evaluator)
        if self.logger is not None:  # evaluate.py has none: it writes the table and its own events
            self._log_table("test", self.test_table)

    def _log_table(self, stage: str, table: Dict[str, Dict[str, float]]) -> None:
        """``<stage>/<metric>`` for the agent, ``<stage>_<strategy>/<metric>`` for the others and
        ``<stage>_iou_curve/step_NN`` for the agent's IoU after each click."""
        for name, values in table.items():
            prefix = stage if name == "agent" else f"{stage}_{name}"
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items() if not k.startswith("iou@")}, sync_dist=True)
        curve = {k: v for k, v in table["agent"].items() if k.startswith("iou@")}
        self.log_dict({f"{stage}_iou_curve/step_{int(k[4:]):02d}": v for k, v in curve.items()}, sync_dist=True)

    def _log_episode_images(self, batch: List[Dict], outcome, embedded: EmbeddedImages) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        from alignsam.visualize import episode_panel, stack_panels

        if not isinstance(self.logger, TensorBoardLogger) or self.hparams.log_images <= 0:
            return
        n = min(self.hparams.log_images, len(batch))
        points = sam_to_original_points(outcome.points[:n].float(), embedded.original_hw[:n], self.segmenter.img_size)
        panels = []
        logits = original_logits(self.segmenter, outcome.logits[:n], embedded)
        for i in range(n):
            mask = logits[i] > MASK_LOGIT_THRESHOLD
            panels.append(episode_panel(batch[i]["image"], np.asarray(batch[i]["mask"], bool), mask.cpu().numpy(),
                                        points[i].cpu().numpy(), outcome.labels[i].cpu().numpy(),
                                        title=f"{batch[i]['id']} ({batch[i].get('text', '')})"))
        self.logger.experiment.add_image("val/episodes", stack_panels(panels), self.global_step, dataformats="HWC")

    # -- DDP ---------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        # Each manual_backward reaches only the policy or only the SRM, so DDP must not wait for the others.
        if isinstance(self.trainer.strategy, DDPStrategy):
            self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    def __getstate__(self) -> Dict[str, Any]:
        # A torch.Generator cannot cross torch.multiprocessing (ddp_spawn): send its state as bytes.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        super().__setstate__({**state, "generator": generator})

    # -- checkpoints: the sampler state makes a resumed run identical to an uninterrupted one -------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # plain dicts, as LightningCLI records them, so that evaluate.py --ckpt_path can parse them back
        hparams = checkpoint.get("hyper_parameters", {})
        checkpoint["hyper_parameters"] = {k: asdict(v) if is_dataclass(v) else v for k, v in hparams.items()}
        checkpoint["alignsam"] = {"generator": self.generator.get_state(), "baselines": self._baseline_results}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get("alignsam", {})
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self._baseline_results = state.get("baselines", {})
