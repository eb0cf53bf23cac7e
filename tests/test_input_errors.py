"""Bad input is refused with an error that names the field (or file and line) and the fix, before any work, and
leaves the model and any files untouched."""

from __future__ import annotations

import dataclasses

import pytest
from peft import LoraConfig

from tests.helpers import assert_same_state, corda, make_tiny, state_snapshot


def configs():
    from peft_ext import CorDAConfig, DuDeConfig

    return [DuDeConfig, CorDAConfig]


@pytest.mark.parametrize("field,value,fix", [
    ("r", 0, "positive integer rank"),
    ("r", -1, "positive integer rank"),
    ("r", 2.5, "positive integer rank"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\]=0"),
    ("lora_alpha", 0, "positive number"),
    ("alpha_pattern", {"v_proj": -2}, r"alpha_pattern\['v_proj'\]=-2"),
    ("lora_bias", True, "lora_bias=True is not supported"),
])
def test_bad_numbers_and_options_are_refused_by_the_config(field, value, fix):
    for cls in configs():
        with pytest.raises(ValueError, match=f"{cls.__name__}: .*{fix}" if field != "lora_bias" else fix):
            cls(**{field: value})


def lora_variant_fields():
    from peft_ext.config import UNMARKED_VARIANTS

    return [f.name for f in dataclasses.fields(LoraConfig)
            if (f.metadata.get("is_lora_variant") or f.name in UNMARKED_VARIANTS) and f.name != "use_dora"]


def test_every_lora_variant_but_dora_is_refused():
    variants = lora_variant_fields()
    assert {"velora_config", "use_qalora", "kasa_config", "monteclora_config", "use_bdlora", "arrow_config"} <= set(variants)
    for cls in configs():
        for name in variants:
            value = {"x": 1} if name.endswith("_config") else [1, 2] if name.endswith("_tokens") else True
            with pytest.raises(ValueError, match=f"{name}=.*Fix: unset {name}"):
                cls(**{name: value})
    from peft_ext import CorDAConfig, DuDeConfig

    assert DuDeConfig(use_dora=True).use_dora and CorDAConfig(use_dora=True).use_dora  # the one variant honoured


def test_calibration_jsonl_with_a_broken_line_names_the_file_and_line(tmp_path):
    from transformers import AutoTokenizer

    from peft_ext import calibrate
    from trl_recipes.models import default_model_path

    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "a b c"}\n\n{"text": "d e f"\n')
    model = make_tiny("llama")
    before = state_snapshot(model)
    config = corda()
    with pytest.raises(ValueError, match=r"calib.jsonl', line 3: not valid JSON .*Fix: one JSON object per line"):
        calibrate(model, config, str(path), tokenizer=AutoTokenizer.from_pretrained(default_model_path()))
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"line 2: a list, not a JSON object"):
        calibrate(model, config, str(path), tokenizer=AutoTokenizer.from_pretrained(default_model_path()))
    assert_same_state(before, model)
    assert config.peft_ext_runtime.calibration is None


def test_unwritable_cache_file_fails_before_the_calibration(tmp_path, monkeypatch):
    import peft_ext.corda.calibration as calibration
    from peft_ext import calibrate

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    ran = []
    monkeypatch.setattr(calibration, "_run_forwards", lambda *a, **k: ran.append(1))
    from tests.helpers import token_batches

    with pytest.raises(ValueError, match=r"cache_file=.*a_file/cov.safetensors' cannot be written.*Fix"):
        calibrate(make_tiny("llama"), corda(), token_batches(), cache_file=str(blocker / "cov.safetensors"))
    with pytest.raises(ValueError, match="is a folder"):
        calibrate(make_tiny("llama"), corda(), token_batches(), cache_file=str(tmp_path), sequential=False)
    assert not ran and blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no probe left behind
