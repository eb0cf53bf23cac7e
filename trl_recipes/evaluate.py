"""Task gain and knowledge retention, before vs after fine-tuning.

    python -m trl_recipes.evaluate --adapter outputs/SmolLM2-135M-Instruct-corda-kpm/adapter \
        --output_dir outputs/SmolLM2-135M-Instruct-corda-kpm/eval
    python -m trl_recipes.evaluate --model BASE [--adapter DIR | --merged DIR] --task_data openai/gsm8k \
        --task_config main --knowledge_data google-research-datasets/nq_open --num_knowledge 500 --output_dir eval_out

Metrics, each for the base model ("before") and the fine-tuned one ("after"):
  * task (GSM8K style, `{"question", "answer"}` with "#### N", or prompt/completion records): exact match of the
    final number of a greedy answer, and the answer NLL (mean per-token negative log-likelihood of the reference
    answer given the prompt); default: the 60 packaged held-out problems (trl_recipes/data/test.jsonl);
  * knowledge (NQ-open style, `{"question", "answer": [...]}`): normalised exact match of a short greedy answer against
    any gold answer, and the gold-answer NLL; default: the 200 packaged EfficientQA questions, none of which is in
    the KPM recipe's calibration slice (trl_recipes/data/PROVENANCE.md).
Each data set is a local JSONL file or a Hub id (with `--*_split`, `--*_config`), or 'none'. `--adapter` takes a
peft_ext adapter (loaded with `peft_ext.load_adapter`) or a plain peft one; `--merged` a merged model directory. A
CorDA adapter of peft_ext records a digest of each calibration sample: questions of the evaluation that its
calibration saw are counted, with a warning. Writes `eval.json` and `eval.md` into `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .dataset import DataError, is_local_file, load_split, prompt_and_reference

KNOWLEDGE_INSTRUCTION = "Answer the question with a short phrase only.\nQuestion: {question}"


# --- scoring ----------------------------------------------------------------------------------------------------------


def final_number(text: str) -> Optional[str]:
    """The answer number: what follows '####' if present, else the last number in the text; normalised."""
    if "####" in text:
        text = text.split("####")[-1]
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not nums:
        return None
    n = nums[0] if "####" in text else nums[-1]
    n = n.replace(",", "")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return n


def normalize_answer(s: str) -> str:
    """SQuAD/NQ normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def knowledge_match(prediction: str, golds: list[str]) -> bool:
    pred = normalize_answer(prediction.strip().split("\n")[0])
    return any(pred == normalize_answer(g) for g in golds)


# --- model calls --------------------------------------------------------------------------------------------------


def _chat_text(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def pad_token_id(tokenizer) -> int:
    """The tokenizer's padding id, its end-of-sequence id when it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
             desc: str = "generating answers") -> list[str]:
    """Greedy answers to chat prompts (batched, left padding), with a progress bar over the prompts."""
    if model.training:  # only then: `no_cpu_repacking` keeps a model's 4-bit layers in training mode on purpose
        model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = pad_token_id(tokenizer)
    outs = []
    bar = tqdm(total=len(prompts), desc=desc, unit="answer", leave=False, disable=not prompts)
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [_chat_text(tokenizer, p, True) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            bar.update(len(texts))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return [o.strip() for o in outs]


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


@torch.no_grad()
def answer_nll(model, tokenizer, prompts: list[list[dict]], answers: list[str], batch_size: int = 8,
               desc: str = "scoring answers (NLL)", total: bool = False) -> list[float]:
    """Mean per-token NLL of each answer given its chat prompt (`total`: the sum over its tokens, −log p(answer)),
    with a progress bar over the answers.

    Only the positions that predict answer tokens go through the output layer (`logits_to_keep`, for models that take
    it): on a 135M model with a 49k vocabulary the prompt's logits were a quarter of the cost."""
    if model.training:  # see `generate`
        model.eval()
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    keep_logits = _accepts_logits_to_keep(model)
    encoded = []
    for p, a in zip(prompts, answers):
        prompt_ids = tokenizer(_chat_text(tokenizer, p, True), add_special_tokens=False)["input_ids"]
        full = tokenizer(_chat_text(tokenizer, p + [{"role": "assistant", "content": a}], False),
                         add_special_tokens=False)["input_ids"]
        encoded.append((full, len(prompt_ids)))
    order = sorted(range(len(encoded)), key=lambda k: len(encoded[k][0]))  # batches of similar length: less padding
    scores = [0.0] * len(encoded)
    bar = tqdm(total=len(order), desc=desc, unit="answer", leave=False, disable=not order)
    for i in range(0, len(order), batch_size):
        rows = [encoded[k] for k in order[i : i + batch_size]]
        bar.update(len(rows))
        width = max(len(f) for f, _ in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (full, n_prompt) in enumerate(rows):
            ids[j, : len(full)] = torch.tensor(full)
            labels[j, n_prompt : len(full)] = torch.tensor(full[n_prompt:])
            mask[j, : len(full)] = 1
        # position t predicts token t + 1: keep positions start .. width - 2, where start precedes the first answer
        start = max(min(n for _, n in rows) - 1, 0)
        kwargs = {"logits_to_keep": torch.arange(start, width - 1, device=device)} if keep_logits else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
        if not keep_logits:
            logits = logits[:, start : width - 1]
        tgt = labels[:, start + 1 : width].to(device)
        nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                ignore_index=-100, reduction="none").view(tgt.shape)
        valid = tgt != -100
        per_answer = nll.sum(1) if total else nll.sum(1) / valid.sum(1).clamp_min(1)
        for k, value in zip(order[i : i + batch_size], per_answer.tolist()):
            scores[k] = value
    bar.close()
    return scores


# --- evaluation ---------------------------------------------------------------------------------------------------


def read_records(name: str, n: Optional[int] = None, split: str = "train", config: Optional[str] = None) -> list[dict]:
    """The first `n` records (None: all) of a local JSON-lines file, or of split `split` of a Hub dataset."""
    from peft_ext import read_jsonl

    if is_local_file(name):
        try:
            records = read_jsonl(name, what="evaluation file")
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(str(exc)) from None
    else:
        ds = load_split(name, split, config)
        records = [ds[i] for i in range(len(ds) if n is None else min(n, len(ds)))]
    if not records:
        raise DataError(f"evaluation data '{name}' is empty.")
    return records if n is None else records[:n]


def calibration_digests(adapter: Optional[str]) -> Optional[list[str]]:
    """The sample digests a CorDA adapter's calibration recorded (`corda_calibration.sample_digests` in its
    adapter_config.json), or None."""
    path = os.path.join(adapter, "adapter_config.json") if adapter else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f).get("corda_calibration") or {}
    return record.get("sample_digests")


def calibration_overlap_report(adapter: Optional[str], task, knowledge) -> Optional[dict]:
    """{part: records whose question the adapter's calibration saw}, with a warning naming the count for each part
    with any (its change is then not held out); None for an adapter that recorded no calibration samples."""
    from peft_ext import calibration_overlap

    digests = calibration_digests(adapter)
    if digests is None:
        return None
    report = {}
    for part, records in (("task", task), ("knowledge", knowledge)):
        if records:
            report[part] = calibration_overlap(records, digests)
            if report[part]:
                print(f"warning: {report[part]} of the {len(records)} {part} questions are in the calibration sample "
                      f"of the CorDA adapter '{adapter}' (its corda_calibration.sample_digests): on them the "
                      f"{part} change is not measured on held-out data. Fix: evaluate on questions outside the "
                      f"calibration data (the default knowledge set is disjoint from the KPM recipe's).",
                      file=sys.stderr)
    return report


def evaluate_task(model, tokenizer, records: list[dict], max_new_tokens: int = 256, batch_size: int = 8,
                  generation_batch_size: Optional[int] = None, generation_examples: Optional[int] = None) -> dict:
    """Answer NLL over all `records`; exact match over the first `generation_examples` (default: all), since greedy
    generation is the slow part."""
    prompts, refs = zip(*(prompt_and_reference(r) for r in records))
    n_gen = len(records) if generation_examples is None else min(generation_examples, len(records))
    preds = generate(model, tokenizer, list(prompts[:n_gen]), max_new_tokens, generation_batch_size or batch_size,
                     desc="task: generating answers")
    em = [final_number(p) is not None and final_number(p) == final_number(r) for p, r in zip(preds, refs)]
    nll = answer_nll(model, tokenizer, list(prompts), list(refs), batch_size, desc="task: scoring answers (NLL)")
    return {"exact_match": sum(em) / len(em) if em else None, "answer_nll": sum(nll) / len(nll), "n": len(records),
            "n_generated": n_gen,
            "examples": [{"prompt": p[-1]["content"], "reference": r, "prediction": g}
                         for p, r, g in zip(prompts[:5], refs[:5], preds[:5])]}


def evaluate_knowledge(model, tokenizer, records: list[dict], max_new_tokens: int = 16, batch_size: int = 8,
                       generation_batch_size: Optional[int] = None) -> dict:
    prompts = [[{"role": "user", "content": KNOWLEDGE_INSTRUCTION.format(question=r["question"])}] for r in records]
    golds = [r["answer"] if isinstance(r["answer"], list) else [r["answer"]] for r in records]
    preds = generate(model, tokenizer, prompts, max_new_tokens, generation_batch_size or batch_size,
                     desc="knowledge: generating answers")
    em = [knowledge_match(p, g) for p, g in zip(preds, golds)]
    nll = answer_nll(model, tokenizer, prompts, [g[0] for g in golds], batch_size,
                     desc="knowledge: scoring gold answers (NLL)")
    return {"exact_match": sum(em) / len(em), "gold_nll": sum(nll) / len(nll), "n": len(records),
            "examples": [{"question": r["question"], "gold": g, "prediction": p}
                         for r, g, p in zip(records[:5], golds[:5], preds[:5])]}


def evaluate(model, tokenizer, task_records=None, knowledge_records=None, *, task_max_new_tokens: int = 256,
             batch_size: int = 8, generation_batch_size: Optional[int] = None,
             task_generation_examples: Optional[int] = None) -> dict:
    """`batch_size` for the NLL forwards; `generation_batch_size` (default: the same) for the greedy answers, whose
    decoding steps on a CPU cost about as much for 32 sequences as for 8 (each step reads every weight once);
    `task_generation_examples`: task exact match on that many of the task records (default: all), NLL on all."""
    out = {}
    if task_records:
        out["task"] = evaluate_task(model, tokenizer, task_records, task_max_new_tokens, batch_size,
                                    generation_batch_size, task_generation_examples)
    if knowledge_records:
        out["knowledge"] = evaluate_knowledge(model, tokenizer, knowledge_records, batch_size=batch_size,
                                              generation_batch_size=generation_batch_size)
    return out


METRICS = [("task", "exact_match", "task exact match (final number) ↑"), ("task", "answer_nll", "task answer NLL ↓"),
           ("knowledge", "exact_match", "knowledge exact match ↑"), ("knowledge", "gold_nll", "knowledge gold NLL ↓")]


def markdown(before: dict, after: Optional[dict]) -> str:
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for part, key, label in METRICS:
        if part not in before:
            continue
        b = before[part][key]
        if after is None:
            lines.append(f"| {label} | {b:.4f} | | |")
        else:
            a = after[part][key]
            lines.append(f"| {label} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    return "\n".join(lines)


@dataclass
class EvalModels:
    """What an evaluation compares, loaded once: `after`, the adapted model (a PeftModel, or the `--merged` model;
    None without either), `before`, a separate base model where one is needed (None when `after` is a PeftModel,
    whose adapter is disabled instead: peft_ext and plain peft adapters then compute the original base weights),
    and the tokenizer."""

    before: Optional[torch.nn.Module]
    after: Optional[torch.nn.Module]
    tokenizer: Any

    @contextmanager
    def base(self):
        """The base model: the separate one, or the adapted model with its adapter disabled."""
        if self.before is not None:
            yield self.before
        else:
            with self.after.disable_adapter():
                yield self.after


def adapter_to_load(adapter: str) -> tuple[str, bool]:
    """(directory to load, is a peft_ext adapter): a PiSSA adapter, or one of peft's CorDA, through its converted
    plain adapter beside it."""
    config_file = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise DataError(f"--adapter '{adapter}' has no adapter_config.json.")
    with open(config_file) as f:
        adapter_config = json.load(f)
    init = str(adapter_config.get("init_lora_weights"))
    if init.startswith("pissa") or init == "corda":
        # peft reloads a PiSSA adapter by running PiSSA on the base again; with a randomized SVD (pissa_niter_*) the
        # sketch differs from training's and the residual does not match, and a CorDA one needs its calibration
        # again. The converted plain LoRA that trl_recipes.sft writes beside it applies to the untouched base exactly.
        plain = os.path.join(os.path.dirname(os.path.abspath(adapter)), "adapter_plain_peft")
        if os.path.isfile(os.path.join(plain, "adapter_config.json")):
            return plain, False
        if init != "pissa":
            raise DataError(
                f"--adapter '{adapter}' is a peft PiSSA/CorDA adapter (init_lora_weights={init}) relative to a "
                f"residual base that peft cannot rebuild (a randomized SVD, or CorDA's calibration). Fix: "
                f"evaluate its converted plain adapter (adapter_plain_peft, written by trl_recipes.sft)."
            )
    return adapter, "peft_ext_method" in adapter_config


def load_for_eval(base_path: str, adapter: Optional[str] = None, merged: Optional[str] = None,
                  dtype=torch.float32) -> EvalModels:
    """The base model and the adapted one (`adapter`: a peft_ext or plain peft adapter directory; or `merged`: a
    merged model's directory), loaded for `evaluate`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peft_ext

    from .models import resolve_model_path

    base_path = resolve_model_path(base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if adapter:
        path, is_peft_ext = adapter_to_load(adapter)  # checked before the model is loaded
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
        after = peft_ext.load_adapter(base, path) if is_peft_ext else PeftModel.from_pretrained(base, path)
        return EvalModels(None, after, tokenizer)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    after = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype) if merged else None
    return EvalModels(base, after, tokenizer)


def build_parser() -> argparse.ArgumentParser:
    from .data import KNOWLEDGE_EVAL_FILE, TEST_FILE

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model path or name (default: the packaged SmolLM2-135M)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--adapter", help="adapter directory (peft_ext or plain peft) to evaluate against the base")
    group.add_argument("--merged", help="merged model directory to evaluate against the base")
    ap.add_argument("--task_data", default=TEST_FILE,
                    help="GSM8K-style task records (question/answer or prompt/completion): a local JSONL file or a "
                         "Hub id (e.g. openai/gsm8k with --task_config main); 'none' skips the task "
                         "(default: the packaged held-out problems)")
    ap.add_argument("--task_split", default="test", help="split of a Hub task dataset")
    ap.add_argument("--task_config", default=None, help="configuration of a Hub task dataset")
    ap.add_argument("--knowledge_data", default=KNOWLEDGE_EVAL_FILE,
                    help="NQ-open-style records (question, answer list): a local JSONL file or a Hub id (e.g. "
                         "google-research-datasets/nq_open); 'none' skips knowledge (default: the packaged "
                         "EfficientQA slice, disjoint from the KPM recipe's calibration)")
    ap.add_argument("--knowledge_split", default="validation", help="split of a Hub knowledge dataset")
    ap.add_argument("--knowledge_config", default=None, help="configuration of a Hub knowledge dataset")
    ap.add_argument("--num_task", type=int, default=None, help="the first N task records (default: all)")
    ap.add_argument("--num_knowledge", type=int, default=None, help="the first N knowledge records (default: all)")
    ap.add_argument("--task_max_new_tokens", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8, help="batch of the NLL forwards")
    ap.add_argument("--generation_batch_size", type=int, default=None,
                    help="batch of the greedy answers (default: --batch_size); larger is faster on a CPU")
    ap.add_argument("--output_dir", required=True)
    return ap


def read_part(name: Optional[str], n: Optional[int] = None, split: str = "train",
              config: Optional[str] = None) -> Optional[list[dict]]:
    """`read_records` for one part of an evaluation; None for a part given as 'none' (or not at all)."""
    return None if not name or name.lower() == "none" else read_records(name, n, split, config)


def load_eval_data(args) -> tuple[Optional[list[dict]], Optional[list[dict]]]:
    """(task records, knowledge records); None for a part given as 'none'."""
    task = read_part(args.task_data, args.num_task, args.task_split, args.task_config)
    knowledge = read_part(args.knowledge_data, args.num_knowledge, args.knowledge_split, args.knowledge_config)
    if task is None and knowledge is None:
        raise DataError("--task_data and --knowledge_data are both 'none': nothing to evaluate.")
    return task, knowledge


def write_outputs(output_dir: str, result: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result["before"], result["after"])
    with open(os.path.join(output_dir, "eval.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"written: {os.path.join(output_dir, 'eval.json')}, {os.path.join(output_dir, 'eval.md')}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        task, knowledge = load_eval_data(args)
        models = load_for_eval(args.model, args.adapter, args.merged)
    except (DataError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overlap = calibration_overlap_report(args.adapter, task, knowledge)
    kwargs = dict(task_max_new_tokens=args.task_max_new_tokens, batch_size=args.batch_size,
                  generation_batch_size=args.generation_batch_size)
    with models.base() as base:
        before = evaluate(base, models.tokenizer, task, knowledge, **kwargs)
    after = evaluate(models.after, models.tokenizer, task, knowledge, **kwargs) if models.after is not None else None
    write_outputs(args.output_dir, {"model": args.model, "adapter": args.adapter, "merged": args.merged,
                                    "task_data": args.task_data if task else None,
                                    "knowledge_data": args.knowledge_data if knowledge else None,
                                    "calibration_overlap": overlap, "before": before, "after": after})
    return 0


if __name__ == "__main__":
    sys.exit(main())
