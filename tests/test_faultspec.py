"""The fault-spec grammar (spotpipe.faultspec), shared by ``ft.faults`` and ``--fail``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spotpipe.config import load_config
from spotpipe.errors import ConfigError
from spotpipe.faultspec import FaultSpecError, parse_fault_spec


@pytest.mark.parametrize(
    "text, fields",
    [
        ("stage=2@step=40", dict(stages=(2,), replica=None, step=40, random_step=False, kind="kill")),
        ("stage=1,replica=0@random", dict(stages=(1,), replica=0, step=None, random_step=True)),
        ("stages=1+2@step=30", dict(stages=(1, 2), step=30)),
        ("stage=2@stall=5s", dict(stages=(2,), random_step=True, stall_s=5.0, kind="stall")),
        ("stage=2@step=4,stall=500ms", dict(stages=(2,), step=4, stall_s=0.5, kind="stall")),
        ("10%/h", dict(stages=None, rate=0.10, rate_unit="h")),
        ("2%/step", dict(stages=None, rate=0.02, rate_unit="step")),
        ("stage=3@5%/h", dict(stages=(3,), rate=0.05, rate_unit="h")),
        (" stage = 2 @ step = 7 ", dict(stages=(2,), step=7)),
    ],
)
def test_parse_table(text, fields):
    spec = parse_fault_spec(text)
    for key, value in fields.items():
        got = getattr(spec, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("stage=2", "say when"),
        ("stage=x@step=3", "cannot read the target"),
        ("stage=1+2@step=3", "use stages=I+J"),
        ("stages=2@step=3", "two or more stages"),
        ("stages=2+2@step=3", "listed twice"),
        ("stage=1@step=-3", "non-negative integer"),
        ("stage=1@step=3,random", "only one of"),
        ("stage=1@stall=5min", "stall duration"),
        ("150%/step", "<= 100%/step"),
        ("0%/h", "must be > 0"),
        ("stage=1@tomorrow", "cannot read 'tomorrow'"),
    ],
)
def test_bad_specs_name_the_spec_and_the_accepted_forms(text, fragment):
    with pytest.raises(FaultSpecError) as info:
        parse_fault_spec(text)
    message = str(info.value)
    assert fragment in message and repr(text) in message and "accepted forms" in message


def test_config_faults_use_the_same_syntax():
    cfg = load_config(None, ['ft.faults=["stage=2@step=40", "10%/h"]'])
    assert cfg.ft.faults == ("stage=2@step=40", "10%/h")
    with pytest.raises(ConfigError, match="ft.faults: bad fault spec 'stage=2@sometime'"):
        load_config(None, ['ft.faults=["stage=2@sometime"]'])
    with pytest.raises(ConfigError, match="names stage 7"):
        load_config(None, ['ft.faults=["stage=7@step=1"]'])


def test_config_checks_specs_without_importing_ft() -> None:
    code = ("import sys, spotpipe.config as c; c.load_config(None, ['ft.faults=[\"stage=1@step=2\"]']);"
            "sys.exit(sorted(m for m in sys.modules if m.startswith('spotpipe.ft')) != [])")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
