"""The PyTorch peer of one federated round: transformers + PEFT, clients one after another.

What a user of the usual tools would write: ``BertForSequenceClassification`` with a PEFT
LoRA adapter, each client starting from the global adapter and head, ``steps`` AdamW
steps on its batches, each batch padded to its own longest example (dynamic padding, as
``DataCollatorWithPadding`` does), then FedIT's average of the uploads. It trains on the
very examples, token ids and settings of the project's round it is compared with.

Needs ``torch`` and ``peft`` (not dependencies of the project); :func:`available` says
whether they import. :class:`Process` runs the peer in a child process of its own, so that
torch's threads never share a process with JAX's, and times each round there.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import time

import numpy as np


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft", "transformers"))


class Peer:
    """A LoRA-wrapped BERT classifier on ``threads`` CPU threads."""

    def __init__(self, model_path: str, *, rank: int, alpha: float, dropout: float,
                 targets: tuple[str, ...], learning_rate: float, threads: int) -> None:  # fmt: skip
        import peft
        import torch
        import transformers

        torch.manual_seed(0)
        torch.set_num_threads(threads)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=2
        )
        config = peft.LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
            task_type=peft.TaskType.SEQ_CLS,
        )  # fmt: skip
        self.torch, self.model = torch, peft.get_peft_model(base, config)
        self.learning_rate = learning_rate
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.start = {n: p.detach().clone() for n, p in self.trainable.items()}

    def client(self, batches: list[dict[str, np.ndarray]]) -> dict:
        """Train one client from the global state on ``batches`` (each padded to its longest
        row); returns its trainable tensors."""
        torch = self.torch
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.start[n])
        opt = torch.optim.AdamW(self.trainable.values(), lr=self.learning_rate, weight_decay=0.0)
        self.model.train()
        for batch in batches:
            out = self.model(**{k: torch.from_numpy(v) for k, v in batch.items()})
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return {n: p.detach().clone() for n, p in self.trainable.items()}

    def round(self, clients: list[list[dict[str, np.ndarray]]], weights: np.ndarray) -> float:
        """One FedIT round over ``clients``; returns its wall seconds."""
        t0 = time.perf_counter()
        uploads = [self.client(b) for b in clients]
        with self.torch.no_grad():
            for n in self.start:
                self.start[n] = sum(float(w) * u[n] for w, u in zip(weights, uploads, strict=True))
        return time.perf_counter() - t0


def dynamic_batches(arrays: dict[str, np.ndarray], lengths: np.ndarray, take: np.ndarray,
                    real: np.ndarray) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """One client's batches ``take [S, b]`` (real rows only), each cut to its longest row."""
    out = []
    for rows, ok in zip(take, real, strict=True):
        rows = rows[ok]
        if not len(rows):
            continue
        n = int(lengths[rows].max())
        batch = {k: arrays[k][rows, :n].astype(np.int64)
                 for k in ("input_ids", "attention_mask", "token_type_ids")}  # fmt: skip
        batch["labels"] = arrays["label"][rows].astype(np.int64)
        out.append(batch)
    return out


class Process:
    """A :class:`Peer` in a spawned child process (``with Process(**peer_args) as p:``).

    :meth:`round` sends one round's work and returns the child's wall and CPU seconds
    (process CPU time of all its threads) for it; the parent waits idle meanwhile.
    """

    def __init__(self, **peer_args) -> None:
        self.peer_args = peer_args

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.peer_args), daemon=True)
        self.proc.start()
        child.close()
        self.conn.recv()  # the model is loaded
        return self

    def round(self, clients, weights) -> tuple[float, float]:
        self.conn.send((clients, weights))
        return self.conn.recv()

    def __exit__(self, *exc):
        self.conn.send(None)
        self.proc.join()


def _serve(conn, peer_args: dict) -> None:
    peer = Peer(**peer_args)
    conn.send("ready")
    while (work := conn.recv()) is not None:
        cpu = time.process_time()
        wall = peer.round(*work)
        conn.send((wall, time.process_time() - cpu))
