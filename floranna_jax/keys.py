"""Every random key of a run, from one root and one recipe (STYLE.md).

    root        = key(train.seed)
    model init  = fold_in(root, MODEL_TAG)
    DP noise    = fold_in(root, NOISE_TAG)               round 1's; the method state advances it
    round r     = fold_in(root, r)                       r = rounds completed, 0-based
    sampling    = fold_in(round, SAMPLE_TAG)             which clients train
    fresh init  = fold_in(round, INIT_TAG)               methods that restart clients
    client u    = fold_in(round, u)
      data      = fold_in(client, DATA_TAG)              the order of its examples
      dropout   = fold_in(client, DROPOUT_TAG)           step t: fold_in(dropout, t)

So which clients train, on which examples, in which order and with which dropout is a
function of ``(seed, round, client)`` only: a resumed run replays the same batches.
The tags of the root and the round lie above any round number or client id.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_TAG = 2**31 - 1
INIT_TAG = 2**31 - 2
MODEL_TAG = 2**31 - 3
NOISE_TAG = 2**31 - 4
DROPOUT_TAG = 0
DATA_TAG = 1


def root(seed: int) -> jax.Array:
    return jax.random.key(seed)


def model_key(seed: int) -> jax.Array:
    return jax.random.fold_in(root(seed), MODEL_TAG)


def noise_key(seed: int) -> jax.Array:
    """The first round's key of the server's DP noise (``server.dp``)."""
    return jax.random.fold_in(root(seed), NOISE_TAG)


def round_key(root_data: np.ndarray | jax.Array, round_index: int) -> jax.Array:
    """``fold_in(root, round_index)`` from the root's key data (as a checkpoint holds it)."""
    return jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(root_data)), round_index)


def sample_key(rkey: jax.Array) -> jax.Array:
    return jax.random.fold_in(rkey, SAMPLE_TAG)


def init_key(rkey: jax.Array) -> jax.Array:
    return jax.random.fold_in(rkey, INIT_TAG)


def client_key(rkey: jax.Array, client_id: int) -> jax.Array:
    return jax.random.fold_in(rkey, int(client_id))


def data_key(ckey: jax.Array) -> jax.Array:
    return jax.random.fold_in(ckey, DATA_TAG)


def dropout_key(ckey: jax.Array) -> jax.Array:
    """The key a client's local update receives; step ``t`` uses ``fold_in(., t)``."""
    return jax.random.fold_in(ckey, DROPOUT_TAG)


def dropout_keys(rkey: jax.Array, client_ids) -> jax.Array:
    """``[U]`` dropout keys of the clients ``client_ids`` in the round ``rkey``."""
    return jnp.stack([dropout_key(client_key(rkey, u)) for u in np.asarray(client_ids)])
