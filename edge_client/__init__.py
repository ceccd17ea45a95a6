"""The device agent: the transport-agnostic client task (and, on top of it, the device-side
services)."""
