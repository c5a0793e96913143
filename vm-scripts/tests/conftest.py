# SPDX-License-Identifier: GPL-2.0
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmlib import Vm  # noqa: E402

def check_debug_kernel(vm: Vm, when: str) -> dict:
    """The debug kernel's checkers are on: lockdep has not turned itself off, KFENCE is
    enabled and has found nothing, page_owner=on took effect."""
    st = vm.debug_state()
    print(f"debug kernel {when}: {st}")
    assert st.get("debug_locks") == 1, f"lockdep is off {when}: {st}"
    assert st.get("kfence enabled") == 1, f"KFENCE is not enabled {when}: {st}"
    assert st.get("kfence total bugs") == 0, f"KFENCE found bugs {when}: {st}"
    assert st.get("page_owner") == 1, f"page_owner is not on {when}: {st}"
    return st


@pytest.fixture
def boot(request):
    """boot(kernel, **opts) -> a started Vm; stopped at the end of the test, and its console
    checked for WARNING/BUG/Oops/Call Trace and the debug kernel's reports. On the debug
    kernel, lockdep, KFENCE and page_owner must be on after boot and, if the test passed,
    lockdep and KFENCE still on and quiet at the end."""
    vms = []

    def start(kernel="rust", **opts):
        vm = Vm(kernel, **opts)
        vms.append(vm)
        vm.start()
        if vm.name == "debug":
            check_debug_kernel(vm, "after boot")
        return vm

    yield start
    failed = request.node.rep_call.failed if hasattr(request.node, "rep_call") else True
    errors = []
    for vm in vms:
        log = vm.dir / "console.log"
        try:
            if vm.name == "debug" and not failed and vm.proc and vm.proc.poll() is None:
                check_debug_kernel(vm, "at the end")
        except Exception as e:
            errors.append(f"{e} (full log: {log})")
        finally:
            vm.stop()
        bad = vm.bad_console_lines()
        if bad:
            errors.append(f"guest console has {bad} (full log: {log})")
        if failed or errors:
            print(f"console kept in {log}")
        else:
            vm.cleanup()
    assert not errors, "\n".join(errors)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    if rep.when == "call":
        item.rep_call = rep
    return rep
