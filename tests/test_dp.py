"""Tests of the upload seam and DP-FedAvg (floranna_jax/server/dp.py, floranna_jax/privacy.py):
clipping bounds every client's update and leaves clients inside the bound bit-identical;
the aggregate's noise has std ``z C / U`` and a fresh draw each round; private and frozen
leaves are never touched; noise on a method whose aggregate is not a mean is one config
error; epsilon is dp_accounting's own and falls as the noise grows. (A resumed DP run is
bit-exact: tests/test_checkpoint.py.)"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from smoke_setup import smoke_config

from floranna_jax import config_check, keys, privacy, reporting
from floranna_jax.errors import ConfigError
from floranna_jax.server import dp, registry

U, R, D_IN, D_OUT = 4, 8, 384, 320


def _trees(seed: int, scale: float):
    """``(start, trained)`` trainable trees ``[U, ...]``: a shared start and per-client
    updates of about ``scale`` times a unit Gaussian per entry."""
    k = jax.random.split(jax.random.key(seed), 6)
    one = {
        "lora": {"l0": {"A": jax.random.normal(k[0], (R, D_IN)), "B": jnp.zeros((D_OUT, R))}},
        "head": {"kernel": jax.random.normal(k[1], (D_IN, 2))},
    }
    start = jax.tree.map(lambda x: jnp.broadcast_to(x, (U, *x.shape)), one)
    keys_ = iter(jax.random.split(k[2], 3))
    trained = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys_), x.shape), start)
    return start, trained


def _norms(start, trained, paths) -> np.ndarray:
    """``[U]`` L2 norms of each client's update over the leaves at ``paths``."""
    sq = sum(np.sum((np.asarray(_at(trained, p)) - np.asarray(_at(start, p))) ** 2, axis=(1, 2))
             for p in paths)  # fmt: skip
    return np.sqrt(sq)


def _at(tree, path):
    for name in path:
        tree = tree[name]
    return tree


SHARED = [("lora", "l0", "A"), ("lora", "l0", "B"), ("head", "kernel")]


def _wrapped(name: str, clip: float, z: float):
    return dp.make_dp(registry.make(name), clip, z, keys.noise_key(0))


def test_clipping_bounds_each_update_and_keeps_small_ones_exact():
    start, trained = _trees(0, scale=0.1)
    before = _norms(start, trained, SHARED)
    clip = float(np.median(before))  # half the clients above the bound, half inside it
    up = _wrapped("fedit", clip, 0.0).upload(start, trained)
    after = _norms(start, up, SHARED)
    # float32 arithmetic on ~15k entries: the bound holds to 1e-5 relative.
    assert np.all(after <= clip * (1 + 1e-5)), (before, after, clip)
    big = before > clip
    assert big.any() and (~big).any()
    np.testing.assert_allclose(after[big], clip, rtol=1e-5)
    for leaf_up, leaf_tr in zip(jax.tree.leaves(up), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf_up)[~big], np.asarray(leaf_tr)[~big])
    # The direction of a clipped update is kept: its scale is the one factor clip / norm
    # (atol: (start + f d) - start loses float32 bits relative to start's entries, ~1).
    d_up = np.asarray(up["head"]["kernel"] - start["head"]["kernel"])[big]
    d_tr = np.asarray(trained["head"]["kernel"] - start["head"]["kernel"])[big]
    np.testing.assert_allclose(
        d_up, d_tr * (clip / before[big])[:, None, None], rtol=1e-4, atol=1e-6
    )


def test_private_and_frozen_leaves_are_never_transformed():
    start, trained = _trees(1, scale=1.0)
    # FedSA's personal B never leaves a client: the bound covers A and the head only.
    up = _wrapped("fedsa", 0.01, 0.0).upload(start, trained)
    np.testing.assert_array_equal(up["lora"]["l0"]["B"], trained["lora"]["l0"]["B"])
    shared = [("lora", "l0", "A"), ("head", "kernel")]
    assert np.all(_norms(start, up, shared) <= 0.01 * (1 + 1e-5))
    # FFA's frozen, private A gets neither clipping nor noise; its B gets the noise.
    ffa = _wrapped("ffa", 1.0, 5.0)
    state = ffa.init(jax.tree.map(lambda x: x[0], start["lora"]), 10)
    lora, _, _ = ffa.aggregate(trained["lora"], jnp.full((U,), 1 / U), state)
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), trained["lora"])
    np.testing.assert_array_equal(lora["l0"]["A"], mean["l0"]["A"])
    assert not np.allclose(lora["l0"]["B"], mean["l0"]["B"], atol=1.0)


def test_noise_has_the_stated_std_and_is_fresh_each_round():
    clip, z = 2.0, 3.0
    start, trained = _trees(2, scale=1.0)
    method = _wrapped("fedit", clip, z)
    server_ = registry.serve(method)
    state = method.init(jax.tree.map(lambda x: x[0], start["lora"]), 10)
    sizes = jnp.asarray([1.0, 2.0, 3.0, 4.0])  # DP-FedAvg weighs the clients equally anyway
    agg = server_.aggregate(trained["lora"], sizes, state)
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), trained)
    noise = np.concatenate([np.ravel(agg.lora["l0"][f] - mean["lora"]["l0"][f]) for f in "AB"])
    head = method.aggregate_head(state, trained["head"], sizes / sizes.sum())
    noise = np.concatenate([noise, np.ravel(head["kernel"] - mean["head"]["kernel"])])
    sigma = z * clip / U
    assert agg.metrics["dp_noise_std"] == pytest.approx(sigma)
    # n = 6400 draws: the sample std's relative standard error is 1/sqrt(2n) = 0.9%, so
    # 5% is over 5 standard errors (the seed is fixed: the figure is the same every run).
    assert noise.size == 6400
    assert abs(noise.std() / sigma - 1) < 0.05, noise.std() / sigma
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)
    # apply advances the key: the next round's noise is a new draw.
    _, state2 = method.apply(state, agg, np.arange(U), trained["lora"])
    agg2 = server_.aggregate(trained["lora"], sizes, state2)
    noise2 = np.ravel(agg2.lora["l0"]["A"] - mean["lora"]["l0"]["A"])
    assert abs(np.corrcoef(noise[: noise2.size], noise2)[0, 1]) < 0.05


@pytest.mark.parametrize("name", ["floranna", "fedsa", "flora", "fedex", "svd"])
def test_noise_on_a_method_whose_aggregate_is_not_a_mean_is_one_config_error(name):
    config = smoke_config(**{"server.name": name, "privacy.clip_norm": 1.0,
                             "privacy.noise_multiplier": 1.0})  # fmt: skip
    with pytest.raises(ConfigError) as e:
        config_check.validate(config)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("config field privacy.noise_multiplier: DP-FedAvg noise needs")
    assert f"{name}'s is not" in message
    # Clipping alone is a transform of the uploads, so every method takes it.
    config.privacy.noise_multiplier = 0.0
    config_check.validate(config)


@pytest.mark.parametrize(
    "field, value, fix",
    [("clip_norm", -1.0, "finite number >= 0"), ("noise_multiplier", float("nan"), ">= 0"),
     ("delta", 1.0, "in (0, 1)")],
)  # fmt: skip
def test_bad_privacy_values_name_the_field(field, value, fix):
    config = smoke_config(**{"server.name": "fedit", f"privacy.{field}": value})
    with pytest.raises(ConfigError, match=rf"config field privacy\.{field}: .*{re.escape(fix)}"):
        config_check.validate(config)
    config = smoke_config(**{"server.name": "fedit", "privacy.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="privacy.clip_norm: must be > 0 when noise"):
        config_check.validate(config)


def test_epsilon_is_dp_accountings_and_falls_with_the_noise():
    dp_accounting = pytest.importorskip("dp_accounting")
    n, u, rounds, delta, z = 100, 10, 15, 1e-5, 1.5
    accountant = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    # Replacing one client moves the mean by 2 C / U: the accountant sees z / 2.
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        n, u, dp_accounting.GaussianDpEvent(z / 2)
    )
    accountant.compose(event, rounds)
    assert privacy.epsilon(z, n, u, rounds, delta) == accountant.get_epsilon(delta)
    eps = [privacy.epsilon(m, n, u, rounds, delta) for m in (0.8, 1.5, 3.0, 6.0)]
    assert all(a > b for a, b in zip(eps, eps[1:], strict=False)), eps
    assert privacy.epsilon(0.0, n, u, rounds, delta) == float("inf")
    # The solved multiplier gives the asked epsilon (the search's tolerance is 1e-4 in z).
    z8 = privacy.noise_multiplier_for(8.0, n, u, rounds, delta)
    assert privacy.epsilon(z8, n, u, rounds, delta) == pytest.approx(8.0, rel=1e-3)
    # The metrics row and the summary report it.
    config = smoke_config(**{"server.name": "fedit", "privacy.clip_norm": 1.0,
                             "privacy.noise_multiplier": z, "privacy.delta": delta})  # fmt: skip
    row = privacy.row(config, 2)
    assert row["privacy/epsilon"] == privacy.epsilon(z, 4, 3, 2, delta)
    table = reporting.summary_table([{"round": 2, **row}], "accuracy", "t")
    assert re.search(rf"\| epsilon at delta=1e-05 +\| {row['privacy/epsilon']:.4g} \|", table)
