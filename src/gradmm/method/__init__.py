"""The GRADMM method on plain values (no config, tracking, task or pipeline): per-example gradients
and the matching loss, the matched gradient, the ADMM loop, the projections to readable tokens, and
the fine-tuning methods evaluation trains with."""
