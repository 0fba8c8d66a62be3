"""The fault soak (bench/soak.py) at its quick sizes: a few seconds a scenario.

Each test runs one scenario as `python -m bench.soak --quick --only NAME`
would, in the test's own event loop, and fails with the scenario's summary
and FAIL lines (and the proxy's log) when a bound broke. `make soak` runs the
full sizes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import soak

pytestmark = pytest.mark.live


@pytest.mark.parametrize("name", [n for n in soak.SCENARIOS if n != "readonly"])
async def test_soak_scenario(name: str, tmp_path: Path) -> None:
    outcome = await soak.run_scenario(name, soak.QUICK, tmp_path)
    print(outcome.line())
    assert outcome.ok, outcome.report()


async def test_soak_readonly_state(tmp_path: Path) -> None:
    """The latch must hold in memory whatever /status looks like; that /status shows
    the failed write needs its `state` section, which an older proxy lacks."""
    outcome = await soak.run_scenario("readonly", soak.QUICK, tmp_path)
    print(outcome.line())
    assert outcome.extra.get("latched") is True, outcome.report()
    assert outcome.failures == 0, outcome.report()
    if not outcome.ok and outcome.extra.get("shape") == "no state section":
        pytest.xfail("this proxy's /status has no `state` section to show the write error")
    assert outcome.ok, outcome.report()
