"""The decode step: one new token per row through Qwen2.5-VL's language model, written out by hand.

`transformers` runs every decode step through its general machinery: a cache object, a freshly built
attention mask, rotary tables recomputed for three position streams, output records, and the
forward hooks of every peft and bitsandbytes layer. For a small model that fixed cost, not the
arithmetic, is most of a step (docs/RESULTS.md, "Speed"). `Decoder` does the arithmetic and nothing
else: the operations of Qwen2_5_VLDecoderLayer (transformers 5.x) and of peft's LoRA layer, in their
order, on plain tensors, with a key/value cache allocated once for the whole completion.
tests/test_more.py checks greedy output against `generate` token for token and the sampled
log-probs against the training forward's; tests/test_decode.py checks each linear layer against
peft's.

Three facts make the step short:
- After the prompt, the three M-RoPE streams (time, height, width) of a new token share one position
  (the text position plus the row's image offset), and M-RoPE at equal positions is plain RoPE: one
  cos/sin table lookup per step.
- On a CPU, bitsandbytes computes a 4-bit layer by dequantising its weight and then multiplying
  (`gemm_4bit`'s default kernel), on every call. The weights do not change while a batch is
  sampled, so the decoder dequantises each one once, with the same kernels, and multiplies by that.
  On a GPU the 4-bit layers stay 4-bit and run through bitsandbytes (their memory is the point).
- A LoRA branch held in fp32 next to an fp32 weight is folded into it (W + s·BA), one product instead
  of three; the outputs differ by float32 rounding. In bf16 the branch stays apart: folding would
  round the sum to bf16 and move the sampled log-probs away from the training ones.

The prompt itself (images, vision tower, M-RoPE over the image grid) still goes through the model;
`Decoder` starts from the key/value cache that forward returned.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Linear:
    """y = x Wᵀ + b + s · B(A x): a linear layer with its LoRA branch, as peft computes it."""
    weight: torch.Tensor | None  # full precision (a CPU 4-bit weight dequantised once); None: `quantized`
    bias: torch.Tensor | None
    quantized: torch.nn.Module | None  # a bitsandbytes layer run as it is (GPU)
    lora_a: torch.Tensor | None  # (r, in)
    lora_b: torch.Tensor | None  # (out, r)
    scaling: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quantized(x) if self.quantized is not None else F.linear(x, self.weight, self.bias)
        if self.lora_a is None:
            return y
        lora = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scaling
        # peft's 4-bit layer casts the branch before adding it; its plain layer adds, then casts.
        return y + lora.to(y.dtype) if self.quantized is not None else (y + lora).to(y.dtype)


def _plain_linear(module) -> Linear:
    """A Linear from an nn.Linear, a bitsandbytes Linear4bit, or either wrapped by peft's LoRA."""
    base, lora_a, lora_b, scaling = module, None, None, 0.0
    if hasattr(module, "base_layer"):
        base = module.base_layer
        if not module.disable_adapters and not module.merged:
            (name,) = module.active_adapters
            lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
            scaling = module.scaling[name]
    weight, bias = base.weight, base.bias
    if hasattr(weight, "quant_state"):
        if weight.device.type != "cpu":
            return Linear(None, None, base, lora_a, lora_b, scaling)
        # Imported here, as more.py imports transformers' quantisation: on an AVX-512 CPU importing
        # bitsandbytes logs a warning, which would break every command's one-line error.
        import bitsandbytes.functional as bnbf
        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(base.compute_dtype)
        bias = None if bias is None else bias.to(base.compute_dtype)
    if lora_a is not None and weight.dtype == lora_a.dtype == torch.float32:  # folded (module docstring)
        return Linear(weight + (lora_b @ lora_a) * scaling, bias, None, None, None, 0.0)
    return Linear(weight, bias, None, lora_a, lora_b, scaling)


@dataclass
class Layer:
    """One decoder layer's weights and its slice of the key/value cache."""
    input_norm: torch.Tensor
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    post_norm: torch.Tensor
    gate: Linear
    up: Linear
    down: Linear
    keys: torch.Tensor  # (B, key/value heads, prompt + new tokens, head dim), filled as decoding goes
    values: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm: normalise in fp32, scale in the input's dtype."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (apply_rotary_pos_emb): x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rotary_table(rotary_emb, positions: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of every position below `positions` (positions, head dim), as Qwen2_5_VLRotaryEmbedding
    computes them for a token whose three M-RoPE positions are equal."""
    inv_freq = rotary_emb.inv_freq.float()
    freqs = torch.arange(positions, device=inv_freq.device).float()[:, None] * inv_freq
    freqs = torch.cat((freqs, freqs), dim=-1)
    scale = rotary_emb.attention_scaling
    return (freqs.cos() * scale).to(dtype), (freqs.sin() * scale).to(dtype)


class Decoder:
    """Decodes after a prefill: `logits(tokens)` feeds one token per row and returns the next logits."""

    def __init__(self, core, cache, prompt_mask: torch.Tensor, rotary_start: torch.Tensor, rows: torch.Tensor,
                 new_tokens: int):
        """`core`: Qwen2_5_VLForConditionalGeneration (LoRA injected or not); `cache`: the key/value
        cache of its forward over distinct left-padded prompts, with their `prompt_mask` (P, L) and
        `rotary_start` (P,), the rotary position of each one's first new token. Row b of the batch
        continues prompt `rows[b]`; `new_tokens`: the most tokens that will be fed."""
        text = core.model.language_model
        config = text.config
        if config.hidden_act != "silu" or "sliding_attention" in config.layer_types:
            raise ValueError("the hand-written decode step covers Qwen2.5-VL's full attention and SiLU MLP only")
        self.eps, self.head_dim = config.rms_norm_eps, config.hidden_size // config.num_attention_heads
        self.embed, self.norm, self.lm_head = text.embed_tokens.weight, text.norm.weight, core.lm_head
        prompt_len = prompt_mask.shape[1]
        self.length = prompt_len  # tokens in the cache so far
        self.mask = torch.ones(len(rows), 1, 1, prompt_len + new_tokens, dtype=torch.bool, device=rows.device)
        self.mask[:, 0, 0, :prompt_len] = prompt_mask[rows].bool()
        self.position = rotary_start[rows]
        self.cos, self.sin = rotary_table(text.rotary_emb, int(rotary_start.max()) + new_tokens, self.embed.dtype)
        self.layers = [self._layer(layer, cache.layers[i], rows, prompt_len + new_tokens)
                       for i, layer in enumerate(text.layers)]

    @staticmethod
    def _layer(layer, cached, rows: torch.Tensor, capacity: int) -> Layer:
        attn, mlp = layer.self_attn, layer.mlp
        _, heads, prompt_len, head_dim = cached.keys.shape
        keys = cached.keys.new_empty(len(rows), heads, capacity, head_dim)
        values = torch.empty_like(keys)
        keys[:, :, :prompt_len] = cached.keys[rows]
        values[:, :, :prompt_len] = cached.values[rows]
        return Layer(layer.input_layernorm.weight, _plain_linear(attn.q_proj), _plain_linear(attn.k_proj),
                     _plain_linear(attn.v_proj), _plain_linear(attn.o_proj), layer.post_attention_layernorm.weight,
                     _plain_linear(mlp.gate_proj), _plain_linear(mlp.up_proj), _plain_linear(mlp.down_proj),
                     keys, values)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the logits that follow it (B, vocabulary)."""
        x = F.embedding(tokens[:, None], self.embed)  # (B, 1, hidden)
        cos, sin = self.cos[self.position][:, None, None], self.sin[self.position][:, None, None]
        self.length += 1
        for layer in self.layers:
            x = x + self._attention(layer, rms_norm(x, layer.input_norm, self.eps), cos, sin)
            h = rms_norm(x, layer.post_norm, self.eps)
            x = x + layer.down(F.silu(layer.gate(h)) * layer.up(h))
        self.position = self.position + 1
        return self.lm_head(rms_norm(x, self.norm, self.eps))[:, -1]

    def _attention(self, layer: Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Self-attention of the new token over the cache (Qwen2_5_VLAttention with sdpa), cache updated."""
        batch = h.shape[0]
        q = rotate(layer.q(h).view(batch, 1, -1, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(layer.k(h).view(batch, 1, -1, self.head_dim).transpose(1, 2), cos, sin)
        v = layer.v(h).view(batch, 1, -1, self.head_dim).transpose(1, 2)
        end = self.length
        layer.keys[:, :, end - 1:end] = k
        layer.values[:, :, end - 1:end] = v
        out = F.scaled_dot_product_attention(q, layer.keys[:, :, :end], layer.values[:, :, :end],
                                             attn_mask=self.mask[..., :end], scale=self.head_dim ** -0.5,
                                             enable_gqa=True)
        return layer.o(out.transpose(1, 2).reshape(batch, 1, -1))
