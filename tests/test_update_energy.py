"""benchmarks/update_energy.py: the energies of a saved update on two input covariances, split by factor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.update_energy import update_energies


def write_adapter(path, tensors, r=1, alpha=2):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "use_rslora": False}))
    save_file({f"base_model.model.layers.0.proj.{k}": v for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))


def test_energies_split_into_b_and_a_moves(tmp_path):
    """A₀ reads input 0, the trained A also input 1; knowledge inputs live on input 1, task inputs on input 0."""
    A0, B0 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    A, B = torch.tensor([[1.0, 0.5]]), torch.tensor([[2.0], [0.0]])
    write_adapter(tmp_path / "a", {"lora_A.weight": A, "lora_B.weight": B, "lora_init_A": A0, "lora_init_B": B0})
    know = {"layers.0.proj": torch.diag(torch.tensor([0.0, 1.0]))}
    task = {"layers.0.proj": torch.diag(torch.tensor([1.0, 0.0]))}
    e = update_energies(str(tmp_path / "a"), know, task)
    # s = 2: ΔW = 2(BA − B₀A₀) = [[2, 2], [0, 0]]; B's part 2(B−B₀)A₀ = [[2, 0], ...]; A's part 2B(A−A₀) = [[0, 2], ...]
    assert e["know"] == pytest.approx(4.0) and e["task"] == pytest.approx(4.0)
    assert e["know_B"] == 0.0 and e["task_B"] == pytest.approx(4.0)
    assert e["know_A"] == pytest.approx(4.0) and e["task_A"] == 0.0
    assert e["dA2"] == pytest.approx(0.25) and e["A02"] == pytest.approx(1.0)


def test_lora_without_init_factors_is_all_a_move_and_missing_covariances_are_named(tmp_path):
    write_adapter(tmp_path / "l", {"lora_A.weight": torch.tensor([[1.0, 1.0]]), "lora_B.weight": torch.ones(2, 1)})
    cov = {"layers.0.proj": torch.eye(2)}
    e = update_energies(str(tmp_path / "l"), cov, cov)
    assert e["know"] == pytest.approx(16.0) and e["know_B"] == 0.0 and e["know_A"] == pytest.approx(16.0)
    with pytest.raises(ValueError, match="layer layers.0.proj has no covariance"):
        update_energies(str(tmp_path / "l"), {}, cov)
