"""CorDA: the calibration engine and the decomposition, each guarantee a test, over the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.other import transpose

from peft_ext import CorDAConfig, calibrate, export_peft_adapter, load_adapter, load_config
from peft_ext.layer import PeftExtLinear

from .helpers import (ARCHS, VOCAB, assert_same_state, corda, logits, make_tiny, peft_ext_layers, perturb_trainable,
                      rel_err, rows_to_batches, run_plain_peft, sample_input, state_snapshot, token_batches,
                      word_tokenizer)


def calibrated(arch="llama", method="ipm", batches=None, dtype=torch.float32, sequential=False, **cfg):
    """Whole-model by default (these tests read the covariances, which block-by-block calibration frees)."""
    model = make_tiny(arch)
    config = corda(corda_method=method, **cfg)
    calibrate(model, config, batches or token_batches(), covariance_dtype=dtype, sequential=sequential, verbose=False)
    return model, config


# --- init -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sequential", [False, True], ids=["whole-model", "sequential"])
@pytest.mark.parametrize("method", ["kpm", "ipm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_init_preserves_logits(arch, method, sequential):
    x = sample_input()
    ref = logits(make_tiny(arch), x)
    model, config = calibrated(arch, method, sequential=sequential)
    peft_model = get_peft_model(model, config)
    assert len(peft_ext_layers(peft_model)) > 0
    assert rel_err(logits(peft_model, x), ref) <= 1e-5


@pytest.mark.parametrize("method", ["kpm", "ipm"])
def test_trainable_product_matches_float64_reference(method):
    """s·B·A equals the paper's math done in float64: SVD(W·C), the r selected components, times C⁻¹."""
    batches = token_batches(n=24, length=24)
    model, config = calibrated("llama", method, batches=batches, dtype=torch.float64)
    calib = config.peft_ext_runtime.calibration
    weights = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if n in calib.targets}
    covs = {n: calib.group(n).covariance.double().clone() for n in calib.targets}
    peft_model = get_peft_model(model, config)
    for name, layer in peft_ext_layers(peft_model).items():
        name = name.removeprefix("base_model.model.")
        W, C = weights[name], covs[name]
        C = C + 0.01 * C.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
        sel = slice(0, 4) if method == "ipm" else slice(S.shape[0] - 4, S.shape[0])
        ref = U[:, sel] @ torch.diag(S[sel]) @ Vh[sel] @ torch.linalg.inv(C)
        s = layer.scaling["default"]
        got = s * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        assert (got - ref).norm() / ref.norm() < 1e-4, name
        residual = layer.get_base_layer().weight.double()
        assert (residual + got - W).abs().max() < 1e-5


def test_kpm_and_ipm_pick_opposite_ends_of_the_spectrum():
    """In the covariance-weighted sense the trained part is s·B·A·C = U_sel S_sel V_selᵀ: IPM holds the largest
    singular values of W·C, KPM the smallest."""
    norms = {}
    for method in ("kpm", "ipm"):
        model, config = calibrated("llama", method)
        calib = config.peft_ext_runtime.calibration
        covs = {n: calib.group(n).covariance.clone() for n in calib.targets}
        layers = peft_ext_layers(get_peft_model(model, config))
        norms[method] = {
            n.removeprefix("base_model.model."): (l.lora_B["default"].weight @ l.lora_A["default"].weight
                                                  @ covs[n.removeprefix("base_model.model.")]).norm()
            for n, l in layers.items()
        }
    for name in norms["kpm"]:
        assert norms["kpm"][name] < norms["ipm"][name], name


@pytest.mark.parametrize("method", ["kpm", "ipm"])
def test_balanced_factors_have_equal_norms_and_the_same_product(method):
    """corda_balance_factors (the default) gives each component ‖b_i‖ = ‖a_i‖, with the same product, residual and
    outputs as the unbalanced B = U·sqrt(S/s), A = sqrt(S/s)·Vᵀ·C⁻¹, whose norms differ."""
    x = sample_input()
    ref = logits(make_tiny("llama"), x)
    layers, outputs = {}, {}
    for balance in (True, False):
        model, config = calibrated("llama", method, corda_balance_factors=balance)
        peft_model = get_peft_model(model, config)
        outputs[balance], layers[balance] = logits(peft_model, x), peft_ext_layers(peft_model)
    worst_unbalanced = 1.0
    for name, layer in layers[True].items():
        other = layers[False][name]
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        A0, B0 = other.lora_A["default"].weight, other.lora_B["default"].weight
        torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-5, atol=0)
        torch.testing.assert_close(B @ A, B0 @ A0, rtol=0, atol=1e-5 * (B0 @ A0).abs().max().item())
        torch.testing.assert_close(layer.get_base_layer().weight, other.get_base_layer().weight, rtol=0, atol=1e-6)
        ratio = A0.norm(dim=1) / B0.norm(dim=0)
        worst_unbalanced = max(worst_unbalanced, ratio.max().item(), 1 / ratio.min().item())
    assert worst_unbalanced > 2  # the test would not see a missing balance otherwise
    assert rel_err(outputs[True], ref) <= 1e-5 and rel_err(outputs[False], ref) <= 1e-5


@pytest.mark.parametrize("method", ["kpm", "ipm"])
def test_use_dora_over_the_corda_direction(method):
    x = sample_input()
    ref = logits(make_tiny("qwen2"), x)
    model, config = calibrated("qwen2", method, use_dora=True)
    peft_model = get_peft_model(model, config)
    assert rel_err(logits(peft_model, x), ref) <= 1e-5
    assert any("lora_magnitude_vector" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_rank_and_alpha_pattern_are_honoured():
    model, config = calibrated("llama", "ipm", rank_pattern={"k_proj": 2, "down_proj": 6}, alpha_pattern={"q_proj": 3})
    layers = peft_ext_layers(get_peft_model(model, config))
    for name, layer in layers.items():
        r = 2 if name.endswith("k_proj") else 6 if name.endswith("down_proj") else 4
        assert layer.r["default"] == r and layer.lora_A["default"].weight.shape[0] == r
        assert layer.scaling["default"] == (3 / 4 if name.endswith("q_proj") else 8 / r)


def test_randomized_svd_for_ipm_is_seeded():
    a = peft_ext_layers(get_peft_model(*calibrated("llama", "ipm", svd_niter=3)))
    b = peft_ext_layers(get_peft_model(*calibrated("llama", "ipm", svd_niter=3)))
    for name in a:
        assert torch.equal(a[name].lora_A["default"].weight, b[name].lora_A["default"].weight)


# --- calibration engine ---------------------------------------------------------------------------------------------


def test_batch_size_does_not_change_the_adapter():
    """The same sequences calibrated one by one and in right-padded batches of 4 give the same adapter."""
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(5, 25, (10,), generator=g)]
    results = []
    for bs, pad in ((1, 0), (4, 0), (4, 7)):  # padding id must not matter either
        model = make_tiny("llama")
        config = corda(corda_method="kpm")
        calib = calibrate(model, config, rows_to_batches(rows, bs, pad), sequential=False, verbose=False)
        covs = {n: calib.group(n).covariance.clone() for n in calib.targets}
        layers = peft_ext_layers(get_peft_model(model, config))
        results.append((covs, {n: l.lora_B["default"].weight @ l.lora_A["default"].weight for n, l in layers.items()}))
    (c1, p1), *others = results
    for c, p in others:
        for n in c1:
            torch.testing.assert_close(c[n], c1[n], rtol=1e-5, atol=1e-6)
        for n in p1:
            torch.testing.assert_close(p[n], p1[n], rtol=1e-3, atol=1e-5)


def test_covariance_is_mean_outer_product_over_real_tokens():
    """Against an explicit computation: hook q_proj's input, keep the unpadded rows, average x xᵀ."""
    batches = token_batches(n=6, batch=3)
    model = make_tiny("llama")
    seen = []
    h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)]).double()
    expected = rows.T @ rows / rows.shape[0]
    calib = calibrate(model, corda(), batches, sequential=False, verbose=False)
    torch.testing.assert_close(calib.group("model.layers.1.self_attn.q_proj").covariance.double(), expected,
                               rtol=1e-5, atol=1e-6)
    assert calib.tokens == int(sum(b["attention_mask"].sum() for b in batches))


# --- per-sample max normalisation (peft's and the authors' weighting) ------------------------------------------------


def ragged_rows(n: int = 10, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(5, 25, (n,), generator=g)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_max_normalization_is_each_sample_over_its_own_max(arch):
    """Against an explicit computation per sample: its real rows divided by |max| of those rows, Σ x xᵀ / tokens.
    Padded batches with a padding id whose activations would change the max must give the same covariance."""
    rows = ragged_rows()
    model = make_tiny(arch)
    name = "model.layers.1.mlp.down_proj" if arch == "llama" else "transformer.h.1.mlp.c_proj"
    seen = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double()))
    with torch.no_grad():
        for r in rows:
            model(input_ids=torch.tensor([r]))
    h.remove()
    scaled = torch.cat([x / x.max().abs() for x in seen])
    expected = scaled.T @ scaled / scaled.shape[0]
    for batch, pad in ((1, 0), (4, 7)):
        calib = calibrate(model, corda(), rows_to_batches(rows, batch, pad), sample_normalization="max",
                          covariance_dtype=torch.float64, sequential=False, verbose=False)
        assert rel_err(calib.group(name).covariance, expected) < 1e-5  # fp32 activations: batched vs one by one
    plain = calibrate(model, corda(), rows_to_batches(rows, 4, 7), covariance_dtype=torch.float64, sequential=False,
                      verbose=False)
    assert rel_err(plain.group(name).covariance, expected) > 0.1  # the option changes the weighting


def test_max_normalization_equals_peft_preprocess_corda(tmp_path):
    """Our batched calibration with "max" equals peft's preprocess_corda (one sample per forward) on every target, up
    to peft's scale: it divides the sum by the number of samples, ours by the number of tokens."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    rows = ragged_rows()
    ours = calibrate(make_tiny("llama"), corda(), rows_to_batches(rows, 4, 3), sample_normalization="max",
                     covariance_dtype=torch.float64, sequential=False, verbose=False)
    model, cov_file = make_tiny("llama"), str(tmp_path / "peft_cov.pt")
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # peft expands
    config = LoraConfig(r=4, lora_alpha=8, target_modules=linear, init_lora_weights="corda",  # "all-linear" later
                        corda_config=PeftCordaConfig(covariance_file=cov_file, corda_method="ipm"))

    def run_model():
        with torch.no_grad():
            for r in rows:
                model(input_ids=torch.tensor([r]))

    preprocess_corda(model, config, run_model=run_model)
    theirs = torch.load(cov_file)
    assert set(theirs) == set(ours.targets)
    for name, cov in theirs.items():
        torch.testing.assert_close(ours.group(name).covariance * ours.tokens / len(rows), cov.double(),
                                   rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["kpm", "ipm"])
def test_max_normalization_block_by_block_equals_whole_model_and_keeps_logits(method):
    rows = ragged_rows()
    products = []
    for sequential in (False, True):
        model = make_tiny("llama")
        x = sample_input()
        before = logits(model, x)
        config = corda(corda_method=method)
        calibrate(model, config, rows_to_batches(rows, 4), sample_normalization="max",
                  covariance_dtype=torch.float64, sequential=sequential, verbose=False)
        assert config.corda_calibration["sample_normalization"] == "max"
        peft_model = get_peft_model(model, config)
        torch.testing.assert_close(logits(peft_model, x), before, rtol=1e-4, atol=1e-4)
        products.append({n: l.lora_B["default"].weight @ l.lora_A["default"].weight
                         for n, l in peft_ext_layers(peft_model).items()})
    for n in products[0]:
        assert rel_err(products[1][n], products[0][n]) < 1e-5, n


def test_max_normalization_cache_is_refused_for_the_other_weighting(tmp_path):
    cache = str(tmp_path / "cov.safetensors")
    model, batches = make_tiny("llama"), token_batches()
    calibrate(model, corda(), batches, cache_file=cache, sequential=False, verbose=False)
    with pytest.raises(ValueError, match="sample_normalization"):
        calibrate(model, corda(), batches, sample_normalization="max", cache_file=cache, sequential=False,
                  verbose=False)


def test_bad_sample_normalization_is_refused_before_any_forward():
    model = make_tiny("llama")
    before = state_snapshot(model)
    config = corda()
    calls = []
    h = model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match=r"sample_normalization='mean'.*Fix: one of 'none', 'max'"):
        calibrate(model, config, token_batches(), sample_normalization="mean", verbose=False)
    h.remove()
    assert not calls and config.peft_ext_runtime.calibration is None
    assert_same_state(before, model)


@pytest.mark.parametrize("arch,per_layer", [("llama", 4), ("qwen2", 4), ("gpt2", 4)])
def test_one_covariance_per_distinct_input(arch, per_layer):
    _, config = calibrated(arch)
    calib = config.peft_ext_runtime.calibration
    assert len(calib.groups) == per_layer * 2  # 2 layers
    if arch != "gpt2":
        q = calib.group("model.layers.0.self_attn.q_proj")
        assert q is calib.group("model.layers.0.self_attn.k_proj") is calib.group("model.layers.0.self_attn.v_proj")
        assert calib.group("model.layers.0.mlp.gate_proj") is calib.group("model.layers.0.mlp.up_proj")
        assert calib.group("model.layers.0.mlp.gate_proj") is not q
    # one tensor in memory per group
    assert len({id(g.covariance) for g in calib.groups}) == len(calib.groups)


def test_float64_accumulation_option():
    _, config = calibrated("llama", dtype=torch.float64)
    assert all(g.covariance.dtype == torch.float64 for g in config.peft_ext_runtime.calibration.groups)


def test_calibration_is_consumed_and_model_untouched_by_calibrate():
    model = make_tiny("llama")
    before = state_snapshot(model)
    config = corda()
    calibrate(model, config, token_batches(), verbose=False)
    assert_same_state(before, model)
    get_peft_model(model, config)
    assert config.peft_ext_runtime.calibration is None  # the covariances are freed after get_peft_model
    assert config.corda_calibration["tokens"] > 0


def test_calibrate_accepts_texts_chats_records_jsonl_datasets_and_dataloaders(tmp_path):
    import datasets

    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{(7 * i + j) % 100}" for j in range(5 + i % 7)) for i in range(10)]
    records = [{"question": t, "answer": ["w1", "w2"]} for t in texts]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    chats = [[{"role": "user", "content": t}] for t in texts]
    sources = {
        "texts": texts,
        "records": records,
        "jsonl": str(tmp_path / "data.jsonl"),
        "dataset": datasets.Dataset.from_list(records),
        "chats": chats,
        "messages-records": [{"messages": c} for c in chats],
    }
    tokens = {}
    for name, data in sources.items():
        calib = calibrate(make_tiny("llama"), corda(), data, tokenizer=tokenizer, batch_size=3, verbose=False)
        tokens[name] = calib.tokens
    assert tokens["texts"] == tokens["records"] == tokens["jsonl"] == tokens["dataset"] > 0
    assert tokens["chats"] == tokens["messages-records"] > tokens["texts"]
    both = calibrate(make_tiny("llama"), corda(), records, tokenizer=tokenizer, text_field=["question", "answer"],
                     verbose=False)
    assert both.tokens > tokens["records"]
    loader = torch.utils.data.DataLoader(
        [{"input_ids": torch.randint(0, VOCAB, (8,)), "attention_mask": torch.ones(8, dtype=torch.long)}
         for _ in range(6)], batch_size=2)
    assert calibrate(make_tiny("llama"), corda(), loader, verbose=False).tokens == 48
    # num_samples takes a seeded subset
    sub = calibrate(make_tiny("llama"), corda(), texts, tokenizer=tokenizer, num_samples=4, seed=1, verbose=False)
    sub2 = calibrate(make_tiny("llama"), corda(), texts, tokenizer=tokenizer, num_samples=4, seed=1, verbose=False)
    assert sub.fingerprint == sub2.fingerprint and sub.fingerprint["samples"] == 4


def test_cache_roundtrip_and_refusals(tmp_path):
    cache = str(tmp_path / "cov.safetensors")
    batches = token_batches()
    model = make_tiny("llama")
    first = calibrate(model, corda(), batches, cache_file=cache, sequential=False, verbose=False)
    assert first.source == "computed" and os.path.exists(cache)
    config = corda()
    again = calibrate(model, config, batches, cache_file=cache, sequential=False, verbose=False)
    assert again.source == cache
    for g1, g2 in zip(first.groups, again.groups):
        assert g1.members == g2.members and torch.equal(g1.covariance, g2.covariance)
    # different data, different model weights, different targets: refused, naming what differs
    with pytest.raises(ValueError, match="different data"):
        calibrate(model, corda(), token_batches(seed=9), cache_file=cache, sequential=False, verbose=False)
    with pytest.raises(ValueError, match="different model"):
        calibrate(make_tiny("llama", seed=4), corda(), batches, cache_file=cache, sequential=False, verbose=False)
    with pytest.raises(ValueError, match="targets"):
        calibrate(model, corda(target_modules=["q_proj"]), batches, cache_file=cache, sequential=False, verbose=False)
    # a corrupt file is refused, not used
    with open(cache, "r+b") as f:
        f.seek(20)
        f.write(b"\x00garbage\xff" * 8)
    with pytest.raises(ValueError, match="unreadable"):
        calibrate(model, corda(), batches, cache_file=cache, sequential=False, verbose=False)
    not_ours = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(not_ours))
    with pytest.raises(ValueError, match="not a peft_ext CorDA cache"):
        calibrate(model, corda(), batches, cache_file=str(not_ours), verbose=False)


def test_summary_and_low_token_warning():
    few = token_batches(n=2, length=10, batch=2)
    with pytest.warns(UserWarning, match=r"\d+ calibration tokens for a \d+-dimensional input .* relies on damping"):
        calib = calibrate(make_tiny("llama"), corda(), few, verbose=False)
    text = calib.summary(limit=None)
    assert f"{calib.tokens:,} tokens" in text and "model.layers.0.mlp.down_proj" in text
    assert any(g.positive_definite is False for g in calib.groups)


def test_a_rank_deficient_covariance_with_enough_tokens_is_noted_in_the_summary_not_warned():
    """Enough tokens, but inputs that never vary in some directions (here MLP units zeroed in one layer): the model's
    property, not a fault of the data, so the summary notes it and no warning is raised."""
    import warnings

    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:5] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calib = calibrate(model, corda(), token_batches(), verbose=False)
    assert calib.tokens >= max(g.dim for g in calib.groups)
    assert calib.group("model.layers.0.mlp.down_proj").positive_definite is False
    assert "1 of" in calib.summary() and "rank-deficient" in calib.summary()


DIST_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from tests.helpers import make_tiny
from tests.helpers import corda, token_batches
from peft_ext import calibrate
from peft_ext.corda.calibration import batch_rows
rank, world = int(sys.argv[2]), int(sys.argv[3])
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + sys.argv[4], rank=rank, world_size=world)
g = torch.Generator().manual_seed(11)
rows = [torch.randint(1, 128, (int(n),), generator=g).tolist() for n in torch.randint(4, 20, (14,), generator=g)]

class Tok:
    pad_token_id = 0
def fake_prepare(data, tokenizer, **kw):
    return "rows", rows
import peft_ext.corda.calibration as C
C.prepare_calibration_data = fake_prepare
calib = calibrate(make_tiny("llama"), corda(), rows, tokenizer=Tok(), batch_size=3, sequential=False, verbose=False,
                  sample_normalization=sys.argv[6])
if rank == 0:
    torch.save({n: calib.group(n).covariance for n in calib.targets} | {"tokens": calib.tokens}, sys.argv[5])
if world > 1:
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("normalization", ["none", "max"])
def test_two_ranks_on_two_halves_equal_one_rank_on_all(tmp_path, normalization):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(script), root, "0", "1", "", str(tmp_path / "one.pt"), normalization],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, str(script), root, str(r), "2", store, str(tmp_path / "two.pt"),
                               normalization],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["tokens"] == two["tokens"]
    for name in one:
        if name != "tokens":
            torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


# --- save / load / export / merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kpm", "ipm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_export_merge(arch, method, tmp_path):
    x = sample_input()
    model, config = calibrated(arch, method)
    peft_model = get_peft_model(model, config)
    perturb_trainable(peft_model)
    trained = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "saved")
    # exact reload without the calibration data
    reloaded = load_adapter(make_tiny(arch), str(tmp_path / "saved"))
    assert rel_err(logits(reloaded, x), trained) <= 1e-5
    assert type(load_config(str(tmp_path / "saved"))) is CorDAConfig
    # plain rank-2r LoRA that loads without peft_ext
    out = export_peft_adapter(peft_model, str(tmp_path / "export"))
    plain = json.loads(open(os.path.join(out, "adapter_config.json")).read())
    assert plain["r"] == 8 and plain["use_dora"] is False
    assert rel_err(run_plain_peft(arch, out, x, tmp_path), trained) <= 1e-4
    # merge
    assert rel_err(logits(peft_model.merge_and_unload(), x), trained) <= 1e-5


def test_dora_export_and_reload(tmp_path):
    x = sample_input()
    model, config = calibrated("mistral", "kpm", use_dora=True)
    peft_model = get_peft_model(model, config)
    perturb_trainable(peft_model)
    trained = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "saved")
    assert rel_err(logits(load_adapter(make_tiny("mistral"), str(tmp_path / "saved")), x), trained) <= 1e-5
    out = export_peft_adapter(peft_model, str(tmp_path / "export"))
    assert json.loads(open(os.path.join(out, "adapter_config.json")).read())["use_dora"] is True
    assert rel_err(run_plain_peft("mistral", out, x, tmp_path), trained) <= 1e-4


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_kpm_keeps_its_A_factors_frozen_through_peft_training_and_reload(arch, tmp_path):
    """KPM's default corda_train_A=False: only B trains, and A stays frozen through peft's set_adapter and
    set_requires_grad, an optimizer step, save, and load_adapter(is_trainable=True)."""
    x = sample_input()
    model, config = calibrated(arch, "kpm")
    peft_model = get_peft_model(model, config)
    assert config.corda_train_A is False
    only_B = trainable_names(peft_model)
    assert only_B and all(".lora_B." in n for n in only_B)
    peft_model.set_adapter("default")
    peft_model.set_requires_grad("default", True)
    assert trainable_names(peft_model) == only_B
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model(input_ids=x).logits.float().pow(2).mean().backward()
    optimizer.step()
    for layer in peft_ext_layers(peft_model).values():
        assert torch.equal(layer.lora_A["default"].weight, layer.lora_init_A["default"])
        assert not torch.equal(layer.lora_B["default"].weight, layer.lora_init_B["default"])
    trained = logits(peft_model, x)
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["corda_train_A"] is False
    reloaded = load_adapter(make_tiny(arch), str(tmp_path), is_trainable=True)
    assert trainable_names(reloaded) == only_B
    assert rel_err(logits(reloaded, x), trained) <= 1e-5


def test_a_frozen_A_left_out_of_the_saved_files_is_put_back(tmp_path):
    """HF's Trainer under ZeRO-3 saves only trainable parameters: a KPM adapter without its lora_A tensors is completed
    from lora_init_A (in B's dtype), exports as the complete one does, and a complete directory is left alone."""
    from safetensors.torch import load_file, save_file

    from peft_ext import complete_saved_adapter

    model, config = calibrated("qwen2", "kpm")
    peft_model = get_peft_model(model, config)
    perturb_trainable(peft_model)
    peft_model.save_pretrained(tmp_path / "full")
    peft_model.save_pretrained(tmp_path / "zero3")
    file = tmp_path / "zero3" / "adapter_model.safetensors"
    full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
    save_file({k: v for k, v in full.items() if ".lora_A." not in k}, str(file), metadata={"format": "pt"})
    export_peft_adapter(str(tmp_path / "zero3"), str(tmp_path / "exported_incomplete"))
    added = complete_saved_adapter(str(tmp_path / "zero3"))
    assert added == sorted(k for k in full if ".lora_A." in k) and len(added) == len(peft_ext_layers(peft_model))
    completed = load_file(str(file))
    assert completed.keys() == full.keys() and all(torch.equal(completed[k], full[k]) for k in full)
    assert complete_saved_adapter(str(tmp_path / "zero3")) == []
    export_peft_adapter(str(tmp_path / "full"), str(tmp_path / "exported"))
    a = load_file(str(tmp_path / "exported" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "exported_incomplete" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method, train_A", [("ipm", None), ("kpm", True)])
def test_ipm_and_kpm_asked_to_train_A_train_both_factors(method, train_A):
    model, config = calibrated("llama", method, corda_train_A=train_A)
    names = trainable_names(get_peft_model(model, config))
    assert config.corda_train_A is True
    assert {".lora_A." in n for n in names} == {True, False}


def test_corda_train_A_must_be_a_bool_or_none():
    with pytest.raises(ValueError, match="corda_train_A='no'. Fix: True, False, or None"):
        corda(corda_method="kpm", corda_train_A="no")


def test_calibration_records_a_digest_of_every_sample_it_used(tmp_path):
    """The saved adapter names its calibration sample by digests of each sample's question, whatever format carried
    it; `calibration_overlap` counts the records of another set that the calibration saw. Token batches have none."""
    from peft_ext import calibration_overlap

    tokenizer = word_tokenizer()
    questions = [" ".join(f"w{(3 * i + j) % 100}" for j in range(4 + i % 5)) for i in range(12)]
    formats = {
        "texts": questions,
        "records": [{"question": q, "answer": ["w1"]} for q in questions],
        "conversations": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "w2"}]}
                          for q in questions],
    }
    recorded = {}
    for name, data in formats.items():
        model, config = make_tiny("llama"), corda()
        calibrate(model, config, data, tokenizer=tokenizer, num_samples=5, seed=3, verbose=False)
        recorded[name] = config.corda_calibration["sample_digests"]
        if name == "conversations":
            get_peft_model(model, config).save_pretrained(tmp_path)
    assert recorded["texts"] == recorded["records"] == recorded["conversations"] and len(set(recorded["texts"])) == 5
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["corda_calibration"]["sample_digests"]
    assert saved == recorded["texts"]
    probe = [{"question": q.upper() + "?", "answer": ["x"]} for q in questions]  # written differently: same keys
    assert calibration_overlap(probe, saved) == 5 and calibration_overlap(probe[:0], saved) == 0
    assert calibration_overlap([{"question": "w99 w98 w97"}], saved) == 0
    config = corda()
    calibrate(make_tiny("llama"), config, token_batches(), verbose=False)
    assert config.corda_calibration["sample_digests"] is None


def test_saved_config_keeps_corda_fields(tmp_path):
    model, config = calibrated("llama", "kpm", corda_damping=0.05)
    get_peft_model(model, config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_ext_method"] == "corda" and saved["corda_method"] == "kpm" and saved["corda_damping"] == 0.05
    assert saved["corda_calibration"]["tokens"] > 0 and "data" in saved["corda_calibration"]
    assert saved["corda_balance_factors"] is True and load_config(str(tmp_path)).corda_balance_factors is True
    with pytest.raises(ValueError, match="peft_ext"):
        PeftModel.from_pretrained(make_tiny("llama"), str(tmp_path))
    # an adapter saved before the option existed had unbalanced factors, and says so when loaded
    del saved["corda_balance_factors"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert load_config(str(tmp_path)).corda_balance_factors is False
    # an adapter saved before corda_train_A existed trained its A factors, and does again when loaded
    assert saved.pop("corda_train_A") is False
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    assert load_config(str(tmp_path)).corda_train_A is True


# --- bad input ------------------------------------------------------------------------------------------------------


def test_get_peft_model_without_calibration_leaves_model_untouched():
    model = make_tiny("llama")
    x = sample_input()
    ref, before = logits(model, x), state_snapshot(model)
    with pytest.raises(ValueError, match="has no calibration attached and names no calibration data. Fix, either route"):
        get_peft_model(model, corda())
    assert_same_state(before, model)
    assert not peft_ext_layers(model) and torch.equal(logits(model, x), ref)


def test_rank_too_large_leaves_model_untouched_and_calibration_reusable():
    model = make_tiny("llama")
    x = sample_input()
    ref, before = logits(model, x), state_snapshot(model)
    config = corda(r=40, lora_alpha=40)
    with pytest.raises(ValueError, match=r"r=40 .*k_proj.*rank_pattern"):  # block by block: before any forward
        calibrate(model, config, token_batches(), verbose=False)
    assert_same_state(before, model)
    calibrate(model, config, token_batches(), sequential=False, verbose=False)
    with pytest.raises(ValueError, match=r"r=40 .*k_proj"):
        get_peft_model(model, config)
    assert_same_state(before, model)
    assert torch.equal(logits(model, x), ref)
    config.rank_pattern = {"k_proj": 32, "v_proj": 32}
    fixed = get_peft_model(model, config)  # the calibration survived the failed attempt
    assert rel_err(logits(fixed, x), ref) <= 1e-5


def test_bad_calibration_data_is_refused():
    model = make_tiny("llama")
    before = state_snapshot(model)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, corda(), [], verbose=False)
    pad = [{"input_ids": torch.zeros(2, 6, dtype=torch.long), "attention_mask": torch.zeros(2, 6, dtype=torch.long)}]
    with pytest.raises(ValueError, match="batch 1 is all padding"):
        calibrate(model, corda(), token_batches(n=4) + pad, verbose=False)
    with pytest.raises(ValueError, match="need a tokenizer"):
        calibrate(model, corda(), ["some text"], verbose=False)
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        calibrate(model, corda(target_modules=["nope"]), token_batches(), verbose=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibrate(model, corda(), "/nonexistent/data.jsonl", tokenizer=object(), verbose=False)
    with pytest.raises(TypeError, match="CorDAConfig"):
        from peft_ext import DuDeConfig

        calibrate(model, DuDeConfig(target_modules="all-linear"), token_batches(), verbose=False)
    assert_same_state(before, model)


def test_nan_activations_are_refused_with_the_layer():
    model = make_tiny("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")  # NaN/Inf reaches down_proj's input
    before = state_snapshot(model)
    config = corda()
    with pytest.raises(ValueError, match="layers.1.mlp.down_proj' received NaN/Inf activations in calibration batch 0"):
        calibrate(model, config, token_batches(), verbose=False)
    assert config.peft_ext_runtime.calibration is None
    assert_same_state(before, model)


def test_nan_covariance_is_refused_not_looped_on():
    from peft_ext.corda.decomposition import damped_cholesky

    cov = torch.eye(4)
    cov[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        damped_cholesky(cov, 0.01, name="layer")


def test_config_errors():
    with pytest.raises(ValueError, match="corda_method='xyz'"):
        CorDAConfig(corda_method="xyz")
    with pytest.raises(ValueError, match="svd_niter=2 with corda_method='kpm'"):
        CorDAConfig(corda_method="kpm", svd_niter=2)
    with pytest.raises(ValueError, match="corda_damping"):
        CorDAConfig(corda_damping=0)


def test_calibrate_refuses_a_wrapped_model():
    model, config = calibrated("llama")
    peft_model = get_peft_model(model, config)
    with pytest.raises(ValueError, match="already has peft adapter layers"):
        calibrate(peft_model, corda(), token_batches(), verbose=False)


def test_layers_are_peft_layers():
    model, config = calibrated("gpt2", "ipm")
    layers = peft_ext_layers(get_peft_model(model, config))
    assert layers and all(isinstance(l, PeftExtLinear) and l.fan_in_fan_out for l in layers.values())
    for layer in layers.values():
        W = transpose(layer.get_base_layer().weight, True)
        assert W.shape[1] == layer.lora_A["default"].weight.shape[1]
