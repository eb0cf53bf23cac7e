"""Long phases show a progress bar with a total: the adapter init (when the number of layers is known), generation
and NLL scoring."""

from __future__ import annotations

from peft import get_peft_model

from tests.helpers import corda, make_tiny, token_batches


def test_init_progress_has_a_total(capfd, tmp_path):
    import peft_ext
    from peft_ext import DuDeConfig, calibrate, expect_targets

    model, config = make_tiny("llama"), DuDeConfig(r=2, target_modules="all-linear")
    assert expect_targets(model, config) == 14  # 2 blocks × 7 projections
    pm = get_peft_model(model, config)
    assert "/14 [" in capfd.readouterr().err
    pm.save_pretrained(tmp_path)
    peft_ext.load_adapter(make_tiny("llama"), str(tmp_path))  # a reload knows the count from the saved factors
    assert "/14 [" in capfd.readouterr().err
    model, config = make_tiny("gpt2"), corda()
    calibrate(model, config, token_batches(), verbose=False)  # CorDA knows it from its calibration
    capfd.readouterr()
    get_peft_model(model, config)
    assert "/8 [" in capfd.readouterr().err  # 2 blocks × attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


def test_generation_and_scoring_progress_have_totals(capfd, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_recipes.evaluate import answer_nll, generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(5)]
    generate(model, tokenizer, prompts, max_new_tokens=2, batch_size=2, desc="task: generating answers")
    err = capfd.readouterr().err
    assert "task: generating answers" in err and "/5 [" in err
    answer_nll(model, tokenizer, prompts, ["1"] * 5, batch_size=2)
    err = capfd.readouterr().err
    assert "scoring answers (NLL)" in err and "/5 [" in err
