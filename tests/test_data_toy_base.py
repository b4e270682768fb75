"""The shipped toy base: loads with from_pretrained and knows the general toy tasks."""

from __future__ import annotations

import json

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from medmoe.data.build_toy_base import METRICS_FILE, score_general
from medmoe.data.tokenizers import load_tokenizer, toy_tokenizer
from medmoe.data.toy_clinic import toy_base_path


def test_toy_base_is_small_and_complete():
    path = toy_base_path()
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", METRICS_FILE} <= files
    assert sum(p.stat().st_size for p in path.iterdir()) < 3 * 2**20
    figures = json.loads((path / METRICS_FILE).read_text())
    assert figures["test_gsm8k"] >= 0.9 and figures["test_mmlu"] > 0.25


def test_toy_base_tokenizer_matches_the_toy_tokenizer():
    saved = AutoTokenizer.from_pretrained(toy_base_path())
    assert saved.get_vocab() == toy_tokenizer().get_vocab()
    text = "Question: Tom has 3 apples and gets 4 more .\nAnswer: 3 + 4 = 7\n#### 7"
    assert saved(text)["input_ids"] == toy_tokenizer()(text)["input_ids"]
    assert load_tokenizer(str(toy_base_path())).pad_token_id == saved.pad_token_id


def test_toy_base_beats_chance_on_the_general_test_split():
    model = LlamaForCausalLM.from_pretrained(toy_base_path())
    tokenizer = load_tokenizer(str(toy_base_path()))
    assert model.config.vocab_size == len(tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest on a shared CPU
    try:
        scores = score_general(model, tokenizer, n=100)
    finally:
        torch.set_num_threads(threads)
    assert scores["gsm8k"] >= 0.8  # chance is ~0 (exact solution)
    assert scores["mmlu"] >= 0.35  # chance is 0.25
