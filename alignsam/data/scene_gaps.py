"""Does a bundled world leave room between the training-free strategies and the oracle?

For each task, scores the training-free strategies of :mod:`alignsam.evaluation.strategies` and the
oracle (T clicks, T = ``model.env.steps``) on a split of the world, with the task config's own
agent built but not trained, and prints the headline metric of each with the **gap**: the oracle's
value minus the best training-free strategy's. A world that tells methods apart needs a wide gap
(docs/bundled-world.md, "The hard world": at least 0.15 on every task).

Without checkpoints, the strategies that need no training are scored: centre, random, PerSAM-style
(prototypes from the config's few-shot training scenes) and CLIP Surgery points (configs with a
text matcher). ``--ckpt TASK=PATH`` loads a trained run's SRM (and policy, unused here) and adds
the SRM-based ones, grid + SRM labels and w/o RL (SRM points). The agent's row is never scored:
a world is tuned on the baselines and the oracle, not on the method it is meant to test.

    python -m alignsam.data.scene_gaps --world hard                      # no training needed
    python -m alignsam.data.scene_gaps --world hard --ckpt shadow=RUN/checkpoints/last.ckpt ...
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from alignsam.config_files import load_config
from alignsam.data.scene_data import SceneDataModule
from alignsam.data.scenes import TASKS, WORLDS
from alignsam.errors import ConfigError
from alignsam.evaluation.evaluator import Evaluator
from alignsam.evaluation.strategies import STRATEGIES, label_of
from alignsam.tasks import task_record

CONF = Path(__file__).resolve().parents[2] / "conf" / "scenes"
UNTRAINED = ("centre", "random", "persam", "clip_surgery")  # need no trained part of the agent
SRM_BASED = ("grid_srm", "no_rl")  # need a trained SRM (--ckpt)
MIN_GAP = 0.15


def task_config(task: str, world: str) -> Path:
    """The task's scene config in ``world``: ``conf/scenes/<task>.yaml`` or ``conf/scenes/<world>/<task>.yaml``."""
    return CONF / f"{task}.yaml" if world == "standard" else CONF / world / f"{task}.yaml"


def build_model(config: Dict, feature_cache: Optional[str], ckpt: Optional[str]):
    """The config's :class:`~alignsam.module.AlignSAM`, untrained or with ``ckpt``'s trained weights."""
    from alignsam.module import AlignSAM

    options = dict(config["model"])
    if feature_cache:
        options["feature_cache"] = feature_cache
    model = AlignSAM(**options)
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        result = model.load_state_dict(state, strict=False)
        srm_keys = [k for k in state if ".srm." in k or k.startswith("srm.")]
        if result.unexpected_keys or not srm_keys:
            raise ConfigError("--ckpt", f"{ckpt} is no checkpoint of this task's config (unexpected keys "
                                        f"{result.unexpected_keys[:3]}, {len(srm_keys)} SRM weights)")
    return model.eval()


@torch.no_grad()
def gap_row(task: str, world: str, split: str = "val", scenes: int = 64, ckpt: Optional[str] = None,
            feature_cache: Optional[str] = None, batch_size: int = 8) -> Dict:
    """Score the training-free strategies and the oracle on the first ``scenes`` scenes of ``split``.

    Returns ``{"task", "metric", "steps", "episodes", "values": {strategy: headline value},
    "oracle", "best", "best_value", "gap"}``.
    """
    config = load_config(task_config(task, world))
    data_options = dict(config["data"]["init_args"])
    if data_options.get("world", "standard") != world:
        raise ConfigError("data.world", f"{task_config(task, world)} sets {data_options.get('world')!r}, not {world!r}")
    data_options.update(val_size=scenes if split == "val" else data_options.get("val_size", 64),
                        test_size=scenes if split == "test" else data_options.get("test_size", 200))
    datamodule = SceneDataModule(**data_options)
    model = build_model(config, feature_cache, ckpt)
    agent = model.agent
    names = [n for n in UNTRAINED if agent.matcher is not None or not STRATEGIES[n].needs_matcher]
    names += list(SRM_BASED) if ckpt else []
    names.append("oracle")
    evaluator = Evaluator(agent, names, seed=model.hparams.seed + 1, oracle_clicks=agent.env_config.steps,
                          train_samples=datamodule.train_dataset)
    episodes = datamodule.val_dataset if split == "val" else datamodule.test_dataset
    for start in range(0, len(episodes), batch_size):
        evaluator.add_batch([episodes[i] for i in range(start, min(start + batch_size, len(episodes)))])
    table = evaluator.compute()
    metric = task_record(task).headline[0]
    values = {name: table[name][metric] for name in names if metric in table[name]}
    contenders = {n: v for n, v in values.items() if n != "oracle"}
    best = max(contenders, key=contenders.get)
    return {"task": task, "metric": metric, "steps": agent.env_config.steps, "episodes": len(episodes),
            "values": values, "oracle": values["oracle"], "best": best, "best_value": values[best],
            "gap": values["oracle"] - values[best]}


def markdown(rows: Sequence[Dict]) -> str:
    """The gap table: one row per task, every scored strategy, the best one and the gap."""
    shown = [n for n in (*UNTRAINED, *SRM_BASED) if any(n in r["values"] for r in rows)]
    head = ["task (metric)", "episodes", *(label_of(n) for n in shown), "oracle (T clicks)",
            "best training-free", "gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['values'][n]:.3f}" if n in r["values"] else "-" for n in shown]
        flag = "" if r["gap"] >= MIN_GAP else " (below 0.15)"
        lines.append(f"| {r['task']} ({r['metric']}) | {r['episodes']} | " + " | ".join(cells)
                     + f" | {r['oracle']:.3f} | {label_of(r['best'])} | **{r['gap']:.3f}**{flag} |")
    return "\n".join(lines)


def parse_checkpoints(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or task not in TASKS:
            raise ConfigError("--ckpt", f"{item!r} is not TASK=PATH with TASK one of {', '.join(TASKS)}")
        out[task] = path
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="hard", choices=WORLDS)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--split", default="val", choices=("val", "test"),
                        help="scenes scored (calibrate on val; the test split stays unseen)")
    parser.add_argument("--scenes", type=int, default=64, help="first scenes of the split")
    parser.add_argument("--ckpt", nargs="*", default=[], metavar="TASK=PATH",
                        help="a trained run per task: adds the SRM-based strategies")
    parser.add_argument("--feature_cache", default=None, help="embedding cache (default: the config's)")
    args = parser.parse_args(argv)
    checkpoints = parse_checkpoints(args.ckpt)
    rows: List[Dict] = []
    for task in args.tasks:
        started = time.time()
        rows.append(gap_row(task, args.world, args.split, args.scenes, checkpoints.get(task), args.feature_cache))
        row = rows[-1]
        print(f"{task}: oracle {row['oracle']:.3f}, best {row['best']} {row['best_value']:.3f}, gap {row['gap']:.3f} "
              f"({time.time() - started:.0f} s)", flush=True)
    print(f"\n{args.world} world, {args.split} split, T = {rows[0]['steps']} clicks; headline metric of each task\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
