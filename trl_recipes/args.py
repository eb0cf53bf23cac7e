"""Arguments beyond TRL's, and `get_peft_config`, which (unlike TRL's) dispatches on `--peft_method`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig

from peft_ext import SAMPLE_NORMALIZATIONS, CorDAConfig, DuDeConfig, peft_corda_config

PEFT_METHODS = ("lora", "pissa", "dora", "dude", "corda", "eva")


@dataclass
class PeftMethodArguments:
    """The adapter method and its options; the rank, alpha, dropout and target modules are TRL's `--lora_*` flags."""

    peft_method: str = field(
        default="dude", metadata={"help": f"Adapter method: one of {', '.join(PEFT_METHODS)}."}
    )
    svd_niter: Optional[int] = field(
        default=None,
        metadata={"help": "pissa/dude/corda-ipm: randomized SVD with this many power iterations (default: exact SVD)."},
    )
    svd_seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD."})
    rank_allocation: str = field(
        default="uniform",
        metadata={"help": "dude/corda: 'uniform' (--lora_r on every layer) or 'budgeted' (per-layer ranks from the "
                          "spectra, the parameters of uniform r; see docs/ranks.md)."},
    )
    eva_rho: float = field(
        default=2.0,
        metadata={"help": "eva (peft's EVA, the published budgeted init, for comparisons): a layer's rank is at most "
                          "eva_rho · lora_r; 1 keeps r everywhere. Its data: the calibration records."},
    )
    rank_cap: float = field(default=2.0, metadata={"help": "dude/corda, budgeted: a layer's rank is at most "
                                                           "rank_cap · lora_r."})
    corda_method: str = field(default="ipm", metadata={"help": "corda: 'kpm' (knowledge-preserved) or 'ipm'."})
    corda_damping: float = field(default=0.01, metadata={"help": "corda: relative damping of the covariance."})
    corda_balance_factors: bool = field(
        default=True, metadata={"help": "corda: equal norms of the two factors of each component (see CorDAConfig)."}
    )
    corda_implementation: str = field(
        default="peft_ext",
        metadata={
            "help": (
                "corda: 'peft_ext' (peft_ext.calibrate + CorDAConfig) or 'peft' (peft's own preprocess_corda, one "
                "sample at a time, and LoraConfig(init_lora_weights='corda'), for side-by-side comparisons)."
            )
        },
    )
    calibration_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "corda: local JSONL file or Hub dataset for calibration (default: the training data)."},
    )
    calibration_split: str = field(default="train", metadata={"help": "corda: split of a Hub calibration dataset."})
    calibration_config: Optional[str] = field(
        default=None, metadata={"help": "corda: configuration name of a Hub calibration dataset (e.g. 'main')."}
    )
    calibration_text_field: Optional[str] = field(
        default=None,
        metadata={"help": "corda: record field(s) to calibrate on, comma separated (default: auto, see calibrate)."},
    )
    calibration_samples: int = field(default=256, metadata={"help": "corda: number of calibration samples."})
    calibration_max_length: int = field(default=256, metadata={"help": "corda: tokens per calibration sample."})
    calibration_batch_size: int = field(default=8, metadata={"help": "corda: calibration batch size."})
    calibration_cache: Optional[str] = field(
        default=None,
        metadata={"help": "corda: cache of the covariances, read if valid, else written (peft_ext: checked against "
                          "model, targets and data; a folder of per-block files when calibrating block by block, so "
                          "that an interrupted run resumes, or a safetensors file for a whole-model pass, read by "
                          "either; --corda_implementation peft: peft's covariance_file, unchecked)."}
    )
    calibration_sample_normalization: str = field(
        default="none",
        metadata={"help": "corda (peft_ext): 'none' (every real token weighs the same) or 'max' (each sample's "
                          "activations divided by their maximum before summing, as peft's preprocess_corda, which "
                          "always does so); see peft_ext.calibrate."}
    )
    calibration_sequential: Optional[bool] = field(
        default=None,
        metadata={"help": "corda (peft_ext): calibrate block by block, each block's covariances decomposed and freed "
                          "at once (default: wherever the model's decoder blocks hold every target); false: one "
                          "whole-model pass."}
    )
    float_weights: str = field(
        default="auto",
        metadata={
            "help": (
                "dude/corda with --load_in_8bit/--load_in_4bit: decompose the float weights read from this safetensors "
                "checkpoint and quantize the residual once (peft_ext's float_weights_path). 'auto': the model's own "
                "checkpoint (local folder or Hub cache); 'none': decompose the dequantized weights; or a path."
            )
        },
    )
    train_lora_A: Optional[bool] = field(
        default=None,
        metadata={"help": "Whether the A factors (the input side of every adapter) train. Unset: the method's default "
                          "(peft_ext's CorDA: false for KPM, true for IPM, its corda_train_A; every other method: "
                          "true). false: A stays at its init and only B (and DoRA/DuDe's magnitude) trains, as "
                          "LoRA-FA; with CorDA-KPM, A then keeps reading only the input directions its calibration "
                          "data excites least."},
    )
    eval_examples: int = field(
        default=3, metadata={"help": "Held-out examples answered before and after training (0: skip)."}
    )
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per held-out answer."})
    export_plain_peft: bool = field(
        default=True, metadata={"help": "Also write a plain peft adapter (loads without peft_ext) after training."}
    )
    save_merged: bool = field(
        default=False,
        metadata={"help": "Also write merged/: the base model with the adapter merged into its weights (safetensors, "
                          "the base's dtype, tokenizer included), for plain transformers and for serving DoRA-style "
                          "adapters (DuDe, DoRA) with vLLM, which serves LoRA adapters only."},
    )

    def __post_init__(self):
        if self.peft_method not in PEFT_METHODS:
            raise ValueError(f"--peft_method {self.peft_method!r} is not one of {', '.join(PEFT_METHODS)}.")
        if self.corda_method not in ("kpm", "ipm"):
            raise ValueError(f"--corda_method {self.corda_method!r}: use 'kpm' or 'ipm'.")
        if self.calibration_sample_normalization not in SAMPLE_NORMALIZATIONS:
            raise ValueError(f"--calibration_sample_normalization {self.calibration_sample_normalization!r}: use "
                             f"{' or '.join(map(repr, SAMPLE_NORMALIZATIONS))}.")
        if self.corda_implementation not in ("peft_ext", "peft"):
            raise ValueError(f"--corda_implementation {self.corda_implementation!r}: use 'peft_ext' or 'peft'.")
        if self.save_merged and self.converts_at_save() and not self.export_plain_peft:
            raise ValueError("--save_merged for peft's PiSSA/CorDA merges the converted plain adapter, which "
                             "--export_plain_peft false does not write. Fix: keep --export_plain_peft true.")

    def converts_at_save(self) -> bool:
        """peft's PiSSA and CorDA adapters apply to a residual base that peft cannot rebuild on reload: they are
        exported through peft's conversion to a plain LoRA (`path_initial_model_for_weight_conversion`)."""
        return self.peft_method == "pissa" or (self.peft_method == "corda" and self.corda_implementation == "peft")


def get_peft_config(model_args, method_args: PeftMethodArguments, float_weights_path: Optional[str] = None):
    """The peft config for `--peft_method`, from TRL's ModelConfig (`--lora_r`, `--lora_alpha`, ...)."""
    common = dict(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules or "all-linear",
        use_rslora=model_args.use_rslora,
        modules_to_save=model_args.lora_modules_to_save,
        task_type=model_args.lora_task_type,
    )
    if isinstance(common["target_modules"], list) and common["target_modules"] == ["all-linear"]:
        common["target_modules"] = "all-linear"
    method = method_args.peft_method
    ranks = dict(rank_allocation=method_args.rank_allocation, rank_cap=method_args.rank_cap)
    if method_args.rank_allocation != "uniform" and (method not in ("dude", "corda")
                                                     or method_args.corda_implementation == "peft"):
        raise ValueError(f"--rank_allocation {method_args.rank_allocation} is a peft_ext option (dude, corda); "
                         f"--peft_method {method} has uniform ranks. Fix: leave --rank_allocation uniform, or use "
                         f"peft's EVA (rho) for LoRA.")
    if method == "lora":
        return LoraConfig(**common, use_dora=model_args.use_dora)
    if method == "eva":
        from peft import EvaConfig

        return LoraConfig(**common, init_lora_weights="eva", eva_config=EvaConfig(rho=method_args.eva_rho))
    if method == "dora":
        return LoraConfig(**common, use_dora=True)
    if method == "pissa":
        init = "pissa" if method_args.svd_niter is None else f"pissa_niter_{method_args.svd_niter}"
        return LoraConfig(**common, init_lora_weights=init)
    if method == "dude":
        return DuDeConfig(**common, svd_niter=method_args.svd_niter, svd_seed=method_args.svd_seed,
                          float_weights_path=float_weights_path, **ranks)
    if method_args.corda_implementation == "peft":
        return peft_corda_config(**common, corda_method=method_args.corda_method,
                                 covariance_file=method_args.calibration_cache)
    return CorDAConfig(**common, corda_method=method_args.corda_method, corda_damping=method_args.corda_damping,
                       corda_balance_factors=method_args.corda_balance_factors,
                       svd_niter=method_args.svd_niter if method_args.corda_method == "ipm" else None,
                       svd_seed=method_args.svd_seed, float_weights_path=float_weights_path,
                       corda_train_A=method_args.train_lora_A, **ranks)
