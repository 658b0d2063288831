"""A Flower federation of floranna_jax: the same run, with clients on their own machines.

    server_app.py   the ServerApp: ``train.run`` (any method, its state on the server)
    transport.py    the run's clients over Flower (``transport.Clients``): train, evaluate
    client_app.py   the ClientApp: ``local_update`` and evaluation on the node's own data
    wire.py         what crosses the network (ArrayRecords), checks on uploads, byte counts
    shards.py       one data file per client (for local federations and tests)
    runconfig.py    the run config's keys (defaults in flower_app/pyproject.toml)
    local.py        one SuperLink and N SuperNodes on localhost, one command

Needs the ``flower`` extra (``pip install -e ".[flower]"``).
"""
