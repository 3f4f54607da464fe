"""Model families: one folder per family."""
