"""AlignSAM as a LightningModule: what is Lightning's job around the :class:`~alignsam.agent.Agent`.

The agent (frozen SAM and CLIP, policy, SRM, feature preparation, rollout) lives in
:mod:`alignsam.agent`, shared with evaluation and the Python API. This module holds the
optimisation (one ``training_step`` is one PPO iteration, docs/method.md "Training loop": roll out B
episodes with the current policy, then K epochs of minibatch PPO updates, then the SRM update on
the same images), the validation / test loops (scored by :mod:`alignsam.evaluation`), logging and
the checkpoint hooks.

Optimisation is manual (two optimizers, many updates per batch), so ``trainer.max_steps`` would
count optimizer steps: bound training with ``trainer.max_epochs``. The frozen SAM and CLIP never
enter the checkpoint (:func:`~alignsam.foundation.frozen.frozen_submodule`).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import lightning as L
import numpy as np
import torch

from alignsam.agent import AGENT_PREFIX, Agent, Rollout, SegmenterConfig, as_config, plain_config
from alignsam.evaluation.episodes import EpisodeStatistics
from alignsam.evaluation.evaluator import Evaluator
from alignsam.evaluation.scoring import original_logits
from alignsam.foundation.segmenter import EmbeddedImages
from alignsam.geometry import MASK_LOGIT_THRESHOLD, sam_to_original_points
from alignsam.rl import ppo
from alignsam.rl.env import EnvConfig, Episodes
from alignsam.rl.ppo import PPOConfig
from alignsam.rl.policy import PolicyConfig
from alignsam.srm import SRMConfig, srm_loss

warnings.filterwarnings("ignore", message=".*module.*in eval mode.*")  # the frozen SAM / CLIP, by design

BASELINES = ("centre", "random")  # scored once per run in validation (evaluate.py scores them all)
# what ppo_update returns as ppo/<name>, the last epoch's minibatch means
PPO_STATISTICS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")
__all__ = ["AlignSAM", "SegmenterConfig", "Rollout", "BASELINES"]

# The config dataclasses may be hyperparameters of older checkpoints: allow them for
# torch.load(weights_only=True), the default of torch >= 2.6 and of Trainer.fit(ckpt_path=...).
# SegmenterConfig was defined in this module before alignsam.agent existed: keep that name loadable.
torch.serialization.add_safe_globals([SegmenterConfig, (SegmenterConfig, "alignsam.module.SegmenterConfig"),
                                      EnvConfig, PolicyConfig, SRMConfig, PPOConfig])


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
        segmenter, env, policy = as_config(SegmenterConfig, segmenter), as_config(EnvConfig, env), as_config(PolicyConfig, policy)
        srm, ppo = as_config(SRMConfig, srm), as_config(PPOConfig, ppo)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.agent = Agent(task, segmenter, env, policy, srm, ppo, matcher, feature_cache, num_classes, seed)
        self.validation_table: Dict[str, Dict[str, float]] = {}
        self.test_table: Dict[str, Dict[str, float]] = {}
        # the test loop's per-episode statistics (evaluate.py writes them to test_episodes.npz)
        self.test_episodes: Optional[EpisodeStatistics] = None
        # set by evaluate.py (EvaluateCLI.before_test) before trainer.test
        self.test_strategies: Optional[List[str]] = None
        self.oracle_clicks = 20
        self.prediction_hook = None
        self.validation_epoch = 0
        self._baseline_results: Dict[str, Dict[str, float]] = {}
        # checkpoints written before the agent had a module of its own name the weights policy.* / srm.*
        self.register_load_state_dict_pre_hook(_prefix_legacy_keys)

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch: List[Dict], batch_idx: int) -> None:
        agent = self.agent
        episodes, _ = agent.prepare(batch)
        rollout = agent.rollout(episodes, training=True, greedy=False)
        stats = self.ppo_update(episodes, rollout)
        stats["srm/loss"] = self.srm_update(episodes, rollout)
        returns = rollout.rewards.sum(0)
        on_gt = episodes.patch_on_gt.gather(1, rollout.actions.T)  # (B, T)
        sent = rollout.labels.T >= 0  # (B, T): label_rule drop marks the clicks not sent to SAM -1
        correct = (rollout.labels.T == on_gt.long()) & sent
        stats.update({
            "train/return": returns.mean(), "train/final_iou": rollout.iou_curve[-1].mean(),
            "train/initial_iou": rollout.iou_curve[0].mean(),
            "train/label_accuracy": correct.sum() / sent.sum().clamp(min=1),  # of the labels SAM got
            "train/clicks_on_target": on_gt.float().mean(),
        })
        if agent.srm_config.label_rule == "drop":
            stats["train/dropped_clicks"] = (~sent).float().mean()
        b = len(batch)
        self.log_dict(stats, batch_size=b, on_step=True, on_epoch=False, prog_bar=False)
        self.log_dict({"train/final_iou_epoch": rollout.iou_curve[-1].mean(), "train/return_epoch": returns.mean()},
                      batch_size=b, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict({f"train_iou_curve/step_{t:02d}": v for t, v in enumerate(rollout.iou_curve.mean(1))},
                      batch_size=b, on_step=False, on_epoch=True)

    def ppo_update(self, episodes: Episodes, rollout: Rollout) -> Dict[str, torch.Tensor]:
        """K epochs of clipped-PPO minibatch updates on one rollout; returns the last epoch's means.

        Nothing here waits for the device per minibatch: the K epochs' shuffles are drawn up front
        (the same draws as one per epoch) and moved in one transfer, the action masks are checked
        once, and the statistics stay on the device (0-dim tensors for the logger). With
        ``model.ppo.precision: bf16`` the policy runs under bfloat16 autocast; the losses are float32.
        """
        agent, cfg = self.agent, self.agent.ppo_config
        policy_opt = self.optimizers()[0]
        advantages, returns = ppo.gae(rollout.rewards, rollout.values, rollout.bootstrap_value, cfg.gamma, cfg.gae_lambda)
        t_count, b_count = rollout.actions.shape
        # the networks' inputs in their precision (bf16: cast once here, as the rollout did)
        # (model.policy.srm_input: also the SRM maps the rollout fed the policy; stored, so detached)
        embeddings, masks, pool, policy_text, srm_blank, srm_maps = (ppo.network_input(cfg.precision, x) for x in (
            episodes.embeddings, rollout.masks, episodes.pool, agent.policy_text_state(episodes),
            rollout.srm_blank, rollout.srm_maps))
        ppo.check_actions(rollout.valid, rollout.actions)  # once, instead of in every minibatch
        states = ppo.all_states(embeddings, masks)  # (T*B, C, h, w) formed once, or None when too large
        epochs = ppo.epoch_minibatches(t_count * b_count, cfg.minibatch_size, cfg.epochs, agent.generator, self.device)
        last_epoch: List[torch.Tensor] = []
        for epoch, batches in enumerate(epochs):
            for index in batches:
                t, b = index // b_count, index % b_count
                state = embeddings[b] * masks[t, b] if states is None else states[index]
                srm_input = None if srm_maps is None else agent.policy_srm_maps(srm_blank[b], srm_maps[t, b])
                with ppo.autocast(cfg.precision, self.device):
                    logits, value = agent.policy(state, pool[b], None if policy_text is None else policy_text[b],
                                                 srm_input)
                logits, value = logits.float(), value.float()
                valid = rollout.valid[t, b]
                new_log_probs = ppo.action_log_probs(logits, valid, rollout.actions[t, b], check=False)
                adv = advantages[t, b]
                if cfg.normalize_advantages:
                    adv = ppo.normalize(adv)
                policy_loss, info = ppo.clipped_policy_loss(new_log_probs, rollout.log_probs[t, b], adv, cfg.clip)
                old_values = rollout.values[t, b] if cfg.clip_value_loss else None
                v_loss = ppo.value_loss(value, returns[t, b], old_values, cfg.clip if cfg.clip_value_loss else None)
                entropy = ppo.masked_entropy(logits, valid, check=False).mean()
                loss = policy_loss + cfg.value_coef * v_loss - cfg.entropy_coef * entropy
                policy_opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(policy_opt, gradient_clip_val=cfg.max_grad_norm, gradient_clip_algorithm="norm")
                policy_opt.step()
                if epoch == len(epochs) - 1:
                    last_epoch.append(torch.stack([policy_loss.detach(), v_loss.detach(), entropy.detach(),
                                                   info["approx_kl"], info["clip_fraction"]]))
        means = torch.stack(last_epoch).mean(0)
        out = {f"ppo/{k}": v for k, v in zip(PPO_STATISTICS, means)}
        out["ppo/explained_variance"] = ppo.explained_variance_tensor(rollout.values, returns)
        return out

    def srm_update(self, episodes: Episodes, rollout: Rollout) -> torch.Tensor:
        """One pass of Dice + BCE over every state of the rollout (the blank one included); returns
        the mean minibatch loss as a 0-dim tensor on the device (no host read)."""
        srm_opt = self.optimizers()[1]
        masks = torch.cat([torch.ones_like(rollout.masks[:1]), rollout.masks, rollout.final_mask[None]])  # (T+2, B, ...)
        t_count, b_count = masks.shape[:2]
        agent = self.agent
        precision = agent.ppo_config.precision
        embeddings, masks, srm_text = (ppo.network_input(precision, x) for x in (
            episodes.embeddings, masks, agent.srm_text_state(episodes)))
        valid = episodes.region > 0.5
        losses: List[torch.Tensor] = []
        batches = ppo.epoch_minibatches(t_count * b_count, agent.ppo_config.minibatch_size, 1, agent.generator,
                                        self.device)[0]
        for index in batches:
            t, b = index // b_count, index % b_count
            with ppo.autocast(precision, self.device):
                logits = agent.srm(embeddings[b] * masks[t, b], None if srm_text is None else srm_text[b])
            loss = srm_loss(logits.float(), episodes.gt_grid[b], valid[b], agent.srm_config)
            srm_opt.zero_grad()
            self.manual_backward(loss)
            srm_opt.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def configure_optimizers(self):
        # foreach: one kernel per step for all parameters instead of a loop over them (on the CPU
        # bit for bit the numbers of the per-parameter loop, torch's CPU default; docs/performance.md)
        agent = self.agent
        policy_opt = torch.optim.Adam(agent.policy.parameters(), lr=agent.ppo_config.lr, eps=agent.ppo_config.adam_eps,
                                      foreach=True)
        srm_opt = torch.optim.Adam(agent.srm.parameters(), lr=agent.srm_config.lr, foreach=True)
        return [policy_opt, srm_opt]

    # -- evaluation ----------------------------------------------------------------------------------
    # Validation scores the agent (and, once per run, the centre / random baselines); the test loop
    # (evaluate.py) scores every strategy of ``self.test_strategies``. Scoring lives in
    # alignsam.evaluation; the tables land in ``validation_table`` / ``test_table``.
    def on_validation_epoch_start(self) -> None:
        self._run_baselines = not self._baseline_results and not self.trainer.sanity_checking
        strategies = ["agent"] + (list(BASELINES) if self._run_baselines else [])
        self._evaluator = Evaluator(self.agent, strategies, seed=self.hparams.seed + 1, keep_episodes=False)

    def on_test_epoch_start(self) -> None:
        from alignsam.evaluation.strategies import STRATEGIES, check_strategies, default_strategies

        has_matcher = self.agent.matcher is not None
        names = check_strategies(self.test_strategies or default_strategies(has_matcher), has_matcher)
        train = None
        if any(STRATEGIES[n].needs_prototypes for n in names):
            datamodule = getattr(self.trainer, "datamodule", None)
            train = getattr(datamodule, "train_dataset", None)
        self._evaluator = Evaluator(self.agent, names, seed=self.hparams.seed + 1, oracle_clicks=self.oracle_clicks,
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
        self.test_episodes = self._evaluator.episodes
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
        """``val/episode_<i>``: one picture per episode (image | ground truth | prediction with its
        numbered clicks, titled with the episode and its IoU), at the step of the scalars logged
        with it (training batches done, as ``self.log`` counts them under manual optimisation)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        from alignsam.evaluation.scoring import episode_ious
        from alignsam.visualize import episode_picture

        if not isinstance(self.logger, TensorBoardLogger) or self.hparams.log_images <= 0:
            return
        segmenter = self.agent.segmenter
        n = min(self.hparams.log_images, len(batch))
        points = sam_to_original_points(outcome.points[:n].float(), embedded.original_hw[:n], segmenter.img_size)
        logits = original_logits(segmenter, outcome.logits[:n], embedded)
        gts = [torch.as_tensor(np.asarray(batch[i]["mask"], bool)) for i in range(n)]
        ious = episode_ious(logits, gts).tolist()
        # the step self.log gives the validation scalars (Lightning's logger connector reads this
        # counter: training batches done, not optimizer steps, under manual optimisation)
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        for i in range(n):
            keep = (outcome.labels[i] >= 0).cpu().numpy()
            picture = episode_picture(batch[i]["image"], gts[i].numpy(), (logits[i] > MASK_LOGIT_THRESHOLD).cpu().numpy(),
                                      points[i].cpu().numpy()[keep], outcome.labels[i].cpu().numpy()[keep],
                                      title=f"{batch[i]['id']} ({batch[i].get('text', '')})", iou=ious[i])
            self.logger.experiment.add_image(f"val/episode_{i}", picture, step, dataformats="HWC")

    # DDP: each manual_backward reaches only the policy or only the SRM, so DDP must not wait for
    # the other's gradients: run it with find_unused_parameters (train.py maps --trainer.strategy=ddp
    # to Lightning's "ddp_find_unused_parameters_true"; with a Trainer of your own, pass that name).

    # -- checkpoints: the sampler state makes a resumed run identical to an uninterrupted one -------
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # plain dicts, as LightningCLI records them, so that evaluate.py --ckpt_path can parse them back
        hparams = checkpoint.get("hyper_parameters", {})
        checkpoint["hyper_parameters"] = {k: plain_config(v) for k, v in hparams.items()}
        checkpoint["alignsam"] = {"generator": self.agent.generator.get_state(), "baselines": self._baseline_results}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint.get("alignsam", {})
        if "generator" in state:
            self.agent.generator.set_state(state["generator"])
        self._baseline_results = state.get("baselines", {})


def _prefix_legacy_keys(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: ``policy.*`` / ``srm.*`` of older checkpoints -> ``agent.policy.*``."""
    for key in [k for k in state_dict if k.startswith((prefix + "policy.", prefix + "srm."))]:
        state_dict[prefix + AGENT_PREFIX + key[len(prefix):]] = state_dict.pop(key)
