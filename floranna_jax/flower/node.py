"""A SuperNode that takes a message as soon as the server sends it: ``flower-supernode``
without flwr 1.42's fixed 3 s and 1 s waits (:mod:`waits`).

    python -m floranna_jax.flower.node --superlink SERVER:9190 ...   # flower-supernode's flags

Flower's own ``flower-supernode`` runs with its loop's waits replaced
(:func:`waits.patch_supernode`); on another flwr than :data:`waits.FLWR_VERSION` it stops
with one line.
"""

from __future__ import annotations

import importlib
import sys

from floranna_jax.flower import waits


def main() -> None:
    """``flower-supernode``, its command line this one's, with Flower's waits shortened."""
    waits.check_version()
    waits.patch_supernode(importlib.import_module("flwr.supernode.start_client_internal"))
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
