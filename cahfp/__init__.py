"""CA-HFP Edge core library: models, data, pruning, reconstruction, aggregation, wire format.

Nothing in this package opens a network connection; transports live in ``coordinator`` and
``edge_client``.
"""

__version__ = "0.1.0"
