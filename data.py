"""Data: the records every module shares, and reading the official MoRE files.

  python data.py inspect FILE     # a summary of a benchmark, step or question file

Questions with their gold hops, the steps of a step file, and the readers of the release's six
benchmark files and its step files (docs/PROTOCOL.md, "File formats"). Every malformed row is
refused with its file and line. The mini world that writes these formats is world.py.
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path


import protocol
from config import UserError, run_command
from experts import EXPERT_NAMES, read_jsonl

# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class Hop:
    """One gold step of a question's plan."""
    sub_question: str
    sub_answer: str
    gold_docs: list[str]  # ids of the documents that hold the evidence (in any expert's corpus)
    uses_image: bool = False  # the hop needs the question's image (identify what is pictured)
    gold_experts: list[str] = field(default_factory=list)  # filled by label_gold_experts

    def routed_by(self, experts: list[str]) -> bool:
        """Routing is right when exactly one expert is asked and it is one that holds this hop's evidence."""
        return len(experts) == 1 and experts[0] in self.gold_experts


@dataclass
class Question:
    dataset: str
    qid: str
    question: str
    answers: list[str]
    image: str | None = None
    answer_eval: list | None = None  # InfoSeek's evaluation golds, kept exactly as in the file
    kind: str = ""  # the mini world's question kind
    hops: list[Hop] = field(default_factory=list)


@dataclass
class StepSample:
    """One teacher-forced step of an official Step-GRPO trajectory (docs/PROTOCOL.md)."""
    kind: str  # "plan" (official "ret"), "answer" (intermediate "ans"), "final" (last "ans")
    system: str
    parts: list[dict]  # the user turn: {"type": "text", "text": …} and {"type": "image", "image": path}
    gold: object  # plan: {"query", "retriever": [...]}; answer: str; final: list[str]
    trajectory: int  # index of the trajectory (line) it came from


def gold_completion(sample) -> str:
    """The text a teacher would write for an official step (data.StepSample).

    Step files hold no thoughts, so the <think> part is a short constant: the warm start then
    spends its updates on what the protocol needs (tags, the sub-question, the expert's name).
    A field starts with a space (the parsers strip it): a name copied from the prompt, where a
    space precedes it, is then the same tokens in the completion.
    """
    if sample.kind == "plan":
        query, experts = sample.gold["query"], sample.gold["retriever"]
        if str(query).lower() == "none":
            return "<think>Enough.</think><sub-question>None</sub-question><ret>None</ret>"
        name = " ".join(w.capitalize() for w in str(experts[0]).split())
        return f"<think>Next hop.</think><sub-question> {query}</sub-question><ret> {name}</ret>"
    answer = sample.gold if sample.kind == "answer" else sample.gold[0]
    return f"<think>Read.</think><answer> {answer}</answer>"


def step_images_present(samples: list[StepSample], path, skip_missing: bool) -> list[StepSample]:
    """The steps whose images exist. A missing image refuses the file, with the count and the first
    missing path, unless `skip_missing`: then those steps are left out, and how many is said."""
    missing = [s for s in samples if any(p["type"] == "image" and not Path(p["image"]).is_file() for p in s.parts)]
    if not missing:
        return samples
    with_image = sum(any(p["type"] == "image" for p in s.parts) for s in samples)
    first = next(p["image"] for p in missing[0].parts if p["type"] == "image" and not Path(p["image"]).is_file())
    if not skip_missing:
        raise UserError(f"{path}: {len(missing)} of {with_image} image steps have no image file (first: {first}); "
                        f"set image_root to the folder holding them (found by file name), or skip_missing_images")
    print(f"{path}: left out {len(missing)} of {with_image} image steps whose image is missing (skip_missing_images)")
    gone = {id(s) for s in missing}
    return [s for s in samples if id(s) not in gone]


# ----------------------------------------------------------------------------------------------
# The official benchmark files. Each maps to Questions; answer lists as the official scorer uses them.

BENCHMARKS = {  # name as in the official code: (file, id field or None, answer field type, has image)
    "2wikimultihopqa": ("2wikimultihopqa_val.jsonl", None, str, False),
    "dyn_vqa": ("DynVQA_en.202412.jsonl", "question_id", list, True),
    "infoseek": ("infoseek_val.jsonl", "data_id", list, True),
    "openwikitqa": ("openwikitqa_val.jsonl", None, str, False),
    "tabfact": ("tabfact_val.jsonl", None, str, False),
    "webqa": ("webqa_val.jsonl", None, list, True),
}


def _require(row: dict, name: str, kind, where: str):
    if name not in row:
        raise UserError(f"{where}: missing field {name!r}")
    if not isinstance(row[name], kind):
        raise UserError(f"{where}: field {name!r} must be {kind.__name__}, got {type(row[name]).__name__}")
    return row[name]


def load_benchmark(name: str, path: str | Path, image_root: str | Path | None = None) -> list[Question]:
    """Questions of one official benchmark file; errors name the file, line and field.

    Images are `image_root/<image_id>.jpg` and must exist when `image_root` is given.
    """
    if name not in BENCHMARKS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(BENCHMARKS)}")
    _, id_field, answer_kind, has_image = BENCHMARKS[name]
    questions = []
    for line, row in enumerate(read_jsonl(path), start=1):
        where = f"{path}:{line}"
        text = _require(row, "question", str, where)
        answer = _require(row, "answer", answer_kind, where)
        answers = answer if isinstance(answer, list) else [answer]
        qid = str(_require(row, id_field, (str, int), where)) if id_field else str(line)
        image = None
        if has_image and image_root is not None:
            image_id = _require(row, "image_id", (str, int), where)
            image = str(Path(image_root) / f"{image_id}.jpg")
            if not Path(image).exists():
                raise UserError(f"{where}: field 'image_id': image file {image} not found")
        answer_eval = _require(row, "answer_eval", list, where) if name == "infoseek" else None
        questions.append(Question(name, qid, text, answers, image, answer_eval))
    return questions


STEP_KINDS = {"ret": "plan", "ans": "answer"}


def load_step_file(path: str | Path, image_root: str | Path | None = None) -> list[StepSample]:
    """Every step of every trajectory of an official Step-GRPO file, as StepSamples.

    `<image>` in a step's problem becomes an image part (the k-th placeholder of a step is the
    trajectory's k-th image; a relative path is relative to the file's folder, or, with
    `image_root`, every image is that folder's file of the same name); a step without one stays
    text-only. The `ans` step whose gold is a list of answers is "final".
    """
    samples = []
    for line, row in enumerate(read_jsonl(path), start=1):
        where = f"{path}:{line}"
        images = _require(row, "images", list, where)
        steps = _require(row, "steps", list, where)
        for number, step in enumerate(steps):
            at = f"{where} step {number}"
            if not isinstance(step, dict):
                raise UserError(f"{at}: a step must be an object")
            step_type = _require(step, "step_type", str, at)
            if step_type not in STEP_KINDS:
                raise UserError(f"{at}: field 'step_type' must be 'ret' or 'ans', got {step_type!r}")
            kind = STEP_KINDS[step_type]
            gold = step.get("answer")
            if kind == "plan" and not (isinstance(gold, dict) and {"query", "retriever"} <= set(gold)):
                raise UserError(f"{at}: field 'answer' of a ret step must be {{'query', 'retriever'}}")
            if kind == "answer" and isinstance(gold, list):
                kind = "final"
            elif kind == "answer" and not isinstance(gold, str):
                raise UserError(f"{at}: field 'answer' of an ans step must be a string or a list")
            parts = _split_images(_require(step, "problem", str, at), images, at, Path(path).parent, image_root)
            samples.append(StepSample(kind, _require(step, "system", str, at), parts, gold, line - 1))
    return samples


def _split_images(problem: str, images: list, where: str, folder: Path, image_root=None) -> list[dict]:
    pieces = problem.split("<image>")
    if len(pieces) - 1 > len(images):
        raise UserError(f"{where}: field 'problem' has {len(pieces) - 1} <image> but 'images' has {len(images)}")
    parts = []
    for k, piece in enumerate(pieces):
        if k:
            image = Path(image_root) / Path(images[k - 1]).name if image_root else folder / images[k - 1]
            parts.append({"type": "image", "image": str(image)})  # absolute stays absolute
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def step_prompt(sample, tokenizer=None, cfg=None) -> tuple[protocol.StepPrompt, int]:
    """(system, user text, image) of an official step, capped at cfg.max_prompt_tokens; and how
    many passages the cap cut.

    The rule: passages are dropped from the last (the lowest ranked) until the prompt fits; its
    tokens are those of the rendered text plus, with an image, the most an image can take
    (max_pixels / 28²). A prompt still too long without passages is kept whole: the question and
    history are the step itself. Without a tokenizer or with the cap at 0, nothing is cut.
    """
    text = "".join(p["text"] for p in sample.parts if p["type"] == "text")
    images = [p["image"] for p in sample.parts if p["type"] == "image"]
    prompt = protocol.StepPrompt(sample.system, text, images[0] if images else None)
    if tokenizer is None or cfg is None or not cfg.max_prompt_tokens:
        return prompt, 0
    image_tokens = cfg.max_pixels // (28 * 28) if prompt.image else 0
    length = lambda user: len(tokenizer(protocol.render_prompt(prompt.system, user, False))["input_ids"]) + image_tokens
    cut, passages = 0, protocol.count_passages(text)
    while cut < passages and length(protocol.drop_last_passages(text, cut)) > cfg.max_prompt_tokens:
        cut += 1
    return protocol.StepPrompt(prompt.system, protocol.drop_last_passages(text, cut), prompt.image), cut


# ----------------------------------------------------------------------------------------------
# Question files: what world.py writes and the trainer reads


def question_to_row(q: Question) -> dict:
    return asdict(q)


def question_from_row(row: dict, where: str) -> Question:
    try:
        hops = [Hop(**h) for h in row.get("hops", [])]
        return Question(**{**row, "hops": hops})
    except TypeError as err:
        raise UserError(f"{where}: {err}") from None


def load_questions(path: str | Path) -> list[Question]:
    """Questions written by `write_world` (one JSON object per line)."""
    return [question_from_row(row, f"{path}:{i}") for i, row in enumerate(read_jsonl(path), start=1)]


# ----------------------------------------------------------------------------------------------
# inspect: a summary of any supported file


def inspect(path: str) -> str:
    name = Path(path).name
    for dataset, (filename, *_rest) in BENCHMARKS.items():
        if name == filename:
            questions = load_benchmark(dataset, path)
            return f"{dataset}: {len(questions)} questions; e.g. {questions[0].question!r} -> {questions[0].answers}"
    first = read_jsonl(path)[:1]
    if first and "steps" in first[0]:
        samples = load_step_file(path)
        kinds = Counter(s.kind for s in samples)
        with_image = sum(any(p["type"] == "image" for p in s.parts) for s in samples)
        names = list(EXPERT_NAMES.values())
        parsed = sum(protocol.parse_plan(gold_completion(s), names).valid if s.kind == "plan" else
                     protocol.parse_answer(gold_completion(s)).valid for s in samples)
        return (f"step file: {len({s.trajectory for s in samples})} trajectories, {len(samples)} steps "
                f"{dict(kinds)}, {with_image} steps with an image; gold completions that parse: "
                f"{parsed} of {len(samples)}")
    if first and "hops" in first[0]:
        questions = load_questions(path)
        labels = Counter(",".join(h.gold_experts) or "(none)" for q in questions for h in q.hops)
        return (f"mini-world questions: {len(questions)}, kinds {dict(Counter(q.kind for q in questions))}, "
                f"gold experts per hop {dict(labels)}")
    raise UserError(f"{path}: not a benchmark, step or question file this project knows")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    look = sub.add_parser("inspect", help="summarise a benchmark, step or question file")
    look.add_argument("file")
    args = parser.parse_args(argv)
    print(run_command("data.py inspect", lambda: inspect(args.file)))


if __name__ == "__main__":
    main()
