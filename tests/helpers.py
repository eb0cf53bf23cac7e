"""Tiny random models built from configs (no hub access), and comparison helpers."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)


ARCHS = ("llama", "qwen2", "mistral", "gpt2")
VOCAB = 128


def make_tiny(
    arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, intermediate: int = 96
) -> torch.nn.Module:
    """A 2-layer model of the given architecture with random weights (hidden 64, GQA 4/2 heads where supported)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM  # q/k/v with bias
    elif arch == "mistral":
        config, cls = MistralConfig(**common, sliding_window=None), MistralForCausalLM
    elif arch == "gpt2":  # Conv1D layers (fan_in_fan_out)
        config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=128)
        cls = GPT2LMHeadModel
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    return model


def sample_input(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


@torch.no_grad()
def logits(model, input_ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=input_ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def perturb_trainable(model, scale: float = 0.05, seed: int = 2) -> None:
    """Stand-in for training: move every trainable parameter (A, B, magnitude) by random noise."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype) * (p.abs().mean() + 1e-3))


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model) -> None:
    after = model.state_dict()
    assert list(before) == list(after), "module structure changed"
    for k, v in before.items():
        same = torch.equal(v, after[k]) or (
            v.is_floating_point() and torch.allclose(v, after[k], rtol=0, atol=0, equal_nan=True)
        )
        assert same, f"{k} changed"
