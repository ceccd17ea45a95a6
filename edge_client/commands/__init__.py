"""The edge client's command: client."""
