"""The embedded broker for the demo, tests and benchmarks (``embedded``) and the secured
mosquitto configuration with its credentials (``config``, ``cahfp deploy``)."""
