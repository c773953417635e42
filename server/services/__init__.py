"""Service functions: one per use case, keyword-only arguments, each owning its commit."""
