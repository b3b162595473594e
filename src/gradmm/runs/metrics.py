"""The figures of a job's summary.json, named once. The stages write them, the command line prints
them, W&B's runs table and the saved workspace show them, the report compares them, and a sweep may
optimise any of OBJECTIVES."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    # The stage that writes it (a sweep's objective must be written by a stage the job runs).
    stage: str
    lower_is_better: bool


# Scored for each text set (the synthetic texts, random tokens of their shape, the real examples):
# gradmm.stages.generate.
TEXT_SET_FIGURES = (
    Metric("grad_distance_set", "grad distance (set)", "generate", True),
    Metric("grad_distance_union", "grad distance (union)", "generate", True),
    Metric("grad_distance_mean", "grad distance (mean)", "generate", True),
    Metric("log_ppl_mean", "log-perplexity", "generate", True),
)
ACCURACY = Metric("accuracy", "accuracy", "evaluate", False)
OBJECTIVES = (*TEXT_SET_FIGURES, ACCURACY)
# The top-level figures a runs table sorts and filters on.
HEADLINE = ("n_synthetic", *(m.key for m in TEXT_SET_FIGURES), "seconds", "cpu_seconds", "accuracy",
            "accuracy_std")
