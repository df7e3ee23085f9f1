"""Pure decisions: numbers in, numbers out; no device work, nothing from ``core`` (checked by import-linter)."""
