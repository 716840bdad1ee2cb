"""The official "F1-Recall" metric to the letter, with token F1 and exact match beside it, and the
scoring of a predictions file in the release's results format (`python eval.py score`).

The metric (docs/PROTOCOL.md, "The metric") is the VQA evaluation's answer normalisation
(Antol et al. 2015, the VQA-Challenge `vqaEval.py`: processPunctuation + processDigitArticle),
with MoRE's changes: only "an" and "the" are dropped, and tokens come from NLTK's word_tokenize.
Recall alone can be gamed (echoing the question scores ~82 on WebQA), so F1 and EM are always shown.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nltk.tokenize import word_tokenize

from config import UserError
from data import BENCHMARKS
from experts import read_jsonl

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
        id_field = BENCHMARKS[dataset][1]
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
