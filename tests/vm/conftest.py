"""Tests of smcish between virtual machines (docs/vm.md): every test here is marked ``vm`` and
skipped, with the reason, where ``VmPair.available()`` says VMs cannot be booted.

``vm_pair`` boots the two guests once per session (~25-30 s under TCG) and tears them down at the
end, checking that no QEMU process of the pair is left. With ismd's guest mode
(``ism_backend.vmhost``) and the guest agent (``ism_backend.vmguest``) importable, the pair runs
both; SMCISH_VM_ISM=0/1 overrides that. SMCISH_VM_ACCEL=tcg|kvm|auto picks the accelerator
(default tcg: KVM is never required).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator

import pytest

from ism_backend.vmharness import VmPair

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.path).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.vm)


def ism_wanted() -> bool:
    """Run vmhost and the agents in the pair: SMCISH_VM_ISM, else whether both modules exist."""
    forced = os.environ.get("SMCISH_VM_ISM")
    if forced in ("0", "1"):
        return forced == "1"
    return all(importlib.util.find_spec(m) is not None
               for m in ("ism_backend.vmhost", "ism_backend.vmguest"))


def skip_unless_available() -> None:
    ok, why = VmPair.available()
    if not ok:
        pytest.skip(f"cannot boot VMs here: {why}")


@pytest.fixture(scope="session")
def vm_pair() -> Iterator[VmPair]:
    """Guests "a" (10.77.0.1) and "b" (10.77.0.2), booted once for the session."""
    skip_unless_available()
    ism = ism_wanted()
    pair = VmPair(accel=os.environ.get("SMCISH_VM_ACCEL", "tcg"), start_host=ism, agent=ism)
    pair.start()
    print(f"\n[vm_pair] {pair.boot_report()}")
    try:
        yield pair
    finally:
        t = time.monotonic()
        pair.close()
        print(f"\n[vm_pair] torn down in {time.monotonic() - t:.2f} s")
        left = pair.leftovers()
        assert not left, f"processes of the pair left after close(): {left}"
