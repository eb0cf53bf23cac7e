"""Run as a script in a fresh interpreter: load an exported adapter with plain peft (peft_ext cannot be imported) on
an untouched tiny base model, and save the logits.

usage: python tests/plain_peft_load.py ARCH SEED DTYPE ADAPTER_DIR INPUT_PT OUTPUT_PT [merge]
"""

import importlib.abc
import os
import sys


class _NoPeftExt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "peft_ext" or name.startswith("peft_ext."):
            raise ImportError("peft_ext must not be imported when loading an exported adapter")
        return None


sys.meta_path.insert(0, _NoPeftExt())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

from tests.helpers import logits, make_tiny  # noqa: E402


def main(arch, seed, dtype, adapter_dir, input_pt, output_pt, *flags):
    model = make_tiny(arch, seed=int(seed), dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, adapter_dir)
    if "merge" in flags:
        model = model.merge_and_unload()
    torch.save(logits(model, torch.load(input_pt)), output_pt)
    assert not any(m == "peft_ext" or m.startswith("peft_ext.") for m in sys.modules)


if __name__ == "__main__":
    main(*sys.argv[1:])
