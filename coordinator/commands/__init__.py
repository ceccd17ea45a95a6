"""The coordinator's commands: coordinator, simulate, compare, export."""
