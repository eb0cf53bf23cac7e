"""The packaged data (PROVENANCE.md beside this file: source, licence, selection rule and sha256 of every file)."""

from __future__ import annotations

import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
TRAIN_FILE = os.path.join(DATA_DIR, "train.jsonl")  # arithmetic word problems: every SmolLM2 recipe trains on them
TEST_FILE = os.path.join(DATA_DIR, "test.jsonl")  # held-out problems of the same kind: the task evaluation
KPM_CALIBRATION_FILE = os.path.join(DATA_DIR, "nq_open_kpm_calibration.jsonl")  # NQ-open QA: the knowledge to keep
KNOWLEDGE_EVAL_FILE = os.path.join(DATA_DIR, "efficientqa_knowledge_eval.jsonl")  # disjoint from every calibration
# final test slices: no rate or option of a recipe was chosen on them. The recipes' rates were chosen on TEST_FILE and
# KNOWLEDGE_EVAL_FILE, which benchmarks now use as their validation split; they report on these.
FINAL_TEST_FILE = os.path.join(DATA_DIR, "test_final.jsonl")
KNOWLEDGE_FINAL_FILE = os.path.join(DATA_DIR, "efficientqa_knowledge_final.jsonl")
# the second stage after SFT (make_preference_data.py): problems after the 720 above, disjoint from all of them
PREFERENCE_TRAIN_FILE = os.path.join(DATA_DIR, "preferences_train.jsonl")  # DPO pairs: worked answer vs. a slip
PREFERENCE_EVAL_FILE = os.path.join(DATA_DIR, "preferences_eval.jsonl")  # held-out pairs
GRPO_TRAIN_FILE = os.path.join(DATA_DIR, "grpo_train.jsonl")  # prompts with their reference answer
GRPO_EVAL_FILE = os.path.join(DATA_DIR, "grpo_eval.jsonl")  # held-out prompts

# each file's role, read by the tests' checks of provenance and overlap
CALIBRATION_FILES = (KPM_CALIBRATION_FILE, TRAIN_FILE)  # KPM's, and IPM's (the training conversations)
KNOWLEDGE_EVAL_FILES = (KNOWLEDGE_EVAL_FILE, KNOWLEDGE_FINAL_FILE)
TASK_EVAL_FILES = (TEST_FILE, FINAL_TEST_FILE)
SECOND_STAGE_FILES = (PREFERENCE_TRAIN_FILE, PREFERENCE_EVAL_FILE, GRPO_TRAIN_FILE, GRPO_EVAL_FILE)
