"""The rollout loop: G trajectories per question, reasoning step by step with live expert calls.

One round = plan step → parse → one batched call per chosen expert → sub-answer step over the top
passages → history grows. Rounds end on `None`/`None`, on an invalid step, or after `max_steps`;
then every trajectory writes its final answer (docs/PROTOCOL.md, "The step protocol").

Token-in, token-out. Each step is its own sequence: a prompt rendered from the history text
(never scored) followed by the completion ids exactly as sampled (scored). The scored ids are never
decoded and re-encoded, so the log-probs of the loss are those of the sampled tokens.

Invalid steps: a malformed plan or sub-answer is recorded with its reason and ends the retrieval
rounds of that trajectory; its final-answer step still runs, so every trajectory has an outcome.
An expert that raises becomes a failed ExpertCall with the error, and its passages are empty.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import more
import protocol
from config import load_config, run_command
from data import Question
from experts import EXPERT_NAMES, Query, build_experts, write_jsonl
from protocol import StepPrompt
from world import ensure_world

# ----------------------------------------------------------------------------------------------
# Where the time goes. The method's code marks its phases (`with phase("generation"):`); a caller
# that wants the times opens `with timed(device) as clock:` around it and reads clock.seconds
# (bench.py, the metrics of every training update). No clock is passed through the method.


class PhaseClock:
    """Wall-clock seconds per named phase, summed over the phases' occurrences.

    On CUDA the device is synchronised at both ends of a phase, so asynchronous GPU work is charged
    to the phase that launched it rather than to whichever phase next waits for it.
    """

    def __init__(self, device=None):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self):
        if self.device is not None and getattr(self.device, "type", "") == "cuda":
            import torch
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start


_CLOCK: ContextVar[PhaseClock | None] = ContextVar("phase_clock", default=None)


@contextmanager
def timed(device=None):
    """Time every phase run inside this block on a new PhaseClock, which the block receives."""
    clock = PhaseClock(device)
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


@contextmanager
def phase(name: str):
    """Charge this block's time to `name` on the clock of the enclosing `timed` block, if any."""
    clock = _CLOCK.get()
    if clock is None:
        yield
        return
    with clock(name):
        yield


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class ExpertCall:
    expert: str  # kind: text, image, table
    query: str
    image: str | None
    hit_ids: list[str]
    scores: list[float]
    ms: float  # the batched call's time, shared by all queries of that call
    error: str = ""


@dataclass
class Step:
    kind: str  # "plan", "answer" or "final"
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # sampling-time log-probs of completion_ids
    text: str
    valid: bool
    reason: str = ""
    sub_question: str = ""  # plan steps
    experts: list[str] = field(default_factory=list)  # plan steps: kinds chosen
    stop: bool = False  # plan steps: None/None
    answer: str = ""  # answer and final steps
    calls: list[ExpertCall] = field(default_factory=list)
    probe: dict[str, bool] = field(default_factory=dict)  # plan steps with gold: kind -> top-k holds gold
    hop: int = 0  # round index (0-based)


@dataclass
class Trajectory:
    question_id: str
    group_index: int
    question: str
    image: str | None
    steps: list[Step] = field(default_factory=list)
    final_answer: str = ""
    golds: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def retrieving_plans(trajectory: Trajectory, hops: list) -> list[Step]:
    """The valid plans that retrieve while a gold hop (data.Hop) is left: those routing is judged on."""
    return [s for s in trajectory.steps if s.kind == "plan" and s.valid and not s.stop and s.hop < len(hops)]


def routed_right(trajectory: Trajectory, hops: list) -> list[bool]:
    """Per retrieving plan whose hop some expert can answer: is its single expert one of the hop's
    gold experts (what the plan reward credits)? Hops no expert can answer are left out."""
    return [hops[s.hop].routed_by(s.experts) for s in retrieving_plans(trajectory, hops) if hops[s.hop].gold_experts]


# A sampler turns step prompts into (prompt ids, completion) pairs; `policy_sampler` is the real one.
Sampler = Callable[[list[StepPrompt], str], list[tuple[list[int], more.Completion]]]
# A router replaces the policy's routing of a valid plan, for evaluation baselines (eval.py):
# (gold hops, round, the policy's sub-question, its expert kinds) -> (sub-question, expert kinds).
Router = Callable[[list, int, str, list[str]], tuple[str, list[str]]]


def policy_sampler(policy: more.Policy, cfg) -> Sampler:
    """Sample with the policy: one batched `generate` per step kind, parameters from the config."""
    budgets = {"plan": cfg.max_new_tokens_plan, "answer": cfg.max_new_tokens_answer,
               "final": cfg.max_new_tokens_answer}

    def sample(prompts: list[StepPrompt], kind: str):
        with phase("prompt encoding"):
            # Equal prompts (a group's shared first plan; steps mode's G copies) are encoded once,
            # and more.sample prefills each encoded object once.
            distinct = {}
            for p in prompts:
                if (p.system, p.user, p.image) not in distinct:
                    distinct[p.system, p.user, p.image] = more.encode_prompt(
                        policy.processor, protocol.render_prompt(p.system, p.user, p.image is not None), p.image)
            encoded = [distinct[p.system, p.user, p.image] for p in prompts]
        with phase("generation"):
            completions = more.sample(policy, encoded, kind, budgets[kind], cfg.temperature, cfg.top_p, cfg.top_k)
        return [(e.ids, c) for e, c in zip(encoded, completions)]
    return sample


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class _State:
    """A trajectory being built, with the history it shows the policy."""
    trajectory: Trajectory
    gold_hops: list  # data.Hop list, or [] when the gold plan is unknown
    hops: list[tuple[str, str]] = field(default_factory=list)  # (sub-question, sub-answer)
    retrieving: bool = True


def rollout(sampler: Sampler, experts: list, questions: list, cfg, group_size: int = 1,
            image_root: str | Path | None = None, router: Router | None = None) -> list[Trajectory]:
    """`group_size` trajectories for each question (data.Question), all of them in every batched call.

    From the config: `max_steps` retrieval rounds, `retrieve_k` hits per expert call, `show_k` of
    them shown to the sub-answer step. `router`, when given, overrides what each valid plan asks and
    of whom (evaluation baselines).
    """
    states = [_State(Trajectory(q.qid, g, q.question, image_path(q.image, image_root), golds=list(q.answers)),
                     list(q.hops)) for q in questions for g in range(group_size)]
    system = protocol.system_prompts(experts, cfg.prompts)
    for hop in range(cfg.max_steps):
        active = [s for s in states if s.retrieving]
        if not active:
            break
        planned = _plan_round(sampler, active, experts, system.plan, hop, router)
        if planned:
            with phase("expert calls"):
                passages = _call_experts(experts, planned, hop, cfg.retrieve_k)
            _answer_round(sampler, planned, passages, hop, cfg.show_k, system)
    _final_round(sampler, states, system)
    return [s.trajectory for s in states]


def image_path(image, image_root):
    """A question's image path as the policy and experts open it: relative paths are under image_root."""
    if image is None or image_root is None or Path(image).is_absolute():
        return image
    return str(Path(image_root) / image)


def plan_step(text: str, kind_of: dict[str, str], prompt_ids=(), completion_ids=(), logprobs=(),
              hop: int = 0) -> Step:
    """A plan completion read into its Step: valid or why not, sub-question, the expert kinds it
    names (`kind_of` maps each expert's name to its kind), and whether it stops."""
    plan = protocol.parse_plan(text, list(kind_of))
    return Step("plan", list(prompt_ids), list(completion_ids), list(logprobs), text, plan.valid, plan.reason,
                plan.sub_question, [kind_of[n] for n in plan.experts], plan.stop, hop=hop)


def _plan_round(sampler, active, experts, plan_system, hop, router=None):
    """Plan step for every active trajectory; returns those that chose experts."""
    prompts = [StepPrompt(plan_system, protocol.history_text(s.trajectory.question, s.hops), s.trajectory.image)
               for s in active]
    kind_of = {e.name: e.kind for e in experts}
    planned = []
    for state, (prompt_ids, completion) in zip(active, sampler(prompts, "plan")):
        step = plan_step(completion.text, kind_of, prompt_ids, completion.ids, completion.logprobs, hop)
        if completion.truncated and not step.valid:
            step.reason = f"runaway length ({len(completion.ids)} tokens); " + step.reason
        if router and step.valid and not step.stop:
            step.sub_question, step.experts = router(state.gold_hops, hop, step.sub_question, step.experts)
        state.trajectory.steps.append(step)
        if step.valid and not step.stop:
            planned.append(state)
        else:
            state.retrieving = False
    return planned


def _call_experts(experts, planned, hop, retrieve_k) -> list[list]:
    """One batched search per expert; returns each trajectory's hits from the experts it chose.

    With a gold plan every expert is asked (the all-expert probe): `step.probe[kind]` says whether
    that expert's top-k holds the gold evidence of this round's gold hop.
    """
    passages: list[list] = [[] for _ in planned]
    for expert in experts:
        asked = [row for row, s in enumerate(planned) if expert.kind in s.trajectory.steps[-1].experts or s.gold_hops]
        if not asked:
            continue
        queries = [Query(planned[row].trajectory.steps[-1].sub_question, planned[row].trajectory.image) for row in asked]
        start = time.perf_counter()
        try:
            results, error = expert.search(queries, retrieve_k), ""
        except Exception as err:  # a failing expert must not end the rollout
            results, error = [[] for _ in queries], f"{type(err).__name__}: {err}"
        ms = 1000 * (time.perf_counter() - start)
        for row, query, hits in zip(asked, queries, results):
            state = planned[row]
            step = state.trajectory.steps[-1]
            if state.gold_hops:
                gold = set(state.gold_hops[min(hop, len(state.gold_hops) - 1)].gold_docs)
                step.probe[expert.kind] = bool(gold & {h.doc_id for h in hits})
            if expert.kind in step.experts:
                step.calls.append(ExpertCall(expert.kind, query.text, _as_str(query.image), [h.doc_id for h in hits],
                                             [h.score for h in hits], ms, error))
                passages[row] += hits
    return passages


def _as_str(image):
    return None if image is None else str(image)


def _answer_round(sampler, planned, passages, hop, show_k, system: protocol.SystemPrompts):
    """Sub-answer step over the top `show_k` passages of each chosen expert, in the order chosen."""
    prompts = []
    for state, hits in zip(planned, passages):
        plan = state.trajectory.steps[-1]
        by_expert = {}
        for hit in hits:
            by_expert.setdefault(hit.expert, []).append(hit)
        shown = [h for kind in plan.experts for h in by_expert.get(kind, [])[:show_k]]
        user = protocol.answer_user_text(plan.sub_question, shown, system.passages_header)
        prompts.append(StepPrompt(system.answer, user, state.trajectory.image))
    for state, (prompt_ids, completion) in zip(planned, sampler(prompts, "answer")):
        parsed = protocol.parse_answer(completion.text)
        plan = state.trajectory.steps[-1]
        state.trajectory.steps.append(Step("answer", prompt_ids, completion.ids, completion.logprobs, completion.text,
                                           parsed.valid, parsed.reason, answer=parsed.answer, hop=hop))
        if parsed.valid:
            state.hops.append((plan.sub_question, parsed.answer))
        else:
            state.retrieving = False


def _final_round(sampler, states, system: protocol.SystemPrompts):
    prompts = [StepPrompt(system.final, protocol.final_user_text(s.trajectory.question, s.hops),
                          s.trajectory.image) for s in states]
    for state, (prompt_ids, completion) in zip(states, sampler(prompts, "final")):
        parsed = protocol.parse_answer(completion.text)
        state.trajectory.steps.append(Step("final", prompt_ids, completion.ids, completion.logprobs, completion.text,
                                           parsed.valid, parsed.reason, answer=parsed.answer, hop=len(state.hops)))
        state.trajectory.final_answer = parsed.answer


def training_batch(policy: more.Policy, steps: list[Step], images: list[str | None]):
    """Teacher-forced model inputs for recorded steps: their own ids, their images' pixels again.

    Returns (inputs, completion_mask) as `more.collate` does; the mask is each step's loss mask,
    left-padded. The prompt ids already hold the expanded image tokens; only pixels are recomputed.
    """
    tok = policy.tokenizer
    pixels = {}
    encoded = []
    for step, image in zip(steps, images):
        if image is not None and image not in pixels:
            pixels[image] = more.encode_prompt(policy.processor, "<|vision_start|><|image_pad|><|vision_end|>", image)
        with_image = pixels.get(image) if image is not None else None
        encoded.append(more.EncodedPrompt(step.prompt_ids, with_image and with_image.pixel_values,
                                          with_image and with_image.image_grid_thw))
    return more.collate(encoded, [s.completion_ids for s in steps], tok.pad_token_id,
                        tok.convert_tokens_to_ids("<|image_pad|>"))


# ----------------------------------------------------------------------------------------------
# Traces


def write_traces(path: str | Path, trajectories: list[Trajectory], step: int | None = None) -> None:
    """Append trajectories as JSON lines; `step` (the training update) lets a resume drop later rows."""
    write_jsonl(path, [t.to_json() if step is None else {"step": step, **t.to_json()} for t in trajectories],
                append=True)


def format_trace(t: Trajectory, max_hits: int = 3) -> str:
    """A readable account of one trajectory: thought, sub-question, expert, top hits, answers."""
    lines = [f"Question: {t.question}" + (f"   [image: {t.image}]" if t.image else "")]
    for step in t.steps:
        status = "" if step.valid else f"   INVALID: {step.reason}"
        if step.kind == "plan":
            what = "stop (None/None)" if step.stop else f"ask {', '.join(EXPERT_NAMES[k] for k in step.experts) or '-'}"
            lines.append(f"[round {step.hop + 1}] plan: {what}: {step.sub_question!r}{status}")
            for call in step.calls:
                hits = ", ".join(f"{i} ({s:.2f})" for i, s in zip(call.hit_ids[:max_hits], call.scores))
                lines.append(f"    {call.expert} expert ({call.ms:.0f} ms): {call.error or hits}")
        else:
            lines.append(f"[{'final' if step.kind == 'final' else 'round %d' % (step.hop + 1)}] "
                         f"{step.kind}: {step.answer!r}{status}")
        if not step.valid:
            lines.append(f"    raw: {step.text[:160]!r}")
    lines.append(f"Final answer: {t.final_answer!r}")
    return "\n".join(lines)


def answer_question(cfg, question: str, image: str | None = None, checkpoint: str | None = None) -> Trajectory:
    """`python rollout.py --config C "question"`: one trajectory with the live experts, printed."""
    ensure_world(cfg)
    experts = build_experts(cfg)
    policy = more.load_policy(cfg, adapter_dir=checkpoint)
    trajectory = rollout(policy_sampler(policy, cfg), experts, [Question("cli", "0", question, [], image)], cfg)[0]
    print(format_trace(trajectory))
    return trajectory


def main(argv=None):
    parser = argparse.ArgumentParser(description="Answer one question with MoRE and print its trace.")
    parser.add_argument("question")
    parser.add_argument("--config", required=True, help="a JSON config, e.g. tiny.json")
    parser.add_argument("--image", default=None, help="an image file to ask about")
    parser.add_argument("--checkpoint", default=None, help="a trained adapter: a run folder, a checkpoint or an adapter folder")
    args, overrides = parser.parse_known_args(argv)
    run_command("rollout.py", lambda: answer_question(load_config(args.config, overrides), args.question, args.image,
                                                      args.checkpoint))


if __name__ == "__main__":
    main()
