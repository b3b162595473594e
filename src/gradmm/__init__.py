"""GRADMM: synthetic training text for LLMs by gradient matching (docs/method.md).

method/     the science, on plain values: gradients, the matched gradient, ADMM, projectors, fine-tuning
privacy/    DP release of the targets, the privacy ledger, the leakage audit
stages/     generate, filter, evaluate, and the classifier filter and evaluate share
runs/       a job's identity, directory, manifest, target cache, files, metrics and sweeps
config/     typed schemas, validation, components built from `_target_`
reporting/  W&B tracking, the HTML comparison report, the saved W&B workspace
data/       tasks and their data, models, words
cli.py and pipeline.py: the command line and the job, top to bottom.
"""
