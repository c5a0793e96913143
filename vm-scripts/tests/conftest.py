# SPDX-License-Identifier: GPL-2.0
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmlib import Vm  # noqa: E402


@pytest.fixture
def boot(request):
    """boot(kernel, **opts) -> a started Vm; stopped at the end of the test, and its console
    checked for WARNING/BUG/Oops/Call Trace."""
    vms = []

    def start(kernel="rust", **opts):
        vm = Vm(kernel, **opts)
        vms.append(vm)
        return vm.start()

    yield start
    for vm in vms:
        vm.stop()
        bad = vm.bad_console_lines()
        log = vm.dir / "console.log"
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            print(f"console of the failed test kept in {log}")
        else:
            vm.cleanup() if not bad else None
        assert not bad, f"guest console has {bad} (full log: {log})"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep
