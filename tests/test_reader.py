"""The tiny reader (reader.py): its generated training steps answer only from what they show, route
uniformly, and copy tasks hold their answer; the committed reader (models/tiny-reader, made by
`python reader.py --config reader.json`) reads on a world seed it never saw."""
import dataclasses
import hashlib
import json
import random
import shutil
from collections import Counter

import numpy as np
import pytest

import data
import eval as evaluation
import more
import protocol
import reader
import rollout
from config import Config
from conftest import ROOT
from experts import EXPERT_NAMES
from world import build_world

READER = ROOT / "models" / "tiny-reader"

PROMPTS = reader.compact_prompts(Config())


def generated_steps(n_questions: int, tmp_path) -> list:
    photos = reader.photo_files(tmp_path / "photos")
    cfg = Config(show_k=2)
    return [s for i in range(n_questions) for s in reader.step_examples(reader.GeneratedWorld(i), PROMPTS, photos, cfg)]


def test_generated_steps_answer_only_from_what_they_show(tmp_path):
    steps = generated_steps(150, tmp_path)
    answers = [s for s in steps if s.kind == "answer"]
    copied = [s for s in answers if s.gold != reader.UNKNOWN]
    assert 0.3 < len(copied) / len(answers) < 0.8  # both cases are common
    for s in copied:  # a copied answer is in the passages shown
        assert s.gold in s.parts[-1]["text"].split("Question:")[0]
    finals = [s for s in steps if s.kind == "final"]
    assert 0.1 < np.mean([s.gold != [reader.UNKNOWN] for s in finals]) < 0.9


def test_generated_plans_route_uniformly_and_carry_the_question_entities(tmp_path):
    plans = [s for s in generated_steps(150, tmp_path) if s.kind == "plan" and s.gold["query"] != "None"]
    experts = Counter(s.gold["retriever"][0] for s in plans)
    assert set(experts) == set(EXPERT_NAMES.values())
    assert all(0.2 < n / len(plans) < 0.47 for n in experts.values())
    first = [s for s in plans if "Sub-question1" not in s.parts[-1]["text"]]
    for s in first:  # a first hop names what the question names, never something else
        question = s.parts[-1]["text"].split("Origin question: ")[1]
        names = [w.strip("?,") for w in s.gold["query"].split() if w[:1].isupper() and w not in ("Who", "What", "Which", "In")]
        assert all(name in question for name in names)


def test_copy_tasks_hold_their_answer_in_the_prompt():
    for s in reader.copy_examples(random.Random(0), 200, PROMPTS):
        assert s.gold in s.parts[0]["text"] and s.trajectory == reader.COPY_TASK


def test_induction_sequences_vary_in_length_so_no_fixed_offset_copies_them():
    sequences = reader.induction_sequences(list(range(50)), random.Random(0), 200)
    assert len({len(s) for s in sequences}) > 10 and min(map(len, sequences)) >= 8


def test_a_short_reader_run_writes_a_model_with_its_checksum_and_log(tmp_path, model_cache, capsys):
    out = tmp_path / "reader"
    args = ["--config", str(ROOT / "reader.json"), "--sft_steps", "4", "--sft_batch", "4", "--micro_batch", "4",
            "--out_dir", str(out), "--model_cache", model_cache]
    reader.main(args)  # stage 1: updates 0-1 induction, 2 copy tasks, 3 generated steps; stage 2: 1 update
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert (out / "model.safetensors.sha256").read_text().split()[0] == digest

    def logged():
        rows = [json.loads(line) for line in (tmp_path / "reader.log.jsonl").read_text().splitlines()]
        return [(row["stage"], row["step"]) for row in rows], rows[-1]
    assert logged()[0] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)] and "plan_valid" in logged()[1]
    with pytest.raises(SystemExit):  # a second run refuses to overwrite the model
        reader.main(args)
    assert "already holds a model" in capsys.readouterr().err
    shutil.rmtree(out)  # without the model, a run reuses stage 1 and logs stage 2 once
    reader.main(args)
    assert "stage 1: reusing" in capsys.readouterr().out
    assert logged()[0] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == digest
    shutil.rmtree(out)  # a field stage 1 depends on changed: stage 1 is trained again, not reused
    reader.main(args + ["--sft_lr", "0.001"])
    assert "stage 1: reusing" not in capsys.readouterr().out
    assert logged()[0] == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]


def test_stage2_retrieval_puts_look_alike_names_after_the_evidence():
    """Real retrieval ranks look-alike names next to the evidence (Holistsol for Holbelmor); stage
    2's simulated retrieval does so in every world that has one (34 of 40), stage 1's by chance (4)."""
    def second_passage_looks_alike(seed, look_alikes):
        w = reader.GeneratedWorld(seed, look_alikes)
        town = w.towns[0].name
        second = w.search("text", f"Who founded {town}?", None, 2)[1].text
        return any(reader.looks_like(word, [town]) for word in second.split())

    def has_look_alike(seed):
        w = reader.GeneratedWorld(seed)
        return any(reader.looks_like(name, [w.towns[0].name]) for name in w.names[1:])
    seeds = range(40)
    assert [second_passage_looks_alike(s, True) for s in seeds] == [has_look_alike(s) for s in seeds]
    assert sum(has_look_alike(s) for s in seeds) >= 30
    assert sum(second_passage_looks_alike(s, False) for s in seeds) <= 8


# ----------------------------------------------------------------------------------------------
# The committed reader


def test_committed_reader_matches_its_checksum_and_size():
    recorded = (READER / "model.safetensors.sha256").read_text().split()[0]
    assert hashlib.sha256((READER / "model.safetensors").read_bytes()).hexdigest() == recorded
    assert (READER / "model.safetensors").stat().st_size <= 10 * 2**20


@pytest.fixture(scope="module")
def unseen_world(tmp_path_factory):
    """A world of a seed that no config uses and the reader never saw (it trained on generated
    worlds of seeds from 10^7), with the compact prompts it reads."""
    out = tmp_path_factory.mktemp("unseen-world")
    build_world(out, seed=11, n_towns=15, per_kind=5, show_k=2, prompts="compact")
    return out


@pytest.fixture(scope="module")
def reader_cfg(unseen_world):
    return Config(model_name=str(READER), prompts="compact", world_dir=str(unseen_world), world_seed=11, show_k=2,
                  index_dir=str(unseen_world / "indexes"),
                  max_steps=3, device="cpu", max_new_tokens_plan=48, max_new_tokens_answer=24)


def test_reader_copies_sub_answers_from_the_gold_evidence(unseen_world, reader_cfg):
    """Every sub-answer step of the world's step files whose passages hold the answer, greedy, in
    4-bit with a fresh LoRA as tiny.json loads it. The committed reader copies 0.58 of them (stage
    1's weights: 0.27; a random model: 0); the 0.8 the project aims for is not reached yet
    (docs/RESULTS.md, "The tiny reader")."""
    samples = [s for split in ("train", "validation", "test")
               for s in data.load_step_file(unseen_world / f"steps_{split}.jsonl") if s.kind == "answer"]
    shown = [s for s in samples if s.gold.lower() in s.parts[-1]["text"].lower()]
    policy = more.load_policy(reader_cfg)
    policy.model.eval()
    sampler = rollout.policy_sampler(policy, dataclasses.replace(reader_cfg, temperature=0.0))
    written = sampler([data.step_prompt(s)[0] for s in shown], "answer")
    recall = np.mean([protocol.parse_answer(c.text).answer == s.gold for s, (_, c) in zip(shown, written)])
    assert len(shown) >= 40 and recall >= 0.45


def test_with_the_reader_routing_decides_the_answer(unseen_world, reader_cfg, tmp_path):
    """Oracle routing finds the evidence (92.9% measured) and answers far better than random
    routing or the text expert alone (F1-Recall 37.1 vs 8.6 and 22.9): routing decides the answer.
    The scripted gold reader scores 22.9 under random routing: the committed reader, which copies
    too little, does not come near it yet."""
    questions = [q for split in ("train", "validation", "test")
                 for q in data.load_questions(unseen_world / f"questions_{split}.jsonl")]
    table = evaluation.summarise(evaluation.run_methods(reader_cfg, questions, ["oracle", "random", "single:text"], None, False,
                                                        tmp_path / "reader", unseen_world))
    oracle, random_, text = (table[f"mini_world/{m}"] for m in ("oracle", "random", "single:text"))
    assert oracle["evidence_recall"] >= 85
    assert oracle["evidence_recall"] > random_["evidence_recall"] + 40
    assert oracle["recall"] > random_["recall"] + 20
    assert oracle["recall"] > text["recall"] + 8
