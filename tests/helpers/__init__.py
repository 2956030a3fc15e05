"""Shared test helpers (import as `helpers.<module>`; pytest.ini puts tests/ on sys.path)."""
