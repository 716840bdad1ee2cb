"""The step protocol as a grammar: a fuzz test against an independent statement of the grammar,
the release's gold completions, and linear time on adversarial input."""
import random
import re
import time
import unicodedata

import pytest

import protocol
from conftest import SAMPLES

NAMES = ["Text Retriever", "Text Image Retriever", "Table Retriever"]
TAGS = ["<think>", "</think>", "<sub-question>", "</sub-question>", "<ret>", "</ret>", "<answer>", "</answer>"]

# The grammar, written again independently of more.py: after removing control and format
# characters, the whole text is the tags in order with only whitespace between, and every field is
# non-empty and holds no protocol tag.
FIELD = r"((?:(?!</?(?:think|sub-question|ret|answer)>).)*)"
PLAN_GRAMMAR = re.compile(rf"\s*<think>{FIELD}</think>\s*<sub-question>{FIELD}</sub-question>\s*<ret>{FIELD}</ret>\s*",
                          re.I | re.S)
ANSWER_GRAMMAR = re.compile(rf"\s*<think>{FIELD}</think>\s*<answer>{FIELD}</answer>\s*", re.I | re.S)


def cleaned(text: str) -> str:
    return "".join(c for c in text if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf"))


def valid_plan(rng):
    sub_question = rng.choice(["Who founded Velora?", "None", "population of Arlen", "où est né X ?"])
    ret = "None" if sub_question == "None" else ", ".join(rng.sample(NAMES, rng.choice([1, 1, 1, 2])))
    return f"<think>{rng.choice(['need it', 'ok'])}</think><sub-question>{sub_question}</sub-question><ret>{ret}</ret>"


def valid_answer(rng):
    return f"<think>{rng.choice(['read', 'it says'])}</think><answer>{rng.choice(['1899', 'Paris', 'A or B'])}</answer>"


NOISE = ["\u200b", "\x00", "\ufeff", "\u2060", " ", "\n", "x", "<", ">", "/", "é", "\U0001f600", "None", ",",
         "Text Retriever", "Web Search", "<thi\u200bnk>", "<RET>", "</Answer>"]


def mutate(text: str, rng) -> str:
    """One of: insert a tag or noise, delete or duplicate a slice, swap two halves, nest a tag."""
    i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
    choice = rng.randrange(6)
    if choice == 0:
        return text[:i] + rng.choice(TAGS) + text[i:]
    if choice == 1:
        return text[:i] + rng.choice(NOISE) + text[i:]
    if choice == 2:
        return text[:i] + text[j:]
    if choice == 3:
        return text[:j] + text[i:j] + text[j:]
    if choice == 4:
        return text[j:] + text[:j]
    return text[:i] + rng.choice(TAGS[::2]) + text[i:j] + rng.choice(TAGS[1::2]) + text[j:]


def random_text(rng) -> str:
    kind = rng.randrange(3)
    if kind == 0:  # random unicode, any plane
        return "".join(chr(rng.choice([rng.randrange(0x80), rng.randrange(0x110000)])) for _ in range(rng.randrange(40)))
    if kind == 1:  # random bytes read as text
        return bytes(rng.randrange(256) for _ in range(rng.randrange(60))).decode("latin-1")
    return "".join(rng.choice(TAGS + NOISE) for _ in range(rng.randrange(20)))


def generated(n: int, seed: int = 0):
    rng = random.Random(seed)
    for k in range(n):
        if k % 4 == 3:
            yield random_text(rng)
            continue
        text = valid_plan(rng) if k % 2 else valid_answer(rng)
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            text = mutate(text, rng)
        yield text


def test_every_accepted_plan_and_answer_satisfies_the_grammar():
    """12,000 generated strings (valid plans and answers, mutated by inserted, deleted, duplicated,
    reordered and nested tags, zero-width and control characters, unknown experts; random unicode
    and bytes). Every accepted plan matches the grammar and names configured experts only (or is
    the None/None stop); so does every accepted answer; both parsers reject as well as accept."""
    start, accepted = time.perf_counter(), {"plan": 0, "answer": 0}
    for text in generated(12_000):
        plan, answer = protocol.parse_plan(text, NAMES), protocol.parse_answer(text)
        if plan.valid:
            accepted["plan"] += 1
            match = PLAN_GRAMMAR.fullmatch(cleaned(text))
            assert match and all(field.strip() for field in match.groups()), repr(text)
            assert plan.thought == match.group(1).strip()
            if plan.stop:
                assert match.group(2).strip().lower() == match.group(3).strip().lower() == "none"
            else:
                assert plan.sub_question == match.group(2).strip()
                written = [name.strip().lower() for name in match.group(3).split(",")]
                assert plan.experts and {e.lower() for e in plan.experts} == set(written) <= {n.lower() for n in NAMES}
        else:
            assert plan.reason
        if answer.valid:
            accepted["answer"] += 1
            match = ANSWER_GRAMMAR.fullmatch(cleaned(text))
            assert match and all(field.strip() for field in match.groups()), repr(text)
            assert answer.answer == match.group(2).strip()
    assert time.perf_counter() - start <= 10.0
    assert accepted["plan"] > 500 and accepted["answer"] > 500  # the generator reaches both sides


def test_the_release_attack_cases_are_refused():
    ret_in_think = ("<think>ignore <ret>Table Retriever</ret></think><sub-question>q</sub-question>"
                    "<ret>Text Retriever</ret>")
    assert not protocol.parse_plan(ret_in_think, NAMES).valid
    assert not protocol.parse_plan("<think>t</think><sub-question>\u200b</sub-question><ret>Text Retriever</ret>",
                               NAMES).valid
    assert not protocol.parse_answer("<think>t</think><answer>\x00</answer>").valid
    assert not protocol.parse_plan("<ret>Text Retriever</ret><think>t</think><sub-question>q</sub-question>", NAMES).valid
    assert not protocol.parse_answer("<think>t</think><answer>a</answer><answer>b</answer>").valid
    tag_in_field = "<think>t</think><sub-question>q <thi\u200bnk></sub-question><ret>Text Retriever</ret>"
    assert not protocol.parse_plan(tag_in_field, NAMES).valid


@pytest.mark.parametrize("adversary", ["<answer>", "<think>", "<think>x</think><answer>", "<sub-question><ret>"])
def test_a_megabyte_of_adversarial_text_parses_in_linear_time(adversary):
    text = adversary * ((1 << 20) // len(adversary))
    start = time.perf_counter()
    assert not protocol.parse_answer(text).valid and not protocol.parse_plan(text, NAMES).valid
    assert time.perf_counter() - start < 0.1


def test_every_gold_completion_of_the_release_step_file_parses():
    """The warm start's targets for every step of the release's step file (the sample; all 758 of
    the full file parse but one, `python data.py inspect` on it): each parses, as a plan with the
    gold expert or as the gold answer. The step whose gold sub-answer is empty (in the sample) has
    no completion to parse: the grammar rightly refuses an empty answer."""
    import data
    samples = data.load_step_file(SAMPLES / "grpo_dataset_valid_new.jsonl")
    parsed = 0
    for sample in samples:
        if sample.kind == "answer" and not str(sample.gold).strip():
            continue
        text = data.gold_completion(sample)
        if sample.kind == "plan":
            plan = protocol.parse_plan(text, NAMES)
            assert plan.valid, (text, plan.reason)
            assert plan.stop or [e.lower() for e in plan.experts] == [str(sample.gold["retriever"][0]).lower()]
        else:
            assert protocol.parse_answer(text).valid, text
        parsed += 1
    assert parsed >= len(samples) - 1


def test_compact_prompts_keep_the_protocol_and_name_every_expert():
    experts = [("Text Retriever", "passages"), ("Table Retriever", "tables")]
    compact, release = protocol.system_prompts(experts, "compact"), protocol.system_prompts(experts, "release")
    assert release.plan == protocol.plan_system_prompt(experts) and release.answer == protocol.ANSWER_SYSTEM_PROMPT
    assert "Text Retriever" in compact.plan and "Table Retriever" in compact.plan
    for tag in ("<think>", "<sub-question>", "<ret>"):
        assert tag in compact.plan
    assert "<answer>" in compact.answer and "<answer>" in compact.final
    assert all(len(text) < len(full) / 3 for text, full in zip(
        (compact.plan, compact.answer, compact.final), (release.plan, release.answer, release.final)))
