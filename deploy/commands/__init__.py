"""The deployment commands: deploy, testbed, demo."""
