"""What the test modules share: tiny random models built from configs (no hub access), comparison helpers, configs
and calibration batches, and runs of the trl_recipes CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


# --- adapters, configs and calibration batches ------------------------------------------------------------------


# peft_ext is imported inside the helpers that need it: tests/plain_peft_load.py uses this module in a process that
# must not import peft_ext at all


def peft_ext_layers(model):
    from peft_ext.layer import PeftExtLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, PeftExtLinear)}


def run_plain_peft(arch, adapter_dir, x, tmp_path, dtype="float32", merge=False):
    torch.save(x, tmp_path / "x.pt")
    out = tmp_path / "plain_logits.pt"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "plain_peft_load.py"), arch, "0", dtype, str(adapter_dir),
           str(tmp_path / "x.pt"), str(out)] + (["merge"] if merge else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def corda(**kwargs):
    """A CorDAConfig for the tiny models (r=4, alpha 8, all linear layers)."""
    from peft_ext import CorDAConfig

    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    kwargs.setdefault("target_modules", "all-linear")
    return CorDAConfig(**kwargs)


def token_batches(n: int = 12, length: int = 20, batch: int = 4, seed: int = 3, ragged: bool = True):
    """Right-padded batches of random token ids with ragged lengths (padding id 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        size = int(torch.randint(length // 2, length + 1, (1,), generator=g)) if ragged else length
        rows.append(torch.randint(1, VOCAB, (size,), generator=g).tolist())
    return rows_to_batches(rows, batch)


def word_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary ("w0" ... ), with a plain chat template."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"[UNK]": VOCAB - 2, "[PAD]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    return tokenizer


def rows_to_batches(rows, batch, pad=0):
    from peft_ext.corda.calibration import batch_rows

    return batch_rows(rows, batch, pad)



# --- the trl_recipes CLI ---------------------------------------------------------------------------------------------


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "trl_recipes", "recipes")
SMOL = os.path.join(RECIPES, "SmolLM2-135M-Instruct")


def run_cli(*args, cwd=ROOT, timeout=900):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": launch_threads(), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "trl_recipes.sft", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def launch_threads() -> str:
    """Threads for a run a test launches: 2 (the machine's cores), 1 under pytest-xdist, whose 2 workers hold a core
    each (a 2-thread torch job beside another process slows down many times over)."""
    return "1" if "PYTEST_XDIST_WORKER" in os.environ else "2"


FAST = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_examples", "2",
        "--eval_max_new_tokens", "6", "--logging_steps", "1"]


def check_finished_run(out_dir, method, steps=2):
    for name in ("adapter", "adapter_plain_peft", "metrics.json", "loss_curve.png"):
        assert os.path.exists(os.path.join(out_dir, name)), name
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    assert metrics["peft_method"] == method and metrics["global_steps"] == steps
    assert len(metrics["loss_history"]) == steps and all(l > 0 for _, l in metrics["loss_history"])
    assert len(metrics["held_out_examples"]) == 2
    return metrics


@torch.no_grad()
def assert_adapter_and_export_agree(model_dir, out_dir):
    """The saved adapter (peft_ext or peft loader) and its plain export give the same logits on the untouched base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import peft_ext

    x = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    adapter = os.path.join(out_dir, "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    if cfg.get("init_lora_weights") == "corda":  # peft's CorDA: only its converted export applies to the base
        from trl_recipes.evaluate import load_for_eval

        assert load_for_eval(model_dir, adapter=adapter).after.peft_config["default"].init_lora_weights is True
        return
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    trained = (peft_ext.load_adapter(base, adapter) if "peft_ext_method" in cfg
               else PeftModel.from_pretrained(base, adapter)).eval()(x).logits
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                      os.path.join(out_dir, "adapter_plain_peft")).eval()(x).logits
    assert ((plain - trained).abs().max() / trained.abs().max()) < 1e-4


# --- synthetic finished runs, for the benchmarks' verdict rules and report tables ---------------------------------

SYNTHETIC_BASE = {"task_nll": 1.5, "knowledge_nll": 4.5}  # the base model's task and knowledge NLL


def synthetic_run(task_nll: float, knowledge_nll: float, losses: list[float]) -> dict:
    """A finished run as the benchmarks record it: its task and knowledge NLL and its loss curve by step."""
    return {"task_nll": task_nll, "knowledge_nll": knowledge_nll, "loss_history": list(enumerate(losses, start=1))}


def synthetic_seeds(task: float, know: float, early: float = 1.0, jitter=(0.0, 0.01, -0.01)) -> list[dict]:
    """Three seeds around the given means; step 1 (before any update) has the same loss for every method."""
    return [synthetic_run(task + j, know + j, [2.0, early + j, early + j, 0.5]) for j in jitter]
