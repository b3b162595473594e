"""Adversarial: DP releases compose (issue 15, finding 2), a budget refuses what it must, and a broken
cache entry or ledger never silently releases again (finding 8, the cache half). The targets here are
computed by a stand-in (no model): what is tested is the accounting around them."""

import json
import logging
import math
import os
import pickle
import stat
import threading

import pytest
import torch
from conftest import TINY, compose_config, quotas
from omegaconf import OmegaConf

from gradmm.data.tasks import Example
from gradmm.method.gradients import GradFeatures
from gradmm.privacy import dp, ledger
from gradmm.runs import target_cache
from gradmm.runs.target_cache import mechanism

DP = [*TINY, "privacy=dp", "privacy.delta=1e-3"]
REAL = [Example(f"real sentence number {i}", i % 2, 10 + i) for i in range(8)]


def _cfg(tmp_path, *overrides, budget=None):
    cfg = compose_config([*DP, f"paths.target_cache_dir={tmp_path / 'targets'}", *overrides])
    OmegaConf.update(cfg, "privacy.budget_epsilon", budget, force_add=True)
    return cfg


class Releaser:
    """compute() for cached_targets: counts its calls, returns the release facts of these settings."""

    def __init__(self, cfg):
        self.cfg, self.calls = cfg, 0

    def __call__(self):
        self.calls += 1
        facts = dp.release_facts(mechanism(self.cfg))
        return [torch.full((2, 3), float(self.calls)), torch.zeros(2, 3)], facts


def _release(cfg, real=REAL):
    compute = Releaser(cfg)
    targets, facts = target_cache.cached_targets(cfg, real, torch.device("cpu"), compute)
    return targets, facts, compute.calls


def _sigma(cfg):
    return dp.noise_multiplier(cfg.privacy.epsilon, cfg.privacy.delta)


# Each of these changes the target-cache key, so the same real examples get a fresh noisy release.
KEY_CHANGES = [
    "task.lm_prefix=' '",
    "model.attn_implementation=sdpa",
    "model.init_seed=3",
    "matching.loss=full_vocab",
    "privacy.clip=0.5",
    "privacy.epsilon=2",
    "task.prompt=' It is'",
    "task.max_text_tokens=64",
]


@pytest.mark.slow
@pytest.mark.parametrize("change", KEY_CHANGES)
def test_a_second_release_on_the_same_examples_is_composed_with_the_first(change, tmp_path):
    first_cfg, second_cfg = _cfg(tmp_path), _cfg(tmp_path, change)
    _, first, _ = _release(first_cfg)
    _, second, calls = _release(second_cfg)
    assert calls == 1, "a new key: a new release"
    assert first["total_epsilon"] == pytest.approx(first["spent_epsilon"], rel=0.02)
    assert first["releases_on_these_examples"] == 1 and second["releases_on_these_examples"] == 2
    multipliers = sorted(ledger.effective_multiplier(r, second_cfg.privacy.relation)
                         for r in ledger.read(tmp_path / "targets"))
    assert second["total_epsilon"] == pytest.approx(ledger.composed_epsilon(tuple(multipliers), 1e-3))
    assert second["total_epsilon"] > max(first_cfg.privacy.epsilon, second_cfg.privacy.epsilon) * 1.1
    assert second["ledger"] == str(tmp_path / "targets" / ledger.LEDGER_FILE)


def test_reading_the_cached_release_is_not_a_new_release(tmp_path):
    cfg = _cfg(tmp_path)
    targets, first, _ = _release(cfg)
    again, second, calls = _release(cfg)
    assert calls == 0 and torch.equal(targets[0], again[0])
    assert second["total_epsilon"] == first["total_epsilon"] and len(ledger.read(tmp_path / "targets")) == 1


def test_the_budget_is_not_part_of_what_is_released(tmp_path):
    _release(_cfg(tmp_path, budget=5.0))
    _, facts, calls = _release(_cfg(tmp_path, budget=3.0))
    assert calls == 0 and facts["budget_epsilon"] == 3.0


@pytest.mark.parametrize("overlap", [0, 2, 4, 8])
def test_the_total_is_that_of_the_example_in_the_most_releases(overlap, tmp_path):
    cfg = _cfg(tmp_path)
    others = REAL[:overlap] + [Example(f"another sentence {i}", i % 2, 100 + i) for i in range(8 - overlap)]
    _release(cfg)
    _, facts, _ = _release(_cfg(tmp_path, "seed=5"), others)
    sigma = ledger.effective_multiplier(ledger.read(tmp_path / "targets")[0], cfg.privacy.relation)
    expected = ledger.composed_epsilon((sigma, sigma) if overlap else (sigma,), 1e-3)
    assert facts["total_epsilon"] == pytest.approx(expected)
    assert facts["releases_on_these_examples"] == (2 if overlap else 1)


def test_the_same_text_elsewhere_is_the_same_example(tmp_path):
    """Another split, row or label: the unit is the text, so the releases compose."""
    _release(_cfg(tmp_path))
    moved = [Example(ex.text, 1 - ex.label, ex.index + 500) for ex in REAL]
    _, facts, _ = _release(_cfg(tmp_path, "seed=9"), moved)
    assert facts["releases_on_these_examples"] == 2


def test_releases_under_another_relation_are_converted_to_this_ones_sensitivity(tmp_path):
    _release(_cfg(tmp_path, "privacy.relation=add_remove"))
    _, facts, _ = _release(_cfg(tmp_path, "privacy.relation=replace_one"))
    recorded = ledger.read(tmp_path / "targets")
    sigma = _sigma(_cfg(tmp_path))
    assert ledger.effective_multiplier(recorded[0], "replace_one") == pytest.approx(sigma / 2)
    assert facts["total_epsilon"] == pytest.approx(ledger.composed_epsilon(tuple(sorted((sigma / 2, sigma))), 1e-3))


@pytest.mark.parametrize("budget,releases_allowed", [(0.5, 0), (1.0001, 1), (1.5, 1), (1.52, 2), (2.0, 3), (2.31, 4)])
def test_the_budget_refuses_the_release_that_would_exceed_it(budget, releases_allowed, tmp_path):
    for n in range(5):
        change = f"task.lm_prefix='{' ' * (n + 1)}'"
        cfg = _cfg(tmp_path, change, budget=budget)
        if n < releases_allowed:
            _release(cfg)
            continue
        compute = Releaser(cfg)
        with pytest.raises(ledger.BudgetExceeded) as refused:
            target_cache.cached_targets(cfg, REAL, torch.device("cpu"), compute)
        assert f"privacy.budget_epsilon={budget:g}" in str(refused.value)
        assert f"already had {n} DP release(s)" in str(refused.value)
        assert compute.calls == 0, "refused before any noise is drawn"
        assert len(ledger.read(tmp_path / "targets")) == n, "a refused release is not recorded"
        assert len(list((tmp_path / "targets").glob("*.pt"))) == n
        return
    pytest.fail("no release was refused")


def _pickle_payload(path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'PWNED'}",))

    return pickle.dumps({"targets": [torch.zeros(2)], "release": Payload()})


CORRUPTIONS = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: 100]),
    "empty": lambda path: path.write_bytes(b""),
    "garbage": lambda path: path.write_bytes(os.urandom(300)),
    "pickle payload": lambda path: path.write_bytes(_pickle_payload(path)),
    "no targets": lambda path: torch.save({"release": {}}, path),
    "targets not a list": lambda path: torch.save({"targets": torch.zeros(2), "release": {}}, path),
    "empty targets": lambda path: torch.save({"targets": [], "release": {}}, path),
    "a plain tensor": lambda path: torch.save(torch.zeros(3), path),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_broken_entry_is_named_moved_aside_and_its_new_release_composed(corruption, tmp_path, caplog):
    cfg = _cfg(tmp_path)
    _release(cfg)
    (entry,) = (tmp_path / "targets").glob("*.pt")
    CORRUPTIONS[corruption](entry)
    broken = entry.read_bytes()
    with caplog.at_level(logging.WARNING, logger="gradmm.runs.target_cache"):
        targets, facts, calls = _release(cfg)
    assert not (tmp_path / "targets" / "PWNED").exists(), "loading ran no pickled code"
    assert calls == 1 and torch.equal(targets[0], torch.full((2, 3), 1.0))
    (aside,) = (tmp_path / "targets").glob("*.pt.broken-*")
    assert aside.read_bytes() == broken, "the broken entry is kept, as it was"
    assert f"{entry} is unreadable" in caplog.text and str(aside) in caplog.text
    assert "the ledger composes with the lost one" in caplog.text
    assert facts["releases_on_these_examples"] == 2
    # The next run reads the new entry: no third release.
    assert _release(cfg)[2] == 0


def test_a_broken_entry_under_a_spent_budget_is_refused_not_released_again(tmp_path):
    cfg = _cfg(tmp_path, budget=1.2)
    _release(cfg)
    (entry,) = (tmp_path / "targets").glob("*.pt")
    entry.write_bytes(b"broken")
    with pytest.raises(ledger.BudgetExceeded, match=r"privacy.budget_epsilon=1.2 .* already had 1 DP release"):
        _release(cfg)
    assert len(ledger.read(tmp_path / "targets")) == 1


def test_a_broken_entry_without_privacy_is_recomputed_quietly_about_the_ledger(tmp_path, caplog):
    cfg = compose_config([*TINY, f"paths.target_cache_dir={tmp_path / 'targets'}"])
    _release(cfg)
    (entry,) = (tmp_path / "targets").glob("*.pt")
    entry.write_bytes(b"broken")
    with caplog.at_level(logging.WARNING, logger="gradmm.runs.target_cache"):
        _, facts, calls = _release(cfg)
    assert calls == 1 and "ledger" not in caplog.text and str(entry) in caplog.text
    assert not (tmp_path / "targets" / ledger.LEDGER_FILE).exists()


LEDGER_DAMAGE = {
    "truncated": b'[{"release_id": "a", "noise_st',
    "not a list": b'{"releases": []}',
    "a release without noise": b'[{"clip": 1.0, "examples": []}]',
    "zero noise": b'[{"noise_std": 0.0, "clip": 1.0, "examples": []}]',
    "NaN noise": b'[{"noise_std": NaN, "clip": 1.0, "examples": []}]',
    "zero clip": b'[{"noise_std": 1.0, "clip": 0.0, "examples": []}]',
    "examples not a list": b'[{"noise_std": 1.0, "clip": 1.0, "examples": "abc"}]',
    "a release a string": b'["release"]',
    "not utf-8": b"\xff\xfe",
}


@pytest.mark.parametrize("damage", LEDGER_DAMAGE)
def test_an_unreadable_ledger_stops_every_release_and_is_kept(damage, tmp_path):
    cfg = _cfg(tmp_path)
    _release(cfg)
    path = tmp_path / "targets" / ledger.LEDGER_FILE
    path.write_bytes(LEDGER_DAMAGE[damage])
    compute = Releaser(_cfg(tmp_path, "task.lm_prefix=' '"))
    with pytest.raises(ledger.LedgerError, match=f"the privacy ledger {path} is unreadable"):
        target_cache.cached_targets(compute.cfg, REAL, torch.device("cpu"), compute)
    assert compute.calls == 0 and path.read_bytes() == LEDGER_DAMAGE[damage]


def test_an_entry_missing_from_the_ledger_is_recorded_when_read(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    _release(cfg)
    (tmp_path / "targets" / ledger.LEDGER_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="gradmm.runs.target_cache"):
        _, facts, calls = _release(cfg)
    assert calls == 0 and "missing from the ledger" in caplog.text
    assert facts["releases_on_these_examples"] == 1 and len(ledger.read(tmp_path / "targets")) == 1
    _, facts, _ = _release(cfg)
    assert len(ledger.read(tmp_path / "targets")) == 1, "recorded once"


def test_the_ledger_holds_no_plain_hash_or_text_of_an_example(tmp_path):
    import hashlib

    _release(_cfg(tmp_path))
    content = (tmp_path / "targets" / ledger.LEDGER_FILE).read_text()
    for ex in REAL:
        assert ex.text not in content and hashlib.sha256(ex.text.encode()).hexdigest()[:32] not in content
    ids = ledger.example_ids(tmp_path / "targets", [ex.text for ex in REAL])
    assert sorted(ids) == json.loads(content)[0]["examples"]
    assert ids != ledger.example_ids(tmp_path / "elsewhere", [ex.text for ex in REAL]), "keyed per cache"
    mode = stat.S_IMODE((tmp_path / "targets" / ledger.SECRET_FILE).stat().st_mode)
    assert mode & 0o077 == 0, "the key is readable by its owner only"


def test_concurrent_jobs_agree_on_one_key(tmp_path):
    keys = []
    threads = [threading.Thread(target=lambda: keys.append(ledger.secret(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys) == 8


def test_a_damaged_key_is_named(tmp_path):
    (tmp_path / ledger.SECRET_FILE).write_bytes(b"short")
    with pytest.raises(ledger.LedgerError, match=f"{tmp_path / ledger.SECRET_FILE} holds 5 bytes"):
        ledger.example_ids(tmp_path, ["a"])


# --- adjacency (finding 3) and the noise source (finding 11) ----------------------------------------

def _features(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return GradFeatures.single(torch.randn(n, 2, generator=g, dtype=torch.float64),
                               torch.randn(n, 6, generator=g, dtype=torch.float64))


def _noiseless(feats, labels, cfg):
    zero = lambda shape, std: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
    release = dp.release_targets(feats, labels, mechanism(cfg), quotas(cfg), noise=zero)
    return torch.cat([t.flatten() for ts in release.targets for t in ts])


def test_the_default_relation_is_replace_one_with_twice_the_clip():
    facts = dp.release_facts(mechanism(compose_config(DP)))
    assert facts["relation"] == "replace_one" and facts["sensitivity"] == 2 * facts["clip"]
    assert facts["noise_std"] == pytest.approx(facts["noise_multiplier"] * 2 * facts["clip"])


LABELS = [0, 1] * 4
# (relation, neighbour of (features, LABELS)): each changes one example.
NEIGHBOURS = {
    "add_remove: one removed": ("add_remove", lambda f: (f.select(list(range(7))), LABELS[:7])),
    "add_remove: one added": ("add_remove", lambda f: (_joined(f, _features(1, 7)), [*LABELS, 0])),
    "add_remove: the first removed": ("add_remove", lambda f: (f.select(list(range(1, 8))), LABELS[1:])),
    "replace_one: same class": ("replace_one", lambda f: (_joined(f.select(list(range(7))), _features(1, 3)),
                                                          [*LABELS[:7], 1])),
    "replace_one: another class": ("replace_one", lambda f: (f, [1, 1, *LABELS[2:]])),
    "replace_one: opposite gradient": ("replace_one", lambda f: (_joined(f.select(list(range(7))),
                                                                          f.select([7]).scaled(-torch.ones(1))),
                                                                 LABELS)),
}


def _joined(a, b):
    return GradFeatures([torch.cat([x, y]) for x, y in zip(a.deltas, b.deltas, strict=True)],
                        [torch.cat([x, y]) for x, y in zip(a.inputs, b.inputs, strict=True)])


@pytest.mark.parametrize("name", NEIGHBOURS)
def test_a_neighbour_is_released_and_moves_the_sums_by_at_most_the_sensitivity(name):
    relation, neighbour = NEIGHBOURS[name]
    cfg = compose_config([*DP, f"privacy.relation={relation}", "privacy.clip=0.5"])
    feats = _features()
    other_feats, other_labels = neighbour(feats)
    released = dp.release_targets(other_feats, other_labels, mechanism(cfg), quotas(cfg))  # never refused
    assert len(released.targets) == 2 and all(len(t) == 1 for t in released.targets)
    # Back from the means to the clipped sums: their distance is what the noise is calibrated to.
    moved = (_noiseless(feats, LABELS, cfg) - _noiseless(other_feats, other_labels, cfg)).norm() * 4
    sensitivity = released.facts["sensitivity"]
    assert moved <= sensitivity * (1 + 1e-9)
    if name == "replace_one: opposite gradient":
        assert moved == pytest.approx(sensitivity), "2C is reached: replace_one needs all of it"


def test_noise_is_drawn_from_the_operating_systems_csprng_alone(monkeypatch):
    """Seeding torch changes nothing; replacing os.urandom by a fixed stream makes the noise fixed."""
    torch.manual_seed(0)
    first = dp.secure_gaussian((64,), 1.0)
    torch.manual_seed(0)
    assert not torch.equal(first, dp.secure_gaussian((64,), 1.0))
    stream = lambda n: bytes(range(256)) * (n // 256) + bytes(range(n % 256))  # noqa: E731
    monkeypatch.setattr(dp.os, "urandom", stream)
    assert torch.equal(dp.secure_gaussian((64,), 1.0), dp.secure_gaussian((64,), 1.0))
    assert not hasattr(dp, "secret_generator")


@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_extreme_random_bytes_give_finite_noise(byte, monkeypatch):
    monkeypatch.setattr(dp.os, "urandom", lambda n: bytes([byte]) * n)
    assert torch.isfinite(dp.secure_gaussian((10,), 1.0)).all()


def test_the_secure_noise_is_gaussian_with_the_stated_deviation(monkeypatch):
    monkeypatch.setattr(dp, "_CHUNK", 1000)  # several chunks
    noise = dp.secure_gaussian((300, 1000), 2.5)
    assert noise.shape == (300, 1000) and noise.dtype == torch.float64
    z = noise.flatten() / 2.5
    # Unseeded by design (OS entropy): every bound is six standard errors of its statistic under a
    # standard Gaussian, so a false alarm is a ~1e-9 event.
    se = 1 / math.sqrt(z.numel())
    assert abs(z.mean()) < 6 * se and abs(z.std() - 1) < 6 * se / math.sqrt(2)
    assert abs(z.pow(4).mean() - 3) < 6 * se * math.sqrt(96), "a Gaussian's fourth moment (variance 105 - 9)"
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1]) < 6 * se, "neighbours independent"
    assert abs((z.abs() > 1.96).float().mean() - 0.05) < 6 * se * math.sqrt(0.05 * 0.95)


@pytest.mark.parametrize("change,new_entry", [
    ("matching.kind=lora", True), ("matching.modules=[model.layers.0.mlp.up_proj]", True),
    ("matching.lora_rank=4", True), ("matching.loss=full_vocab", True),
    ("matching.distance=l2", False), ("matching.union_weight=0.5", False),
])
def test_the_target_key_holds_what_is_matched_and_nothing_after(change, new_entry, tmp_path):
    """A stale entry of another matched gradient must never be read; a sweep over how targets are
    compared must not draw new ones."""
    cfg = compose_config([*TINY, f"paths.target_cache_dir={tmp_path}"])
    before = target_cache.entry_path(tmp_path, target_cache.target_key(cfg, REAL))
    changed = compose_config([*TINY, f"paths.target_cache_dir={tmp_path}", change])
    assert (target_cache.entry_path(tmp_path, target_cache.target_key(changed, REAL)) != before) == new_entry


def test_a_release_draws_its_noise_from_the_csprng_and_nothing_else(monkeypatch):
    """Fix os.urandom and the release is fixed, whatever torch's generators do; that is the whole source."""
    cfg = compose_config([*DP, "privacy.epsilon=2"])
    stream = lambda n: (bytes(range(1, 256)) * (n // 255 + 1))[:n]  # noqa: E731
    monkeypatch.setattr(dp.os, "urandom", stream)
    torch.manual_seed(1)
    first = dp.release_targets(_features(), LABELS, mechanism(cfg), quotas(cfg)).targets
    torch.manual_seed(2)
    torch.randn(5)
    again = dp.release_targets(_features(), LABELS, mechanism(cfg), quotas(cfg)).targets
    assert all(torch.equal(a, b) for ta, tb in zip(first, again, strict=True) for a, b in zip(ta, tb, strict=True))
    assert not torch.allclose(first[0][0], _noiseless(_features(), LABELS, cfg)[:12].reshape(first[0][0].shape))
