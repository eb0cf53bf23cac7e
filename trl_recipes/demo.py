"""A short DuDe fine-tune of SmolLM2-135M-Instruct on this CPU, end to end (~2 minutes).

    python -m trl_recipes.demo [--steps 20] [--output_dir outputs/demo]

1. loads the packaged SmolLM2-135M-Instruct (converted once to safetensors, see trl_recipes.models);
2. wraps it with `get_peft_model(model, DuDeConfig(r=16, ...))` and checks the logits did not move;
3. trains a few AdamW steps on a handful of built-in chat examples about this project;
4. saves the adapter, reloads it with `peft_ext.load_adapter` and exports it with `peft_ext.export_peft_adapter`,
   checking that both reproduce the trained model; prints a before/after answer.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_ext import DuDeConfig, export_peft_adapter, load_adapter
from trl_recipes.models import default_model_path


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXAMPLES = [
    ("What is DuDe?", "DuDe splits each weight into a magnitude and a direction, and starts the direction from the "
     "top singular vectors of the weight."),
    ("What does DuDe train?", "DuDe trains a magnitude per output row and two low-rank factors of the direction."),
    ("Where do DuDe's factors come from?", "From the top-r singular value decomposition of each weight matrix."),
    ("What stays frozen in DuDe?", "The residual weight: the original weight minus its top-r singular part."),
    ("How do I load a DuDe adapter?", "Call peft_ext.load_adapter on the original base model."),
    ("Can plain peft load a DuDe adapter?", "Yes, after peft_ext.export_peft_adapter turns it into a DoRA adapter "
     "of rank 2r."),
]
HELD_OUT = "Explain what DuDe does."  # not among the training questions


def _encode(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer, question: str, answer: str | None = None):
    messages = [{"role": "user", "content": question}]
    if answer is None:
        return torch.tensor([_encode(tokenizer, messages, add_generation_prompt=True)])
    prompt = _encode(tokenizer, messages, add_generation_prompt=True)
    full = _encode(tokenizer, messages + [{"role": "assistant", "content": answer}])
    labels = [-100] * len(prompt) + full[len(prompt):]  # loss on the answer only
    return full, labels


def batch_of(tokenizer, examples):
    rows = [chat_ids(tokenizer, q, a) for q, a in examples]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 40) -> str:
    ids = chat_ids(tokenizer, question)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--output_dir", default=os.path.join("outputs", "demo"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    probe = batch_of(tokenizer, EXAMPLES[:2])
    with torch.no_grad():
        base_logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    before = answer(model, tokenizer, HELD_OUT)

    t0 = time.perf_counter()
    model = get_peft_model(model, DuDeConfig(r=16, lora_alpha=16, target_modules=TARGETS, svd_niter=4))
    model.print_trainable_parameters()
    with torch.no_grad():
        init_logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    init_err = ((init_logits - base_logits).abs().max() / base_logits.abs().max()).item()
    print(f"DuDe init: {time.perf_counter() - t0:.1f} s, logits relative change {init_err:.1e}")

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    batch = batch_of(tokenizer, EXAMPLES)
    losses = []
    for _ in (bar := tqdm(range(args.steps), desc="DuDe fine-tune", unit="step")):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    after = answer(model, tokenizer, HELD_OUT)

    adapter_dir = os.path.join(args.output_dir, "adapter")
    export_dir = os.path.join(args.output_dir, "adapter_plain_peft")
    model.save_pretrained(adapter_dir)
    export_peft_adapter(model, export_dir)

    def err(m):
        with torch.no_grad():
            out = m(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        return ((out - trained_logits).abs().max() / trained_logits.abs().max()).item()

    fresh = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    reload_err = err(load_adapter(fresh(), adapter_dir))
    export_err = err(PeftModel.from_pretrained(fresh(), export_dir))

    print(f"\nloss: {losses[0]:.3f} -> {losses[-1]:.3f} over {args.steps} steps")
    print(f"Q: {HELD_OUT}\n  before: {before}\n  after:  {after}")
    print(f"adapter (peft_ext.load_adapter):        {adapter_dir}   reload error {reload_err:.1e}")
    print(f"plain peft DoRA export (PeftModel):     {export_dir}   load error {export_err:.1e}")


if __name__ == "__main__":
    main()
