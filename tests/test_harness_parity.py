"""medmoe's evaluation against lm-evaluation-harness itself (0.4.13, offline).

The harness's own task YAMLs (``lm_eval/tasks/...``) are loaded with its YAML loader and built
as ``ConfigurableTask`` over local JSON files in the harness's dataset schemas (no download):
its ``fewshot_context`` / ``doc_to_choice`` / sampler give the reference prompts. Log-likelihoods
and generations are compared with ``HFLM`` wrapping a tiny local Llama; GSM8K extraction with
the harness's filter classes and ``exact_match``; ROUGE-L with ``rouge_score``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medmoe.data.eval_protocol import build_eval_examples
from medmoe.data.sources import load_records
from medmoe.data.tasks import get_task
from medmoe.data.tokenizers import byte_level_tokenizer
from medmoe.eval import (
    MultipleChoiceExample,
    exact_match_flexible,
    exact_match_strict,
    extract_flexible,
    extract_strict,
    generate_greedy,
    rouge_l,
    score_multiple_choice,
)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
FIXTURES = Path(__file__).parent / "fixtures"


def harness_task(yaml: str, tmp_path: Path, splits: dict[str, list[dict]]) -> ConfigurableTask:
    """The harness task of ``yaml`` over local JSONL files, one per split (offline)."""
    files = {}
    for split, docs in splits.items():
        path = tmp_path / f"{Path(yaml).stem}-{split}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        files[split] = str(path)
    config = load_yaml(HARNESS_TASKS / yaml)
    config |= {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
    }
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)  # the evaluator's default fewshot_random_seed
    return task


def fixture_records(task: str, name: str) -> list[dict]:
    return load_records(task, str(FIXTURES / name), "test", whole_file=True)


# --- schemas: medmoe's hub datasets -> the datasets the harness's YAMLs name -------------------


def medqa_hf(record: dict) -> dict:
    """GBaker/MedQA-USMLE-4-options -> GBaker/MedQA-USMLE-4-options-hf (the harness's)."""
    doc = {"id": "x", "sent1": record["question"], "sent2": ""}
    doc |= {f"ending{i}": record["options"][k] for i, k in enumerate("ABCD")}
    return doc | {"label": "ABCD".index(record["answer_idx"])}


def pubmedqa_bigbio(record: dict) -> dict:
    """qiaojin/PubMedQA pqa_labeled -> bigbio/pubmed_qa ..._source (the harness's)."""
    return {
        "QUESTION": record["question"],
        "CONTEXTS": record["context"]["contexts"],
        "LABELS": record["context"]["labels"],
        "MESHES": record["context"]["meshes"],
        "YEAR": "2020",
        "reasoning_required_pred": record["context"]["reasoning_required_pred"],
        "reasoning_free_pred": record["context"]["reasoning_free_pred"],
        "final_decision": record["final_decision"],
        "LONG_ANSWER": record["long_answer"],
    }


def mmlu_records() -> tuple[list[dict], list[dict]]:
    """(dev, test): the fixture plus extra anatomy records so a subject has 3 dev shots."""
    test = fixture_records("mmlu", "mmlu.jsonl")
    extra = [
        {"question": f"  Anatomy question {i}? ", "subject": "anatomy", "choices": list("wxyz"),
         "answer": i % 4}
        for i in range(3)
    ]  # fmt: skip
    return extra + test, test


def gsm8k_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        question = f"Ward {i} has {a} beds and adds {b}. How many beds are there?"
        records.append({"question": question, "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return records


# --- prompts and choices -------------------------------------------------------------------


def assert_same_mc(ours: MultipleChoiceExample, theirs: ConfigurableTask, doc: dict, shots: int):
    assert ours.prompt == theirs.fewshot_context(doc, shots)
    delimiter = theirs.config.target_delimiter
    assert ours.choices == tuple(delimiter + c for c in theirs.doc_to_choice(doc))
    assert ours.answer == theirs.doc_to_target(doc)


@pytest.mark.parametrize("shots", [0, 2])
def test_mmlu_prompts_equal_the_harness(tmp_path, shots):
    dev, test = mmlu_records()
    task = get_task("mmlu")
    for i, record in enumerate(test):
        subject = record["subject"]
        theirs = harness_task(
            f"mmlu/default/mmlu_{subject}.yaml",
            tmp_path,
            {"dev": [d for d in dev if d["subject"] == subject], "test": [record]},
        )
        doc = theirs.test_docs()[0]
        n = shots if subject == "anatomy" else 0  # other subjects have 1 dev record
        [ours] = build_eval_examples(task, test, [i], dev, n)
        assert_same_mc(ours, theirs, doc, n)
        assert ours.subject == subject


def test_medqa_prompts_equal_the_harness(tmp_path):
    records = fixture_records("medqa", "medqa.jsonl")
    docs = [medqa_hf(r) for r in records]
    theirs = harness_task(
        "medqa/medqa.yaml", tmp_path, {"train": docs, "validation": docs, "test": docs}
    )
    harness_docs = list(theirs.test_docs())
    task = get_task("medqa")
    for i in range(len(records)):
        [ours] = build_eval_examples(task, records, [i], [], 0)
        assert_same_mc(ours, theirs, harness_docs[i], 0)
    assert "acc_norm" in theirs._metric_fn_list  # the harness reports acc and acc_norm


def test_pubmedqa_prompts_equal_the_harness(tmp_path):
    records = sorted(
        (r for s in ("train", "validation", "test")
         for r in load_records("pubmedqa", str(FIXTURES / "pubmedqa.jsonl"), s)),
        key=lambda r: r["pubid"],
    )  # fmt: skip
    docs = [pubmedqa_bigbio(r) for r in records]
    theirs = harness_task(
        "pubmedqa/pubmedqa.yaml", tmp_path, {"train": docs, "validation": docs, "test": docs}
    )
    harness_docs = list(theirs.test_docs())
    task = get_task("pubmedqa")
    for i in range(len(records)):
        [ours] = build_eval_examples(task, records, [i], [], 0)
        doc = harness_docs[i]
        assert ours.prompt == theirs.fewshot_context(doc, 0)
        assert ours.choices == tuple(" " + c for c in theirs.doc_to_choice(doc))
        assert theirs.doc_to_choice(doc)[ours.answer] == theirs.doc_to_target(doc)


def test_gsm8k_prompts_and_random_fewshot_equal_the_harness(tmp_path):
    train, test = gsm8k_records(12, 0), gsm8k_records(7, 1)
    test[0] = fixture_records("gsm8k", "gsm8k.jsonl")[0]  # a real-schema record too
    theirs = harness_task("gsm8k/gsm8k.yaml", tmp_path, {"train": train, "test": test})
    assert theirs.config.num_fewshot == get_task("gsm8k").num_fewshot == 5
    # The harness draws one sample per document, in split order, from one seeded generator.
    expected = [theirs.fewshot_context(doc, 5) for doc in theirs.test_docs()]
    order = [4, 0, 6, 2]  # a fixed subset, in another order, gets the same demonstrations
    ours = build_eval_examples(get_task("gsm8k"), test, order, train, 5)
    assert [ex.prompt for ex in ours] == [expected[i] for i in order]
    assert [ex.reference for ex in ours] == [theirs.doc_to_target(test[i]) for i in order]
    zero = build_eval_examples(get_task("gsm8k"), test, [3], train, 0)[0].prompt
    assert zero == theirs.fewshot_context(theirs.test_docs()[3], 0)


def test_gsm8k_generation_settings_are_the_harness(tmp_path):
    theirs = harness_task(
        "gsm8k/gsm8k.yaml", tmp_path, {"train": gsm8k_records(6, 0), "test": gsm8k_records(2, 1)}
    )
    kwargs = theirs.config.generation_kwargs
    task = get_task("gsm8k")
    assert list(task.stop) == kwargs["until"] and kwargs["do_sample"] is False
    assert task.max_new_tokens == 256  # HFLM's max_gen_toks default


# --- log-likelihoods and generations against HFLM --------------------------------------------


@pytest.fixture(scope="module")
def byte_llama():
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def harness_examples(tmp_path) -> list[MultipleChoiceExample]:
    dev, test = mmlu_records()
    mmlu = build_eval_examples(get_task("mmlu"), test, [0], dev, 2)  # 2-shot anatomy
    mmlu += build_eval_examples(get_task("mmlu"), test, [1], dev, 0)
    pub = fixture_records("pubmedqa", "pubmedqa.jsonl")[:2]
    pubmed = build_eval_examples(get_task("pubmedqa"), pub, [0, 1], [], 0)
    long_choices = MultipleChoiceExample("Is it safe?\nAnswer:", (" yes, always", " no"), 1)
    return [*mmlu, *pubmed, long_choices]


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_loglikelihoods_equal_hflm(byte_llama, tmp_path, add_bos_token):
    model, tokenizer = byte_llama
    examples = harness_examples(tmp_path)
    ours = score_multiple_choice(model, tokenizer, examples, 3, add_bos_token=add_bos_token)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, add_bos_token=add_bos_token)
    requests = [
        Instance("loglikelihood", {}, (ex.prompt, choice), j)
        for ex in examples
        for j, choice in enumerate(ex.choices)
    ]
    theirs = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
    for i, ex in enumerate(examples):
        for j in range(len(ex.choices)):
            assert ours.loglikelihoods[i, j].item() == pytest.approx(next(theirs), abs=1e-4)


def test_generations_equal_hflm_generate_until(byte_llama):
    model, tokenizer = byte_llama
    prompts = ["Question: 2 + 2?\nAnswer:", "Question: What is the dose?\nAnswer:"]
    until = ["Question:", "</s>", "<|im_end|>", "e"]  # "e" so that a stop string fires
    ours = generate_greedy(model, tokenizer, prompts, max_new_tokens=12, stop=until)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    requests = [
        Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": 12}), 0)
        for p in prompts
    ]
    assert ours == lm.generate_until(requests, disable_tqdm=True)


# --- GSM8K filters and exact match ----------------------------------------------------------

ANSWERS = [
    "She has 3 + 4 = 7 apples.\n#### 7",
    "#### 1,234.",
    "#### -3.5 and later #### 9",
    "The answer is $1,000.50.",
    "It drops 3 degrees to -5",
    "so 42.0",
    "no number here",
    "",
    "#### $12",
    "Total: 7.\n\nQuestion: next",
    "1, 2, 3 and 72.",
]
REFERENCES = ["#### 7", "#### 1234", "#### -3.5", "#### 1000.50", "#### -5", "#### 42",
              "#### 0", "#### 0", "#### 12", "#### 7", "x\n#### 72"]  # fmt: skip


def harness_filtered(name: str) -> list[str]:
    from lm_eval.filters import build_filter_ensemble

    config = load_yaml(HARNESS_TASKS / "gsm8k/gsm8k.yaml")
    [spec] = [f for f in config["filter_list"] if f["name"] == name]
    components = [
        [f["function"], {k: v for k, v in f.items() if k != "function"}] for f in spec["filter"]
    ]
    ensemble = build_filter_ensemble(name, components)
    responses = [[answer] for answer in ANSWERS]  # one generation per document
    for step in ensemble.filters:  # as FilterEnsemble.apply runs them
        responses = step().apply(responses, [{}] * len(ANSWERS))
    return list(responses)


def harness_exact_match(predictions: list[str]) -> list[float]:
    from lm_eval.api.metrics import exact_match_hf_evaluate

    config = load_yaml(HARNESS_TASKS / "gsm8k/gsm8k.yaml")
    [metric] = config["metric_list"]
    kwargs = {k: metric[k] for k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    return [
        exact_match_hf_evaluate([p], [r], **kwargs)["exact_match"]
        for p, r in zip(predictions, REFERENCES, strict=True)
    ]


@pytest.mark.parametrize(
    ("name", "extract", "exact_match"),
    [
        ("strict-match", extract_strict, exact_match_strict),
        ("flexible-extract", extract_flexible, exact_match_flexible),
    ],
)
def test_gsm8k_extraction_equals_the_harness_filters(name, extract, exact_match):
    filtered = harness_filtered(name)
    hits = harness_exact_match(filtered)
    for answer, theirs, reference, hit in zip(ANSWERS, filtered, REFERENCES, hits, strict=True):
        ours = extract(answer)
        assert (ours is None) == (theirs == "[invalid]"), answer
        assert float(exact_match([answer], [reference])) == hit, answer
    assert exact_match(ANSWERS, REFERENCES) == pytest.approx(sum(hits) / len(hits))
    assert 0 < sum(hits) < len(hits)  # the table has hits and misses


# --- ROUGE-L --------------------------------------------------------------------------------

SUMMARIES = [
    ("54-year-old woman with T2DM admitted for DKA.", "54 y/o woman with type 2 diabetes, DKA."),
    ("Patient denies chest pain.", "patient reports no chest-pain"),
    ("Fever resolved.\nDischarged home on amoxicillin.", "Discharged on amoxicillin.\nAfebrile."),
    ("running runs ran", "run running"),
    ("", "non-empty reference"),
]


@pytest.mark.parametrize("use_stemmer", [False, True])
@pytest.mark.parametrize("key", ["rougeL", "rougeLsum"])
def test_rouge_l_equals_rouge_score(key, use_stemmer):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([key], use_stemmer=use_stemmer)
    predictions, references = zip(*SUMMARIES, strict=True)
    expected = [scorer.score(r, p)[key].fmeasure for p, r in SUMMARIES]
    for (p, r), value in zip(SUMMARIES, expected, strict=True):
        assert rouge_l([p], [r], use_stemmer=use_stemmer, key=key) == pytest.approx(value)
    mean = rouge_l(list(predictions), list(references), use_stemmer=use_stemmer, key=key)
    assert mean == pytest.approx(sum(expected) / len(expected))


# --- chat template ----------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize("shots", [0, 2])
def test_chat_template_rendering_equals_the_harness(byte_llama, tmp_path, shots):
    from medmoe.data.eval_protocol import chat_example

    model, _ = byte_llama
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    dev, test = mmlu_records()
    theirs = harness_task(
        "mmlu/default/mmlu_anatomy.yaml",
        tmp_path,
        {"dev": [d for d in dev if d["subject"] == "anatomy"], "test": [test[0]]},
    )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    doc = theirs.test_docs()[0]
    context = theirs.fewshot_context(
        doc, shots, apply_chat_template=True, chat_template=lm.apply_chat_template
    )
    requests = theirs.construct_requests(doc, context, apply_chat_template=True)
    task = get_task("mmlu")
    pool = task.fewshot_pool(dev, test[0])[:shots]
    ours = chat_example(task, test[0], pool, tokenizer)
    assert ours.prompt == context and ours.prompt.startswith("<|system|>The following are")
    assert [tuple(r.arguments) for r in requests] == [(ours.prompt, c) for c in ours.choices]
    assert ours.choices == ("A", "B", "C", "D")  # no target delimiter under a chat template
