"""The rollout loop: exact logic with a scripted policy, then token bookkeeping with the tiny model."""
import dataclasses

import pytest
import torch

import data
import more
import rollout
from config import Config
from protocol import StepPrompt
from world import QUESTION_KINDS

PLAN = "<think>{t}</think><sub-question>{q}</sub-question><ret>{r}</ret>"
ANSWER = "<think>read</think><answer>{a}</answer>"
STOP = PLAN.format(t="enough", q="None", r="None")


def scripted(script):
    """A sampler that returns fixed texts: `script` is a list of (kind, [text per prompt]) per call."""
    seen = []

    def sampler(prompts: list[StepPrompt], kind: str):
        expected_kind, texts = script[len(seen)]
        assert kind == expected_kind and len(texts) == len(prompts), (kind, len(prompts), script[len(seen)])
        seen.append((kind, prompts))
        return [([], more.Completion(ids=[], logprobs=[], text=text, truncated=text == "RUNAWAY")) for text in texts]
    sampler.seen = seen
    return sampler


def questions_of(world, *kinds):
    pool = data.load_questions(world / "questions_train.jsonl")
    return [next(q for q in pool if q.kind == kind) for kind in kinds]


def test_scripted_loop_order_history_queries_and_stopping(world, world_experts):
    text_q, table_q, image_q = questions_of(world, "text_fact", "table_number", "image_fact")
    founder, population = text_q.hops[0].sub_answer, table_q.hops[0].sub_answer
    script = [
        ("plan", [PLAN.format(t="a", q=text_q.hops[0].sub_question, r="Text Retriever"),
                  PLAN.format(t="b", q=table_q.hops[0].sub_question, r="Table Retriever"),
                  "<think>no tags</think>"]),
        ("answer", [ANSWER.format(a=founder), ANSWER.format(a=population)]),
        ("plan", [STOP, PLAN.format(t="c", q="Who lives there?", r="Text Retriever")]),
        ("answer", [ANSWER.format(a="many people")]),
        ("final", [ANSWER.format(a=founder), ANSWER.format(a=population), ANSWER.format(a="?")]),
    ]
    sampler = scripted(script)
    out = rollout.rollout(sampler, world_experts, [text_q, table_q, image_q], Config(max_steps=2),
                          image_root=world)
    assert len(sampler.seen) == len(script)  # every call happened, in this order
    text_t, table_t, image_t = out
    assert [s.kind for s in text_t.steps] == ["plan", "answer", "plan", "final"]
    assert [s.kind for s in table_t.steps] == ["plan", "answer", "plan", "answer", "final"]  # max_steps=2 ends it
    assert [s.kind for s in image_t.steps] == ["plan", "final"]
    # Which expert received which query: only the chosen one is a call; the probe asked all three.
    assert [(c.expert, c.query) for c in text_t.steps[0].calls] == [("text", text_q.hops[0].sub_question)]
    assert [(c.expert, c.query) for c in table_t.steps[0].calls] == [("table", table_q.hops[0].sub_question)]
    assert text_t.steps[0].probe == {"text": True, "image": False, "table": False}
    assert table_t.steps[0].probe == {"text": False, "image": False, "table": True}
    # The sub-answer prompts show the chosen expert's passages with the official tags.
    answer_prompts = sampler.seen[1][1]
    assert "ter-0:" in answer_prompts[0].user and "tar-" not in answer_prompts[0].user
    assert "tar-0:" in answer_prompts[1].user and answer_prompts[1].user.endswith(table_q.hops[0].sub_question)
    # The history the policy sees: official Sub-questionN / AnswerN lines under the origin question.
    final_prompts = sampler.seen[4][1]
    assert final_prompts[1].user == (
        f"Origin question: {table_q.question}\nSub-question1: {table_q.hops[0].sub_question}\n"
        f"Answer1: {population}\nSub-question2: Who lives there?\nAnswer2: many people\n"
        f"Now, give me the final answer of the origin question: {table_q.question}")
    assert sampler.seen[2][1][0].user == f"Origin question: {text_q.question}\nSub-question1: " \
                                         f"{text_q.hops[0].sub_question}\nAnswer1: {founder}\n"
    # The image travels with every step of an image question.
    assert all(p.image == str(world / image_q.image) for p in final_prompts[2:])
    # Stopping, invalid steps, outcomes.
    assert text_t.steps[2].stop and text_t.final_answer == founder
    assert not image_t.steps[0].valid and "missing <sub-question>, </sub-question>, <ret>, </ret>" == image_t.steps[0].reason
    assert table_t.final_answer == population


def test_invalid_answer_and_runaway_plan_end_the_rounds(world, world_experts):
    text_q, = questions_of(world, "bridge")
    script = [("plan", [PLAN.format(t="a", q=text_q.hops[0].sub_question, r="Text Retriever"), "RUNAWAY"]),
              ("answer", ["<answer>no think tag</answer>"]),
              ("final", [ANSWER.format(a="x"), ANSWER.format(a="y")])]
    out = rollout.rollout(scripted(script), world_experts, [text_q], Config(max_steps=3), group_size=2)
    assert [s.kind for s in out[0].steps] == ["plan", "answer", "final"]
    assert not out[0].steps[1].valid and "<think>" in out[0].steps[1].reason
    assert out[1].steps[0].reason.startswith("runaway length")
    assert [t.group_index for t in out] == [0, 1]


def test_a_raising_expert_becomes_a_failed_call(world, world_experts, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    question = data.Question("x", "q1", "Who founded the town in this picture?", ["?"], str(broken))
    script = [("plan", [PLAN.format(t="look", q="Which town is shown?", r="Text Image Retriever, Text Retriever")]),
              ("answer", [ANSWER.format(a="unknown")]), ("plan", [STOP]), ("final", [ANSWER.format(a="?")])]
    sampler = scripted(script)
    out = rollout.rollout(sampler, world_experts, [question], Config())
    calls = {c.expert: c for c in out[0].steps[0].calls}
    assert "cannot read image" in calls["image"].error and calls["image"].hit_ids == []
    assert calls["text"].error == "" and len(calls["text"].hit_ids) == 10
    assert "tir-" not in sampler.seen[1][1][0].user and "ter-0:" in sampler.seen[1][1][0].user
    assert out[0].final_answer == "?"


def test_trace_is_readable_and_round_trips_to_json(world, world_experts, tmp_path):
    text_q, = questions_of(world, "text_fact")
    script = [("plan", [PLAN.format(t="a", q=text_q.hops[0].sub_question, r="Text Retriever")]),
              ("answer", [ANSWER.format(a="Someone")]), ("plan", [STOP]), ("final", [ANSWER.format(a="Someone")])]
    out = rollout.rollout(scripted(script), world_experts, [text_q], Config())
    text = rollout.format_trace(out[0])
    assert "plan: ask Text Retriever" in text and "Final answer: 'Someone'" in text
    rollout.write_traces(tmp_path / "t.jsonl", out)
    import json
    row = json.loads((tmp_path / "t.jsonl").read_text())
    assert row["steps"][0]["calls"][0]["expert"] == "text"


# ------------------------------------------------------------------------------- with the tiny model


@pytest.fixture(scope="module")
def tiny_rollout(shared_policy, world, world_experts, tiny_cfg_module):
    questions = questions_of(world, "text_fact", "image_fact", "compare")
    torch.manual_seed(0)
    trajectories = rollout.rollout(rollout.policy_sampler(shared_policy, tiny_cfg_module), world_experts, questions,
                                   dataclasses.replace(tiny_cfg_module, max_steps=1), group_size=2, image_root=world)
    return trajectories


@pytest.fixture(scope="module")
def tiny_cfg_module(model_cache):
    from config import Config
    return Config(model_name="tiny", model_cache=model_cache, device="cpu", max_new_tokens_plan=24,
                  max_new_tokens_answer=16)


def test_the_training_mask_covers_exactly_the_sampled_tokens(shared_policy, tiny_rollout):
    """The mask the loss uses (rollout.training_batch): 1 on exactly the sampled ids of each row,
    0 on its prompt (expert passages included) and on the padding. Fails if the mask is inverted
    (training on the prompt), shifted by a position, or covers padding."""
    steps = [s for t in tiny_rollout for s in t.steps]
    images = [t.image for t in tiny_rollout for _ in t.steps]
    inputs, mask = rollout.training_batch(shared_policy, steps, images)
    ids, pad = inputs["input_ids"], shared_policy.tokenizer.pad_token_id
    assert len({len(s.prompt_ids) + len(s.completion_ids) for s in steps}) > 1  # a ragged, left-padded batch
    for row, step in enumerate(steps):
        assert ids[row][mask[row]].tolist() == step.completion_ids and len(step.completion_ids) > 0
        unmasked = ids[row][~mask[row]].tolist()
        padding = len(unmasked) - len(step.prompt_ids)
        assert unmasked[padding:] == step.prompt_ids and unmasked[:padding] == [pad] * padding
        assert inputs["attention_mask"][row].sum() == len(step.prompt_ids) + len(step.completion_ids)


def test_recorded_steps_recompute_to_the_sampling_logprobs(shared_policy, tiny_rollout):
    steps = [s for t in tiny_rollout for s in t.steps]
    images = [t.image for t in tiny_rollout for _ in t.steps]
    assert any(images) and not all(images)  # image and text-only steps in one batch
    inputs, mask = rollout.training_batch(shared_policy, steps, images)
    recomputed = more.token_logprobs(shared_policy, inputs, mask)
    for row, step in enumerate(steps):
        assert torch.allclose(recomputed[row][mask[row]], torch.tensor(step.logprobs), atol=1e-5, rtol=0)


def test_decoding_and_re_encoding_would_change_the_ids(shared_policy, tiny_rollout):
    """Why the loop keeps sampled ids: a random policy's text does not survive decode → encode."""
    tok = shared_policy.tokenizer
    steps = [s for t in tiny_rollout for s in t.steps]
    changed = [s for s in steps if tok(tok.decode(s.completion_ids), add_special_tokens=False)["input_ids"] != s.completion_ids]
    assert changed


def test_batched_greedy_rollout_equals_one_question_at_a_time(shared_policy, world, world_experts, model_cache):
    cfg = Config(model_name="tiny", model_cache=model_cache, device="cpu", temperature=0.0,
                 max_new_tokens_plan=16, max_new_tokens_answer=12)
    pool = data.load_questions(world / "questions_train.jsonl")
    questions = [next(q for q in pool if q.kind == k) for k in QUESTION_KINDS] + pool[-1:]
    sampler = rollout.policy_sampler(shared_policy, cfg)
    rounds = dataclasses.replace(cfg, max_steps=2)
    batched = rollout.rollout(sampler, world_experts, questions, rounds, group_size=4, image_root=world)
    single = [t for q in questions for t in rollout.rollout(sampler, world_experts, [q], rounds, group_size=4,
                                                           image_root=world)]
    assert len(batched) == len(single) == 32
    for a, b in zip(batched, single):
        assert [s.completion_ids for s in a.steps] == [s.completion_ids for s in b.steps]
        assert [s.prompt_ids for s in a.steps] == [s.prompt_ids for s in b.steps]
