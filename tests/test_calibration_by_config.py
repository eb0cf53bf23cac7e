"""CorDA calibrated by `get_peft_model` from the data its config names (`CorDAConfig.calibration_data`): the same
adapter as `peft_ext.calibrate` then `get_peft_model`, in every form the data may take, through TRL's SFT, DPO and
GRPO trainers that build the model themselves, on 2 ranks and under ZeRO-3; bad data refused before any work."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from peft import get_peft_model

from .helpers import (ARCHS, ROOT, assert_same_state, corda, logits, make_tiny, peft_ext_layers, rel_err, sample_input,
                      state_snapshot, token_batches, word_tokenizer)
from .test_distributed import CONFIGS, launch, rel


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor of every peft_ext layer: factors, init factors, residual base weight."""
    out = {}
    for name, layer in peft_ext_layers(model).items():
        for key, value in layer.state_dict().items():
            out[f"{name}.{key}"] = value.detach().clone()
    return out


def assert_same_adapter(a, b) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def explicit(model, config, data, **kwargs):
    """The two-step route: peft_ext.calibrate, then get_peft_model."""
    from peft_ext import calibrate

    calibrate(model, config, data, verbose=False, **kwargs)
    return get_peft_model(model, config)


@pytest.mark.parametrize("method", ["kpm", "ipm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_the_config_route_gives_the_adapter_of_the_two_step_route(arch, method):
    from peft_ext import CalibrationData

    x = sample_input()
    base = logits(make_tiny(arch), x)
    spec = CalibrationData(token_batches(), num_samples=12)
    by_config = get_peft_model(make_tiny(arch), corda(corda_method=method, calibration_data=spec))
    assert rel_err(logits(by_config, x), base) < 1e-5  # outputs unchanged at init
    assert_same_adapter(by_config, explicit(make_tiny(arch), corda(corda_method=method), token_batches(),
                                            num_samples=12))
    saved = by_config.peft_config["default"]
    assert saved.corda_calibration["tokens"] > 0 and saved.peft_ext_runtime.calibration is None  # recorded, freed


def texts() -> list[str]:
    words = "the river city keeps answers to every question about numbers".split()
    return [" ".join(words[(3 * i + j) % len(words)] for j in range(4 + i % 9)) for i in range(14)]


def data_forms(tmp_path):
    """Every form calibration_data.data may take, each holding the same 14 texts: (data, extra options)."""
    import datasets

    records = [{"text": t} for t in texts()]
    (tmp_path / "calib.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "calib.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text((tmp_path / "calib.jsonl").read_text())
    return {
        "texts": (texts(), {}),
        "records": ([{"question": t, "id": i} for i, t in enumerate(texts())], {"text_field": "question"}),
        "dataset": (datasets.Dataset.from_list(records), {}),
        "jsonl": (str(tmp_path / "calib.jsonl"), {}),
        "json": (str(tmp_path / "calib.json"), {}),
        "save_to_disk": (str(tmp_path / "saved"), {}),
        "data_files_folder": (str(tmp_path / "files"), {"split": "train"}),
    }


@pytest.mark.parametrize("form", ["texts", "records", "dataset", "jsonl", "json", "save_to_disk",
                                  "data_files_folder"])
def test_every_data_form_with_the_checkpoint_tokenizer(form, tiny_model_dir, tmp_path):
    """The texts are tokenized by the model's own checkpoint (its name_or_path) unless a tokenizer is named."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_ext import CalibrationData

    data, options = data_forms(tmp_path)[form]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = corda(corda_method="kpm", calibration_data=CalibrationData(data, num_samples=10, **options))
    pm = get_peft_model(model, config)
    reference = explicit(AutoModelForCausalLM.from_pretrained(tiny_model_dir), corda(corda_method="kpm"), texts(),
                         tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), num_samples=10)
    assert_same_adapter(pm, reference)
    assert pm.peft_config["default"].corda_calibration["sample_digests"] == \
        reference.peft_config["default"].corda_calibration["sample_digests"]


def test_a_hub_id_is_loaded_by_datasets_with_its_split(monkeypatch, tiny_model_dir):
    import datasets
    from transformers import AutoModelForCausalLM

    from peft_ext import CalibrationData

    calls = []

    def fake_load(name, subset=None, split=None, **kwargs):
        calls.append((name, subset, split))
        if name != "someone/calibration-set":
            raise ConnectionError("no network")
        return datasets.Dataset.from_list([{"text": t} for t in texts()])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    spec = CalibrationData("someone/calibration-set", subset="main", split="validation", num_samples=10)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), corda(calibration_data=spec))
    assert calls == [("someone/calibration-set", "main", "validation")]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = state_snapshot(model)
    with pytest.raises(ValueError, match=r"calibration_data.data='someone/unreachable' is no local file or folder, "
                                         r"and the Hub dataset could not be loaded \(subset None, split 'train'\): "
                                         r"ConnectionError"):
        get_peft_model(model, corda(calibration_data="someone/unreachable"))
    assert_same_state(before, model) and not peft_ext_layers(model)


def test_a_tokenizer_named_in_the_config_is_used(tmp_path):
    from transformers import AutoTokenizer

    word_tokenizer().save_pretrained(tmp_path / "tok")  # within the tiny models' vocabulary
    model = make_tiny("llama")  # a model built from a config: no checkpoint, so no tokenizer of its own
    with pytest.raises(ValueError, match="no tokenizer, and the model names no checkpoint"):
        get_peft_model(model, corda(calibration_data=texts()))
    assert not peft_ext_layers(model)
    spec = {"data": texts(), "tokenizer": str(tmp_path / "tok"), "num_samples": 10}  # a dict, as from YAML
    by_path = get_peft_model(make_tiny("llama"), corda(calibration_data=spec))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    by_object = get_peft_model(make_tiny("llama"), corda(calibration_data={**spec, "tokenizer": tokenizer}))
    assert_same_adapter(by_path, by_object)


def test_bad_calibration_data_is_refused_before_any_work(tmp_path):
    from peft_ext import CalibrationData

    with pytest.raises(ValueError, match=r"calibration_data.num_samples=0. Fix: an integer >= 1"):
        CalibrationData(texts(), num_samples=0)
    with pytest.raises(ValueError, match=r"calibration_data has unknown keys \['samples'\]. Fix: use the fields"):
        corda(calibration_data={"data": texts(), "samples": 8})
    with pytest.raises(ValueError, match=r"calibration_data.covariance_dtype='float16'. Fix: one of"):
        CalibrationData(texts(), covariance_dtype="float16")
    with pytest.raises(TypeError, match=r"calibration_data.data is a int. Fix: a Dataset"):
        CalibrationData(3)
    x = sample_input()
    for data, error, match in [
        (str(tmp_path / "missing.jsonl"), FileNotFoundError, r"calibration_data.data='.*missing.jsonl': no such file"),
        ((tmp_path / "calib.xml").as_posix(), ValueError, r"is a .xml file. Fix: a .jsonl"),
        ([], ValueError, r"the calibration data is empty"),
    ]:
        if data == (tmp_path / "calib.xml").as_posix():
            (tmp_path / "calib.xml").write_text("<a/>")
        model = make_tiny("llama")
        before, ref = state_snapshot(model), logits(model, x)
        with pytest.raises(error, match=match):
            get_peft_model(model, corda(calibration_data=CalibrationData(data, tokenizer="unused")))
        assert_same_state(before, model)
        assert torch.equal(logits(model, x), ref) and not peft_ext_layers(model)


def test_saved_with_its_record_and_reloaded_without_the_data(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from peft_ext import load_adapter, load_config

    (tmp_path / "calib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts()))
    config = corda(corda_method="kpm", calibration_data={"data": str(tmp_path / "calib.jsonl"), "num_samples": 10})
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    x = torch.tensor([[5, 17, 99, 3, 250]])
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.01)
    pm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["calibration_data"]["data"] == str(tmp_path / "calib.jsonl")
    assert saved["calibration_data"]["num_samples"] == 10 and saved["corda_calibration"]["data"]
    os.remove(tmp_path / "calib.jsonl")  # a reload rebuilds the residual from the saved factors: no data needed
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "adapter"))
    assert torch.equal(logits(reloaded, x), logits(pm, x))
    assert load_config(str(tmp_path / "adapter")).calibration_data.num_samples == 10
    in_memory = corda(calibration_data=texts())  # data that is not a path: described, not saved
    record = in_memory.to_dict()["calibration_data"]
    assert record["data"] is None and record["data_description"] == "<builtins.list, 14 samples>"


def test_a_copied_config_shares_its_data():
    import copy

    data = texts()
    config = corda(calibration_data=data)
    assert copy.deepcopy(config).calibration_data.data is data


# --- TRL's trainers build the model and call get_peft_model themselves -------------------------------------------


def _trainer(kind: str, model_dir: str, peft_config, out: str):
    from datasets import Dataset

    common = dict(output_dir=out, max_steps=1, report_to=[], per_device_train_batch_size=2, use_cpu=True,
                  save_strategy="no", learning_rate=1e-3)
    questions = [f"What is {i} + {i}?" for i in range(6)]
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                  "content": str(2 * i)}]}
                                  for i, q in enumerate(questions)])
        return SFTTrainer(model=model_dir, args=SFTConfig(**common), train_dataset=data, peft_config=peft_config)
    if kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                                   "chosen": [{"role": "assistant", "content": str(2 * i)}],
                                   "rejected": [{"role": "assistant", "content": str(2 * i + 1)}]}
                                  for i, q in enumerate(questions)])
        return DPOTrainer(model=model_dir, args=DPOConfig(**common, max_length=64), train_dataset=data,
                          peft_config=peft_config)
    from trl import GRPOConfig, GRPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions])
    args = GRPOConfig(**common, num_generations=2, max_completion_length=4)
    return GRPOTrainer(model=model_dir, args=args, train_dataset=data, peft_config=peft_config,
                       reward_funcs=lambda completions, **kw: [float(len(str(c))) for c in completions])


@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_trl_trainers_calibrate_the_model_they_build(kind, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_ext import CalibrationData

    spec = CalibrationData(texts(), num_samples=10)
    trainer = _trainer(kind, tiny_model_dir, corda(corda_method="kpm", calibration_data=spec), str(tmp_path))
    reference = explicit(AutoModelForCausalLM.from_pretrained(tiny_model_dir), corda(corda_method="kpm"), texts(),
                         tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), num_samples=10)
    assert_same_adapter(trainer.model, reference)  # before training: the same init, residual and calibration
    before = {k: v for k, v in adapter_tensors(trainer.model).items() if k.endswith("lora_B.default.weight")}
    trainer.train()
    after = adapter_tensors(trainer.model)
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # the adapter trained
    assert all(torch.isfinite(v).all() for v in after.values())


# --- 2 processes and ZeRO-3 ----------------------------------------------------------------------------------------


def torchrun(*args, timeout=900):
    """Plain DDP on 2 CPU processes (gloo), as `torchrun --nproc_per_node 2`."""
    import subprocess

    from .test_distributed import free_port

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("launcher", ["ddp", "zero3"])
def test_sft_trainer_on_two_ranks_equals_one_process(launcher, tiny_model_dir, tmp_path):
    """Each rank calibrates its half of the texts and the sums are reduced; under ZeRO-3 the model the trainer loads
    is partitioned and calibrated block by block. The adapter equals one process's (≤ 1e-6)."""
    sys.path.insert(0, CONFIGS)
    from transformers import AutoModelForCausalLM

    from trainer_calibration import config
    from zero3_init import collect

    out = tmp_path / "run.pt"
    script = (os.path.join(CONFIGS, "trainer_calibration.py"), "kpm", tiny_model_dir, str(out))
    proc = torchrun(*script) if launcher == "ddp" else launch("zero3_cpu.yaml", *script)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = torch.load(out)
    assert ranks["world_size"] == 2 and ranks["partitioned"] == (launcher == "zero3")
    assert ranks["world_at_injection"] == [2]  # the calibration ran sharded over both ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched ranks: the same BLAS reduction order
    try:
        single = collect(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config("kpm")))
    finally:
        torch.set_num_threads(threads)
    assert ranks["layers"].keys() == single.keys() and len(single) == 14
    assert ranks["calibration"]["samples"] == 12
    for name, tensors in single.items():
        for key, t in tensors.items():
            assert rel(ranks["layers"][name][key], t) <= 1e-6, (name, key, rel(ranks["layers"][name][key], t))
