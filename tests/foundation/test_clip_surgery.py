"""CLIP Surgery text matcher: shapes, the surgery maths against a step-by-step computation,
batching, loading. All on the tiny CLIP config with random weights (fast), except the ViT-B-16
state-dict test (slow)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignsam.foundation.clip_surgery import (
    TextMatcher,
    feature_surgery_scores,
    load_open_clip_state_dict,
)
from alignsam.foundation.registry import build_text_matcher
from alignsam.foundation.segmenter import CheckpointError
from alignsam.foundation.tiny_clip import (
    EOT_ID,
    PAD_ID,
    SOT_ID,
    TINY_CLIP_CONFIG,
    WordTokenizer,
    build_tiny_clip,
    save_tiny_clip,
)
from alignsam.geometry import resize_whole_image_maps, whole_image_maps_to_sam_grid

TEXTS = ["tomato", "leaf", "sun", "kite"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small for threading; on a shared 2-core machine extra threads
    only wait on each other (measured 10x slower), so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def matcher() -> TextMatcher:
    return build_text_matcher("tiny", None)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(200, 300), (256, 256), (97, 140)]:
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        img[h // 4 : h // 2, w // 3 : 2 * w // 3] = (220, 30, 30)  # a red block: structure to localise
        out.append(img)
    return out


def test_shapes_and_range(matcher, images):
    maps = matcher.similarity(images, ["tomato", "leaf", "sun"], out_hw=(10, 7))
    assert maps.shape == (3, 1, 10, 7) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    flat = maps.flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(3)) and torch.allclose(flat.max(1).values, torch.ones(3))
    assert not maps.requires_grad
    flipped = matcher.similarity([images[0][..., ::-1]], ["tomato"], out_hw=(10, 7))  # a strided view
    assert flipped.shape == (1, 1, 10, 7)
    with pytest.raises(ValueError, match="uint8"):
        matcher.similarity([images[0].astype(np.float32)], ["tomato"], out_hw=(10, 7))
    native = matcher.similarity(images[:1], ["tomato"], out_hw=matcher.grid_hw)
    assert native.shape == (1, 1, *matcher.grid_hw) == (1, 1, 16, 16)


def test_map_changes_with_text(matcher, images):
    maps = matcher.similarity_many(images[:1], [TEXTS], out_hw=(16, 16))[0]
    assert maps.shape == (4, 16, 16)
    for i in range(1, 4):
        assert (maps[0] - maps[i]).abs().max() > 1e-2


def test_batched_and_one_by_one_agree(matcher, images):
    texts = ["tomato", "leaf", "tomato"]
    batched = matcher.similarity(images, texts, out_hw=(12, 12))
    single = torch.cat([matcher.similarity([im], [t], out_hw=(12, 12)) for im, t in zip(images, texts)])
    diff = (batched - single).abs().max().item()
    print(f"batched vs one-by-one max abs diff {diff:.2e}")
    assert diff < 1e-4
    # several texts per image = the one-text calls
    many = matcher.similarity_many(images[:2], [["leaf", "tomato", "sun"], ["kite"]], out_hw=(12, 12))
    assert [m.shape[0] for m in many] == [3, 1]
    assert (many[0][1] - single[0, 0]).abs().max() < 1e-4


def _step_by_step_features(model, pixels, start):
    """The dual-path forward written out independently of the module (explicit per-head loops)."""
    visual = model.visual
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # (B, N, C)
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1) + visual.positional_embedding)
    blocks = list(visual.transformer.resblocks)
    for blk in blocks[:start]:
        h = blk.ln_1(x)
        x = x + blk.attn(h, h, h, need_weights=False)[0]  # torch's own attention for the plain path
        x = x + blk.mlp(blk.ln_2(x))
    new = original = x
    for blk in blocks[start:]:
        h = blk.ln_1(original)
        qk_out = blk.attn(h, h, h, need_weights=False)[0]
        width, heads = h.shape[-1], blk.attn.num_heads
        d = width // heads
        w_v = blk.attn.in_proj_weight[2 * width :]
        b_v = blk.attn.in_proj_bias[2 * width :]
        v = h @ w_v.T + b_v  # (B, N, C)
        per_head = []
        for i in range(heads):
            vh = v[..., i * d : (i + 1) * d]
            attn = torch.softmax(vh @ vh.transpose(1, 2) / d**0.5, dim=-1)
            per_head.append(attn @ vh)
        vv_out = blk.attn.out_proj(torch.cat(per_head, -1))
        new = new + vv_out
        original = original + qk_out
        original = original + blk.mlp(blk.ln_2(original))
    patches = visual.ln_post(new[:, 1:]) @ visual.proj
    global_ = visual.ln_post(original[:, 0]) @ visual.proj
    return F.normalize(patches, dim=-1), F.normalize(global_, dim=-1)


def _step_by_step_text(model, tokenizer, templates, text):
    emb = [F.normalize(model.encode_text(tokenizer([t.format(text)])), dim=-1)[0] for t in templates]
    return F.normalize(torch.stack(emb).mean(0), dim=0)


@torch.no_grad()
def test_surgery_matches_step_by_step(images):
    context = ["tomato", "leaf", "sun"]
    matcher = build_text_matcher("tiny", None, vv_start_block=2, context_texts=context)
    model, tok, templates = matcher.model, matcher.tokenizer, matcher.templates
    pixels = matcher.preprocess(images[:2])
    patches, global_ = _step_by_step_features(model, pixels, start=2)
    got_patches, got_global = matcher.image_features(images[:2])
    assert torch.allclose(got_patches.flatten(1, 2), patches, atol=1e-5)
    assert torch.allclose(got_global, global_, atol=1e-5)
    # the original path is the unmodified network; the new path really differs from it
    assert torch.allclose(got_global, F.normalize(model.encode_image(pixels), dim=-1), atol=1e-5)
    plain = F.normalize(model.visual.ln_post(model.visual.transformer(model.visual._embeds(pixels))[:, 1:]) @ model.visual.proj, dim=-1)
    assert (plain - patches).abs().max() > 1e-2

    # feature surgery over [query] + context (query "kite" is not in the context)
    query = "kite"
    t = torch.stack([_step_by_step_text(model, tok, templates, s) for s in [query, *context]])  # (K, D)
    assert torch.allclose(matcher.text_embeddings([query, *context]), t, atol=1e-5)
    f, g = patches[0], global_[0]  # (P, D), (D,)
    prob = torch.softmax(2.0 * (t @ g), 0)
    w = prob / prob.mean()
    s = torch.stack([w[k] * (f @ t[k]) for k in range(len(t))], 1)  # (P, K)
    expected = s[:, 0] - s.mean(1)
    got = matcher.query_scores(got_patches[0], got_global[0], query).flatten()
    assert torch.allclose(got, expected, atol=1e-5)

    # the full output: resampled to the grid, then min-max normalised
    grid = expected.reshape(1, 1, *matcher.grid_hw)
    resized = F.avg_pool2d(grid, 2)  # 16 x 16 patches -> 8 x 8 cells: each cell averages 2 x 2 patches
    resized = (resized - resized.min()) / (resized.max() - resized.min())
    out = matcher.similarity(images[:1], [query], out_hw=(8, 8))
    assert torch.allclose(out, resized, atol=1e-5)


@torch.no_grad()
def test_single_text_uses_empty_text_as_redundant_feature(matcher, images):
    patches, global_ = matcher.image_features(images[:1])
    f = patches[0].flatten(0, 1)
    t, empty = matcher.text_embeddings(["sun", ""])
    got = matcher.query_scores(patches[0], global_[0], "sun").flatten()
    assert torch.allclose(got, f @ (t - empty), atol=1e-5)
    off = build_text_matcher("tiny", None, feature_surgery=False)
    assert torch.allclose(off.query_scores(patches[0], global_[0], "sun").flatten(), f @ t, atol=1e-5)


def test_feature_surgery_removes_the_shared_component():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    texts = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    shared = F.normalize(torch.randn(8, generator=g), dim=0)
    scores = feature_surgery_scores(f, shared, texts)
    assert torch.allclose(scores.sum(1), torch.zeros(5), atol=1e-6)  # what is common to all texts is gone
    # adding the same vector to every text changes nothing once the weights are equal
    flat = feature_surgery_scores(f, torch.zeros(8), texts)
    flat_shifted = feature_surgery_scores(f, torch.zeros(8), texts + shared)
    assert torch.allclose(flat, flat_shifted, atol=1e-5)


@torch.no_grad()
def test_background_modes(images):
    base = dict(feature_surgery=False, background_texts=["background"])
    soft = build_text_matcher("tiny", None, background_temperature=10.0, normalization="probability", **base)
    sub = build_text_matcher("tiny", None, background_mode="subtract", **base)
    patches, global_ = soft.image_features(images[:1])
    f = patches[0].flatten(0, 1)
    t, bg = soft.text_embeddings(["leaf", "background"])
    expected_soft = torch.sigmoid(10.0 * (f @ t - f @ bg))  # two-way softmax
    assert torch.allclose(soft.query_scores(patches[0], global_[0], "leaf").flatten(), expected_soft, atol=1e-5)
    assert torch.allclose(sub.query_scores(patches[0], global_[0], "leaf").flatten(), f @ t - f @ bg, atol=1e-5)
    maps = soft.similarity(images[:1], ["leaf"], out_hw=(16, 16))
    assert torch.allclose(maps.flatten(), expected_soft, atol=1e-5)  # probability: not rescaled
    with pytest.raises(ValueError, match="probability"):
        build_text_matcher("tiny", None, normalization="probability")


def test_frozen_and_fingerprint(matcher):
    assert all(not p.requires_grad for p in matcher.parameters())
    matcher.train()
    assert not matcher.training and not matcher.model.training
    other = build_text_matcher("tiny", None, feature_surgery=False)
    assert matcher.fingerprint != other.fingerprint
    assert matcher.fingerprint == build_text_matcher("tiny", None).fingerprint
    with pytest.raises(TypeError, match="unknown text matcher option"):
        build_text_matcher("tiny", None, feature_surgey=False)
    assert build_text_matcher("tiny", None, vv_start_block=-6).vv_start_block == 0
    with pytest.raises(ValueError, match="vv_start_block"):
        build_text_matcher("tiny", None, vv_start_block=6)


def test_frozen_inside_a_holder_follows_dtype_and_stays_out_of_its_state_dict(images):
    from alignsam.foundation.frozen import frozen_submodule

    holder = torch.nn.Module()
    holder.head = torch.nn.Linear(2, 1)
    holder.matcher = frozen_submodule(build_text_matcher("tiny", None))
    before = holder.matcher.similarity(images[:1], ["sun"], (8, 8))
    assert set(holder.state_dict()) == {"head.weight", "head.bias"}
    holder.double()
    after = holder.matcher.similarity(images[:1], ["sun"], (8, 8))
    assert after.dtype == torch.float32 and (after - before).abs().max() < 1e-4


@pytest.mark.gpu
def test_matcher_on_the_gpu_matches_the_cpu(images):
    cpu = build_text_matcher("tiny", None)
    expected = cpu.similarity(images, ["tomato", "leaf", "sun"], (10, 10))
    got = cpu.to("cuda").similarity(images, ["tomato", "leaf", "sun"], (10, 10))
    assert got.is_cuda and (got.cpu() - expected).abs().max() < 1e-2  # cuDNN convs may use TF32


def test_word_tokenizer():
    tok = WordTokenizer(context_length=6)
    ids = tok(["A photo of the tomato.", ""])
    assert ids.shape == (2, 6) and ids.dtype == torch.long
    assert ids[0, 0] == SOT_ID and ids[0, 5] == EOT_ID  # cut to fit, still ends with the end token
    assert ids[1].tolist() == [SOT_ID, EOT_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]
    assert tok("leaf").shape == (1, 6)
    with pytest.raises(KeyError, match="zebra"):
        tok(["a zebra"])
    assert WordTokenizer(strict=False)(["a zebra"])[0, 2] == tok.unk_id
    assert WordTokenizer(["cat", "dog"]).vocab_size == 6
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer(["cat", "cat"])
    assert TINY_CLIP_CONFIG["text_cfg"]["vocab_size"] == WordTokenizer().vocab_size


@torch.no_grad()
def test_tiny_clip_pools_at_the_end_token():
    model = build_tiny_clip()
    tok = WordTokenizer()
    a = model.encode_text(tok(["red tomato"]))
    b = model.encode_text(tok(["red tomato"], context_length=tok.context_length))
    c = model.encode_text(tok(["blue tomato"]))
    assert torch.allclose(a, b) and (a - c).abs().max() > 1e-4


def test_tiny_checkpoint_round_trip(tmp_path, images):
    tok = WordTokenizer(["tomato", "leaf", "a", "photo", "of", "the"])
    cfg = dict(TINY_CLIP_CONFIG, text_cfg=dict(TINY_CLIP_CONFIG["text_cfg"], vocab_size=tok.vocab_size))
    model = build_tiny_clip(cfg, seed=3)
    path = tmp_path / "tiny_clip.pt"
    save_tiny_clip(model, cfg, tok, path, templates=["a photo of the {}"], seed=3)
    loaded = build_text_matcher("tiny", path)
    assert loaded.templates == ("a photo of the {}",) and loaded.tokenizer.vocabulary == tok.vocabulary
    direct = TextMatcher(build_tiny_clip(cfg, seed=3).half().float(), tok, templates=["a photo of the {}"])
    diff = (loaded.similarity(images[:1], ["leaf"], (8, 8)) - direct.similarity(images[:1], ["leaf"], (8, 8))).abs().max()
    assert diff < 1e-4
    assert "tiny_clip.pt" in loaded.fingerprint
    torch.save({"something": 1}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not a tiny CLIP file"):
        build_text_matcher("tiny", tmp_path / "bad.pt")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "ViT-B-16.pt"
    with pytest.raises(CheckpointError) as err:
        build_text_matcher("ViT-B-16", missing)
    assert str(missing) in str(err.value) and "ViT-B-16.pt" in str(err.value) and "openaipublic" in str(err.value)
    with pytest.raises(CheckpointError, match="tiny_clip.pt"):
        build_text_matcher("tiny", tmp_path / "tiny_clip.pt")
    with pytest.raises(KeyError, match="unknown open_clip model"):
        build_text_matcher("ViT-Q-99", None)


def test_whole_image_grid_helpers():
    maps = torch.rand(2, 1, 16, 16)
    assert torch.equal(resize_whole_image_maps(maps, (16, 16)), maps)
    small = resize_whole_image_maps(maps, (10, 10))
    assert small.shape == (2, 1, 10, 10) and small.min() >= maps.min() and small.max() <= maps.max()
    # a 128 x 256 image in a 256 px SAM square: the map fills the top half, padding is 0
    placed = whole_image_maps_to_sam_grid(torch.ones(1, 1, 4, 4), torch.tensor([[128, 256]]), 256, (16, 16))
    assert placed.shape == (1, 1, 16, 16)
    assert torch.allclose(placed[0, 0, :8], torch.ones(8, 16)) and torch.equal(placed[0, 0, 8:], torch.zeros(8, 16))


@pytest.mark.slow
@torch.no_grad()
def test_vit_b16_state_dict_loads_from_a_local_file(tmp_path):
    import open_clip

    start = time.time()
    reference = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(reference.state_dict(), path)
    matcher = build_text_matcher("ViT-B-16", path)
    loaded = matcher.model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert matcher.vv_start_block == 6 and matcher.input_hw == (224, 224) and matcher.grid_hw == (14, 14)
    image = np.random.default_rng(0).integers(0, 255, (180, 240, 3), dtype=np.uint8)
    maps = matcher.similarity([image], ["dog"], out_hw=(10, 10))
    assert maps.shape == (1, 1, 10, 10) and maps.min() == 0 and maps.max() == 1
    # OpenAI-style checkpoints: "module." prefixes and archive extras are stripped
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    assert set(load_open_clip_state_dict(path, "x", "y")) == set(reference.state_dict())
    torch.save(build_tiny_clip().state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_text_matcher("ViT-B-16", path)
    print(f"ViT-B-16 round trip {time.time() - start:.1f}s")
