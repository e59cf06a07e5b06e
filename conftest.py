"""Makes the repository root importable for pytest (scripts run from the root already see it)."""
