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

from floranna_jax import distributed, privacy, server


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
    c.lora = dict(
        rank=16,  # r, adapter rank
        alpha=16.0,  # LoRA alpha; scale s = alpha / r (alpha / sqrt(r) with rslora)
        rslora=False,  # rank-stabilized scale
        targets=("query", "value"),  # names of the adapted linear layers
        dropout=0.05,  # dropout probability inside the adapter, training only
        init_from="",  # a PEFT LoRA folder to start from ("": fresh); r, alpha, targets match
    )
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
    c.partition = dict(
        scheme="dirichlet",  # client split: "dirichlet", "iid", "quantity" or "k_classes"
        num_clients=10,  # total clients
        alpha=0.5,  # Dirichlet concentration (smaller = more non-IID); quantity skew too
        classes_per_client=2,  # k_classes only: labels held by each client
        holdout_fraction=0.1,  # share of each client's data kept for local evaluation
    )
    c.client = dict(
        optimizer="adamw",  # local optimizer name (clients.make_optimizer)
        learning_rate=2e-2,  # local learning rate
        weight_decay=0.0,  # decoupled weight decay
        # Optimizer steps per client per round (S). A client holding fewer than S * b
        # examples goes on with a fresh shuffle of its data (epochs): no masked steps.
        local_steps=10,
        batch_size=128,  # examples per local step (b)
        micro_batch_size=0,  # examples per micro-batch, a divisor of b (0: the whole batch)
        persistent_opt_state=False,  # keep each client's optimizer state across rounds
    )
    c.server = server.section()  # the estimator and its solver (server/registry.py)
    c.train = dict(
        seed=0,  # root of all randomness (sampling, data order, init, dropout)
        num_rounds=100,  # federated rounds
        clients_per_round=10,  # clients sampled per round (U)
        client_mode="vmap",  # how clients run: "vmap" (stacked) or "loop"
        shard_clients=False,  # shard the client axis over devices when more than one
        model_shards=1,  # >1: the frozen base split over that many devices, FSDP (fsdp.py)
        # vmap: clients trained at once (0 = all). Activations grow with it: 10 clients of
        # batch 128 would not fit a 24 GB machine; 2 is also the fastest on a 2-core CPU.
        clients_per_chunk=2,
        # A "clients" bar counts the local steps (a host callback in the clients' program).
        # False: no bar, and JAX's persistent compilation cache can keep that program.
        step_progress=True,
    )
    c.dist = distributed.section()  # processes of the run: one, or a pod / cluster (BUILD.md)
    c.privacy = privacy.section()  # clipping and DP-FedAvg noise (floranna_jax/privacy.py); off
    c.ckpt = dict(
        every_rounds=10,  # save the round state every this many rounds (0 = never)
        keep=2,  # checkpoints kept
    )
    c.eval = dict(
        every_rounds=5,  # evaluate every this many rounds (and after the last)
        batch_size=256,  # examples per evaluation batch
        local=True,  # also evaluate each sampled client on its held-out split
        at_start=False,  # also evaluate before round 1 (row "round": 0; local: every client)
        max_local_examples=0,  # held-out rows per client in the local evaluation (0 = all)
        # Evaluate the global model on the validation split, which the server holds; False:
        # a server without data (a federation), whose summary says it has no global split.
        global_split=True,
    )

    if arg == "smoke":
        c.model.source = "random"
        c.model.path = ""
        c.lora.rank = 4
        c.lora.alpha = 8.0
        c.data.source = "synthetic"
        c.data.max_length = 16
        c.data.num_train_examples = 256
        c.data.num_eval_examples = 64
        c.partition.num_clients = 4
        c.client.local_steps = 3
        c.client.batch_size = 16
        c.client.learning_rate = 5e-2  # learns the synthetic task in 2 rounds
        c.server.steps = 20
        c.train.num_rounds = 2
        c.train.clients_per_round = 3
        c.train.clients_per_chunk = 0  # 3 tiny clients: all at once
        c.ckpt.every_rounds = 1
        c.eval.every_rounds = 1
        c.eval.batch_size = 32
    elif arg not in (None, ""):
        raise ValueError(f"configs/glue.py: unknown arg {arg!r}; valid: '' or 'smoke'")
    return c
