r"""Federated LoRA fine-tuning on a GLUE task: FLoRA-NA and its baselines.

    python launch.py --config=configs/glue.py:smoke --workdir=/tmp/floranna_smoke

runs 2 rounds (3 of 4 clients each) of FLoRA-NA on a tiny random encoder and synthetic
tokens: no files, no network, under a minute on a laptop CPU. It shows a progress bar
(loss, rho_rel, accuracy), then prints the summary table, e.g.

    | global accuracy                    | 1 |
    | local accuracy (mean over clients) | 0.9074 |
    | rho_rel (last / mean)              | 0.07 / 0.05 |
    | bytes up (total)                   | 49.2 KB |   ... and seconds per phase

and writes metrics.jsonl, TensorBoard events (tensorboard/), summary.md, metric.png,
rho_rel.png, partition.png and checkpoints/ to the workdir. Run it again and it resumes
(here: finds round 2 done and prints the table).

    python launch.py --config=configs/glue.py --workdir=./runs/sst2_floranna

is the reference setting of METHOD.md: RoBERTa-base from the hub on SST-2, 10 clients with
a Dirichlet(0.5) label split, rank 16 on query and value, 10 local steps of batch 128.
Offline, point it at local files (any BERT/RoBERTa folder in the Hugging Face layout):

    --config.model.path=~/.cache/floranna/models/all-MiniLM-L6-v2   # shared/tools/fetch_models.sh
    --config.data.dir=../shared/data/glue                           # SST-2/train.tsv, ...

Every field can be overridden, e.g. ``--config.server.name=fedit`` or
``--config.partition.alpha=0.1``; misspelled fields are errors (the config is locked), and
bad values stop the run with one line naming the field. Server hyperparameters
(``server.*`` beyond ``name`` and ``compare``) go only to the method that accepts them; an
override of one the chosen method does not take is an error.
"""

import ml_collections

from floranna_jax import distributed, privacy, sections, server


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The reference config, or with ``arg="smoke"`` a seconds-long CPU version."""
    c = ml_collections.ConfigDict()

    c.model = dict(
        source="pretrained",  # "pretrained" (model.path) or "random" (models.tiny_config)
        path="FacebookAI/roberta-base",  # hub id or local HF folder
        model_type="bert",  # architecture of the random model when source="random"
        compute_dtype="float32",  # activations dtype: float32 or bfloat16
        # Frozen base dtype: float32, bfloat16, or "auto" (bfloat16 on GPU/TPU, float32 on
        # CPU). Adapters, head and optimizer states stay float32.
        base_dtype="auto",
    )
    c.lora = sections.lora(targets=("query", "value"))  # r=16, alpha 16 (sections.py)
    c.data = dict(
        source="glue",  # "glue" (tokenized GLUE task) or "synthetic" (random tokens)
        task="sst2",  # GLUE task name (data.glue.TASKS)
        dir="",  # local GLUE folder (SST-2/train.tsv, ...); "" = hub datasets
        max_length=128,  # tokens per example at most (longer ones are truncated)
        # Examples share rows of tokens, so no compute is spent on padding (client.batch_size
        # stays examples per step); False pads every example to max_length.
        packing=True,
        # Packed rows of a length chosen for the batch (packing.dense_row_length) instead of
        # the longest example's; False keeps rows of the longest example.
        dense_rows=False,
        num_train_examples=512,  # synthetic only: training examples
        num_eval_examples=128,  # synthetic only: validation examples
        vocab_size=1000,  # synthetic only: token ids in [0, vocab_size)
    )
    c.partition = sections.partition()  # 10 clients, Dirichlet(0.5) over the labels
    c.client = sections.client()  # 10 AdamW steps of batch 128 at 2e-2 (METHOD.md)
    c.server = server.section()  # the estimator and its solver (server/registry.py)
    c.train = sections.train()  # 100 rounds of 10 clients, vmapped 2 at a time
    c.dist = distributed.section()  # processes of the run: one, or a pod / cluster (BUILD.md)
    c.privacy = privacy.section()  # clipping and DP-FedAvg noise (floranna_jax/privacy.py); off
    c.ckpt = sections.ckpt()  # every 10 rounds, the last 2 kept
    c.eval = sections.evaluation()  # every 5 rounds, global and local, batches of 256

    if arg == "smoke":
        sections.smoke(c)  # random model, synthetic data, 2 rounds of 3 of 4 clients
        c.data.max_length = 16
        c.data.num_train_examples = 256
        c.data.num_eval_examples = 64
        c.client.batch_size = 16
        c.client.learning_rate = 5e-2  # learns the synthetic task in 2 rounds
        c.eval.batch_size = 32
    elif arg not in (None, ""):
        raise ValueError(f"configs/glue.py: unknown arg {arg!r}; valid: '' or 'smoke'")
    return c
