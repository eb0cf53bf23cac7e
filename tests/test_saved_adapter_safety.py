"""Saved adapters: the export never destroys an adapter, plain peft users are told how to load a peft_ext adapter,
the model card shows both routes, and older saves still load."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model

from tests.helpers import corda, logits, make_tiny, perturb_trainable, rel_err, sample_input, token_batches


def saved_dude(tmp_path, name="adapter"):
    from peft_ext import DuDeConfig

    pm = get_peft_model(make_tiny("llama"), DuDeConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb_trainable(pm)
    pm.save_pretrained(tmp_path / name)
    return pm, str(tmp_path / name)


def test_export_refuses_a_directory_that_holds_an_adapter(tmp_path):
    import peft_ext

    pm, path = saved_dude(tmp_path)
    files = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
    for source in (pm, path):
        with pytest.raises(FileExistsError, match=r"already holds an adapter .*overwrite=True"):
            peft_ext.export_peft_adapter(source, path)
    assert {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)} == files  # untouched
    assert rel_err(logits(peft_ext.load_adapter(make_tiny("llama"), path), sample_input()),
                   logits(pm, sample_input())) < 1e-6


def test_export_overwrite_replaces_every_adapter_file(tmp_path):
    import peft_ext

    pm, _ = saved_dude(tmp_path)
    out = tmp_path / "plain"
    out.mkdir()
    (out / "adapter_model.bin").write_bytes(b"stale")  # an older adapter in the pickle format
    (out / "adapter_config.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    peft_ext.export_peft_adapter(pm, str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "notes.txt"] \
        or sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert not any(p.name.startswith(".peft_ext_export") for p in tmp_path.iterdir())  # no temporary left
    plain = PeftModel.from_pretrained(make_tiny("llama"), str(out))
    assert rel_err(logits(plain, sample_input()), logits(pm, sample_input())) < 1e-4


def test_export_creates_missing_parent_folders(tmp_path):
    import peft_ext

    pm, _ = saved_dude(tmp_path)
    out = tmp_path / "new" / "nested" / "plain"
    peft_ext.export_peft_adapter(pm, str(out))
    plain = PeftModel.from_pretrained(make_tiny("llama"), str(out))
    assert rel_err(logits(plain, sample_input()), logits(pm, sample_input())) < 1e-4


def test_export_warns_when_vllm_cannot_serve_the_rank(tmp_path, monkeypatch):
    import peft_ext
    import peft_ext.export as export
    from peft import LoraConfig
    from peft_ext import calibrate

    model, config = make_tiny("llama"), corda(r=4)
    calibrate(model, config, token_batches(), verbose=False)
    pm = get_peft_model(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_ext.export_peft_adapter(pm, str(tmp_path / "servable"))  # rank 8 <= 512
    monkeypatch.setattr(export, "VLLM_MAX_LORA_RANK", 6)  # the tiny model's rank 2r = 8 then exceeds it
    with pytest.warns(UserWarning, match=r"rank 8 \(2r\), above vLLM's maximum LoRA rank 6.*--save_merged"):
        peft_ext.export_peft_adapter(pm, str(tmp_path / "too_big"))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match=r"rank 514 \(2r\)"):
        export._warn_if_not_servable(LoraConfig(r=8, rank_pattern={"down_proj": 514}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export._warn_if_not_servable(LoraConfig(r=1026, use_dora=True))  # DoRA is served merged in any case


def test_plain_peft_loaders_name_peft_ext_and_the_export(tmp_path):
    _, path = saved_dude(tmp_path)
    saved = json.load(open(os.path.join(path, "adapter_config.json")))
    saved["base_model_name_or_path"] = str(tmp_path / "base")
    json.dump(saved, open(os.path.join(path, "adapter_config.json"), "w"))
    make_tiny("llama").save_pretrained(tmp_path / "base")
    for load in (lambda: PeftModel.from_pretrained(make_tiny("llama"), path),
                 lambda: AutoPeftModelForCausalLM.from_pretrained(path)):
        with pytest.raises(ValueError, match=r"peft_ext\.load_adapter\(base_model, path\).*peft_ext\.export_peft_adapter"):
            load()


def test_model_card_shows_how_to_load_and_export(tmp_path):
    _, path = saved_dude(tmp_path)
    card = open(os.path.join(path, "README.md")).read()
    assert "library_name: peft" in card  # peft's card is kept
    assert "peft_ext.load_adapter(base_model" in card and "peft_ext.export_peft_adapter(" in card
    assert "LoRA/DoRA adapter of rank 2r" in card
    # saving again refreshes the section instead of adding a second one
    pm, path = saved_dude(tmp_path)
    assert open(os.path.join(path, "README.md")).read().count("peft_ext.load_adapter(base_model") == 1


def test_adapters_saved_with_the_old_init_name_still_load(tmp_path):
    import peft_ext

    pm, path = saved_dude(tmp_path)
    config_file = os.path.join(path, "adapter_config.json")
    saved = json.load(open(config_file))
    assert saved["init_lora_weights"].startswith("peft_ext: not loadable by plain peft")
    saved["init_lora_weights"] = "peft_ext"  # as written before this text
    json.dump(saved, open(config_file, "w"))
    reloaded = peft_ext.load_adapter(make_tiny("llama"), path)
    assert rel_err(logits(reloaded, sample_input()), logits(pm, sample_input())) < 1e-6
