"""The policy: real 4-bit QLoRA on the tiny Qwen2.5-VL, log-probs, the reference, the protocol parsers."""
import random

import bitsandbytes as bnb
import pytest
import numpy as np
import torch

import more
import protocol
from conftest import nonzero_lora, random_image

EXPERTS = [("Text Retriever", "encyclopedia passages"), ("Text Image Retriever", "pictures"),
           ("Table Retriever", "tables")]
NAMES = [name for name, _ in EXPERTS]


def mixed_batch(policy):
    """An image prompt and two text-only prompts of different lengths (so left padding is exercised)."""
    system = protocol.plan_system_prompt(EXPERTS)
    encode = lambda user, image=None: more.encode_prompt(
        policy.processor, protocol.render_prompt(system, user, image is not None), image)
    return [encode("Origin question: what is pictured here?", random_image(0)),
            encode("Origin question: who founded the city of Velora in the north?"),
            encode("Origin question: how tall?"),
            encode("Origin question: which river?", random_image(1, (84, 56)))]


def batch_tensors(policy, prompts, completions):
    tok = policy.tokenizer
    return more.collate(prompts, completions, tok.pad_token_id, tok.convert_tokens_to_ids("<|image_pad|>"))


# ---------------------------------------------------------------------------------------- QLoRA

def test_only_lora_trains_and_vision_tower_is_untouched(shared_policy):
    core = shared_policy.model.get_base_model()
    trainable = [n for n, p in shared_policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(".language_model." in n for n in trainable)
    for name, module in core.model.visual.named_modules():
        assert not isinstance(module, bnb.nn.Linear4bit), f"vision module {name} is quantised"
        assert not hasattr(module, "lora_A"), f"vision module {name} is adapted"
    lm_linears = [m for n, m in core.model.language_model.named_modules() if n.endswith(("_proj",))]
    assert lm_linears and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lm_linears)
    assert all(m.base_layer.weight.quant_state.quant_type == "nf4" for m in lm_linears)


def test_one_adamw_step_changes_lora_weights_and_nothing_else(tiny_cfg):
    policy = more.load_policy(tiny_cfg)
    prompts = mixed_batch(policy)
    completions = [c.ids for c in more.sample(policy, prompts, "plan", 12)]
    inputs, mask = batch_tensors(policy, prompts, completions)
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    quantised_before = {n: b.detach().clone() for n, b in policy.model.state_dict().items()}
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    logp = more.token_logprobs(policy, inputs, mask)
    (-logp.sum() / mask.sum()).backward()
    optimizer.step()
    after = dict(policy.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    for name, tensor in policy.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, quantised_before[name]), f"{name} changed"


def test_gradient_checkpointing_still_gives_lora_gradients(tiny_cfg):
    tiny_cfg.gradient_checkpointing = True
    policy = more.load_policy(tiny_cfg)
    policy.model.train()
    assert policy.model.get_base_model().is_activation_checkpointing
    prompts = mixed_batch(policy)[:2]
    inputs, mask = batch_tensors(policy, prompts, [[5, 6, 7], [8, 9]])
    more.token_logprobs(policy, inputs, mask).sum().backward()
    # lora_B gets the gradient at init (lora_A's is B^T·… = 0 while B = 0).
    grads = [p.grad for n, p in policy.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------- log-probs

def test_sampling_logprobs_equal_teacher_forced_logprobs(shared_policy):
    torch.manual_seed(0)
    prompts = mixed_batch(shared_policy)
    completions = more.sample(shared_policy, prompts, "plan", 24, temperature=0.9)
    # Rows of different lengths in one batch (a prefix's log-probs are those of its tokens), so
    # that a mask or padding off by one position on a ragged batch fails the comparison.
    cut = [(c.ids[:n], c.logprobs[:n]) for c, n in zip(completions, (24, 7, 1, 16, 11, 3, 24, 20))]
    assert len({len(ids) for ids, _ in cut}) > 1
    inputs, mask = batch_tensors(shared_policy, prompts, [ids for ids, _ in cut])
    recomputed = more.token_logprobs(shared_policy, inputs, mask, temperature=0.9)
    for row, (ids, logprobs) in enumerate(cut):
        assert len(logprobs) == len(ids) > 0 and int(mask[row].sum()) == len(ids)
        assert torch.allclose(torch.tensor(logprobs), recomputed[row][mask[row]], atol=1e-5, rtol=0)
    assert recomputed[~mask].abs().sum() == 0


def test_mm_token_type_ids_matter_for_image_prompts(shared_policy):
    """Guard for docs/PROTOCOL.md, trap 1: without mm_token_type_ids the positions (and log-probs) change."""
    prompts = mixed_batch(shared_policy)[:1]
    inputs, mask = batch_tensors(shared_policy, prompts, [[11, 12, 13, 14]])
    with_types = more.token_logprobs(shared_policy, inputs, mask)
    inputs.pop("mm_token_type_ids")
    without = more.token_logprobs(shared_policy, inputs, mask)
    assert (with_types - without).abs().max() > 1e-4


def test_reference_is_the_base_model_before_and_after_training(tiny_cfg):
    from transformers import Qwen2_5_VLForConditionalGeneration
    policy = more.load_policy(tiny_cfg)
    prompts = mixed_batch(policy)
    inputs, mask = batch_tensors(policy, prompts, [[40, 41, 42], [43, 44], [45], [46, 47, 48, 49]])
    # One set of base weights: every quantised layer of the language model appears exactly once.
    n_quantised = sum(isinstance(m, bnb.nn.Linear4bit) for m in policy.model.modules())
    core = policy.model.get_base_model()
    assert n_quantised == 7 * core.config.text_config.num_hidden_layers
    assert not any(isinstance(m, Qwen2_5_VLForConditionalGeneration) for m in core.modules() if m is not core)
    ref_before = more.reference_logprobs(policy, inputs, mask)
    assert torch.equal(ref_before, more.token_logprobs(policy, inputs, mask).detach())  # LoRA B starts at 0
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=5e-2)
    (-more.token_logprobs(policy, inputs, mask).sum()).backward()
    optimizer.step()
    ref_after = more.reference_logprobs(policy, inputs, mask)
    policy_after = more.token_logprobs(policy, inputs, mask).detach()
    assert torch.equal(ref_before, ref_after)
    assert (policy_after - ref_after)[mask].abs().max() > 1e-4
    # And it is the base model: the same checkpoint loaded without any adapter gives the same numbers.
    from peft import PeftModel
    assert isinstance(policy.model, PeftModel)
    base = more.Policy(model=core, processor=policy.processor, device=policy.device,
                       suppress_ids=policy.suppress_ids)
    with policy.model.disable_adapter():
        assert torch.equal(more.token_logprobs(base, inputs, mask).detach(), ref_after)


def test_sampled_completions_stop_at_the_closing_tag_and_never_emit_vision_tokens(shared_policy):
    torch.manual_seed(1)
    prompts = mixed_batch(shared_policy) * 4
    completions = more.sample(shared_policy, prompts, "plan", 32, temperature=1.5)
    for completion in completions:
        assert not set(completion.ids) & set(shared_policy.suppress_ids)
        if not completion.truncated:
            ends_turn = completion.ids[-1] == shared_policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert ends_turn or completion.text.rstrip().endswith("</ret>") or "</ret>" in completion.text


def test_stopper_ends_each_row_at_the_first_closing_tag_or_end_of_turn(shared_policy):
    """Step by step as the decode loop calls it, on random rows with tags planted: the length recorded is
    the first prefix whose text holds the tag (or ends the turn), whatever token completes it."""
    tok = shared_policy.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rng = np.random.RandomState(0)
    rows = []
    for r in range(40):
        ids = rng.randint(0, 1900, size=30).tolist()
        if r % 4 == 0:
            ids[rng.randint(5, 30)] = eos
        elif r % 4 != 3:  # a planted tag, tokenised in context (sometimes merged with what follows)
            at = rng.randint(0, 25)
            ids = ids[:at] + tok("x</ret>" + ("\n" if r % 2 else ""), add_special_tokens=False)["input_ids"] + ids[at:]
        rows.append(ids[:30])
    prompt = [5, 6, 7]
    batch = torch.tensor([prompt + ids for ids in rows])
    stopper = more._StopAtTag(tok, len(prompt), "</ret>", eos)
    for t in range(1, 31):
        stopper(batch[:, :len(prompt) + t])
    for row, ids in enumerate(rows):
        expected = next((n for n in range(1, 31) if ids[n - 1] == eos or
                         "</ret>" in tok.decode(ids[:n][-16:], skip_special_tokens=False)), None)
        assert stopper.lengths.get(row) == expected, (row, tok.decode(ids))


def test_unreadable_image_is_a_clear_error(shared_policy, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        more.encode_prompt(shared_policy.processor, "x <|vision_start|><|image_pad|><|vision_end|>", bad)


# --------------------------------------------------------------------------------------- parsers

def test_parse_plan_well_formed():
    plan = protocol.parse_plan("<think>need the city</think><sub-question>Where is X?</sub-question>"
                           "<ret>Text Retriever</ret>", NAMES)
    assert plan.valid and plan.sub_question == "Where is X?" and plan.experts == ["Text Retriever"]
    assert plan.thought == "need the city" and not plan.stop


@pytest.mark.parametrize("missing", ["think", "sub-question", "ret"])
def test_parse_plan_each_missing_tag(missing):
    parts = {"think": "<think>t</think>", "sub-question": "<sub-question>q?</sub-question>",
             "ret": "<ret>Table Retriever</ret>"}
    text = "".join(v for k, v in parts.items() if k != missing)
    plan = protocol.parse_plan(text, NAMES)
    assert not plan.valid and f"<{missing}>" in plan.reason


def test_parse_plan_unknown_expert_is_invalid_and_named():
    plan = protocol.parse_plan("<think>t</think><sub-question>q?</sub-question><ret>Web Search</ret>", NAMES)
    assert not plan.valid and "Web Search" in plan.reason


def test_parse_plan_several_experts_mixed_case_and_whitespace():
    text = ("\n <THINK> two sources </think>\n<Sub-Question> How tall is Y? </sub-question>  "
            "<ret> table retriever, TEXT RETRIEVER, Table Retriever </RET>\n")
    plan = protocol.parse_plan(text, NAMES)
    assert plan.valid and plan.experts == ["Table Retriever", "Text Retriever"]
    assert plan.sub_question == "How tall is Y?"


def test_parse_plan_none_none_stops_and_half_none_is_invalid():
    stop = protocol.parse_plan("<think>enough</think><sub-question>None</sub-question><ret>none</ret>", NAMES)
    assert stop.valid and stop.stop and stop.experts == []
    half = protocol.parse_plan("<think>t</think><sub-question>None</sub-question><ret>Text Retriever</ret>", NAMES)
    assert not half.valid and "None" in half.reason


def test_parse_plan_empty_sub_question_and_empty_ret():
    assert "empty" in protocol.parse_plan("<think></think><sub-question> </sub-question><ret>Text Retriever</ret>",
                                      NAMES).reason
    assert not protocol.parse_plan("<think></think><sub-question>q</sub-question><ret> , </ret>", NAMES).valid


def test_parse_answer_cases():
    good = protocol.parse_answer("<think>it says 1899</think>\n<answer> 9 December 1899 </answer>")
    assert good.valid and good.answer == "9 December 1899"
    assert "<answer>" in protocol.parse_answer("<think>t</think> 1899").reason
    assert "<think>" in protocol.parse_answer("<answer>1899</answer>").reason
    assert protocol.parse_answer("<think>t</think><answer>  </answer>").reason == "empty <answer>"
    assert protocol.parse_answer(" <THINK>a</THINK>\n<ANSWER>B</ANSWER> ").answer == "B"
    assert protocol.parse_answer("noise <think>a</think><answer>B</answer>").reason == "text outside the protocol tags"


def test_parsers_never_raise_on_random_text():
    rng = random.Random(0)
    alphabet = list("<>/ ,.-abcdefghijklmnopqrstuvwxyzNOE\n\t") + ["<think>", "</think>", "<ret>", "</ret>",
               "<sub-question>", "</sub-question>", "<answer>", "</answer>", "None", "Table Retriever", "\x00"]
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        plan, answer = protocol.parse_plan(text, NAMES), protocol.parse_answer(text)
        assert isinstance(plan.valid, bool) and (plan.valid or plan.reason)
        assert isinstance(answer.valid, bool) and (answer.valid or answer.reason)
    assert not protocol.parse_plan(None, NAMES).valid and not protocol.parse_answer(b"bytes").valid


def test_plan_prompt_lists_the_configured_experts_only():
    prompt = protocol.plan_system_prompt([("Text Retriever", "passages"), ("Table Retriever", "tables")])
    assert "Text Retriever, Table Retriever" in prompt and "Text Image Retriever" not in prompt
    assert "`Table Retriever`: tables" in prompt


def test_train_lm_head_trains_a_copy_and_keeps_the_reference_exact(tiny_cfg):
    tiny_cfg.train_lm_head = True
    policy = more.load_policy(tiny_cfg)
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n in trainable) and all("lora_" in n or "lm_head" in n for n in trainable)
    prompts = mixed_batch(policy)
    inputs, mask = batch_tensors(policy, prompts, [[40, 41], [42], [43, 44], [45]])
    ref_before = more.reference_logprobs(policy, inputs, mask)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=5e-2)
    (-more.token_logprobs(policy, inputs, mask).sum()).backward()
    optimizer.step()
    assert torch.equal(ref_before, more.reference_logprobs(policy, inputs, mask))
    assert (more.token_logprobs(policy, inputs, mask).detach() - ref_before)[mask].abs().max() > 1e-3


def test_greedy_decoding_equals_generate_token_for_token(shared_policy):
    """The hand-written decode loop against transformers' `generate` (a trusted implementation of
    the KV cache and M-RoPE positions), greedy, on image and text-only prompts with left padding.
    Two prompts come twice (the same objects, as a GRPO group repeats them): those are prefilled once
    and their cache shared."""
    from transformers import GenerationConfig
    prompts = mixed_batch(shared_policy)
    prompts = prompts + prompts[:2]
    tok = shared_policy.tokenizer
    inputs, _ = batch_tensors(shared_policy, prompts, [[] for _ in prompts])
    for kind, budget in (("plan", 40), (None, 24)):
        ours = more.sample(shared_policy, prompts, kind, budget, temperature=0.0)
        config = GenerationConfig(do_sample=False, max_new_tokens=budget, min_new_tokens=0 if kind else budget,
                                  suppress_tokens=shared_policy.suppress_ids, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        with torch.no_grad():
            out = shared_policy.model.generate(**inputs, generation_config=config, output_logits=True,
                                               return_dict_in_generate=True)
        reference = out.sequences[:, inputs["input_ids"].shape[1]:]
        logits = torch.stack(out.logits, 1).float()  # the policy's raw logits at each step, as generate saw them
        logits[..., shared_policy.suppress_ids] = float("-inf")
        expected = torch.log_softmax(logits, -1).gather(2, reference[..., None])[..., 0]
        for row, completion in enumerate(ours):
            n = len(completion.ids)
            assert completion.ids == reference[row, :n].tolist()
            assert n == budget or kind  # fixed-size work runs to the budget
            assert torch.allclose(torch.tensor(completion.logprobs), expected[row, :n], atol=1e-5, rtol=0)


def test_rows_sharing_a_prompt_get_the_log_probs_and_gradient_of_rows_of_their_own(tiny_cfg):
    """token_logprobs runs a prompt repeated in the batch once, completions packed after it under
    a segment mask (more._pack); each row computed alone (no repeats: the plain forward) is the
    reference. Image and text-only groups, ragged completions, a one-token completion."""
    policy = more.load_policy(tiny_cfg)
    nonzero_lora(policy)  # so that the adapter's gradient flows through the prompt
    image, text, other = mixed_batch(policy)[:3]
    # The same text and image-token count as `image`, another picture: a group of its own.
    lookalike = more.encode_prompt(policy.processor, protocol.render_prompt(
        protocol.plan_system_prompt(EXPERTS), "Origin question: what is pictured here?", True), random_image(5))
    assert lookalike.ids == image.ids
    prompts = [image, text, image, other, text, lookalike, image]
    completions = [[40, 41, 42], [43, 44], [45], [46, 47, 48, 49], [50, 51, 52, 53, 54], [57, 58, 59], [55, 56]]
    policy.model.train()
    inputs, mask = batch_tensors(policy, prompts, completions)
    shared = more.token_logprobs(policy, inputs, mask)
    shared.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    policy.model.zero_grad()
    alone = []
    for prompt, completion in zip(prompts, completions):
        row_inputs, row_mask = batch_tensors(policy, [prompt], [completion])
        logp = more.token_logprobs(policy, row_inputs, row_mask)
        logp.sum().backward()
        alone.append(logp[row_mask].detach())
    for row, expected in enumerate(alone):
        assert torch.allclose(shared[row][mask[row]].detach(), expected, atol=1e-5, rtol=0)
    for name, p in policy.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[name], p.grad, atol=1e-5, rtol=1e-4), name
    assert len(more._prompt_groups(inputs, mask, more._images_by_row(more._core(policy.model), inputs))) == 4


def test_draws_follow_the_truncated_distribution_and_never_pick_a_suppressed_token():
    """more._draw samples by inverse CDF: the frequencies of 40,000 draws match the softmax after
    top-k / top-p truncation, and a token of zero mass (suppressed, or cut by top-p) never comes."""
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03, 0.0]])).expand(40_000, -1)
    suppress = torch.tensor([1])
    for top_p, expected in ((1.0, [0.5 / 0.75, 0, 0.15 / 0.75, 0.07 / 0.75, 0.03 / 0.75, 0]),
                            (0.9, [0.5 / 0.72, 0, 0.15 / 0.72, 0.07 / 0.72, 0, 0])):
        tokens, logp = more._draw(logits, suppress, 1.0, top_p, 0, None)
        freq = torch.bincount(tokens, minlength=6).double() / len(tokens)
        assert torch.allclose(freq, torch.tensor(expected, dtype=torch.double), atol=0.01), (top_p, freq)
        assert freq[1] == 0 and freq[5] == 0
        assert torch.allclose(logp, torch.log_softmax(logits.index_fill(1, suppress, float("-inf")), -1)
                              .gather(1, tokens[:, None])[:, 0])  # the policy's log-prob, before truncation
