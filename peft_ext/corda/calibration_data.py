"""`CalibrationData`: the calibration a `CorDAConfig` carries, so that `get_peft_model(model, config)` calibrates on
the model it is given (`peft_ext.corda.at_injection`) and a trainer that builds the model itself needs nothing else.

It names the data (a `datasets.Dataset`, a list of texts, conversations or records, a local file or dataset folder,
or a Hub dataset id) and `peft_ext.calibrate`'s arguments. Saved with the adapter as a record: a path or Hub id as it
is, other data by a description only (the samples' digests and the data fingerprint are in `corda_calibration`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..jsonl import read_jsonl
from .covariance import SAMPLE_NORMALIZATIONS


FILE_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}  # datasets' builders
INT_FIELDS = ("num_samples", "max_length", "batch_size")
COVARIANCE_DTYPES = ("float32", "float64")


@dataclass
class CalibrationData:
    """What `peft_ext.calibrate(model, config, data, ...)` would be given, carried by `CorDAConfig.calibration_data`.

    Args:
        data: a `datasets.Dataset`, a list of texts, chat conversations or records, a local file (.jsonl, .json,
            .csv, .parquet, .txt), a local dataset folder (`save_to_disk`, or data files `load_dataset` reads), or a
            Hub dataset id. None only in a saved record of data that was not a path.
        num_samples, max_length, batch_size, seed, text_field, sample_normalization, sequential, cache_file: as in
            `peft_ext.calibrate`; covariance_dtype: its covariance_dtype by name, "float32" or "float64".
        tokenizer: a tokenizer, or a name or path for `AutoTokenizer.from_pretrained`; None: the model's
            `name_or_path` (the checkpoint TRL loaded). Not needed for data of token batches.
        split, subset: the split of a Hub dataset or dataset folder, and a Hub dataset's subset (configuration
            name, e.g. "main" for gsm8k).
    """

    data: Any = None
    num_samples: int = 256
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0
    text_field: Optional[Union[str, list[str]]] = None
    tokenizer: Any = None
    split: str = "train"
    subset: Optional[str] = None
    sample_normalization: str = "none"
    sequential: Optional[bool] = None
    cache_file: Optional[str] = None
    covariance_dtype: str = "float32"
    data_description: Optional[str] = None  # set in a saved record when the data itself is not saved

    def __post_init__(self):
        for name in INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CorDAConfig: calibration_data.{name}={value!r}. Fix: an integer >= 1.")
        if self.sample_normalization not in SAMPLE_NORMALIZATIONS:
            raise ValueError(f"CorDAConfig: calibration_data.sample_normalization={self.sample_normalization!r}. "
                             f"Fix: one of {', '.join(map(repr, SAMPLE_NORMALIZATIONS))}.")
        if self.covariance_dtype not in COVARIANCE_DTYPES:
            raise ValueError(f"CorDAConfig: calibration_data.covariance_dtype={self.covariance_dtype!r}. Fix: one of "
                             f"{', '.join(map(repr, COVARIANCE_DTYPES))}.")
        if self.data is not None and not (isinstance(self.data, (str, os.PathLike, list, tuple))
                                          or hasattr(self.data, "__iter__")):
            raise TypeError(f"CorDAConfig: calibration_data.data is a {type(self.data).__name__}. Fix: a Dataset, a "
                            f"list of texts/conversations/records, a local file or folder, or a Hub dataset id.")
        if isinstance(self.data, (str, os.PathLike)) and not str(self.data).strip():
            raise ValueError("CorDAConfig: calibration_data.data=''. Fix: a local file or folder, or a Hub dataset id.")

    def __deepcopy__(self, memo) -> "CalibrationData":
        """peft and TRL deep-copy configs: the data and the tokenizer are shared (read only), not copied."""
        shared = {"data": self.data, "tokenizer": self.tokenizer}
        rest = {f.name: copy.deepcopy(getattr(self, f.name), memo) for f in dataclasses.fields(self)
                if f.name not in shared}
        return CalibrationData(**shared, **rest)

    def __repr__(self) -> str:
        return f"CalibrationData({describe(self.data)}, num_samples={self.num_samples}, max_length={self.max_length})"

    def to_record(self) -> dict:
        """What the saved adapter_config.json holds: every option, a path or Hub id as it is, other data and
        tokenizers by description."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if not isinstance(self.data, (str, os.PathLike, type(None))):
            record["data"], record["data_description"] = None, describe(self.data)
        elif self.data is not None:
            record["data"] = os.fspath(self.data)
        tok = self.tokenizer
        record["tokenizer"] = tok if isinstance(tok, (str, type(None))) else getattr(tok, "name_or_path", None)
        return record

    @classmethod
    def coerce(cls, value) -> Optional["CalibrationData"]:
        """A `CalibrationData` from what the config field accepts: one, a dict of its fields (a saved record, or
        YAML), or the data alone (a path, Hub id, Dataset or list), with the default options."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
            if unknown:
                raise ValueError(f"CorDAConfig: calibration_data has unknown keys {unknown}. Fix: use the fields of "
                                 f"peft_ext.CalibrationData ({', '.join(f.name for f in dataclasses.fields(cls))}).")
            return cls(**value)
        return cls(data=value)


def describe(data) -> str:
    if data is None:
        return "no data"
    if isinstance(data, (str, os.PathLike)):
        return repr(os.fspath(data))
    try:
        size = f", {len(data)} samples"
    except TypeError:
        size = ""
    return f"<{type(data).__module__.split('.')[0]}.{type(data).__name__}{size}>"


def load_source(spec: CalibrationData):
    """The samples `spec.data` names: a path or Hub id read (a .jsonl file by `read_jsonl`, other files, folders and
    Hub ids by `datasets`), a `DatasetDict` narrowed to `spec.split`, anything else as it is."""
    data = spec.data
    if isinstance(data, (str, os.PathLike)):
        return _read_named(os.fspath(data), spec.split, spec.subset)
    if hasattr(data, "keys") and hasattr(data, "column_names") and not hasattr(data, "features"):  # a DatasetDict
        return _split_of(data, spec.split, describe(data))
    return data


def _read_named(name: str, split: str, subset: Optional[str] = None):
    import datasets

    suffix = os.path.splitext(name)[1].lower()
    if os.path.isfile(name):
        if suffix == ".jsonl":
            return read_jsonl(name, what="CorDAConfig: calibration_data file")
        if suffix not in FILE_BUILDERS:
            raise ValueError(f"CorDAConfig: calibration_data.data={name!r} is a {suffix or 'suffix-less'} file. Fix: "
                             f"a .jsonl, {', '.join(FILE_BUILDERS)} file, a dataset folder or a Hub dataset id.")
        return datasets.load_dataset(FILE_BUILDERS[suffix], data_files=name, split="train")
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "dataset_dict.json")) or os.path.isfile(os.path.join(name, "state.json")):
            loaded = datasets.load_from_disk(name)
            return loaded if isinstance(loaded, datasets.Dataset) else _split_of(loaded, split, repr(name))
        return datasets.load_dataset(name, split=split)
    if suffix in (".jsonl", *FILE_BUILDERS) or name.startswith((".", os.sep)):
        raise FileNotFoundError(f"CorDAConfig: calibration_data.data={name!r}: no such file or folder. Fix: the path "
                                f"of the calibration data on this machine (relative to {os.getcwd()!r}).")
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown id, no such split: one message with the fix
        raise ValueError(f"CorDAConfig: calibration_data.data={name!r} is no local file or folder, and the Hub "
                         f"dataset could not be loaded (subset {subset!r}, split {split!r}): {type(exc).__name__}: {exc}. Fix: a local "
                         f"file or folder, a reachable Hub id and split, or the samples themselves.") from exc


def _split_of(dataset_dict, split: str, what: str):
    if split not in dataset_dict:
        raise ValueError(f"CorDAConfig: calibration_data.split={split!r}, but {what} has the splits "
                         f"{sorted(dataset_dict)}. Fix: name one of them.")
    return dataset_dict[split]


def resolve_tokenizer(spec: CalibrationData, model):
    """The tokenizer texts are calibrated with: `spec.tokenizer`, loaded when it is a name or path, else the one of
    the model's checkpoint (`name_or_path`)."""
    tok = spec.tokenizer
    if tok is not None and not isinstance(tok, (str, os.PathLike)):
        return tok
    name = tok or getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    where = "calibration_data.tokenizer" if tok else "the model's name_or_path"
    if not name:
        raise ValueError("CorDAConfig: calibration_data has texts to tokenize, no tokenizer, and the model names no "
                         "checkpoint (name_or_path is empty). Fix: calibration_data=CalibrationData(data, "
                         "tokenizer=<a tokenizer or its path>).")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(name))
    except Exception as exc:
        raise ValueError(f"CorDAConfig: no tokenizer could be loaded from {os.fspath(name)!r} ({where}): "
                         f"{type(exc).__name__}: {exc}. Fix: calibration_data=CalibrationData(data, tokenizer=<a "
                         f"tokenizer or its path>).") from exc


def field_for_config():
    return field(
        default=None,
        compare=False,
        metadata={
            "help": (
                "The calibration data and options (peft_ext.CalibrationData, a dict of its fields, or the data alone: "
                "a Dataset, a list of texts/conversations/records, a local file or folder, or a Hub id). With it, "
                "get_peft_model(model, config) calibrates on the model it is given whenever no calibration is "
                "attached, so SFTTrainer/DPOTrainer/GRPOTrainer(peft_config=config) need nothing else. Saved: paths "
                "and Hub ids as they are, other data by description."
            )
        },
    )
