"""The device budget shared by simulation and deployment: measurement, calibration, budget."""
