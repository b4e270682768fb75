"""Tokenizers that need no download, and one loader for every tokenizer the project uses.

- :func:`byte_level_tokenizer`: 256 byte tokens plus specials, for unit tests on any text.
- :func:`word_level_tokenizer`: a ``tokenizers`` WordLevel model over a given word list.
- :func:`toy_tokenizer`: the word-level tokenizer over the whole toy-clinic vocabulary.
- :func:`load_tokenizer`: ``"toy"``, ``"byte"``, a local directory or a hub id.

The file-free tokenizers share one convention: ids 0-3 are ``<pad>``, ``<s>``, ``</s>``,
``<unk>``; encoding a text prepends ``<s>`` (as Llama tokenizers do) and never appends ``</s>``.
Word-level decoding joins words with single spaces (``"Answer : B"``), readable enough for
answer extraction and ROUGE.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from medmoe.data.toy_clinic import toy_vocabulary
from medmoe.data.words import split_words as split_words  # re-exported
from medmoe.data.words import word_pre_tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)


def _bos_post_processor(bos_id: int) -> processors.PostProcessor:
    return processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer over the 256 bytes (ids 4-259) plus the specials (ids 0-3); lossless."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    vocab.update({c: len(SPECIAL_TOKENS) + i for i, c in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _bos_post_processor(vocab[BOS])
    return _wrap(tok)


def _byte_of(char: str) -> int:
    """The byte that GPT-2's byte-to-unicode table maps to ``char``."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    code = ord(char)
    if code in printable:
        return code
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]


def word_level_tokenizer(words: Iterable[str], lowercase: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is the specials followed by ``words``.

    ``words`` may hold whole texts: each is split with :func:`split_words` (after lowercasing
    when ``lowercase``), and new words get ids in first-seen order. Unknown words map to
    ``<unk>``.
    """
    vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
    for text in words:
        for word in split_words(text.lower() if lowercase else text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = word_pre_tokenizer()
    tok.post_processor = _bos_post_processor(vocab[BOS])
    return _wrap(tok)


def toy_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer over the toy clinic's vocabulary (case-sensitive)."""
    return word_level_tokenizer(toy_vocabulary())


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """``"toy"``, ``"byte"``, or a local directory / hub id loaded with ``AutoTokenizer``.

    A tokenizer without a pad token gets ``pad = eos`` (the collator masks padding by the
    attention mask and the labels, so sharing the id is harmless).
    """
    if name_or_path == "toy":
        return toy_tokenizer()
    if name_or_path == "byte":
        return byte_level_tokenizer()
    from medmoe.errors import local_or_hub, short_reason

    source = local_or_hub(name_or_path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r} could not be loaded ({short_reason(err)}); accepted: "
            "'toy', 'byte', a local tokenizer directory or a hub id"
        ) from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok
