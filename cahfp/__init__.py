"""CA-HFP Edge core library: models, data, pruning, reconstruction, aggregation, wire format.

The only networking is ``cahfp.mqtt`` (the MQTT link both apps use); the coordinator and the
edge client sit above this package.
"""

__version__ = "0.1.0"
