"""Launched by tests/test_calibration_by_config.py on 2 processes (plain DDP, or ZeRO-3 through accelerate):
TRL's SFTTrainer builds the model from its path and wraps it with a CorDAConfig that only names its calibration
data; every layer's adapter and residual are gathered and saved from rank 0, for comparison with one process.

usage: trainer_calibration.py METHOD MODEL_DIR OUT_PT     METHOD: kpm | ipm
(plain DDP: torchrun --nproc_per_node 2; ZeRO-3: accelerate launch --config_file tests/distributed/zero3_cpu.yaml)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


def calibration_texts() -> list[str]:
    """Texts of varied lengths (padding is masked out): the data each config names."""
    words = "the a model of data learns keeps answers question number sum river city".split()
    g = torch.Generator().manual_seed(5)
    return [" ".join(words[i] for i in torch.randint(0, len(words), (int(n),), generator=g).tolist())
            for n in torch.randint(4, 24, (12,), generator=g)]


def config(method: str):
    from peft_ext import CalibrationData, CorDAConfig

    # float64 sums: 2 shards reduced and 1 pass agree to < 1e-6 even in KPM's smallest components
    return CorDAConfig(r=4, lora_alpha=8, corda_method=method,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                       calibration_data=CalibrationData(calibration_texts(), num_samples=12, batch_size=3,
                                                        covariance_dtype="float64"))


def train_records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(8)]


def main(method, model_dir, out):
    import torch.distributed as dist
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from peft_ext.corda import at_injection
    from tests.distributed.zero3_init import collect
    from trl_recipes.distributed import init_distributed_on_cpu

    seen, calibrate = [], at_injection.calibrate  # the world each calibration by get_peft_model ran in

    def recorded(*args, **kwargs):
        seen.append(dist.get_world_size() if dist.is_initialized() else 1)
        return calibrate(*args, **kwargs)

    at_injection.calibrate = recorded

    # under DeepSpeed: the gloo group before the trainer loads the model (partitioned under ZeRO-3), kept by accelerate
    state = {"accelerator_config": {"use_configured_state": True}} if init_distributed_on_cpu() else {}
    args = SFTConfig(output_dir=os.path.join(os.path.dirname(out), "trainer"), max_steps=1, report_to=[],
                     per_device_train_batch_size=1, use_cpu=True, save_strategy="no", bf16=False, **state)
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(train_records()),
                         peft_config=config(method))
    result = {"layers": collect(trainer.model), "world_size": dist.get_world_size(), "world_at_injection": seen,
              "partitioned": any(hasattr(p, "ds_id") for p in trainer.model.parameters()),
              "calibration": trainer.model.peft_config["default"].corda_calibration}
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
