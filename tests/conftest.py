"""Test-wide settings: the same Ray auth mode and no telemetry for every test (see ../shared/PLATFORM.md)."""
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
