"""``fisher-scale report``: the comparison as a self-contained Markdown file: setup, table, verdicts, plots."""

from __future__ import annotations

from pathlib import Path

from fisher_scale import tracking
from fisher_scale.tune.compare import Comparison, cell_text


def markdown_report(experiment: str, comparison: Comparison) -> str:
    """The report's text; the plots are linked by file name, beside it."""
    lines = [f"# {experiment}: {comparison.metric} ({comparison.mode})", "", "## Setup", ""]
    lines += [f"- `{key}`: {value}" for key, value in comparison.setup.items()]
    lines += [f"- studies (seeds): {', '.join(comparison.seeds)}; trials compared: {comparison.trials}", ""]
    lines += ["## Results", ""]
    if comparison.rows:
        columns = list(comparison.rows[0])
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in comparison.rows:  # the winner's rank in bold
            cells = {c: cell_text(row.get(c)) for c in columns}
            if row.get("rank") == 1:
                cells["rank"] = "**1**"
            lines.append("| " + " | ".join(cells.values()) + " |")
    lines += [
        "",
        "The mean and its 95 % interval are over the studies' best trials (a percentile bootstrap); the verdict "
        "compares each arm's study bests with the reference arm's, study by study: `not distinguishable` "
        "when the interval of the mean difference covers 0, `too few studies` below two.",
        "",
        "## Plots",
        "",
    ]
    lines += [f"![{path.stem}]({path.name})" for path in comparison.plots]
    return "\n".join(lines) + "\n"


def write_report(experiment: str, comparison: Comparison, out: Path) -> Path:
    """``report.md`` beside the plots in ``out``, and logged to the comparison's MLflow run."""
    path = out / "report.md"
    path.write_text(markdown_report(experiment, comparison))
    tracking.client(comparison.tracking_uri).log_artifact(comparison.run_id, str(path))
    return path
