"""The coordinator: transport-agnostic round logic, the in-process simulation transport, run
records and reports. (The MQTT service builds on the same engine.)"""
