"""Tokenizers that need no download: byte-level, word-level, toy, and the loader."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from medmoe.data.tokenizers import (
    SPECIAL_TOKENS,
    byte_level_tokenizer,
    load_tokenizer,
    toy_tokenizer,
    word_level_tokenizer,
)


def test_byte_level_is_lossless_and_prepends_bos():
    tok = byte_level_tokenizer()
    text = "Patient: 39.1°C, SpO₂ 91% — cough\n#### 7"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == 1 + len(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    assert tok("A", add_special_tokens=False)["input_ids"] == [4 + ord("A")]  # id = 4 + byte
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")


def test_word_level_splits_punctuation_and_decodes_with_spaces():
    tok = word_level_tokenizer(["Question: what is 7 + 5?", "#### 12"])
    ids = tok("Question: what is 7+5?\n#### 12", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "Question", ":", "what", "is", "7", "+", "5", "?", "####", "12"
    ]  # fmt: skip
    assert tok.decode(ids) == "Question : what is 7 + 5 ? #### 12"
    assert tok.unk_token_id in tok("unheard words")["input_ids"]
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]


def test_word_level_lowercase_option():
    tok = word_level_tokenizer(["Fever and Cough"], lowercase=True)
    ids = tok("FEVER and cough", add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "fever and cough"


def test_load_tokenizer_names_and_directories(tmp_path):
    assert load_tokenizer("toy").get_vocab() == toy_tokenizer().get_vocab()
    assert len(load_tokenizer("byte")) == 260
    toy = toy_tokenizer()
    toy.save_pretrained(tmp_path / "toy")
    loaded = load_tokenizer(str(tmp_path / "toy"))
    text = "Question: What color is the fox ?\nAnswer:"
    assert loaded(text)["input_ids"] == toy(text)["input_ids"]
    assert loaded.pad_token_id == toy.pad_token_id


def test_load_tokenizer_sets_pad_to_eos_when_missing(tmp_path):
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id


def test_load_tokenizer_missing_directory_fails():
    with pytest.raises((OSError, ValueError)):
        load_tokenizer("/nonexistent/tokenizer/dir")
