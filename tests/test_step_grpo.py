"""Step-GRPO: rewards, advantages and the loss against hand-computed numbers, the update's direction,
the KL that is logged, and steps mode on the authors' step file."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import more
import protocol
import rewards
import rollout
import step_grpo as sg
from config import Config
from conftest import SAMPLES, run_config

# ------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed():
    a = sg.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    # mean 0.5, unbiased std sqrt(1/3): ±0.5 / 0.57735
    assert torch.allclose(a, torch.tensor([0.8660229, -0.8660229, -0.8660229, 0.8660229], dtype=torch.float64), atol=1e-6)


def test_zero_variance_group_gives_zero_advantage():
    assert torch.equal(sg.group_advantages(torch.tensor([0.7, 0.7, 0.7])), torch.zeros(3))


def test_nan_reward_gets_zero_and_is_left_out_of_the_statistics():
    a = sg.group_advantages(torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64))
    # the finite pair: mean 0.5, unbiased std sqrt(0.5)
    assert torch.allclose(a, torch.tensor([0.7071058, 0.0, -0.7071058], dtype=torch.float64), atol=1e-6)
    assert torch.equal(sg.group_advantages(torch.tensor([float("nan"), 1.0])), torch.zeros(2))


def scripted_sampler(stops_at: dict[int, int], right: set[int], gold: str):
    """Trajectory g plans to stop at round stops_at[g] (asking the text expert before that); its
    final answer is the gold when g is in `right`. Rows come in trajectory order among the active."""
    plans = {"n": 0}

    def sample(prompts, kind):
        out = []
        for row, _ in enumerate(prompts):
            if kind == "plan":
                active = sorted(g for g, stop in stops_at.items() if stop >= plans["n"])
                stop = stops_at[active[row]] == plans["n"]
                text = ("<think>t</think><sub-question>None</sub-question><ret>None</ret>" if stop else
                        "<think>t</think><sub-question>Who founded it?</sub-question><ret>Text Retriever</ret>")
            else:
                text = f"<think>t</think><answer>{gold if kind == 'final' and row in right else 'no idea'}</answer>"
            out.append(([1], more.Completion([2, 3], [-0.5, -0.5], text, False)))
        plans["n"] += kind == "plan"
        return out
    return sample


def test_online_credit_puts_every_final_answer_in_one_group_and_counts_the_outcome_once(world, world_experts):
    """A real rollout of G=4: trajectories 0 and 1 stop at once (0 answers wrong, 1 right by luck),
    2 and 3 retrieve for one round and answer right. Every final step competes with all four, so
    the lucky answer gets what the right answers after retrieval get (+0.5), not more; and the
    final step carries the outcome once (w_outcome does not add it again). Fails if finals are
    grouped by round, or if the outcome is added to the final step a second time."""
    import data
    question = next(q for q in data.load_questions(world / "questions_train.jsonl") if q.hops)
    sampler = scripted_sampler({0: 0, 1: 0, 2: 1, 3: 1}, right={1, 2, 3}, gold=question.answers[0])
    group = rollout.rollout(sampler, world_experts, [question], Config(max_steps=2), 4, image_root=world)
    assert [len(t.steps) for t in group] == [2, 2, 4, 4]  # stop+final, stop+final, plan+answer+stop+final
    similarity = rewards.SubQuestionSimilarity(world_experts[0].text_encoder)
    scored = [rewards.trajectory_rewards(t, question.hops, similarity, Config()) for t in group]
    outcomes = [outcome for _, outcome in scored]
    assert outcomes == [0.0, 1.0, 1.0, 1.0]
    advantages = sg.online_advantages(group, [r for r, _ in scored], outcomes, w_outcome=1.0)
    finals = [row[-1] for row in advantages]
    assert finals == pytest.approx([-1.5, 0.5, 0.5, 0.5], abs=1e-5)  # (R - 0.75) / std{0,1,1,1}
    # a plan step: its round's normalised reward plus the outcome, once
    plan_rewards = [r[0] for r, _ in scored]
    expected = sg.group_advantages(torch.tensor(plan_rewards, dtype=torch.float64)).tolist()
    assert [row[0] for row in advantages] == pytest.approx([e + f for e, f in zip(expected, finals)], abs=1e-5)


# --------------------------------------------------------------------------------------- the loss


def one_token(logp, old, ref, advantage, beta=0.0, eps=0.2):
    t = lambda x: torch.tensor([[x]], dtype=torch.float64)
    return sg.step_grpo_loss(t(logp), t(old), t(ref), torch.tensor([advantage], dtype=torch.float64),
                             torch.ones(1, 1, dtype=torch.bool), eps, beta)


def test_k3_kl_hand_computed():
    # logp = log .5, ref = log .25: ref - logp = log .5; k3 = .5 - log .5 - 1 = 0.193147
    parts = one_token(math.log(0.5), math.log(0.5), math.log(0.25), 0.0, beta=1.0)
    assert parts.kl == pytest.approx(0.5 + math.log(2) - 1, abs=1e-6)
    assert parts.loss.item() == pytest.approx(0.193147, abs=1e-6)


@pytest.mark.parametrize("ratio,advantage,expected,clipped", [
    (1.5, 1.0, -1.2, True),    # positive advantage: the gain is capped at 1 + eps
    (0.5, -1.0, 0.8, True),    # negative advantage: the ratio is floored at 1 - eps
    (0.5, 1.0, -0.5, True),    # the pessimistic (unclipped) side is kept
    (1.5, -1.0, 1.5, True),
    (1.1, 1.0, -1.1, False),   # inside the trust region: plain ratio times advantage
])
def test_clipping_on_both_sides(ratio, advantage, expected, clipped):
    parts = one_token(math.log(ratio), 0.0, 0.0, advantage)
    assert parts.loss.item() == pytest.approx(expected - 0.0, abs=1e-6)
    assert parts.clip_fraction == float(clipped)


def test_masked_tokens_contribute_nothing():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])  # the middle token is expert text
    ref, old, adv = torch.full_like(logp, -1.0), logp.detach().clone(), torch.tensor([1.0])
    base = sg.step_grpo_loss(logp, old, ref, adv, mask, 0.2, 0.1).loss
    base.backward()
    assert logp.grad[0, 1] == 0
    changed = logp.detach().clone()
    changed[0, 1] = 5.0
    again = sg.step_grpo_loss(changed, changed.clone(), ref, adv, mask, 0.2, 0.1).loss
    assert again.item() == pytest.approx(base.item(), abs=1e-7)


def test_token_and_sequence_aggregation():
    per_token = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert sg.masked_mean(per_token, mask, "token").item() == pytest.approx(2.0)      # (1 + 3 + 2) / 3
    assert sg.masked_mean(per_token, mask, "sequence").item() == pytest.approx(2.0)   # (2 + 2) / 2
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert sg.masked_mean(per_token, mask, "token").item() == pytest.approx(1.5)      # 6 / 4
    assert sg.masked_mean(per_token, mask, "sequence").item() == pytest.approx(5 / 3)  # (4/3 + 2) / 2


def test_answer_reward_rules():
    """The release's recall rule, and F1, under which length and hedging no longer pay."""
    assert rewards.answer_reward("It was 1899", ["1899"]) == 1.0
    assert rewards.answer_reward("December", ["9 December 1899"]) == 0.0  # short gold: all or nothing
    long_gold = "The Royal Insurance Building in Glasgow has five floors"
    assert rewards.answer_reward("royal insurance building floors", [long_gold]) == pytest.approx(4 / 8)
    assert rewards.answer_reward("paris", ["Paris", "Paris, France"]) == 1.0
    assert rewards.answer_reward("", ["x"]) == 0.0
    assert rewards.answer_reward("Velora or Arlen", ["Velora"], "recall") == 1.0  # hedging pays under recall
    assert rewards.answer_reward("Velora or Arlen", ["Velora"], "f1") == pytest.approx(0.5)
    assert rewards.answer_reward("It was 1899", ["1899"], "f1") == pytest.approx(0.5)
    assert rewards.answer_reward("1899", ["1899"], "f1") == 1.0


def test_plan_reward_rules():
    """Routing credit from the hop's gold-expert set, apart from the sub-question; the format gates all."""
    import data
    import rollout
    from experts import EXPERT_NAMES, TextEncoder
    similarity = rewards.SubQuestionSimilarity(TextEncoder("minilm"))
    cfg = Config(w_route=0.5, w_subq=0.5)
    hop = data.Hop("who founded Velora?", "Ada Brill", ["t1"], gold_experts=["text", "table"])

    def plan(sub_question: str, *experts: str, probe=None):
        names = ", ".join(EXPERT_NAMES.get(e, "None") for e in experts)
        text = f"<think>x</think><sub-question>{sub_question}</sub-question><ret>{names}</ret>"
        step = rollout.plan_step(text, {name: kind for kind, name in EXPERT_NAMES.items()})
        step.probe = probe or {}
        return step

    # Either expert of the set earns the routing credit, even when its top-k for this wording missed.
    assert rewards.plan_reward(plan("who founded Velora?", "table", probe={"table": False}), hop, similarity, cfg) \
        == pytest.approx(1.0, abs=1e-5)
    assert rewards.plan_reward(plan("who founded Velora?", "image"), hop, similarity, cfg) == pytest.approx(0.5, abs=1e-5)
    assert rewards.plan_reward(plan("who founded Velora?", "text", "image"), hop, similarity, cfg) \
        == pytest.approx(0.5, abs=1e-5)  # two experts: no routing credit
    unrelated = rewards.plan_reward(plan("a list of river lengths", "text"), hop, similarity, cfg)
    assert 0.5 <= unrelated < 0.75  # credit for the expert, little for the wording
    assert rewards.plan_reward(plan("None", "none"), None, similarity, cfg) == 1.0  # a correct stop
    assert rewards.plan_reward(plan("None", "none"), hop, similarity, cfg) == 0.0   # stopping too early
    assert rewards.plan_reward(plan("who founded Velora?", "text"), None, similarity, cfg) == 0.0  # too long
    broken = plan("who founded Velora?", "text")
    broken.valid = False
    assert rewards.plan_reward(broken, hop, similarity, cfg) == 0.0

# ----------------------------------------------------------------------------------- the direction


def sampled_plan_steps(policy, questions: list[str], max_new_tokens: int, experts) -> list:
    """One sampled plan step (seed 0) for each origin question, as rollout records it."""
    import more
    import rollout
    system = protocol.plan_system_prompt(experts)
    prompts = [more.encode_prompt(policy.processor, protocol.render_prompt(system, f"Origin question: {q}", False))
               for q in questions]
    torch.manual_seed(0)
    completions = more.sample(policy, prompts, "plan", max_new_tokens)
    return [rollout.Step("plan", p.ids, c.ids, c.logprobs, c.text, True) for p, c in zip(prompts, completions)]


@pytest.fixture
def policy_and_samples(tiny_cfg):
    import more
    policy = more.load_policy(tiny_cfg)
    experts = [("Text Retriever", "passages"), ("Table Retriever", "tables")]
    return policy, sampled_plan_steps(policy, [f"q{i}?" for i in range(4)], 10, experts)


def sequence_logprobs(policy, steps):
    import more
    import rollout
    inputs, mask = rollout.training_batch(policy, steps, [None] * len(steps))
    with torch.no_grad():
        return (more.token_logprobs(policy, inputs, mask) * mask).sum(1)


def test_one_update_raises_positive_and_lowers_negative_advantage_completions(policy_and_samples, tiny_cfg):
    policy, steps = policy_and_samples
    before = sequence_logprobs(policy, steps)
    optimizer, _ = sg.make_optimizer(policy, Config(lr=1e-2), "grpo")
    samples = [sg.Sample(s, None, a) for s, a in zip(steps, [1.0, 1.0, -1.0, -1.0])]
    sg.policy_update(policy, optimizer, samples, Config(beta=0.0, micro_batch=3))
    after = sequence_logprobs(policy, steps)
    assert (after[:2] > before[:2]).all() and (after[2:] < before[2:]).all()


def test_the_update_gradient_does_not_depend_on_how_samples_are_cut_into_micro_batches(tiny_cfg):
    """policy_update sorts rows by length before cutting micro-batches; the summed gradient must be
    the one of the whole batch in one forward, with KL and padding of unlike lengths in play."""
    import more
    policy = more.load_policy(tiny_cfg)
    questions = ["q?", "a much longer origin question with many words in it?", "mid length q?", "x y?"]
    steps = sampled_plan_steps(policy, questions, 8, [("Text Retriever", "passages")])
    samples = [sg.Sample(step, None, a) for step, a in zip(steps, [1.0, -0.5, 0.0, 2.0])]
    grads = []
    for micro_batch in (4, 1):
        optimizer, _ = sg.make_optimizer(policy, Config(lr=0.0), "grpo")
        sg.policy_update(policy, optimizer, samples, Config(beta=0.3, micro_batch=micro_batch, max_grad_norm=1e9))
        grads.append(torch.cat([p.grad.flatten() for p in sg._trainable(policy)]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_zero_advantage_with_kl_moves_the_policy_back_toward_the_reference(policy_and_samples):
    import more
    import rollout
    policy, steps = policy_and_samples
    optimizer, _ = sg.make_optimizer(policy, Config(lr=2e-2), "grpo")
    for _ in range(3):  # move away from the reference first
        sg.policy_update(policy, optimizer, [sg.Sample(s, None, 1.0) for s in steps], Config(beta=0.0))
    inputs, mask = rollout.training_batch(policy, steps, [None] * len(steps))

    def kl_to_reference():
        with torch.no_grad():
            logp = more.token_logprobs(policy, inputs, mask)
            ref = more.reference_logprobs(policy, inputs, mask)
        d = ref - logp
        return ((torch.exp(d) - d - 1) * mask).sum().item()
    before = kl_to_reference()
    assert before > 1e-3
    # A small step: AdamW's first step moves every parameter by ~lr whatever the gradient's size,
    # so a large lr can overshoot the minimum it is heading for (on one sample set lr 1e-3 raised
    # the KL from 1.87 to 2.29 while 1e-4 lowered it to 1.74).
    optimizer, _ = sg.make_optimizer(policy, Config(lr=1e-4), "grpo")
    current = [rollout.Step(s.kind, s.prompt_ids, s.completion_ids,
                            more.token_logprobs(policy, inputs, mask)[i][mask[i]].tolist(), s.text, True)
               for i, s in enumerate(steps)]
    sg.policy_update(policy, optimizer, [sg.Sample(s, None, 0.0) for s in current], Config(beta=1.0))
    assert kl_to_reference() < before


def test_the_logged_kl_is_to_the_reference_or_nan(policy_and_samples):
    """With beta = 0 the KL used to be taken against the sampling policy (so it was ~0 while the
    policy had moved far from the reference). Now: NaN unless asked for, and with log_kl the KL to
    the reference, which a moved policy shows."""
    import more
    import rollout
    policy, steps = policy_and_samples
    optimizer, _ = sg.make_optimizer(policy, Config(lr=2e-2), "grpo")
    for _ in range(3):  # move away from the reference first
        sg.policy_update(policy, optimizer, [sg.Sample(s, None, 1.0) for s in steps], Config(beta=0.0))
    inputs, mask = rollout.training_batch(policy, steps, [None] * len(steps))
    with torch.no_grad():
        logp = more.token_logprobs(policy, inputs, mask)
        ref = more.reference_logprobs(policy, inputs, mask)
    d = (ref - logp)[mask]
    expected = (torch.exp(d) - d - 1).mean().item()
    current = [rollout.Step(s.kind, s.prompt_ids, s.completion_ids, logp[i][mask[i]].tolist(), s.text, True)
               for i, s in enumerate(steps)]  # sampled by the current policy: old = current
    frozen, _ = sg.make_optimizer(policy, Config(lr=0.0), "grpo")  # measure without moving
    silent = sg.policy_update(policy, frozen, [sg.Sample(s, None, 1.0) for s in current], Config(beta=0.0))
    assert math.isnan(silent["kl"])
    logged = sg.policy_update(policy, frozen, [sg.Sample(s, None, 1.0) for s in current],
                              Config(beta=0.0, log_kl=True))
    assert expected > 1e-3 and logged["kl"] == pytest.approx(expected, rel=1e-3)


def test_zero_advantage_samples_are_not_run_and_the_gradient_is_unchanged(policy_and_samples):
    """β = 0 and no entropy bonus: policy_update skips zero-advantage samples but keeps their tokens
    in the token-mean's denominator, so its gradient is the whole batch's in one forward."""
    import more
    import rollout
    policy, steps = policy_and_samples
    advantages = [1.0, 0.0, -1.0, 0.0]
    cfg = Config(beta=0.0, micro_batch=1, max_grad_norm=1e9)
    optimizer = torch.optim.SGD(sg._trainable(policy), lr=0.0)  # keeps the gradients, moves nothing
    update = sg.policy_update(policy, optimizer, [sg.Sample(s, None, a) for s, a in zip(steps, advantages)], cfg)
    skipping = [p.grad.clone() for p in sg._trainable(policy)]

    optimizer.zero_grad()
    inputs, mask = rollout.training_batch(policy, steps, [None] * len(steps))
    logp = more.token_logprobs(policy, inputs, mask)
    old = sg._scatter_logprobs([s.logprobs for s in steps], mask)
    sg.step_grpo_loss(logp, old, old, torch.tensor(advantages), mask, cfg.clip_eps, 0.0).loss.backward()
    whole_batch = [p.grad for p in sg._trainable(policy)]

    assert update["samples_run"] == 0.5
    assert max(g.abs().max() for g in whole_batch) > 1e-3  # far above the tolerance below
    for a, b in zip(skipping, whole_batch):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_steps_mode_trains_on_a_step_file(tmp_path, world, model_cache):
    """The release's method: G samples of teacher-forced step prompts from an official-schema file."""
    config = run_config(tmp_path, world, model_cache, "steps", mode="steps", sft_steps=0, train_steps=1,
                        eval_every=0, questions_per_step=3, group_size=2)
    sg.main(["--config", str(config)])
    row = json.loads((tmp_path / "steps" / "metrics.jsonl").read_text())
    assert row["phase"] == "grpo" and row["sampled_tokens"] > 0
    assert any(k.startswith("reward_") for k in row) and 0.0 <= row["zero_std_groups"] <= 1.0
    assert checkpoint.latest_checkpoint(tmp_path / "steps") is not None


def stand_in_images(step_file, folder):
    """A picture for every image a step file names, under its file name (the real ones are not here)."""
    import data
    from conftest import random_image
    folder.mkdir(exist_ok=True)
    names = {Path(p["image"]).name for s in data.load_step_file(step_file) for p in s.parts if p["type"] == "image"}
    for i, name in enumerate(sorted(names)):
        random_image(i, (56, 84)).save(folder / name, format="JPEG")
    return names


def test_steps_mode_trains_on_the_authors_step_file_with_an_image_root(tmp_path, world, model_cache, capsys):
    """The release's step file (the sample: 10 trajectories, 23 image steps naming the authors'
    absolute paths). Without image_root: refused before training, with the count and the first
    path. With it: several updates, image steps among them; with a tight max_prompt_tokens,
    passages are cut and counted."""
    step_file = SAMPLES / "grpo_dataset_valid_new.jsonl"
    config = run_config(tmp_path, world, model_cache, "official", mode="steps", steps_file=str(step_file),
                        sft_steps=0, train_steps=3, eval_every=0, questions_per_step=4, group_size=2,
                        max_new_tokens_plan=8, max_new_tokens_answer=8, max_prompt_tokens=700)
    with pytest.raises(SystemExit):
        sg.main(["--config", str(config)])
    err = capsys.readouterr().err
    assert "23 of 23 image steps have no image file (first: /home/" in err and "image_root" in err
    assert not (tmp_path / "official").exists()
    names = stand_in_images(step_file, tmp_path / "images")
    assert len(names) == 5
    sg.main(["--config", str(config), "--image_root", str(tmp_path / "images")])
    rows = [json.loads(line) for line in (tmp_path / "official" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["sampled_tokens"] > 0 for r in rows)
    assert sum(r["passages_cut"] for r in rows) > 0


def test_skip_missing_images_leaves_those_steps_out(tmp_path):
    import data
    step_file = SAMPLES / "grpo_dataset_valid_new.jsonl"
    samples = data.load_step_file(step_file, tmp_path)
    kept = data.step_images_present(samples, step_file, skip_missing=True)
    assert len(samples) - len(kept) == 23 and not any(p["type"] == "image" for s in kept for p in s.parts)


def test_image_goes_after_the_text_as_in_the_release():
    text = protocol.render_prompt("system", "Origin question: which lake is this?", True)
    assert text.endswith("which lake is this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_the_cap_drops_the_lowest_ranked_passages_first():
    user = "Header:ter-0: first passage\nter-1: second passage\ntir-0: third\n\n Give me the answer to: q"
    assert protocol.count_passages(user) == 3
    assert protocol.drop_last_passages(user, 1) == "Header:ter-0: first passage\nter-1: second passage\n\n Give me the answer to: q"
    assert protocol.drop_last_passages(user, 3) == "Header:\n\n Give me the answer to: q"
    assert protocol.drop_last_passages(user, 0) == user


def test_the_supervised_update_is_the_same_in_one_batch_or_length_sorted_micro_batches(policy_and_samples):
    policy, steps = policy_and_samples
    prompts, targets = [s.prompt_ids for s in steps], [s.completion_ids[:3 + i] for i, s in enumerate(steps)]
    grads = []
    for micro in (4, 1):
        optimizer = torch.optim.SGD(sg._trainable(policy), lr=0.0)  # a step that changes nothing
        loss = sg.supervised_update(policy, optimizer, prompts, targets, [None] * 4, Config(micro_batch=micro,
                                                                                              max_grad_norm=1e9))
        grads.append((loss, [p.grad.clone() for p in sg._trainable(policy)]))
    (loss_a, a), (loss_b, b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))


def test_the_training_metrics_say_how_spread_routing_is_and_how_right_per_round():
    import rollout
    from data import Hop
    hops = [Hop("q1", "a", ["d"], gold_experts=["text"]), Hop("q2", "b", ["e"], gold_experts=["table"])]
    plan = lambda hop, kind: rollout.Step("plan", [], [1], [0.0], "", True, experts=[kind], hop=hop)
    trajectories = [rollout.Trajectory("q", 0, "Q?", None, steps=[plan(0, "text"), plan(1, "table")]),
                    rollout.Trajectory("q", 1, "Q?", None, steps=[plan(0, "image"), plan(1, "table")])]
    stats = sg.routing_stats(trajectories, {"q": hops})
    assert stats["routing_accuracy_round1"] == 0.5 and stats["routing_accuracy_round2"] == 1.0
    samples = [sg.Sample(s, None, 0.0) for t in trajectories for s in t.steps]
    policy = type("P", (), {"device": torch.device("cpu")})()
    row = sg.step_metrics({}, samples, trajectories, {"q": hops}, 0.0, 1.0, policy)
    shares = np.array([1, 1, 2]) / 4  # text, image, table calls
    assert row["expert_entropy"] == pytest.approx(-(shares * np.log(shares)).sum())


def test_steps_mode_metrics_read_the_experts_from_the_sampled_plans():
    import rollout
    from experts import EXPERT_NAMES
    texts = [f"<think>t</think><sub-question>Who?</sub-question><ret>{EXPERT_NAMES[k]}</ret>"
             for k in ("text", "text", "table")]
    texts.append("no tags")
    samples = [sg.Sample(rollout.Step("plan", [], [1], [0.0], t, True), None, 0.0) for t in texts]
    policy = type("P", (), {"device": torch.device("cpu")})()
    row = sg.step_metrics({}, samples, [], {}, 0.0, 1.0, policy)
    assert (row["expert_text"], row["expert_table"], row["expert_image"]) == (0.5, 0.25, 0.0)
    shares = np.array([2, 1]) / 3
    assert row["expert_entropy"] == pytest.approx(-(shares * np.log(shares)).sum())
    assert row["valid_plan_fraction"] == 0.75 and "routing_accuracy" not in row
