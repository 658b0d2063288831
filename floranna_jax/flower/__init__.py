"""A Flower federation of floranna_jax: the same rounds, with clients on their own machines.

    server_app.py   the ServerApp: any method by name, its state kept on the server
    client_app.py   the ClientApp: ``local_update`` on the node's own data file
    wire.py         what crosses the network (ArrayRecords), checks on uploads, byte counts
    shards.py       one data file per client (for local federations and tests)
    runconfig.py    the run config's keys (defaults in flower_app/pyproject.toml)
    local.py        one SuperLink and N SuperNodes on localhost, one command

Needs the ``flower`` extra (``pip install -e ".[flower]"``).
"""
