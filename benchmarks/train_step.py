"""One PPO training iteration of the LightningModule, broken into its phases.

A real ``Trainer.fit`` on the bundled world (tiny SAM, procedural scenes) runs ``--epochs-timed``
epochs of ``--batches`` iterations each after one untimed warm-up epoch (which also fills a
throw-away feature cache). Every iteration is timed from one batch's start to the next one's, and
split into:

* data: the DataLoader (rendering or reading the scenes) and Lightning's loop between batches;
* prepare: ``Agent.prepare`` (cached embeddings and text maps read, episodes built);
* rollout: ``Agent.rollout`` (B episodes of T steps, one batched SAM decode a step);
* ppo: ``AlignSAM.ppo_update`` (K epochs of minibatch PPO);
* srm: ``AlignSAM.srm_update``;
* other: the rest of ``training_step`` (statistics and logging) and Lightning's optimizer plumbing.

Figures are medians over the timed iterations, in milliseconds. ``--compare DIR`` also runs the
same measurement on the checkout in DIR (``git archive <commit> | tar -x -C DIR``), alternating the
two in child processes (``--rounds`` times each), so that both sides see the same machine load and
the ratio is taken within one run.

``--update-profile`` times the PPO update alone (no Trainer), three ways on the same rollout: the
update as it was before issue 14 (a copy below: per-minibatch index transfer, action checks and
statistics read back as Python floats), the current one in float32, and the current one with
``model.ppo.precision: bf16``; on CUDA it also counts the host synchronisations of each
(``torch.cuda.set_sync_debug_mode``). ``--segmenter vit_b`` gives the policy ViT-B-sized states
(256 x 64 x 64; random embeddings, the encoder never runs).

    python benchmarks/train_step.py --threads 1
    python benchmarks/train_step.py --threads 1 --compare ../alignsam-before --rounds 3
    python benchmarks/train_step.py --threads 1 --precision bf16      # model.ppo.precision
    python benchmarks/train_step.py --device cuda --batch-size 64
    python benchmarks/train_step.py --update-profile --device cuda --segmenter vit_b --batch-size 64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PHASES = ("data", "prepare", "rollout", "ppo", "srm", "other")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="saliency", choices=["saliency", "shadow", "glass", "blur", "categories"],
                        help="bundled-world task (shadow and categories: explicit branches with the tiny CLIP)")
    parser.add_argument("--batch-size", type=int, default=8, help="B, episodes per iteration")
    parser.add_argument("--steps", type=int, default=5, help="T, clicks per episode")
    parser.add_argument("--ppo-epochs", type=int, default=20, help="K, PPO epochs per iteration")
    parser.add_argument("--minibatch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="iterations per epoch")
    parser.add_argument("--epochs-timed", type=int, default=2, help="timed epochs after the warm-up epoch")
    parser.add_argument("--precision", default=None, help="model.ppo.precision (auto | fp32 | bf16); default: the config's (auto)")
    parser.add_argument("--trainer-precision", default=None, help="Trainer(precision=...), e.g. bf16-mixed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", default=None, help="another checkout to measure against (the 'before')")
    parser.add_argument("--rounds", type=int, default=2, help="with --compare: alternating runs of each side")
    parser.add_argument("--json", action="store_true", help="print one JSON line of medians (used by --compare)")
    parser.add_argument("--update-profile", action="store_true", help="time the PPO update alone: before / fp32 / bf16")
    parser.add_argument("--segmenter", default="tiny", choices=["tiny", "vit_b"], help="with --update-profile")
    parser.add_argument("--repeats", type=int, default=3, help="with --update-profile: timed updates per variant")
    return parser.parse_args(argv)


class PhaseTimer:
    """Wraps methods of the module and its agent with timers; records one dict per iteration."""

    def __init__(self, module, device) -> None:
        import torch

        self.torch, self.device = torch, device
        self.current: Dict[str, float] = {}
        self.iterations: List[Dict[str, float]] = []
        self.batch_start: Optional[float] = None
        self.previous_end: Optional[float] = None
        self.step_start = 0.0
        agent = module.agent
        for owner, name, phase in ((agent, "prepare", "prepare"), (agent, "rollout", "rollout"),
                                   (module, "ppo_update", "ppo"), (module, "srm_update", "srm")):
            setattr(owner, name, self._timed(getattr(owner, name), phase))

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _timed(self, method, phase):
        def wrapper(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = method(*args, **kwargs)
            self.sync()
            self.current[phase] = self.current.get(phase, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    def callback(self):
        from lightning.pytorch.callbacks import Callback

        timer = self

        class _Hooks(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                timer.sync()
                now = time.perf_counter()
                timer.current = {"data": now - timer.previous_end if timer.previous_end is not None else float("nan")}
                timer.step_start = now

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                timer.sync()
                now = time.perf_counter()
                measured = sum(timer.current.get(p, 0.0) for p in ("prepare", "rollout", "ppo", "srm"))
                timer.current["other"] = now - timer.step_start - measured
                timer.current["total"] = timer.current["data"] + now - timer.step_start
                timer.current["epoch"] = trainer.current_epoch
                timer.iterations.append(dict(timer.current))
                timer.previous_end = now

            def on_train_epoch_end(self, trainer, pl_module):
                timer.previous_end = None  # the first batch of an epoch includes the loader's start-up

        return _Hooks()


def build_module(args, cache: str):
    import yaml

    from alignsam.module import AlignSAM, SegmenterConfig
    from alignsam.rl.env import EnvConfig
    from alignsam.rl.policy import PolicyConfig
    from alignsam.rl.ppo import PPOConfig
    from alignsam.srm import SRMConfig

    explicit = args.task in ("shadow", "categories")
    variant = "explicit" if explicit else "implicit"
    matcher = None
    if explicit:
        matcher = {"model_name": "tiny", "checkpoint_path": str(ROOT / "checkpoints" / "tiny_clip.pt"),
                   **yaml.safe_load((ROOT / "conf" / "scenes" / "matcher_tiny.yaml").read_text())}
    ppo = {"epochs": args.ppo_epochs, "minibatch_size": args.minibatch_size, "lr": 3.0e-4}
    if args.precision is not None:
        ppo["precision"] = args.precision
    return AlignSAM(
        task=args.task, segmenter=SegmenterConfig(name="tiny", checkpoint=str(ROOT / "checkpoints" / "tiny_sam.pt")),
        env=EnvConfig(steps=args.steps, grid=10), policy=PolicyConfig(variant=variant),
        # srm branch=: the name that older --compare checkouts know too (now folded into variant)
        srm=SRMConfig(branch=variant, lr=1e-3), ppo=PPOConfig(**ppo), matcher=matcher, feature_cache=cache,
        seed=args.seed,
    )


def measure(args) -> Dict[str, float]:
    """Medians (ms) of every phase over the timed iterations of one fit."""
    import lightning as L
    import torch

    from alignsam.data.scene_data import SceneDataModule

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    L.seed_everything(args.seed, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        module = build_module(args, os.path.join(tmp, "cache"))
        timer = PhaseTimer(module, device)
        data = SceneDataModule(task=args.task, train_pool=1000, train_size=args.batch_size * args.batches,
                               val_size=1, test_size=1, batch_size=args.batch_size, fewshot_ids_dir=tmp)
        trainer_kwargs = {}
        if args.trainer_precision:
            trainer_kwargs["precision"] = args.trainer_precision
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1 + args.epochs_timed,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp, callbacks=[timer.callback()],
            **trainer_kwargs,
        )
        trainer.fit(module, data)
    timed = [it for it in timer.iterations if it["epoch"] >= 1 and it["data"] == it["data"]]  # drop NaN data
    if not timed:
        raise SystemExit("no timed iteration: raise --batches or --epochs-timed")
    out = {key: 1000 * statistics.median(it.get(key, 0.0) for it in timed) for key in (*PHASES, "total")}
    out["iterations"] = len(timed)
    return out


# -- --update-profile -------------------------------------------------------------------------------
def legacy_ppo_update(module, episodes, rollout, policy_opt) -> Dict[str, float]:
    """``AlignSAM.ppo_update`` as it was before issue 14 (d162ca9), Lightning's calls replaced by
    plain torch: per minibatch an index transfer, three validity checks and five statistics read
    back as Python floats."""
    import torch

    from alignsam.rl import ppo

    agent, cfg = module.agent, module.agent.ppo_config
    advantages, returns = ppo.gae(rollout.rewards, rollout.values, rollout.bootstrap_value, cfg.gamma, cfg.gae_lambda)
    t_count, b_count = rollout.actions.shape
    policy_text = agent.policy_text_state(episodes)
    device = rollout.actions.device
    sums: Dict[str, float] = {}
    for _ in range(cfg.epochs):
        sums = {}
        batches = ppo.minibatches(t_count * b_count, cfg.minibatch_size, agent.generator)
        for index in batches:
            index = index.to(device)
            t, b = index // b_count, index % b_count
            state = episodes.embeddings[b] * rollout.masks[t, b]
            logits, value = agent.policy(state, episodes.pool[b], None if policy_text is None else policy_text[b])
            valid = rollout.valid[t, b]
            new_log_probs = ppo.action_log_probs(logits, valid, rollout.actions[t, b])
            adv = ppo.normalize(advantages[t, b]) if cfg.normalize_advantages else advantages[t, b]
            policy_loss, info = ppo.clipped_policy_loss(new_log_probs, rollout.log_probs[t, b], adv, cfg.clip)
            v_loss = ppo.value_loss(value, returns[t, b])
            entropy = ppo.masked_entropy(logits, valid).mean()
            loss = policy_loss + cfg.value_coef * v_loss - cfg.entropy_coef * entropy
            policy_opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(agent.policy.parameters(), cfg.max_grad_norm)
            policy_opt.step()
            for key, value_ in (("policy_loss", policy_loss), ("value_loss", v_loss), ("entropy", entropy),
                                ("approx_kl", info["approx_kl"]), ("clip_fraction", info["clip_fraction"])):
                sums[key] = sums.get(key, 0.0) + float(value_.detach()) / len(batches)
    sums["explained_variance"] = ppo.explained_variance(rollout.values.flatten(), returns.flatten())
    return sums


def update_profile(args) -> List[dict]:
    """Median milliseconds (and CUDA host syncs) of one PPO update, before / fp32 / bf16."""
    import copy
    import sys
    import warnings

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rollout import random_episodes, tiny_episodes  # noqa: E402

    from alignsam.module import AlignSAM, SegmenterConfig
    from alignsam.rl.env import EnvConfig, make_episodes
    from alignsam.rl.policy import PolicyConfig
    from alignsam.rl.ppo import PPOConfig
    from alignsam.srm import SRMConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    checkpoint = str(ROOT / "checkpoints" / "tiny_sam.pt") if args.segmenter == "tiny" else None
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        base = AlignSAM(task="saliency", segmenter=SegmenterConfig(name=args.segmenter, checkpoint=checkpoint),
                        env=EnvConfig(steps=args.steps, grid=10), policy=PolicyConfig(variant="implicit"),
                        srm=SRMConfig(branch="implicit"),
                        ppo=PPOConfig(epochs=args.ppo_epochs, minibatch_size=args.minibatch_size, lr=3.0e-4),
                        feature_cache=os.path.join(tmp, "cache"), seed=args.seed).to(device)
        make = tiny_episodes if args.segmenter == "tiny" else random_episodes
        embedded, gts = make(base.agent, args.batch_size, args.seed)
        embedded.embeddings = embedded.embeddings.to(device)
        episodes = make_episodes(base.agent.segmenter, embedded, 10, gts)
        rollout = base.agent.rollout(episodes, training=True, greedy=False)
        variants = {"before (per-minibatch reads)": ("legacy", "fp32"), "after, fp32": ("new", "fp32"),
                    "after, bf16": ("new", "bf16")}
        rows = []
        for name, (kind, precision) in variants.items():
            module = copy.deepcopy(base)
            module.agent.ppo_config.precision = precision
            optimizers = module.configure_optimizers()
            module.optimizers = lambda optimizers=optimizers: optimizers
            module.manual_backward = lambda loss: loss.backward()
            module.clip_gradients = lambda opt, gradient_clip_val, gradient_clip_algorithm: torch.nn.utils.clip_grad_norm_(
                [p for group in opt.param_groups for p in group["params"]], gradient_clip_val)
            legacy_opt = torch.optim.Adam(module.agent.policy.parameters(), lr=3.0e-4, eps=module.agent.ppo_config.adam_eps)

            def run():
                if kind == "legacy":
                    return legacy_ppo_update(module, episodes, rollout, legacy_opt)
                stats = module.ppo_update(episodes, rollout)
                return {k: float(v) for k, v in stats.items()}  # what the logger reads, once an update

            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            syncs = None
            if device.type == "cuda":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        run()
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
                syncs = sum("synchroniz" in str(w.message) for w in caught)
            rows.append({"variant": name, "ms": 1000 * statistics.median(times), "syncs": syncs})
            print(f"  done: {name}", flush=True)
    return rows


def update_table(rows: List[dict], args) -> str:
    transitions = args.batch_size * args.steps
    minibatches = args.ppo_epochs * -(-transitions // args.minibatch_size)
    lines = [f"| PPO update ({args.segmenter}-sized states, {transitions} transitions, {minibatches} minibatches) "
             f"| ms an update | ms a minibatch | host syncs an update | speed-up |", "|---|---:|---:|---:|---:|"]
    first = rows[0]["ms"]
    for r in rows:
        syncs = "n/a (CPU)" if r["syncs"] is None else str(r["syncs"])
        lines.append(f"| {r['variant']} | {r['ms']:.1f} | {r['ms'] / minibatches:.2f} | {syncs} | {first / r['ms']:.2f}x |")
    return "\n".join(lines)


def table(rows: Dict[str, Dict[str, float]]) -> str:
    names = list(rows)
    lines = ["| phase | " + " | ".join(f"{n} (ms)" for n in names) + (" | ratio |" if len(names) == 2 else " |"),
             "|---|" + "---:|" * len(names) + ("---:|" if len(names) == 2 else "")]
    for phase in (*PHASES, "total"):
        cells = [f"{rows[n][phase]:.1f}" for n in names]
        ratio = ""
        if len(names) == 2:
            before, after = rows[names[0]][phase], rows[names[1]][phase]
            ratio = f" {before / after:.2f}x |" if after > 0.05 else " - |"
        label = f"**{phase}**" if phase == "total" else phase
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    return "\n".join(lines)


def child_command(args, checkout: Optional[str]) -> List[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--json"]
    for key in ("task", "batch_size", "steps", "ppo_epochs", "minibatch_size", "batches", "epochs_timed",
                "device", "threads", "seed"):
        value = getattr(args, key)
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    if checkout is None:  # the 'before' checkout may not know these knobs
        if args.precision:
            command += ["--precision", args.precision]
    if args.trainer_precision:
        command += ["--trainer-precision", args.trainer_precision]
    return command


def run_child(args, checkout: Optional[str]) -> Dict[str, float]:
    env = dict(os.environ)
    source = str(Path(checkout).resolve()) if checkout else str(ROOT)
    env["PYTHONPATH"] = source + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    result = subprocess.run(child_command(args, checkout), env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child run for {source} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def describe(args) -> str:
    import torch

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"task {args.task}, B={args.batch_size}, T={args.steps}, K={args.ppo_epochs}, minibatch "
            f"{args.minibatch_size}; device {args.device}; torch {torch.__version__}, threads "
            f"{args.threads or torch.get_num_threads()}; {os.cpu_count()} CPU cores; load average {load}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    if args.json:
        print(json.dumps(measure(args)))
        return {}
    print(describe(args), flush=True)
    if args.update_profile:
        rows = update_profile(args)
        print()
        print(update_table(rows, args))
        print(f"\nMedian of {args.repeats} updates after one warm-up, on one rollout; host syncs counted by "
              f"torch.cuda.set_sync_debug_mode on CUDA (the statistics read once at the end included).")
        return {r["variant"]: r for r in rows}
    if args.compare is None:
        rows = {"this checkout": measure(args)}
    else:
        runs: Dict[str, List[Dict[str, float]]] = {"before": [], "after": []}
        for round_ in range(args.rounds):
            runs["before"].append(run_child(args, args.compare))
            runs["after"].append(run_child(args, None))
            print(f"  round {round_ + 1}: before {runs['before'][-1]['total']:.0f} ms, "
                  f"after {runs['after'][-1]['total']:.0f} ms an iteration", flush=True)
        rows = {side: {key: statistics.median(r[key] for r in results) for key in (*PHASES, "total")}
                for side, results in runs.items()}
    print()
    print(table(rows))
    iterations = "" if args.compare else f" ({int(rows['this checkout']['iterations'])} iterations)"
    print(f"\nMedian milliseconds per iteration{iterations}; with --compare, the median over {args.rounds} "
          f"alternating runs of each side's medians. Load average at the end: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'}.")
    return rows


if __name__ == "__main__":
    main()
