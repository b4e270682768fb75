"""The toy clinic: a deterministic generator of tiny tasks in the real tasks' upstream schemas.

Two general tasks and three medical ones, each emitting records exactly like its real
counterpart, so one :class:`~medmoe.data.tasks.Task` formats both:

============  ===========================  ===============================================
task          schema of                    content
============  ===========================  ===============================================
mmlu          ``cais/mmlu``                fact quiz over a fixed world of 24 animals with
                                           a colour, a habitat and a diet each
gsm8k         ``openai/gsm8k``             two-number addition, ``"a + b = s\\n#### s"``
medqa         ``GBaker/MedQA-USMLE-4-..``  diagnosis of one of 12 diseases from 2 of its 4
                                           symptoms; the options are the answer's group of
                                           4 differential diagnoses (:data:`SPECIALTIES`)
pubmedqa      ``qiaojin/PubMedQA``         yes/no/maybe by a rule over the whole trial: a
                                           definite outcome for the asked symptom in 30+
                                           patients decides; a hedged outcome, a smaller
                                           trial or another symptom measured is maybe
clinical_sum  the MIMIC-III export schema  a note (age, sex, 2 symptoms) -> its assessment
                                           and plan, "{disease} on {drug}", both inferred
============  ===========================  ===============================================

MMLU-format records have 4 options: the answer and 3 random distractors, listed in a fixed
canonical order of the values (as MMLU lists numeric answers in order). Without the fact every
letter is equally likely; a small model that knows the fact can place the answer from the
order alone, which keeps the quiz learnable by a 0.7M-parameter model in minutes (with
shuffled options it stayed at chance for thousands of steps).

The medical tasks are built to leave headroom and to compete (docs/results/README.md has the
measurements): the MedQA-format presentation shows 2 of 4 symptoms, so one pair fits two
diseases of a group (:func:`medqa_bayes_accuracy`: 98.6%); the PubMedQA-format rule needs
three facts of the context and the question (reading the outcome words alone scores ~77%);
the summary has nothing to copy (ROUGE-L of a wrong disease and drug: 1/3, the word "on");
MedQA-format questions and MMLU-format questions share the ``Question: .. A. .. Answer:``
format and its letters, so learning diagnoses can overwrite the quiz.

The world (facts, diseases) is fixed and independent of any seed, so a base model trained on
it keeps knowing it whatever seed an experiment uses. Splits are disjoint as records (no
prompt appears in two splits); the facts and sums behind them are shared on purpose, like
world knowledge. Every word comes from :func:`toy_vocabulary`, so the toy tokenizer never
emits ``<unk>`` on toy text.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Iterator, Sequence
from itertools import combinations
from typing import Any

from medmoe.assets import toy_base_path as toy_base_path  # re-exported: medmoe.data names it
from medmoe.data.words import split_words

Record = dict[str, Any]

TOY_TASKS: tuple[str, ...] = ("mmlu", "gsm8k", "medqa", "pubmedqa", "clinical_sum")
DEFAULT_SIZES: dict[str, int] = {"train": 2000, "validation": 200, "test": 200}
# Splits are drawn in this order, each excluding the records of those before it.
_SPLIT_ORDER: tuple[str, ...] = ("test", "validation", "train")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

# --- general world: a fact quiz ------------------------------------------------------------
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "fox", "owl", "bear", "wolf", "deer", "frog", "hawk", "seal", "crab", "goat",
    "lion", "mole", "duck", "swan", "hare", "lynx", "newt", "orca", "pike", "toad", "wren", "yak",
)  # fmt: skip
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "black", "white", "brown", "gold", "grey"),
    "habitat": ("forest", "river", "desert", "lake", "island", "valley", "cave", "hill"),
    "diet": ("fish", "fruit", "grass", "seeds", "leaves", "insects", "roots", "berries"),
}
QUIZ_TEMPLATES: dict[str, str] = {
    "color": "What color is the {animal} ?",
    "habitat": "Where does the {animal} live ?",
    "diet": "What does the {animal} eat ?",
}
_WORLD_SEED = 1234  # fixes the facts; never tied to an experiment's seed


def _build_facts() -> dict[str, dict[str, str]]:
    """Every animal's value for every attribute, each value used by 3 animals."""
    rng = random.Random(_WORLD_SEED)
    facts: dict[str, dict[str, str]] = {a: {} for a in ANIMALS}
    for attr, values in ATTRIBUTES.items():
        pool = [v for v in values for _ in range(len(ANIMALS) // len(values))]
        rng.shuffle(pool)
        for animal, value in zip(ANIMALS, pool, strict=True):
            facts[animal][attr] = value
    return facts


FACTS: dict[str, dict[str, str]] = _build_facts()

# --- general world: arithmetic -------------------------------------------------------------
NAMES: tuple[str, ...] = ("Tom", "Ana", "Sam", "Mia", "Ben", "Eva")
OBJECTS: tuple[str, ...] = ("apples", "books", "coins", "pens", "cups", "eggs", "cards", "shells")
MAX_OPERAND = 20
MATH_TEMPLATES: tuple[str, ...] = (
    "{name} has {a} {obj} and gets {b} more . How many {obj} does {name} have now ?",
    "{name} buys {a} {obj} and then {b} more {obj} . How many {obj} did {name} buy ?",
)

# --- medical world -------------------------------------------------------------------------
# disease -> (four symptoms, drug). No three symptoms of one disease fit another disease.
DISEASES: dict[str, tuple[tuple[str, ...], str]] = {
    "pneumonia": (("fever", "cough", "dyspnea", "chills"), "amoxicillin"),
    "asthma": (("wheeze", "cough", "dyspnea", "tightness"), "salbutamol"),
    "migraine": (("headache", "nausea", "photophobia", "aura"), "sumatriptan"),
    "diabetes": (("thirst", "polyuria", "fatigue", "hunger"), "metformin"),
    "hepatitis": (("jaundice", "fatigue", "nausea", "itching"), "tenofovir"),
    "anemia": (("fatigue", "pallor", "dizziness", "palpitations"), "iron"),
    "gastroenteritis": (("diarrhea", "vomiting", "nausea", "fever"), "fluids"),
    "hyperthyroidism": (("tremor", "palpitations", "sweats", "anxiety"), "methimazole"),
    "meningitis": (("fever", "headache", "stiffness", "confusion"), "ceftriaxone"),
    "gout": (("swelling", "redness", "stiffness", "tenderness"), "colchicine"),
    "cystitis": (("dysuria", "urgency", "hematuria", "frequency"), "nitrofurantoin"),
    "epilepsy": (("seizures", "confusion", "drowsiness", "incontinence"), "levetiracetam"),
}
# Differential-diagnosis groups: a MedQA-format question lists the answer's group as options.
SPECIALTIES: tuple[tuple[str, ...], ...] = (
    ("pneumonia", "asthma", "meningitis", "gastroenteritis"),
    ("diabetes", "hepatitis", "anemia", "hyperthyroidism"),
    ("migraine", "gout", "cystitis", "epilepsy"),
)
PRESENTED_SYMPTOMS = 2  # of a disease's 4: some pairs fit two diseases (a Bayes ceiling < 1)
AGES: tuple[int, ...] = (*range(18, 41), 50, 60, 70, 80)  # words of the vocabulary's numbers
SEXES: dict[str, str] = {"man": "He", "woman": "She"}
TRIAL_SIZES: tuple[int, ...] = tuple(range(10, 41))  # words of the vocabulary's numbers
POWERED_TRIAL = 30  # a definite outcome from this many patients or more decides yes / no
OUTCOMES: dict[str, str] = {"yes": "reduced", "no": "did not reduce", "maybe": "may have reduced"}

MEDQA_TEMPLATE = "A {age} year old {sex} has {s1} , {s2} . What is the most likely diagnosis ?"
NOTE_TEMPLATE = "A {age} year old {sex} reports {s1} , {s2} ."
SUMMARY_TEMPLATE = "{disease} on {drug} ."  # the assessment and plan: inferred, not copied
# Words of earlier note and summary templates ("He was started on amoxicillin", "with"): kept
# so the shipped toy base's vocabulary (and so its embeddings) stays the tokenizer's.
RETIRED_WORDS = "was started on with"
BACKGROUND_TEMPLATE = "{disease} often causes {s1} and {s2} ."
RESULT_TEMPLATE = "In a trial of {n} patients with {disease} , {drug} {outcome} {symptom} ."
PUBMED_QUESTION = "Does {drug} reduce {symptom} in {disease} ?"
LONG_ANSWER = "{drug} {outcome} {symptom} in patients with {disease} ."

# Words of the real tasks' prompt templates (see medmoe.data.tasks).
TEMPLATE_WORDS = "Question : Answer : Context : Note : Summary : A . B . C . D . yes no maybe"
COPY_WORD = "Repeat"  # the toy base's reading exercise: "Repeat : w1 .. wk" -> " w1 .. wk"


def toy_vocabulary() -> list[str]:
    """Every word the toy clinic can emit, in a fixed order (the toy tokenizer's vocabulary)."""
    texts = [TEMPLATE_WORDS, *ANIMALS, *QUIZ_TEMPLATES.values(), *NAMES, *OBJECTS]
    texts += [v for values in ATTRIBUTES.values() for v in values]
    texts += [*MATH_TEMPLATES, "+ = ####", *(str(n) for n in range(2 * MAX_OPERAND + 1))]
    for disease, (symptoms, drug) in DISEASES.items():
        texts += [disease, disease.capitalize(), drug, drug.capitalize(), *symptoms]
    texts += [str(a) for a in AGES] + [str(n) for n in TRIAL_SIZES] + [*SEXES, *SEXES.values()]
    texts += [MEDQA_TEMPLATE, NOTE_TEMPLATE, RETIRED_WORDS, SUMMARY_TEMPLATE, BACKGROUND_TEMPLATE]
    texts += [RESULT_TEMPLATE, PUBMED_QUESTION, LONG_ANSWER, *OUTCOMES.values(), COPY_WORD]
    words: dict[str, None] = {}
    for text in texts:
        for word in split_words(re.sub(r"\{\w+\}", " ", text)):  # drop template fields
            words.setdefault(word, None)
    return list(words)


# --- record makers: one record from an rng; each returns (dedup key, record) ---------------


def _options(rng: random.Random, answer: str, pool: Sequence[str]) -> tuple[list[str], int]:
    """The answer and 3 random distractors, listed in ``pool`` order; the answer's index."""
    options = sorted([answer, *rng.sample([p for p in pool if p != answer], 3)], key=pool.index)
    return options, options.index(answer)


def make_mmlu(rng: random.Random) -> tuple[str, Record]:
    animal = rng.choice(ANIMALS)
    attr = rng.choice(list(ATTRIBUTES))
    choices, answer = _options(rng, FACTS[animal][attr], ATTRIBUTES[attr])
    question = QUIZ_TEMPLATES[attr].format(animal=animal)
    record = {"question": question, "subject": attr, "choices": choices, "answer": answer}
    return f"{question}|{choices}", record


def make_gsm8k(rng: random.Random) -> tuple[str, Record]:
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    template = rng.choice(MATH_TEMPLATES)
    question = template.format(name=rng.choice(NAMES), obj=rng.choice(OBJECTS), a=a, b=b)
    return question, {"question": question, "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}


def _patient(rng: random.Random) -> tuple[str, list[str], int, str]:
    disease = rng.choice(list(DISEASES))
    symptoms = rng.sample(DISEASES[disease][0], PRESENTED_SYMPTOMS)
    return disease, symptoms, rng.choice(AGES), rng.choice(list(SEXES))


def specialty(disease: str) -> tuple[str, ...]:
    """The differential-diagnosis group of ``disease`` (a MedQA-format question's options)."""
    return next(group for group in SPECIALTIES if disease in group)


def make_medqa(rng: random.Random) -> tuple[str, Record]:
    disease, (s1, s2), age, sex = _patient(rng)
    question = MEDQA_TEMPLATE.format(age=age, sex=sex, s1=s1, s2=s2)
    options = list(specialty(disease))
    record = {
        "question": question,
        "answer": disease,
        "options": dict(zip(LETTERS, options, strict=True)),
        "meta_info": "step1",
        "answer_idx": LETTERS[options.index(disease)],
        "metamap_phrases": [f"{age} year old {sex}", s1, s2],
    }
    return f"{question}|{options}", record


MAYBE_REASONS: tuple[str, ...] = ("hedged", "small trial", "other symptom")


def _trial(
    rng: random.Random, decision: str, asked: str, others: Sequence[str]
) -> tuple[str, int, str]:
    """The reported outcome, trial size and measured symptom behind ``decision``.

    yes / no: a definite outcome for the asked symptom in a trial of at least
    :data:`POWERED_TRIAL` patients. maybe, one of :data:`MAYBE_REASONS` at random: a hedged
    outcome, a definite one from a smaller trial, or a definite one for another symptom.
    """
    powered = [n for n in TRIAL_SIZES if n >= POWERED_TRIAL]
    definite = [OUTCOMES["yes"], OUTCOMES["no"]]
    if decision != "maybe":
        return OUTCOMES[decision], rng.choice(powered), asked
    reason = rng.choice(MAYBE_REASONS)
    if reason == "hedged":
        return OUTCOMES["maybe"], rng.choice(TRIAL_SIZES), asked
    if reason == "small trial":
        small = [n for n in TRIAL_SIZES if n < POWERED_TRIAL]
        return rng.choice(definite), rng.choice(small), asked
    return rng.choice(definite), rng.choice(powered), rng.choice(list(others))


def make_pubmedqa(rng: random.Random) -> tuple[str, Record]:
    disease = rng.choice(list(DISEASES))
    symptoms, drug = DISEASES[disease]
    asked, *others = rng.sample(symptoms, 4)  # others: the background's and another symptom
    decision = rng.choice(list(OUTCOMES))
    outcome, n, measured = _trial(rng, decision, asked, others)
    fields = {"drug": drug, "disease": disease, "outcome": outcome}
    contexts = [
        BACKGROUND_TEMPLATE.format(disease=disease.capitalize(), s1=others[0], s2=others[1]),
        RESULT_TEMPLATE.format(n=n, symptom=measured, **fields),
    ]
    question = PUBMED_QUESTION.format(symptom=asked, **fields)
    record = {
        "pubid": 0,  # set by the split builder
        "question": question,
        "context": {
            "contexts": contexts,
            "labels": ["BACKGROUND", "RESULTS"],
            "meshes": [disease.capitalize(), drug.capitalize()],
            "reasoning_required_pred": decision,
            "reasoning_free_pred": decision,
        },
        "long_answer": LONG_ANSWER.format(
            drug=drug.capitalize(), outcome=outcome, symptom=measured, disease=disease
        ),
        "final_decision": decision,
    }
    return f"{contexts}|{question}", record


def make_clinical_sum(rng: random.Random) -> tuple[str, Record]:
    disease, (s1, s2), age, sex = _patient(rng)
    drug = DISEASES[disease][1]
    text = NOTE_TEMPLATE.format(age=age, sex=sex, s1=s1, s2=s2)
    summary = SUMMARY_TEMPLATE.format(disease=disease, drug=drug)
    return text, {"note_id": "", "text": text, "summary": summary}


MAKERS: dict[str, Callable[[random.Random], tuple[str, Record]]] = {
    "mmlu": make_mmlu,
    "gsm8k": make_gsm8k,
    "medqa": make_medqa,
    "pubmedqa": make_pubmedqa,
    "clinical_sum": make_clinical_sum,
}


def _unique(task: str, split: str, seed: int, taken: set[str]) -> Iterator[tuple[str, Record]]:
    rng = random.Random(f"medmoe-toy/{task}/{split}/{seed}")
    misses = 0
    while misses < 10_000:  # stop once the record space is exhausted
        key, record = MAKERS[task](rng)
        if key in taken:
            misses += 1
            continue
        misses = 0
        taken.add(key)
        yield key, record


def toy_records(
    task: str, split: str, n: int | None = None, seed: int = 0, sizes: dict[str, int] | None = None
) -> list[Record]:
    """The first ``n`` records (default: the split's size) of a toy task's split.

    Deterministic in ``(task, split, seed, sizes)``. Test, then validation, then train are drawn
    in turn, each skipping records already drawn, so the splits never share a prompt; ``sizes``
    fixes how many records the earlier splits hold (default :data:`DEFAULT_SIZES`).
    """
    if task not in MAKERS:
        raise ValueError(f"unknown toy task {task!r}; known: {', '.join(TOY_TASKS)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    if split not in sizes:
        raise ValueError(f"unknown toy split {split!r} for task {task!r}; known: {list(sizes)}")
    n = sizes[split] if n is None else n
    cached = _records(task, split, n, seed, tuple(sorted(sizes.items())))
    return [dict(r) for r in cached]  # nested values are shared with the cache: read only


@functools.lru_cache(maxsize=64)
def _records(
    task: str, split: str, n: int, seed: int, sizes: tuple[tuple[str, int], ...]
) -> tuple[Record, ...]:
    taken: set[str] = set()
    for earlier in _SPLIT_ORDER[: _SPLIT_ORDER.index(split)]:
        for _ in zip(
            range(dict(sizes)[earlier]), _unique(task, earlier, seed, taken), strict=False
        ):
            pass
    records = [r for _, (_, r) in zip(range(n), _unique(task, split, seed, taken), strict=False)]
    if len(records) < n:
        raise ValueError(f"toy task {task!r} has only {len(records)} distinct {split} records")
    for i, record in enumerate(records):
        if "pubid" in record:
            record["pubid"] = 1_000_000 * (1 + _SPLIT_ORDER.index(split)) + i
        if "note_id" in record:
            record["note_id"] = f"toy-{split}-{i}"
    return tuple(records)


def check_world() -> None:
    """Assert the medical world is well posed: three symptoms always identify one disease."""
    sets = {d: set(s) for d, (s, _) in DISEASES.items()}
    for disease, symptoms in sets.items():
        for trio in combinations(sorted(symptoms), 3):
            owners = [d for d, s in sets.items() if set(trio) <= s]
            assert owners == [disease], f"{trio} fits {owners}"
    for group in SPECIALTIES:
        assert len(group) == len(LETTERS), group
    assert sorted(d for group in SPECIALTIES for d in group) == sorted(DISEASES)


def medqa_bayes_accuracy() -> float:
    """The best accuracy any model can reach on the MedQA-format task: presentations (two
    symptoms, the options' group) that fit several diseases of the group are a coin flip."""
    total = 0.0
    pairs = 0
    for disease, (symptoms, _) in DISEASES.items():
        for pair in combinations(symptoms, PRESENTED_SYMPTOMS):
            fits = [d for d in specialty(disease) if set(pair) <= set(DISEASES[d][0])]
            total += 1 / len(fits)
            pairs += 1
    return total / pairs
