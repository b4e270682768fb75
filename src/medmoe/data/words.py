"""Word splitting of the word-level tokenizers: a leaf module, so the toy clinic's vocabulary
and the tokenizers built over it both use it without importing each other."""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

# Whitespace splits words; then "####" (the GSM8K answer marker) and every other punctuation
# character become tokens of their own.
WORD_PATTERN = Regex(r"####|[^\w\s]")


def word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer of the word-level tokenizers: whitespace, then punctuation."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(WORD_PATTERN, "isolated")]
    )


def split_words(text: str) -> list[str]:
    """Split ``text`` into the words a word-level tokenizer sees (no normalisation)."""
    return [w for w, _ in word_pre_tokenizer().pre_tokenize_str(text)]
