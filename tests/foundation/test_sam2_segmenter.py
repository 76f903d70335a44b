"""Sam2Segmenter against the sam2 package's own SAM2ImagePredictor (needs the ``sam2`` extra).

The reference for every equivalence is ``SAM2ImagePredictor`` fed one image at a time, clicks in the
image's original frame: the segmenter must reproduce its image features (``set_image``) and its
low-res logits and IoU (``predict(..., return_logits=True)``) while decoding B different images in
one call. Random weights (``checkpoint=None``, seeded): the code path does not depend on the values.
Skipped when sam2 is not installed (``SAM2_BUILD_CUDA=0 pip install --no-build-isolation -e .[sam2]``).
"""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("sam2", reason="SAM 2 is an optional extra: pip install -e .[sam2] (docs/sam2.md)")
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402
from sam2.utils.transforms import SAM2Transforms  # noqa: E402

from alignsam.data.features import FeatureStore, segmenter_preprocessing  # noqa: E402
from alignsam.foundation.frozen import frozen_submodule  # noqa: E402
from alignsam.foundation.registry import SEGMENTER_BUILDERS, build_segmenter  # noqa: E402
from alignsam.foundation.sam2_segmenter import (  # noqa: E402
    SAM2_MODELS,
    Sam2Segmenter,
    build_sam2_model,
    save_sam2_checkpoint,
)
from alignsam.foundation.segmenter import CheckpointError  # noqa: E402
from alignsam.geometry import SquashedSquare, actions_to_sam_points, original_to_sam_points, patch_centres  # noqa: E402
from alignsam.rl.env import EnvConfig, PromptingEnv, make_episodes  # noqa: E402

TOLERANCE = 1e-4
# sizes and aspect ratios of the decode tests (the embeddings there are random, the sizes set the clicks)
IMAGE_HW = [(480, 640), (1024, 1024), (701, 389), (97, 211)]
# images actually embedded (Hiera-T at 1024 x 1024 is a few seconds an image on a busy 2-core CPU)
EMBEDDED_HW = [(120, 160), (97, 211), (200, 90)]


# -- helpers ---------------------------------------------------------------------------------------
def random_images(hws, seed=0):
    """uint8 (H, W, 3) images with smooth structure plus noise."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in hws:
        ys, xs = np.mgrid[0:h, 0:w]
        base = np.stack([xs * 255 / w, ys * 255 / h, (xs + ys) * 127 / (h + w)], axis=-1)
        images.append(np.clip(base + rng.integers(0, 60, size=(h, w, 3)), 0, 255).astype(np.uint8))
    return images


def random_clicks(hws, num_clicks, seed=0):
    """Clicks ``(B, N, 2)`` in each image's original frame and labels ``(B, N)`` in {0, 1}."""
    gen = torch.Generator().manual_seed(seed)
    wh = torch.tensor(hws, dtype=torch.float32).flip(-1)
    points = torch.rand(len(hws), num_clicks, 2, generator=gen) * wh[:, None, :]
    labels = torch.randint(0, 2, (len(hws), num_clicks), generator=gen)
    labels[:, 0] = 1
    return points, labels


def max_abs_diff(name, ours, reference):
    diff = (torch.as_tensor(ours).float() - torch.as_tensor(reference).float()).abs().max().item()
    print(f"{name}: max abs difference {diff:.3g}")
    return diff


def set_predictor_features(predictor, segmenter, packed, original_hw):
    """Point a SAM2ImagePredictor at one packed embedding ``(1, 1024, 64, 64)`` without its encoder."""
    predictor.reset_predictor()
    image_embed, high_res = segmenter.unpack(packed)
    predictor._features = {"image_embed": image_embed, "high_res_feats": high_res}
    predictor._orig_hw = [tuple(int(v) for v in original_hw)]
    predictor._is_image_set = True


def predictor_outputs(predictor, points_i=None, labels_i=None, mask_input_i=None, multimask=False):
    """``SAM2ImagePredictor.predict`` on one image (clicks in its original frame) -> (low-res (M, h, w), iou (M,))."""
    _, iou, low_res = predictor.predict(
        point_coords=None if points_i is None else points_i.numpy(),
        point_labels=None if labels_i is None else labels_i.numpy(),
        mask_input=None if mask_input_i is None else mask_input_i.numpy(),
        multimask_output=multimask,
        return_logits=True,
    )
    return torch.from_numpy(low_res), torch.from_numpy(iou)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam2_t() -> Sam2Segmenter:
    """SAM 2.1 Hiera-T at random weights (about a second to build)."""
    torch.manual_seed(0)
    return build_segmenter("sam2.1_hiera_t")


@pytest.fixture(scope="module")
def packed(sam2_t):
    """Random packed embeddings ``(B, 1024, 64, 64)`` at the scale of real SAM 2 features."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(len(IMAGE_HW), sam2_t.packed_channels, *sam2_t.embedding_hw, generator=gen) * 0.3


@pytest.fixture(scope="module")
def embedded(sam2_t):
    images = random_images(EMBEDDED_HW)
    return images, sam2_t.embed(images)


@pytest.fixture
def stability_thresh(sam2_t):
    """Restores the decoder's dynamic-multimask threshold after a test changes it."""
    decoder = sam2_t.sam.sam_mask_decoder
    before = decoder.dynamic_multimask_stability_thresh
    yield decoder
    decoder.dynamic_multimask_stability_thresh = before


# -- the models and their sizes ----------------------------------------------------------------------
def test_every_sam2_name_is_registered_with_a_config_in_the_package():
    from importlib import resources

    for name, (config, file_name) in SAM2_MODELS.items():
        assert SEGMENTER_BUILDERS[name] is not None
        assert resources.files("sam2").joinpath(config).is_file(), config
        assert file_name.endswith(".pt")
    assert {"sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l",
            "sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l"} <= set(SEGMENTER_BUILDERS)


def test_sizes_and_frame(sam2_t):
    assert isinstance(sam2_t.img_size, SquashedSquare) and sam2_t.img_size == 1024
    assert sam2_t.embedding_hw == (64, 64) and sam2_t.embed_dim == 256 and sam2_t.low_res_hw == (256, 256)
    assert sam2_t.high_res_levels == [(32, 4), (64, 2)] and sam2_t.packed_channels == 256 + 512 + 256
    assert sam2_t.name == "sam2.1_hiera_t" and sam2_t.fingerprint == "random-init"


def test_pack_and_unpack_are_exact_inverses(sam2_t, packed):
    image_embed, high_res = sam2_t.unpack(packed)
    assert image_embed.shape == (len(IMAGE_HW), 256, 64, 64)
    assert [tuple(m.shape[1:]) for m in high_res] == [(32, 256, 256), (64, 128, 128)]
    assert torch.equal(sam2_t.pack(image_embed, high_res), packed)
    assert torch.equal(sam2_t.image_features(packed), packed[:, :256])
    with pytest.raises(ValueError, match="1024 channels"):
        sam2_t.decode(packed[:, :256], None, None)


# -- embedding ---------------------------------------------------------------------------------------
def test_preprocess_is_sam2_transforms(sam2_t):
    images = random_images([(97, 211), (300, 120)], seed=3)
    pixels, original_hw, input_hw = sam2_t.preprocess(images)
    transforms = SAM2Transforms(resolution=1024, mask_threshold=0.0)
    for i, image in enumerate(images):
        assert torch.equal(pixels[i], transforms(image))
    assert original_hw.tolist() == [[97, 211], [300, 120]] and input_hw.tolist() == [[1024, 1024]] * 2


def test_embed_matches_predictor_set_image(sam2_t, embedded):
    images, out = embedded
    assert out.embeddings.shape == (len(images), 1024, 64, 64)
    assert out.input_hw.tolist() == [[1024, 1024]] * len(images)
    predictor = SAM2ImagePredictor(sam2_t.sam)
    for i, image in enumerate(images):
        predictor.set_image(image)
        assert tuple(out.original_hw[i].tolist()) == tuple(predictor._orig_hw[0])
        reference = sam2_t.pack(predictor._features["image_embed"], predictor._features["high_res_feats"])
        assert max_abs_diff(f"embed {image.shape[:2]}", out.embeddings[i], reference[0]) < TOLERANCE


def test_embed_rejects_non_uint8_rgb(sam2_t):
    with pytest.raises(ValueError, match="uint8"):
        sam2_t.embed([np.zeros((32, 32, 3), dtype=np.float32)])


# -- decoding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_clicks", [1, 3])
@pytest.mark.parametrize("multimask", [False, True])
def test_decode_matches_predictor(sam2_t, packed, num_clicks, multimask):
    original_hw = torch.tensor(IMAGE_HW)
    points, labels = random_clicks(IMAGE_HW, num_clicks, seed=4 + num_clicks)
    sam_points = original_to_sam_points(points, original_hw, sam2_t.img_size)
    low_res, iou = sam2_t.decode(packed, sam_points, labels, multimask=multimask)
    assert low_res.shape == (len(IMAGE_HW), 3 if multimask else 1, 256, 256) and iou.shape == low_res.shape[:2]

    predictor = SAM2ImagePredictor(sam2_t.sam)
    for i, hw in enumerate(IMAGE_HW):
        set_predictor_features(predictor, sam2_t, packed[i : i + 1], hw)
        ref_low, ref_iou = predictor_outputs(predictor, points[i], labels[i], multimask=multimask)
        assert max_abs_diff(f"decode {hw} clicks={num_clicks} multimask={multimask}", low_res[i], ref_low) < TOLERANCE
        assert max_abs_diff("iou", iou[i], ref_iou) < TOLERANCE


@pytest.mark.parametrize("num_clicks", [1, 2])
def test_decode_with_mask_input_matches_predictor(sam2_t, packed, num_clicks):
    original_hw = torch.tensor(IMAGE_HW)
    points, labels = random_clicks(IMAGE_HW, num_clicks + 1, seed=8)
    sam_points = original_to_sam_points(points, original_hw, sam2_t.img_size)
    previous, _ = sam2_t.decode(packed, sam_points[:, :1], labels[:, :1])
    previous = previous * 40  # a strong mask input, so that it visibly changes the output
    low_res, _ = sam2_t.decode(packed, sam_points[:, 1:], labels[:, 1:], mask_input=previous)

    predictor = SAM2ImagePredictor(sam2_t.sam)
    for i, hw in enumerate(IMAGE_HW):
        set_predictor_features(predictor, sam2_t, packed[i : i + 1], hw)
        ref_low, _ = predictor_outputs(predictor, points[i, 1:], labels[i, 1:], mask_input_i=previous[i])
        assert max_abs_diff(f"decode + mask_input {hw}", low_res[i], ref_low) < TOLERANCE
    without_mask, _ = sam2_t.decode(packed, sam_points[:, 1:], labels[:, 1:])
    assert (without_mask - low_res).abs().max() > 1e-3  # the mask input matters


def test_large_logits_are_clamped_as_predict_returns_them(sam2_t, packed):
    """predict returns its low-res logits clamped to +-32 (what a next step's mask input gets)."""
    loud = packed.clone()
    loud[:, 256:] *= 50  # large high-res maps: large logits
    original_hw = torch.tensor(IMAGE_HW)
    points, labels = random_clicks(IMAGE_HW, 2, seed=12)
    low_res, _ = sam2_t.decode(loud, original_to_sam_points(points, original_hw, sam2_t.img_size), labels)
    assert low_res.abs().max() == 32
    predictor = SAM2ImagePredictor(sam2_t.sam)
    for i, hw in enumerate(IMAGE_HW):
        set_predictor_features(predictor, sam2_t, loud[i : i + 1], hw)
        ref_low, _ = predictor_outputs(predictor, points[i], labels[i])
        assert max_abs_diff(f"clamped {hw}", low_res[i], ref_low) < 1e-3 * 32


@pytest.mark.parametrize("with_mask_input", [False, True])
def test_no_clicks_matches_predictor(sam2_t, packed, with_mask_input):
    mask_input = None
    if with_mask_input:
        mask_input = torch.randn(len(IMAGE_HW), 1, 256, 256, generator=torch.Generator().manual_seed(6))
    low_res, iou = sam2_t.decode(packed, None, None, mask_input=mask_input)
    assert low_res.shape == (len(IMAGE_HW), 1, 256, 256) and iou.shape == (len(IMAGE_HW), 1)
    predictor = SAM2ImagePredictor(sam2_t.sam)
    for i, hw in enumerate(IMAGE_HW):
        set_predictor_features(predictor, sam2_t, packed[i : i + 1], hw)
        ref_low, _ = predictor_outputs(predictor, mask_input_i=None if mask_input is None else mask_input[i])
        assert max_abs_diff(f"no clicks {hw} mask_input={with_mask_input}", low_res[i], ref_low) < TOLERANCE


@pytest.mark.parametrize("rule", ["always_stable", "never_stable", "mixed"])
def test_single_mask_choice_is_predicts_per_row(sam2_t, packed, stability_thresh, rule):
    """multimask=False is SAM 2's dynamic choice, row by row: the single-mask token's output where it
    is stable, else the multimask output of highest IoU, as predict(multimask_output=False) chooses."""
    original_hw = torch.tensor(IMAGE_HW)
    points, labels = random_clicks(IMAGE_HW, 1, seed=9)
    sam_points = original_to_sam_points(points, original_hw, sam2_t.img_size)
    decoder = stability_thresh
    decoder.dynamic_multimask_stability_thresh = 0.98
    raw = sam2_t.sam.sam_mask_decoder
    # stability of each row's single-mask output (token 0), computed as the decoder does
    image_embed, high_res = sam2_t.unpack(packed)
    sparse, dense = sam2_t.sam.sam_prompt_encoder(points=(sam_points, labels), boxes=None, masks=None)
    all_masks, all_iou, _, _ = raw.predict_masks(image_embed, sam2_t.sam.sam_prompt_encoder.get_dense_pe(), sparse,
                                                 dense, repeat_image=False, high_res_features=high_res)
    stability = raw._get_stability_scores(all_masks[:, :1])[:, 0]
    decoder.dynamic_multimask_stability_thresh = {
        "always_stable": 0.0, "never_stable": 1.01, "mixed": float(stability.median())}[rule]
    stable = stability >= decoder.dynamic_multimask_stability_thresh
    if rule == "mixed":
        assert stable.any() and not stable.all()

    low_res, iou = sam2_t.decode(packed, sam_points, labels)
    best = all_iou[:, 1:].argmax(1) + 1
    for i, hw in enumerate(IMAGE_HW):
        expected = 0 if stable[i] else int(best[i])
        assert max_abs_diff(f"{rule} row {i}", low_res[i, 0], all_masks[i, expected].clamp(-32, 32)) < TOLERANCE
    predictor = SAM2ImagePredictor(sam2_t.sam)
    for i, hw in enumerate(IMAGE_HW):
        set_predictor_features(predictor, sam2_t, packed[i : i + 1], hw)
        ref_low, ref_iou = predictor_outputs(predictor, points[i], labels[i])
        assert max_abs_diff(f"{rule} vs predict {hw}", low_res[i], ref_low) < TOLERANCE
        assert max_abs_diff(f"{rule} iou", iou[i], ref_iou) < TOLERANCE


# rows: (image, label pattern): r = a real click, -1 = padding (middle, end, front, only padding)
PADDED_ROWS = [(0, "r r r"), (1, "r -1 r"), (2, "-1 -1 -1"), (3, "r r -1"), (1, "-1 r r"), (0, "r -1 -1")]


@pytest.mark.parametrize("with_mask_input", [False, True])
def test_padded_rows_match_predictor_on_their_own_clicks(sam2_t, packed, with_mask_input):
    owners = torch.tensor([owner for owner, _ in PADDED_ROWS])
    original_hw = torch.tensor(IMAGE_HW)[owners]
    points, labels = random_clicks([tuple(hw) for hw in original_hw.tolist()], 3, seed=10)
    for row, (_, pattern) in enumerate(PADDED_ROWS):
        for k, token in enumerate(pattern.split()):
            if token == "-1":
                labels[row, k] = -1
    embeddings = packed[owners]
    sam_points = original_to_sam_points(points, original_hw, sam2_t.img_size)
    mask_input = None
    if with_mask_input:
        first = torch.full((len(PADDED_ROWS), 1, 2), 300.0)
        mask_input, _ = sam2_t.decode(embeddings, first, torch.ones(len(PADDED_ROWS), 1, dtype=torch.long))
    low_res, iou = sam2_t.decode(embeddings, sam_points, labels, mask_input=mask_input)

    predictor = SAM2ImagePredictor(sam2_t.sam)
    for row, (owner, pattern) in enumerate(PADDED_ROWS):
        set_predictor_features(predictor, sam2_t, packed[owner : owner + 1], IMAGE_HW[owner])
        real = labels[row] >= 0
        mask_i = None if mask_input is None else mask_input[row]
        if real.any():
            ref_low, ref_iou = predictor_outputs(predictor, points[row][real], labels[row][real], mask_i)
        else:
            ref_low, ref_iou = predictor_outputs(predictor, None, None, mask_i)
        assert max_abs_diff(f"row {row} [{pattern}] mask_input={with_mask_input}", low_res[row], ref_low) < TOLERANCE
        assert max_abs_diff(f"row {row} iou", iou[row], ref_iou) < TOLERANCE


def test_decode_chunks_do_not_change_rows_and_nothing_is_reused(sam2_t, packed):
    """Segmenter.decode's CPU chunks run over SAM 2's decoder row-independently; SAM's image-side
    reuse (Segmenter.image_side) does not apply to SAM 2's decoder."""
    points, labels = torch.full((len(IMAGE_HW), 2, 2), 300.0), torch.tensor([[1, 0]] * len(IMAGE_HW))
    before = sam2_t.decode_chunk
    try:
        sam2_t.decode_chunk = 0
        whole = sam2_t.decode(packed, points, labels)
        sam2_t.decode_chunk = 1
        chunked = sam2_t.decode(packed, points, labels)
    finally:
        sam2_t.decode_chunk = before
    assert max_abs_diff("chunks of 1 vs one call", chunked[0], whole[0]) < TOLERANCE
    assert sam2_t.image_side(packed) is None


def test_decode_accepts_half_precision_embeddings(sam2_t, packed):
    """What the cache stores (fp16) decodes as its float32 value."""
    points = torch.full((len(IMAGE_HW), 1, 2), 500.0)
    labels = torch.ones(len(IMAGE_HW), 1, dtype=torch.long)
    half, _ = sam2_t.decode(packed.half(), points, labels)
    rounded, _ = sam2_t.decode(packed.half().float(), points, labels)
    assert half.dtype == torch.float32 and torch.equal(half, rounded)


def test_logits_to_original_is_predicts_upsampling(sam2_t, packed):
    points, labels = random_clicks(IMAGE_HW, 2, seed=11)
    original_hw = torch.tensor(IMAGE_HW)
    low_res, _ = sam2_t.decode(packed, original_to_sam_points(points, original_hw, sam2_t.img_size), labels)
    from alignsam.foundation.segmenter import EmbeddedImages

    info = EmbeddedImages(packed, original_hw, torch.full_like(original_hw, 1024))
    predictor = SAM2ImagePredictor(sam2_t.sam)
    for i, hw in enumerate(IMAGE_HW):
        ours = sam2_t.logits_to_original(low_res[i], info, i)
        assert ours.shape == (1, *hw)
        set_predictor_features(predictor, sam2_t, packed[i : i + 1], hw)
        masks, _, ref_low = predictor.predict(points[i].numpy(), labels[i].numpy(), multimask_output=False,
                                              return_logits=True)
        # predict upsamples its unclamped logits; random weights stay far inside +-32, so both agree
        assert np.abs(ref_low).max() < 32
        assert max_abs_diff(f"to original {hw}", ours, masks) < TOLERANCE


# -- the rest of the code sees SAM 2 through the interface ------------------------------------------------
def test_episode_clicks_are_predicts_clicks_at_patch_centres(sam2_t, embedded):
    """make_episodes + PromptingEnv over SAM 2: the policy sees the 256-channel features, every patch
    tiles the whole square, and a step's logits are predict's on the patch centre in the original frame."""
    images, out = embedded
    grid = 4
    masks = [np.zeros(image.shape[:2], bool) for image in images]
    for m in masks:
        m[: m.shape[0] // 2, : m.shape[1] // 2] = True
    episodes = make_episodes(sam2_t, out, grid, gt_masks=masks)
    assert episodes.embeddings.shape == (len(images), 256, 64, 64)
    assert torch.equal(episodes.sam_embeddings, out.embeddings)
    assert torch.equal(episodes.region, torch.ones(len(images), 1, 64, 64))
    pool = episodes.pool.reshape(len(images), grid, grid, 64, 64)
    assert torch.allclose(pool[:, 1, 2, 16:32, 32:48], torch.full((len(images), 16, 16), 1 / 256))
    assert abs(episodes.gt_grid.mean().item() - 0.25) < 0.02 and episodes.valid_low.all()
    expected = actions_to_sam_points(torch.arange(grid * grid).expand(len(images), -1), grid, out.original_hw, 1024)
    scale = torch.tensor(1024.0) / out.original_hw.flip(-1).float()
    torch.testing.assert_close(episodes.action_points, patch_centres(grid, out.original_hw) * scale[:, None, :])
    assert not torch.allclose(episodes.action_points, expected)  # SAM's frame would put them elsewhere

    env = PromptingEnv(sam2_t, EnvConfig(steps=2, grid=grid, init_prompts="none", train_labels="gt"))
    env.reset(episodes, training=True)
    actions = torch.tensor([5, 10, 0])
    result = env.step(actions)
    predictor = SAM2ImagePredictor(sam2_t.sam)
    centres = patch_centres(grid, out.original_hw)
    for i, image in enumerate(images):
        set_predictor_features(predictor, sam2_t, out.embeddings[i : i + 1], image.shape[:2])
        ref_low, _ = predictor_outputs(predictor, centres[i, actions[i]][None], result.labels[i : i + 1])
        assert max_abs_diff(f"env step {image.shape[:2]}", env.logits[i], ref_low) < TOLERANCE


def test_feature_cache_stores_the_packed_embeddings(sam2_t, embedded, tmp_path):
    images, out = embedded
    store = FeatureStore(tmp_path)
    samples = [{"id": f"im{i}", "image": image} for i, image in enumerate(images[:2])]
    first = store.embeddings(sam2_t, samples)
    assert first.embeddings.shape == (2, 1024, 64, 64) and first.input_hw.tolist() == [[1024, 1024]] * 2
    assert (first.embeddings.float() - out.embeddings[:2]).abs().max() < 2e-2  # fp16 storage
    again = FeatureStore(tmp_path).embeddings(sam2_t, samples)
    assert torch.equal(again.embeddings, first.embeddings)
    entries = list((tmp_path / "sam_embedding").rglob("*.feat"))
    assert len(entries) == 2 and all(e.stat().st_size > 1024 * 64 * 64 * 2 for e in entries)  # 8 MiB each
    prep = segmenter_preprocessing(sam2_t)
    assert prep["resize"] == "whole_image_to_square" and prep["pad"] == "none" and prep["img_size"] == 1024
    assert np.allclose(prep["pixel_mean"], [123.675, 116.28, 103.53]) and np.allclose(prep["pixel_std"], [58.395, 57.12, 57.375])


def test_frozen_in_eval_mode_and_picklable(sam2_t, packed):
    segmenter = frozen_submodule(copy.deepcopy(sam2_t))
    segmenter.train()
    assert not segmenter.training and not segmenter.sam.training
    assert not any(p.requires_grad for p in segmenter.parameters())
    assert pickle.loads(pickle.dumps(segmenter.img_size)) == 1024
    assert isinstance(pickle.loads(pickle.dumps(segmenter.img_size)), SquashedSquare)
    points, labels = torch.full((2, 1, 2), 400.0), torch.ones(2, 1, dtype=torch.long)
    logits, _ = segmenter.decode(packed[:2], points, labels)
    assert not logits.requires_grad
    embeddings = packed[:2].clone().requires_grad_(True)
    logits, _ = segmenter.decode_with_grad(embeddings, points, labels)
    logits.sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


# -- checkpoints ---------------------------------------------------------------------------------------
def test_official_format_checkpoint_round_trip(sam2_t, packed, tmp_path):
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    save_sam2_checkpoint(sam2_t.sam, str(path))
    raw = torch.load(path, map_location="cpu", weights_only=True)  # what build_sam2 itself reads
    assert set(raw) == {"model"}
    loaded = build_segmenter("sam2.1_hiera_t", str(path))
    assert loaded.fingerprint.startswith("sam2.1_hiera_tiny.pt:")
    points, labels = torch.full((2, 1, 2), 400.0), torch.ones(2, 1, dtype=torch.long)
    assert torch.equal(loaded.decode(packed[:2], points, labels)[0], sam2_t.decode(packed[:2], points, labels)[0])
    # the sam2 package's own builder reads the same file
    from sam2.build_sam import build_sam2

    theirs = build_sam2(SAM2_MODELS["sam2.1_hiera_t"][0], str(path), device="cpu")
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, loaded.sam.state_dict()[key])


def test_checkpoint_errors(sam2_t, tmp_path):
    with pytest.raises(CheckpointError, match="sam2.1_hiera_tiny.pt"):
        build_segmenter("sam2.1_hiera_t", str(tmp_path / "missing.pt"))
    plain = tmp_path / "plain.pt"
    torch.save({"image_encoder.x": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="under 'model'"):
        build_segmenter("sam2.1_hiera_t", str(plain))
    other = tmp_path / "sam2_hiera_tiny.pt"
    torch.manual_seed(0)
    save_sam2_checkpoint(build_sam2_model("sam2_hiera_t"), str(other))  # SAM 2.0 weights for a 2.1 name
    with pytest.raises(CheckpointError, match="does not fit SAM 2 'sam2.1_hiera_t'"):
        build_segmenter("sam2.1_hiera_t", str(other))
    assert build_segmenter("sam2_hiera_t", str(other)).name == "sam2_hiera_t"


# -- benchmarks/decode.py ----------------------------------------------------------------------------
def test_decode_benchmark_runs_sam2(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_benchmark_sam2", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    rows = benchmark.main(["--models", "sam2.1_hiera_t", "--batch-sizes", "2", "--clicks", "2",
                           "--repeats", "1", "--warmup", "0"])
    assert [row["B"] for row in rows] == [2] and all(rows[0][k] > 0 for k in ("predictor", "per_image", "batched"))
    assert "| sam2.1_hiera_t (random weights) | 2 | 2 |" in capsys.readouterr().out
