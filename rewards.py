"""Step-GRPO's rewards: every step of a trajectory earns its own (docs/PROTOCOL.md, "Rewards").

A plan step is paid for routing to an expert that holds the hop's evidence and for a sub-question
close to the gold one; a sub-answer and the final answer for matching their golds under the
official metric (metric.score). Missing tags give 0. The same functions score both training modes:
live trajectories (`trajectory_rewards`) and the teacher-forced steps of a step file
(`official_step_reward`).
"""
from __future__ import annotations

import numpy as np

from data import Hop
from experts import EXPERT_KINDS, EXPERT_NAMES
from metric import score
from protocol import parse_answer
from rollout import plan_step

# ----------------------------------------------------------------------------------------------
# Rewards, step by step (docs/PROTOCOL.md, "Rewards"). Missing tags give 0.


def answer_reward(prediction: str, golds: list[str], rule: str = "recall") -> float:
    """The reward of a sub-answer or final answer against its golds, by `rule` (config answer_reward).

    'recall', the release's: token recall of the best-F1 gold (the official F1-Recall); with one
    gold of at most 5 words, or several golds, all-or-nothing (1 when the recall is 1). Recall pays
    for length: an answer that pastes every passage shown contains most gold words.
    'f1': the best token F1 over the golds. Precision enters, so a pasted passage, a pasted history
    or "A or B" scores well below the gold itself (bench.py rewards measures both rules).
    """
    if not prediction or not golds:
        return 0.0
    result = score(prediction, [str(g) for g in golds])
    if rule == "f1":
        return result.f1
    if len(golds) > 1 or len(str(golds[0]).split()) <= 5:
        return float(result.recall == 1.0)
    return result.recall


def plan_reward(step, gold_hop, similarity, cfg) -> float:
    """w_route · [exactly one expert, and it is in the hop's gold-expert set] + w_subq · cos(sub-q, gold sub-q).

    `gold_hop` is the data.Hop this plan should retrieve for, or None when no gold hop is left.
    The release credits the one expert its teacher chose; the gold-expert set here is every expert
    whose top-k for the gold sub-question holds the evidence (world.label_gold_experts, the
    all-expert probe). Routing is credited apart from the sub-question's wording, which the
    similarity term scores; whether the policy's own sub-question found the evidence is the
    `evidence_found` metric. Stopping (None/None) earns 1 when no gold hop is left, 0 when one is.
    """
    if not step.valid:
        return 0.0
    if step.stop:
        return float(gold_hop is None)
    if gold_hop is None:
        return 0.0  # retrieving when the gold plan says stop
    routed = gold_hop.routed_by(step.experts)
    return cfg.w_route * float(routed) + cfg.w_subq * max(0.0, similarity(step.sub_question, gold_hop.sub_question))


class SubQuestionSimilarity:
    """cos(emb(a), emb(b)) with the configured text encoder (the release: BGE-M3).

    Through the encoder's query memory: the experts have just encoded the policy's sub-questions.
    """

    def __init__(self, encoder):
        self.encoder = encoder

    def __call__(self, a: str, b: str) -> float:
        vectors = self.encoder.encode_queries([a, b])
        return float(np.dot(vectors[0], vectors[1]))


def trajectory_rewards(trajectory, gold_hops, similarity, cfg) -> tuple[list[float], float]:
    """The reward of every step of a trajectory, and its outcome (final-answer) reward."""
    rewards = []
    for step in trajectory.steps:
        if step.kind == "plan":
            rewards.append(plan_reward(step, gold_hops[step.hop] if step.hop < len(gold_hops) else None,
                                       similarity, cfg))
        elif step.kind == "answer":
            gold = [gold_hops[step.hop].sub_answer] if step.hop < len(gold_hops) else []
            rewards.append(answer_reward(step.answer, gold, cfg.answer_reward) if step.valid else 0.0)
        else:
            rewards.append(answer_reward(trajectory.final_answer, trajectory.golds, cfg.answer_reward)
                           if step.valid else 0.0)
    return rewards, rewards[-1]


def step_file_hop(gold: dict):
    """A step file's plan gold as the data.Hop that plan_reward scores against; None when it says stop.

    Its gold experts are the named ones: the teacher's single choice in the release's files, every
    expert that holds the evidence in the mini world's (world.label_gold_experts).
    """
    names = {str(name).lower() for name in gold["retriever"]}
    if names == {"none"}:
        return None
    kinds = {name.lower(): kind for kind, name in EXPERT_NAMES.items()}
    return Hop(str(gold["query"]), "", [], gold_experts=[kinds[n] for n in sorted(names) if n in kinds])


def official_step_reward(gold, text: str, similarity, cfg) -> float:
    """The reward of a completion for a step file's step (data.StepSample): a plan is scored by
    plan_reward against the step's gold as a Hop; an answer by answer_reward."""
    if gold.kind == "plan":
        return plan_reward(plan_step(text, EXPERT_KINDS), step_file_hop(gold.gold), similarity, cfg)
    parsed = parse_answer(text)
    golds = [gold.gold] if gold.kind == "answer" else list(gold.gold)
    return answer_reward(parsed.answer, golds, cfg.answer_reward) if parsed.valid else 0.0
