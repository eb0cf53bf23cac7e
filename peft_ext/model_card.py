"""The section a saved peft_ext adapter's model card (README.md) gets: how to load it, and how to export it for plain
peft, which cannot load it."""

from __future__ import annotations

import os

_BEGIN, _END = "<!-- peft_ext: begin -->", "<!-- peft_ext: end -->"
_NAMES = {"dude": "DuDe", "corda": "CorDA"}


def section(method: str) -> str:
    name = _NAMES.get(method, method)
    return f"""{_BEGIN}
## Loading this adapter (peft_ext {name})

The base layers under this adapter hold the residual of the original weights (W − s·B0·A0), rebuilt on load from
the init factors saved here. Plain peft (`PeftModel.from_pretrained`, `AutoPeftModelForCausalLM`) cannot load it
and refuses it. Load it with peft_ext, onto the base model it was trained from:

```python
import peft_ext
model = peft_ext.load_adapter(base_model, "path/to/this/adapter")
```

For plain peft (no peft_ext installed), export a LoRA{"/DoRA" if method == "dude" else ""} adapter of rank 2r that
applies to the untouched base model:

```python
peft_ext.export_peft_adapter("path/to/this/adapter", "path/to/plain_adapter")
```
{_END}
"""


def add_to_model_card(directory: str, method: str) -> None:
    """Add (or refresh) the peft_ext section of `directory`/README.md; peft writes the rest of the card."""
    path = os.path.join(directory, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if _BEGIN in text and _END in text:
        head, _, rest = text.partition(_BEGIN)
        text = head + rest.partition(_END)[2].lstrip("\n")
    text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section(method)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
