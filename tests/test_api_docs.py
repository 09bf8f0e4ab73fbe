"""docs/api/ is what scripts/gen_api_docs.py writes from the docstrings of the code under test.

A failure means a docstring, a signature or a public name changed without the reference being
regenerated: run ``python scripts/gen_api_docs.py`` and commit docs/api/.

The generator and docs/api/ live in the checkout only: a run that has neither (the suite copied
out of the checkout by ``python3 scripts/wheel.py test``) skips this test.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gen_api_docs.py")
COMMITTED = os.path.join(ROOT, "docs", "api")
FIX = "run `python scripts/gen_api_docs.py` and commit docs/api/"


def test_committed_api_docs_match_the_docstrings(tmp_path):
    if not (os.path.isfile(SCRIPT) and os.path.isdir(COMMITTED)):
        pytest.skip("no scripts/gen_api_docs.py or docs/api/ next to these tests (not a checkout)")
    out = tmp_path / "api"
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], cwd=ROOT,
                          capture_output=True, check=False, text=True, timeout=120)
    assert proc.returncode == 0, f"the generator failed:\n{proc.stderr}"
    generated = sorted(os.listdir(out))
    committed = sorted(name for name in os.listdir(COMMITTED) if name.endswith(".md"))
    assert generated == committed, (f"docs/api/ has {committed}, the generator writes {generated}: "
                                    f"{FIX}")
    _, differ, errors = filecmp.cmpfiles(out, COMMITTED, generated, shallow=False)
    assert not differ and not errors, f"docs/api/ is out of date ({', '.join(differ + errors)}): {FIX}"


def test_generator_output_is_deterministic(tmp_path):
    """Two runs in different processes, with different hash seeds and working directories,
    write the same bytes (no set order, address or path leaks into the pages)."""
    if not os.path.isfile(SCRIPT):
        pytest.skip("no scripts/gen_api_docs.py next to these tests (not a checkout)")
    outs = []
    for seed, cwd in (("1", ROOT), ("2", str(tmp_path))):
        out = tmp_path / f"api{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, SCRIPT, "--out", str(out)], cwd=cwd, env=env,
                              capture_output=True, check=False, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(out)
    names = sorted(os.listdir(outs[0]))
    assert names == sorted(os.listdir(outs[1]))
    _, differ, errors = filecmp.cmpfiles(outs[0], outs[1], names, shallow=False)
    assert not differ and not errors, differ + errors
    for name in names:
        text = (outs[0] / name).read_text()
        assert ROOT not in text and " at 0x" not in text, name
