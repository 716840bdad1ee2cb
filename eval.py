"""Evaluation: the official "F1-Recall" metric to the letter, with token F1 and exact match beside it,
and the loop itself evaluated with routing baselines side by side.

  python eval.py score --dataset webqa --predictions results.jsonl
  python eval.py --config tiny.json [--checkpoint runs/train-tiny] --split test \
      --methods direct,single:text,single:image,single:table,random,oracle,policy

The official metric (docs/PROTOCOL.md, "The metric") is the VQA evaluation's answer normalisation
(Antol et al. 2015, the VQA-Challenge `vqaEval.py`: processPunctuation + processDigitArticle),
with MoRE's changes: only "an" and "the" are dropped, and tokens come from NLTK's word_tokenize.
Recall alone can be gamed (echoing the question scores ~82 on WebQA), so F1 and EM are always shown.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nltk.tokenize import word_tokenize
from tqdm import tqdm

import data
import more
import rollout
from config import UserError, load_config, run_command
from experts import build_experts, read_jsonl
from rollout import format_trace, image_path

# ----------------------------------------------------------------------------------------------
# Normalisation. Every quirk below is the reference behaviour, kept on purpose.

PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!"]
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The reference pattern is "(?!<=\d)(\.)(?!\d)": the first group is a mistyped look-behind (a
# look-ahead for the text "<=digit"), so in effect: a period not followed by a digit.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The reference calls PERIOD.sub("", text, re.UNICODE): re.UNICODE (= 32) lands in `count`,
# so at most 32 periods are deleted.
MAX_PERIODS_DELETED = int(re.UNICODE)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
DROPPED_ARTICLES = {"an", "the"}  # MoRE keeps "a" (the VQA original drops it too)
# The VQA evaluation's contraction table, written as "from:to" pairs.
CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're
whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd
whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're
whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've
wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've
youll:you'll youre:you're youve:you've""".split())
DROPPED_TOKENS = ",.?!:;'\""  # a token that is a substring of this is dropped


def strip_punctuation(text: str) -> str:
    """VQA processPunctuation: each mark is deleted or turned into a space, decided on the input."""
    out = text
    has_digit_comma = DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        # Decided on the whole original string: one spaced occurrence deletes every occurrence.
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out, count=MAX_PERIODS_DELETED)


def map_words(text: str) -> str:
    """VQA processDigitArticle (MoRE variant): number words → digits, drop an/the, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in DROPPED_ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalise(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return map_words(strip_punctuation(text))


@functools.lru_cache(maxsize=1 << 16)  # InfoSeek's range grids repeat the same golds thousands of times
def tokens(text: str) -> tuple[str, ...]:
    """Normalised word tokens; word_tokenize with preserve_line=True needs no punkt data."""
    return tuple(t for t in word_tokenize(normalise(text).lower(), preserve_line=True) if t not in DROPPED_TOKENS)


# ----------------------------------------------------------------------------------------------
# Scores against a list of golds


@dataclass
class Score:
    recall: float  # the official F1-Recall of this prediction: recall against the best-F1 gold
    f1: float  # the best token F1 over the golds
    exact: float  # 1 when the normalised tokens equal those of some gold
    accuracy: float  # 1 when the official recall is 1


def precision_recall_f1(pred, gold) -> tuple[float, float, float]:
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or common == 0:
        return 0.0, 0.0, 0.0
    precision, recall = common / len(pred), common / len(gold)
    return precision, recall, 2 * precision * recall / (precision + recall)


def score(prediction: str, golds: list[str]) -> Score:
    """F1-Recall: keep the gold with the strictly highest F1 (the first wins ties), report its recall."""
    pred = tokens(prediction) if isinstance(prediction, str) else ()
    if not pred:
        return Score(0.0, 0.0, 0.0, 0.0)
    best_f1, best_recall, exact = 0.0, 0.0, 0.0
    for gold in golds:
        gold_tokens = tokens(str(gold))
        _, recall, f1 = precision_recall_f1(pred, gold_tokens)
        if f1 > best_f1:
            best_f1, best_recall = f1, recall
        exact = max(exact, float(pred == gold_tokens))
    return Score(best_recall, best_f1, exact, float(best_recall == 1.0))


def infoseek_range_golds(low: float, high: float) -> list[str]:
    """InfoSeek numeric answers: a grid over [low, high] plus every integer in it (the release's rule).

    Its length grows with the range's width; scoring uses `range_golds_near`, which gives the same
    scores in time independent of the width. This one is the reference the tests compare it with.
    """
    step = _grid_step(low, high)
    grid = [str(round(v, 3)) for v in np.arange(low, high + step, step)]
    return grid + [str(i) for i in range(int(low), int(high) + 1)]


def _grid_step(low: float, high: float) -> float:
    span = high - low
    return 1 if span >= 50 else 0.1 if span >= 5 else 0.01 if span >= 1 else 0.001


def range_golds_near(low: float, high: float, prediction: str) -> list[str]:
    """The golds of `infoseek_range_golds(low, high)` that share a token with `prediction`, in order.

    A gold sharing no token with the prediction has F1 0 and can be neither the best-F1 gold nor an
    exact match, so leaving it out changes no score. A grid or integer gold's only token is its
    number without sign (normalisation turns '-' into a space), so each number the prediction holds
    names its candidates directly: grid index round((±x − low) / Δ) ± 1, and the integer ±x.
    The grid is rebuilt as numpy's arange fills it: v0 = low, v1 = low + step, v_i = low + i·(v1 − v0).
    """
    step = _grid_step(low, high)
    count, delta = max(0, math.ceil((high + step - low) / step)), (low + step) - low
    value = lambda i: low if i == 0 else low + step if i == 1 else low + i * delta
    grid, integers = set(), set()
    for token in tokens(prediction):
        try:
            x = float(token)
        except ValueError:
            continue
        for signed in {x, -x} if math.isfinite(x) else ():
            centre = (signed - low) / delta
            grid.update(i for i in range(math.floor(centre) - 1, math.ceil(centre) + 2) if 0 <= i < count)
            if token.isdigit() and int(low) <= int(signed) <= int(high):
                integers.add(int(signed))
    return [str(round(value(i), 3)) for i in sorted(grid)] + [str(i) for i in sorted(integers)]


def infoseek_range(item, where: str) -> tuple[float, float]:
    """An answer_eval range [low, high]: two finite numbers, low ≤ high, of a size a float prints plainly."""
    bounds = item.get("range")
    if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)):
        raise UserError(f"{where}: field 'answer_eval' range {str(bounds)[:60]} must be [low, high], two numbers")
    low, high = bounds
    if low > high or max(abs(low), abs(high)) >= 1e15:
        raise UserError(f"{where}: field 'answer_eval' range {bounds} must have low <= high, both below 1e15")
    return float(low), float(high)


def golds_of(dataset: str, row: dict, where: str = "", prediction: str | None = None) -> list[str]:
    """The gold list the official scorer uses for a benchmark row.

    With `prediction`, InfoSeek's numeric ranges give only the golds that can score it (see
    range_golds_near); without, the whole grid.
    """
    if dataset not in DATASET_GOLDS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_GOLDS)}")
    field = DATASET_GOLDS[dataset]
    if field not in row:
        raise UserError(f"{where}: missing field {field!r}")
    value = row[field]
    if dataset != "infoseek":
        return value if isinstance(value, list) else [value]
    golds = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict) and "range" in item:
            low, high = infoseek_range(item, where)
            golds += infoseek_range_golds(low, high) if prediction is None else range_golds_near(low, high, prediction)
        else:
            golds.append(str(item))
    return golds


DATASET_GOLDS = {"2wikimultihopqa": "answer", "dyn_vqa": "answer", "infoseek": "answer_eval",
                 "openwikitqa": "answer", "tabfact": "answer", "webqa": "answer"}

# ----------------------------------------------------------------------------------------------
# Scoring a predictions file in the official results format


def prediction_of(row: dict, where: str) -> str:
    """`llm_answer` as a string or as {"answer": …}."""
    if "llm_answer" not in row:
        raise UserError(f"{where}: missing field 'llm_answer'")
    answer = row["llm_answer"]
    if isinstance(answer, dict):
        if "answer" not in answer:
            raise UserError(f"{where}: field 'llm_answer' is an object without 'answer'")
        answer = answer["answer"]
    if answer is None:
        return ""
    if not isinstance(answer, str):
        raise UserError(f"{where}: field 'llm_answer' must be a string or {{'answer': string}}")
    return answer


def mean_scores(scores: list[Score]) -> dict[str, float]:
    return {name: 100 * float(np.mean([getattr(s, name) for s in scores]))
            for name in ("recall", "f1", "exact", "accuracy")}


# The release's validation files: their question counts, and how many of their rows repeat an
# earlier row's question (openwikitqa_val.jsonl holds 10 rows twice, answers and all).
OFFICIAL_QUESTIONS = {"2wikimultihopqa": 3000, "dyn_vqa": 715, "infoseek": 1000, "openwikitqa": 3000,
                      "tabfact": 1000, "webqa": 1000}
OFFICIAL_REPEATS = {"openwikitqa": 10}


def check_prediction_rows(dataset: str, rows: list[dict], path, subset: bool) -> None:
    """Each question scored once, and all of the release's questions unless `subset` says otherwise."""
    first_line, repeats = {}, []
    for line, row in enumerate(rows, start=1):
        id_field = data.BENCHMARKS[dataset][1]
        key = row.get(id_field) if id_field else (row.get("question"), row.get("image_id"), row.get(DATASET_GOLDS[dataset]))
        key = json.dumps(key, sort_keys=True, default=str)
        if key in first_line:
            repeats.append((line, first_line[key]))
        first_line.setdefault(key, line)
    if len(repeats) > OFFICIAL_REPEATS.get(dataset, 0):
        line, first = repeats[OFFICIAL_REPEATS.get(dataset, 0)]
        raise UserError(f"{path}:{line}: repeats the question of line {first} ({len(repeats)} repeated rows, the "
                        f"release's file has {OFFICIAL_REPEATS.get(dataset, 0)}); each question is scored once")
    if len(rows) != OFFICIAL_QUESTIONS[dataset] and not subset:
        raise UserError(f"{path}: {len(rows)} predictions for the {OFFICIAL_QUESTIONS[dataset]} questions of the "
                        f"release's {dataset} file; add --subset to score part of it on purpose")


def score_file(dataset: str, path: str | Path, subset: bool = False) -> dict[str, float]:
    """Mean scores of an official-format predictions file (each row: the benchmark row + llm_answer)."""
    if dataset not in DATASET_GOLDS:
        raise UserError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_GOLDS)}")
    rows = read_jsonl(path)
    if not rows:
        raise UserError(f"{path}: no predictions (the file is empty)")
    check_prediction_rows(dataset, rows, path, subset)
    scores = []
    for line, row in enumerate(rows, start=1):
        where = f"{path}:{line}"
        prediction = prediction_of(row, where)
        scores.append(score(prediction, golds_of(dataset, row, where, prediction)))
    return dict(mean_scores(scores), n=len(scores), of=OFFICIAL_QUESTIONS[dataset])


def print_scores(result: dict) -> None:
    print(f"F1-Recall: {result['recall']:.2f}")
    print(f"Token F1: {result['f1']:.2f}")
    print(f"Exact match: {result['exact']:.2f}")
    print(f"Accuracy (recall = 1): {result['accuracy']:.2f}")
    print(f"Questions: {result['n']}" + (f" (a subset of {result['of']})" if result["n"] != result["of"] else ""))


# ----------------------------------------------------------------------------------------------
# Evaluating the loop: every method on the same questions, greedy, with its traces and diagnostics.
# The policy always writes the plans (sub-question, when to stop) and the answers; a method only
# decides which expert each valid plan asks, so the methods differ in routing and nothing else.

METHODS_HELP = "direct, single:<kind>, random, oracle, policy (kinds: the config's experts)"


def parse_methods(text: str, kinds: list[str]) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = ["direct", "random", "oracle", "policy"] + [f"single:{k}" for k in kinds]
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {unknown or text!r}; known: {', '.join(known)}")
    return methods


def make_router(method: str, kinds: list[str], seed: int, gold_sub_questions: bool):
    """The rollout.Router of a method; None for `policy` with its own sub-questions."""
    rng = random.Random(seed)

    def gold_hop(gold_hops, hop):
        return gold_hops[min(hop, len(gold_hops) - 1)]

    def choose(gold_hops, hop, chosen):
        if method.startswith("single:"):
            return [method.split(":", 1)[1]]
        if method == "random":
            return [rng.choice(kinds)]
        if method == "oracle":
            if not gold_hops:
                raise UserError("method 'oracle' needs gold plans with gold experts (the mini world has them)")
            labelled = [k for k in gold_hop(gold_hops, hop).gold_experts if k in kinds]
            return labelled[:1] or chosen  # no expert holds this hop's evidence: keep the policy's choice
        return chosen

    def route(gold_hops, hop, sub_question, chosen):
        if gold_sub_questions and gold_hops:
            sub_question = gold_hop(gold_hops, hop).sub_question
        return sub_question, choose(gold_hops, hop, chosen)
    return None if method == "policy" and not gold_sub_questions else route


def gold_reader_sampler(questions, image_root=None):
    """A scripted stand-in for the policy that isolates routing: it follows the gold plan (gold
    sub-questions, then None/None) and answers a sub-question with its gold sub-answer only when
    that string is in the passages shown, else "unknown"; the final answer is the gold one only
    when every sub-answer was found. So a trajectory is right exactly when routing found all the
    evidence. Its own expert choice is a placeholder: use it with a routing method, not `policy`.
    """
    by_question = {(image_path(q.image, image_root), q.question): q for q in questions}
    sub_answers = {(image_path(q.image, image_root), h.sub_question): h.sub_answer for q in questions for h in q.hops}
    plan = "<think>Follow the gold plan.</think><sub-question>{}</sub-question><ret>{}</ret>"

    def origin(user: str) -> str:
        return user.split("\n", 1)[0].removeprefix("Origin question: ")

    def answers_so_far(user: str) -> list[str]:
        return [line.split(": ", 1)[1] for line in user.split("\n") if re.match(r"Answer\d+: ", line)]

    def write(prompt, kind: str) -> str:
        if kind == "plan":
            question = by_question[(prompt.image, origin(prompt.user))]
            hop = len(answers_so_far(prompt.user))
            if hop >= len(question.hops):
                return plan.format("None", "None")
            return plan.format(question.hops[hop].sub_question, "Text Retriever")
        if kind == "answer":
            passages, _, sub_question = prompt.user.rpartition("Question: ")
            gold = sub_answers.get((prompt.image, sub_question))
            found = gold is not None and gold.lower() in passages.lower()
            return f"<think>Read the passages.</think><answer>{gold if found else 'unknown'}</answer>"
        question = by_question[(prompt.image, origin(prompt.user))]
        answered = answers_so_far(prompt.user)
        right = len(answered) == len(question.hops) and all(a == h.sub_answer for a, h in zip(answered, question.hops))
        return f"<think>Combine the answers.</think><answer>{question.answers[0] if right else 'unknown'}</answer>"

    def sample(prompts, kind):
        return [([], more.Completion(ids=[], logprobs=[], text=write(p, kind), truncated=False)) for p in prompts]
    return sample


def question_golds(question, prediction: str) -> list[str]:
    """The golds the official scorer uses for `prediction` (InfoSeek: answer_eval with its ranges)."""
    if question.answer_eval is None:
        return [str(a) for a in question.answers]
    return golds_of("infoseek", {"answer_eval": question.answer_eval}, question.qid, prediction)


def needs_several_experts(question) -> bool:
    """No single expert holds the evidence of every gold hop (gold-expert labels from data.py)."""
    labelled = [set(h.gold_experts) for h in question.hops]
    return bool(labelled) and all(labelled) and not set.intersection(*labelled)


def question_record(question, trajectory, method: str, show_k: int) -> dict:
    """One prediction with its score, routing and evidence diagnostics, and a compact trace."""
    plans = [s for s in trajectory.steps if s.kind == "plan" and s.valid and not s.stop]
    rounds = [s.experts for s in plans]
    shown = {i for s in plans for c in s.calls for i in c.hit_ids[:show_k]}
    hops = question.hops
    found = [bool(set(h.gold_docs) & shown) for h in hops]
    routed = [hops[s.hop].routed_by(s.experts)
              for s in plans if s.hop < len(hops) and hops[s.hop].gold_experts]
    result = score(trajectory.final_answer, question_golds(question, trajectory.final_answer))
    return dict(dataset=question.dataset, qid=question.qid, kind=question.kind, method=method,
                question=question.question, golds=list(question.answers), prediction=trajectory.final_answer,
                **{k: getattr(result, k) for k in ("recall", "f1", "exact", "accuracy")},
                several_experts=needs_several_experts(question), rounds=rounds,
                expert_calls=sum(len(s.calls) for s in plans),
                call_ms=[c.ms for s in plans for c in s.calls],
                switches=sum(a != b for a, b in zip(rounds, rounds[1:])),
                routing=routed, evidence_recall=float(np.mean(found)) if hops else None,
                valid_steps=all(s.valid for s in trajectory.steps), trace=format_trace(trajectory))


def run_methods(cfg, questions, methods: list[str], checkpoint: str | None, gold_sub_questions: bool,
                out_dir: Path, image_root=None, gold_reader: bool = False) -> list[dict]:
    """Every method on every question (greedy, G=1); records written to predictions.jsonl.

    `gold_reader` replaces the policy with gold_reader_sampler (routing alone is measured).
    """
    experts = build_experts(cfg)
    if gold_reader:
        if "policy" in methods:
            raise UserError("method 'policy' needs the model: the gold reader has no routing of its own")
        sampler = gold_reader_sampler(questions, image_root)
    else:
        policy = more.load_policy(cfg, adapter_dir=checkpoint)
        policy.model.eval()
        sampler = rollout.policy_sampler(policy, dataclasses.replace(cfg, temperature=0.0))
    kinds = [e.kind for e in experts]
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out_dir / "predictions.jsonl", "w") as out:
        for method in methods:
            router = make_router(method, kinds, cfg.seed, gold_sub_questions)
            rounds = 0 if method == "direct" else cfg.max_steps
            batch = 8  # questions per batched rollout: one progress tick each
            for start in tqdm(range(0, len(questions), batch), desc=method, unit="batch"):
                chunk = questions[start:start + batch]
                trajectories = rollout.rollout(sampler, experts, chunk, 1, rounds, cfg.retrieve_k, cfg.show_k,
                                               image_root=image_root, router=router)
                for question, trajectory in zip(chunk, trajectories):
                    record = question_record(question, trajectory, method, cfg.show_k)
                    out.write(json.dumps(record) + "\n")
                    records.append(record)
    return records


def summarise(records: list[dict]) -> dict:
    """Per dataset and method: the metric, routing diagnostics, and the several-expert subset."""
    mean = lambda values: float(np.mean(values)) if values else None
    table = {}
    for (dataset, method) in dict.fromkeys((r["dataset"], r["method"]) for r in records):
        rows = [r for r in records if r["dataset"] == dataset and r["method"] == method]
        several = [r for r in rows if r["several_experts"]]
        usage = {}
        for r in rows:
            for index, kinds in enumerate(r["rounds"]):
                for kind in kinds:
                    usage.setdefault(index + 1, {}).setdefault(kind, 0)
                    usage[index + 1][kind] += 1
        switchable = [r for r in rows if len(r["rounds"]) > 1]
        table[f"{dataset}/{method}"] = dict(
            dataset=dataset, method=method, n=len(rows),
            **{k: 100 * mean([r[k] for r in rows]) for k in ("recall", "f1", "exact", "accuracy")},
            evidence_recall=_percent(mean([r["evidence_recall"] for r in rows if r["evidence_recall"] is not None])),
            routing_accuracy=_percent(mean([x for r in rows for x in r["routing"]])),
            steps_per_question=mean([len(r["rounds"]) for r in rows]),
            expert_calls_per_question=mean([r["expert_calls"] for r in rows]),
            expert_switch_rate=mean([r["switches"] / (len(r["rounds"]) - 1) for r in switchable]),
            expert_ms_per_call=mean([ms for r in rows for ms in r["call_ms"]]),
            usage_by_step=usage, valid_trajectories=mean([r["valid_steps"] for r in rows]),
            several_experts=dict(n=len(several), recall=_percent(mean([r["recall"] for r in several])),
                                 evidence_recall=_percent(mean([r["evidence_recall"] for r in several
                                                                if r["evidence_recall"] is not None]))))
    return table


def _percent(x):
    return None if x is None else 100 * x


def summary_markdown(table: dict, header: str) -> str:
    fmt = lambda x, spec=".1f": "–" if x is None else format(x, spec)
    lines = [header, "", "| dataset | method | n | F1-Recall | F1 | EM | Acc | evidence recall | routing acc | "
             "steps/q | calls/q | switch rate | ms/call | several-expert n | several-expert F1-Recall | "
             "several-expert evidence |", "|" + "---|" * 16]
    for row in table.values():
        several = row["several_experts"]
        lines.append(f"| {row['dataset']} | {row['method']} | {row['n']} | {fmt(row['recall'])} | {fmt(row['f1'])} | "
                     f"{fmt(row['exact'])} | {fmt(row['accuracy'])} | {fmt(row['evidence_recall'])} | "
                     f"{fmt(row['routing_accuracy'])} | {fmt(row['steps_per_question'], '.2f')} | "
                     f"{fmt(row['expert_calls_per_question'], '.2f')} | {fmt(row['expert_switch_rate'], '.2f')} | "
                     f"{fmt(row['expert_ms_per_call'], '.1f')} | {several['n']} | {fmt(several['recall'])} | "
                     f"{fmt(several['evidence_recall'])} |")
    lines += ["", "Expert usage by step index (calls):", ""]
    for row in table.values():
        usage = "; ".join(f"step {i}: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
                          for i, kinds in sorted(row["usage_by_step"].items()))
        lines.append(f"- {row['dataset']}/{row['method']}: {usage or 'no expert calls'}")
    return "\n".join(lines) + "\n"


def load_eval_questions(cfg, split: str, benchmark: str | None, questions_file: str | None, image_root: str | None,
                        limit: int | None):
    """The mini world's split (built on first use), or an official benchmark file."""
    if benchmark:
        if not questions_file:
            raise UserError("--benchmark needs --questions (the official .jsonl file)")
        questions, root = data.load_benchmark(benchmark, questions_file, image_root), None
    else:
        data.ensure_world(cfg)
        path = Path(cfg.world_dir) / f"questions_{split}.jsonl"
        if not path.exists():
            raise UserError(f"no split {split!r}: {path} does not exist (splits: train, validation, test)")
        questions, root = data.load_questions(path), cfg.world_dir
    return questions[:limit] if limit else questions, root


def evaluate_command(args, overrides) -> None:
    cfg = load_config(args.config, overrides)
    methods = parse_methods(args.methods, list(cfg.experts))
    questions, root = load_eval_questions(cfg, args.split, args.benchmark, args.questions, args.image_root, args.limit)
    out_dir = Path(args.out)
    gold_reader = args.policy == "gold-reader"
    records = run_methods(cfg, questions, methods, args.checkpoint, args.gold_sub_questions, out_dir, root,
                          gold_reader)
    table = summarise(records)
    who = ("the gold reader (gold plan; a sub-answer only when the passages shown contain it)" if gold_reader else
           f"the policy, checkpoint {args.checkpoint or 'none (untrained)'}, greedy, sub-questions from "
           f"{'the gold plan' if args.gold_sub_questions else 'the policy'}")
    header = f"`python eval.py {' '.join(args.argv)}`: {len(questions)} questions; steps written by {who}"
    markdown = summary_markdown(table, header)
    (out_dir / "summary.md").write_text(markdown)
    (out_dir / "summary.json").write_text(json.dumps(table, indent=1))
    print(markdown)
    print(f"predictions and traces: {out_dir / 'predictions.jsonl'}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        scoring = argparse.ArgumentParser(prog="eval.py score", description="score an official-format predictions file")
        scoring.add_argument("--dataset", required=True, help=", ".join(DATASET_GOLDS))
        scoring.add_argument("--predictions", required=True)
        scoring.add_argument("--subset", action="store_true", help="score fewer questions than the release's file on purpose")
        args = scoring.parse_args(argv[1:])
        run_command("eval.py score", lambda: print_scores(score_file(args.dataset, args.predictions, args.subset)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a JSON config, e.g. tiny.json")
    parser.add_argument("--checkpoint", default=None, help="a trained adapter: run folder, checkpoint or adapter")
    parser.add_argument("--split", default="test", help="mini-world split: train, validation or test")
    parser.add_argument("--methods", default="direct,single:text,single:image,single:table,random,oracle,policy",
                        help=METHODS_HELP)
    parser.add_argument("--gold-sub-questions", action="store_true",
                        help="ask the experts the gold plan's sub-questions: isolates routing from the policy's writing")
    parser.add_argument("--policy", choices=["model", "gold-reader"], default="model",
                        help="gold-reader: a scripted gold plan and string-matching reader, to measure routing alone")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions only")
    parser.add_argument("--benchmark", default=None, help="an official dataset name instead of the mini world")
    parser.add_argument("--questions", default=None, help="the official .jsonl file for --benchmark")
    parser.add_argument("--image-root", default=None, help="folder of <image_id>.jpg for --benchmark")
    parser.add_argument("--out", default="runs/eval", help="where predictions.jsonl and summary.{md,json} go")
    args, overrides = parser.parse_known_args(argv)
    args.argv = argv
    run_command("eval.py", lambda: evaluate_command(args, overrides))


if __name__ == "__main__":
    main()
