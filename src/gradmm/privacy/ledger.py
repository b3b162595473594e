"""The privacy ledger: every DP release of targets made through one target cache
(paths.target_cache_dir), kept beside it, so that releases over the same real examples compose.

Why: each change to the target-cache key (another lm_prefix, attention kernel, library version, a lost
cache entry) draws a fresh noisy release over the same real examples, and k releases averaged cut the
noise by sqrt(k). A job's own (epsilon, delta) says nothing about that; the ledger does. Each record
holds what accounting needs: the mechanism, its noise standard deviation, clip, adjacency and
sensitivity, and the identities of the examples it covered. `total_epsilon` composes, with
dp-accounting's PLD accountant, every recorded release that covered an example, and reports the worst
example: the guarantee of the union of all releases for the unit of privacy, one example.

Example identity is a keyed hash (HMAC-SHA256) of the example's text, with a secret made once per
cache directory (privacy_ledger.secret, readable by its owner only): the same sentence in another file,
split or task is the same example, and the ledger, unlike a plain hash, does not let anyone holding
a candidate sentence test whether it was used. The same key fingerprints data where a published name
(the job directory) must not reveal private data (`keyed_digest`).

What it cannot see: releases made through another cache directory (another machine, another
paths.target_cache_dir) or before the ledger existed. Share one target cache to account for them.
The ledger is written before a release is stored or used, so a crash in between over-counts, never
under-counts. An unreadable ledger stops every release: without it, no total can be stated.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import dp_accounting
from dp_accounting import pld
from filelock import FileLock

from gradmm.runs import files

LEDGER_FILE = "privacy_ledger.json"
SECRET_FILE = "privacy_ledger.secret"
# Sensitivity of the per-class clipped gradient sums, in units of the clip norm C, per neighbouring
# relation: adding or removing one example moves one class's sum by at most C; replacing one example
# moves one sum by up to 2C (same class) or two sums by C each (sqrt(2) C < 2C).
SENSITIVITY = {"add_remove": 1, "replace_one": 2}
MECHANISM = "gaussian: per-class sums of clipped matched gradients (conf/matching) plus N(0, noise_std^2 I)"


class LedgerError(RuntimeError):
    """The ledger cannot be read, so no release can be accounted for."""


class BudgetExceeded(RuntimeError):
    """A release would take the composed epsilon of some example over privacy.budget_epsilon."""


def secret(directory: str | Path) -> bytes:
    """The cache directory's key, made once: linked into place, so concurrent jobs agree on one."""
    path = Path(directory) / SECRET_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{SECRET_FILE}.")
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
            os.close(fd)
            os.link(tmp, path)
        except FileExistsError:
            pass  # another job made it first: use theirs
        finally:
            Path(tmp).unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != 32:
        raise LedgerError(f"{path} holds {len(key)} bytes, not a 32-byte key; the ledger cannot identify "
                          "examples without it. Restore it from a backup.")
    return key


def keyed_digest(directory: str | Path, data: bytes) -> str:
    return hmac.new(secret(directory), data, hashlib.sha256).hexdigest()


def example_ids(directory: str | Path, texts: Sequence[str]) -> list[str]:
    return [keyed_digest(directory, text.encode())[:32] for text in texts]


def read(directory: str | Path) -> list[dict]:
    path = Path(directory) / LEDGER_FILE
    if not path.exists():
        return []
    try:
        releases = json.loads(path.read_text())
        if not isinstance(releases, list):
            raise ValueError("not a JSON list of releases")
        for n, release in enumerate(releases, 1):
            multiplier = effective_multiplier(release, "replace_one")
            if not (math.isfinite(multiplier) and multiplier > 0 and isinstance(release["examples"], list)):
                raise ValueError(f"release {n} has no finite positive noise or no list of examples")
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError) as error:
        raise LedgerError(
            f"the privacy ledger {path} is unreadable ({error}): no DP release can be accounted for until it "
            "is restored (it lists every release made through this target cache)."
        ) from error
    return releases


def record(directory: str | Path, release: dict, ids: Sequence[str]) -> dict:
    """Appends one release (its facts and the examples it covered); returns the record."""
    entry = {"release_id": uuid.uuid4().hex, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "mechanism": MECHANISM, **release, "examples": sorted(set(ids))}
    with FileLock(str(Path(directory) / f"{LEDGER_FILE}.lock")):
        files.write_json(Path(directory) / LEDGER_FILE, [*read(directory), entry])
    return entry


def effective_multiplier(release: dict, relation: str) -> float:
    """The release's noise multiplier under `relation`: its noise std over that relation's sensitivity
    (a release calibrated for add_remove is worth half its multiplier under replace_one)."""
    return float(release["noise_std"]) / (float(release["clip"]) * SENSITIVITY[relation])


@functools.cache
def composed_epsilon(multipliers: tuple[float, ...], delta: float) -> float:
    accountant = pld.PLDAccountant()
    for sigma in multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(sigma))
    return float(accountant.get_epsilon(delta))


def total_epsilon(releases: Sequence[dict], ids: Sequence[str], delta: float, relation: str) -> tuple[float, int]:
    """(epsilon at `delta`, number of releases) composed over every release that covered an example
    of `ids`, for the example that is worst off."""
    worst = (0.0, 0)
    for signature in {tuple(sorted(effective_multiplier(r, relation) for r in releases if i in r["examples"]))
                      for i in set(ids)}:
        if signature:
            worst = max(worst, (composed_epsilon(signature, delta), len(signature)))
    return worst


def check_budget(releases: Sequence[dict], ids: Sequence[str], planned: dict, delta: float, relation: str,
                 budget: float | None) -> None:
    """Refuses `planned` when, composed with the recorded releases, it would exceed the budget."""
    if budget is None:
        return
    earlier, n = total_epsilon(releases, ids, delta, relation)
    after, _ = total_epsilon([*releases, {**planned, "examples": list(ids)}], ids, delta, relation)
    if after > budget:
        raise BudgetExceeded(
            f"privacy.budget_epsilon={budget:g} refuses this release: these real examples already had {n} "
            f"DP release(s) (composed epsilon {earlier:.3g} at delta={delta:g}), and one more makes "
            f"{after:.3g}. Reuse the earlier targets (same task, model and privacy settings, and the same "
            "paths.target_cache_dir), choose other real examples, or raise the budget knowingly."
        )
