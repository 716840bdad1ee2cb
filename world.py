"""The mini knowledge world: a small, deterministic world in MoRE's formats, built offline.

  python world.py --out runs/world [--seed 0] [--towns 60] [--show-k 5] [--prompts release]

Towns, people, pictures, three expert corpora (passages, pictures with captions, tables), multi-hop
questions of seven kinds, and step files in the release's schema. Each fact lives where it makes one
expert necessary, so routing decides whether a hop can be answered.

The routing label of a hop is not a teacher's guess: every expert is asked the hop's sub-question
(with the question's image, if any), and the label is the set of experts whose top-k holds the gold
evidence. The released code only ever queried the expert its teacher chose (docs/PROTOCOL.md).
A training run builds the default world on first use (`ensure_world`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

import protocol
from config import UserError, run_command
from data import Hop, Question, question_to_row
from experts import EXPERT_NAMES, Expert, PixelImageEncoder, Query, TextEncoder, read_corpus, write_jsonl

# ----------------------------------------------------------------------------------------------
# The mini knowledge world. Deterministic from a seed. Each fact lives where it makes one expert
# necessary: founders and professions only in passages, populations only in tables, a town's
# identity only in its picture, and founding years in both passages and tables (two experts).

SYLLABLES = "ar bel cor dun el fen gal hol ist jor kel lum mor nor ost pel quin ras sol tor ul ven wyn zar".split()
PROFESSIONS = ["painter", "engineer", "sailor", "astronomer", "weaver", "physician", "poet", "architect"]
REGIONS = ["North", "South", "East", "West", "Coastal", "Highland"]
FEATURES = ["a stone tower", "a red bridge", "a windmill", "a harbour", "a clock square", "a domed hall"]
QUESTION_KINDS = ["text_fact", "table_number", "both_fact", "image_fact", "bridge", "compare", "image_bridge"]


@dataclass
class Town:
    name: str
    region: str
    founded: int
    founder: str
    population: dict  # year -> people
    feature: str


@dataclass
class Person:
    name: str
    profession: str
    born: int


def _names(rng: random.Random, n: int, parts: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()
        if name not in names:
            names.append(name)
    return names


def make_entities(seed: int, n_towns: int) -> tuple[list[Town], list[Person]]:
    rng = random.Random(seed)
    people = [Person(f"{first} {last}", rng.choice(PROFESSIONS), rng.randint(1500, 1800))
              for first, last in zip(_names(rng, n_towns, 2), _names(rng, n_towns, 2))]
    towns = []
    for name, founder in zip(_names(rng, n_towns, 3), people):
        base = rng.randint(1_000, 90_000)
        towns.append(Town(name, rng.choice(REGIONS), founder.born + rng.randint(25, 60), founder.name,
                          {2010: base, 2020: int(base * rng.uniform(0.8, 1.3))}, rng.choice(FEATURES)))
    return towns, people


def town_picture(name: str, seed: int, size: int = 64) -> Image.Image:
    """A distinct procedural picture per town: a coloured background with a few shapes."""
    rng = random.Random(f"{seed}/{name}")
    image = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = rng.randint(0, size - 16), rng.randint(0, size - 16)
        box = (x0, y0, x0 + rng.randint(10, 30), y0 + rng.randint(10, 30))
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def question_photo(picture: Image.Image, seed: int) -> Image.Image:
    """What a user would send: the same place, resized and with sensor noise (not the indexed file)."""
    pixels = np.asarray(picture.resize((56, 56), Image.BILINEAR), dtype=np.int16)
    noise = np.random.RandomState(seed).randint(-10, 11, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def world_corpora(towns: list[Town], people: list[Person], rows_per_table: int = 3) -> dict[str, list[dict]]:
    """The three corpora in experts.py's formats (image paths are filled in when pictures are saved)."""
    text = [{"id": f"town:{t.name}", "title": t.name,
             "text": f"{t.name} is a town in the {t.region} region, known for {t.feature}. It was founded "
                     f"in {t.founded} by {t.founder}."} for t in towns]
    text += [{"id": f"person:{p.name}", "title": p.name,
              "text": f"{p.name} was a {p.profession} born in {p.born}."} for p in people]
    tables = []
    for start in range(0, len(towns), rows_per_table):
        group = towns[start:start + rows_per_table]
        tables.append({"id": f"table:{start // rows_per_table}", "title": f"Towns: {', '.join(t.name for t in group)}",
                       "header": ["town", "founded", "population 2010", "population 2020"],
                       "rows": [[t.name, t.founded, t.population[2010], t.population[2020]] for t in group]})
    images = [{"id": f"image:{t.name}", "image": f"../images/{t.name}.png",
               "text": f"A picture of {t.name}, with {t.feature}."} for t in towns]
    return {"text": text, "table": tables, "image": images}


def table_of(towns: list[Town], town: Town, rows_per_table: int = 3) -> str:
    return f"table:{towns.index(town) // rows_per_table}"


def make_question(kind: str, qid: str, towns: list[Town], people: dict, rng: random.Random) -> Question:
    """One question of `kind` with its gold plan. Image questions name their photo `images/q-<qid>.png`."""
    t = rng.choice(towns)
    founder = people[t.founder]
    text_doc, table_doc, image_doc = f"town:{t.name}", table_of(towns, t), f"image:{t.name}"
    who = Hop(f"Who founded {t.name}?", founder.name, [text_doc])
    profession = Hop(f"What was the profession of {founder.name}?", founder.profession, [f"person:{founder.name}"])
    identify = Hop("Which town is shown in the picture?", t.name, [image_doc], uses_image=True)
    if kind == "text_fact":
        hops, question, answer = [who], f"Who founded {t.name}?", founder.name
    elif kind == "table_number":
        hops = [Hop(f"What was the population of {t.name} in 2020?", str(t.population[2020]), [table_doc])]
        question, answer = f"What was the population of {t.name} in 2020?", str(t.population[2020])
    elif kind == "both_fact":
        hops = [Hop(f"In what year was {t.name} founded?", str(t.founded), [text_doc, table_doc])]
        question, answer = f"In what year was {t.name} founded?", str(t.founded)
    elif kind == "image_fact":
        hops, question, answer = [identify, who], "Who founded the town in this picture?", founder.name
    elif kind == "bridge":
        hops, question = [who, profession], f"What was the profession of the founder of {t.name}?"
        answer = founder.profession
    elif kind == "image_bridge":
        hops, question = [identify, who, profession], "What was the profession of the founder of the town in this picture?"
        answer = founder.profession
    elif kind == "compare":
        u = rng.choice([x for x in towns if x is not t])
        hops = [Hop(f"What was the population of {x.name} in 2020?", str(x.population[2020]), [table_of(towns, x)])
                for x in (t, u)]
        question = f"Which town had more people in 2020, {t.name} or {u.name}?"
        answer = max((t, u), key=lambda x: x.population[2020]).name
    else:
        raise UserError(f"unknown question kind {kind!r}; kinds: {QUESTION_KINDS}")
    image = f"images/q-{qid}.png" if kind.startswith("image") else None
    return Question("mini_world", qid, question, [answer], image, kind=kind, hops=hops)


def make_questions(seed: int, towns: list[Town], people: list[Person], per_kind: int) -> list[Question]:
    """`per_kind` distinct questions of every kind (duplicates by text are redrawn)."""
    rng = random.Random(seed + 1)
    by_name = {p.name: p for p in people}
    questions, seen = [], set()
    for kind in QUESTION_KINDS:
        made, attempts = 0, 0
        while made < per_kind and attempts < 50 * per_kind:
            attempts += 1
            q = make_question(kind, f"{kind}-{made}", towns, by_name, rng)
            key = (q.question, tuple(h.sub_question for h in q.hops))
            if key not in seen:
                seen.add(key)
                questions.append(q)
                made += 1
    return questions


def split_questions(questions: list[Question], seed: int, fractions=(0.7, 0.15, 0.15)) -> dict[str, list[Question]]:
    """Train/validation/test per kind, so every kind is in every split; no question is in two."""
    splits = {"train": [], "validation": [], "test": []}
    rng = random.Random(seed + 2)
    for kind in QUESTION_KINDS:
        group = [q for q in questions if q.kind == kind]
        rng.shuffle(group)
        n_val = max(1, round(fractions[1] * len(group)))
        n_test = max(1, round(fractions[2] * len(group)))
        splits["validation"] += group[:n_val]
        splits["test"] += group[n_val:n_val + n_test]
        splits["train"] += group[n_val + n_test:]
    return splits


# ----------------------------------------------------------------------------------------------
# Gold experts by interaction: ask every expert, keep those whose top-k holds a gold document.


def hop_query(question: Question, hop: Hop, image_dir: Path | None):
    """The query each expert gets for a hop: the sub-question, with the question's image if any."""
    image = str(image_dir / question.image) if question.image and image_dir else question.image
    return Query(hop.sub_question, image)


def label_gold_experts(questions: list[Question], experts, k: int, image_dir: Path | None = None) -> None:
    """Fill `hop.gold_experts` for every hop: one batched search per expert over all hops."""
    hops = [(q, h) for q in questions for h in q.hops]
    queries = [hop_query(q, h, image_dir) for q, h in hops]
    for hop in (h for _, h in hops):
        hop.gold_experts = []
    for expert in experts:
        results = expert.search(queries, k)
        for (_, hop), hits in zip(hops, results):
            if {hit.doc_id for hit in hits} & set(hop.gold_docs):
                hop.gold_experts.append(expert.kind)


# ----------------------------------------------------------------------------------------------
# Step files in the official schema, from gold plans and real retrieval (teacher-forced states).


def step_file_rows(questions: list[Question], experts, show_k: int, image_dir: Path,
                   prompts: str = "release") -> tuple[list[dict], int]:
    """Official-schema trajectories, with the system prompts of style `prompts`; questions with a hop
    no expert can answer are left out (counted)."""
    by_kind = {e.kind: e for e in experts}
    system = protocol.system_prompts(experts, prompts)
    rows, skipped = [], 0
    for q in questions:
        if any(not h.gold_experts for h in q.hops):
            skipped += 1
            continue
        image = "<image>" if q.image else ""
        steps, history = [], []
        for hop in q.hops:
            names = [EXPERT_NAMES[kind].lower() for kind in hop.gold_experts]
            steps.append({"step_type": "ret", "system": system.plan, "problem": image + protocol.history_text(q.question, history),
                          "answer": {"query": hop.sub_question, "retriever": names}})
            hits = by_kind[hop.gold_experts[0]].search([hop_query(q, hop, image_dir)], show_k)[0]
            steps.append({"step_type": "ans", "system": system.answer, "answer": hop.sub_answer,
                          "problem": image + protocol.answer_user_text(hop.sub_question, hits, system.passages_header)})
            history.append((hop.sub_question, hop.sub_answer))
        steps.append({"step_type": "ret", "system": system.plan, "problem": image + protocol.history_text(q.question, history),
                      "answer": {"query": "none", "retriever": ["none"]}})
        steps.append({"step_type": "ans", "system": system.final,
                      "problem": image + protocol.final_user_text(q.question, history), "answer": list(q.answers)})
        rows.append({"images": [q.image] if q.image else [], "steps": steps})  # relative to the world folder
    return rows, skipped


# ----------------------------------------------------------------------------------------------
# Writing a world to disk


def write_world(out: Path, seed: int = 0, n_towns: int = 60, per_kind: int = 40) -> dict[str, list[Question]]:
    """Entities, pictures, corpora and question splits (no retrieval yet); deterministic for a seed."""
    towns, people = make_entities(seed, n_towns)
    corpora = world_corpora(towns, people)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for t in tqdm(towns, desc="pictures"):
        town_picture(t.name, seed).save(out / "images" / f"{t.name}.png")
    for kind, docs in corpora.items():
        write_jsonl(out / "corpora" / f"{kind}.jsonl", docs)
    questions = make_questions(seed, towns, people, per_kind)
    by_name = {t.name: t for t in towns}
    for q in questions:
        if q.image:
            town = by_name[q.hops[0].sub_answer]
            question_photo(town_picture(town.name, seed), seed).save(out / q.image)
    return split_questions(questions, seed)


def build_world(out: Path, seed: int = 0, n_towns: int = 60, per_kind: int = 40, k: int = 10, show_k: int = 5,
                prompts: str = "release"):
    """The whole embedded default: world, expert indexes, gold-expert labels, step files (their
    system prompts of style `prompts`), and world.json, which says how it was built."""
    splits = write_world(out, seed, n_towns, per_kind)
    (out / "world.json").write_text(json.dumps(dict(world_seed=seed, towns=n_towns, per_kind=per_kind, show_k=show_k,
                                                    prompts=prompts)))
    encoder, pixels = TextEncoder("minilm"), PixelImageEncoder()
    experts = []
    for kind in ("text", "image", "table"):
        docs = read_corpus(out / "corpora" / f"{kind}.jsonl", kind, images_anywhere=True)  # ../images/: ours
        expert = Expert.build(kind, docs, encoder, pixels if kind == "image" else None)
        expert.save(out / "indexes" / kind)
        experts.append(expert)
    for name, questions in splits.items():
        label_gold_experts(questions, experts, k, image_dir=out)
        write_jsonl(out / f"questions_{name}.jsonl", [question_to_row(q) for q in questions])
        rows, skipped = step_file_rows(questions, experts, show_k, out, prompts)
        write_jsonl(out / f"steps_{name}.jsonl", rows)
        print(f"{name}: {len(questions)} questions, {len(rows)} step trajectories ({skipped} left out: "
              f"a hop no expert could answer)")
    return splits


def ensure_world(cfg) -> None:
    """Build the default mini world on first use, so a fresh clone runs with no set-up step."""
    index_dir = Path(cfg.index_dir or Path(cfg.world_dir) / "indexes")
    if all((index_dir / kind / "expert.json").exists() for kind in cfg.experts):
        check_world_matches(cfg)
        return
    if index_dir != Path(cfg.world_dir) / "indexes":
        raise UserError(f"no expert indexes at {index_dir} (expected {', '.join(cfg.experts)}); "
                                f"build them with `python experts.py build` or point index_dir elsewhere")
    world = Path(cfg.world_dir)
    if world.exists():
        raise UserError(f"world_dir {world} exists but holds no complete world (no indexes for "
                        f"{', '.join(cfg.experts)}); delete it to rebuild, or point world_dir elsewhere")
    print(f"building the mini world in {world} (first run only; ~15 s)")
    # Built aside and renamed into place: a build killed halfway leaves only the .tmp folder,
    # which the next run replaces, never a world_dir that every later run would fail on.
    tmp = world.with_name(world.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_world(tmp, seed=cfg.world_seed, show_k=cfg.show_k, prompts=cfg.prompts)
    os.replace(tmp, world)


def check_world_matches(cfg) -> None:
    """A world built by build_world must have the config's world_seed, as its world.json records it;
    and, when the run reads the world's step files (steps mode or a warm start, without a steps_file
    of its own), the show_k and prompts they were written with."""
    built = Path(cfg.world_dir) / "world.json"
    if not built.exists():
        return  # experts built elsewhere (experts.py build): nothing recorded to compare
    how = json.loads(built.read_text())
    wanted = dict(world_seed=cfg.world_seed)
    if not cfg.steps_file and (cfg.mode == "steps" or cfg.sft_steps):
        wanted.update(show_k=cfg.show_k, prompts=cfg.prompts)
    differ = [f"{name} {how.get(name)!r} (config: {value!r})" for name, value in wanted.items() if how.get(name) != value]
    if differ:
        raise UserError(f"world_dir {cfg.world_dir} was built with {', '.join(differ)}: point world_dir elsewhere "
                        f"(a world is built there on first use)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the folder to build the world in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--towns", type=int, default=60)
    parser.add_argument("--per-kind", type=int, default=40, help="questions of each kind, before splitting")
    parser.add_argument("--show-k", type=int, default=5, help="passages shown in the step files' answer steps")
    parser.add_argument("--prompts", choices=protocol.PROMPT_STYLES, default="release",
                        help="system prompts of the step files: the release's, or compact (one line each)")
    args = parser.parse_args(argv)
    run_command("world.py", lambda: build_world(Path(args.out), args.seed, args.towns, args.per_kind,
                                                show_k=args.show_k, prompts=args.prompts))


if __name__ == "__main__":
    main()
