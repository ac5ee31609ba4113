"""tests/mutations.py (not run by ``make test``: it runs pytest once per mutant) stays usable:
every mutant still finds its pattern exactly once in the current source. A kernel refactor that
moves a line must update the mutant, not leave it to fail the next mutation run (the
``dq-missing-scale`` mutant went stale that way when dQ moved into a helper)."""
import os

import pytest

import mutations


@pytest.mark.parametrize("mutant", mutations.MUTANTS, ids=lambda m: m.id)
def test_mutant_pattern_occurs_exactly_once(mutant):
    counts = []
    for rel, pattern, _ in mutant.edits():
        path = os.path.join(mutations.ROOT, rel)
        with open(path) as f:
            counts.append((rel, pattern, f.read().count(pattern)))
    assert any(n == 1 for *_, n in counts), f"{mutant.id}: stale, no spelling applies: {counts}"
