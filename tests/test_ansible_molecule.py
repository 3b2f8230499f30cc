"""The molecule scenario `default`: lab hosts booted, converged twice with no change, verified, stopped.

`molecule test` runs from the checkout with the venv's Ansible. The scenario's
verify step drops a real CT file on its scanner and waits for its MongoDB record.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from test_ansible_support import ROOT, VENV_BIN, ansible_env

pytestmark = pytest.mark.lab

# The steps of the scenario's test sequence.
STEPS = ("destroy", "syntax", "create", "converge", "idempotence", "verify")


@pytest.fixture(scope="module")
def molecule_run():
    """Run `molecule test` once; return its exit status, its output without colours and its duration."""
    started = time.monotonic()
    result = subprocess.run([str(VENV_BIN / "molecule"), "test", "--scenario-name", "default"],
                            cwd=ROOT, env=ansible_env(), capture_output=True, text=True, timeout=1500)
    seconds = time.monotonic() - started
    output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    return {"returncode": result.returncode, "output": output, "seconds": seconds}


def test_molecule_test_succeeds(molecule_run, record_property):
    # The duration goes to the JUnit report; no test asserts on it.
    record_property("molecule_test_seconds", round(molecule_run["seconds"]))
    print(f"molecule test took {molecule_run['seconds']:.0f} s")

    assert molecule_run["returncode"] == 0, molecule_run["output"][-6000:]


@pytest.mark.parametrize("step", STEPS)
def test_molecule_step_successful(molecule_run, step):
    # molecule writes "default ➜ STEP" on a terminal and "default > STEP" otherwise.
    assert re.search(rf"default (➜|>) {step}: Executed: Successful", molecule_run["output"]), \
        molecule_run["output"][-3000:]
