"""Dogfood the pytest plugin: the echo examples' in-process tests run under
``pytest --smcish=both --smcish-strict`` (a nested pytest, so this suite's own run stays plain).

The nested run must pass (strict: no [smcish-ism] connection fell back) and its junit report must
show, per test, shared-memory connections on [smcish-ism] and NO_DEVICE fallbacks on [smcish-tcp].
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET

import pytest

from . import PYTHON, ROOT, child_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

MODULE = os.path.join("tests", "integration", "echo_under_smcish_plugin.py")


def test_echo_examples_under_the_plugin_both_paths_strict(tmp_path):
    junit = tmp_path / "junit.xml"
    env = child_env()
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--smcish=both", "--smcish-strict",
         f"--junitxml={junit}", MODULE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "smcish connections per test (--smcish=both, strict)" in proc.stdout, output
    cases = {case.get("name"): case for case in ET.parse(junit).iter("testcase")}
    assert len(cases) == 6, (sorted(cases), output)
    for name, case in cases.items():
        assert case.find("failure") is None and case.find("error") is None, output
        assert case.find("skipped") is None, (name, output)
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if name.endswith("[smcish-ism]"):
            assert props["smcish_mode"] == "ism", (name, props)
            assert int(props["smcish_ism"]) >= 2 and props["smcish_tcp"] == "0", (name, props)
        else:
            assert name.endswith("[smcish-tcp]") and props["smcish_mode"] == "tcp", (name, props)
            assert props["smcish_ism"] == "0" and int(props["smcish_tcp"]) >= 2, (name, props)
            assert props["smcish_fallbacks"].startswith("NO_DEVICE="), (name, props)
