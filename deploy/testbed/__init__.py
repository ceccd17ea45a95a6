"""The emulated edge testbed: client processes in network namespaces with tc bandwidth limits
and cgroup CPU/memory limits from their device profiles (see README.md here)."""

from deploy.testbed.emulation import (
    Testbed,
    TestbedError,
    cgroup_version,
    parse_profiles,
    run_testbed,
)

__all__ = ["Testbed", "TestbedError", "cgroup_version", "parse_profiles", "run_testbed"]
