"""The bundled world's settings (``world: standard`` and ``world: hard``, alignsam/data/scenes.py).

The standard scenes are pinned pixel for pixel: every run, table and pretrained tiny model of the
repository was made on them, so a change to the generator must leave them bit-identical. (The
digests hold for this repository's numpy and OpenCV builds; another OpenCV build may round a blur
differently, and then this test says so before any result does.)
"""
import hashlib

import numpy as np
import pytest

from alignsam.data.scenes import TASKS, render_scene

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
