"""The MoRE policy: a 4-bit QLoRA Qwen2.5-VL, how it turns step prompts into samples, and its log-probs.

Read top to bottom: the processor → loading the policy → turning prompts into tensors → sampling
(a hand-written decode loop) → log-probs. Architecture presets and the tiny offline model are in
presets.py. The step protocol it speaks (prompts and
parsers) is protocol.py; asking a question from the command line is `python rollout.py`.
Nothing here knows about rewards or optimisers.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import MANIFEST, latest_checkpoint, verify_manifest
from config import UserError
from decode import Decoder
from experts import read_image
from presets import materialize_random_model
from protocol import CLOSING_TAG

# ----------------------------------------------------------------------------------------------
# Loading the processor: Qwen2.5-VL's tokenizer and image processor, for the tiny and the real model.

# A random or young policy samples these; the next forward then fails with "Image features and image
# tokens do not match" (docs/PROTOCOL.md, trap 2). They are never valid output, so they are outside the policy.
VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def _processor_class():
    """Qwen2.5-VL's processor without its video half (which needs torchvision, absent beside CPU torch)."""
    from transformers import Qwen2_5_VLProcessor

    class ImageTextProcessor(Qwen2_5_VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

        def __call__(self, images=None, text=None, **kwargs):
            # TRL passes one entry per prompt, None for a text-only one; transformers refuses the None.
            # The images fill the <|image_pad|> placeholders in order, so the flat list is the same input.
            if isinstance(images, list) and any(entry is None or isinstance(entry, list) for entry in images):
                images = [im for entry in images if entry for im in (entry if isinstance(entry, list) else [entry])]
            return super().__call__(images=images or None, text=text, **kwargs)
    return ImageTextProcessor


def load_processor(path: str, min_pixels: int, max_pixels: int):
    """Tokenizer + image processor with the configured pixel caps (image tokens = pixels / 28²)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, min_pixels=min_pixels,
                                                               max_pixels=max_pixels)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation appends on the right
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------
# Loading the policy: 4-bit NF4 base, vision tower kept in full precision and frozen, LoRA on the
# language model's linear layers only.

@dataclass
class Policy:
    model: torch.nn.Module  # a peft PeftModel around Qwen2_5_VLForConditionalGeneration
    processor: object
    device: torch.device
    suppress_ids: list[int]  # token ids outside the policy's support (VISION_TOKENS)

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def resolve_model_path(cfg) -> str:
    """Where the weights come from: the tiny model or a random preset are built locally first.

    Local paths are made absolute, so that a saved adapter names its base model from any directory.
    """
    if cfg.model_name == "tiny":
        path = materialize_random_model(cfg.arch, Path(cfg.model_cache) / f"{cfg.arch}-seed{cfg.seed}", cfg.seed)
    elif cfg.random_init:
        path = materialize_random_model(cfg.arch, Path(cfg.model_cache) / f"{cfg.arch}-random", cfg.seed)
    else:
        path = Path(cfg.model_name)
        if not path.exists():
            return cfg.model_name  # a hub id
    return str(path.resolve())


def find_adapter(path: str | Path) -> Path:
    """The LoRA adapter folder behind a path: the adapter itself, a checkpoint, or a run's out_dir.

    A run's out_dir resolves through checkpoints/latest, so `--checkpoint runs/train-tiny` works.
    An adapter inside a checkpoint is verified against the checkpoint's manifest first.
    """
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            if (candidate.parent / MANIFEST).exists():
                verify_manifest(candidate.parent)
            return candidate
    latest = latest_checkpoint(path)
    if latest is not None:
        return find_adapter(latest)
    raise UserError(f"no LoRA adapter at {path}: expected adapter_config.json in it or in {path}/adapter, "
                    f"or a run folder with checkpoints/latest")


def keep_4bit_layers_trainable(model) -> None:
    """Turn off bitsandbytes' CPU-packed inference format on every 4-bit layer.

    On CPUs with AVX-512 BF16, bitsandbytes (0.50) repacks a Linear4bit's weights into an
    inference-only layout the first time the layer runs in eval mode without grad, i.e. at our first
    sampling call. That layout has no backward: training forwards afterwards either fail
    ("a view of a leaf Variable … in-place operation") or give no gradient to the layers below
    (measured here by forcing the flag on: half of the LoRA matrices got an all-zero gradient), and
    it keeps absmax in bf16, so sampled log-probs drift from the training ones (up to 1.5e-3, where
    Step-GRPO's ratio needs them equal). Converting back before every update would cost a repack per
    layer per update for a faster sampler with the wrong numbers; switching it off costs nothing.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base_model(cfg):
    """(model, processor, device): Qwen2.5-VL frozen, in 4-bit NF4 when configured, vision tower and
    head in full precision. scale_trl.py hands the same model to TRL."""
    from transformers import BitsAndBytesConfig, Qwen2_5_VLForConditionalGeneration
    device = pick_device(cfg.device)
    # bf16 compute on GPU; fp32 on CPU, where bf16 is ~5x slower without bf16 instructions (docs/PROTOCOL.md, trap 8).
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = resolve_model_path(cfg)
    quant = None
    if cfg.load_in_4bit:
        # Skip names match from the module-name start: "visual" alone would not catch the tower.
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                   llm_int8_skip_modules=["model.visual", "lm_head"])
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, quantization_config=quant, dtype=dtype, device_map={"": str(device)})
    model.requires_grad_(False)
    keep_4bit_layers_trainable(model)
    return model, load_processor(path, cfg.min_pixels, cfg.max_pixels), device


def load_policy(cfg, adapter_dir: str | None = None) -> Policy:
    """Qwen2.5-VL in 4-bit with a LoRA adapter (fresh, or loaded from `adapter_dir`: see find_adapter)."""
    model, processor, device = load_base_model(cfg)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # With a frozen embedding nothing upstream requires grad; without this the checkpointed
        # blocks receive no gradient and LoRA silently does not learn.
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft reads a property transformers has deprecated: noise for our users
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = _with_lora(model, cfg, adapter_dir)
    suppress = [processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return Policy(model=model, processor=processor, device=device, suppress_ids=suppress)


def lora_config(cfg):
    """LoRA on the language model's linear layers (scale_trl.py hands the same one to TRL)."""
    from peft import LoraConfig
    # A regex on language_model: a plain module list would also hit the vision tower's MLP.
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # A random tiny model's frozen head caps every token near chance (docs/PROTOCOL.md, trap 9): `train_lm_head`
    # trains a copy of the head (peft modules_to_save; disable_adapter() still uses the original).
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, init_lora_weights=True, bias="none",
                      modules_to_save=["lm_head"] if cfg.train_lm_head else None)


def _with_lora(model, cfg, adapter_dir: str | None):
    """The model with its LoRA adapter: loaded from `adapter_dir` (trainable), or fresh."""
    from peft import PeftModel, get_peft_model
    if adapter_dir:
        return PeftModel.from_pretrained(model, str(find_adapter(adapter_dir)), is_trainable=True)
    torch.manual_seed(cfg.seed)  # LoRA's init is then the same whether or not the model was just built
    return get_peft_model(model, lora_config(cfg))


# ----------------------------------------------------------------------------------------------
# From prompts to tensors. A prompt is (text, image or None); images are processed per prompt so
# that any prompt can later be re-batched with others for the teacher-forced forward.

@dataclass
class EncodedPrompt:
    ids: list[int]
    pixel_values: torch.Tensor | None  # (patches, dim) for this prompt's image, or None
    image_grid_thw: torch.Tensor | None  # (1, 3)


def encode_prompt(processor, text: str, image=None) -> EncodedPrompt:
    """Token ids with the image placeholder expanded to the image's token count."""
    if image is None:
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return EncodedPrompt(ids, None, None)
    out = processor(text=[text], images=[read_image(image)], return_tensors="pt")
    return EncodedPrompt(out["input_ids"][0].tolist(), out["pixel_values"], out["image_grid_thw"])


def collate(prompts: list[EncodedPrompt], completions: list[list[int]], pad_id: int, image_token_id: int):
    """Left-padded `prompt + completion` rows, with a mask of the completion positions.

    Returns the model inputs (input_ids, attention_mask, mm_token_type_ids, pixel_values,
    image_grid_thw) and `completion_mask` (B, L). mm_token_type_ids must be passed to every forward:
    without it transformers silently falls back to 1-D positions instead of M-RoPE (docs/PROTOCOL.md, trap 1).
    """
    rows = [p.ids + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (row, c) in enumerate(zip(rows, completions)):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
        completion_mask[i, width - len(c):] = True if c else False
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask,
              "mm_token_type_ids": (input_ids == image_token_id).long()}
    with_image = [p for p in prompts if p.pixel_values is not None]
    if with_image:
        inputs["pixel_values"] = torch.cat([p.pixel_values for p in with_image])
        inputs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_image])
    return inputs, completion_mask


def _to(inputs: dict, device, dtype) -> dict:
    return {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}


def _logit_scale(temperature: float) -> float:
    """Logits are divided by this in sampling and in the loss alike; greedy (0) means the untempered policy."""
    return temperature if temperature > 0 else 1.0


def _compute_dtype(model) -> torch.dtype:
    return next(p.dtype for p in _core(model).lm_head.parameters())


# ----------------------------------------------------------------------------------------------
# Sampling: a hand-written decode loop (KV cache, M-RoPE positions, one sampling function). It does
# per token only what a GRPO sample needs: one forward of the new tokens, the draw, the log-prob of
# the drawn token, and a stop check that decodes text only for rows that may have closed their tag.

@dataclass
class Completion:
    ids: list[int]  # exactly the sampled ids, up to and including the closing tag or end of turn
    logprobs: list[float]  # sampling-time log-probs of those ids under the policy (see token_logprobs)
    text: str
    truncated: bool  # hit max_new_tokens before the closing tag


@functools.lru_cache(maxsize=4)
def _ids_containing(tokenizer, char: str) -> torch.Tensor:
    """Ids of the tokens whose text contains `char` (every closing tag ends with '>')."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return torch.tensor([i for i, t in enumerate(tokens) if t and char in t], dtype=torch.long)


class _StopAtTag:
    """A row is done at end-of-turn or once its completion contains `tag`.

    The tail is decoded only for rows whose last token could complete the tag (it contains the
    tag's last character), not for every row at every step.
    """

    def __init__(self, tokenizer, prompt_len: int, tag: str, eos_id: int):
        self.tokenizer, self.prompt_len, self.tag, self.eos_id = tokenizer, prompt_len, tag, eos_id
        self.closers = _ids_containing(tokenizer, tag[-1])
        self.lengths: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        last = input_ids[:, -1]
        may_close = torch.isin(last, self.closers.to(last.device)) | (last == self.eos_id)
        for row in may_close.nonzero()[:, 0].tolist():
            if row in self.lengths:
                continue
            completion = input_ids[row, self.prompt_len:]
            tail = self.tokenizer.decode(completion[-16:], skip_special_tokens=False)
            if completion[-1].item() == self.eos_id or self.tag in tail:
                self.lengths[row] = len(completion)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[list(self.lengths)] = True
        return done


def _prompt_positions(core, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions of the left-padded prompts (4, B, L), and each row's offset (B, 1) of the
    rotary position from the text position, which every later token keeps (as `generate` does)."""
    mask = inputs["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    if "image_grid_thw" in inputs:
        rotary, deltas = core.model.get_rope_index(inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"],
                                                   attention_mask=mask, mm_token_type_ids=inputs["mm_token_type_ids"])
    else:
        rotary, deltas = text[None].expand(3, -1, -1), torch.zeros_like(text[:, :1])
    return torch.cat([text[None], rotary]), deltas


def _truncate(logp: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Top-k, then top-p (nucleus: the smallest set of tokens holding `top_p` of the mass) by log-prob."""
    if 0 < top_k < logp.shape[-1]:
        logp = logp.masked_fill(logp < logp.topk(top_k).values[:, -1:], float("-inf"))
    if top_p < 1.0:
        ascending, order = logp.sort(dim=-1)
        dropped = ascending.exp().cumsum(-1) <= 1 - top_p
        dropped[:, -1] = False
        logp = logp.scatter(1, order, ascending.masked_fill(dropped, float("-inf")))
    return logp


def _inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """One draw per row from unnormalised `probs`: the first token whose cumulative mass exceeds a
    uniform draw. The same distribution as torch.multinomial, for one random number per row
    instead of one per vocabulary entry (multinomial was most of the draw's time on a CPU). A
    token of zero mass adds no width to the cumulative sum, so it is never drawn. The sum is in
    float64: in float32, adding a token of mass below 3e-8 to a running sum near 0.5 rounds, and
    over Qwen's 151,936 tokens those roundings could move up to 0.5% of the mass."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


def _draw(logits, suppress: torch.Tensor, temperature: float, top_p: float, top_k: int, banned=None):
    """One token per row and its log-prob under the policy: vision tokens suppressed, logits divided
    by the temperature (as in token_logprobs). Greedy at temperature 0. `banned` tokens are never
    drawn but keep their mass in the recorded log-prob (end of turn in fixed-length benchmark work)."""
    logits = logits.float().index_fill(1, suppress, float("-inf"))
    logp = torch.log_softmax(logits / _logit_scale(temperature), dim=-1)
    pick = logp if banned is None else logp.index_fill(1, banned, float("-inf"))
    if temperature > 0:
        token = _inverse_cdf(_truncate(pick, top_p, top_k).exp())
    else:
        token = pick.argmax(-1)
    return token, logp.gather(1, token[:, None])[:, 0]


@torch.no_grad()
def sample(policy: Policy, prompts: list[EncodedPrompt], kind: str | None, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0) -> list[Completion]:
    """Sample one completion per prompt, all rows decoded together.

    A row stops at end of turn or at the closing tag of its step `kind`; `kind=None` samples exactly
    `max_new_tokens` tokens per row (end of turn never drawn: fixed-size benchmark work).
    `temperature=0` decodes greedily, token for token as `generate` would. Every sampling parameter
    is explicit: nothing comes from a checkpoint's generation config (docs/PROTOCOL.md, trap 3).
    For several samples of a prompt, repeat it: repeats of one object are prefilled once.
    """
    tok = policy.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    suppress = torch.tensor(policy.suppress_ids, dtype=torch.long, device=policy.device)
    banned = None if kind else torch.tensor([eos], device=policy.device)
    stopper = _StopAtTag(tok, 0, CLOSING_TAG[kind], eos) if kind else None
    logits, decoder = _prefill(policy, prompts, max_new_tokens)
    tokens = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long, device=policy.device)
    logps = torch.zeros(len(prompts), max_new_tokens, device=policy.device)
    for step in range(max_new_tokens):
        tokens[:, step], logps[:, step] = _draw(logits, suppress, temperature, top_p, top_k, banned)
        if step == max_new_tokens - 1 or (stopper and stopper(tokens[:, :step + 1]).all()):
            break
        logits = decoder.logits(tokens[:, step])
    return _completions(tok, tokens[:, :step + 1].cpu(), logps[:, :step + 1].cpu(), stopper)


def _prefill(policy: Policy, prompts: list[EncodedPrompt], max_new_tokens: int) -> tuple[torch.Tensor, Decoder]:
    """The model's forward over the distinct prompts (images, M-RoPE): the logits of each row's first
    token (B, V), and a Decoder holding every row's key/value cache for what follows."""
    tok, core = policy.tokenizer, _core(policy.model)
    first = {}  # a GRPO group repeats one prompt G times: its prefill is run once and shared
    rows = torch.tensor([first.setdefault(id(p), len(first)) for p in prompts], device=policy.device)
    distinct = list({id(p): p for p in prompts}.values())
    inputs, _ = collate(distinct, [[] for _ in distinct], tok.pad_token_id, tok.convert_tokens_to_ids("<|image_pad|>"))
    inputs = _to(inputs, policy.device, _compute_dtype(policy.model))
    positions, deltas = _prompt_positions(core, inputs)
    out = core(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    mask = inputs["attention_mask"]
    decoder = Decoder(core, out.past_key_values, mask, mask.sum(-1) + deltas[:, 0], rows, max_new_tokens)
    return out.logits[rows, -1], decoder


def _completions(tok, ids: torch.Tensor, logps: torch.Tensor, stopper) -> list[Completion]:
    """Each row cut where it stopped (or at the budget), with its text."""
    ended = stopper.lengths if stopper else {}
    rows = []
    for row in range(ids.shape[0]):
        n = ended.get(row, ids.shape[1])
        kept = ids[row, :n].tolist()
        rows.append(Completion(ids=kept, logprobs=logps[row, :n].tolist(),
                               text=tok.decode(kept, skip_special_tokens=True),
                               truncated=stopper is not None and row not in ended))
    return rows


# ----------------------------------------------------------------------------------------------
# Log-probs for the loss. Only completion positions go through the LM head, and the log-softmax is
# taken row-chunk by row-chunk, so no (B, L, V) float32 tensor is ever built.

def _core(model):
    """The Qwen2_5_VLForConditionalGeneration inside a peft wrapper (LoRA layers stay injected)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_logprobs(policy: Policy, inputs: dict, completion_mask: torch.Tensor, temperature: float = 1.0,
                   chunk_rows: int = 1024, with_entropy: bool = False, entropy_grad: bool = True):
    """log π(y_t | x, y_<t) for every completion token; zeros elsewhere. Shape (B, L), fp32.

    The same distribution as at sampling time: vision tokens suppressed, logits / temperature.
    With `with_entropy`, also returns the per-token entropy of that distribution (B, L); with
    `entropy_grad=False` it is a metric only, and no graph is kept for its full-vocabulary softmax.
    """
    core = _core(policy.model)
    inputs = _to(inputs, policy.device, _compute_dtype(policy.model))
    completion_mask = completion_mask.to(policy.device)
    selected, targets = _completion_states(core, inputs, completion_mask)
    scale = _logit_scale(temperature)
    logps, entropies = [], []
    for start in range(0, selected.shape[0], chunk_rows):
        logits = core.lm_head(selected[start:start + chunk_rows]).float() / scale
        logits[:, policy.suppress_ids] = float("-inf")
        log_z = torch.logsumexp(logits, dim=-1)
        logps.append(logits.gather(1, targets[start:start + chunk_rows, None])[:, 0] - log_z)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                probs = torch.softmax(logits, dim=-1)
                entropies.append(log_z - (probs * logits.nan_to_num(neginf=0.0)).sum(-1))  # H = log Z - E[logit]
    out = torch.zeros(completion_mask.shape, dtype=torch.float32, device=policy.device)
    entropy = torch.zeros_like(out)
    if logps:
        out = out.masked_scatter(completion_mask, torch.cat(logps))
        if with_entropy:
            entropy = entropy.masked_scatter(completion_mask, torch.cat(entropies))
    return (out, entropy) if with_entropy else out


# ----------------------------------------------------------------------------------------------
# Shared prompts. A GRPO group is G completions of one prompt; in a teacher-forced forward the
# prompt's hidden states are the same in every copy, so they are computed once. The group's row is
# [prompt][completion 1]...[completion G], and an attention mask lets each completion see the
# prompt and its own earlier tokens only, at the positions it would have in a row of its own. The
# log-probs equal those of one row per sample (tests/test_more.py) for about 1/G of the prompt's
# work, in the policy forward, its backward and the reference forward alike.

def _completion_states(core, inputs: dict, completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden state that predicts each completion token (N, hidden), and that token (N,),
    in the row-major order of `completion_mask`."""
    images = _images_by_row(core, inputs)
    groups = _prompt_groups(inputs, completion_mask, images)
    if len(groups) == len(completion_mask):  # no prompt repeats: one row per sample
        hidden = core.model(**inputs, use_cache=False).last_hidden_state
        predicts = torch.zeros_like(completion_mask)  # position t predicts token t+1
        predicts[:, :-1] = completion_mask[:, 1:]
        return hidden[predicts], inputs["input_ids"][:, 1:][completion_mask[:, 1:]]
    packed, reads = _pack(core, inputs, completion_mask, groups, images)
    hidden = core.model(**packed, use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)[reads], inputs["input_ids"][completion_mask]


def _images_by_row(core, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Each row's (pixel_values, image_grid_thw) rows, in the order `collate` concatenated them."""
    counts = (inputs["input_ids"] == core.config.image_token_id).sum(1).tolist()
    if "image_grid_thw" not in inputs:
        return [None] * len(counts)
    grids, pixels = inputs["image_grid_thw"], inputs["pixel_values"]
    patches = grids.prod(-1).tolist()
    tokens = [n // core.config.vision_config.spatial_merge_size ** 2 for n in patches]
    out, image, patch = [], 0, 0
    for count in counts:
        first_image, first_patch = image, patch
        while count > 0:
            count, patch, image = count - tokens[image], patch + patches[image], image + 1
        out.append((pixels[first_patch:patch], grids[first_image:image]) if image > first_image else None)
    return out


def _prompt_groups(inputs: dict, completion_mask: torch.Tensor, images: list) -> list[list[int]]:
    """Rows with the same prompt ids and the same image pixels, in order of first appearance."""
    prompt = inputs["attention_mask"].bool() & ~completion_mask
    same_image = lambda a, b: (a is None and b is None) or (
        a is not None and b is not None and all(torch.equal(x, y) for x, y in zip(a, b)))
    groups, by_ids = [], {}
    for row in range(len(completion_mask)):
        ids = tuple(inputs["input_ids"][row][prompt[row]].tolist())
        match = [g for g in by_ids.get(ids, []) if same_image(images[groups[g][0]], images[row])]
        if match:
            groups[match[0]].append(row)
        else:
            by_ids.setdefault(ids, []).append(len(groups))
            groups.append([row])
    return groups


def _pack(core, inputs: dict, completion_mask: torch.Tensor, groups: list[list[int]],
          images: list) -> tuple[dict, torch.Tensor]:
    """One left-padded row per group: the model inputs, with positions and a 4-D attention mask,
    and for each completion token the flat index of the position whose hidden state predicts it."""
    ids, device = inputs["input_ids"], inputs["input_ids"].device
    prompt = inputs["attention_mask"].bool() & ~completion_mask
    heads = [EncodedPrompt(ids[g[0]][prompt[g[0]]].tolist(), *(images[g[0]] or (None, None))) for g in groups]
    tails = [[t for row in g for t in ids[row][completion_mask[row]].tolist()] for g in groups]
    pad_id = 0 if core.config.image_token_id != 0 else 1  # under the mask: any id but the image token's
    packed, _ = collate(heads, tails, pad_id, core.config.image_token_id)
    packed = _to(packed, device, inputs["pixel_values"].dtype if "pixel_values" in inputs else None)
    positions, deltas = _prompt_positions(core, packed)
    width = packed["input_ids"].shape[1]
    segment = torch.full((len(groups), width), -1, dtype=torch.long, device=device)  # -1 pad, 0 prompt, i completion i
    reads = {}
    for g, (group, head) in enumerate(zip(groups, heads)):
        prompt_end = width - len(tails[g]) - 1  # the prompt's last position predicts every first token
        segment[g, prompt_end + 1 - len(head.ids):prompt_end + 1] = 0
        column = prompt_end + 1
        for i, row in enumerate(group, 1):
            n = int(completion_mask[row].sum())
            text = len(head.ids) + torch.arange(n, device=device)  # as if it followed the prompt alone
            positions[0, g, column:column + n] = text
            positions[1:, g, column:column + n] = text + deltas[g]  # the three M-RoPE streams
            segment[g, column:column + n] = i
            reads[row] = [g * width + c for c in [prompt_end, *range(column, column + n - 1)][:n]]
            column += n
    mask = {"full_attention": _segment_mask(segment)}
    order = [index for row in sorted(reads) for index in reads[row]]
    return {**packed, "position_ids": positions, "attention_mask": mask}, torch.tensor(order, device=device)


def _segment_mask(segment: torch.Tensor) -> torch.Tensor:
    """(R, 1, W, W) bool: a query sees earlier keys of the prompt (segment 0) and of its own segment.
    Padding sees only itself, so that no softmax row is empty."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    key, query = segment[:, None, :], segment[:, :, None]
    visible = causal & (key >= 0) & ((key == 0) | (key == query))
    return (visible | torch.eye(width, dtype=torch.bool, device=segment.device))[:, None]


@torch.no_grad()
def reference_logprobs(policy: Policy, inputs: dict, completion_mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """The reference policy's log-probs: the same weights with the LoRA adapter switched off.

    No second copy of the model exists: the LoRA branches (and a trained head copy) are switched
    off around the forward. This is what peft's `disable_adapter()` does, less the model-wide
    status check it runs first (2.7 ms per call on a 2-core CPU, for nothing).
    """
    lora = policy.model.base_model  # peft's LoraModel
    lora.disable_adapter_layers()
    try:
        return token_logprobs(policy, inputs, completion_mask, temperature)
    finally:
        lora.enable_adapter_layers()
