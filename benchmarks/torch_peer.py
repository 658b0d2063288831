"""The PyTorch peers: transformers + PEFT, what a user of the usual tools would write.

:class:`Peer`, one federated round: ``BertForSequenceClassification`` with a PEFT LoRA
adapter, each client starting from the global adapter and head, ``steps`` AdamW steps on
its batches, each batch padded to its own longest example (dynamic padding, as
``DataCollatorWithPadding`` does), then FedIT's average of the uploads. It trains on the
very examples, token ids and settings of the project's round it is compared with.

:class:`DecoderPeer`, one decoder client: ``LlamaForCausalLM`` with a PEFT LoRA adapter
taking AdamW steps on given token ids, and transformers' greedy ``generate`` (key/value
cache) of the bare model.

Needs ``torch`` and ``peft`` (not dependencies of the project); :func:`available` says
whether they import. :class:`Process` runs a peer in a child process of its own, so that
torch's threads never share a process with JAX's, and times each call there.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import time

import numpy as np


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "peft", "transformers"))


def _peft_model(model_class: str, task: str, model_path: str, threads: int, **lora):
    """``(torch, model)``: transformers' ``model_class`` of ``model_path`` in float32 (the
    sequence classifier with 2 labels) wrapped by ``peft.LoraConfig(task_type=task, **lora)``,
    seeded, on ``threads`` CPU threads."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    labels = {"num_labels": 2} if task == "SEQ_CLS" else {}
    base = getattr(transformers, model_class).from_pretrained(
        model_path, dtype=torch.float32, **labels
    )
    config = peft.LoraConfig(task_type=getattr(peft.TaskType, task), **lora)
    return torch, peft.get_peft_model(base, config)


class Peer:
    """A LoRA-wrapped BERT classifier on ``threads`` CPU threads."""

    def __init__(self, model_path: str, *, rank: int, alpha: float, dropout: float,
                 targets: tuple[str, ...], learning_rate: float, threads: int) -> None:  # fmt: skip
        self.torch, self.model = _peft_model(
            "AutoModelForSequenceClassification", "SEQ_CLS", model_path, threads,
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
        )  # fmt: skip
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

    def round(self, clients: list[list[dict[str, np.ndarray]]], weights: np.ndarray) -> None:
        """One FedIT round over ``clients``: the global adapter and head become the average."""
        uploads = [self.client(b) for b in clients]
        with self.torch.no_grad():
            for n in self.start:
                self.start[n] = sum(float(w) * u[n] for w, u in zip(weights, uploads, strict=True))


class DecoderPeer:
    """A float32 ``LlamaForCausalLM`` (transformers' default attention) with a PEFT LoRA
    adapter and one AdamW optimizer kept across calls, on ``threads`` CPU threads."""

    def __init__(self, model_path: str, *, rank: int, alpha: float, dropout: float,
                 targets: tuple[str, ...], learning_rate: float, threads: int) -> None:  # fmt: skip
        self.torch, self.model = _peft_model(
            "LlamaForCausalLM", "CAUSAL_LM", model_path, threads,
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
        )  # fmt: skip
        self.learning_rate = learning_rate
        self.fresh = {n: p.detach().clone() for n, p in self.model.named_parameters()
                      if p.requires_grad}  # fmt: skip
        self.reset()

    def reset(self) -> None:
        """The adapter as initialized and a new AdamW: the next training starts afresh."""
        trainable = []
        with self.torch.no_grad():
            for name, p in self.model.named_parameters():
                if name in self.fresh:
                    p.copy_(self.fresh[name])
                    trainable.append(p)
        self.opt = self.torch.optim.AdamW(trainable, lr=self.learning_rate, weight_decay=0.0)

    def train(self, ids: np.ndarray) -> list[float]:
        """One AdamW step per batch of ``ids [S, b, L]`` (causal-LM loss on every token);
        returns the ``S`` losses."""
        return self.train_batches([{"input_ids": x, "labels": x} for x in ids])

    def train_batches(self, batches: list[dict[str, np.ndarray]]) -> list[float]:
        """One AdamW step per batch of ``input_ids``, ``labels`` (-100: no loss) and
        optionally ``attention_mask``, all ``[b, L]``; returns the losses."""
        self.model.train()
        losses = []
        for batch in batches:
            inputs = {k: self.torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
            loss = self.model(**inputs).loss
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
        return losses

    def generate(self, ids: np.ndarray, mask: np.ndarray, max_new: int, pad: int) -> np.ndarray:
        """``[b, max_new]`` greedy new tokens of the bare model after left-padded prompts
        ``ids [b, P]``; no end-of-sequence id, so every row gets ``max_new`` tokens."""
        torch = self.torch
        self.model.eval()
        with torch.no_grad(), self.model.disable_adapter():
            out = self.model.generate(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=pad,
                use_cache=True,
            )  # fmt: skip
        return out[:, ids.shape[1] :].numpy()


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
    """A peer built by ``make(**args)`` in a spawned child process (``with Process(Peer,
    **args) as p:``), so that torch's threads never share a process with JAX's.

    :meth:`call` runs one of the peer's methods there and returns its result with the
    child's wall and CPU seconds (process CPU time of all its threads) for it; the parent
    waits idle meanwhile.
    """

    def __init__(self, make, **args) -> None:
        self.make, self.args = make, args

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.make, self.args), daemon=True)
        self.proc.start()
        child.close()
        self.conn.recv()  # the model is loaded
        return self

    def call(self, method: str, *args):
        """``(peer.method(*args), wall_s, cpu_s)``, run in the child."""
        self.conn.send((method, args))
        return self.conn.recv()

    def __exit__(self, *exc):
        self.conn.send(None)
        self.proc.join()


def _serve(conn, make, args: dict) -> None:
    peer = make(**args)
    conn.send("ready")
    while (work := conn.recv()) is not None:
        method, method_args = work
        wall, cpu = time.perf_counter(), time.process_time()
        out = getattr(peer, method)(*method_args)
        conn.send((out, time.perf_counter() - wall, time.process_time() - cpu))
