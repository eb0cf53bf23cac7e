"""trl_recipes: the SFT CLI per method, the default run, recipes, evaluation, and bad input."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch

from .helpers import FAST, RECIPES, ROOT, SMOL, assert_adapter_and_export_agree, check_finished_run, run_cli


@pytest.mark.parametrize("method,recipe,extra", [
    ("lora", "lora/config_cpu.yaml", []),
    # exact SVD: peft reloads a PiSSA adapter by running PiSSA again, reproducible only without a random sketch
    ("pissa", "lora/config_cpu.yaml", ["--peft_method", "pissa"]),
    ("dora", "dora/config_cpu.yaml", []),
    ("dude", "dude/config_cpu.yaml", []),
    ("dude", "dude/config_cpu.yaml", ["--rank_allocation", "budgeted"]),  # allocated inside TRL's get_peft_model
    # peft's EVA (the published budgeted init) on the calibration records, after TRL built the adapter
    ("eva", "lora/config_cpu.yaml", ["--peft_method", "eva", "--calibration_samples", "16",
                                     "--calibration_batch_size", "4"]),
    ("corda", "corda/config_ipm_cpu.yaml", ["--calibration_samples", "16"]),
    ("corda", "corda/config_ipm_cpu.yaml", ["--corda_method", "kpm", "--calibration_samples", "16",
                                            "--calibration_text_field", "prompt,completion"]),
    # peft's own CorDA (preprocess_corda, batch 1) beside ours: exported through peft's conversion
    ("corda", "corda/config_kpm_cpu.yaml", ["--corda_implementation", "peft", "--calibration_samples", "16",
                                            "--calibration_dataset", os.path.join(ROOT, "trl_recipes", "data",
                                                                                  "test.jsonl"),
                                            "--calibration_text_field", "prompt"]),
])
def test_cli_two_steps_per_method(method, recipe, extra, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("--config", os.path.join(SMOL, recipe), "--model_name_or_path", tiny_model_dir,
                   "--output_dir", str(out), *FAST, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = check_finished_run(out, method)
    norms = metrics["init_factor_norms"]
    assert set(norms) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(n["layers"] == 2 and n["A"] > 0 for n in norms.values())
    assert all((n["B"] == 0) == (method in ("lora", "dora", "eva")) for n in norms.values())  # B starts at zero
    if "budgeted" in extra:  # the ranks TRL's copy of the config allocated are the saved ones
        saved = json.load(open(out / "adapter" / "adapter_config.json"))
        assert saved["rank_allocation_summary"]["parameters"] and len(set(saved["rank_pattern"].values())) > 1
    if method == "eva":  # EVA's A: the top right-singular vectors of each layer's inputs, ranks redistributed
        saved = json.load(open(out / "adapter" / "adapter_config.json"))
        assert saved["init_lora_weights"] == "eva" and saved["eva_config"]["rho"] == 2.0 and saved["rank_pattern"]
    assert "before:" in proc.stdout and "after:" in proc.stdout
    if method == "corda" and "peft" not in extra:  # CorDAConfig's default, saved: KPM keeps A frozen, IPM trains it
        saved = json.load(open(out / "adapter" / "adapter_config.json"))
        assert saved["corda_train_A"] is ("kpm" not in extra)
    assert_adapter_and_export_agree(tiny_model_dir, out)


_KPM_TEST_CALIBRATION = ["--calibration_samples", "16", "--calibration_text_field", "prompt,completion",
                         "--calibration_dataset", os.path.join(ROOT, "trl_recipes", "data", "test.jsonl")]


@pytest.mark.parametrize("method,recipe,extra", [
    ("corda", "corda/config_kpm_cpu.yaml", [*_KPM_TEST_CALIBRATION, "--train_lora_A", "false"]),  # CorDA's field
    ("dude", "dude/config_cpu.yaml", ["--train_lora_A", "false"]),  # the recipe's freeze, after TRL's set-up
], ids=["corda-kpm", "dude"])
def test_train_lora_A_false_trains_only_B(method, recipe, extra, tiny_model_dir, tmp_path):
    """--train_lora_A false: every A factor is saved as it was initialised, every B factor moved, and only B (and
    DuDe's magnitude) trained."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    proc = run_cli("--config", os.path.join(SMOL, recipe), "--model_name_or_path", tiny_model_dir,
                   "--output_dir", str(out), *FAST, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = check_finished_run(out, method)
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a_keys = [k for k in saved if k.endswith("lora_A.weight")]
    magnitudes = sum(v.numel() for k, v in saved.items() if "lora_magnitude_vector" in k)
    assert len(a_keys) == 14 and metrics["trainable_parameters"] == magnitudes + sum(
        saved[k.replace("lora_A", "lora_B")].numel() for k in a_keys)
    for key in a_keys:
        prefix = key[: -len("lora_A.weight")]
        assert torch.equal(saved[key], saved[prefix + "lora_init_A"]), key
        assert not torch.equal(saved[prefix + "lora_B.weight"], saved[prefix + "lora_init_B"]), key
    assert_adapter_and_export_agree(tiny_model_dir, out)


def test_trl_16bit_cast_takes_a_frozen_A_along():
    """TRL casts a quantized model's trainable parameters to bf16; a frozen A (CorDA-KPM's) follows them, so each
    adapter computes in one dtype."""
    from peft import get_peft_model

    from peft_ext import calibrate
    from peft_ext import settle_adapter_dtypes

    from .helpers import corda, make_tiny, token_batches

    model, config = make_tiny("llama"), corda(corda_method="kpm")
    calibrate(model, config, token_batches(), verbose=False)
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():  # TRL's cast
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)
    settle_adapter_dtypes(peft_model, sixteen_bit=True, zero3=False)
    factors = {p.dtype for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert factors == {torch.bfloat16} and not any(p.requires_grad for n, p in peft_model.named_parameters()
                                                   if ".lora_A." in n)


def test_train_lora_A_false_under_zero3_only_where_the_config_carries_it():
    from trl_recipes.args import PeftMethodArguments
    from trl_recipes.trainer import RecipeError, check_frozen_A

    for method, extra in (("dude", {}), ("lora", {}), ("corda", {"corda_implementation": "peft"})):
        args = PeftMethodArguments(peft_method=method, train_lora_A=False, **extra)
        with pytest.raises(RecipeError, match=f"--train_lora_A false with --peft_method {method}.*ZeRO-3.*Fix:"):
            check_frozen_A(args, zero3=True)
        check_frozen_A(args, zero3=False)
    check_frozen_A(PeftMethodArguments(peft_method="corda", train_lora_A=False), zero3=True)


def test_default_run_on_smollm2_few_steps(tmp_path):
    """The README's main job, shortened: no recipe given, the packaged SmolLM2 with DuDe on the shipped data."""
    out = tmp_path / "default"
    proc = run_cli("--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_examples", "2",
                   "--eval_max_new_tokens", "12", "--logging_steps", "1", "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = check_finished_run(out, "dude", steps=2)
    assert metrics["model"].endswith("SmolLM2-135M-Instruct")
    assert metrics["dataset"].endswith(os.path.join("trl_recipes", "data", "train.jsonl"))
    assert "held-out exact match" in proc.stdout and "loss curve" in proc.stdout


def script_of(recipe: str):
    """The trl_recipes script a recipe belongs to: dpo/ and grpo/ recipes to the second stages, the others to sft."""
    import importlib

    stage = os.path.basename(os.path.dirname(recipe))
    return importlib.import_module(f"trl_recipes.{stage if stage in ('dpo', 'grpo') else 'sft'}")


def test_every_recipe_parses_strictly():
    """Every key of every recipe is a field of its script's argument dataclasses (TrlParser's own check), and
    every recipe parses into valid arguments. GPU recipes ask for bf16, which transformers refuses on a machine
    without a GPU, so on CPU they are parsed with bf16 turned off (everything else as written)."""
    import yaml

    recipes = sorted(glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True))
    assert len(recipes) >= 12
    methods, stages = set(), set()
    for path in recipes:
        config, script = yaml.safe_load(open(path)), script_of(path)
        unknown = script.make_parser().set_defaults_with_config(**config)
        assert unknown == [], f"{path}: unknown keys {unknown}"
        gpu_only = config.get("bf16") and not torch.cuda.is_available()
        parsed = script.parse_args(["--config", path] + (["--bf16", "false"] if gpu_only else []))
        name = script.__name__.rsplit(".", 1)[1]
        if name == "sft":
            methods.add(parsed[3].peft_method)
        else:
            stages.add(name)
        header = open(path).read().split("\n")[0:4]
        assert header[0].startswith("# ") and any(f"trl_recipes.{name} --config " + os.path.relpath(path, ROOT) in h
                                                  for h in header), f"{path}: no launch line in the header"
    assert methods == {"lora", "pissa", "dora", "dude", "corda"} and stages == {"dpo", "grpo"}
    smol = {os.path.relpath(p, SMOL).split(os.sep)[0] for p in recipes if p.startswith(SMOL)}
    assert smol == methods | stages


# warnings the libraries raise whatever a recipe says, each with why it is not ours to fix
UPSTREAM_WARNINGS = {
    "`is_gradient_checkpointing` is deprecated": "peft 0.21.2's PeftModel reads model.is_gradient_checkpointing, "
                                                 "which transformers 5.25 deprecates",
}


def test_the_shipped_recipes_cause_no_warning(tiny_model_dir, tmp_path):
    """Every shipped CPU recipe parses without a warning (TrainingArguments checks its keys there: a deprecated key
    warns), and the default run and the KPM recipe run a step end to end on a tiny model with none but the
    libraries' own (UPSTREAM_WARNINGS)."""
    import warnings

    from trl_recipes.sft import run

    fast = ["--model_name_or_path", tiny_model_dir, "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--eval_examples", "0", "--calibration_samples", "16"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for recipe in sorted(glob.glob(os.path.join(SMOL, "*", "*.yaml"))):
            script_of(recipe).parse_args(["--config", recipe, "--output_dir", str(tmp_path / "parsed")])
        run([*fast, "--output_dir", str(tmp_path / "default")])
        run(["--config", os.path.join(SMOL, "corda", "config_kpm_cpu.yaml"), *fast, "--output_dir", str(tmp_path / "kpm")])
    ours = [f"{w.category.__name__}: {str(w.message)[:200]} ({w.filename}:{w.lineno})" for w in caught
            if not any(known in str(w.message) for known in UPSTREAM_WARNINGS)]
    assert not ours, "\n".join(ours)


def one_error_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_exits_with_one_line_and_no_output(tmp_path, capsys):
    from trl_recipes.sft import cli as main

    out = tmp_path / "never"
    assert main(["--peft_method", "sparse", "--output_dir", str(out)]) == 2
    assert "'sparse' is not one of lora, pissa, dora, dude, corda" in one_error_line(capsys)
    assert main(["--dataset_name", str(tmp_path / "missing.jsonl"), "--output_dir", str(out)]) == 2
    assert "missing.jsonl' does not exist" in one_error_line(capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1, "bar": "x"}\n')
    assert main(["--dataset_name", str(bad), "--output_dir", str(out)]) == 2
    assert "columns ['bar', 'foo']" in one_error_line(capsys)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(open(os.path.join(SMOL, "lora", "config_cpu.yaml")).read() + "lora_rank: 8\nfancy: 1\n")
    assert main(["--config", str(recipe), "--output_dir", str(out)]) == 2
    assert "unknown keys" in one_error_line(capsys)
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert main(["--max_stepz", "3", "--output_dir", str(out)]) == 2
    assert "--max_stepz" in one_error_line(capsys)
    assert main(["--load_in_4bit", "--float_weights", str(tmp_path / "nowhere"), "--output_dir", str(out)]) == 2
    assert "--float_weights" in one_error_line(capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["--dataset_name", str(empty), "--output_dir", str(out)]) == 2
    assert "empty.jsonl' is empty" in one_error_line(capsys)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n')
    assert main(["--dataset_name", str(broken), "--output_dir", str(out)]) == 2
    assert "broken.jsonl', line 2: not valid JSON" in one_error_line(capsys)
    assert main(["--config", os.path.join(SMOL, "corda", "config_kpm_cpu.yaml"), "--calibration_dataset",
                 str(broken), "--output_dir", str(out)]) == 2
    assert "broken.jsonl', line 2" in one_error_line(capsys)
    assert main(["--model_name_or_path", str(tmp_path / "no_model"), "--output_dir", str(out)]) == 2
    line = one_error_line(capsys)
    assert "no_model'" in line and "--model_name_or_path" in line
    assert not out.exists()


def test_question_answer_data_is_converted(tmp_path):
    from trl_recipes.dataset import load_split, to_sft_format

    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "2+2?", "answer": "4\\n#### 4"}\n{"question": "who?", "answer": ["me", "I"]}\n')
    ds = to_sft_format(load_split(str(path)))
    assert ds.column_names == ["prompt", "completion"] or set(ds.column_names) == {"prompt", "completion"}
    assert ds[1]["completion"][0]["content"] == "me"


def test_qa_calibration_records_become_chat_conversations(tmp_path):
    """--calibration_text_field messages on question/answer records: calibrate sees the chat-formatted conversation,
    as the chat model sees such a question; any other field keeps the records as they are."""
    from transformers import AutoTokenizer

    from peft_ext.corda.calibration import prepare_calibration_data
    from trl_recipes.args import PeftMethodArguments
    from trl_recipes.models import default_model_path
    from trl_recipes.dataset import calibration_data

    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "who wrote hamlet", "answer": ["Shakespeare", "W. S."]}\n')
    args = PeftMethodArguments(peft_method="corda", corda_method="kpm", calibration_dataset=str(path),
                               calibration_text_field="messages")
    data = calibration_data(args, train=None)
    assert data[0]["messages"] == [{"role": "user", "content": "who wrote hamlet"},
                                   {"role": "assistant", "content": "Shakespeare"}]
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    _, rows = prepare_calibration_data(data, tokenizer, num_samples=1, max_length=256, seed=0, text_field="messages")
    text = tokenizer.decode(rows[0])
    assert text.startswith("<|im_start|>system") and "<|im_start|>user\nwho wrote hamlet" in text
    assert "<|im_start|>assistant\nShakespeare" in text
    args.calibration_text_field = "question,answer"
    assert set(calibration_data(args, train=None).column_names) == {"question", "answer"}


def test_prompt_completion_calibration_records_become_whole_conversations(tmp_path):
    """--calibration_text_field messages on the training data's prompt/completion records (the IPM recipe): each
    record is calibrated as one conversation, the prompt's messages then the completion's, in chat and plain-string
    form; without the option the records stay as they are."""
    import datasets

    from trl_recipes.args import PeftMethodArguments
    from trl_recipes.dataset import calibration_data

    train = datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": "2+3?"}], "completion": [{"role": "assistant", "content": "5"}]}])
    args = PeftMethodArguments(peft_method="corda", corda_method="ipm", calibration_text_field="messages")
    assert calibration_data(args, train)[0]["messages"] == [{"role": "user", "content": "2+3?"},
                                                            {"role": "assistant", "content": "5"}]
    plain = datasets.Dataset.from_list([{"prompt": "2+3?", "completion": "5"}])
    assert calibration_data(args, plain)[0]["messages"] == [{"role": "user", "content": "2+3?"},
                                                            {"role": "assistant", "content": "5"}]
    args.calibration_text_field = "prompt"
    assert set(calibration_data(args, train).column_names) == {"prompt", "completion"}


# --- evaluation -----------------------------------------------------------------------------------------------------


def test_scoring_helpers():
    from trl_recipes.evaluate import final_number, knowledge_match

    assert final_number("so 3 + 4 = 7.\n#### 7") == "7"
    assert final_number("The answer is 1,250.00 dollars") == "1250"
    assert final_number("#### -3") == "-3" and final_number("no digits") is None
    assert knowledge_match("The Beatles.\nmore text", ["Beatles"]) and not knowledge_match("Stones", ["Beatles"])


def test_evaluate_cli_on_a_tiny_model(tiny_model_dir, tmp_path):
    """The documented evaluate command on the packaged slices (its defaults): before (the base) and after, both
    parts, the tables; a merged model gives the adapter's numbers."""
    run = tmp_path / "run"
    proc = run_cli("--config", os.path.join(SMOL, "dude", "config_cpu.yaml"), "--model_name_or_path",
                   tiny_model_dir, "--output_dir", str(run), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from trl_recipes.data import KNOWLEDGE_EVAL_FILE, TEST_FILE
    from trl_recipes.evaluate import main

    out = tmp_path / "eval"
    rc = main(["--model", tiny_model_dir, "--adapter", str(run / "adapter"), "--num_task", "3", "--num_knowledge",
               "3", "--task_max_new_tokens", "8", "--output_dir", str(out)])
    assert rc == 0
    result = json.load(open(out / "eval.json"))
    assert (result["task_data"], result["knowledge_data"]) == (TEST_FILE, KNOWLEDGE_EVAL_FILE)
    assert result["calibration_overlap"] is None  # a DuDe adapter has no calibration
    for side in ("before", "after"):
        assert result[side]["task"]["n"] == 3 and result[side]["knowledge"]["n"] == 3
        assert result[side]["task"]["answer_nll"] > 0 and result[side]["knowledge"]["gold_nll"] > 0
    assert "task answer NLL" in open(out / "eval.md").read()
    # "before" is the adapted model with its adapter disabled: the untouched base model's numbers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_recipes.dataset import prompt_and_reference
    from trl_recipes.evaluate import answer_nll, read_records

    records = read_records(TEST_FILE, 3)
    prompts, refs = zip(*(prompt_and_reference(r) for r in records))
    base_nll = answer_nll(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(),
                          AutoTokenizer.from_pretrained(tiny_model_dir), list(prompts), list(refs))
    assert result["before"]["task"]["answer_nll"] == pytest.approx(sum(base_nll) / 3, rel=1e-5)
    # a merged model is evaluated the same way
    from peft_ext import load_adapter

    merged = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "adapter")).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert main(["--model", tiny_model_dir, "--merged", str(tmp_path / "merged"), "--knowledge_data", "none",
                 "--num_task", "3", "--task_max_new_tokens", "8", "--output_dir", str(tmp_path / "eval2")]) == 0
    merged_result = json.load(open(tmp_path / "eval2" / "eval.json"))
    assert "knowledge" not in merged_result["after"]
    assert abs(merged_result["after"]["task"]["answer_nll"] - result["after"]["task"]["answer_nll"]) < 1e-4


def test_evaluate_warns_where_the_knowledge_set_overlaps_the_calibration(tiny_model_dir, tmp_path, capsys):
    """A CorDA adapter records a digest per calibration sample; evaluating knowledge on questions it was calibrated
    on warns with their count (however they are written), the packaged knowledge slice does not."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_ext
    from trl_recipes.data import KNOWLEDGE_EVAL_FILE, KPM_CALIBRATION_FILE
    from trl_recipes.evaluate import main

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    config = peft_ext.CorDAConfig(r=2, lora_alpha=2, target_modules="all-linear", corda_method="kpm")
    calibration = peft_ext.read_jsonl(KPM_CALIBRATION_FILE)[:32]
    peft_ext.calibrate(model, config, calibration, tokenizer=tokenizer, verbose=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    mixed = tmp_path / "mixed.jsonl"  # 5 calibrated questions, written differently, and 4 held-out ones
    records = [{**r, "question": r["question"].upper() + "?"} for r in calibration[:5]]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in records + peft_ext.read_jsonl(KNOWLEDGE_EVAL_FILE)[:4]))
    common = ["--model", tiny_model_dir, "--adapter", str(tmp_path / "adapter"), "--task_data", "none",
              "--num_knowledge", "9"]
    capsys.readouterr()
    assert main([*common, "--knowledge_data", str(mixed), "--output_dir", str(tmp_path / "e1")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "5 of the 9 knowledge questions are in the calibration sample" in warning[0]
    assert json.load(open(tmp_path / "e1" / "eval.json"))["calibration_overlap"] == {"knowledge": 5}
    assert main([*common, "--output_dir", str(tmp_path / "e2")]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert json.load(open(tmp_path / "e2" / "eval.json"))["calibration_overlap"] == {"knowledge": 0}


def test_evaluate_takes_the_converted_pissa_adapter(tiny_model_dir, tmp_path):
    """peft rebuilds a PiSSA adapter's base by running PiSSA again; a randomized sketch (pissa_niter_*) does not
    reproduce training's, so the evaluation loads the converted plain adapter beside it, or refuses."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trl_recipes.dataset import DataError
    from trl_recipes.evaluate import load_for_eval

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"init_lora_weights": "pissa_niter_4"}))
    with pytest.raises(DataError, match="PiSSA.*Fix.*adapter_plain_peft"):
        load_for_eval(tiny_model_dir, adapter=str(run / "adapter"))
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules="all-linear"))
    plain.save_pretrained(run / "adapter_plain_peft")
    assert load_for_eval(tiny_model_dir, adapter=str(run / "adapter")).after.peft_config["default"].init_lora_weights \
        is True


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_nll_equals_the_full_logits_reference(tiny_model_dir, arch):
    """answer_nll scores only the answer positions (logits_to_keep); it must equal log_softmax over all logits, with
    prompts of different lengths in one batch, for a model that takes logits_to_keep and through a PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from trl_recipes.evaluate import _chat_text, answer_nll

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if arch == "llama":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                                           n_positions=512))
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).eval()
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2+3?", "A much longer question, " * 6, "Hi")]
    answers = ["It is 5.\n#### 5", "Short.", "A longer answer " * 5]

    @torch.no_grad()
    def reference(p, a):
        n = len(tokenizer(_chat_text(tokenizer, p, True), add_special_tokens=False)["input_ids"])
        ids = tokenizer(_chat_text(tokenizer, p + [{"role": "assistant", "content": a}], False),
                        add_special_tokens=False, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], -1)
        return -logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].mean().item()

    got = answer_nll(model, tokenizer, prompts, answers, batch_size=2)  # two batches, sorted by length
    want = [reference(p, a) for p, a in zip(prompts, answers)]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_task_exact_match_on_the_first_generation_examples(tiny_model_dir):
    """evaluate_task(generation_examples=n): exact match from the first n answers, the NLL still over every record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_recipes.dataset import prompt_and_reference
    from trl_recipes.evaluate import evaluate_task, final_number, generate

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    records = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(5)]
    full = evaluate_task(model, tokenizer, records, max_new_tokens=4, batch_size=2)
    part = evaluate_task(model, tokenizer, records, max_new_tokens=4, batch_size=2, generation_examples=2)
    assert (full["n"], full["n_generated"], part["n"], part["n_generated"]) == (5, 5, 5, 2)
    assert part["answer_nll"] == pytest.approx(full["answer_nll"], rel=1e-6)
    # the reference: the exact match of the first two greedy answers, which are the only ones generated
    prompts, refs = zip(*(prompt_and_reference(r) for r in records[:2]))
    preds = generate(model, tokenizer, list(prompts), 4, 2)
    want = sum(final_number(p) is not None and final_number(p) == final_number(r) for p, r in zip(preds, refs)) / 2
    assert part["exact_match"] == want
    assert [e["prediction"] for e in part["examples"]] == preds


def test_peft_corda_arm_config():
    """--corda_implementation peft builds peft's own CorDA config; --calibration_cache becomes its covariance_file."""
    from trl import ModelConfig

    from trl_recipes.args import PeftMethodArguments, get_peft_config

    args = PeftMethodArguments(peft_method="corda", corda_method="kpm", corda_implementation="peft",
                               calibration_cache="cov.pt")
    config = get_peft_config(ModelConfig(lora_r=4, lora_alpha=8), args)
    assert type(config).__name__ == "LoraConfig" and config.init_lora_weights == "corda"
    assert config.corda_config.corda_method == "kpm" and config.corda_config.covariance_file == "cov.pt"
    with pytest.raises(ValueError, match="--corda_implementation 'x'"):
        PeftMethodArguments(peft_method="corda", corda_implementation="x")


def test_rank_allocation_flags_reach_the_peft_ext_configs_only():
    from trl import ModelConfig

    from trl_recipes.args import PeftMethodArguments, get_peft_config

    model_args = ModelConfig(lora_r=4, lora_alpha=8)
    for method in ("dude", "corda"):
        config = get_peft_config(model_args, PeftMethodArguments(peft_method=method, rank_allocation="budgeted",
                                                                 rank_cap=3.0))
        assert (config.rank_allocation, config.rank_cap) == ("budgeted", 3.0)
    assert get_peft_config(model_args, PeftMethodArguments(peft_method="dude")).rank_allocation == "uniform"
    for method, impl in (("lora", "peft_ext"), ("pissa", "peft_ext"), ("corda", "peft")):
        with pytest.raises(ValueError, match=f"--peft_method {method} has uniform ranks"):
            get_peft_config(model_args, PeftMethodArguments(peft_method=method, corda_implementation=impl,
                                                            rank_allocation="budgeted"))


@pytest.mark.parametrize("flag,key,expected", [
    ([], "sequential", None), (["--calibration_sequential", "false"], "sequential", False),
    (["--calibration_sequential", "true"], "sequential", True), ([], "sample_normalization", "none"),
    (["--calibration_sample_normalization", "max"], "sample_normalization", "max")])
def test_calibration_flags_reach_calibrate(flag, key, expected, monkeypatch):
    """`--calibration_sequential` and `--calibration_sample_normalization` are parsed from the command line and
    passed to peft_ext.calibrate."""
    import peft_ext
    from trl_recipes.calibration import calibrate_corda
    from trl_recipes.sft import parse_args

    _, _, _, method_args = parse_args(["--config", os.path.join(SMOL, "corda", "config_ipm_cpu.yaml"),
                                       "--output_dir", "unused", *flag])
    seen = {}
    monkeypatch.setattr(peft_ext, "calibrate", lambda *a, **k: seen.update(k))
    calibrate_corda(object(), object(), method_args, ["text"], tokenizer=None, verbose=False)
    assert seen[key] == expected and type(seen[key]) is type(expected)


def test_bad_sample_normalization_flag_is_refused():
    from trl_recipes.args import PeftMethodArguments

    with pytest.raises(ValueError, match="--calibration_sample_normalization 'mean'.*'none' or 'max'"):
        PeftMethodArguments(peft_method="corda", calibration_sample_normalization="mean")
