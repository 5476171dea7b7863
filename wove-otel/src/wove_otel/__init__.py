"""OpenTelemetry for Wove runs (work in progress)."""
