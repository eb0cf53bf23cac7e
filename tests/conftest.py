"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

if "PYTEST_XDIST_WORKER" in os.environ:  # two workers on two cores: one thread each (see helpers.launch_threads)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's real tokenizer and chat template (so the CLI runs end to end fast)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from trl_recipes.models import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-smol")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def benchmark_data_dir(tmp_path_factory):
    """A `--data_dir` for the benchmarks in the upstream layout (gsm8k/, nq_open/), filled from the packaged slices:
    the arithmetic problems as GSM8K question/answer records, the NQ-open calibration slice as NQ-open dev, the
    knowledge slice as EfficientQA dev."""
    import json

    from peft_ext import read_jsonl
    from trl_recipes.data import KNOWLEDGE_EVAL_FILE, KPM_CALIBRATION_FILE, TEST_FILE, TRAIN_FILE

    root = tmp_path_factory.mktemp("data")

    def write(name, records):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    def as_gsm8k(path):
        return [{"question": r["prompt"][0]["content"], "answer": r["completion"][0]["content"]}
                for r in read_jsonl(path)]

    write("gsm8k/train.jsonl", as_gsm8k(TRAIN_FILE))
    write("gsm8k/test.jsonl", as_gsm8k(TEST_FILE))
    write("nq_open/NQ-open.dev.jsonl", read_jsonl(KPM_CALIBRATION_FILE))
    write("nq_open/NQ-open.efficientqa.dev.1.1.jsonl", read_jsonl(KNOWLEDGE_EVAL_FILE))
    return str(root)
