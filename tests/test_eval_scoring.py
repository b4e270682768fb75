"""Multiple-choice scoring, greedy generation and evaluate_examples on tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from medmoe.eval import (
    GenerationExample,
    MultipleChoiceExample,
    evaluate_examples,
    generate_greedy,
    score_multiple_choice,
)

WORDS = (  # noqa: SIM905 (a readable vocabulary)
    "<pad> <s> </s> <unk> the patient has a fever cough rash answer is question "
    "A B C D yes no maybe please later today not sure #### 42 41 $ . , : ?"
).split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace split, runs of punctuation kept together."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("contiguous")]
    )
    # BOS as a special token, as Llama tokenizers add it
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).double().eval()


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


class LetterLover(nn.Module):
    """Fake causal LM whose next-token distribution always peaks at one token."""

    def __init__(self, favourite: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(len(WORDS)))
        with torch.no_grad():
            self.bias[favourite] = 5.0
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask):
        self.calls.append(input_ids.clone())
        logits = self.bias.expand(*input_ids.shape, -1)  # [B, T, V]
        return SimpleNamespace(logits=logits)


class Bigram(nn.Module):
    """Fake causal LM: the logits at a position depend only on the token there."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        table = torch.randn(len(WORDS), len(WORDS), generator=generator, dtype=torch.float64)
        self.table = nn.Parameter(table)
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask):
        self.calls.append(input_ids.clone())
        return SimpleNamespace(logits=self.table[input_ids])  # [B, T, V]

    def log_prob(self, prev: int, token: int) -> float:
        return torch.log_softmax(self.table[prev], dim=-1)[token].item()


LETTERS = (" A", " B", " C", " D")


# (a) ---------------------------------------------------------------------------------------


def test_model_preferring_a_letter_always_predicts_it(tokenizer):
    model = LetterLover(favourite=WORDS.index("B"))
    answers = [0, 1, 1, 3, 1, 2, 1]
    examples = [
        MultipleChoiceExample("the patient has a " + w + " answer :", LETTERS, a)
        for w, a in zip(
            ["fever", "cough", "rash", "fever", "cough", "rash", "fever"], answers, strict=True
        )
    ]
    result = score_multiple_choice(model, tokenizer, examples, batch_size=3)
    assert result.predictions.tolist() == [1] * len(examples)
    assert result.accuracy == pytest.approx(answers.count(1) / len(answers))
    assert result.loglikelihoods.shape == (len(examples), 4)
    # Fast path: one forward per prompt, batched, never a continuation in the input.
    assert len(model.calls) == math.ceil(len(examples) / 3)
    assert all(WORDS.index("B") not in call[:, -1].tolist() for call in model.calls)


def test_bos_only_at_the_start_and_optional(tokenizer):
    model = LetterLover(favourite=WORDS.index("A"))
    example = MultipleChoiceExample("the answer is", (" A", " B not sure"), 0)
    score_multiple_choice(model, tokenizer, [example])
    for call in model.calls:
        assert call[:, 0].eq(tokenizer.bos_token_id).all()
        assert not call[:, 1:].eq(tokenizer.bos_token_id).any()
    model.calls.clear()
    score_multiple_choice(model, tokenizer, [example], add_bos_token=False)
    assert not any(call.eq(tokenizer.bos_token_id).any() for call in model.calls)


def test_eval_mode_is_restored(tokenizer):
    model = LetterLover(favourite=0).train()
    example = MultipleChoiceExample("the answer is", LETTERS, 0)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(module.training))
    score_multiple_choice(model, tokenizer, [example])
    assert seen == [False] and model.training
    assert model.bias.grad is None


# (b) ---------------------------------------------------------------------------------------


def test_multi_token_loglikelihood_matches_hand_computation(tokenizer):
    model = Bigram()
    examples = [
        MultipleChoiceExample("the patient has", (" yes please", " no", " maybe later today"), 2),
        MultipleChoiceExample("fever ?", (" not sure", " yes"), 0),
    ]
    result = score_multiple_choice(model, tokenizer, examples, batch_size=2)
    lp = model.log_prob
    has, q = WORDS.index("has"), WORDS.index("?")
    yes, please, no = WORDS.index("yes"), WORDS.index("please"), WORDS.index("no")
    maybe, later, today = WORDS.index("maybe"), WORDS.index("later"), WORDS.index("today")
    not_, sure = WORDS.index("not"), WORDS.index("sure")
    expected = torch.tensor(
        [
            [
                lp(has, yes) + lp(yes, please),
                lp(has, no),
                lp(has, maybe) + lp(maybe, later) + lp(later, today),
            ],
            [lp(q, not_) + lp(not_, sure), lp(q, yes), float("-inf")],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(result.loglikelihoods, expected, rtol=0, atol=1e-12)
    assert result.predictions.tolist() == expected.argmax(dim=1).tolist()


def test_trailing_prompt_space_moves_to_the_continuation(tokenizer):
    model = Bigram()
    spaced = MultipleChoiceExample("the answer is ", ("A", "B not"), 0)
    plain = MultipleChoiceExample("the answer is", (" A", " B not"), 0)
    a = score_multiple_choice(model, tokenizer, [spaced]).loglikelihoods
    b = score_multiple_choice(model, tokenizer, [plain]).loglikelihoods
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_single_token_fast_path_equals_general_path(tokenizer):
    model = Bigram()
    single = [
        MultipleChoiceExample("the patient has a fever", (" yes", " no", " maybe"), 0),
        MultipleChoiceExample("rash ?", LETTERS, 3),
    ]
    multi = MultipleChoiceExample("cough", (" not sure", " yes"), 1)
    fast = score_multiple_choice(model, tokenizer, single)
    fast_calls = len(model.calls)
    general = score_multiple_choice(model, tokenizer, [*single, multi], batch_size=4)
    assert fast_calls == 1 and len(model.calls) - fast_calls == math.ceil(9 / 4)
    torch.testing.assert_close(general.loglikelihoods[:2], fast.loglikelihoods, rtol=0, atol=1e-12)


# (c) ---------------------------------------------------------------------------------------

PADDING_EXAMPLES = [
    MultipleChoiceExample("the patient has a fever", (" yes please", " no", " maybe later"), 0),
    MultipleChoiceExample("cough ?", (" A", " B not sure today", " C"), 1),
    MultipleChoiceExample("the answer is a rash", (" yes", " not sure"), 1),
    MultipleChoiceExample("question : the patient has a cough , fever , rash", LETTERS[:2], 0),
]


def test_batched_padded_scores_equal_one_at_a_time(tokenizer, llama):
    batched = score_multiple_choice(llama, tokenizer, PADDING_EXAMPLES, batch_size=5)
    alone = torch.cat(
        [
            torch.nn.functional.pad(
                score_multiple_choice(llama, tokenizer, [ex], batch_size=1).loglikelihoods,
                (0, 3 - len(ex.choices)),
                value=float("-inf"),
            )
            for ex in PADDING_EXAMPLES
        ]
    )
    torch.testing.assert_close(batched.loglikelihoods, alone, rtol=0, atol=1e-10)


def test_llama_scores_equal_a_direct_forward(tokenizer, llama):
    example = PADDING_EXAMPLES[1]
    scores = score_multiple_choice(llama, tokenizer, [example]).loglikelihoods[0]
    context = [tokenizer.bos_token_id, *ids("cough", "?")]
    continuation = ids("B", "not", "sure", "today")
    with torch.no_grad():
        logits = llama(input_ids=torch.tensor([context + continuation])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = sum(log_probs[len(context) - 1 + k, t] for k, t in enumerate(continuation))
    assert scores[1].item() == pytest.approx(expected.item(), abs=1e-10)


def test_single_token_batched_equals_one_at_a_time(tokenizer, llama):
    examples = [ex for ex in PADDING_EXAMPLES if all(len(c.split()) == 1 for c in ex.choices)]
    examples += [MultipleChoiceExample("the patient has a rash , fever ?", LETTERS, 2)]
    batched = score_multiple_choice(llama, tokenizer, examples, batch_size=8).loglikelihoods
    for row, ex in zip(batched, examples, strict=True):
        alone = score_multiple_choice(llama, tokenizer, [ex]).loglikelihoods[0]
        torch.testing.assert_close(row[: len(ex.choices)], alone, rtol=0, atol=1e-10)


# (d) ---------------------------------------------------------------------------------------

PROMPTS = [
    "the patient has a fever",
    "cough ?",
    "question : the patient has a rash , a cough and a fever . answer :",
    "yes",
    "the answer is",
]


def test_batched_generation_equals_one_at_a_time(tokenizer, llama):
    tokenizer.padding_side = "right"
    batched = generate_greedy(llama, tokenizer, PROMPTS, max_new_tokens=6, batch_size=4, stop=())
    alone = [generate_greedy(llama, tokenizer, [p], max_new_tokens=6, stop=())[0] for p in PROMPTS]
    assert batched == alone
    assert any(text for text in batched)
    assert tokenizer.padding_side == "right"


def test_generation_returns_only_new_text(tokenizer, llama):
    prompt = PROMPTS[0]
    [text] = generate_greedy(llama, tokenizer, [prompt], max_new_tokens=5, stop=())
    input_ids = torch.tensor([[tokenizer.bos_token_id, *ids(*prompt.split())]])
    out = llama.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert text == tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


class Scripted(nn.Module):
    """Fake generator: appends the same scripted tokens to every prompt."""

    def __init__(self, continuation: list[int]) -> None:
        super().__init__()
        self.continuation = torch.tensor(continuation)
        self.prompts: list[torch.Tensor] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["pad_token_id"] is not None
        self.prompts.extend(
            row[mask.bool()] for row, mask in zip(input_ids, attention_mask, strict=True)
        )
        new = self.continuation[:max_new_tokens].expand(input_ids.shape[0], -1)  # [B, new]
        return torch.cat([input_ids, new], dim=1)


def test_generation_cuts_at_the_first_stop_string(tokenizer):
    model = Scripted(ids("the", "answer", "is", "42", ".", "question", ":", "41"))
    texts = generate_greedy(model, tokenizer, ["cough", "fever"], stop=("question", "41"))
    assert texts == ["the answer is 42 . ", "the answer is 42 . "]
    assert generate_greedy(model, tokenizer, ["cough"], max_new_tokens=2) == ["the answer"]


# evaluate_examples --------------------------------------------------------------------------


def test_evaluate_accuracy(tokenizer):
    model = LetterLover(favourite=WORDS.index("C"))
    examples = [MultipleChoiceExample("fever ?", LETTERS, a) for a in (2, 2, 0, 1)]
    assert evaluate_examples(model, tokenizer, examples, "accuracy") == {
        "accuracy": 0.5,
        "acc_norm": 0.5,  # one-letter choices: normalising changes nothing
    }


def test_evaluate_accuracy_per_subject_and_acc_norm(tokenizer):
    model = LetterLover(favourite=WORDS.index("yes"))
    choices = (" yes", " not sure")  # 3 vs 8 characters without the delimiter
    examples = [
        MultipleChoiceExample("fever ?", choices, 0, subject="anatomy"),
        MultipleChoiceExample("rash ?", choices, 1, subject="anatomy"),
        MultipleChoiceExample("cough ?", choices, 0, subject="virology"),
    ]
    scores = evaluate_examples(model, tokenizer, examples, "accuracy")
    result = score_multiple_choice(model, tokenizer, examples)
    lls = result.loglikelihoods
    lengths = torch.tensor([3.0, 8.0], dtype=torch.float64)
    expected_norm = ((lls / lengths).argmax(dim=1) == torch.tensor([0, 1, 0])).double().mean()
    assert scores["acc_norm"] == pytest.approx(expected_norm.item())
    assert scores["accuracy/anatomy"] == 0.5 and scores["accuracy/virology"] == 1.0
    assert scores["accuracy"] == pytest.approx(2 / 3)  # the size-weighted average of subjects


def test_evaluate_gsm8k_strict_and_flexible(tokenizer):
    model = Scripted(ids("####", "42", ",", "not", "41", "question", "####", "42"))
    examples = [
        GenerationExample("question : fever ?", "so 6 * 7 = 42 .\n#### 42"),
        GenerationExample("question : cough ?", "#### 41"),
    ]
    scores = evaluate_examples(model, tokenizer, examples, "gsm8k", stop=("question",))
    assert scores == {"exact_match_strict": 0.5, "exact_match_flexible": 0.5}


def test_evaluate_rouge_l_after_a_few_shot_prompt(tokenizer):
    model = Scripted(ids("the", "patient", "has", "a", "fever"))
    examples = [GenerationExample("rash ? yes\n\nfever ? no\n\ncough ?", "the patient has a fever")]
    scores = evaluate_examples(model, tokenizer, examples, "rouge_l")
    assert scores == {"rouge_l": pytest.approx(1.0)}
    expected = [tokenizer.bos_token_id, *ids("rash", "?", "yes", "fever", "?", "no", "cough", "?")]
    assert model.prompts[0].tolist() == expected


# (h) ---------------------------------------------------------------------------------------


def test_unknown_metric_names_it_and_the_accepted_ones(tokenizer):
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'.*'accuracy', 'gsm8k', 'rouge_l'"):
        evaluate_examples(LetterLover(0), tokenizer, [], "bleu")


@pytest.mark.parametrize(
    ("metric", "example", "message"),
    [
        (
            "accuracy",
            GenerationExample("fever", "yes"),
            "scores MultipleChoiceExample.*example 0 is a GenerationExample",
        ),
        ("gsm8k", MultipleChoiceExample("fever", LETTERS, 0), "scores GenerationExample"),
        ("rouge_l", "fever", "example 0 is a str"),
    ],
)
def test_examples_not_matching_the_metric(tokenizer, metric, example, message):
    with pytest.raises(TypeError, match=message):
        evaluate_examples(LetterLover(0), tokenizer, [example], metric)


def test_bad_multiple_choice_inputs(tokenizer):
    model = LetterLover(0)
    with pytest.raises(ValueError, match="no examples"):
        score_multiple_choice(model, tokenizer, [])
    with pytest.raises(ValueError, match=r"answer 4 is not in \[0, 4\)"):
        score_multiple_choice(model, tokenizer, [MultipleChoiceExample("fever", LETTERS, 4)])
    with pytest.raises(ValueError, match="encodes to no tokens"):
        score_multiple_choice(model, tokenizer, [MultipleChoiceExample("fever", (" A", ""), 0)])
    with pytest.raises(ValueError, match="no context"):
        score_multiple_choice(
            model, tokenizer, [MultipleChoiceExample("", LETTERS, 0)], add_bos_token=False
        )
