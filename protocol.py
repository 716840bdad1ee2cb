"""The MoRE step protocol: the prompts of the three step kinds and the parsers of their outputs.

A plan step writes `<think>…</think><sub-question>…</sub-question><ret>…</ret>`, a sub-answer or
final step `<think>…</think><answer>…</answer>` (arXiv 2505.22095; docs/PROTOCOL.md in our words).
Text in, text or a parsed record out: no model, no tensors. The parsers never raise on what a
policy writes; a malformed step comes back `valid=False` with the reason.
"""
from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------------------------
# The step protocol (docs/PROTOCOL.md, "The step protocol"). Prompts are rendered in Qwen2-VL's chat
# format by hand so that the real and the tiny model see exactly the same text.

ANSWER_SYSTEM_PROMPT = (
    "You are a professional question answering model. Your task is to carefully think through the "
    "question based on the information retrieved and then provide the final answer.\n\n"
    "Strict Output Format:\n<think>\n[Analyze the original question and the retrieved information. "
    "Break down the reasoning process step by step. Do NOT provide the final answer yet.]\n</think>\n"
    "<answer>\n[Provide the final answer based solely on the retrieved information.]\n</answer>")
FINAL_SYSTEM_PROMPT = (
    "You are a professional question answering model. Your task is to carefully think through the "
    "question based on the sub-questions and their answers and then provide the final answer.\n\n"
    "Strict Output Format:\n<think>\n[Analyze the original question and sub-questions with their "
    "answers. Break down the reasoning process step by step. Do NOT provide the final answer yet.]\n"
    "</think>\n<answer>\n[Provide the final answer based solely on the information before.]\n</answer>")
PASSAGES_HEADER = ("According to the related information searched, `ter` means this info is from text "
                   "retriever, `tir` means this info is from text image retriever, `tar` means this "
                   "info is from table retriever:")
# The passage tag of each expert kind, as in the released prompts (ter-0:, tir-0:, tar-0:).
PASSAGE_TAGS = {"text": "ter", "image": "tir", "table": "tar"}
CLOSING_TAG = {"plan": "</ret>", "answer": "</answer>", "final": "</answer>"}


@dataclass
class StepPrompt:
    """What one step shows the policy: its system prompt, the user text, and the image (a path) if any."""
    system: str
    user: str
    image: str | None


def plan_system_prompt(experts) -> str:
    """The plan step's system prompt; the expert list is generated from the configured experts.

    `experts` holds (name, description) pairs or objects with `.name` and `.description`.
    """
    pairs = [(e.name, e.description) if hasattr(e, "name") else tuple(e) for e in experts]
    names = ", ".join(name for name, _ in pairs)
    guide = "\n".join(f"   - `{name}`: {desc}" for name, desc in pairs)
    return (
        "You are a professional question decomposition expert for multi-hop QA systems. Your task is "
        "to decompose complex questions into **strictly single-hop** sub-questions and select "
        "appropriate retrievers.\n\n**Strict Output Format:**\n<think>\n[Analyze the original question "
        "and determine the next required sub-question. Do NOT reveal answers or perform multi-hop "
        "reasoning.]\n</think>\n<sub-question>\n[Exactly ONE single-hop question one time. If no further "
        "information is needed to answer the origin question, write 'None'.]\n</sub-question>\n<ret>\n"
        f"[Choose 1 retriever from: {names}. Write 'None' if <sub-question> is 'None'.]\n</ret>\n\n"
        f"Retriever Selection Guidelines:\n{guide}")


@dataclass(frozen=True)
class SystemPrompts:
    """The fixed texts of one prompt style: the three steps' system prompts and the passages' header."""
    plan: str
    answer: str
    final: str
    passages_header: str


# The compact style: the same tags, the same user turns, one line of system prompt per step. For
# the tiny model (presets.py), which pays in CPU time for every token of the release's instructions
# and, trained from random weights, cannot follow them: with its tokenizer the plan step's system
# prompt shrinks from 241 to 56 tokens, the answer step's (with the passages' header) from 121 to 30.
# Real models keep the release's.
COMPACT_ANSWER = "Answer the question from the passages: <think>…</think><answer>…</answer>"
COMPACT_FINAL = "Answer the origin question from the answers: <think>…</think><answer>…</answer>"
COMPACT_PASSAGES_HEADER = "Passages:\n"
PROMPT_STYLES = ("release", "compact")


def system_prompts(experts, style: str = "release") -> SystemPrompts:
    """The system prompts of `style` ('release' or 'compact') for these experts (see plan_system_prompt)."""
    if style == "release":
        return SystemPrompts(plan_system_prompt(experts), ANSWER_SYSTEM_PROMPT, FINAL_SYSTEM_PROMPT, PASSAGES_HEADER)
    names = ", ".join(e.name if hasattr(e, "name") else e[0] for e in experts)
    plan = (f"Next hop: <think>…</think><sub-question>…</sub-question><ret>…</ret>, ret one of {names}; "
            "None and None when done.")
    return SystemPrompts(plan, COMPACT_ANSWER, COMPACT_FINAL, COMPACT_PASSAGES_HEADER)


def history_text(question: str, hops) -> str:
    """`Origin question: …` followed by `Sub-questionN: …\\nAnswerN: …` lines, as released."""
    lines = [f"Origin question: {question}"]
    for i, (sub_question, answer) in enumerate(hops, start=1):
        lines += [f"Sub-question{i}: {sub_question}", f"Answer{i}: {answer}"]
    return "\n".join(lines) + "\n"


def passages_text(hits, header: str = PASSAGES_HEADER) -> str:
    """Retrieved passages, one per line as `ter-0: …`; `hits` carry `.expert` (a kind) and `.text`."""
    counters: dict[str, int] = {}
    lines = []
    for hit in hits:
        tag = PASSAGE_TAGS[hit.expert]
        lines.append(f"{tag}-{counters.get(tag, 0)}: {hit.text}")
        counters[tag] = counters.get(tag, 0) + 1
    return header + "\n".join(lines)


def answer_user_text(sub_question: str, hits, header: str = PASSAGES_HEADER) -> str:
    return (f"{passages_text(hits, header)}\n\n Give me the answer(with the format <answer></answer>) to the "
            f"Question: {sub_question}")


def final_user_text(question: str, hops) -> str:
    return f"{history_text(question, hops)}Now, give me the final answer of the origin question: {question}"


def render_prompt(system: str, user: str, has_image: bool) -> str:
    """Qwen2-VL chat format; the image (if any) ends the user turn, where the release's step
    prompts put their `<image>` (all 203 image steps of its validation step file)."""
    image = "<|vision_start|><|image_pad|><|vision_end|>" if has_image else ""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}{image}<|im_end|>\n"
            "<|im_start|>assistant\n")


PASSAGE_START = re.compile(r"\b(?:ter|tir|tar)-\d+: ")


def count_passages(user: str) -> int:
    return len(PASSAGE_START.findall(user))


def drop_last_passages(user: str, n: int) -> str:
    """`user` without its last `n` retrieved passages (`ter-0: …` lines, listed best first).

    A passage runs to the next one; the last runs to the blank line that ends the list.
    """
    starts = [m.start() for m in PASSAGE_START.finditer(user)]
    if n <= 0 or not starts:
        return user
    blank = user.find("\n\n", starts[-1])
    end = blank if blank >= 0 else len(user)
    keep = max(0, len(starts) - n)
    cut_from = starts[keep] if keep < len(starts) else end
    return (user[:cut_from].rstrip("\n") if keep else user[:cut_from]) + user[end:]


@dataclass
class Plan:
    """A parsed plan step. `valid` is False with a `reason` for malformed text; never an exception."""
    valid: bool
    reason: str = ""
    thought: str = ""
    sub_question: str = ""
    experts: list[str] = field(default_factory=list)  # canonical names, in the order written
    stop: bool = False  # None/None: enough information, go to the final answer


@dataclass
class Answer:
    valid: bool
    reason: str = ""
    thought: str = ""
    answer: str = ""


# The protocol as a grammar. A plan is exactly
#     <think>T</think> <sub-question>S</sub-question> <ret>R</ret>
# and a sub-answer or final answer exactly <think>T</think> <answer>A</answer>: each tag once and in
# that order, only whitespace around the tags, no protocol tag inside a field, and every field
# non-empty once whitespace, control and format (zero-width) characters are removed; those are also
# removed from what is kept. Tags match case-insensitively (the release lower-cases the whole output
# before parsing); contents keep their case. One pass over the tags: linear in the text's length.
# The release searches each tag anywhere in the text and takes the first match. That is looser:
# text around the tags, repeated or reordered tags, a tag inside another field (a <ret> inside
# <think> decided the routing) and empty fields were all accepted. Here they are not, so that what
# a reward credits is exactly the protocol. Nothing the release rejects is accepted here.

PROTOCOL_TAG = re.compile(r"</?(?:think|sub-question|ret|answer)>", re.I)


def _invisible_characters() -> re.Pattern:
    """A character class of Unicode's control (Cc) and format (Cf) characters, but newline and tab.

    Cf holds the zero-width space, joiners, BOM and bidi marks; every one lies in the planes scanned.
    """
    planes = itertools.chain(range(0x20000), range(0xE0000, 0xE1000))
    points = [p for p in planes if unicodedata.category(chr(p)) in ("Cc", "Cf") and chr(p) not in "\n\t"]
    runs = [list(g) for _, g in itertools.groupby(points, key=lambda p, c=itertools.count(): p - next(c))]
    return re.compile("[" + "".join(f"{re.escape(chr(r[0]))}-{re.escape(chr(r[-1]))}" for r in runs) + "]")


INVISIBLE = _invisible_characters()


def _visible(text: str) -> str:
    """`text` without control and format characters (NUL, zero-width space, BOM, …)."""
    if text.replace("\n", "").replace("\t", "").isprintable():  # none there: the common case, 20x faster
        return text
    return INVISIBLE.sub("", text)


def protocol_fields(text: str, names: tuple[str, ...]) -> tuple[list[str] | None, str]:
    """The contents of tags `names`, in that order, or (None, why the text breaks the grammar)."""
    text = _visible(text)  # first, so that no tag hides behind a zero-width character
    expected = [f"{edge}{name}>" for name in names for edge in ("<", "</")]
    found = list(itertools.islice(PROTOCOL_TAG.finditer(text), len(expected) + 1))
    written = [m.group(0).lower() for m in found]
    if written != expected:
        absent = [tag for tag in expected if tag not in written]
        if absent and len(written) <= len(expected):
            return None, "missing " + ", ".join(absent)
        return None, f"tags must be {''.join(expected)}, each once, in order; got {''.join(written)[:120]}"
    outside = [text[:found[0].start()], text[found[-1].end():]] + \
        [text[found[i].end():found[i + 1].start()] for i in range(1, len(found) - 1, 2)]
    if any(piece.strip() for piece in outside):
        return None, "text outside the protocol tags"
    contents = [text[found[i].end():found[i + 1].start()].strip() for i in range(0, len(found), 2)]
    empty = [f"<{name}>" for name, content in zip(names, contents) if not content]
    if empty:
        return None, "empty " + ", ".join(empty)
    return contents, ""


def _is_none(value: str) -> bool:
    return value.strip().strip(".'\"`").lower() == "none"


def parse_plan(text: str, expert_names) -> Plan:
    """Parse `<think>…</think><sub-question>…</sub-question><ret>…</ret>` (the grammar above).

    `ret` may name several experts separated by commas (the release queries them all; rewards
    credit only a single right one); every name must be a configured expert.
    """
    if not isinstance(text, str):
        return Plan(False, f"output is {type(text).__name__}, not text")
    fields, reason = protocol_fields(text, ("think", "sub-question", "ret"))
    if fields is None:
        return Plan(False, reason)
    thought, sub_question, ret = fields
    if _is_none(sub_question) and _is_none(ret):
        return Plan(True, thought=thought, stop=True)
    if _is_none(sub_question) or _is_none(ret):
        return Plan(False, "sub-question and ret must both be None to stop", thought=thought)
    known = {name.lower(): name for name in expert_names}
    written = [part.strip() for part in ret.split(",")]
    unknown = [name for name in written if name.lower() not in known]
    if unknown:
        return Plan(False, f"unknown expert(s) {unknown}; known: {list(expert_names)}",
                    thought=thought, sub_question=sub_question)
    experts = list(dict.fromkeys(known[name.lower()] for name in written))
    return Plan(True, thought=thought, sub_question=sub_question, experts=experts)


def parse_answer(text: str) -> Answer:
    """Parse `<think>…</think><answer>…</answer>` (the grammar above)."""
    if not isinstance(text, str):
        return Answer(False, f"output is {type(text).__name__}, not text")
    fields, reason = protocol_fields(text, ("think", "answer"))
    if fields is None:
        return Answer(False, reason)
    return Answer(True, thought=fields[0], answer=fields[1])
