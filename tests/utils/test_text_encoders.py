"""load_text_encoder: the right class per model type, frozen, offline, and clear errors for folders that do not load.
Tiny random encoders are saved locally with the MiniLM tokenizer; nothing is downloaded."""

import shutil

import pytest
import torch

from diffusers_masked.utils.text_encoders import (
    check_max_sequence_length,
    default_text_encoder_path,
    load_default_text_encoder,
    load_text_encoder,
    text_encoder_fingerprint,
)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_text_encoder_path(), local_files_only=True)


def _save(folder, model, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, minilm_tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, pad_token_id=0)
    return _save(tmp_path_factory.mktemp("clip"), CLIPTextModel(config), minilm_tokenizer)


def _t5(minilm_tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=minilm_tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                      num_heads=4, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def test_default_is_minilm_frozen_and_bf16(minilm_tokenizer):
    encoder, tokenizer = load_text_encoder(None, "cpu", torch.bfloat16, max_sequence_length=77)
    assert type(encoder).__name__ == "BertModel" and encoder.config.hidden_size == 384
    assert encoder.dtype == torch.bfloat16 and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    default, _ = load_default_text_encoder()
    assert default.dtype == torch.float32 and not default.training


def test_clip_folder_gives_clip_text_model(clip_dir):
    encoder, tokenizer = load_text_encoder(clip_dir, dtype=torch.bfloat16)
    assert type(encoder).__name__ == "CLIPTextModel" and encoder.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in encoder.parameters())
    tokens = tokenizer(["a bag at top left"], return_tensors="pt")
    out = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    assert out.shape == (1, tokens["input_ids"].shape[1], 32)
    # CLIP has 77 positions: asking for more names the limit and the flag.
    with pytest.raises(ValueError, match=r"more than the 77 tokens.*--max_sequence_length 77"):
        load_text_encoder(clip_dir, max_sequence_length=128)
    assert check_max_sequence_length(encoder, tokenizer, 77) == 77


def test_full_clip_folder_gives_its_text_tower(tmp_path, minilm_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=8, patch_size=4),
        projection_dim=16,
    )
    full = CLIPModel(config)
    _save(tmp_path, full, minilm_tokenizer)
    encoder, _ = load_text_encoder(tmp_path)
    assert type(encoder).__name__ == "CLIPTextModel"
    loaded = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    torch.testing.assert_close(loaded["embeddings.token_embedding.weight"],
                               full.state_dict()["text_model.embeddings.token_embedding.weight"])


def test_t5_folder_gives_the_encoder_only(tmp_path, minilm_tokenizer):
    _save(tmp_path, _t5(minilm_tokenizer), minilm_tokenizer)
    encoder, tokenizer = load_text_encoder(tmp_path, max_sequence_length=300)  # relative positions: no T5 limit
    assert type(encoder).__name__ == "T5EncoderModel"
    out = encoder(**tokenizer(["two sneakers"], return_tensors="pt", return_token_type_ids=False)).last_hidden_state
    assert out.shape[-1] == 32


def test_diffusers_pipeline_layout(tmp_path, clip_dir):
    shutil.copytree(clip_dir, tmp_path / "text_encoder", ignore=shutil.ignore_patterns("*token*", "vocab*"))
    shutil.copytree(clip_dir, tmp_path / "tokenizer", ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    encoder, tokenizer = load_text_encoder(tmp_path)
    assert type(encoder).__name__ == "CLIPTextModel" and tokenizer.vocab_size > 0


def test_bad_folders_name_what_is_missing(tmp_path, clip_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"has no config.json \(it holds: \['notes.txt'\]\).*save_pretrained"):
        load_text_encoder(tmp_path / "empty")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(clip_dir, no_tok, ignore=shutil.ignore_patterns("*token*", "vocab*", "special*"))
    with pytest.raises(FileNotFoundError, match=rf"{no_tok} has no tokenizer files.*tokenizer.save_pretrained"):
        load_text_encoder(no_tok)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(clip_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        load_text_encoder(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"not read")  # pickle weights are refused, never opened
    with pytest.raises(ValueError, match="only pickle weights.*safe_serialization=True"):
        load_text_encoder(no_weights)
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"{broken}: CLIPTextModel.from_pretrained failed"):
        load_text_encoder(broken)


def test_fingerprint_follows_content_not_place_or_dtype(tmp_path, clip_dir):
    a, tok = load_text_encoder(clip_dir)
    moved = shutil.copytree(clip_dir, tmp_path / "moved")
    b, _ = load_text_encoder(moved, dtype=torch.bfloat16)
    fa, fb = text_encoder_fingerprint(a, tok), text_encoder_fingerprint(b, tok)
    assert fa["path"] != fb["path"]
    assert {k: v for k, v in fa.items() if k != "path"} == {k: v for k, v in fb.items() if k != "path"}
    with torch.no_grad():
        b.final_layer_norm.weight.add_(1.0)  # "fine-tuned"
    assert text_encoder_fingerprint(b, tok)["weights_sha256"] != fa["weights_sha256"]


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, clip_dir):
    import json

    deeper = shutil.copytree(clip_dir, tmp_path / "deeper")
    config = json.loads((deeper / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights have 2 layers: layer 2 would stay random
    (deeper / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight\(s\) missing.*partly randomly initialised"):
        load_text_encoder(deeper)
