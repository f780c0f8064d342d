"""Text embedding cache: built once (encoder calls counted), reused, refused on other settings, multi-process with a
fake barrier, resumable after an interruption; the captioned dataset's picks, dropout and batches."""

import json

import numpy as np
import pytest
import torch

from diffusers_masked.data.captions import read_captions
from diffusers_masked.data.images import ImageClassDataset, collate_batch
from diffusers_masked.data.text_cache import (
    CaptionedImageDataset,
    TextCacheMismatchError,
    TextEmbeddingCache,
    build_text_cache,
    encode_captions,
)
from diffusers_masked.utils.text_encoders import default_text_encoder_path

CAPTIONS = [["a bag at top left", "a bag in the top left cell"], ["two sneakers"], ["a shirt", "one shirt", "a top"],
            ["an ankle boot at bottom right"]]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_text_encoder_path(), local_files_only=True)


def _encoder(tokenizer, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    model = BertModel(config).eval().requires_grad_(False)
    model.calls = 0

    def count(*_):
        model.calls += 1

    model.register_forward_pre_hook(count)
    return model


@pytest.fixture
def encoder(tokenizer):
    return _encoder(tokenizer)


def _build(captions, encoder, tokenizer, cache_dir, length=16, **kw):
    kw.setdefault("show_progress", False)
    kw.setdefault("batch_size", 2)
    return build_text_cache(captions, encoder, tokenizer, cache_dir, length, **kw)


def test_build_stores_padded_states_and_masks(tmp_path, encoder, tokenizer):
    cache = _build(CAPTIONS, encoder, tokenizer, tmp_path / "text", dtype="float32")
    assert (cache.num_images, cache.num_captions, cache.max_sequence_length, cache.width) == (4, 7, 16, 16)
    assert cache.captions_per_image.tolist() == [2, 1, 3, 1]
    flat = [c for cs in CAPTIONS for c in cs]
    # Per-batch padding + zero-padding to L equals padding every caption to L (real tokens), pads are zeros.
    tokens = tokenizer(flat, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ref = encoder(**tokens).last_hidden_state
    emb, mask = cache.gather(range(7))
    assert emb.shape == (7, 16, 16) and mask.dtype == torch.long
    assert torch.equal(mask, tokens["attention_mask"])
    real = mask.bool()
    torch.testing.assert_close(emb[real], ref[real], atol=1e-5, rtol=1e-5)
    assert (emb[~real] == 0).all()
    assert cache.captions([4, 1]) == ["one shirt", "a bag in the top left cell"]
    manifest = json.loads((tmp_path / "text" / "manifest.json").read_text())
    assert manifest["max_sequence_length"] == 16 and manifest["dtype"] == "float32"
    assert manifest["encoder"]["class"] == "BertModel" and manifest["captions_per_image"] == [1, 3]
    assert len(manifest["data_fingerprint"]) == 64
    assert not (tmp_path / "text.partial").exists()
    # numpy files without pickles: they open with allow_pickle=False.
    assert np.load(tmp_path / "text" / "embeddings.npy", allow_pickle=False, mmap_mode="r").shape == (7, 16, 16)


def test_truncation_and_bf16_storage(tmp_path, encoder, tokenizer, caplog):
    long = [["word " * 40], ["short"]]
    hidden, mask, n_truncated = encode_captions(encoder, tokenizer, long[0] + long[1], 8)
    assert hidden.shape == (2, 8, 16) and n_truncated == 1 and mask[0].all()
    with caplog.at_level("WARNING"):
        cache = _build(long, encoder, tokenizer, tmp_path / "bf16", length=8, dtype="bfloat16")
    assert "truncated" in caplog.text
    emb, _ = cache.gather([0, 1], dtype=torch.float32)
    torch.testing.assert_close(emb, hidden.to(torch.bfloat16).float())


def test_second_build_reuses_without_encoding(tmp_path, encoder, tokenizer):
    _build(CAPTIONS, encoder, tokenizer, tmp_path / "text")
    first = encoder.calls
    assert first == 4  # 7 captions in batches of 2
    cache = _build(CAPTIONS, encoder, tokenizer, tmp_path / "text")
    assert encoder.calls == first and cache.num_captions == 7
    assert TextEmbeddingCache(tmp_path / "text").num_images == 4


@pytest.mark.parametrize("change, field", [
    (dict(length=12), "max_sequence_length: cache 16, now 12"),
    (dict(encoder_seed=1), "text encoder (weights_sha256 differ)"),
    (dict(captions=[["a bag at top left"], ["two sneakers"], ["a shirt"], ["a boot"]]), "num_captions: cache 7, now 4"),
    (dict(captions=[c[::-1] for c in CAPTIONS]), "captions (data fingerprint"),
    (dict(dtype="float32"), "dtype: cache 'float16', now 'float32'"),
])
def test_refuses_a_cache_built_with_other_settings(tmp_path, encoder, tokenizer, change, field):
    _build(CAPTIONS, encoder, tokenizer, tmp_path / "text")
    before = {p.name: p.read_bytes() for p in (tmp_path / "text").iterdir()}
    other = _encoder(tokenizer, change["encoder_seed"]) if "encoder_seed" in change else encoder
    other.calls = 0
    with pytest.raises(TextCacheMismatchError) as info:
        _build(change.get("captions", CAPTIONS), other, tokenizer, tmp_path / "text", change.get("length", 16),
               dtype=change.get("dtype", "float16"))
    message = str(info.value)
    assert field in message and "another --text_cache_dir" in message and "delete" in message
    assert {p.name: p.read_bytes() for p in (tmp_path / "text").iterdir()} == before  # nothing overwritten
    assert other.calls == 0


def test_refuses_a_folder_that_is_not_a_cache(tmp_path, encoder, tokenizer):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "weights.bin").write_bytes(b"keep me")
    with pytest.raises(TextCacheMismatchError, match=r"not a text embedding cache.*weights.bin"):
        _build(CAPTIONS, encoder, tokenizer, tmp_path / "busy")
    assert (tmp_path / "busy" / "weights.bin").read_bytes() == b"keep me"
    (tmp_path / "empty").mkdir()
    assert _build(CAPTIONS, encoder, tokenizer, tmp_path / "empty").num_captions == 7


def test_main_process_writes_others_wait(tmp_path, encoder, tokenizer):
    worker_encoder = _encoder(tokenizer)  # same weights, its own call counter
    barrier_calls = []

    def barrier():  # fake accelerate barrier: the main process runs while the other one waits here
        barrier_calls.append("worker")
        _build(CAPTIONS, encoder, tokenizer, tmp_path / "text", is_main_process=True,
               wait_for_everyone=lambda: barrier_calls.append("main"))

    cache = _build(CAPTIONS, worker_encoder, tokenizer, tmp_path / "text", is_main_process=False,
                   wait_for_everyone=barrier)
    assert worker_encoder.calls == 0 and encoder.calls == 4 and barrier_calls == ["worker", "main"]
    assert cache.num_captions == 7
    with pytest.raises(RuntimeError, match="main process must build it"):
        _build(CAPTIONS, worker_encoder, tokenizer, tmp_path / "nobody", is_main_process=False,
               wait_for_everyone=lambda: None)


def test_interrupted_build_resumes(tmp_path, encoder, tokenizer):
    real_forward = encoder.forward

    def failing(*args, **kwargs):
        if encoder.calls > 2:
            raise KeyboardInterrupt("killed")
        return real_forward(*args, **kwargs)

    encoder.forward = failing
    with pytest.raises(KeyboardInterrupt):
        _build(CAPTIONS, encoder, tokenizer, tmp_path / "text", checkpoint_every=2)
    assert not (tmp_path / "text").exists()
    progress = json.loads((tmp_path / "text.partial" / "progress.json").read_text())
    assert progress["done"] == 4  # two batches of 2 flushed before the third call failed
    encoder.forward = real_forward
    encoder.calls = 0
    resumed = _build(CAPTIONS, encoder, tokenizer, tmp_path / "text", checkpoint_every=2)
    assert encoder.calls == 2  # captions 4..6 only
    assert not (tmp_path / "text.partial").exists()
    fresh = _build(CAPTIONS, encoder, tokenizer, tmp_path / "fresh")
    assert torch.equal(resumed.gather(range(7))[0], fresh.gather(range(7))[0])
    assert torch.equal(resumed.gather(range(7))[1], fresh.gather(range(7))[1])


def _captioned(tmp_path, encoder, tokenizer, captions=CAPTIONS, **kw):
    import datasets
    from PIL import Image

    images = [Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L") for i in range(len(captions))]
    ds = datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column("image", datasets.Image())
    cache = _build(read_captions(ds), encoder, tokenizer, tmp_path / "text", dtype="float32")
    return ds, cache, CaptionedImageDataset(ImageClassDataset(ds, "image", None, 8, 1), cache, **kw)


def test_dataset_batches_picks_and_seed(tmp_path, encoder, tokenizer):
    _, cache, train = _captioned(tmp_path, encoder, tokenizer, seed=5, return_captions=True)
    batch = train.__getitems__([0, 2, 3])
    assert batch["pixel_values"].shape == (3, 1, 8, 8)
    assert -1 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1
    assert batch["encoder_hidden_states"].shape == (3, 16, 16) and batch["encoder_attention_mask"].shape == (3, 16)
    assert batch["image_index"].tolist() == [0, 2, 3] and batch["caption"][2] == CAPTIONS[3][0]
    emb, mask = cache.gather(batch["caption_index"])
    assert torch.equal(batch["encoder_hidden_states"], emb) and torch.equal(batch["encoder_attention_mask"], mask)
    item = train[1]
    assert item["encoder_hidden_states"].shape == (16, 16) and item["caption"] == "two sneakers"
    # Several captions per image: every one is drawn; the same seed draws the same sequence.
    def draws(dataset):
        return torch.stack([dataset.__getitems__([0, 2])["caption_index"] for _ in range(60)])

    first = draws(CaptionedImageDataset(train.images, cache, seed=5))
    assert set(first[:, 0].tolist()) == {0, 1} and set(first[:, 1].tolist()) == {3, 4, 5}
    assert torch.equal(first, draws(CaptionedImageDataset(train.images, cache, seed=5)))
    assert not torch.equal(first, draws(CaptionedImageDataset(train.images, cache, seed=6)))
    loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=True, collate_fn=collate_batch,
                                         num_workers=1, generator=torch.Generator().manual_seed(0))
    batches = list(loader)  # the cache is pickled to the worker without its memmaps
    assert sum(b["pixel_values"].shape[0] for b in batches) == 4
    assert batches[0]["encoder_hidden_states"].shape == (2, 16, 16)


def test_caption_dropout_rate_and_unconditional(tmp_path, encoder, tokenizer):
    _, cache, train = _captioned(tmp_path, encoder, tokenizer, caption_dropout_prob=0.25, seed=0)
    dropped = kept = 0
    for _ in range(100):
        batch = train.__getitems__([0, 1, 2, 3] * 5)
        drop = batch["caption_dropped"]
        dropped += int(drop.sum())
        kept += int((~drop).sum())
        # The unconditional caption: exact zeros with an all-ones mask (DeferredMaskDiT's convention).
        assert (batch["encoder_hidden_states"][drop] == 0).all() and (batch["encoder_attention_mask"][drop] == 1).all()
        emb, mask = cache.gather(batch["caption_index"][~drop])
        assert torch.equal(batch["encoder_hidden_states"][~drop], emb)
        assert torch.equal(batch["encoder_attention_mask"][~drop], mask)
    assert abs(dropped / (dropped + kept) - 0.25) < 0.03
    zeros, ones = cache.unconditional(2)
    assert zeros.shape == (2, 16, 16) and not zeros.any() and ones.all()


def test_image_part_is_separable(tmp_path, encoder, tokenizer):
    _, cache, _ = _captioned(tmp_path, encoder, tokenizer)

    class Latents(torch.utils.data.Dataset):  # like LatentCacheDataset: N images + N flipped copies
        def __len__(self):
            return 8

        def __getitems__(self, indices):
            return {"moments": torch.zeros(len(indices), 4, 2, 2), "class_labels": torch.full((len(indices),), -1)}

    train = CaptionedImageDataset(Latents(), cache, return_text=False)
    batch = train.__getitems__([1, 5, 6])
    assert batch["image_index"].tolist() == [1, 1, 2] and "encoder_hidden_states" not in batch
    text = cache.lookup(batch["image_index"], torch.Generator().manual_seed(0), caption_dropout_prob=0.5)
    assert text["encoder_hidden_states"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="has 3 rows but the text cache has captions for 4 images"):
        CaptionedImageDataset(torch.utils.data.TensorDataset(torch.zeros(3)), cache)


def test_unfinished_build_with_other_settings_starts_again(tmp_path, encoder, tokenizer):
    real_forward = encoder.forward

    def failing(*args, **kwargs):
        if encoder.calls > 1:
            raise RuntimeError("out of memory")
        return real_forward(*args, **kwargs)

    encoder.forward = failing
    with pytest.raises(RuntimeError):
        _build(CAPTIONS, encoder, tokenizer, tmp_path / "text", checkpoint_every=2)
    encoder.forward = real_forward
    encoder.calls = 0
    cache = _build(CAPTIONS, encoder, tokenizer, tmp_path / "text", length=12)  # other length: no resume
    assert encoder.calls == 4 and cache.max_sequence_length == 12
