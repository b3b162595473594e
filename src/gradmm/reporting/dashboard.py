"""A saved W&B workspace to start from: `make wandb-workspace PROJECT=gradmm` (online, needs a W&B API
key; no run ever needs it). It reads the keys `gradmm.reporting.tracking` logs:

- the runs table with the headline figures pinned;
- generation curves (`generate/<metric>/<class>/round<r>` against `generate/outer_step`), runs grouped
  by admm.rho;
- dev curves (`evaluate/<metric>/<method>/seed<s>/lr<lr>` against `evaluate/step`);
- accuracy against grad_distance_set, one point per run;
- the synthetic texts tables of generation and of the filter.

Requires the dashboard extra: pip install -e '.[dashboard]'.
"""

from __future__ import annotations

import argparse

from gradmm.reporting.tracking import has_api_key
from gradmm.runs.metrics import HEADLINE

GENERATION_METRICS = ("grad_distance_z", "grad_distance_x", "log_ppl_z", "primal_residual")
DEV_METRICS = ("dev_accuracy", "train_loss")
HEADLINE_COLUMNS = (*HEADLINE, "baseline/zero_shot/accuracy", "random_baseline/grad_distance_set", "filter/n_kept",
                    "privacy/epsilon")
HEADLINE_CONFIG = ("task.name", "admm.rho", "generation.rounds", "matching.distance", "privacy.name")


def workspace(entity: str, project: str, name: str):
    """The workspace, built but not saved."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    by_rho = {"groupby": wr.Config("admm.rho"), "groupby_aggfunc": "mean", "groupby_rangefunc": "minmax"}
    generation = [
        wr.LinePlot(title=f"{metric} per class and round", x="generate/outer_step",
                    metric_regex=f"generate/{metric}/.*", **by_rho)
        for metric in GENERATION_METRICS
    ]
    dev = [
        wr.LinePlot(title=f"{metric} per method, seed and lr", x="evaluate/step", metric_regex=f"evaluate/{metric}/.*")
        for metric in DEV_METRICS
    ]
    headline = [
        wr.ScatterPlot(title="accuracy vs grad_distance_set", x=wr.SummaryMetric("grad_distance_set"),
                       y=wr.SummaryMetric("accuracy")),
        wr.ScatterPlot(title="accuracy vs log_ppl_mean", x=wr.SummaryMetric("log_ppl_mean"),
                       y=wr.SummaryMetric("accuracy")),
        wr.ParallelCoordinatesPlot(title="rho, distance, accuracy", columns=[
            wr.ParallelCoordinatesPlotColumn(metric=wr.Config("admm.rho")),
            wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("grad_distance_set")),
            wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("accuracy")),
        ]),
    ]
    texts = [wr.WeavePanelSummaryTable(table_name=f"{stage}/texts") for stage in ("filter", "generate")]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[
            ws.Section(name="Headline", panels=headline, is_open=True),
            ws.Section(name="Generation", panels=generation, is_open=True),
            ws.Section(name="Evaluation", panels=dev, is_open=True),
            ws.Section(name="Synthetic texts", panels=texts, is_open=True),
        ],
        runset_settings=ws.RunsetSettings(
            pinned_columns=[f"config:{key}" for key in HEADLINE_CONFIG]
            + [f"summary:{key}" for key in HEADLINE_COLUMNS],
        ),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--entity", default=None, help="default: your W&B default entity")
    parser.add_argument("--name", default="gradmm")
    args = parser.parse_args(argv)
    try:
        import wandb
        import wandb_workspaces  # noqa: F401 - the extra is checked before anything is sent
    except ImportError as error:
        raise SystemExit(f"{error}: install the dashboard extra (pip install -e '.[dashboard]')") from error
    if not has_api_key():
        raise SystemExit("The workspace is saved online: configure a W&B API key first (wandb login).")
    entity = args.entity or wandb.Api().default_entity
    saved = workspace(entity, args.project, args.name).save()
    print(f"workspace {args.name!r} saved: {saved.url}")


if __name__ == "__main__":
    main()
