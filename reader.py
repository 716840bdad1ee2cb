"""The tiny reader: the tiny Qwen2.5-VL taught to read, so that routing decides its answers.

  python reader.py --config reader.json          # train it: models/tiny-reader (~1.5 h on 2 CPU cores)
  python reader.py --config reader.json --check  # how well the model at out_dir reads, on unseen worlds

A random tiny model cannot write a sub-question or copy an answer, so routing makes no difference to
what it answers. This command teaches it in two stages, all in full precision. Stage 1 has three
phases:
  1. induction: write a random sequence of name pieces again. Only an attention head that finds
     where the current token appeared and copies the next one lowers this loss, and steps alone
     never grew one (docs/RESULTS.md, "The tiny reader");
  2. copy tasks in the answer format: repeat a list, give the value of a key;
  3. the steps of questions from freshly generated mini worlds (world.py's entities and questions,
     new towns and people for every question), so that nothing can be memorised.
Stage 2 goes on with the steps, now with look-alike names among the passages (as real retrieval
returns them) and every hop also answered from an expert that holds its evidence.
Every routing label is drawn uniformly among the experts, and the passages shown are those the
named expert would return, with "unknown" as the answer when they do not hold it. The reader thus
learns to read whatever it is shown and nothing about whom to ask: routing is left to Step-GRPO.

Retrieval is simulated here (an expert returns its documents that name an entity of the
sub-question, then others), which costs nothing per world; the real experts run in Step-GRPO and
in evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
import more
import protocol
import rollout
import world
from config import Config, UserError, command_config, run_command
from data import StepSample
from experts import EXPERT_NAMES, Hit, document_text, read_jsonl, write_jsonl
from metric import score
from presets import materialize_random_model
from step_grpo import make_optimizer, sft_update, supervised_update, warmup_cosine

TOWNS_PER_WORLD = 12  # a generated world: small, so that a step's other passages come from its own world
PHOTOS = 16  # question photos on disk; their content is the image expert's business, not the reader's
UNKNOWN = "unknown"  # the sub-answer when the passages shown do not hold it
COPY_TASK = -1  # the `trajectory` of a copy-task step (it belongs to none)
SYLLABLES_LONGEST_FIRST = sorted(world.SYLLABLES, key=len, reverse=True)  # a name's first syllable: the longest match

# ----------------------------------------------------------------------------------------------
# Generated worlds with simulated retrieval


def syllable_forms() -> list[str]:
    """Every way a syllable of a world name is written: inside a name, starting it, after a space."""
    return [form for syllable in world.SYLLABLES for form in (syllable, syllable.capitalize(), " " + syllable.capitalize())]


def name_text() -> list[str]:
    """The world's syllables as words, for the tokenizer: each syllable of a name becomes one token,
    so copying a name is copying a few tokens that every name shares, not rare whole-name pieces."""
    return syllable_forms() * 50


def compact_prompts(cfg) -> protocol.SystemPrompts:
    """The compact system prompts for the configured experts, which the reader is trained and checked on."""
    return protocol.system_prompts([(EXPERT_NAMES[k], "") for k in cfg.experts], "compact")


class GeneratedWorld:
    """A fresh mini world: entities, corpora and questions, with simulated retrieval over its corpora."""

    def __init__(self, seed: int, look_alikes: bool = False):
        self.seed, self.look_alikes = seed, look_alikes
        towns, people = world.make_entities(seed, TOWNS_PER_WORLD)
        self.towns, self.people = towns, {p.name: p for p in people}
        self.docs = {kind: [(doc["id"], document_text(doc, kind)) for doc in docs]
                     for kind, docs in world.world_corpora(towns, people).items()}
        self.names = [t.name for t in towns] + list(self.people)
        self.rng = random.Random(seed)

    def question(self):
        kind = self.rng.choice(world.QUESTION_KINDS)
        return world.make_question(kind, f"{self.seed}-{kind}", self.towns, self.people, self.rng)

    def search(self, kind: str, sub_question: str, pictured: str | None, show_k: int) -> list[Hit]:
        """What expert `kind` shows: its documents naming an entity of the sub-question (the image
        expert also finds the pictured town's caption from the photo) in random order, then others;
        with `look_alikes`, the others naming a look-alike of the entity come first, as they do from
        the real text encoder (for "Who founded Holbelmor?": Holbelmor's passage, then Holistsol's)."""
        entities = [n for n in self.names if n in sub_question]
        keys = entities + ([f"A picture of {pictured},"] if kind == "image" and pictured else [])
        docs = self.docs[kind]
        naming = [d for d in docs if any(k in d[1] for k in keys)]
        others = [d for d in docs if d not in naming]
        self.rng.shuffle(naming)
        self.rng.shuffle(others)
        if self.look_alikes:
            alike = [n for n in self.names if n not in entities and looks_like(n, entities)]
            others.sort(key=lambda d: not any(n in d[1] for n in alike))  # stable: look-alikes first
        return [Hit(doc_id, text, 0.0, kind) for doc_id, text in (naming + others)[:show_k]]


def looks_like(name: str, entities: list[str]) -> bool:
    """Whether a word of `name` starts with the first syllable of an entity (Holistsol, Holbelmor)."""
    firsts = [next(s for s in SYLLABLES_LONGEST_FIRST if e.lower().startswith(s)) for e in entities]
    return any(word.lower().startswith(f) for word in name.split() for f in firsts)


def gold_kinds(hop) -> list[str]:
    """The experts whose corpus holds a hop's evidence, from its document ids (world.world_corpora)."""
    prefix = {"town": "text", "person": "text", "table": "table", "image": "image"}
    return sorted({prefix[doc.split(":", 1)[0]] for doc in hop.gold_docs})


# ----------------------------------------------------------------------------------------------
# Step examples: one plan, sub-answer or final step of a question, with the reader's gold completion.


@dataclass
class Walk:
    """A question's hops as a reader would go through them, each answered right or "unknown"."""
    sub_questions: list[str]
    answers: list[str]


def walk(question, right: list[bool]) -> Walk:
    """The sub-questions written (a hop naming an earlier answer names what was answered) and answers."""
    sub_questions, answers = [], []
    for hop, ok in zip(question.hops, right):
        sub_question = hop.sub_question
        for earlier_hop, answered in zip(question.hops, answers):
            sub_question = sub_question.replace(earlier_hop.sub_answer, answered)
        sub_questions.append(sub_question)
        wrote_gold_question = sub_question == hop.sub_question
        answers.append(hop.sub_answer if ok and wrote_gold_question else UNKNOWN)
    return Walk(sub_questions, answers)


def step_examples(w: GeneratedWorld, prompts: protocol.SystemPrompts, photos: list[str], cfg,
                  every_hop: bool = False) -> list[StepSample]:
    """Every step of one question, walked with random routing: plans, sub-answers, the final answer;
    then the first hop (`every_hop`: each hop) answered again from an expert holding its evidence."""
    q = w.question()
    image = [{"type": "image", "image": w.rng.choice(photos)}] if q.image else []
    pictured = q.hops[0].sub_answer if q.image else None
    experts = [w.rng.choice(cfg.experts) for _ in q.hops]
    # Placeholders, replaced hop by hop below. Their searches only shuffle the world's RNG, but they
    # are part of the data stream that made stage 1 of models/tiny-reader: removing them changes it.
    shown = [w.search(kind, "", None, cfg.show_k) for kind in experts]
    right = []
    for i, (hop, kind) in enumerate(zip(q.hops, experts)):
        sub_question = walk(q, right + [True]).sub_questions[i]
        shown[i] = w.search(kind, sub_question, pictured, cfg.show_k)
        right.append(bool(set(hop.gold_docs) & {h.doc_id for h in shown[i]}))
    path = walk(q, right)
    samples = []
    for i, kind in enumerate(experts):
        history = protocol.history_text(q.question, list(zip(path.sub_questions[:i], path.answers[:i])))
        gold_plan = {"query": path.sub_questions[i], "retriever": [EXPERT_NAMES[kind]]}
        samples.append(StepSample("plan", prompts.plan, image + _text(history), gold_plan, 0))
        user = protocol.answer_user_text(path.sub_questions[i], shown[i], prompts.passages_header)
        samples.append(StepSample("answer", prompts.answer, image + _text(user), path.answers[i], 0))
    hops = list(zip(path.sub_questions, path.answers))
    stop = {"query": "None", "retriever": ["None"]}
    samples.append(StepSample("plan", prompts.plan, image + _text(protocol.history_text(q.question, hops)), stop, 0))
    final = q.answers[0] if path.answers == [h.sub_answer for h in q.hops] else UNKNOWN
    samples.append(StepSample("final", prompts.final, image + _text(protocol.final_user_text(q.question, hops)),
                              [final], 0))
    # Random routing finds the evidence about one time in three: more answers, shown what an
    # expert holding the evidence returns, so that copying is not the rare case.
    return samples + [gold_expert_answer(w, hop, pictured, image, prompts, cfg)
                      for hop in (q.hops if every_hop else q.hops[:1])]


def gold_expert_answer(w: GeneratedWorld, hop, pictured, image: list[dict], prompts, cfg) -> StepSample:
    """A hop's gold sub-question answered from the passages of an expert holding its evidence."""
    kind = w.rng.choice(gold_kinds(hop))
    hits = w.search(kind, hop.sub_question, pictured, cfg.show_k)
    found = hop.sub_answer if set(hop.gold_docs) & {h.doc_id for h in hits} else UNKNOWN
    user = protocol.answer_user_text(hop.sub_question, hits, prompts.passages_header)
    return StepSample("answer", prompts.answer, image + _text(user), found, 0)


def _text(text: str) -> list[dict]:
    return [{"type": "text", "text": text}]


# A copy curriculum: the same answer format on two bare tasks, repeating a list and looking up a key
# in a list. The tiny model does not find copying inside the long step prompts on its own (a probe:
# 400 updates on steps alone left every sub-answer "unknown"); these tasks teach the attention to
# find a token seen earlier and write what it, or what follows it, says.

def _item(rng: random.Random, hard: bool) -> str:
    """A name of one syllable (easy), or of 1-3 syllables, sometimes two words, or a number (hard)."""
    if not hard:
        return rng.choice(world.SYLLABLES).capitalize()
    if rng.random() < 0.25:
        return str(rng.randint(1000, 99999))
    words = rng.choice((1, 1, 2))
    return " ".join("".join(rng.choice(world.SYLLABLES) for _ in range(rng.randint(1, 3))).capitalize()
                    for _ in range(words))


def copy_examples(rng: random.Random, n: int, prompts: protocol.SystemPrompts, hard: float = 1.0) -> list[StepSample]:
    """`n` copy-task steps: repeat a list of names and numbers, or give the value a key has in a list.
    A share `hard` of them use long names and numbers; the others one-syllable names, which a random
    model learns to copy first (a probe: 4-name lists copied from about update 400 on)."""
    samples = []
    for _ in range(n):
        hard_one = rng.random() < hard
        items = [_item(rng, hard_one) for _ in range(rng.randint(2, 5))]
        if rng.random() < 0.5:
            user, gold = "Repeat: " + ", ".join(items), ", ".join(items)
        else:
            values = [_item(rng, hard_one) for _ in items]
            pick = rng.randrange(len(items))
            lines = "\n".join(f"ter-{i}: {k} is {v}." for i, (k, v) in enumerate(zip(items, values)))
            user, gold = f"{prompts.passages_header}{lines}\n\n Question: What is {items[pick]}?", values[pick]
        samples.append(StepSample("answer", prompts.answer, _text(user), gold, COPY_TASK))
    return samples


def photo_files(folder: Path) -> list[str]:
    """PHOTOS question photos of generated towns, written once."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(PHOTOS):
        path = folder / f"photo-{i}.png"
        if not path.exists():
            world.question_photo(world.town_picture(f"photo-{i}", seed=i), seed=i).save(path)
        paths.append(str(path))
    return paths


def example_batch(cfg, prompts, photos, seed: int, copy_share: float = 0.0, hard: float = 1.0,
                  stage: int = 1) -> list[StepSample]:
    """At least cfg.sft_batch steps: a `copy_share` of copy-task steps (a share `hard` of them hard),
    then the steps of questions each from its own freshly generated world. Stage 2 shows look-alike
    passages, answers every hop from an expert holding its evidence, and keeps the plan and final
    steps of one world in STAGE2_ALL_STEPS only: stage 1 left the plans right and the answers not."""
    n_copy = round(copy_share * cfg.sft_batch)
    batch, world_seed = copy_examples(random.Random(seed), n_copy, prompts, hard), seed
    while len(batch) < cfg.sft_batch:
        w = GeneratedWorld(world_seed, look_alikes=stage == 2)
        steps = step_examples(w, prompts, photos, cfg, every_hop=stage == 2)
        if stage == 2 and world_seed % STAGE2_ALL_STEPS:
            steps = [s for s in steps if s.kind == "answer"]
        batch += steps
        world_seed += 1
    return batch


# ----------------------------------------------------------------------------------------------
# Training: the whole language model in full precision, on the warm start's supervised update.


def load_trainable(cfg, model_dir: Path) -> more.Policy:
    """The model at `model_dir` with its language model and head trainable (no LoRA, no 4-bit)."""
    cfg = dataclasses.replace(cfg, model_name=str(model_dir), load_in_4bit=False)
    model, processor, device = more.load_base_model(cfg)
    model.model.language_model.requires_grad_(True)
    model.lm_head.requires_grad_(True)
    suppress = [processor.tokenizer.convert_tokens_to_ids(t) for t in more.VISION_TOKENS]
    return more.Policy(model, processor, device, suppress)


# The schedule of stage 1: shares of cfg.sft_steps. Measured in the run that made its weights
# (docs/RESULTS.md): the induction loss fell from 3.6 to 0.7 between updates 300 and 600, copy tasks
# were 72% exact 400 updates into their phase.
INDUCTION_PHASE = 0.4  # the first 40% of the updates: repeated random sequences of name pieces
COPY_PHASE = 0.55  # then, up to 55%: the copy tasks alone, easy to hard
MIXED_COPY_SHARE = 0.25  # after them, this share of every batch is still copy tasks
CHECK_EVERY = 500  # updates between two quick reading checks in the log
# Stage 2 starts from stage 1's weights with a fresh optimiser. Stage 1's reader copied a look-alike
# name from the second passage when evaluated with the real experts (docs/RESULTS.md), because its
# simulated retrieval never put one there; stage 2 does, and answers every hop from a gold expert.
STAGE2_SHARE = 0.3  # its updates, as a share of cfg.sft_steps (1,200 for reader.json)
STAGE2_ALL_STEPS = 4  # one generated world in 4 gives its plan and final steps too, the others answers only
STAGE2_LR = 1e-3
STAGE2_WARMUP = 50
STAGE1_FIELDS = ("arch", "seed", "sft_steps", "sft_lr", "sft_batch", "warmup_steps", "micro_batch", "show_k",
                 "experts", "weight_decay", "optimizer")  # what stage 1's weights depend on


def induction_sequences(token_ids: list[int], rng: random.Random, n: int) -> list[list[int]]:
    """`n` random sequences of 8-32 name pieces and digits. Trained to write a sequence again after
    it, the model can only lower the loss by finding where the current token appeared and copying
    the one after it: an induction head. With one fixed length it learns a positional shortcut
    instead (by update 100), which breaks as soon as lengths vary."""
    return [[rng.choice(token_ids) for _ in range(rng.randint(8, 32))] for _ in range(n)]


def name_pieces(tok) -> list[int]:
    """The token ids of the world's syllables (every form) and of the digits."""
    return sorted({i for form in syllable_forms() for i in tok(form, add_special_tokens=False)["input_ids"]}
                  | set(tok.convert_tokens_to_ids(list("0123456789"))))


def stage1_update(policy, optimizer, cfg, prompts, photos, pieces, step: int) -> float:
    """One supervised update of the stage-1 phase `step` falls in; its loss."""
    seed, progress = (cfg.seed + 1) * 10**7 + step * cfg.sft_batch, step / cfg.sft_steps
    if progress < INDUCTION_PHASE:
        sequences = induction_sequences(pieces, random.Random(seed), cfg.sft_batch)
        return supervised_update(policy, optimizer, sequences, sequences, [None] * len(sequences), cfg)
    copy_phase = (progress - INDUCTION_PHASE) / (COPY_PHASE - INDUCTION_PHASE)  # 0 → 1: easy → hard copies
    batch = example_batch(cfg, prompts, photos, seed, 1.0 if copy_phase < 1 else MIXED_COPY_SHARE,
                          hard=min(1.0, copy_phase))
    return sft_update(policy, optimizer, batch, cfg)


def stage2_update(policy, optimizer, cfg, prompts, photos, step: int) -> float:
    """One supervised update of stage 2 (its worlds' seeds follow stage 1's); its loss."""
    seed = (cfg.seed + 1) * 10**7 + (cfg.sft_steps + step) * cfg.sft_batch
    return sft_update(policy, optimizer, example_batch(cfg, prompts, photos, seed, MIXED_COPY_SHARE, stage=2), cfg)


def train_reader(cfg: Config) -> Path:
    """Stage 1 (cfg.sft_steps updates: induction, copy tasks, generated steps) from a random model,
    kept in cfg.model_cache and reused if there; then stage 2 from it. The model is written to
    cfg.out_dir, the training log of both stages beside it (<out_dir>.log.jsonl)."""
    out = Path(cfg.out_dir)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a model: choose another out_dir, or delete it to retrain")
    prompts = compact_prompts(cfg)
    photos = photo_files(Path(cfg.model_cache) / "reader-photos")
    log = out.with_name(out.name + ".log.jsonl")
    first = stage1_folder(cfg)
    if (first / "config.json").exists():
        print(f"stage 1: reusing {first} ({(first / 'model.safetensors.sha256').read_text().split()[0]})")
        write_jsonl(log, [row for row in (read_jsonl(log) if log.exists() else []) if row.get("stage", 1) == 1])
    else:
        write_jsonl(log, [])
        save_reader(train_stage1(cfg, prompts, photos, log), first)
    torch.manual_seed(cfg.seed + 1)
    policy = load_trainable(cfg, first)  # from disk either way: a reused stage 1 gives the same stage 2
    optimizer, _ = make_optimizer(policy, cfg, "sft")
    run_updates(policy, optimizer, cfg, prompts, photos, log, 2, round(STAGE2_SHARE * cfg.sft_steps), STAGE2_LR,
                STAGE2_WARMUP, lambda step: stage2_update(policy, optimizer, cfg, prompts, photos, step))
    save_reader(policy, out)
    return out


def stage1_folder(cfg: Config) -> Path:
    """Where stage 1 is kept: named by every field it depends on, so a changed one retrains it."""
    fields = {name: getattr(cfg, name) for name in STAGE1_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cfg.model_cache) / f"reader-stage1-{cfg.arch}-seed{cfg.seed}-{digest}"


def train_stage1(cfg: Config, prompts, photos, log: Path) -> more.Policy:
    """The random tiny model (its tokenizer cut to the world's syllables) after stage 1."""
    tokenizer_text = name_text() + [prompts.plan, prompts.answer, prompts.final, prompts.passages_header] * 20
    start = materialize_random_model(cfg.arch, Path(cfg.model_cache) / f"reader-init-{cfg.arch}-seed{cfg.seed}",
                                     cfg.seed, tokenizer_text)
    torch.manual_seed(cfg.seed)
    policy = load_trainable(cfg, start)
    optimizer, _ = make_optimizer(policy, cfg, "sft")
    pieces = name_pieces(policy.tokenizer)
    run_updates(policy, optimizer, cfg, prompts, photos, log, 1, cfg.sft_steps, cfg.sft_lr, cfg.warmup_steps,
                lambda step: stage1_update(policy, optimizer, cfg, prompts, photos, pieces, step))
    return policy


def run_updates(policy, optimizer, cfg, prompts, photos, log: Path, stage: int, steps: int, lr: float,
                warmup: int, update) -> None:
    """`steps` calls of update(step) under a warm-up + cosine learning rate, each logged, with a
    quick reading check every CHECK_EVERY updates and at the end."""
    bar = tqdm(range(steps), desc=f"reader stage {stage}")
    for step in bar:
        optimizer.param_groups[0]["lr"] = lr * warmup_cosine(step, steps, warmup)
        t0 = time.perf_counter()
        row = {"stage": stage, "step": step, "loss": update(step)}
        row["seconds"] = time.perf_counter() - t0
        if (step + 1) % CHECK_EVERY == 0 or step == steps - 1:
            row.update(reading_scores(policy, cfg, prompts, photos, questions=12))
        write_jsonl(log, [row], append=True)
        bar.set_postfix(loss=f"{row['loss']:.3f}")


def save_reader(policy, out: Path) -> None:
    """The model, tokenizer and image processor, with the sha256 of the weights beside them."""
    tmp = out.with_name(out.name + ".tmp")
    policy.model.save_pretrained(tmp)
    policy.processor.tokenizer.save_pretrained(tmp)
    policy.processor.image_processor.save_pretrained(tmp)
    digest = hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()
    (tmp / "model.safetensors.sha256").write_text(f"{digest}  model.safetensors\n")
    tmp.rename(out)


# ----------------------------------------------------------------------------------------------
# Checking: greedy steps on worlds never trained on, scored per step kind.


def check_reader(cfg: Config, questions: int = 60) -> dict:
    """Reading scores (reading_scores) of the model at cfg.out_dir, loaded from disk."""
    policy = load_trainable(cfg, Path(cfg.out_dir))
    prompts = compact_prompts(cfg)
    return reading_scores(policy, cfg, prompts, photo_files(Path(cfg.model_cache) / "reader-photos"), questions)


def reading_scores(policy, cfg, prompts, photos, questions: int, seed: int = 10**9) -> dict:
    """Greedy steps on `questions` generated worlds never trained on (seeds from 10^9; training uses
    less), and 40 copy tasks: how often each kind of step writes exactly its gold (plans: the
    sub-question and the stop; answers: the copied answer, or unknown)."""
    policy.model.eval()
    steps = [s for i in range(questions) for s in step_examples(GeneratedWorld(seed + i), prompts, photos, cfg)]
    steps += copy_examples(random.Random(seed), 40, prompts)
    sampler = rollout.policy_sampler(policy, dataclasses.replace(cfg, temperature=0.0))
    results = {}
    for kind in ("plan", "answer", "final"):
        chosen = [s for s in steps if s.kind == kind]
        written = [c.text for _, c in sampler([data.step_prompt(s)[0] for s in chosen], kind)]
        for sample, text in zip(chosen, written):
            for name, ok in step_checks(sample, text).items():
                results.setdefault(name, []).append(ok)
    return {name: float(np.mean(v)) for name, v in sorted(results.items())}


def step_checks(sample: StepSample, text: str) -> dict[str, bool]:
    gold = data.gold_completion(sample)
    if sample.kind == "plan":
        plan, want = protocol.parse_plan(text, list(EXPERT_NAMES.values())), protocol.parse_plan(gold, list(EXPERT_NAMES.values()))
        if want.stop:
            return {"plan_stop": plan.valid and plan.stop}
        return {"plan_valid": plan.valid, "plan_sub_question": plan.valid and plan.sub_question == want.sub_question}
    answer = protocol.parse_answer(text).answer
    want = protocol.parse_answer(gold).answer
    name = "copy_task" if sample.trajectory == COPY_TASK else f"{sample.kind}_{'unknown' if want == UNKNOWN else 'copy'}"
    return {name: score(answer, [want]).recall == 1.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --config FILE [--check] [--KEY VALUE ...]", allow_abbrev=False)
    parser.add_argument("--config", required=True, help="reader.json")
    parser.add_argument("--check", action="store_true", help="measure the model at out_dir instead of training")
    args, load = command_config(parser, argv)
    if args.check:
        print(json.dumps(run_command("reader.py", lambda: check_reader(load())), indent=1))
    else:
        print(f"reader written to {run_command('reader.py', lambda: train_reader(load()))}")


if __name__ == "__main__":
    main()
