"""Architecture presets, and random-weight models built from them with no download.

The tiny model (a byte-level BPE tokenizer trained here on the protocol's own text, and a randomly
initialised Qwen2.5-VL) runs everything on a CPU. The 3B and 7B presets have the real shapes, for
memory and speed benchmarks on a GPU. A model is saved to disk and then loaded by more.py's real
4-bit path, like any checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from config import UserError
from protocol import ANSWER_SYSTEM_PROMPT, FINAL_SYSTEM_PROMPT, PASSAGES_HEADER, plan_system_prompt

# ----------------------------------------------------------------------------------------------
# Architecture presets. The 3B and 7B shapes are written down from the public config.json files of
# Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct, so that `random_init` can build the
# full-size network for memory benchmarks without a download.

_VISION_FULL = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
ARCH_PRESETS = {
    # Small enough to sample and train on two CPU cores in seconds.
    # Untied embeddings, so that `train_lm_head` can train the head alone.
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=2048,
                           tie_word_embeddings=False),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=2)),
    # The standard CPU benchmark workload of bench.py (vocabulary ~2,000 as in the tiny model).
    "bench-standard": dict(text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=2048),
                           vision=dict(depth=2, hidden_size=64, intermediate_size=256, num_heads=2)),
    "qwen2.5-vl-3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                    num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                                    tie_word_embeddings=True),
                          vision=_VISION_FULL),
    "qwen2.5-vl-7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                    tie_word_embeddings=False),
                          vision=_VISION_FULL),
}

FULL_SIZE_ARCHS = ("qwen2.5-vl-3b", "qwen2.5-vl-7b")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def build_arch_config(arch: str, tokenizer):
    """A Qwen2_5_VLConfig for a preset, with special-token ids taken from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig
    if arch not in ARCH_PRESETS:
        raise UserError(f"unknown arch {arch!r}; presets: {sorted(ARCH_PRESETS)}")
    preset = ARCH_PRESETS[arch]
    text = dict(preset["text"])
    tie = text.pop("tie_word_embeddings", True)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # M-RoPE splits each head's rotary half into (time, height, width) sections; Qwen uses 1:1.5:1.5.
    t = head_dim // 4
    hw = (head_dim // 2 - t) // 2
    mrope = [head_dim // 2 - 2 * hw, hw, hw]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": mrope}
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text.update(bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    vision = dict(preset["vision"], out_hidden_size=text["hidden_size"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **ids)


# ----------------------------------------------------------------------------------------------
# The tiny offline model: a byte-level BPE tokenizer trained here, an image+text processor, and a
# randomly initialised Qwen2.5-VL, saved to disk so that it is loaded by the same 4-bit path as a
# real checkpoint.

def _tokenizer_training_text() -> list[str]:
    """Text the tiny BPE is trained on: the protocol itself, so tags become few tokens."""
    experts = [("Text Retriever", "passages of an encyclopedia"),
               ("Text Image Retriever", "pictures with captions"),
               ("Table Retriever", "tables of numbers")]
    lines = [plan_system_prompt(experts), ANSWER_SYSTEM_PROMPT, FINAL_SYSTEM_PROMPT,
             PASSAGES_HEADER, "Origin question: Sub-question1: Answer1: ter-0: tir-1: tar-2: None"]
    tags = "<think> </think> <sub-question> </sub-question> <ret> </ret> <answer> </answer>"
    words = ("what who which where when how many much is was the of a an in on to for by from with "
             "born year city country river mountain capital population height area founded color "
             "shape painting picture image table row column value number largest smallest more less "
             "than and or not yes no none this that entity person place animal plant building")
    return lines + [tags] * 50 + [words] * 20


def build_tiny_tokenizer(vocab_size: int = 2048, extra_text: list[str] = ()):
    """Byte-level BPE with Qwen2's pre-tokenizer: any text encodes (256-byte base alphabet).

    `extra_text` is trained on too (the reader adds the mini world's names, so that each syllable
    of a name is one token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    qwen2_split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(qwen2_split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    n_merges_room = vocab_size - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(vocab_size=n_merges_room, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_tokenizer_training_text() + list(extra_text), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, unk_token=None,
                         bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok



def materialize_random_model(arch: str, out_dir: str | Path, seed: int = 0, tokenizer_text: list[str] = ()) -> Path:
    """Write a randomly initialised `arch` with the tiny tokenizer to `out_dir`; reused if present.

    Deterministic for a seed. Saving and reloading is deliberate: the 4-bit path quantises at load
    time, so the tiny model and the random full-size presets go through the real QLoRA loading code.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer_config.json").exists():
        return out_dir
    tokenizer = build_tiny_tokenizer(extra_text=tokenizer_text)
    config = build_arch_config(arch, tokenizer)
    torch.manual_seed(seed)
    if arch in FULL_SIZE_ARCHS:  # bf16, as the hub checkpoints are: a 7B in fp32 would need 33 GB of RAM
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    else:
        model = Qwen2_5_VLForConditionalGeneration(config)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    Qwen2VLImageProcessorPil().save_pretrained(tmp)
    os.replace(tmp, out_dir)  # atomic: a half-written model directory is never picked up
    return out_dir
