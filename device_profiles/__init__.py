"""Board profiles as data: one TOML file per board class (see README.md). The loader and the
schema are ``cahfp.device.profiles``."""
