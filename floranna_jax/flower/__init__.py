"""A Flower federation of floranna_jax: the same run, with clients on their own machines.

    server_app.py   the ServerApp: ``train.run`` (any method, its state on the server)
    transport.py    the run's clients over Flower (``transport.Clients``): train, evaluate
    client_app.py   the ClientApp: ``local_update`` and evaluation on the node's own data
    wire.py         what crosses the network (a tree packed in one Array), checks, byte counts
    shards.py       one data file per client (for local federations and tests)
    runconfig.py    the run config's keys (defaults in flower_app/pyproject.toml)
    local.py        one SuperLink and N SuperNodes on localhost, one command
    node.py         a SuperNode: flower-supernode without flwr's fixed waits
    warm_node.py    a node's ClientApp messages run in one long-lived process
    waits.py        flwr 1.42's fixed 3 s and 1 s waits, shortened (node, ClientApp, server)

Needs the ``flower`` extra (``pip install -e ".[flower]"``).
"""
