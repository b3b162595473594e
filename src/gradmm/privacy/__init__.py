"""Differential privacy of the targets (dp), the ledger that composes releases over the same real
examples (ledger), and the post-hoc leakage audit (leakage)."""
