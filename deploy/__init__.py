"""Deployment tooling: broker configuration and credentials (``cahfp deploy``), the emulated
edge testbed (``cahfp testbed``). The non-Python material (systemd units, provisioning script,
container files) lives in the sub-folders."""
