r"""Federated LoRA fine-tuning of a decoder on GSM8K math, scored by exact match.

    python launch.py --config=configs/gsm8k.py:smoke --workdir=/tmp/floranna_gsm8k_smoke

runs 2 rounds (3 of 4 clients each) of FLoRA-NA on a tiny random LLaMA with the built-in
byte tokenizer and synthetic GSM8K-format rows ("What is 3 + 4?" -> "3 + 4 = 7\n#### 7"): no
files, no network, well under a minute on a 2-core CPU. It prints the summary table
(global and local exact_match_flexible, which a random model leaves at 0, and answer_loss,
the teacher-forced loss on the held-out answers, which falls; metrics.jsonl also holds
exact_match_strict) and writes each evaluation's first generations to
generations/round_<k>.jsonl.

    python launch.py --config=configs/gsm8k.py --workdir=./runs/gsm8k_floranna

is the paper's setting: LLaMA-2-7B (meta-llama/Llama-2-7b-hf) and GSM8K from the hub, r=16
on q_proj and v_proj, 10 clients (iid split) with the reference client settings of
METHOD.md (10 local steps of batch 128, AdamW 2e-2), greedy decoding of 256 tokens on the
1,319 test problems. Offline, with SmolLM2-135M-Instruct (shared/tools/fetch_models.sh),
convert the GGUF once, then point the run at local files:

    python -m floranna_jax.convert_gguf ~/.cache/floranna/models/SmolLM2-135M-Instruct/model.gguf \
        ~/.cache/floranna/models/SmolLM2-135M-Instruct-hf
    python launch.py --config=configs/gsm8k.py --workdir=runs/gsm8k_smollm2 \
        --config.model.path=$HOME/.cache/floranna/models/SmolLM2-135M-Instruct-hf \
        --config.model.compute_dtype=float32 \
        --config.data.source=local --config.data.dir=../shared/data \
        --config.data.max_train_examples=2000 --config.client.batch_size=8 \
        --config.client.micro_batch_size=0 \
        --config.client.learning_rate=2e-4 --config.eval.max_examples=64

The evidence run of issue 9 is a smaller version of that command as a config, about 15
minutes per method on a 2-core CPU, most of it generation:

    python launch.py --config=configs/gsm8k.py:smollm2 --workdir=runs/gsm8k_smollm2_fedit \
        --config.server.name=fedit
    python launch.py --config=configs/gsm8k.py:smollm2 --workdir=runs/gsm8k_smollm2_floranna

4 clients (all sampled), 3 rounds of 5 local steps of batch 4 on the first 400 training
problems, exact match and answer loss before round 1 and after round 3, globally on the
first 64 test problems and locally on 16 held-out problems per client (results:
docs/gsm8k_smollm2.md).

(SmolLM2 has a chat template, so ``data.prompt="auto"`` uses it; LLaMA-2's base tokenizer has
none, so its prompts are plain "Question: ...\nAnswer:\n".) ``data.partition.scheme`` may be
iid or quantity only: the rows have no label for a Dirichlet split.

configs/code.py is this config with the code task (MBPP training, MBPP test and HumanEval
evaluation).
"""

import ml_collections

from floranna_jax import distributed, privacy, sections, server


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The reference config, or with ``arg="smoke"`` a seconds-long CPU version."""
    c = ml_collections.ConfigDict()

    c.model = dict(
        source="pretrained",  # "pretrained" (model.path) or "random" (models.tiny_config)
        path="meta-llama/Llama-2-7b-hf",  # hub id or local HF folder (converted GGUF too)
        quantize="",  # frozen projections weight-only: "" (as loaded), "int8" or "nf4" (QLoRA)
        model_type="llama",  # architecture of the random model when source="random"
        compute_dtype="bfloat16",  # activations dtype: float32 or bfloat16
        # Frozen base dtype: float32, bfloat16, or "auto" (bfloat16 on GPU/TPU, float32 on
        # CPU). Adapters and optimizer states stay float32.
        base_dtype="auto",
        # Recompute each layer in the backward pass instead of keeping its activations.
        # Measured (python -m benchmarks.remat, 8-layer decoder, batch 8 x 256, CPU): 0.18x
        # the step's temporary memory for 1.23x its time; a 7B step needs it to fit a GPU.
        remat=True,
    )
    c.lora = sections.lora(targets=("q_proj", "v_proj"))  # r=16, alpha 16 (sections.py)
    c.data = dict(
        task="gsm8k",  # "gsm8k" or "code" (tasks.generation)
        source="hub",  # "hub", "local" (data.dir) or "synthetic" (tiny rows, no files)
        dir="",  # local data folder (shared/data layout: gsm8k/, mbpp/, humaneval/)
        tokenizer="model",  # "model" (the model folder's) or "bytes" (built in, smoke runs)
        prompt="auto",  # "chat" (the tokenizer's template), "plain", or "auto": chat if any
        # Tokens per prompt + answer + eos at most; longer rows keep their first max_length
        # tokens (the answer is cut at its end). Rows are padded to the longest, in 16s.
        max_length=512,
        max_train_examples=0,  # local/hub: the first this many training problems (0 = all)
        packing=True,  # examples share rows of tokens (no compute on padding)
        # Packed rows of a length chosen for each micro-batch's examples, several examples a
        # row (packing.dense_row_length); False: rows of the longest example.
        dense_rows=True,
        num_train_examples=256,  # synthetic only: training problems
        num_eval_examples=64,  # synthetic only: test problems (per test set)
    )
    # The rows have no label: "iid" or "quantity" only (a quantity skew of alpha).
    c.partition = sections.partition(scheme="iid")
    # METHOD.md's reference: 10 AdamW steps of batch 128 at 2e-2. Micro-batches of 16 (8 per
    # step, the same gradient): with remat, a bf16 base and one client at a time, the 7B
    # client step plans 48.0 GB on one h100-80gb (README "GPUs and pods"); the whole 128
    # at once needs far more.
    c.client = sections.client(micro_batch_size=16)
    c.server = server.section()  # the estimator and its solver (server/registry.py)
    c.train = sections.train(clients_per_chunk=1)  # 100 rounds of 10; a 7B client is big
    c.dist = distributed.section()  # processes of the run: one, or a pod / cluster (BUILD.md)
    c.privacy = privacy.section()  # clipping and DP-FedAvg noise (floranna_jax/privacy.py); off
    c.ckpt = sections.ckpt()  # every 10 rounds, the last 2 kept
    c.eval = sections.evaluation(
        dict(
            max_examples=0,  # test problems in the global evaluation, the first ones (0 = all)
            max_new_tokens=256,  # greedy tokens generated per prompt (fixed: compiles once)
            # A row also ends at these strings; the scorer sees the text before them. This is
            # lm-evaluation-harness's gsm8k `until`: "Question:" starts an invented next
            # problem (the plain prompt's own cue), "</s>" and "<|im_end|>" are Llama-2's and
            # ChatML's end tokens, for a model that writes them as text or ends a turn
            # before its eos.
            stop=("Question:", "</s>", "<|im_end|>"),
            log_generations=16,  # the first this many global problems' generations, each eval
            code_timeout_s=10.0,  # code task: CPU seconds per sandboxed program (wall: 3x)
            # code task: run generated code even where the kernel refuses namespaces
            # (programs then see the host's files: floranna_jax/sandbox.py)
            code_allow_weak_sandbox=False,
        ),
        batch_size=16,  # prompts per generation call and rows per loss forward
        max_local_examples=32,  # held-out rows per client in the local evaluation
    )

    if arg == "smoke":
        sections.smoke(c)  # random model, synthetic data, 2 rounds of 3 of 4 clients
        c.model.compute_dtype = "float32"
        c.data.tokenizer = "bytes"
        c.data.max_length = 64
        c.data.num_train_examples = 64
        c.data.num_eval_examples = 8
        c.client.batch_size = 8
        c.client.micro_batch_size = 0
        c.eval.batch_size = 8
        c.eval.max_local_examples = 4
        c.eval.max_new_tokens = 16
    elif arg == "smollm2":
        c.model.path = "~/.cache/floranna/models/SmolLM2-135M-Instruct-hf"
        c.model.compute_dtype = "float32"
        c.data.source, c.data.dir = "local", "../shared/data"  # relative to the repository root
        c.data.max_length = 384
        c.data.max_train_examples = 400
        c.partition.num_clients = 4
        c.client.local_steps, c.client.batch_size = 5, 4
        c.client.micro_batch_size = 0
        c.client.learning_rate = 1e-3
        c.train.num_rounds, c.train.clients_per_round = 3, 4
        c.ckpt.every_rounds = 1
        c.eval.at_start = True  # the pretrained model's scores, before any round
        c.eval.every_rounds = 3
        c.eval.max_examples = 64  # the first 64 test problems
        c.eval.max_local_examples = 16
    elif arg not in (None, ""):
        raise ValueError(f"configs/gsm8k.py: unknown arg {arg!r}; valid: '', 'smoke' or 'smollm2'")
    return c
