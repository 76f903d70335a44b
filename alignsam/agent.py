"""The AlignSAM agent: frozen SAM (and CLIP Surgery), the policy, the SRM and the rollout.

One object that training (:class:`alignsam.module.AlignSAM`, the LightningModule), evaluation
(:mod:`alignsam.evaluation`) and the Python API (:mod:`alignsam.api`) share:

* :meth:`Agent.prepare` turns samples into :class:`~alignsam.rl.env.Episodes` through the feature
  cache (SAM embeddings, CLIP Surgery maps);
* :meth:`Agent.rollout` plays B episodes with the current policy and SRM (docs/method.md,
  "The episode");
* :meth:`Agent.from_checkpoint` rebuilds a trained agent from a ``train.py`` checkpoint without
  Lightning.

The frozen models never enter a checkpoint (:func:`~alignsam.foundation.frozen.frozen_submodule`);
the trainable parts are ``policy.*`` and ``srm.*``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from alignsam.data.features import FeatureStore
from alignsam.foundation.frozen import frozen_submodule
from alignsam.foundation.registry import build_segmenter, build_text_matcher
from alignsam.foundation.segmenter import EmbeddedImages
from alignsam.geometry import whole_image_maps_to_sam_grid
from alignsam.metrics import task_metrics
from alignsam.rl import ppo
from alignsam.rl.env import EnvConfig, Episodes, PromptingEnv, make_episodes
from alignsam.rl.ppo import PPOConfig
from alignsam.rl.policy import ActorCritic, PolicyConfig
from alignsam.srm import SemanticRecalibration, SRMConfig
from alignsam.tasks import task_record


@dataclass
class SegmenterConfig:
    """The frozen SAM (``model.segmenter.*``): a model name (``vit_b``, ``vit_l``, ``vit_h``,
    ``tiny``; see :mod:`alignsam.foundation.registry`) and its local checkpoint file (nothing is
    downloaded)."""

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
    With ``model.policy.srm_input``: srm_blank ``(B, 1, h, w)`` the SRM's probabilities of the
    unprompted image and srm_maps ``(T, B, 1, h, w)`` those of each state, float32, as the policy
    read them (the PPO update feeds it the same); None otherwise. point_labels holds -1 for a click
    ``model.srm.label_rule: drop`` did not send to SAM.
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
    srm_blank: Optional[torch.Tensor] = None
    srm_maps: Optional[torch.Tensor] = None


def as_config(cls, value):
    """A config dataclass from itself or from a dict of its fields (errors name the bad key)."""
    if isinstance(value, Mapping):
        return cls(**value)
    return value


def plain_config(value: Any) -> Any:
    """A config dataclass as a plain dict (what checkpoints store); anything else unchanged."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


# The keys of a checkpoint's hyper_parameters that build an Agent (the rest are Lightning's).
AGENT_ARGUMENTS = ("task", "segmenter", "env", "policy", "srm", "ppo", "matcher", "feature_cache", "num_classes", "seed")


class Agent(nn.Module):
    """The agent (policy + SRM) and its frozen foundation models.

    Args:
        task: metric set and label-map protocol: ``blur``, ``shadow``, ``glass``, ``saliency``,
            ``voc`` or ``categories`` (see :func:`alignsam.metrics.task_metrics`).
        segmenter, env, policy, srm, ppo: config dataclasses or dicts of their fields
            (:class:`SegmenterConfig`, :class:`~alignsam.rl.env.EnvConfig`, ...). ``ppo`` is kept
            for the trainer; the agent itself does not use it.
        matcher: keyword arguments of :func:`alignsam.foundation.registry.build_text_matcher`;
            needed when the policy or the SRM is ``explicit``, unused otherwise.
        feature_cache: directory of the on-disk cache of SAM embeddings and text maps.
        num_classes: classes incl. background for ``voc`` / ``categories`` (default from the task).
        seed: seed of the rollout sampler (and, in training, of the PPO minibatch order).
    """

    def __init__(
        self,
        task: str,
        segmenter: Union[SegmenterConfig, Mapping] = SegmenterConfig(),
        env: Union[EnvConfig, Mapping] = EnvConfig(),
        policy: Union[PolicyConfig, Mapping] = PolicyConfig(),
        srm: Union[SRMConfig, Mapping] = SRMConfig(),
        ppo: Union[PPOConfig, Mapping] = PPOConfig(),
        matcher: Optional[Dict[str, Any]] = None,
        feature_cache: str = "cache/features",
        num_classes: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        segmenter, env, policy = as_config(SegmenterConfig, segmenter), as_config(EnvConfig, env), as_config(PolicyConfig, policy)
        srm, ppo = as_config(SRMConfig, srm), as_config(PPOConfig, ppo)
        explicit = policy.variant == "explicit" or srm.variant == "explicit"
        if explicit and matcher is None:
            raise ValueError("model.matcher is required when model.policy.variant or model.srm.variant is 'explicit'")
        if num_classes is None:
            num_classes = task_record(task).num_classes  # an unknown task fails here, naming model.task
        self.task, self.num_classes, self.seed = task, num_classes, seed
        self.new_metrics()  # fails here, before any model is built, on an unknown task
        self.segmenter_config, self.env_config, self.policy_config = segmenter, env, policy
        self.srm_config, self.ppo_config = srm, ppo
        self.segmenter = frozen_submodule(build_segmenter(segmenter.name, segmenter.checkpoint))
        self.matcher = frozen_submodule(build_text_matcher(**matcher)) if explicit else None
        channels = self.segmenter.embed_dim
        self.policy = ActorCritic(channels, policy)
        self.srm = SemanticRecalibration(channels, srm)
        self.policy_text = policy.variant == "explicit"
        self.srm_text = srm.variant == "explicit"
        self.store = FeatureStore(feature_cache)
        self.generator = torch.Generator().manual_seed(seed)

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                        **overrides: Any) -> "Agent":
        """The trained agent of a ``train.py`` checkpoint, in eval mode on ``device``.

        The configs come from the checkpoint's hyperparameters; ``overrides`` replace some of them
        (e.g. ``feature_cache=...``, or ``segmenter={"name": ..., "checkpoint": ...}`` when SAM's
        weights are elsewhere). The frozen models load from their own files, wherever the command
        runs (:func:`~alignsam.foundation.segmenter.resolve_weights_path`).
        """
        from alignsam.run_files import read_run_checkpoint

        checkpoint = read_run_checkpoint(path)
        hparams = {k: plain_config(v) for k, v in checkpoint["hyper_parameters"].items() if k in AGENT_ARGUMENTS}
        hparams.update(overrides)
        agent = cls(**hparams)
        agent.load_trainable_state(checkpoint["state_dict"])
        state = checkpoint.get("alignsam", {})
        if "generator" in state:
            agent.generator.set_state(state["generator"])
        return agent.to(device).eval()

    @staticmethod
    def stored_segmenter(path: Union[str, Path]) -> Dict[str, Any]:
        """``{"name", "checkpoint"}`` of the SAM a ``train.py`` checkpoint was trained with."""
        from alignsam.run_files import read_run_checkpoint

        return dict(plain_config(read_run_checkpoint(path)["hyper_parameters"]["segmenter"]))

    def load_trainable_state(self, lightning_state: Mapping[str, torch.Tensor]) -> None:
        """Load the policy and SRM from a LightningModule's state dict (``agent.policy.*`` today,
        ``policy.*`` in checkpoints written before the agent had a module of its own)."""
        own = {strip_agent_prefix(k): v for k, v in lightning_state.items()}
        self.load_state_dict(own, strict=True)

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    def new_metrics(self):
        """A fresh metric collection of the task (:func:`alignsam.metrics.task_metrics`)."""
        return task_metrics(self.task, self.num_classes)

    # -- features ------------------------------------------------------------------------------------
    def prepare(self, samples: Sequence[Dict], with_gt: bool = True):
        """Cached embeddings (and text maps) of a batch of samples -> (:class:`Episodes`, embedded).

        Runs outside mixed precision: the cache stores fp16 and its reads must not be autocast.
        """
        with torch.autocast(self.device.type, enabled=False):
            embedded = self.store.embeddings(self.segmenter, samples, device=self.device)
            embedded = EmbeddedImages(embedded.embeddings.float(), embedded.original_hw, embedded.input_hw)
            text_map = None
            if self.matcher is not None:
                maps = self.store.text_maps(self.matcher, samples, self.segmenter.low_res_hw, device=self.device)
                text_map = whole_image_maps_to_sam_grid(maps.float(), embedded.input_hw, self.segmenter.img_size,
                                                        self.segmenter.embedding_hw)
            gts = [s["mask"] for s in samples] if with_gt else None
            return make_episodes(self.segmenter, embedded, self.env_config.grid, gts, text_map), embedded

    def policy_text_state(self, episodes: Episodes) -> Optional[torch.Tensor]:
        """s_c for the policy (explicit variant), else None."""
        return episodes.text_state if self.policy_text else None

    def srm_text_state(self, episodes: Episodes) -> Optional[torch.Tensor]:
        """s_c for the SRM (explicit branch), else None."""
        return episodes.text_state if self.srm_text else None

    @property
    def policy_sees_srm(self) -> bool:
        """``model.policy.srm_input``: the policy also reads the SRM's maps."""
        return self.policy.srm_input

    @staticmethod
    def policy_srm_maps(srm_blank: Optional[torch.Tensor], srm_step: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The policy's ``srm_maps`` ``(B, 2, h, w)`` from the SRM's probabilities of the unprompted
        image and of the current state (each ``(B, 1, h, w)``); None when they are None."""
        return None if srm_step is None else torch.cat([srm_blank, srm_step], 1)

    # -- rollout -------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, episodes: Episodes, training: bool, greedy: bool, steps: Optional[int] = None,
                all_positive: bool = False) -> Rollout:
        """Run B episodes of ``steps`` (default ``env.steps``) with the current policy and SRM
        (``all_positive``: every click labelled positive instead of by the SRM)."""
        steps = steps or self.env_config.steps
        env = PromptingEnv(self.segmenter, self.env_config, self.srm_config.threshold, all_positive, srm=self.srm_config)
        policy_text, srm_text = self.policy_text_state(episodes), self.srm_text_state(episodes)
        # training: the policy and the SRM in model.ppo.precision, as the updates will evaluate
        # them (so that PPO's first ratios are 1); SAM's decode is float32 whatever the precision
        precision = self.ppo_config.precision if training else "fp32"
        # the networks read s = E * m(M) (E alone before any mask), formed here in their precision
        # exactly as the updates form it (bf16: from bfloat16 E and m)
        embeddings, pool = ppo.network_input(precision, episodes.embeddings), ppo.network_input(precision, episodes.pool)
        policy_text, srm_text = ppo.network_input(precision, policy_text), ppo.network_input(precision, srm_text)

        def state(mask: Optional[torch.Tensor]) -> torch.Tensor:
            return embeddings if mask is None else embeddings * ppo.network_input(precision, mask)

        def policy(s: torch.Tensor, srm_step: Optional[torch.Tensor]):
            # srm_input: the SRM's float32 maps, cast as the update casts the stored ones
            maps = ppo.network_input(precision, self.policy_srm_maps(srm_blank, srm_step))
            with ppo.autocast(precision, embeddings.device):
                logits, value = self.policy(s, pool, policy_text, maps)
            return logits.float(), value.float()

        def srm(s: torch.Tensor) -> torch.Tensor:
            with ppo.autocast(precision, embeddings.device):
                return torch.sigmoid(self.srm(s, srm_text).float())

        # the SRM labels the clicks; with ground-truth labels or all positive ones it is not needed
        # (and the policy reads the SRM's maps with model.policy.srm_input)
        sees_srm = self.policy_sees_srm
        needs_srm = sees_srm or (not all_positive and not (training and self.env_config.train_labels == "gt"))
        blank_probs = srm(state(None))
        srm_blank = blank_probs if sees_srm else None
        env.reset(episodes, blank_probs, training)
        record: Dict[str, List[torch.Tensor]] = {k: [] for k in ("masks", "valid", "actions", "log_probs", "values", "rewards", "labels", "srm_maps")}
        for _ in range(steps):
            s = state(env.mask)
            srm_probs = srm(s) if sees_srm else None  # srm_input: the policy reads this step's map
            logits, value = policy(s, srm_probs)
            # sampled on the CPU with the agent's generator, whose state the checkpoint keeps
            actions, log_probs = ppo.sample_actions(logits.cpu(), env.valid.cpu(), self.generator, greedy)
            actions = actions.to(self.device)
            if needs_srm and srm_probs is None:
                srm_probs = srm(s)
            if sees_srm:
                record["srm_maps"].append(srm_probs)
            record["masks"].append(env.mask)
            record["valid"].append(env.valid)
            record["actions"].append(actions)
            record["log_probs"].append(log_probs.to(self.device))
            record["values"].append(value)
            result = env.step(actions, srm_probs)
            record["labels"].append(result.labels)
            if result.reward is not None:
                record["rewards"].append(result.reward)
        final_state = state(env.mask)
        _, bootstrap = policy(final_state, srm(final_state) if sees_srm else None)
        stack = lambda key: torch.stack(record[key]) if record[key] else None  # noqa: E731
        return Rollout(
            masks=stack("masks"), valid=stack("valid"), actions=stack("actions"), log_probs=stack("log_probs"),
            values=stack("values"), rewards=stack("rewards"), labels=stack("labels"),
            bootstrap_value=bootstrap, final_mask=env.mask, final_logits=env.logits,
            iou_curve=torch.stack(env.iou_history) if env.iou_history else None,
            points=env.points, point_labels=env.labels, step_logits=env.logits_history,
            srm_blank=srm_blank, srm_maps=stack("srm_maps"),
        )

    # -- pickling (ddp_spawn) --------------------------------------------------------------------------
    def __getstate__(self) -> Dict[str, Any]:
        # A torch.Generator cannot cross torch.multiprocessing: send its state as bytes.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        super().__setstate__({**state, "generator": generator})


AGENT_PREFIX = "agent."


def strip_agent_prefix(key: str) -> str:
    """``agent.policy.x`` -> ``policy.x``; keys of older checkpoints (``policy.x``) unchanged."""
    return key[len(AGENT_PREFIX):] if key.startswith(AGENT_PREFIX) else key
