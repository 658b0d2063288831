r"""Federated LoRA fine-tuning of a decoder on code: train on MBPP, score pass@1 on MBPP's
test split and on HumanEval (programs run in floranna_jax.sandbox, never in the run).

    python launch.py --config=configs/code.py:smoke --workdir=/tmp/floranna_code_smoke

runs 2 rounds (3 of 4 clients each) of FLoRA-NA on a tiny random LLaMA with the byte
tokenizer and synthetic MBPP- and HumanEval-format problems ("Write a function add_3(x) that
returns x plus 3." with its asserts): no files, no network, under a minute on a 2-core CPU.
The summary shows global and local pass@1 (0 for a random model); metrics.jsonl also holds
humaneval_pass@1, answer_loss and humaneval_answer_loss (teacher-forced loss on the
reference solutions).

    python launch.py --config=configs/code.py --workdir=./runs/code_floranna

is the paper's setting: LLaMA-2-7B and MBPP (task ids 601-974 for training; 11-510 and the
164 HumanEval problems for evaluation) from the hub, every other field as configs/gsm8k.py
(r=16 on q_proj and v_proj, 10 iid clients, 10 local steps of batch 128). Offline, with
SmolLM2-135M-Instruct converted as configs/gsm8k.py shows:

    python launch.py --config=configs/code.py --workdir=runs/code_smollm2 \
        --config.model.path=$HOME/.cache/floranna/models/SmolLM2-135M-Instruct-hf \
        --config.model.compute_dtype=float32 \
        --config.data.source=local --config.data.dir=../shared/data \
        --config.client.batch_size=8 --config.client.micro_batch_size=0 \
        --config.client.learning_rate=2e-4 \
        --config.eval.max_examples=64
"""

import pathlib

import ml_collections

from floranna_jax import config_check


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/gsm8k.py's config (``arg``: "" or "smoke") with the code task."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/code.py: unknown arg {arg!r}; valid: '' or 'smoke'")
    c = config_check.load_file(pathlib.Path(__file__).resolve().with_name("gsm8k.py"), arg)
    c.data.task = "code"
    c.eval.max_new_tokens = 384  # a whole function in a fenced block
    c.eval.stop = ()  # none: the fenced block is cut by code.extract_code (PROGRAM_STOPS)
    if arg == "smoke":
        c.data.max_length = 192  # the problem statement shows its asserts
        c.eval.max_new_tokens = 32
        c.data.num_eval_examples = 4  # per test set: MBPP-style and HumanEval-style
    return c
