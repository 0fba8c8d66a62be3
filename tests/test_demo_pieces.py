"""`turnout demo`'s pieces in-process: its ports from the environment, the built-in
config against config/demo.yaml, and the shape of a share line. The demo itself runs
as a subprocess in test_demo.py."""

from __future__ import annotations

import pytest
import yaml

from proxy import demo

from .test_demo import ROOT, SHARE_LINE

pytestmark = pytest.mark.unit


def test_ports_default_and_override() -> None:
    assert demo.ports_from_env({}) == demo.Ports(8080, 9901, 9001, 9002)
    override = {"TURNOUT_DEMO_PORTS": "18080, 19901,19001,19002"}
    assert demo.ports_from_env(override) == demo.Ports(18080, 19901, 19001, 19002)


def test_builtin_config_matches_config_demo_yaml() -> None:
    """The copy used when the source tree is absent (an installed wheel) must not drift."""
    in_repo = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    assert in_repo == demo.BUILTIN_CONFIG


def test_share_line_shape() -> None:
    window = demo.Tally(by_version={"blue": 91, "green": 9}, requests=100, errors=0)
    line = demo.share_line(12, 10, window, ("blue", "green"))
    m = SHARE_LINE.match(line)
    assert m, line
    assert m.groups() == ("12", "10", "91", "9", "100", "0")
