"""Segmenter against segment-anything's own SamPredictor, plus geometry, freezing and checkpoint errors.

The reference for every equivalence is the installed ``segment_anything.SamPredictor`` fed one
image at a time; the Segmenter must reproduce its low-res logits (max abs difference < 1e-4) while
decoding B different images in one call.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

import alignsam.foundation.segmenter as segmenter_module
from alignsam.foundation.segmenter import (
    DECODE_ATTENTION,
    DOWNLOAD_PAGE,
    OFFICIAL_CHECKPOINTS,
    CheckpointError,
    Segmenter,
    auto_decode_chunk,
    dense_positional_encoding,
)
from alignsam.foundation.registry import build_segmenter
from alignsam.foundation.tiny import TINY_SAM_FILE, TinySamArch, build_tiny_sam, save_tiny_sam
from alignsam.geometry import (
    actions_to_sam_points,
    input_size_for,
    low_res_to_original,
    original_to_sam_points,
    patch_centres,
    resize_image_for_sam,
)

TOLERANCE = 1e-4
# Different sizes and aspect ratios, including odd sides where the longest-side rounding matters.
TINY_IMAGE_HW = [(200, 300), (256, 256), (301, 117), (97, 211)]
VIT_B_IMAGE_HW = [(480, 640), (1024, 1024), (701, 389)]


# -- helpers ---------------------------------------------------------------------------------------
def random_images(hws, seed=0):
    """uint8 (H, W, 3) images with smooth structure plus noise (so the encoder sees edges)."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in hws:
        ys, xs = np.mgrid[0:h, 0:w]
        base = np.stack([xs * 255 / w, ys * 255 / h, (xs + ys) * 127 / (h + w)], axis=-1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def random_clicks(hws, num_clicks, seed=0):
    """Clicks ``(B, N, 2)`` in each image's original frame and labels ``(B, N)`` in {0, 1}."""
    gen = torch.Generator().manual_seed(seed)
    wh = torch.tensor(hws, dtype=torch.float32).flip(-1)  # (B, 2) as (w, h)
    points = torch.rand(len(hws), num_clicks, 2, generator=gen) * wh[:, None, :]
    labels = torch.randint(0, 2, (len(hws), num_clicks), generator=gen)
    labels[:, 0] = 1  # the first click of an episode is positive
    return points, labels


def max_abs_diff(name, ours, reference):
    diff = (torch.as_tensor(ours).float() - torch.as_tensor(reference).float()).abs().max().item()
    print(f"{name}: max abs difference {diff:.3g}")
    return diff


def set_predictor_features(predictor, features, original_hw, img_size):
    """Point a SamPredictor at an embedding without running its image encoder."""
    predictor.reset_image()
    predictor.features = features
    predictor.original_size = tuple(original_hw)
    predictor.input_size = input_size_for(tuple(original_hw), img_size)
    predictor.is_image_set = True


def predictor_outputs(predictor, points_i, labels_i, mask_input_i=None, multimask=False):
    """``SamPredictor.predict`` for one image -> (low-res logits (M, h, w), iou (M,))."""
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
def tiny() -> Segmenter:
    torch.manual_seed(0)
    return build_segmenter("tiny")


@pytest.fixture(scope="module")
def vit_b() -> Segmenter:
    """ViT-B architecture at random weights (built once: about a second on 2 CPU cores)."""
    torch.manual_seed(0)
    return build_segmenter("vit_b")


@pytest.fixture(scope="module")
def tiny_embedded(tiny):
    images = random_images(TINY_IMAGE_HW)
    return images, tiny.embed(images)


@pytest.fixture(scope="module")
def vit_b_embeddings(vit_b):
    """Random embeddings ``(B, 256, 64, 64)`` at the scale of real SAM features."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(len(VIT_B_IMAGE_HW), vit_b.embed_dim, *vit_b.embedding_hw, generator=gen) * 0.3


# -- embedding ---------------------------------------------------------------------------------------
def test_tiny_embed_matches_predictor_set_image(tiny, tiny_embedded):
    images, embedded = tiny_embedded
    predictor = SamPredictor(tiny.sam)
    assert embedded.embeddings.shape == (len(images), tiny.embed_dim, *tiny.embedding_hw)
    for i, image in enumerate(images):
        predictor.set_image(image)
        assert tuple(embedded.original_hw[i].tolist()) == predictor.original_size
        assert tuple(embedded.input_hw[i].tolist()) == predictor.input_size
        assert max_abs_diff(f"tiny embed {image.shape[:2]}", embedded.embeddings[i], predictor.features[0]) < TOLERANCE


def test_embed_rejects_non_uint8_rgb(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny.embed([np.zeros((32, 32, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="uint8"):
        tiny.embed([np.zeros((32, 32), dtype=np.uint8)])


# -- decoding: tiny, full path -----------------------------------------------------------------------
@pytest.mark.parametrize("multimask", [False, True])
def test_tiny_decode_matches_predictor(tiny, tiny_embedded, multimask):
    images, embedded = tiny_embedded
    points, labels = random_clicks(TINY_IMAGE_HW, num_clicks=3, seed=2)
    sam_points = original_to_sam_points(points, embedded.original_hw, tiny.img_size)
    low_res, iou = tiny.decode(embedded.embeddings, sam_points, labels, multimask=multimask)
    masks_per_image = 3 if multimask else 1
    assert low_res.shape == (len(images), masks_per_image, *tiny.low_res_hw)
    assert iou.shape == (len(images), masks_per_image)

    predictor = SamPredictor(tiny.sam)
    for i, image in enumerate(images):
        predictor.set_image(image)
        ref_low, ref_iou = predictor_outputs(predictor, points[i], labels[i], multimask=multimask)
        assert max_abs_diff(f"tiny decode {image.shape[:2]} multimask={multimask}", low_res[i], ref_low) < TOLERANCE
        assert max_abs_diff("tiny iou", iou[i], ref_iou) < TOLERANCE


def test_tiny_decode_with_mask_input_matches_predictor(tiny, tiny_embedded):
    images, embedded = tiny_embedded
    points, labels = random_clicks(TINY_IMAGE_HW, num_clicks=2, seed=3)
    sam_points = original_to_sam_points(points, embedded.original_hw, tiny.img_size)
    previous, _ = tiny.decode(embedded.embeddings, sam_points[:, :1], labels[:, :1])
    low_res, _ = tiny.decode(embedded.embeddings, sam_points, labels, mask_input=previous)

    predictor = SamPredictor(tiny.sam)
    for i, image in enumerate(images):
        predictor.set_image(image)
        ref_low, _ = predictor_outputs(predictor, points[i], labels[i], mask_input_i=previous[i])
        assert max_abs_diff(f"tiny decode + mask_input {image.shape[:2]}", low_res[i], ref_low) < TOLERANCE
    # The mask input must actually matter, or the comparison above proves nothing about it.
    without_mask, _ = tiny.decode(embedded.embeddings, sam_points, labels)
    assert (without_mask - low_res).abs().max() > 1e-3


# -- decoding: ViT-B decoder on shared random embeddings --------------------------------------------
@pytest.mark.parametrize("multimask", [False, True])
def test_vit_b_decode_matches_predictor(vit_b, vit_b_embeddings, multimask):
    original_hw = torch.tensor(VIT_B_IMAGE_HW)
    points, labels = random_clicks(VIT_B_IMAGE_HW, num_clicks=4, seed=4)
    sam_points = original_to_sam_points(points, original_hw, vit_b.img_size)
    low_res, iou = vit_b.decode(vit_b_embeddings, sam_points, labels, multimask=multimask)
    assert low_res.shape == (len(VIT_B_IMAGE_HW), 3 if multimask else 1, 256, 256)

    predictor = SamPredictor(vit_b.sam)
    for i, hw in enumerate(VIT_B_IMAGE_HW):
        set_predictor_features(predictor, vit_b_embeddings[i : i + 1], hw, vit_b.img_size)
        ref_low, ref_iou = predictor_outputs(predictor, points[i], labels[i], multimask=multimask)
        assert max_abs_diff(f"vit_b decode {hw} multimask={multimask}", low_res[i], ref_low) < TOLERANCE
        assert max_abs_diff("vit_b iou", iou[i], ref_iou) < TOLERANCE


def test_vit_b_decode_with_mask_input_matches_predictor(vit_b, vit_b_embeddings):
    original_hw = torch.tensor(VIT_B_IMAGE_HW)
    points, labels = random_clicks(VIT_B_IMAGE_HW, num_clicks=2, seed=5)
    sam_points = original_to_sam_points(points, original_hw, vit_b.img_size)
    previous, _ = vit_b.decode(vit_b_embeddings, sam_points[:, :1], labels[:, :1])
    low_res, _ = vit_b.decode(vit_b_embeddings, sam_points, labels, mask_input=previous)

    predictor = SamPredictor(vit_b.sam)
    for i, hw in enumerate(VIT_B_IMAGE_HW):
        set_predictor_features(predictor, vit_b_embeddings[i : i + 1], hw, vit_b.img_size)
        ref_low, _ = predictor_outputs(predictor, points[i], labels[i], mask_input_i=previous[i])
        assert max_abs_diff(f"vit_b decode + mask_input {hw}", low_res[i], ref_low) < TOLERANCE


def test_no_clicks_matches_predictor(vit_b, vit_b_embeddings, tiny, tiny_embedded):
    predictor = SamPredictor(vit_b.sam)
    low_res, iou = vit_b.decode(vit_b_embeddings, None, None)
    assert low_res.shape == (len(VIT_B_IMAGE_HW), 1, 256, 256) and iou.shape == (len(VIT_B_IMAGE_HW), 1)
    for i, hw in enumerate(VIT_B_IMAGE_HW):
        set_predictor_features(predictor, vit_b_embeddings[i : i + 1], hw, vit_b.img_size)
        ref_low, _ = predictor_outputs(predictor, None, None)
        assert max_abs_diff(f"vit_b no clicks {hw}", low_res[i], ref_low) < TOLERANCE

    # No clicks but a previous mask (tiny model, real embeddings).
    images, embedded = tiny_embedded
    mask_input = torch.randn(len(images), 1, *tiny.low_res_hw, generator=torch.Generator().manual_seed(6))
    low_res, _ = tiny.decode(embedded.embeddings, None, None, mask_input=mask_input)
    predictor = SamPredictor(tiny.sam)
    for i, image in enumerate(images):
        set_predictor_features(predictor, embedded.embeddings[i : i + 1], image.shape[:2], tiny.img_size)
        ref_low, _ = predictor_outputs(predictor, None, None, mask_input_i=mask_input[i])
        assert max_abs_diff(f"tiny no clicks + mask_input {image.shape[:2]}", low_res[i], ref_low) < TOLERANCE


def test_decode_accepts_half_precision_embeddings(tiny, tiny_embedded):
    _, embedded = tiny_embedded
    points = torch.full((len(TINY_IMAGE_HW), 1, 2), 100.0)
    labels = torch.ones(len(TINY_IMAGE_HW), 1, dtype=torch.long)
    full, _ = tiny.decode(embedded.embeddings, points, labels)
    half, _ = tiny.decode(embedded.embeddings.half(), points, labels)
    assert half.dtype == torch.float32
    assert max_abs_diff("half-precision embeddings", half, full) < 0.05


# -- padding with label -1 ---------------------------------------------------------------------------
# Rows of one batch over the tiny images (image index, label pattern; r = a real click, -1 = padding):
# no padding, padding in the middle and at the end, only padding, padding at the front, and two rows
# per click count so that a group decodes several rows.
PADDED_ROWS = [
    (0, "r r r r"),
    (1, "r -1 r -1"),
    (2, "-1 -1 -1 -1"),
    (3, "r r r -1"),
    (1, "-1 r -1 r"),
    (2, "-1 -1 -1 -1"),
    (0, "r -1 -1 -1"),
]


def padded_batch(embedded, seed):
    """The :data:`PADDED_ROWS` batch: embeddings ``(R, C, h, w)``, original_hw ``(R, 2)``, clicks
    ``(R, 4, 2)`` in each image's original frame and labels ``(R, 4)`` with -1 where the pattern pads."""
    owners = torch.tensor([owner for owner, _ in PADDED_ROWS])
    original_hw = embedded.original_hw[owners]
    points, labels = random_clicks([tuple(hw) for hw in original_hw.tolist()], num_clicks=4, seed=seed)
    for row, (_, pattern) in enumerate(PADDED_ROWS):
        for k, token in enumerate(pattern.split()):
            if token == "-1":
                labels[row, k] = -1
    return embedded.embeddings[owners], original_hw, points, labels


def predictor_on_real_clicks(predictor, points_i, labels_i, mask_input_i=None, multimask=False):
    """SamPredictor on one row's non-padding clicks only (no point prompt when there are none)."""
    real = labels_i >= 0
    if not real.any():
        return predictor_outputs(predictor, None, None, mask_input_i, multimask)
    return predictor_outputs(predictor, points_i[real], labels_i[real], mask_input_i, multimask)


@pytest.mark.parametrize("with_mask_input", [False, True])
@pytest.mark.parametrize("multimask", [False, True])
def test_padded_rows_match_predictor_on_their_own_clicks(tiny, tiny_embedded, with_mask_input, multimask):
    """Each row of a batch with mixed numbers of real clicks gets exactly what SamPredictor gives on
    its own real clicks: padding is ignored wherever it sits, and a row of only padding is unprompted."""
    images, embedded = tiny_embedded
    embeddings, original_hw, points, labels = padded_batch(embedded, seed=7)
    sam_points = original_to_sam_points(points, original_hw, tiny.img_size)
    mask_input = None
    if with_mask_input:  # a previous step's logits, from a first real click of every row
        first = torch.full((len(PADDED_ROWS), 1, 2), 100.0)
        mask_input, _ = tiny.decode(embeddings, first, torch.ones(len(PADDED_ROWS), 1, dtype=torch.long))
    low_res, iou = tiny.decode(embeddings, sam_points, labels, mask_input=mask_input, multimask=multimask)
    assert low_res.shape == (len(PADDED_ROWS), 3 if multimask else 1, *tiny.low_res_hw)

    predictor = SamPredictor(tiny.sam)
    for row, (owner, pattern) in enumerate(PADDED_ROWS):
        set_predictor_features(predictor, embedded.embeddings[owner : owner + 1], images[owner].shape[:2], tiny.img_size)
        ref_low, ref_iou = predictor_on_real_clicks(
            predictor, points[row], labels[row], None if mask_input is None else mask_input[row], multimask
        )
        assert max_abs_diff(f"row {row} [{pattern}] mask_input={with_mask_input}", low_res[row], ref_low) < TOLERANCE
        assert max_abs_diff(f"row {row} iou", iou[row], ref_iou) < TOLERANCE


def test_only_padding_is_the_same_as_no_clicks(tiny, tiny_embedded):
    """A batch of only padding, or with N = 0 clicks, decodes as ``points=None`` (no point tokens)."""
    _, embedded = tiny_embedded
    b = len(TINY_IMAGE_HW)
    unprompted, _ = tiny.decode(embedded.embeddings, None, None)
    all_padding, _ = tiny.decode(embedded.embeddings, torch.zeros(b, 2, 2), torch.full((b, 2), -1))
    no_clicks, _ = tiny.decode(embedded.embeddings, torch.zeros(b, 0, 2), torch.zeros(b, 0, dtype=torch.long))
    assert max_abs_diff("only padding vs no clicks", all_padding, unprompted) < TOLERANCE
    assert max_abs_diff("N = 0 vs no clicks", no_clicks, unprompted) < TOLERANCE


def test_padding_position_and_coordinates_do_not_matter(tiny, tiny_embedded):
    """Padding is dropped: where it sits in the list and what coordinates it carries are irrelevant."""
    _, embedded = tiny_embedded
    points, labels = random_clicks(TINY_IMAGE_HW, num_clicks=3, seed=8)
    labels[:, 1] = -1
    sam_points = original_to_sam_points(points, embedded.original_hw, tiny.img_size)
    middle, _ = tiny.decode(embedded.embeddings, sam_points, labels)

    order = [0, 2, 1]  # move the padding entry to the end
    at_end, _ = tiny.decode(embedded.embeddings, sam_points[:, order], labels[:, order])
    assert max_abs_diff("padding in the middle vs at the end", middle, at_end) < TOLERANCE

    moved = sam_points.clone()
    moved[:, 1] = torch.tensor([3.0, 200.0])
    other_coords, _ = tiny.decode(embedded.embeddings, moved, labels)
    assert torch.equal(other_coords, middle)
    # ...whereas moving a real click does change the output.
    moved_real = sam_points.clone()
    moved_real[:, 2] = torch.tensor([3.0, 200.0])
    assert (tiny.decode(embedded.embeddings, moved_real, labels)[0] - middle).abs().max() > TOLERANCE


def test_padding_to_a_longer_list_is_a_no_op(tiny, tiny_embedded):
    """Padding a one-click list with -1 entries gives SAM's output for the one click (in SAM itself
    each -1 entry would be one more 'not a point' token in the decoder and change the masks)."""
    _, embedded = tiny_embedded
    points, labels = random_clicks(TINY_IMAGE_HW, num_clicks=3, seed=9)
    sam_points = original_to_sam_points(points, embedded.original_hw, tiny.img_size)
    short, _ = tiny.decode(embedded.embeddings, sam_points[:, :1], labels[:, :1])
    padded_labels = labels.clone()
    padded_labels[:, 1:] = -1
    padded, _ = tiny.decode(embedded.embeddings, sam_points, padded_labels)
    assert max_abs_diff("one click vs one click + 2 padding", padded, short) < TOLERANCE


def test_decoder_calls_one_without_padding_one_per_click_count_with_it(tiny, tiny_embedded, monkeypatch):
    _, embedded = tiny_embedded
    calls = []
    run_transformer = segmenter_module._run_transformer

    def counting(transformer, image_embedding, *args):
        calls.append(image_embedding.shape[0])
        return run_transformer(transformer, image_embedding, *args)

    monkeypatch.setattr(segmenter_module, "_run_transformer", counting)
    points, labels = random_clicks(TINY_IMAGE_HW, num_clicks=3, seed=10)
    tiny.decode(embedded.embeddings, points, labels)
    assert calls == [len(TINY_IMAGE_HW)]
    embeddings, _, points, labels = padded_batch(embedded, seed=10)
    calls.clear()
    tiny.decode(embeddings, points, labels)
    assert sorted(calls) == [1, 1, 1, 2, 2]  # 0, 1, 2, 3 and 4 real clicks


def test_padded_decode_keeps_the_graph(tiny, tiny_embedded):
    """decode_with_grad through the grouped path: every row's embedding gets a gradient."""
    _, embedded = tiny_embedded
    embeddings, original_hw, points, labels = padded_batch(embedded, seed=11)
    embeddings = embeddings.clone().requires_grad_(True)
    sam_points = original_to_sam_points(points, original_hw, tiny.img_size)
    low_res, _ = tiny.decode_with_grad(embeddings, sam_points, labels)
    low_res.sum().backward()
    assert (embeddings.grad.flatten(1).abs().sum(1) > 0).all()


# -- the fast decode path: attention, chunks, the image side, autocast --------------------------------
# The SamPredictor tests above run the default path (attention "fast", automatic chunks); these
# check that every option gives SamPredictor's logits, and that the options change nothing else.
def predictor_reference(segmenter, embeddings, original_hw, points, labels, mask_input=None):
    """SamPredictor's low-res logits ``(B, 1, 4h, 4w)`` for every row (its own embedding and clicks)."""
    predictor = SamPredictor(segmenter.sam)
    out = []
    for i in range(embeddings.shape[0]):
        set_predictor_features(predictor, embeddings[i : i + 1], tuple(original_hw[i].tolist()), segmenter.img_size)
        out.append(predictor_on_real_clicks(predictor, points[i], labels[i],
                                            None if mask_input is None else mask_input[i])[0])
    return torch.stack(out)


@pytest.fixture
def restore_decode_options(tiny, vit_b):
    yield
    for segmenter in (tiny, vit_b):
        segmenter.attention, segmenter.decode_chunk = "fast", None


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
@pytest.mark.parametrize("chunk", [None, 0, 3])
def test_every_attention_and_chunking_matches_predictor(tiny, tiny_embedded, attention, chunk, restore_decode_options):
    """Padded rows (the grouped path), split into chunks of 3 or not."""
    _, embedded = tiny_embedded
    embeddings, original_hw, points, labels = padded_batch(embedded, seed=12)
    sam_points = original_to_sam_points(points, original_hw, tiny.img_size)
    tiny.attention, tiny.decode_chunk = attention, chunk
    low_res, _ = tiny.decode(embeddings, sam_points, labels)
    reference = predictor_reference(tiny, embeddings, original_hw, points, labels)
    assert max_abs_diff(f"tiny attention={attention} chunk={chunk}", low_res, reference) < TOLERANCE


@pytest.mark.parametrize("attention", DECODE_ATTENTION)
def test_vit_b_every_attention_matches_predictor(vit_b, vit_b_embeddings, attention, restore_decode_options):
    original_hw = torch.tensor(VIT_B_IMAGE_HW)
    points, labels = random_clicks(VIT_B_IMAGE_HW, num_clicks=3, seed=13)
    sam_points = original_to_sam_points(points, original_hw, vit_b.img_size)
    vit_b.attention, vit_b.decode_chunk = attention, 2  # chunks of 2 over 3 images: a full and a partial one
    low_res, _ = vit_b.decode(vit_b_embeddings, sam_points, labels)
    reference = predictor_reference(vit_b, vit_b_embeddings, original_hw, points, labels)
    assert max_abs_diff(f"vit_b attention={attention}", low_res, reference) < TOLERANCE


def test_automatic_chunks_on_the_cpu_only():
    """4 ViT-B images (64 x 64 x 256 tokens, 4 MiB) or 128 tiny ones a call on the CPU; one call on a GPU."""
    assert auto_decode_chunk(torch.device("cpu"), (64, 64), 256) == 4
    assert auto_decode_chunk(torch.device("cpu"), (16, 16), 128) == 128
    assert auto_decode_chunk(torch.device("cpu"), (256, 256), 1024) == 1
    assert auto_decode_chunk(torch.device("cuda"), (64, 64), 256) is None


def test_chunks_split_the_batch(vit_b, vit_b_embeddings, monkeypatch, restore_decode_options):
    calls = []
    run_transformer = segmenter_module._run_transformer

    def counting(transformer, image_embedding, image_pe, tokens, *args):
        calls.append(tokens.shape[0])
        return run_transformer(transformer, image_embedding, image_pe, tokens, *args)

    monkeypatch.setattr(segmenter_module, "_run_transformer", counting)
    points = torch.full((3, 1, 2), 300.0)
    labels = torch.ones(3, 1, dtype=torch.long)
    vit_b.decode_chunk = 2
    vit_b.decode(vit_b_embeddings, points, labels)
    assert calls == [2, 1]
    calls.clear()
    vit_b.decode_chunk = 0  # no chunks
    vit_b.decode(vit_b_embeddings, points, labels)
    assert calls == [3]


@pytest.mark.parametrize("padded", [False, True])
def test_image_side_changes_nothing(tiny, tiny_embedded, padded, restore_decode_options):
    """An episode's decodes with the decoder's image-side work done once give the same logits."""
    _, embedded = tiny_embedded
    if padded:
        embeddings, original_hw, points, labels = padded_batch(embedded, seed=14)
    else:
        embeddings, original_hw = embedded.embeddings, embedded.original_hw
        points, labels = random_clicks([tuple(hw) for hw in original_hw.tolist()], num_clicks=3, seed=14)
    sam_points = original_to_sam_points(points, original_hw, tiny.img_size)
    side = tiny.image_side(embeddings)
    assert side is not None and len(side) == embeddings.shape[0]
    for chunk in (None, 2):
        tiny.decode_chunk = chunk
        plain, plain_iou = tiny.decode(embeddings, sam_points, labels)
        reused, reused_iou = tiny.decode(embeddings, sam_points, labels, image_side=side)
        assert max_abs_diff(f"image side, padded={padded} chunk={chunk}", reused, plain) < 1e-5
        assert max_abs_diff("image side iou", reused_iou, plain_iou) < 1e-5
    reference = predictor_reference(tiny, embeddings, original_hw, points, labels)
    assert max_abs_diff("image side vs predictor", reused, reference) < TOLERANCE


def test_image_side_is_ignored_with_a_mask_prompt_and_checked(tiny, tiny_embedded):
    _, embedded = tiny_embedded
    points = torch.full((len(TINY_IMAGE_HW), 1, 2), 100.0)
    labels = torch.ones(len(TINY_IMAGE_HW), 1, dtype=torch.long)
    side = tiny.image_side(embedded.embeddings)
    previous, _ = tiny.decode(embedded.embeddings, points, labels)
    with_mask, _ = tiny.decode(embedded.embeddings, points, labels, mask_input=previous)
    with_mask_and_side, _ = tiny.decode(embedded.embeddings, points, labels, mask_input=previous, image_side=side)
    assert torch.equal(with_mask, with_mask_and_side)
    with pytest.raises(ValueError, match="image_side holds"):
        tiny.decode(embedded.embeddings[:2], points[:2], labels[:2], image_side=side)


def test_no_image_side_for_eager_attention(tiny, tiny_embedded, restore_decode_options):
    tiny.attention = "eager"
    assert tiny.image_side(tiny_embedded[1].embeddings) is None


def test_decode_stays_float32_under_autocast(tiny, tiny_embedded):
    """SAM's decode ignores an enclosing bf16 autocast (Trainer precision bf16-mixed, model.ppo.precision bf16)."""
    _, embedded = tiny_embedded
    points, labels = random_clicks(TINY_IMAGE_HW, num_clicks=3, seed=15)
    sam_points = original_to_sam_points(points, embedded.original_hw, tiny.img_size)
    full, _ = tiny.decode(embedded.embeddings, sam_points, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = tiny.decode(embedded.embeddings, sam_points, labels)
    assert inside.dtype == torch.float32 and torch.equal(inside, full)


def test_dense_positional_encoding_is_computed_once_per_version(tiny):
    encoder = tiny.sam.prompt_encoder
    first = dense_positional_encoding(encoder)
    assert torch.equal(first, encoder.get_dense_pe())
    assert dense_positional_encoding(encoder) is first  # reused
    matrix = encoder.pe_layer.positional_encoding_gaussian_matrix
    saved = matrix.clone()
    try:
        matrix.mul_(2.0)  # an in-place change (a new checkpoint loaded into the same tensors)
        changed = dense_positional_encoding(encoder)
        assert changed is not first and torch.equal(changed, encoder.get_dense_pe())
    finally:
        matrix.copy_(saved)


# -- geometry ----------------------------------------------------------------------------------------
GEOMETRY_HW = [(480, 640), (333, 500), (701, 389), (97, 211), (5, 1000), (1023, 1024), (256, 256)]


@pytest.mark.parametrize("img_size", [256, 1024])
def test_input_size_matches_resize_longest_side(img_size):
    for h, w in GEOMETRY_HW:
        expected = ResizeLongestSide.get_preprocess_shape(h, w, img_size)
        assert input_size_for((h, w), img_size) == expected, (h, w)


def test_resize_image_for_sam_gives_input_size():
    for hw, image in zip(TINY_IMAGE_HW, random_images(TINY_IMAGE_HW)):
        assert resize_image_for_sam(image, 256).shape[:2] == input_size_for(hw, 256)


@pytest.mark.parametrize("img_size", [256, 1024])
def test_original_to_sam_points_matches_apply_coords(img_size):
    points, _ = random_clicks(GEOMETRY_HW, num_clicks=5, seed=10)
    ours = original_to_sam_points(points, torch.tensor(GEOMETRY_HW), img_size)
    transform = ResizeLongestSide(img_size)
    for i, hw in enumerate(GEOMETRY_HW):
        reference = transform.apply_coords(points[i].double().numpy(), hw)
        assert max_abs_diff(f"coords {hw} -> {img_size}", ours[i], reference) < 1e-3


def test_patch_centres_tile_the_original_image_row_major():
    grid, original_hw = 4, torch.tensor([[300, 200], [64, 640]])
    centres = patch_centres(grid, original_hw)
    assert centres.shape == (2, grid * grid, 2)
    for b, (h, w) in enumerate(original_hw.tolist()):
        for action in range(grid * grid):
            row, col = divmod(action, grid)
            expected = torch.tensor([(col + 0.5) * w / grid, (row + 0.5) * h / grid])
            assert torch.allclose(centres[b, action], expected), (b, action)


def test_actions_to_sam_points_is_centre_then_resize():
    grid, original_hw = 5, torch.tensor([[480, 640], [701, 389]])
    actions = torch.tensor([[0, 12, 24], [4, 20, 7]])
    ours = actions_to_sam_points(actions, grid, original_hw, 1024)
    transform = ResizeLongestSide(1024)
    for b, (h, w) in enumerate(original_hw.tolist()):
        rows, cols = actions[b] // grid, actions[b] % grid
        centres = np.stack([(cols + 0.5) * w / grid, (rows + 0.5) * h / grid], axis=-1)
        assert max_abs_diff("action -> SAM frame", ours[b], transform.apply_coords(centres, (h, w))) < 1e-3


def test_low_res_to_original_matches_postprocess_masks(tiny):
    gen = torch.Generator().manual_seed(11)
    for hw in TINY_IMAGE_HW:
        low_res = torch.randn(1, 3, *tiny.low_res_hw, generator=gen)
        input_hw = input_size_for(hw, tiny.img_size)
        reference = tiny.sam.postprocess_masks(low_res, input_hw, hw)[0]
        ours = low_res_to_original(low_res[0], input_hw, hw, tiny.img_size)
        assert ours.shape == (3, *hw)
        assert max_abs_diff(f"low_res_to_original {hw}", ours, reference) < 1e-5


def test_logits_to_original_uses_each_images_own_sizes(tiny, tiny_embedded):
    images, embedded = tiny_embedded
    low_res = torch.randn(len(images), 1, *tiny.low_res_hw)
    for i, image in enumerate(images):
        full = tiny.logits_to_original(low_res[i], embedded, i)
        assert full.shape == (1, *image.shape[:2])


# -- frozen ------------------------------------------------------------------------------------------
def test_segmenter_is_frozen_and_stays_in_eval_mode(tiny):
    assert all(not p.requires_grad for p in tiny.parameters())
    parent = torch.nn.ModuleDict({"segmenter": tiny, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in tiny.modules())
    tiny.train(True)
    assert not any(m.training for m in tiny.modules())


def test_decode_runs_without_grad_but_decode_with_grad_does_not(tiny, tiny_embedded):
    _, embedded = tiny_embedded
    embeddings = embedded.embeddings.clone().requires_grad_(True)
    points = torch.full((len(TINY_IMAGE_HW), 1, 2), 64.0)
    labels = torch.ones(len(TINY_IMAGE_HW), 1, dtype=torch.long)
    low_res, iou = tiny.decode(embeddings, points, labels)
    assert not low_res.requires_grad and not iou.requires_grad
    # The pretraining path keeps the graph, so the check above is not vacuous.
    low_res, _ = tiny.decode_with_grad(embeddings, points, labels)
    low_res.sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_embed_runs_without_grad(tiny):
    embedded = tiny.embed(random_images([(64, 48)]))
    assert not embedded.embeddings.requires_grad


# -- checkpoints -------------------------------------------------------------------------------------
def test_missing_official_checkpoint_names_path_file_and_download_page(tmp_path):
    path = tmp_path / "weights" / "sam.pth"
    with pytest.raises(CheckpointError) as info:
        build_segmenter("vit_b", str(path))
    message = str(info.value)
    assert str(path) in message
    assert OFFICIAL_CHECKPOINTS["vit_b"] == "sam_vit_b_01ec64.pth"
    assert "sam_vit_b_01ec64.pth" in message
    assert DOWNLOAD_PAGE in message
    assert isinstance(info.value, FileNotFoundError)


def test_corrupt_official_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"<html>404 Not Found</html>")  # what a failed download often leaves behind
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        build_segmenter("vit_b", str(path))
    assert str(path) in str(info.value)


def test_wrong_official_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(build_tiny_sam().state_dict(), path)  # a real SAM state dict, of the wrong model
    with pytest.raises(CheckpointError, match="does not fit SAM 'vit_b'") as info:
        build_segmenter("vit_b", str(path))
    assert str(path) in str(info.value) and "sam_vit_b_01ec64.pth" in str(info.value)


def test_tiny_checkpoint_errors(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError) as info:
        build_segmenter("tiny", str(missing))
    assert str(missing) in str(info.value) and TINY_SAM_FILE in str(info.value)
    assert "alignsam.pretrain.tiny_sam" in str(info.value)

    not_tiny = tmp_path / "tiny_sam.pt"
    torch.save({"weights": torch.zeros(3)}, not_tiny)
    with pytest.raises(CheckpointError, match="not a tiny SAM file"):
        build_segmenter("tiny", str(not_tiny))

    truncated = tmp_path / "truncated.pt"
    torch.save(build_tiny_sam().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        build_segmenter("tiny", str(truncated))


def test_tiny_checkpoint_round_trip(tmp_path, tiny, tiny_embedded):
    _, embedded = tiny_embedded
    path = tmp_path / TINY_SAM_FILE
    save_tiny_sam(tiny.sam, TinySamArch(), str(path), seed=0)
    loaded = build_segmenter("tiny", str(path))
    assert loaded.fingerprint.startswith(TINY_SAM_FILE) and loaded.fingerprint != tiny.fingerprint
    for name, value in loaded.sam.state_dict().items():
        assert torch.equal(value, tiny.sam.state_dict()[name].half().float()), name


def test_unknown_segmenter_name_names_the_config_key():
    with pytest.raises(ValueError, match="model.segmenter.name"):
        build_segmenter("vit_x")


# -- full ViT-B, end to end (slow: ~20 s per image encoding on 2 CPU cores) --------------------------
@pytest.mark.slow
def test_vit_b_embed_and_decode_match_predictor_end_to_end(vit_b):
    image = random_images([(480, 640)], seed=12)[0]
    embedded = vit_b.embed([image])
    predictor = SamPredictor(vit_b.sam)
    predictor.set_image(image)
    assert max_abs_diff("vit_b embed", embedded.embeddings[0], predictor.features[0]) < TOLERANCE

    points, labels = random_clicks([(480, 640)], num_clicks=3, seed=13)
    sam_points = original_to_sam_points(points, embedded.original_hw, vit_b.img_size)
    low_res, _ = vit_b.decode(embedded.embeddings, sam_points, labels)
    ref_low, _ = predictor_outputs(predictor, points[0], labels[0])
    assert max_abs_diff("vit_b end to end", low_res[0], ref_low) < TOLERANCE
