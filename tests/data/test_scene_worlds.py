"""The bundled world's settings (``world: standard`` and ``world: hard``, alignsam/data/scenes.py).

The standard scenes are pinned pixel for pixel: every run, table and pretrained tiny model of the
repository was made on them, so a change to the generator must leave them bit-identical. (The
digests hold for this repository's numpy and OpenCV builds; another OpenCV build may round a blur
differently, and then this test says so before any result does.)
"""
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from alignsam.data.scene_data import SceneDataModule
from alignsam.data.scenes import (CATEGORIES, CATEGORY_NAMES, REGION_KINDS, SPLIT_SEED_BASE, TASKS, SceneConfig,
                                  render_scene, scene_categories)

# sha256 (first 16 hex digits) of scene_digest over the standard world, taken before the hard
# world was added (commit 35337a4's generator): one train, one val and one test seed per task.
STANDARD_DIGESTS = {
    ("blur", 3): "1399e0d70428b6ff",
    ("blur", 1000005): "28c80d5b03d462c5",
    ("blur", 2000017): "67ec5f2cc78a360e",
    ("shadow", 3): "08797a4ec86d6a22",
    ("shadow", 1000005): "9d01cf514a4d945a",
    ("shadow", 2000017): "64e7de086203c9c6",
    ("glass", 3): "06e6a1d395f73be6",
    ("glass", 1000005): "68fb3c392bb66501",
    ("glass", 2000017): "57f34c0b817ecab5",
    ("saliency", 3): "7092c11986fde09a",
    ("saliency", 1000005): "d2e94e0da263a15d",
    ("saliency", 2000017): "e5419a32b4ad81fb",
    ("categories", 3): "1e54ed3b8abfde87",
    ("categories", 1000005): "0f44797142d93edb",
    ("categories", 2000017): "0b15bb52e7ecbee8",
}


def scene_digest(scene) -> str:
    """Image bytes, every region (kind, category, packed mask) and the task's ground truth."""
    h = hashlib.sha256(scene.image.tobytes())
    for region in scene.regions:
        h.update(f"{region.kind}|{region.shape}|{region.colour}|{region.category}".encode())
        h.update(np.packbits(region.mask).tobytes())
    truth = scene.label_map() if scene.task == "categories" else scene.target()
    h.update(truth.astype(np.uint8).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("task, seed", sorted(STANDARD_DIGESTS), ids=lambda v: str(v))
def test_standard_scenes_are_bit_identical_to_before(task, seed):
    assert scene_digest(render_scene(task, seed)) == STANDARD_DIGESTS[(task, seed)]


# -- the hard world ------------------------------------------------------------------------------------
HARD = SceneConfig(world="hard")

# The hard blur and categories scenes are pinned too (taken after their bars were laid over the
# look-alikes as well, not only the targets): agents are trained on them, so retuning the hard
# world's other tasks must leave them bit-identical.
HARD_DIGESTS = {
    ("blur", 3): "359e4c66ef73d1a6",
    ("blur", 1000005): "4792511a7db99036",
    ("blur", 1000037): "8ce99534ff90be9d",
    ("blur", 2000017): "34c4107114b76b20",
    ("categories", 3): "24a807e1d21e6324",
    ("categories", 1000005): "258aed396cd1b9a1",
    ("categories", 1000037): "4781ed0f19caccc4",
    ("categories", 2000017): "419b84a18e618ed5",
}


@pytest.mark.parametrize("task, seed", sorted(HARD_DIGESTS), ids=lambda v: str(v))
def test_hard_blur_and_categories_scenes_are_pinned(task, seed):
    assert scene_digest(render_scene(task, seed, HARD)) == HARD_DIGESTS[(task, seed)]

VAL = [SPLIT_SEED_BASE["val"] + i for i in range(12)]


def pieces(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


@pytest.mark.parametrize("task", TASKS)
def test_hard_scenes_are_deterministic_and_not_the_standard_ones(task):
    a, b = render_scene(task, 5, HARD), render_scene(task, 5, HARD)
    assert a.image.shape == (256, 256, 3) and a.image.dtype == np.uint8
    assert scene_digest(a) == scene_digest(b)
    assert not np.array_equal(a.image, render_scene(task, 5).image)
    assert not np.array_equal(a.image, render_scene(task, 6, HARD).image)
    kinds = {r.kind for r in a.regions}
    assert kinds <= set(REGION_KINDS) and kinds & {"object"}


@pytest.mark.parametrize("task", ["blur", "shadow", "glass", "saliency"])
def test_hard_targets_come_in_more_pieces_and_are_occluded(task):
    hard = [render_scene(task, s, HARD) for s in VAL]
    standard = [render_scene(task, s) for s in VAL]
    if task == "shadow":  # smaller casters, fewer of them, whole shadows beside them (a low sun): less
        # shadow in all, but no slivers (tiny pieces cost the oracle as much as the baselines)
        assert np.mean([s.target().mean() for s in hard]) < np.mean([s.target().mean() for s in standard])
        assert np.mean([s.target().sum() / max(pieces(s.target()), 1) for s in hard]) > 400
    else:
        assert np.mean([pieces(s.target()) for s in hard]) > np.mean([pieces(s.target()) for s in standard])
    for scene in hard:
        target = scene.target()
        assert 0.003 < target.mean() < 0.9, (task, scene.seed)
        bars = [r.mask for r in scene.regions if r.shape == "bar"]
        grown = cv2.dilate(target.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert any((bar & grown).any() for bar in bars), (task, scene.seed)  # a bar lies over the target


def _hue(rgb_mean: np.ndarray) -> float:
    return cv2.cvtColor(rgb_mean.reshape(1, 1, 3).astype(np.uint8), cv2.COLOR_RGB2HSV_FULL)[0, 0, 0] * 360 / 256


def test_hard_distractors_share_the_targets_look():
    """Every task has distractors that look like its target (the point of the hard world)."""
    for seed in VAL[:5]:
        shadow = render_scene("shadow", seed, HARD)
        stains = [r.mask for r in shadow.regions if r.shape == "stain"]
        assert stains, seed
        luminance = shadow.image.mean(-1)
        # a stain is about as dark as the shadows (both darken the ground by the same factor)
        assert abs(luminance[stains[0]].mean() - luminance[shadow.target()].mean()) < 40
        glass = render_scene("glass", seed, HARD)
        assert any(r.shape == "panel" for r in glass.regions), seed
        salient = render_scene("saliency", seed, HARD)
        colour = salient.regions[salient.target_regions[0]].colour
        assert [r for r in salient.regions[:-1] if r.shape == "accent" and r.colour == colour], seed
        rivals = [r.mask for r in salient.regions if r.shape == "rival" and r.colour == colour]
        assert rivals and max(m.sum() for m in rivals) > 0.4 * salient.target().sum(), seed  # about as large
        categories = render_scene("categories", seed, HARD)
        present = {CATEGORIES[CATEGORY_NAMES.index(c)].colour for c in categories.categories_present()}
        lookalikes = [r for r in categories.regions if r.kind == "object" and r.category is None
                      and r.colour in present]
        assert lookalikes, seed
        blur = render_scene("blur", seed, HARD)
        target, objects = blur.target(), [r for r in blur.regions if r.kind == "object" and r.shape != "bar"]
        blurred = {r.colour for r in objects if (r.mask & target).sum() > 0.5 * r.mask.sum()}
        sharp_twins = [r for r in objects if r.colour in blurred and not (r.mask & target).any()]
        assert sharp_twins, seed


def test_hard_bars_cross_the_lookalikes_too():
    """Bars lie over the blur task's sharp objects and the categories task's look-alikes as well as
    over the targets, so that a bar over something does not mark it as the target."""
    grow = np.ones((3, 3), np.uint8)
    for seed in VAL:
        for task in ("blur", "categories"):
            scene = render_scene(task, seed, HARD)
            bars = _union_of([r.mask for r in scene.regions if r.shape == "bar"])
            if task == "blur":
                others = [r.mask for r in scene.regions if r.kind == "object" and r.shape != "bar"
                          and not (r.mask & scene.target()).any()]
            else:
                others = [r.mask for r in scene.regions if r.kind == "object" and r.category is None
                          and r.shape != "bar"]
            assert any((cv2.dilate(m.astype(np.uint8), grow).astype(bool) & bars).any() for m in others), (task, seed)


def _union_of(masks):
    return np.any(masks, axis=0) if masks else np.zeros((256, 256), bool)


def test_hard_category_lookalikes_have_another_shape():
    for seed in VAL:
        scene = render_scene("categories", seed, HARD)
        for region in scene.regions:
            if region.kind == "object" and region.category is None and region.shape != "bar":
                owner = next(c for c in CATEGORIES if c.colour == region.colour)
                assert region.shape != owner.shape, (seed, region.shape, region.colour)
        assert set(scene.categories_present()) <= set(scene_categories(seed, HARD))


def test_scene_datamodule_world(tmp_path):
    hard = SceneDataModule("glass", train_pool=20, train_size=3, val_size=2, test_size=2, world="hard",
                           fewshot_ids_dir=str(tmp_path))
    standard = SceneDataModule("glass", train_pool=20, train_size=3, val_size=2, test_size=2)
    assert [s["id"] for s in hard.val_dataset] == ["hard-glass-1000000", "hard-glass-1000001"]
    assert [s["id"] for s in standard.val_dataset] == ["glass-1000000", "glass-1000001"]
    assert np.array_equal(hard.val_dataset[0]["image"], render_scene("glass", 1_000_000, HARD).image)
    assert np.array_equal(standard.val_dataset[0]["image"], render_scene("glass", 1_000_000).image)
    hard.setup("fit")
    assert "world=hard" in (tmp_path / "fewshot_ids.txt").read_text()
    with pytest.raises(Exception, match=r"data\.world"):
        SceneDataModule("glass", world="harder")
    with pytest.raises(ValueError, match=r"data\.world"):
        render_scene("glass", 1, SceneConfig(world="harder"))


@pytest.mark.parametrize("task", TASKS)
def test_hard_configs_build_the_hard_world_and_log_apart(task):
    from alignsam.config_files import load_config

    conf = Path(__file__).resolve().parents[2] / "conf" / "scenes"
    hard, standard = load_config(conf / "hard" / f"{task}.yaml"), load_config(conf / f"{task}.yaml")
    assert hard["data"]["init_args"]["world"] == "hard" and hard["model"]["task"] == task
    assert hard["trainer"]["logger"]["init_args"]["save_dir"] != standard["trainer"]["logger"]["init_args"]["save_dir"]
    assert hard["model"] == standard["model"]  # the same method, only the world differs


def test_gap_table_and_checkpoint_arguments():
    from alignsam.data.scene_gaps import markdown, parse_checkpoints

    row = {"task": "glass", "metric": "miou_fgbg", "steps": 5, "episodes": 64, "oracle": 0.8, "best": "persam",
           "best_value": 0.6, "gap": 0.2, "values": {"centre": 0.3, "persam": 0.6, "oracle": 0.8}}
    low = dict(row, task="shadow", gap=0.1, values={"centre": 0.3, "persam": 0.7, "oracle": 0.8})
    table = markdown([row, low]).splitlines()
    assert table[0].startswith("| task (metric) | episodes | centre click | PerSAM-style | oracle")
    assert table[2].endswith("| 0.800 | PerSAM-style | **0.200** |")
    assert table[3].endswith("**0.100** (below 0.15) |")
    assert parse_checkpoints(["glass=a/last.ckpt"]) == {"glass": "a/last.ckpt"}
    with pytest.raises(Exception, match="--ckpt"):
        parse_checkpoints(["smoke=a.ckpt"])
