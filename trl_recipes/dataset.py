"""Loading training/evaluation data: a local JSONL/JSON file or directory, or a Hub dataset name.

Accepted training formats (TRL's): `messages` (conversational), `prompt` + `completion` (standard or conversational;
completion-only loss), or a text column (`--dataset_text_field`, default `text`). Records with `question` + `answer`
(GSM8K style) are turned into conversational prompt/completion pairs.
"""

from __future__ import annotations

import os
from typing import Optional


class DataError(ValueError):
    """Bad data input; the CLI prints it as one line."""


def is_local_file(name_or_path: str) -> bool:
    """A data argument names a local JSON/JSONL file (an existing file, or a .jsonl/.json name); otherwise a Hub id."""
    return os.path.isfile(name_or_path) or name_or_path.endswith((".jsonl", ".json"))


def load_split(name_or_path: str, split: str = "train", config: Optional[str] = None):
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" bars would bury a one-line error
    try:
        if is_local_file(name_or_path):
            return _load_local_file(datasets, name_or_path)
        try:
            return datasets.load_dataset(name_or_path, name=config, split=split)
        except Exception as exc:  # offline, no such dataset, no such split
            raise DataError(
                f"cannot load dataset '{name_or_path}' (split '{split}'): {str(exc).splitlines()[0]}"
            ) from exc
    finally:
        datasets.enable_progress_bars()


def _load_local_file(datasets, path: str):
    """A local JSON/JSONL file as a Dataset; a missing or empty file, or a broken line (with its number), is a
    DataError."""
    from peft_ext import read_jsonl

    if not os.path.isfile(path):
        raise DataError(f"dataset file '{path}' does not exist.")
    if not path.endswith(".json"):  # JSON lines: check every line first, so that an error names the line
        try:
            if not read_jsonl(path, what="dataset file"):
                raise DataError(f"dataset file '{path}' is empty.")
        except ValueError as exc:
            raise DataError(str(exc)) from None
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as exc:  # datasets' DatasetGenerationError and friends
        raise DataError(f"dataset file '{path}' cannot be read: {str(exc).splitlines()[0]}") from exc
    if len(ds) == 0:
        raise DataError(f"dataset file '{path}' is empty.")
    return ds


def qa_to_prompt_completion(record: dict) -> dict:
    answer = record["answer"]
    if isinstance(answer, (list, tuple)):
        answer = answer[0]
    return {"prompt": [{"role": "user", "content": str(record["question"])}],
            "completion": [{"role": "assistant", "content": str(answer)}]}


def qa_to_messages(record: dict) -> dict:
    """A question/answer record as one chat conversation (user question, assistant answer)."""
    pair = qa_to_prompt_completion(record)
    return {"messages": pair["prompt"] + pair["completion"]}


def pair_to_messages(record: dict) -> dict:
    """A prompt/completion record (chat lists or plain strings) as one chat conversation: the prompt's messages, then
    the completion's, as the chat model sees them in training."""
    prompt, completion = record["prompt"], record["completion"]
    prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
    return {"messages": list(prompt) + list(completion)}


def to_sft_format(ds, text_field: str = "text", where: str = "dataset"):
    """Check that `ds` has columns SFTTrainer can train on (converting question/answer); raise a DataError if not."""
    cols = set(ds.column_names)
    if len(ds) == 0:
        raise DataError(f"{where} is empty.")
    if "messages" in cols or {"prompt", "completion"} <= cols or text_field in cols:
        return ds
    if {"question", "answer"} <= cols:
        return ds.map(qa_to_prompt_completion, remove_columns=sorted(cols))
    raise DataError(
        f"{where} has columns {sorted(cols)}; training needs 'messages', 'prompt' + 'completion', "
        f"'question' + 'answer', or a text column (--dataset_text_field, now '{text_field}')."
    )


def prompt_and_reference(record: dict) -> tuple[list[dict], str]:
    """(chat prompt, reference answer text) of an evaluation record in any accepted format."""
    if "prompt" in record and "completion" in record:
        prompt = record["prompt"]
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion = record["completion"]
        reference = completion[-1]["content"] if isinstance(completion, list) else completion
        return prompt, reference
    if "messages" in record:
        msgs = record["messages"]
        return msgs[:-1], msgs[-1]["content"]
    if "question" in record and "answer" in record:
        answer = record["answer"]
        return [{"role": "user", "content": str(record["question"])}], answer[0] if isinstance(answer, list) else answer
    raise DataError(f"evaluation record with fields {sorted(record)} has no prompt/answer pair.")


# --- a recipe run's data ----------------------------------------------------------------------------------------------


def load_datasets(script_args, training_args, method_args):
    """(train dataset, held-out records, CorDA's (or EVA's) calibration records or None) — validated before any
    work."""
    from .data import TEST_FILE, TRAIN_FILE

    name = script_args.dataset_name or TRAIN_FILE
    train = to_sft_format(load_split(name, script_args.dataset_train_split, script_args.dataset_config),
                          training_args.dataset_text_field, where=f"dataset '{name}'")
    held_out = []
    if method_args.eval_examples > 0:
        if script_args.dataset_name is None:
            test = load_split(TEST_FILE)
        elif os.path.isfile(name):
            test = None
        else:
            try:
                test = load_split(name, script_args.dataset_test_split, script_args.dataset_config)
            except DataError:
                test = None
        if test is None:  # hold out the last examples of the training data
            n = min(method_args.eval_examples, max(len(train) // 10, 1))
            test, train = train.select(range(len(train) - n, len(train))), train.select(range(len(train) - n))
        records = [test[i] for i in range(min(method_args.eval_examples, len(test)))]
        try:
            held_out = [prompt_and_reference(r) for r in records]
        except DataError:
            held_out = []  # e.g. plain text data: nothing to answer
    calibration = calibration_data(method_args, train) if method_args.peft_method in ("corda", "eva") else None
    return train, held_out, calibration


def calibration_data(method_args, train):
    """The calibration records: `--calibration_dataset` (a local file, or a Hub id with `--calibration_split` and
    `--calibration_config`) or the training data. `--calibration_text_field messages` on question/answer or prompt/completion records
    calibrates on them as whole chat conversations (question and answer), the way the chat model sees them in
    training, not as raw text or prompts alone."""
    data = train
    if method_args.calibration_dataset:
        data = load_split(method_args.calibration_dataset, method_args.calibration_split,
                          method_args.calibration_config)
    cols = set(data.column_names)
    if method_args.calibration_text_field == "messages" and "messages" not in cols:
        if {"question", "answer"} <= cols:
            data = data.map(qa_to_messages, remove_columns=sorted(cols))
        elif {"prompt", "completion"} <= cols:
            data = data.map(pair_to_messages, remove_columns=sorted(cols))
    return data  # records with messages / prompt / text: calibrate picks the field
