"""The documentation a reader meets: the README's shape, links that lead somewhere, and code that runs."""

from __future__ import annotations

import functools
import glob
import os
import re

import pytest

from .helpers import ROOT

DOCS = ["README.md", "benchmarks/README.md", *sorted(os.path.relpath(p, ROOT)
                                                    for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: str) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in open(path, encoding="utf-8"):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def _code_blocks(path: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", open(os.path.join(ROOT, path), encoding="utf-8").read(), re.S)


def test_docs_are_where_the_readme_says():
    assert len(DOCS) >= 8 and all(os.path.isfile(os.path.join(ROOT, d)) for d in DOCS)


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_points_to_a_file_that_exists(doc):
    path = os.path.join(ROOT, doc)
    broken = []
    for match in LINK.finditer(open(path, encoding="utf-8").read()):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(target)
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc}: {broken}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n[ok](x.md#title) [gone](missing.md) [bad anchor](x.md#nope) [web](https://a.b/c)\n")
    targets = [m.group(1) for m in LINK.finditer(doc.read_text())]
    missing = [t for t in targets if not t.startswith("https:") and not (tmp_path / t.partition("#")[0]).exists()]
    assert missing == ["missing.md"] and "nope" not in _anchors(str(doc)) and "title" in _anchors(str(doc))


def test_the_readme_is_a_front_door():
    """Two commands first (CI runs the second), then what it is, the quickstart, TRL, scale, where to read more; at
    most 250 lines."""
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().splitlines()
    assert len(lines) <= 250
    assert lines[3].startswith("# 1. set up and run the main job") and lines[4].endswith("python -m trl_recipes.sft")
    assert lines[5].startswith("# 2. set up and run the tests")
    assert lines[6].endswith('python -m pytest -q -n 2 -m "not slow"')
    sections = [line for line in lines if line.startswith("## ")]
    assert sections == ["## What it is", "## Quickstart", "## Fine-tuning with TRL",
                        "## DeepSpeed, several nodes, quantized bases, serving", "## Read more"]


def test_the_python_in_the_readme_and_the_recipes_doc_runs(tiny_model_dir, tmp_path, monkeypatch):
    """Each Python block, with the names the prose gives it (a model path, a model, a dataset, knowledge records),
    runs on a tiny model. On this CPU, TRL's config is told not to ask for bf16 (its default wants a GPU)."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_ext import read_jsonl
    from trl_recipes.data import KPM_CALIBRATION_FILE, TRAIN_FILE

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trl, "SFTConfig", functools.partial(trl.SFTConfig, bf16=False, report_to="none"))
    blocks = [*_code_blocks("README.md", "python"), *_code_blocks("docs/recipes.md", "python")]
    assert len(blocks) >= 4
    for block in blocks:
        names = {"path": tiny_model_dir, "model": AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                 "tokenizer": AutoTokenizer.from_pretrained(tiny_model_dir),
                 "dataset": datasets.Dataset.from_list(read_jsonl(TRAIN_FILE)[:8]),
                 "knowledge_records": read_jsonl(KPM_CALIBRATION_FILE)[:16]}
        exec(compile(block, "<doc block>", "exec"), names)  # noqa: S102 - our own documentation
    assert os.path.isfile(tmp_path / "dude_plain" / "adapter_config.json")
    assert os.path.isfile(tmp_path / "kpm_adapter" / "adapter_config.json")
