"""A run's privacy: the ``privacy`` config section, the method wrapper it names, and epsilon.

    c.privacy = privacy.section()                  # in a configs/*.py
    method = privacy.wrap(config, method)          # server.dp.make_dp, or method unchanged
    privacy.epsilon(z, num_clients, U, rounds, delta)   # (epsilon, delta)-DP after `rounds`
    privacy.row(config, round)                     # {"privacy/epsilon", "privacy/delta"}

The mechanism is DP-FedAvg (:mod:`floranna_jax.server.dp`): each round, each sampled
client's update clipped to L2 norm ``C``, the mean of the ``U`` updates plus Gaussian noise
of std ``z C / U``. The unit of privacy is a client (all of its examples), so ``delta``
should be below ``1 / num_clients``.

Accounting: the run samples exactly ``U = train.clients_per_round`` of ``N =
partition.num_clients`` clients each round, uniformly without replacement
(``rounds.sample_clients``). That is ``dp_accounting``'s ``SampledWithoutReplacementDpEvent``
under "replace one client" neighbouring (``N`` and ``U`` are public), the RDP accountant of
Wang, Balle and Kasiviswanathan (AISTATS 2019) composed over the rounds and converted to
``(epsilon, delta)``. Replacing one client moves the mean by up to ``2 C / U``, twice the
add-or-remove sensitivity, so the accountant sees the noise multiplier ``z / 2``. It
assumes every sampled client is aggregated (a Flower round that loses clients averages
fewer updates with the same noise, and is not accounted for separately).

``dp_accounting`` (Google) is the optional extra ``privacy``: ``pip install -e
".[privacy]"``; it is imported only when a run adds noise.
"""

from __future__ import annotations

import math

import ml_collections

from floranna_jax import keys
from floranna_jax.errors import BadValue
from floranna_jax.server import Method, dp


def section() -> ml_collections.ConfigDict:
    """The ``privacy`` config section with its defaults: off."""
    return ml_collections.ConfigDict(
        dict(
            clip_norm=0.0,  # L2 bound on each client's update (shared leaves + head); 0 = off
            noise_multiplier=0.0,  # DP-FedAvg: noise std z * clip_norm / U on the mean; 0 = off
            delta=1e-5,  # the delta of the reported epsilon (client-level: < 1/num_clients)
        )
    )


def check(config) -> None:
    """Raise :class:`BadValue` (param: the ``privacy`` field) for a bad bound, multiplier or
    delta, noise on a method whose aggregate is not a mean, or noise without the extra."""
    p = config.privacy
    dp.check(config.server.name, p.clip_norm, p.noise_multiplier)
    if isinstance(p.delta, bool) or not isinstance(p.delta, int | float) or not 0 < p.delta < 1:
        raise BadValue("delta", f"must be a number in (0, 1), got {p.delta!r}")
    if p.noise_multiplier > 0:
        try:
            import dp_accounting  # noqa: F401
        except ImportError as e:
            raise BadValue("noise_multiplier", "> 0 needs the privacy accountant: "
                           "pip install -e \".[privacy]\"") from e  # fmt: skip


def wrap(config, method: Method) -> Method:
    """``method`` wrapped in :func:`server.dp.make_dp` as ``config.privacy`` asks; unchanged
    when both the clipping bound and the noise are off."""
    p = config.privacy
    if p.clip_norm == 0 and p.noise_multiplier == 0:
        return method
    return dp.make_dp(method, float(p.clip_norm), float(p.noise_multiplier),
                      keys.noise_key(config.train.seed))  # fmt: skip


def _event(noise_multiplier: float, num_clients: int, clients_per_round: int, rounds: int):
    import dp_accounting  # the optional extra "privacy"

    # Replace-one neighbours: the mean's sensitivity is 2 C / U, hence z / 2 (module doc).
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    sampled = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients, clients_per_round, gaussian
    )
    return dp_accounting.SelfComposedDpEvent(sampled, rounds)


def _accountant():
    import dp_accounting

    return dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )


def epsilon(
    noise_multiplier: float, num_clients: int, clients_per_round: int, rounds: int, delta: float
) -> float:
    """The epsilon of ``rounds`` DP-FedAvg rounds at ``delta`` (module doc); inf without
    noise."""
    if noise_multiplier <= 0:
        return math.inf
    accountant = _accountant()
    accountant.compose(_event(noise_multiplier, num_clients, clients_per_round, rounds))
    return float(accountant.get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, num_clients: int, clients_per_round: int, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier whose :func:`epsilon` after ``rounds`` is at most
    ``target_epsilon`` (``dp_accounting.calibrate_dp_mechanism``, a bracketed search)."""
    import dp_accounting

    return float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant,
            lambda z: _event(z, num_clients, clients_per_round, rounds),
            target_epsilon,
            delta,
            # From z = 0.1 up: the accountant divides by z, so the search may not reach 0.
            bracket_interval=dp_accounting.LowerEndpointAndGuess(0.1, 1.0),
            tol=1e-4,
        )
    )


def row(config, rounds_done: int) -> dict[str, float]:
    """The metrics of a noisy run after ``rounds_done`` rounds: its epsilon and delta;
    ``{}`` without noise."""
    p = config.privacy
    if p.noise_multiplier <= 0:
        return {}
    eps = epsilon(p.noise_multiplier, config.partition.num_clients,
                  config.train.clients_per_round, rounds_done, p.delta)  # fmt: skip
    return {"privacy/epsilon": eps, "privacy/delta": float(p.delta)}


def main(argv=None) -> None:
    """``python -m floranna_jax.privacy EPSILON NUM_CLIENTS CLIENTS_PER_ROUND ROUNDS DELTA``
    prints the noise multiplier that gives that epsilon."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 5:
        raise SystemExit(main.__doc__)
    eps, n, u, r, delta = float(args[0]), int(args[1]), int(args[2]), int(args[3]), float(args[4])
    z = noise_multiplier_for(eps, n, u, r, delta)
    print(f"noise_multiplier={z:.4f} epsilon={epsilon(z, n, u, r, delta):.4f} delta={delta:g}")


if __name__ == "__main__":
    main()
