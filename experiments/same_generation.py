"""Whether two generation jobs made the same texts: a regression check across code versions.

    git worktree add ../old <commit>
    (cd ../old && python run.py <overrides> 'stages=[generate]' paths.output_root=/tmp/old)
    python run.py <overrides> 'stages=[generate]' paths.output_root=/tmp/new
    python experiments/same_generation.py /tmp/old/runs/sst2/<id> /tmp/new/runs/sst2/<id>

Compares synthetic.jsonl row by row (text, label, round, grad_distance, log_ppl) and metrics.jsonl outer
step by outer step (every number but the seconds), prints how many texts agree and the largest
difference of each figure, and exits 1 when any text or label differs. Identical texts mean every
result computed from them downstream is reproduced too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradmm.runs.files import read_jsonl

TIMINGS = ("seconds", "projection_seconds")


def largest_differences(old: list[dict], new: list[dict]) -> dict[str, float]:
    """Per numeric field, the largest absolute difference between the records paired in order."""
    largest: dict[str, float] = {}
    for a, b in zip(old, new, strict=True):
        for key in a.keys() & b.keys():
            if key not in TIMINGS and isinstance(a[key], int | float) and isinstance(b[key], int | float):
                largest[key] = max(largest.get(key, 0.0), abs(a[key] - b[key]))
    return dict(sorted(largest.items()))


def compare(old_job: Path, new_job: Path) -> bool:
    """Prints the comparison; True when both jobs made the same texts with the same labels."""
    old_rows, new_rows = read_jsonl(old_job / "synthetic.jsonl"), read_jsonl(new_job / "synthetic.jsonl")
    if len(old_rows) != len(new_rows):
        print(f"{len(old_rows)} texts against {len(new_rows)}: not the same generation")
        return False
    differing = [i for i, (a, b) in enumerate(zip(old_rows, new_rows, strict=True))
                 if (a["text"], a["label"]) != (b["text"], b["label"])]
    print(f"texts: {len(old_rows) - len(differing)} of {len(old_rows)} identical with their labels")
    for i in differing[:5]:
        print(f"  row {i}: {old_rows[i]['text']!r} ({old_rows[i]['label']}) -> "
              f"{new_rows[i]['text']!r} ({new_rows[i]['label']})")
    old_steps = [m for m in read_jsonl(old_job / "metrics.jsonl") if "outer_step" in m]
    new_steps = [m for m in read_jsonl(new_job / "metrics.jsonl") if "outer_step" in m]
    print(f"outer steps: {len(old_steps)} against {len(new_steps)}")
    for source, old, new in (("texts", old_rows, new_rows), ("outer steps", old_steps, new_steps)):
        if len(old) == len(new):
            for key, diff in largest_differences(old, new).items():
                print(f"  {source} {key}: largest difference {diff:.3g}")
    return not differing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old_job", type=Path)
    parser.add_argument("new_job", type=Path)
    args = parser.parse_args(argv)
    return 0 if compare(args.old_job, args.new_job) else 1


if __name__ == "__main__":
    sys.exit(main())
